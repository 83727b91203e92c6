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

    def needs(self, method: str, seed: int) -> tuple[str, ...]:
        """The stages a trial of ``method`` and ``seed`` reads (it starts once they are finished)."""
        if method == "baseline":
            return (self.baselines[seed],)
        if method == "baseline_matched":
            return (self.dataset,)
        if method == "smprl":
            return (self.dataset, self.smprl[seed])
        return (self.dataset, self.generate)


def plan_stages(cfg: Config, paths: Paths, needs: list[tuple[str, int, int]]) -> Plan:
    """The stages the trials ``needs`` = [(method, #GAN, seed)] read, each with its key and resources.

    No stage runs here. Per seed a baseline (a baseline trial reuses it; sMpRL labels come from it, or from
    ``reid.seed``'s with ``sweep.single_baseline``); one GAN and one generated pool of the largest #GAN.
    """
    from orchestrator.cluster import stage_resources

    nodes: dict[str, StageNode] = {}

    def add(node: StageNode) -> str:
        nodes[node.name] = node
        return node.name

    dataset = add(dataset_node(cfg, paths, stage_resources(cfg, "cpu")))
    root = str(dataset_path(cfg.dataset, paths.datasets))
    gan = generate = store = None
    n_max = max((n for m, n, _ in needs if m != "baseline_matched"), default=0)  # baseline_matched: real only
    if n_max > 0:
        gan = add(gan_node(cfg, dataset, stage_resources(cfg, "gan")))
        gen = generate_node(cfg, nodes[gan], n_max, stage_resources(cfg, "generate"))
        generate, store = add(gen), str(paths.stages / gen.name / "store")
    smprl_seeds = sorted({seed for m, _, seed in needs if m == "smprl"})
    label_seed = {s: cfg.reid.seed if cfg.sweep.single_baseline else s for s in smprl_seeds}
    baselines = {seed: add(baseline_node(cfg, dataset, seed, stage_resources(cfg, "reid")))
                 for seed in sorted({s for m, _, s in needs if m == "baseline"} | set(label_seed.values()))}
    smprl, labels = {}, {}
    for seed in smprl_seeds:  # with single_baseline every seed shares one (cached) label file
        node = smprl_node(cfg, nodes[baselines[label_seed[seed]]], nodes[generate], stage_resources(cfg, "smprl"))
        smprl[seed], labels[seed] = add(node), node.name
    return Plan(nodes, dataset, root, gan, generate, store, baselines, smprl, labels)


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


# ------------------------------------------------------------------------------------------ stages

def dataset_path(dataset: DatasetConfig, cache: Path) -> Path:
    """Where the dataset's images are: ``dataset.root``, or the synthetic folder under ``cache`` (not drawn here)."""
    if dataset.root:
        return Path(dataset.root).expanduser().resolve()
    return cache / f"synthetic-{config_hash(dataset)}"


def dataset_root(dataset: DatasetConfig, cache: Path) -> Path:
    """The dataset root: ``dataset.root`` for real data; the synthetic set drawn (once) under ``cache``."""
    from datasets import synthetic

    root = dataset_path(dataset, cache)
    if dataset.root:
        check_dataset(dataset)  # a given root is only read, never written
    elif dataset.name == "synthetic":
        synthetic.generate(root, ids=dataset.synthetic_ids, images_per_id=dataset.synthetic_images_per_id,
                           distractors=dataset.synthetic_distractors, junk=dataset.synthetic_junk,
                           size=dataset.synthetic_size, seed=dataset.synthetic_seed, counts=dataset.synthetic_counts,
                           progress=True)
    return root


def check_dataset(dataset: DatasetConfig) -> None:
    """Before any cluster time: a real or given synthetic root must parse (names, layout); nothing is decoded."""
    from datasets import synthetic
    from datasets.market1501 import load

    if dataset.name == "synthetic" and dataset.root:  # an existing synthetic tree is only read, never written
        root = Path(dataset.root).expanduser()
        if not (root / synthetic.MARKER).is_file():
            raise ValueError(f"dataset.root={dataset.root} is not a synthetic dataset written by datasets.synthetic; "
                             f"leave dataset.root unset to generate one under the storage path")
    if dataset.root:
        load(Path(dataset.root).expanduser())


def dataset_node(cfg: Config, paths: Paths, resources: dict[str, float]) -> StageNode:
    """The synthetic set is drawn; a real dataset has every image decoded once (a corrupt file fails here)."""
    dataset, cache = cfg.dataset, paths.datasets

    def build(folder: Path) -> DatasetOut:
        from datasets.check import check_images
        from datasets.market1501 import load

        root = dataset_root(dataset, cache)
        split = load(root)
        if dataset.name != "synthetic":
            check_images((*split.train, *split.query, *split.gallery))
        return DatasetOut(str(root), split.summary())

    def check(folder: Path, out: DatasetOut) -> list[str]:
        return [] if Path(out.root).is_dir() else [f"{out.root} is missing"]

    return StageNode("dataset", stage_key(cfg, "dataset"), DatasetOut, (), resources, build, check)


