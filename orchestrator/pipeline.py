"""The cached stages before the sweep: dataset -> DCGAN -> generation -> baseline re-ID -> sMpRL labels.

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

from datasets.files import atomic_write_bytes, file_sha256
from datasets.generated import GeneratedStore
from orchestrator.cluster import runs_in_process
from orchestrator.config import Config, DatasetConfig, config_hash, to_dict

DONE = "done.json"
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


@dataclass(frozen=True)
class Stages:
    """What a sweep's trials read: the dataset, the generated store, and per seed a baseline and sMpRL labels."""

    dataset: StageResult[DatasetOut]
    gan: StageResult[GanOut] | None = None
    generate: StageResult[GeneratedOut] | None = None
    baselines: dict[int, StageResult[BaselineOut]] = field(default_factory=dict)  # seed -> its baseline
    smprl: dict[int, StageResult[SmprlOut]] = field(default_factory=dict)  # seed -> its static labels

    def all(self) -> list[StageResult]:
        return [s for s in (self.dataset, self.gan, self.generate) if s] + [*self.baselines.values(),
                                                                            *self.smprl.values()]

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


# ------------------------------------------------------------------------------------------ stages

def dataset_root(dataset: DatasetConfig, cache: Path) -> Path:
    """The dataset root: ``dataset.root`` for real data; the synthetic set drawn (once) under ``cache``."""
    from datasets import synthetic
    from datasets.market1501 import load

    if dataset.name != "synthetic":
        return Path(dataset.root).expanduser()
    if dataset.root:  # an existing synthetic tree is only read; nothing is written outside the storage path
        root = Path(dataset.root).expanduser()
        if not (root / synthetic.MARKER).is_file():
            raise ValueError(f"dataset.root={dataset.root} is not a synthetic dataset written by datasets.synthetic; "
                             f"leave dataset.root unset to generate one under the storage path")
        load(root)
        return root
    root = cache / f"synthetic-{config_hash(dataset)}"
    synthetic.generate(root, ids=dataset.synthetic_ids, images_per_id=dataset.synthetic_images_per_id,
                       distractors=dataset.synthetic_distractors, junk=dataset.synthetic_junk,
                       size=dataset.synthetic_size, seed=dataset.synthetic_seed, progress=True)
    return root


def dataset_stage(cfg: Config, paths: Paths) -> StageResult[DatasetOut]:
    """The dataset root: a real dataset is parsed and every image decoded once; the synthetic one is drawn."""
    from datasets.check import check_images
    from datasets.market1501 import load

    key = stage_key(cfg, "dataset")
    if cfg.dataset.name == "synthetic":
        root = dataset_root(cfg.dataset, paths.datasets)
        return StageResult("dataset", key, root, True, DatasetOut(str(root), load(root).summary()))

    split = load(cfg.dataset.root)  # names and layout: fails fast, before anything is written

    def build(folder: Path) -> DatasetOut:
        check_images((*split.train, *split.query, *split.gallery))  # decodes every image, once per dataset
        return DatasetOut(str(Path(cfg.dataset.root).resolve()), split.summary())

    res = run_stage(paths, "dataset", key, DatasetOut, build)
    return dataclasses.replace(res, path=Path(res.out.root))


def gan_stage(cfg: Config, paths: Paths, data_root: Path) -> StageResult[GanOut]:
    from trainables.dcgan import train_gan

    def build(folder: Path) -> GanOut:
        generator = train_gan(cfg.gan, data_root, folder, "train")
        return GanOut(str(generator), cfg.gan.epochs, file_sha256(generator))

    def check(folder: Path, out: GanOut) -> list[str]:
        path = Path(out.generator)
        if not path.is_file():
            return [f"{path} is missing"]
        return [] if file_sha256(path) == out.sha256 else [f"{path} does not match its recorded checksum"]

    return run_stage(paths, "gan", stage_key(cfg, "dataset", "gan"), GanOut, build, check)


def generate_stage(cfg: Config, paths: Paths, gan: StageResult[GanOut], n: int) -> StageResult[GeneratedOut]:
    from trainables.generation import generate

    def build(folder: Path) -> GeneratedOut:
        store = generate(gan.out.generator, folder / "store", n, seed=cfg.gan.seed)
        return GeneratedOut(str(store.root), store.n)

    def check(folder: Path, out: GeneratedOut) -> list[str]:
        try:
            store = GeneratedStore(out.store)
        except (FileNotFoundError, ValueError) as err:
            return [str(err)]
        return store.verify() if store.complete else ["store is incomplete"]

    key = stage_key(cfg, "dataset", "gan", extra={"n": n})
    return run_stage(paths, "generate", key, GeneratedOut, build, check)


def baseline_key(cfg: Config, seed: int | None = None) -> str:
    """The baseline stage's key: dataset, re-ID settings (with the seed) and real-label smoothing."""
    if seed is not None:
        cfg = dataclasses.replace(cfg, reid=dataclasses.replace(cfg.reid, seed=seed))
    return stage_key(cfg, "dataset", "reid", "labels.real_smoothing")


def baseline_stage(cfg: Config, paths: Paths, data_root: Path, seed: int) -> StageResult[BaselineOut]:
    """Re-ID on real data only, with ``seed``: that seed's baseline trial and the model its sMpRL labels come from."""
    from trainables.reid import ReidInputs, run_spec, train_reid

    labels = dataclasses.replace(cfg.labels, method="baseline", num_gan=0)
    reid = dataclasses.replace(cfg.reid, seed=seed, num_workers=0 if runs_in_process(cfg) else cfg.reid.num_workers)

    def build(folder: Path) -> BaselineOut:
        res = train_reid(reid, labels, ReidInputs(str(data_root)), run_spec(reid, folder, "train"))
        return BaselineOut(str(folder / "train"), {k: v for k, v in res.items() if k != "cmc"}, res.get("cmc", []))

    def check(folder: Path, out: BaselineOut) -> list[str]:
        from trainables.runtime import latest_checkpoint

        return [] if latest_checkpoint(out.run_dir) else ["no checkpoint"]

    return run_stage(paths, "baseline", baseline_key(cfg, seed), BaselineOut, build, check)


def smprl_stage(cfg: Config, paths: Paths, baseline: StageResult[BaselineOut],
                generated: StageResult[GeneratedOut]) -> StageResult[SmprlOut]:
    """Static multi-pseudo labels: the baseline's class ranks for every generated image, stored as uint16."""
    key = stage_key(cfg, extra={"baseline": baseline.key, "generate": generated.key})
    name = f"smprl-{key}"

    def build(folder: Path) -> SmprlOut:
        from trainables.smprl import write_static_labels

        store = GeneratedStore(generated.out.store)
        n = write_static_labels(baseline.out.run_dir, store, name, cfg.reid, {"baseline": baseline.key})
        return SmprlOut(name, str(store.root), n)

    def check(folder: Path, out: SmprlOut) -> list[str]:
        try:
            found = GeneratedStore(out.store).read_labels(out.labels)
        except (FileNotFoundError, ValueError) as err:
            return [str(err)]
        return [] if found is not None else ["label file missing"]

    return run_stage(paths, "smprl", key, SmprlOut, build, check)
