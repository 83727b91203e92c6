"""Stage outputs, the stage cache, and the DAG's records (:class:`StageNode`, :class:`Plan`, :func:`execute`).

The stages themselves are in :mod:`orchestrator.stages`; :mod:`orchestrator.dag` runs them as Ray tasks.

Each stage's output lives in ``<storage>/stages/<stage>-<key>/``, where ``key`` hashes exactly the config fields
the stage depends on (so a sweep over label hyperparameters trains no GAN). A stage counts as done only when
its ``done.json`` (written atomically, last) carries that key; an output that fails its check is moved aside
(never deleted) and rebuilt. Each stage returns a :class:`StageResult` whose ``out`` is a small frozen record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from datasets.files import atomic_write_bytes
from orchestrator.config import Config, to_dict

DONE = "done.json"
ERROR = "error.txt"  # why a stage failed (written by the driver; trials that need the stage quote it)
# Fields that change where/how fast a stage runs but not what it produces (reid.amp is not one: bf16 changes the
# numbers, so a bf16 baseline is never reused by an fp32 run).
RUNTIME_FIELDS = ("num_workers", "use_gpu", "loader_workers", "channels_last")
T = TypeVar("T")


# ------------------------------------------------------------------------------------ stage outputs

@dataclass(frozen=True)
class DatasetOut:
    root: str
    summary: str


@dataclass(frozen=True)
class GanOut:
    generator: str
    epochs: int
    sha256: str


@dataclass(frozen=True)
class GeneratedOut:
    store: str
    n: int


@dataclass(frozen=True)
class DecodedOut:
    """Decoded-image cache files (``datasets.decoded_cache``) a decode stage wrote or found in ``cache_dir``."""

    cache_dir: str
    files: list[str]
    images: int
    size: list[int]  # [H, W] held (the pipeline's pre-crop size for paper / reference_code)


@dataclass(frozen=True)
class BaselineOut:
    run_dir: str
    metrics: dict[str, float]
    cmc: list[float]


@dataclass(frozen=True)
class SmprlOut:
    labels: str  # the label file's name in the store
    store: str
    n: int


@dataclass(frozen=True)
class StageResult(Generic[T]):
    stage: str
    key: str
    path: Path
    cached: bool
    out: T
    seconds: float = 0.0
    where: str = ""  # node and process that built it (empty when cached)
    cpu_seconds: float = 0.0  # CPU time of the process that built it
    ended: float = 0.0  # time.time() when its task ended (0 when cached)


@dataclass(frozen=True)
class Stages:
    """What a sweep's trials read: the dataset, the generated store, and per seed a baseline and sMpRL labels."""

    dataset: StageResult[DatasetOut]
    gan: StageResult[GanOut] | None = None
    generate: StageResult[GeneratedOut] | None = None
    baselines: dict[int, StageResult[BaselineOut]] = field(default_factory=dict)  # seed -> its baseline
    smprl: dict[int, StageResult[SmprlOut]] = field(default_factory=dict)  # seed -> its static labels
    decoded: tuple[StageResult, ...] = ()  # the decoded-image cache stages (real, generated)

    def all(self) -> list[StageResult]:
        return [s for s in (self.dataset, *self.decoded, self.gan, self.generate) if s] + [
            *self.baselines.values(), *self.smprl.values()]

    def seconds(self) -> dict[str, float]:
        """Build seconds of each stage built (not cached) by this sweep, by stage name (summed over seeds)."""
        out: dict[str, float] = {}
        for s in self.all():
            if not s.cached:
                out[s.stage] = out.get(s.stage, 0.0) + s.seconds
        return out


@dataclass(frozen=True)
class Paths:
    storage: Path

    @property
    def stages(self) -> Path:
        return self.storage / "stages"

    @property
    def datasets(self) -> Path:
        return self.storage / "datasets"

    @property
    def tune(self) -> Path:
        return self.storage / "tune"

    @property
    def trials(self) -> Path:
        return self.storage / "trials"

    @property
    def decoded(self) -> Path:
        """The decoded-image cache: content-named files, shared by every stage, trial and sweep on this storage."""
        return self.storage / "decoded"


# ------------------------------------------------------------------------------------ caching

