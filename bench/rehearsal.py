"""The scale rehearsal: the paper preset's whole structure at Market-1501's counts, on a cluster shaped like
``clusters/gpu.yaml``, proving where every stage and trial ran and how long the critical path is.

A loopback Ray cluster (``bench.loopback``): a head with no GPU and the driver resource, ``--workers`` nodes with
one logical GPU each; an MLflow server; storage marked shared. Then ``orchestrator.sweep.run_sweep`` with the
``rehearsal`` preset: synthetic Market-1501 counts (751 ids / 12,936 train images; 3,368 query, 15,913 gallery)
at 32x16, a DCGAN, 24,000 generated images, a baseline, sMpRL labels and a trial for every label method and rank
order, with a tiny network and 4 steps per epoch. It asserts that

* no stage, generation worker or trial ran in the driver process or on the head node, and
* the critical path (first stage submitted -> last trial finished) is at most 1.2 x (total worker compute /
  worker slots) + the longest single trial,

and prints per-stage wall time and placement, the critical path, the driver's own CPU seconds and the workers'
busy fraction. Exit code 1 when an assertion fails.

    python -m bench.rehearsal [--workers 2] [--preset rehearsal] [--set KEY=VALUE ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bench.common import format_table, machine, reproduce
from bench.loopback import gpu_cluster, mlflow_server
from orchestrator.cluster import SHARED_MARKER
from orchestrator.config import load_config

BOUND_FACTOR = 1.2


@dataclass(frozen=True)
class Work:
    kind: str  # stage | trial | generation
    name: str
    seconds: float
    where: str
    finished_at: float | None = None


def run(workers: int, preset: str, overrides: Sequence[str], storage_root: Path) -> tuple[object, object, float]:
    """The sweep on a fresh loopback cluster; returns (SweepOutcome, head node id, cluster start seconds)."""
    from orchestrator.sweep import run_sweep

    storage = storage_root / "shared" / "mprl"
    storage.mkdir(parents=True, exist_ok=True)
    (storage.parent / SHARED_MARKER).touch()  # what clusters/gpu.yaml does on the head after mounting EFS
    t0 = time.perf_counter()
    with gpu_cluster(workers) as c, mlflow_server(storage_root / "mlflow") as url:
        up = time.perf_counter() - t0
        cfg = load_config(preset, overrides=[f"cluster.storage_path={storage}", f"cluster.address={c.address}",
                                             f"cluster.tracking_uri={url}", f"sweep.max_concurrent={workers}",
                                             *overrides])
        out = run_sweep(cfg)
        return out, c.head_node.node_id, up


def collect(out) -> list[Work]:
    """Every piece of work the sweep did in workers: built stages, generation workers, trials."""
    work = [Work("stage", f"{s.stage}-{s.key}", s.seconds, s.where, (out.stage_finished_at or {}).get(
        f"{s.stage}-{s.key}")) for s in out.stages.all() if not s.cached]
    if out.stages.generate is not None and not out.stages.generate.cached:
        workers = json.loads((out.stages.generate.path / "workers.json").read_text())
        work += [Work("generation", f"{n} shards", 0.0, w) for w, n in workers.items()]
    work += [Work("trial", r.key, r.seconds or 0.0, r.where or "?") for r in out.rows]
    return work


def problems(work: list[Work], head_id: str, out, slots: int) -> list[str]:
    """Placement and critical-path violations."""
    driver = f"pid {os.getpid()}"
    found = [f"{w.kind} {w.name} ran on the head ({w.where})" for w in work if head_id[:12] in w.where]
    found += [f"{w.kind} {w.name} ran in the driver process ({w.where})" for w in work
              if w.where.endswith(driver) or w.where.split(" pid ")[-1] == str(os.getpid())]
    found += [f"{w.kind} {w.name}: placement unknown" for w in work if w.where in ("", "?")]
    found += [f"trial {r.key} failed: {r.error}" for r in out.rows if r.error]
    compute, longest, bound = budget(work, slots)
    if out.critical_path_seconds > bound:
        found.append(f"critical path {out.critical_path_seconds:.0f} s > {BOUND_FACTOR} x {compute:.0f} s / {slots} + "
                     f"{longest:.0f} s = {bound:.0f} s")
    return found


def budget(work: list[Work], slots: int) -> tuple[float, float, float]:
    """(total worker compute s, longest trial s, the critical-path bound s)."""
    compute = sum(w.seconds for w in work)
    longest = max((w.seconds for w in work if w.kind == "trial"), default=0.0)
    return compute, longest, BOUND_FACTOR * compute / slots + longest


def report(work: list[Work], out, head_id: str, up: float, slots: int) -> str:
    compute, longest, bound = budget(work, slots)
    rows = [(w.kind, w.name, f"{w.seconds:.1f}", "" if w.finished_at is None else f"{w.finished_at:.0f}",
             w.where.replace(head_id[:12], "HEAD")) for w in work]
    lines = [format_table(("kind", "name", "seconds", "done at s", "where"), rows, align="llrrl"), "",
             f"cluster + MLflow server start: {up:.0f} s (not in the critical path)",
             f"sweep wall time {out.seconds:.0f} s, of which setup (checks, ray.init, MLflow runs) "
             f"{out.seconds - out.critical_path_seconds:.0f} s",
             f"critical path (first stage submitted -> last trial done): {out.critical_path_seconds:.0f} s; bound "
             f"{BOUND_FACTOR} x {compute:.0f} s / {slots} slots + longest trial {longest:.0f} s = {bound:.0f} s",
             f"worker busy fraction: {compute / (slots * out.critical_path_seconds):.0%} ({compute:.0f} s of compute "
             f"in {slots} x {out.critical_path_seconds:.0f} s)",
             f"driver process CPU: {out.driver_cpu_seconds:.1f} s (planning, Tune, MLflow calls)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="worker nodes with one logical GPU each (default 2)")
    p.add_argument("--preset", default="rehearsal")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep", help="storage folder to keep (default: a temporary one, deleted)")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rehearsal-"))
    try:
        start = time.perf_counter()
        out, head_id, up = run(args.workers, args.preset, args.overrides, root)
        work = collect(out)
        print("\n" + report(work, out, head_id, up, args.workers))
        found = problems(work, head_id, out, args.workers)
        print(f"\n{machine()}; total {time.perf_counter() - start:.0f} s\n{reproduce('bench.rehearsal', argv)}")
        for line in found:
            print(f"FAIL: {line}", file=sys.stderr)
        print("rehearsal: " + ("FAILED" if found else "passed: nothing ran on the head or in the driver"))
        return 1 if found else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
