"""The stage cache: stage outputs, their folders and ``done.json`` records, and the waits of trials on them.

The stage DAG (nodes and plan) is :mod:`orchestrator.stages`; :mod:`orchestrator.dag` runs it as Ray tasks.

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
from orchestrator.config import RUNTIME_FIELDS, Config, build, get_path, to_dict
from orchestrator.provenance import code_version
from trainables.config import ReidResult

DONE = "done.json"
ERROR = "error.txt"  # why a stage failed (written by the driver; trials that need the stage quote it)
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
    files: tuple[str, ...]
    images: int
    size: tuple[int, int]  # [H, W] held (the pipeline's pre-crop size for paper / reference_code)
    source: str = ""  # the images' folder: the dataset root, or the generated store
    fingerprint: str = ""  # datasets.decoded_cache.fingerprint of the images when the stage ran ("": before it)


@dataclass(frozen=True)
class BaselineOut:
    run_dir: str
    result: ReidResult  # the baseline's final test metrics (what its seed's baseline trial reports)


@dataclass(frozen=True)
class SmprlOut:
    labels: str  # the label file's name in the store
    store: str
    n: int


@dataclass(frozen=True)
class PoolQualityOut:
    """A generated pool against the real training images (``trainables.reid.pool_quality``): pixel statistics
    (0..255, RGB), the Fréchet distance of their baseline embeddings (and of two halves of the real images: the
    noise floor), the baseline's mean max-softmax, and the real-vs-generated sheet."""

    sheet: str
    rendering: str  # how the pool was rendered (gan.sample_bn, gan.save_stretch)
    fd: float
    fd_real_halves: float
    real_n: int
    gen_n: int
    real_mean: tuple[float, float, float]
    gen_mean: tuple[float, float, float]
    real_std: tuple[float, float, float]
    gen_std: tuple[float, float, float]
    real_contrast: float
    gen_contrast: float
    real_confidence: float
    gen_confidence: float

    def metrics(self) -> dict[str, float]:
        """The scalars MLflow keeps (a tuple as one metric per channel)."""
        out: dict[str, float] = {}
        for k, v in dataclasses.asdict(self).items():
            if isinstance(v, (tuple, list)):
                out.update({f"{k}_{c}": float(x) for c, x in zip("RGB", v)})
            elif isinstance(v, (int, float)):
                out[k] = float(v)
        return out

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], sheet: str, rendering: str = "?") -> "PoolQualityOut":
        """Rebuilt from what :meth:`metrics` logged (the report reads MLflow)."""
        values: dict[str, Any] = {"sheet": sheet, "rendering": rendering}
        for f in dataclasses.fields(cls):
            if f.name in ("sheet", "rendering"):
                continue
            if f.name.endswith(("_mean", "_std")):
                values[f.name] = tuple(metrics[f"{f.name}_{c}"] for c in "RGB")
            else:
                values[f.name] = int(metrics[f.name]) if f.name.endswith("_n") else metrics[f.name]
        return cls(**values)

    def summary(self) -> str:
        """One paragraph for the sweep's output and the report."""
        def rgb(v: tuple) -> str:
            return "/".join(f"{x:.0f}" for x in v)

        return (f"generated pool ({self.rendering}) vs real training images (n={self.gen_n} vs {self.real_n}): "
                f"mean RGB {rgb(self.gen_mean)} vs {rgb(self.real_mean)}, per-channel std {rgb(self.gen_std)} vs "
                f"{rgb(self.real_std)}, per-image contrast {self.gen_contrast:.1f} vs {self.real_contrast:.1f}; "
                f"Fréchet distance in the baseline's feature space {self.fd:.2f} (two halves of the real images: "
                f"{self.fd_real_halves:.2f}); baseline's mean max-softmax {self.gen_confidence:.3f} vs "
                f"{self.real_confidence:.3f}; sheet {self.sheet}")


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
    pool_quality: StageResult[PoolQualityOut] | None = None
    other_pools: tuple[StageResult, ...] = ()  # the stages of sweep.pools (writer, decode, quality of each)

    def all(self) -> list[StageResult]:
        return [s for s in (self.dataset, *self.decoded, self.gan, self.generate, self.pool_quality) if s] + [
            *self.baselines.values(), *self.smprl.values(), *self.other_pools]

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

    def __post_init__(self) -> None:
        # the key given (a hash of config fields) + the version of the code this stage runs
        # (orchestrator/provenance.py states the rule): code changed there means a new folder, never an old output
        object.__setattr__(self, "key", versioned_key(self.stage, self.key))

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.key}"


