"""The stage DAG of a sweep: one :class:`StageNode` per stage, the :class:`Plan` that chains them, and the builders.

dataset -> DCGAN -> generation; the baseline per seed beside the GAN; sMpRL labels after a baseline and the
generation. With ``reid.decoded_cache``, dataset -> decode (real images) and generation -> decode_gen fill the
decoded-image cache that baselines and trials read (no image file is opened while training).

Each node names the config fields its key hashes, the stage outputs it reads, the Ray resources its task asks
for, and a ``build`` that runs in that task. Its imports of training code are inside ``build``: the driver plans
without importing torch (``tests/test_layers.py`` checks it). :mod:`orchestrator.stage_cache` keeps the outputs;
:mod:`orchestrator.dag` runs the plan.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import synthetic
from datasets.check import check_images
from datasets.files import file_sha256
from datasets.generated import GeneratedStore
from datasets.market1501 import load, load_test
from orchestrator.config import Config, DatasetConfig, config_hash
from orchestrator.pool_stages import check_pools, check_store, pool_node, pool_quality_node  # noqa: F401
from orchestrator.resources import generation_helpers, ray_options, stage_resources, train_workers
from orchestrator.stage_cache import (
    BaselineOut,
    DatasetOut,
    DecodedOut,
    GanOut,
    GeneratedOut,
    Paths,
    SmprlOut,
    StageNode,
    StageResult,
    same_data,
    stage_key,
)
from trainables.config import RENDER_FIELDS, ReidInputs, cache_size
from trainables.methods import BASELINE, method
from trainables.seeding import STREAMS  # the random streams' scheme: part of the keys of stages that draw them


@dataclass(frozen=True)
class PoolPlan:
    """The stages of one pool of ``sweep.pools``: the one that writes its store, the store, its decode and quality."""

    writer: str  # generate (the DCGAN's pool) or pool (synthetic_ids, folder)
    store: str
    decoded_gen: str | None = None
    quality: str | None = None


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
    pool_quality: str | None = None  # the generated pool against the real images (no trial waits for it)
    pools: dict[str, PoolPlan] = field(default_factory=dict)  # the other pools (sweep.pools) -> their stages

    def needs(self, method_name: str, seed: int, reuses_baseline: bool = True, pool: str | None = None
              ) -> tuple[str, ...]:
        """The stages a trial of ``method_name`` and ``seed`` reads (it starts once they are finished): a baseline
        trial reuses its seed's baseline stage (unless ``reuses_baseline`` is false: the learning-rate ablation's
        baselines train); the others read the real images, and the generated ones (of ``pool``: one of sweep.pools,
        None for labels.pool's) or the static labels when their method trains on them."""
        if method_name == BASELINE and reuses_baseline:
            return (self.baselines[seed],)
        traits = method(method_name)
        real = (self.dataset,) + ((self.decoded,) if self.decoded else ())
        if not traits.generated:
            return real
        if pool is not None:
            p = self.pools[pool]
            return (*real, p.writer, *((p.decoded_gen,) if p.decoded_gen else ()))
        gen = (self.decoded_gen,) if self.decoded_gen else ()
        if traits.static_ranks:
            return (*real, *gen, self.smprl[seed])
        return (*real, self.generate, *gen)


def plan_stages(cfg: Config, paths: Paths, needs: list[tuple[str, int, int]],
                other_pools: dict[str, int] | None = None) -> Plan:
    """The stages the trials ``needs`` = [(method, #GAN, seed)] read, each with its key and resources; the trials on
    ``other_pools`` (sweep.pools -> the largest #GAN read from it) read those pools' stages.

    No stage runs here. Per seed a baseline (a baseline trial reuses it; sMpRL labels come from it, or from
    ``reid.seed``'s with ``sweep.single_baseline``); one GAN and one pool of the largest #GAN per pool (labels.pool's,
    then each of sweep.pools), each measured against the real images.
    """
    nodes: dict[str, StageNode] = {}

    def add(node: StageNode) -> str:
        nodes[node.name] = node
        return node.name

    dataset = add(dataset_node(cfg, paths, stage_resources(cfg, "cpu")))
    root = str(dataset_path(cfg.dataset, paths.datasets))
    cache = str(paths.decoded) if cfg.reid.decoded_cache else None
    decoded = add(decode_node(cfg, nodes[dataset], cache, stage_resources(cfg, "cpu"))) if cache else None
    gan: str | None = None

    def chain(pool: str, n: int) -> PoolPlan:
        """The stages that write ``pool``'s first ``n`` images into a store, and decode them."""
        nonlocal gan
        if pool == "gan":
            if gan is None:
                gan = add(gan_node(cfg, dataset, stage_resources(cfg, "gan"), str(paths.decoded)))
            writer = generate_node(cfg, nodes[gan], n, stage_resources(cfg, "generate"))
        else:
            writer = pool_node(cfg, pool, n, nodes[dataset], stage_resources(cfg, "cpu"))
        name = add(writer)
        dg = add(decode_node(cfg, writer, cache, stage_resources(cfg, "cpu"))) if cache else None
        return PoolPlan(name, str(paths.stages / writer.name / "store"), dg)

    n_max = max((n for m, n, _ in needs if method(m).generated), default=0)  # the one pool every #GAN reads
    primary = chain(cfg.labels.pool, n_max) if n_max > 0 else None
    extra = {pool: chain(pool, n) for pool, n in (other_pools or {}).items() if n > 0}
    smprl_seeds = sorted({seed for m, _, seed in needs if method(m).static_ranks})
    label_seed = {s: cfg.reid.seed if cfg.sweep.single_baseline else s for s in smprl_seeds}
    real = (dataset, decoded) if decoded else (dataset,)
    baselines = {seed: add(baseline_node(cfg, real, seed, stage_resources(cfg, "reid"), cache))
                 for seed in sorted({s for m, _, s in needs if m == BASELINE} | set(label_seed.values()))}
    quality = None
    if primary is not None or extra:  # measured in the feature space of reid.seed's baseline (sMpRL's too)
        if cfg.reid.seed not in baselines:
            baselines[cfg.reid.seed] = add(baseline_node(cfg, real, cfg.reid.seed, stage_resources(cfg, "reid"), cache))

        def measure(p: PoolPlan) -> str:
            return add(pool_quality_node(cfg, nodes[dataset], nodes[baselines[cfg.reid.seed]], nodes[p.writer],
                                         stage_resources(cfg, "smprl")))

        quality = measure(primary) if primary is not None else None
        extra = {pool: dataclasses.replace(p, quality=measure(p)) for pool, p in extra.items()}
    smprl, labels = {}, {}
    for seed in smprl_seeds:  # with single_baseline every seed shares one (cached) label file
        node = smprl_node(cfg, nodes[baselines[label_seed[seed]]], nodes[primary.writer], stage_resources(cfg, "smprl"))
        smprl[seed], labels[seed] = add(node), node.name
    return Plan(nodes, dataset, root, gan, primary and primary.writer, primary and primary.store, baselines, smprl,
                labels, decoded, primary and primary.decoded_gen, cache, quality, extra)


# ------------------------------------------------------------------------------------------ stages

def dataset_path(dataset: DatasetConfig, cache: Path) -> Path:
    """Where the dataset's images are: ``dataset.root``, or the synthetic folder under ``cache`` (not drawn here; its
    name hashes the fields that draw it, not the cross-domain test sets)."""
    if dataset.root:
        return Path(dataset.root).expanduser().resolve()
    drawn = [f.name for f in dataclasses.fields(dataset) if f.name != "test_root"]
    return cache / f"synthetic-{config_hash(dataset, *drawn)}"


def check_test_roots(dataset: DatasetConfig) -> None:
    """Before any cluster time: every ``dataset.test_root`` folder must parse as a Market-format query/gallery pair
    (names, layout, every query matchable; ``datasets.market1501.load_test``); nothing is decoded."""
    for root in dataset.test_root:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ValueError(f"dataset.test_root={root} is not a folder (a Market-format dataset: query/ and "
                             f"bounding_box_test/)")
        try:
            load_test(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"dataset.test_root={root}: {err}") from None


def dataset_root(dataset: DatasetConfig, cache: Path) -> Path:
    """The dataset root: ``dataset.root`` for real data; the synthetic set drawn (once) under ``cache``."""

    root = dataset_path(dataset, cache)
    check_test_roots(dataset)
    if dataset.root:
        check_dataset(dataset)  # a given root is only read, never written
    elif dataset.name == "synthetic":
        synthetic.generate(root, ids=dataset.synthetic_ids, test_ids=dataset.synthetic_test_ids,
                           images_per_id=dataset.synthetic_images_per_id,
                           distractors=dataset.synthetic_distractors, junk=dataset.synthetic_junk,
                           size=dataset.synthetic_size, seed=dataset.synthetic_seed, counts=dataset.synthetic_counts,
                           progress=True)
    return root


def check_dataset(dataset: DatasetConfig) -> None:
    """Before any cluster time: a real or given synthetic root and every test root must parse (names, layout);
    nothing is decoded."""
    check_test_roots(dataset)

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

        root = dataset_root(dataset, cache)
        split = load(root)
        if dataset.name != "synthetic":
            check_images((*split.train, *split.query, *split.gallery))
        return DatasetOut(str(root), split.summary())

    def check(folder: Path, out: DatasetOut) -> list[str]:
        return [] if Path(out.root).is_dir() else [f"{out.root} is missing"]

    return StageNode("dataset", stage_key(same_data(cfg), "dataset"), DatasetOut, (), resources, build, check)


def gan_key(cfg: Config) -> str:
    """The DCGAN stage's key: the dataset, the gan fields the generator depends on (not how a pool is rendered from
    it: ``RENDER_FIELDS``), the identities held out of training (``reid.val_ids``) and the seeding scheme."""
    fields = [f"gan.{f.name}" for f in dataclasses.fields(cfg.gan) if f.name not in RENDER_FIELDS]
    return stage_key(same_data(cfg), "dataset", *fields, extra={"streams": STREAMS, "val_ids": cfg.reid.val_ids})


def gan_node(cfg: Config, dataset: str, resources: dict[str, float], cache_dir: str | None = None) -> StageNode:
    """DCGAN training: in the stage's task (one worker), or a Ray Train worker group the task drives. The identities
    the re-ID runs hold out for validation are not trained on."""
    gan, workers, val_ids = cfg.gan, train_workers(cfg, "gan"), cfg.reid.val_ids

    def build(folder: Path, data: StageResult) -> GanOut:
        from trainables.gan.train import train_gan

        generator = train_gan(gan, data.out.root, folder, "train", num_workers=workers,
                              cache_dir=cache_dir, val_ids=val_ids)  # images decoded once
        return GanOut(str(generator), gan.epochs, file_sha256(generator))

    def check(folder: Path, out: GanOut) -> list[str]:
        path = Path(out.generator)
        if not path.is_file():
            return [f"{path} is missing"]
        return [] if file_sha256(path) == out.sha256 else [f"{path} does not match its recorded checksum"]

    return StageNode("gan", gan_key(cfg), GanOut, (dataset,), resources, build, check, "**/samples.png")


def generate_node(cfg: Config, trained: StageNode, n: int, resources: dict[str, float]) -> StageNode:
    """Generation: this stage's worker renders shards and, on a GPU cluster, one helper per other GPU joins it."""
    seed, use_gpu, helpers, options = cfg.gan.seed, cfg.gan.use_gpu, generation_helpers(cfg), ray_options(resources)
    gan = cfg.gan

    def build(folder: Path, gan_res: StageResult) -> GeneratedOut:
        from trainables.gan.sample import Rendering, generate
        from trainables.runtime import device_for

        out = generate(gan_res.out.generator, folder / "store", n, seed=seed, device=device_for(use_gpu),
                       helpers=helpers, helper_resources=options, render=Rendering.of(gan))
        (folder / "workers.json").write_text(json.dumps(out.workers, indent=1))
        return GeneratedOut(str(out.store.root), out.store.n)

    def check(folder: Path, out: GeneratedOut) -> list[str]:
        return check_store(out)

    key = stage_key(cfg, extra={"gan": trained.key, "n": n, "render": [getattr(cfg.gan, f) for f in RENDER_FIELDS]})
    return StageNode("generate", key, GeneratedOut, (trained.name,), resources, build, check)


def baseline_key(cfg: Config, seed: int | None = None) -> str:
    """The baseline stage's key: dataset (its cross-domain test sets too: the baseline reports their metrics),
    re-ID settings (with the seed) and real-label smoothing."""
    if seed is not None:
        cfg = dataclasses.replace(cfg, reid=dataclasses.replace(cfg.reid, seed=seed))
    return stage_key(cfg, "dataset", "reid", "labels.real_smoothing", extra={"streams": STREAMS})


def baseline_node(cfg: Config, inputs: tuple[str, ...], seed: int, resources: dict[str, float],
                  cache_dir: str | None = None) -> StageNode:
    """Re-ID on real data only, with ``seed``: that seed's baseline trial and the model its sMpRL labels come from.

    ``inputs``: the dataset stage, then the decode stage when the run reads the decoded cache in ``cache_dir``.
    """
    labels = dataclasses.replace(cfg.labels, method=BASELINE, num_gan=0)
    reid, workers, tests = dataclasses.replace(cfg.reid, seed=seed), train_workers(cfg, "reid"), cfg.dataset.test_root

    def build(folder: Path, data: StageResult, *decoded: StageResult) -> BaselineOut:
        from trainables.reid.loop import run_spec, train_reid

        run = run_spec(reid, folder, "train", num_workers=workers)
        inputs = ReidInputs(data.out.root, cache_dir=cache_dir, test_roots=tests)
        return BaselineOut(str(run.run_dir), train_reid(reid, labels, inputs, run))

    def check(folder: Path, out: BaselineOut) -> list[str]:
        from trainables.checkpoints import latest

        return [] if latest(out.run_dir) else ["no checkpoint"]

    return StageNode("baseline", baseline_key(cfg, seed), BaselineOut, inputs, resources, build, check)


def decode_node(cfg: Config, source: StageNode, cache_dir: str, resources: dict[str, float]) -> StageNode:
    """The decoded-image cache of ``source``'s images (the dataset's train/query/gallery, or the generated pool) at
    the size the re-ID pipeline reads (``reid.image_size``, or its pre-crop size for paper / reference_code).

    The files are content-named in the shared ``cache_dir`` (a changed image gets a new file); the stage records
    which ones it wrote or found and a fingerprint of the images (each file's bytes and mtime). Its check wants the
    files present and the fingerprint unchanged: the stage key hashes the config, not the files, so an image changed
    in place (a dataset.root edited or re-extracted) is caught here, at the next sweep's start, and the stage rebuilt;
    the trials that read the cache can then trust it without a stat per image (``datasets.decoded_cache``).
    """

    size = cache_size(cfg.reid.image_size, cfg.reid.augment)
    workers = max(1, int(resources.get("CPU", 1)))
    stage = "decode" if source.stage == "dataset" else "decode_gen"

    def images(folder: str) -> list:
        """The record lists to decode: the dataset root's splits, or the store's images."""
        if stage == "decode":
            split = load(folder)
            return [p for p in (split.train, split.query, split.gallery) if p]
        return [GeneratedStore(folder).records()]

    def build(folder: Path, src: StageResult) -> DecodedOut:
        from datasets.decoded_cache import decoded_rows, fingerprint

        root = src.out.root if stage == "decode" else src.out.store
        parts = images(root)
        stamp = fingerprint([r for p in parts for r in p])  # before decoding: a file changed meanwhile rebuilds
        files = sorted({f for p in parts for f in decoded_rows(p, size, cache_dir, workers=workers).files})
        return DecodedOut(cache_dir, tuple(files), sum(map(len, parts)), tuple(size), root, stamp)

    def check(folder: Path, out: DecodedOut) -> list[str]:
        from datasets.decoded_cache import fingerprint, keys_path

        missing = [f"{f} is missing" for f in out.files if not (Path(f).is_file() and keys_path(f).is_file())]
        if missing or not out.fingerprint:
            return missing or ["it has no fingerprint of its images (written before they were fingerprinted)"]
        try:
            now = fingerprint([r for p in images(out.source) for r in p])
        except Exception as err:  # noqa: BLE001 - images gone or unlistable: rebuild (after a rebuilt source stage)
            return [f"its images in {out.source} cannot be read: {type(err).__name__}: {err}"]
        return [] if now == out.fingerprint else [f"the images in {out.source} changed since it ran"]

    key = stage_key(cfg, extra={"source": source.key, "size": list(size)})
    return StageNode(stage, key, DecodedOut, (source.name,), resources, build, check)


def smprl_node(cfg: Config, baseline: StageNode, generated: StageNode, resources: dict[str, float]) -> StageNode:
    """Static multi-pseudo labels: the baseline's class ranks for every generated image, stored as uint16."""
    key, reid = stage_key(cfg, extra={"baseline": baseline.key, "generate": generated.key}), cfg.reid

    def build(folder: Path, base: StageResult, gen: StageResult) -> SmprlOut:
        from trainables.reid.smprl import write_static_labels

        name = folder.name  # the node's name, "smprl-<key with its code version>": what the trials are told to read
        store = GeneratedStore(gen.out.store)
        n = write_static_labels(base.out.run_dir, store, name, reid, {"baseline": base.key})
        return SmprlOut(name, str(store.root), n)

    def check(folder: Path, out: SmprlOut) -> list[str]:
        path = Path(out.store) / "labels" / f"{out.labels}.npz"
        return [] if path.is_file() else [f"label file {path} missing"]

    return StageNode("smprl", key, SmprlOut, (baseline.name, generated.name), resources, build, check)