def gan_node(cfg: Config, dataset: str, resources: dict[str, float]) -> StageNode:
    """DCGAN training: in the stage's task (one worker), or a Ray Train worker group the task drives."""
    in_process = cfg.sweep.in_process and cfg.gan.num_workers <= 1
    gan = dataclasses.replace(cfg.gan, num_workers=0) if in_process else cfg.gan

    def build(folder: Path, data: StageResult) -> GanOut:
        from trainables.dcgan import train_gan

        generator = train_gan(gan, data.out.root, folder, "train")
        return GanOut(str(generator), gan.epochs, file_sha256(generator))

    def check(folder: Path, out: GanOut) -> list[str]:
        path = Path(out.generator)
        if not path.is_file():
            return [f"{path} is missing"]
        return [] if file_sha256(path) == out.sha256 else [f"{path} does not match its recorded checksum"]

    return StageNode("gan", stage_key(cfg, "dataset", "gan"), GanOut, (dataset,), resources, build, check,
                     "**/samples.png")


def generate_node(cfg: Config, gan: StageNode, n: int, resources: dict[str, float]) -> StageNode:
    """Generation: this stage's worker renders shards and, on a GPU cluster, one helper per other GPU joins it."""
    from orchestrator.cluster import generation_helpers, ray_options

    seed, use_gpu, helpers, options = cfg.gan.seed, cfg.gan.use_gpu, generation_helpers(cfg), ray_options(resources)

    def build(folder: Path, gan_res: StageResult) -> GeneratedOut:
        from trainables.generation import generate
        from trainables.runtime import device_for

        out = generate(gan_res.out.generator, folder / "store", n, seed=seed, device=device_for(use_gpu),
                       helpers=helpers, helper_resources=options)
        (folder / "workers.json").write_text(json.dumps(out.workers, indent=1))
        return GeneratedOut(str(out.store.root), out.store.n)

    def check(folder: Path, out: GeneratedOut) -> list[str]:
        try:
            store = GeneratedStore(out.store)
            return store.verify() if store.complete else ["store is incomplete"]
        except Exception as err:  # noqa: BLE001 - a damaged table or shard: rebuild, never fail the sweep here
            return [f"{type(err).__name__}: {err}"]

    key = stage_key(cfg, "dataset", "gan", extra={"n": n})
    return StageNode("generate", key, GeneratedOut, (gan.name,), resources, build, check)


def baseline_key(cfg: Config, seed: int | None = None) -> str:
    """The baseline stage's key: dataset, re-ID settings (with the seed) and real-label smoothing."""
    if seed is not None:
        cfg = dataclasses.replace(cfg, reid=dataclasses.replace(cfg.reid, seed=seed))
    return stage_key(cfg, "dataset", "reid", "labels.real_smoothing")


def baseline_node(cfg: Config, dataset: str, seed: int, resources: dict[str, float]) -> StageNode:
    """Re-ID on real data only, with ``seed``: that seed's baseline trial and the model its sMpRL labels come from."""
    labels = dataclasses.replace(cfg.labels, method="baseline", num_gan=0)
    reid = dataclasses.replace(cfg.reid, seed=seed, num_workers=0 if runs_in_process(cfg) else cfg.reid.num_workers)

    def build(folder: Path, data: StageResult) -> BaselineOut:
        from trainables.reid import ReidInputs, run_spec, train_reid

        res = train_reid(reid, labels, ReidInputs(data.out.root), run_spec(reid, folder, "train"))
        return BaselineOut(str(folder / "train"), {k: v for k, v in res.items() if k != "cmc"}, res.get("cmc", []))

    def check(folder: Path, out: BaselineOut) -> list[str]:
        from trainables.runtime import latest_checkpoint

        return [] if latest_checkpoint(out.run_dir) else ["no checkpoint"]

    return StageNode("baseline", baseline_key(cfg, seed), BaselineOut, (dataset,), resources, build, check)


def smprl_node(cfg: Config, baseline: StageNode, generated: StageNode, resources: dict[str, float]) -> StageNode:
    """Static multi-pseudo labels: the baseline's class ranks for every generated image, stored as uint16."""
    key = stage_key(cfg, extra={"baseline": baseline.key, "generate": generated.key})
    name, reid = f"smprl-{key}", cfg.reid

    def build(folder: Path, base: StageResult, gen: StageResult) -> SmprlOut:
        from trainables.smprl import write_static_labels

        store = GeneratedStore(gen.out.store)
        n = write_static_labels(base.out.run_dir, store, name, reid, {"baseline": base.key})
        return SmprlOut(name, str(store.root), n)

    def check(folder: Path, out: SmprlOut) -> list[str]:
        path = Path(out.store) / "labels" / f"{out.labels}.npz"
        return [] if path.is_file() else [f"label file {path} missing"]

    return StageNode("smprl", key, SmprlOut, (baseline.name, generated.name), resources, build, check)