def stage_key(cfg: Config, *sections: str, extra: dict[str, Any] | None = None) -> str:
    """Hash of the named config sections without their runtime-only fields (workers, GPU, AMP)."""
    tree = to_dict(cfg)
    picked = {}
    for s in sections:
        node = tree
        for part in s.split("."):
            node = node[part]
        picked[s] = {k: v for k, v in node.items() if k not in RUNTIME_FIELDS} if isinstance(node, dict) else node
    blob = json.dumps({"fields": picked, "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_stage(paths: Paths, stage: str, key: str, kind: type[T], build: Callable[[Path], T],
              check: Callable[[Path, T], list[str]] | None = None) -> StageResult[T]:
    """Return the cached output of (stage, key), or build it into its folder and mark it done."""
    folder = paths.stages / f"{stage}-{key}"
    done = folder / DONE
    if done.is_file():
        record, out = _read_done(done, kind)
        problems = ["done.json is damaged"] if out is None or record.get("key") != key else (
            check(folder, out) if check else [])
        if not problems:
            return StageResult(stage, key, folder, True, out, record["info"].get("seconds", 0.0))
        aside = folder.with_name(f"{folder.name}.corrupt-{time.time_ns()}")
        print(f"[pipeline] {stage} cache at {folder} is unusable ({'; '.join(problems)}); "
              f"moved to {aside.name} and rebuilding", flush=True)
        shutil.move(str(folder), str(aside))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[pipeline] {stage}: building {folder.name}", flush=True)
    start = time.perf_counter()
    out = build(folder)
    seconds = round(time.perf_counter() - start, 1)
    info = {**dataclasses.asdict(out), "seconds": seconds}
    atomic_write_bytes(done, json.dumps({"key": key, "stage": stage, "info": info}, indent=1).encode())
    return StageResult(stage, key, folder, False, out, seconds)


def _read_done(done: Path, kind: type[T]) -> tuple[dict, T | None]:
    try:
        record = json.loads(done.read_text())
        names = {f.name for f in dataclasses.fields(kind)}
        return record, kind(**{k: v for k, v in record["info"].items() if k in names})
    except (json.JSONDecodeError, KeyError, TypeError):
        return {}, None


# ------------------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class StageNode:
    """One stage of the DAG: what it builds, from which other stages' outputs, with which Ray resources.

    ``build(folder, *deps)`` runs in a Ray worker (never in the driver) and gets the :class:`StageResult` of each
    stage named in ``deps``, in order. ``check(folder, out)`` validates a cached output (cheap; the driver runs it).
    """

    stage: str
    key: str
    kind: type
    deps: tuple[str, ...]
    resources: dict[str, float]
    build: Callable[..., Any]
    check: Callable[[Path, Any], list[str]] | None = None
    artifacts: str | None = None  # glob of files (under the stage folder) logged with the stage's MLflow run

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.key}"


@dataclass(frozen=True)
class Plan:
    """The stage DAG of a sweep (``nodes`` in topological order) and which node serves what."""

    nodes: dict[str, StageNode]
    dataset: str
    data_root: str  # where the dataset stage puts (or finds) the images: known before it runs
    gan: str | None = None
    generate: str | None = None
    store: str | None = None  # the generated store's folder
    baselines: dict[int, str] = field(default_factory=dict)  # seed -> baseline node name
    smprl: dict[int, str] = field(default_factory=dict)  # seed -> sMpRL node name (labels of that seed)
    smprl_labels: dict[int, str] = field(default_factory=dict)  # seed -> its label file's name in the store
    decoded: str | None = None  # the real images' decode stage (None: reid.decoded_cache is off)
    decoded_gen: str | None = None  # the generated images' decode stage
    cache_dir: str | None = None  # the decoded-image cache folder the trials read (ReidInputs.cache_dir)

    def needs(self, method: str, seed: int) -> tuple[str, ...]:
        """The stages a trial of ``method`` and ``seed`` reads (it starts once they are finished)."""
        real = (self.dataset,) + ((self.decoded,) if self.decoded else ())
        gen = (self.decoded_gen,) if self.decoded_gen else ()
        if method == "baseline":
            return (self.baselines[seed],)
        if method == "baseline_matched":
            return real
        if method == "smprl":
            return (*real, *gen, self.smprl[seed])
        return (*real, self.generate, *gen)


def require_finished(folder: str | Path) -> Path:
    """``folder/done.json``; FileNotFoundError naming the stage (and why it failed) when it has not finished."""
    done = Path(folder) / DONE
    if not done.is_file():
        error = Path(folder) / ERROR
        why = f": {error.read_text().strip()}" if error.is_file() else ""
        raise FileNotFoundError(f"input stage {Path(folder).name} has not finished{why}")
    return done


def wait_finished(folder: str | Path, timeout_s: float = 48 * 3600, poll_s: float = 5.0) -> Path:
    """Wait until the stage in ``folder`` has finished or failed, then :func:`require_finished`.

    Tune hands a trial its inputs only once they are done; a trial Tune requeues on ``--resume`` may start while
    its (resubmitted) input stage still runs, and waits here instead of failing.
    """
    deadline = time.monotonic() + timeout_s
    folder = Path(folder)
    while not ((folder / DONE).is_file() or (folder / ERROR).is_file()) and time.monotonic() < deadline:
        time.sleep(poll_s)
    return require_finished(folder)


def read_output(folder: str | Path, kind: type[T]) -> T:
    """The recorded output of a finished stage folder (see :func:`require_finished`)."""
    done = require_finished(folder)
    _, out = _read_done(done, kind)
    if out is None:
        raise ValueError(f"{done} is damaged")
    return out


def cached(paths: Paths, node: StageNode) -> StageResult | None:
    """The node's cached result when its ``done.json`` carries its key and passes its check (the driver's look)."""
    folder = paths.stages / node.name
    record, out = _read_done(folder / DONE, node.kind) if (folder / DONE).is_file() else ({}, None)
    if out is None or record.get("key") != node.key or (node.check and node.check(folder, out)):
        return None
    return StageResult(node.stage, node.key, folder, True, out, record["info"].get("seconds", 0.0))


def execute(paths: Paths, node: StageNode, *deps: StageResult) -> StageResult:
    """Body of a stage's Ray task: build (or reuse) the node's output; records where it ran and its CPU time."""
    import os

    from trainables.runtime import node_label

    cpu = time.process_time()
    res = run_stage(paths, node.stage, node.key, node.kind, lambda folder: node.build(folder, *deps), node.check)
    return dataclasses.replace(res, where=f"{node_label()} pid {os.getpid()}",
                               cpu_seconds=round(time.process_time() - cpu, 1), ended=time.time())