def versioned_key(stage: str, key: str) -> str:
    """``key`` (a config hash) combined with the code version of ``stage`` (:func:`provenance.code_version`)."""
    return hashlib.sha256(f"{key}:{code_version(stage)}".encode()).hexdigest()[:12]


def same_data(cfg: Config) -> Config:
    """``cfg`` without the cross-domain test sets, for the keys of the stages that do not evaluate on them (the
    dataset, the GAN, the synthetic_ids pool): adding a test set retrains only what reports its metrics (the
    baselines)."""
    return dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, test_root=()))


def stage_key(cfg: Config, *sections: str, extra: dict[str, Any] | None = None) -> str:
    """Hash of the named config sections (or dotted fields) without their runtime-only fields (workers, GPU)."""
    tree = to_dict(cfg)
    picked = {}
    for s in sections:
        node = get_path(tree, s)
        picked[s] = {k: v for k, v in node.items() if k not in RUNTIME_FIELDS} if isinstance(node, dict) else node
    blob = json.dumps({"fields": picked, "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def lookup(paths: Paths, stage: str, key: str, kind: type[T],
           check: Callable[[Path, T], list[str]] | None = None) -> tuple[StageResult[T] | None, list[str]]:
    """(the cached output of (stage, key), []) when its ``done.json`` carries the key and passes ``check``; else
    (None, why: empty when nothing is cached)."""
    folder = paths.stages / f"{stage}-{key}"
    done = folder / DONE
    if not done.is_file():
        return None, []
    record, out = _read_done(done, kind)
    problems = ["done.json is damaged"] if out is None or record.get("key") != key else (
        check(folder, out) if check else [])
    if problems:
        return None, problems
    return StageResult(stage, key, folder, True, out, record["info"].get("seconds", 0.0)), []


def run_stage(paths: Paths, stage: str, key: str, kind: type[T], build_out: Callable[[Path], T],
              check: Callable[[Path, T], list[str]] | None = None) -> StageResult[T]:
    """Return the cached output of (stage, key), or build it into its folder and mark it done. A cached output that
    fails its check is moved aside (never deleted) and rebuilt."""
    hit, problems = lookup(paths, stage, key, kind, check)
    if hit is not None:
        return hit
    folder = paths.stages / f"{stage}-{key}"
    if problems:
        aside = folder.with_name(f"{folder.name}.corrupt-{time.time_ns()}")
        print(f"[pipeline] {stage} cache at {folder} is unusable ({'; '.join(problems)}); "
              f"moved to {aside.name} and rebuilding", flush=True)
        shutil.move(str(folder), str(aside))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[pipeline] {stage}: building {folder.name}", flush=True)
    start = time.perf_counter()
    out = build_out(folder)
    seconds = round(time.perf_counter() - start, 1)
    info = {**dataclasses.asdict(out), "seconds": seconds}
    atomic_write_bytes(folder / DONE, json.dumps({"key": key, "stage": stage, "info": info}, indent=1).encode())
    return StageResult(stage, key, folder, False, out, seconds)


def _read_done(done: Path, kind: type[T]) -> tuple[dict, T | None]:
    """The record and its output (None when damaged: unreadable, or not an output of ``kind``)."""
    try:
        record = json.loads(done.read_text())
        info = {k: v for k, v in record["info"].items() if k != "seconds"}
        return record, build(kind, info)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}, None


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
