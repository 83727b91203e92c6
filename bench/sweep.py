"""A K-trial smoke sweep's wall time: training vs orchestration overhead per trial; GAN and baseline trained once.

Runs ``orchestrator.sweep.run_sweep`` (preset ``smoke`` by default) on a fresh temporary storage path with the
trials one at a time (``sweep.max_concurrent=1``), then reads back

* per trial, from the trial's Tune ``result.json``: ``train_s`` = the sum of the ``epoch_time_s`` it reported;
  ``loop_other_s`` = Tune's ``time_total_s`` (trial function start -> last report) - train_s: imports, MLflow
  params, dataset parsing, model build, evaluation, checkpoints; from MLflow: ``wall_s`` = the previous trial's
  end (the last stage's for the first) -> this trial's end (its run's end time); ``outside_s`` = wall_s - Tune's
  time: trial actor start-up, final metrics, CMC plot and model logging, Tune bookkeeping. ``overhead_s`` =
  wall_s - train_s (target <= 10 s per trial on 2 cores). With ``--concurrent N > 1``, wall_s is the amortised
  trial slot (trial phase x N / K) instead;
* the stage runs in MLflow (kind ``stage``, tag ``mprl.cached``): how many GAN and baseline trainings ran (one
  each, however many trials).

    python -m bench.sweep [--trials baseline,lsro,dmprl1,dmprl2] [--preset smoke] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import format_table, machine, reproduce
from orchestrator import tracking
from orchestrator.config import LABEL_METHODS, Config, load_config
from trainables.methods import BASELINE, method

OVERHEAD_TARGET_S = 10.0


def sweep_config(args: argparse.Namespace, storage: Path) -> Config:
    return load_config(args.preset, overrides=[
        *args.overrides, f"sweep.methods={json.dumps(args.trials)}", f"sweep.max_concurrent={args.concurrent}",
        f"cluster.storage_path={storage}", f"cluster.num_cpus={args.num_cpus}"])


def tune_results(tune_dir: Path) -> dict[str, dict[str, float]]:
    """Per trial key: train_s (sum of epoch_time_s), in_tune_s (last time_total_s), epochs, from result.json."""
    from orchestrator.trials import TrialSpec

    out = {}
    for result_file in sorted(tune_dir.glob("*/result.json")):
        params = json.loads((result_file.parent / "params.json").read_text())
        by_iter = {}
        for line in result_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                by_iter[r.get("training_iteration", len(by_iter))] = r
        results = [by_iter[k] for k in sorted(by_iter)]
        timed = [r["epoch_time_s"] for r in results if "epoch_time_s" in r]
        out[TrialSpec.from_key(params["trial"]).key] = {"train_s": sum(timed), "epochs": len(timed),
                                             "in_tune_s": results[-1].get("time_total_s", 0.0) if results else 0.0}
    return out


def mlflow_children(uri: str, experiment: str, parent: str) -> list[Any]:
    """The parent sweep run's stage and trial runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_PARENT}` = '{parent}'", max_results=5000)


def _kind(runs: list[Any], kind: str) -> list[Any]:
    return [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == kind]


def trainings(stages: list[Any], name: str) -> int:
    """Stage runs of this name that actually trained (``mprl.cached`` = "false")."""
    return sum(r.info.run_name == name and r.data.tags.get("mprl.cached") == "false" for r in stages)


def trial_rows(trials: list[Any], tune: dict[str, dict], phase_start: float, concurrent: int) -> list[list]:
    """One row per trial, in order of completion (see the module docstring for the columns)."""
    done = sorted(trials, key=lambda r: r.info.end_time or 0)
    ends = [(r.info.end_time or 0) / 1000 for r in done]
    slot = (ends[-1] - phase_start) * concurrent / len(done) if done else 0.0
    rows, prev = [], phase_start
    for run, end in zip(done, ends):
        t = tune.get(run.info.run_name, {"train_s": 0.0, "epochs": 0, "in_tune_s": 0.0})
        wall = end - prev if concurrent == 1 else slot
        note = "reused baseline stage" if "mprl.reused_stage" in run.data.tags else ""
        note = run.info.status if run.info.status != "FINISHED" else note
        rows.append([run.info.run_name, t["epochs"], t["train_s"], t["in_tune_s"] - t["train_s"],
                     wall - t["in_tune_s"], wall, wall - t["train_s"], note])
        prev = end
    return rows


def phase_rows(start: float, ray_s: float, stages: list[Any], trials: list[Any], end: float,
               built: dict[str, float]) -> list[list]:
    last_stage = max(((r.info.end_time or 0) / 1000 for r in stages), default=start)
    last_trial = max(((r.info.end_time or 0) / 1000 for r in trials), default=last_stage)
    detail = ", ".join(f"{k} {v:.1f}" for k, v in built.items()) or "all cached"
    return [["ray.init", ray_s, "before run_sweep"],
            ["setup + stages", last_stage - start, f"built: {detail}"],
            [f"trials ({len(trials)})", last_trial - last_stage, "last stage end -> last trial end"],
            ["tail", end - last_trial, "results, summary, Tune shutdown"],
            ["total", end - start + ray_s, ""]]


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import what a trial imports (torch, torchvision, MLflow, Ray Tune)."""
    code = ("import time; t = time.perf_counter(); import torch, trainables.reid.loop, orchestrator.tuning, "
            "orchestrator.tracking, ray.tune; print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def start_ray(cfg: Config) -> float:
    """Start Ray as run_sweep does (``orchestrator.cluster.connect``), timed on its own."""
    import ray

    from orchestrator.cluster import connect

    t0 = time.perf_counter()
    if not ray.is_initialized():
        connect(cfg)
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", default="baseline,lsro,dmprl1,dmprl2", help="comma-separated label methods")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--concurrent", type=int, default=1, help="sweep.max_concurrent (1: exact per-trial wall)")
    p.add_argument("--num-cpus", type=int, default=3, help="cluster.num_cpus of the local Ray")
    p.add_argument("--storage", help="storage path (must not exist; default a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary storage (MLflow db, Tune results)")
    a = p.parse_args(argv)
    a.trials = [m.strip() for m in a.trials.split(",") if m.strip()]
    bad = [m for m in a.trials if m not in LABEL_METHODS]
    if bad or not a.trials:
        p.error(f"--trials {bad or 'is empty'}: choose from {', '.join(LABEL_METHODS)}")
    if a.storage and Path(a.storage).exists():
        p.error(f"--storage {a.storage} exists; the benchmark needs a fresh storage path")
    if a.concurrent < 1:
        p.error("--concurrent must be >= 1")
    return a


def run(args: argparse.Namespace, storage: Path) -> tuple[list[list], list[list], dict[str, int], Config]:
    """Run the sweep; return the phase rows, trial rows, training counts and the config."""
    import ray

    from orchestrator.stage_cache import Paths
    from orchestrator.sweep import run_sweep
    from orchestrator.trials import build_trials

    cfg = sweep_config(args, storage)
    ray_s = start_ray(cfg)
    start = time.time()
    try:
        out = run_sweep(cfg)
    finally:
        ray.shutdown()
    end = time.time()
    runs = mlflow_children(out.tracking_uri, cfg.cluster.experiment, out.parent_run_id)
    stages, trials = _kind(runs, "stage"), _kind(runs, "trial")
    built = out.stages.seconds()
    phases = phase_rows(start, ray_s, stages, trials, end, built)
    last_stage = max(((r.info.end_time or 0) / 1000 for r in stages), default=start)
    rows = trial_rows(trials, tune_results(Paths(storage).tune / out.name), last_stage, args.concurrent)
    planned = build_trials(cfg)
    counts = {"gan": trainings(stages, "stage:gan"), "baselines": trainings(stages, f"stage:{BASELINE}"),
              "gan_expected": int(any(t.num_gan > 0 for t in planned)),
              "baselines_expected": len(plan_baseline_seeds(cfg, planned))}
    return phases, rows, counts, cfg


def plan_baseline_seeds(cfg: Config, planned: list) -> set[int]:
    """The seeds whose baseline the sweep trains: baseline trials', and the static-rank methods' (one seed with
    ``sweep.single_baseline``)."""
    seeds = {t.seed for t in planned if t.method == BASELINE}
    ranked = {t.seed for t in planned if method(t.method).static_ranks}
    return seeds | ({cfg.reid.seed} if cfg.sweep.single_baseline and ranked else ranked)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = Path(args.storage or tempfile.mkdtemp(prefix="mprl-bench-sweep-")).resolve()
    try:
        phases, rows, counts, cfg = run(args, storage)
    finally:
        if not args.storage and not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    trained = [r for r in rows if r[1] > 0]
    mean_overhead = statistics.mean(r[6] for r in trained) if trained else float("nan")
    print(f"\n{machine()}\npreset {args.preset}, {len(rows)} trials ({', '.join(args.trials)}), reid.epochs "
          f"{cfg.reid.epochs}, max_concurrent {args.concurrent}, Ray num_cpus {args.num_cpus}, storage {storage}"
          f"{' (kept)' if args.keep or args.storage else ' (removed)'}")
    print(format_table(("phase", "seconds", "what"), phases))
    print(format_table(("trial", "epochs", "train_s", "loop_other_s", "outside_s", "wall_s", "overhead_s", "note"),
                       rows))
    print(f"loop_other_s = in-Tune time - train_s; outside_s = wall_s - in-Tune time; a fresh trial process "
          f"imports the trial's modules in {import_seconds():.1f} s (paid by every trial: Tune does not reuse actors)")
    verdict = "ok" if mean_overhead <= OVERHEAD_TARGET_S else "ABOVE"
    print(f"overhead per trained trial: mean {mean_overhead:.1f} s ({verdict} target <= {OVERHEAD_TARGET_S:.0f} s)")
    ok = counts["gan"] == counts["gan_expected"] and counts["baselines"] == counts["baselines_expected"]
    print(f"trainings (MLflow stage runs with mprl.cached=false): GAN {counts['gan']} (expected "
          f"{counts['gan_expected']}), baseline {counts['baselines']} (expected {counts['baselines_expected']})"
          f"{'' if ok else '  MISMATCH'}")
    print(reproduce("bench.sweep", argv))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
