"""The root configuration: the sweep and cluster sections, presets, YAML files and ``--set`` overrides.

Build it with :func:`load_config` (preset -> YAML file -> ``--set key.sub=value`` overrides, in that order).
The sections the training code reads (dataset, gan, reid, labels) and the dict<->dataclass conversion live in
the leaf module :mod:`trainables.config` and are re-exported here. Every section validates itself: an unknown
key, a value of the wrong type or an impossible value raises ``ValueError`` naming the dotted key and, for
choices, the valid options. The tree becomes a plain dict only at the Ray boundary (:func:`to_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from orchestrator.config_checks import check_lists, check_root
from trainables.config import (  # noqa: F401
    AP_MODES,
    AUGMENTS,
    BACKBONES,
    BEFORE_SWITCH,
    DATASETS,
    DISTANCES,
    LABEL_ORDERS,
    LR_SCHEMES,
    METRICS,
    OPTIMIZERS,
    POOLS,
    PRETRAINED,
    REID_MODELS,
    DatasetConfig,
    GanConfig,
    LabelsConfig,
    ReidConfig,
    build,
    check_choice,
    check_positive,
    config_hash,
    get_path,
    to_dict,
)
from trainables.methods import LABEL_METHODS

SEARCHES = ("grid", "random")
TEST_METRICS = (*METRICS, "mINP")  # of the test split: reported, never selected on
# Fields of the gan / reid sections that change where or how fast a run goes, not what it produces: no stage key or
# report setting includes them (reid.amp is not one: bf16 changes the numbers).
RUNTIME_FIELDS = ("num_workers", "use_gpu", "loader_workers", "channels_last", "local_cache_dir")
# Fields of the sweep section that change how a sweep is run, not its trials: --resume accepts a change of them (or
# of these RUNTIME_FIELDS, or of cluster.*) and continues the same sweep (orchestrator/sweep_record.py)
SWEEP_RUNTIME_FIELDS = ("max_concurrent", "max_failures")
PRESET_HELP = {  # one line each for --help
    "smoke": "a few minutes on 2 CPU cores: proves the wiring, not the science",
    "cpu": "the default demo: 3 seeds in about 14 minutes on 2 CPU cores",
    "cpu-diagnosis": "cpu on a dataset no tuning saw, with the controls that explain its result",
    "paper": "Market-1501 on GPUs, the paper's protocol: Table IV's grid and the ablations, 3 seeds (138 trials)",
    "paper-twostream": "Table VII: the two-stream net on GPUs",
    "rehearsal": "the paper's structure at Market-1501's counts with a tiny net (python -m bench.rehearsal)",
}
PRESETS = tuple(PRESET_HELP)


@dataclass(frozen=True)
class SweepConfig:
    """The Ray Tune search space and how trials are run."""

    methods: tuple[str, ...] = ("baseline", "lsro", "smprl", "dmprl1", "dmprl2")
    num_gan: tuple[int, ...] = (0, 12000, 24000, 36000, 48000)
    orders: tuple[str, ...] = ("paper",)
    orders_at: tuple[int, ...] = ()  # #GAN values at which orders other than "paper" run (empty: every #GAN)
    keeps: tuple[int | None, ...] = (None,)
    # the learning-rate ablation: every method but sMpRL again with each of these reid.lr_scheme values (and its own
    # baselines), at the #GAN values of lr_schemes_at (empty: every #GAN); reported as a setting of its own
    lr_schemes: tuple[str, ...] = ()
    lr_schemes_at: tuple[int, ...] = ()
    # other pools (labels.pool is the first): the generated methods of pool_methods (empty: every one in methods, but
    # sMpRL, whose labels are the config pool's) again on each of these, at every #GAN; reported as a column
    pools: tuple[str, ...] = ()
    pool_methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    search: str = "grid"  # grid: every combination | random: num_samples draws
    num_samples: int = 1
    asha: bool = False  # ASHA early stopping (needs reid.eval_every > 0; validation metrics need reid.val_ids > 0)
    asha_metric: str = "val_rank1"  # what ASHA compares: a validation or training metric, never a test metric
    asha_mode: str = "max"  # max | min
    max_concurrent: int = 0  # 0 = from the cluster's resources
    in_process: bool = True  # run single-worker trials inside the Tune trial (no Train worker group)
    # sMpRL labels of every seed from the baseline of reid.seed (the paper's protocol: one baseline); false: each
    # seed's labels from its own seed's baseline. Baseline trials always train per seed.
    single_baseline: bool = False
    # retries of a failed trial (Tune) and of a Train worker group; None: 3 on a cluster (cluster.address set:
    # spot nodes are reclaimed, nodes are lost), 1 on one machine
    max_failures: int | None = None

    def __post_init__(self) -> None:
        for m in self.methods:
            check_choice("sweep.methods", m, LABEL_METHODS)
        for o in self.orders:
            check_choice("sweep.orders", o, LABEL_ORDERS)
        for key in ("methods", "num_gan", "orders", "keeps", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"sweep.{key} must not be empty")
        for n in self.num_gan:
            check_positive("sweep.num_gan", n, allow_zero=True)
        for key in ("orders_at", "lr_schemes_at"):
            for n in getattr(self, key):
                if n not in self.num_gan:
                    raise ValueError(f"sweep.{key} contains {n}, which is not in sweep.num_gan={list(self.num_gan)}")
        for scheme in self.lr_schemes:
            check_choice("sweep.lr_schemes", scheme, LR_SCHEMES)
        for pool in self.pools:
            check_choice("sweep.pools", pool, POOLS)
        for m in self.pool_methods:
            if m not in self.methods:
                raise ValueError(f"sweep.pool_methods contains {m!r}, which is not in sweep.methods="
                                 f"{list(self.methods)}")
        for k in self.keeps:
            if k is not None and k < 1:
                raise ValueError(f"sweep.keeps contains {k}; each must be None or >= 1")
        check_choice("sweep.search", self.search, SEARCHES)
        check_choice("sweep.asha_mode", self.asha_mode, ("max", "min"))
        # a test metric under any prefix (rr_, bnr_, xd_<name>_: re-ranked, BN re-estimated, cross-domain)
        if self.asha_metric.endswith(TEST_METRICS) and not self.asha_metric.startswith("val_"):
            raise ValueError(f"sweep.asha_metric={self.asha_metric!r} is a test metric: test metrics never stop or "
                             f"select trials; use val_rank1 or val_mAP (with reid.val_ids > 0)")
        check_positive("sweep.num_samples", self.num_samples)
        check_positive("sweep.max_concurrent", self.max_concurrent, allow_zero=True)
        if self.max_failures is not None:
            check_positive("sweep.max_failures", self.max_failures, allow_zero=True)


@dataclass(frozen=True)
class ClusterConfig:
    """Where things run and where results go."""

    address: str | None = None  # None = start a local Ray; "auto" or "ray://host:10001" = existing cluster
    storage_path: str = "runs"  # stage cache, Ray results, MLflow artifacts; made absolute on load
    tracking_uri: str | None = None  # None = sqlite:///<storage_path>/mlflow.db
    experiment: str = "mprl"
    num_cpus: int = 0  # local Ray only; 0 = max(3, os.cpu_count())
    # the GPUs the nodes advertise may be logical (test clusters, the rehearsal): a worker given one trains on the
    # CPU instead of failing with "no CUDA device on node ..."
    logical_gpus: bool = False
    join_timeout_min: int = 30  # no worker joined and launches failed: stop (orchestrator/launch_watch.py); 0 = never

    def __post_init__(self) -> None:
        if not self.storage_path:
            raise ValueError("cluster.storage_path must not be empty")
        if "://" in self.storage_path:  # made absolute on load, s3://b/x would become the folder ./s3:/b/x
            raise ValueError(f"cluster.storage_path={self.storage_path!r} is a URI; the stage cache, the generated-"
                             f"image store and Tune/Train checkpoints are written as POSIX files (renames, appends), "
                             f"so give a folder on a mount every node has at the same path (EFS, NFS, a Kubernetes "
                             f"ReadWriteMany volume) instead")
        if not self.experiment:
            raise ValueError("cluster.experiment must not be empty")
        check_positive("cluster.num_cpus", self.num_cpus, allow_zero=True)
        check_positive("cluster.join_timeout_min", self.join_timeout_min, allow_zero=True)


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    reid: ReidConfig = field(default_factory=ReidConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    preset: str = "cpu"

    def __post_init__(self) -> None:
        check_choice("preset", self.preset, PRESETS)
        check_root(self)  # the checks across sections (orchestrator/config_checks.py)


# --------------------------------------------------------------------------------------------- presets
# Each preset is a set of overrides of the defaults above; the defaults are the paper's values where a
# paper value exists.

# The pool as the reference rendered it (layumi/Person-reID_GAN@6621e2c: its generator, two G steps per D step,
# batch-statistics sampling, per-image min-max saving) and the authors' per-parameter learning rates: the published
# Table IV came out of that code; the TIP text's "0.1 for the new FC" (lr_scheme=paper: the FC at lr x 50) is the
# ablation at 24k (docs/protocol.md).
PAPER: dict[str, dict[str, Any]] = {
    "dataset": {"name": "market1501"},
    "gan": {"image_size": [128, 128], "epochs": 30, "use_gpu": True, "arch": "lsro", "g_steps": 2,
            "sample_bn": "batch", "save_stretch": True},
    "reid": {"backbone": "resnet50", "pretrained": "imagenet", "embed_dim": None, "dropout": 0.75,
             "image_size": [224, 224], "augment": "paper", "epochs": 50, "lr_step_epoch": 40, "batch_size": 64,
             "lr": 0.002, "new_lr_mult": 50.0, "lr_scheme": "reference_code", "use_gpu": True, "loader_workers": 8,
             "ap": "market"},
    "labels": {"num_gan": 24000, "switch_at": 20},
    "sweep": {"methods": ["baseline", "allinone", "pseudo", "lsro", "smprl", "dmprl1", "dmprl2"],
              "num_gan": [12000, 18000, 24000, 30000, 36000, 48000], "orders": ["paper", "reference_code"],
              "orders_at": [24000], "lr_schemes": ["paper"], "lr_schemes_at": [24000], "seeds": [0, 1, 2]},
}

PRESET_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    # Seconds to a few minutes on 2 CPU cores: proves the wiring, not the science.
    "smoke": {
        "dataset": {"synthetic_ids": 12, "synthetic_images_per_id": 8, "synthetic_distractors": 12,
                    "synthetic_junk": 8, "synthetic_size": [64, 32]},
        "gan": {"image_size": [32, 16], "g_width": 16, "d_width": 16, "epochs": 2, "batch_size": 32,
                "num_workers": 0},
        "reid": {"backbone": "resnet18", "embed_dim": 64, "image_size": [64, 32], "epochs": 2,
                 "batch_size": 32, "lr": 0.02, "loader_workers": 0},
        "labels": {"num_gan": 64},
        "sweep": {"methods": ["baseline", "lsro", "dmprl2"], "num_gan": [64], "seeds": [0]},
    },
    # The default demo, tuned for an honest answer on 2 CPU cores (bench/RESULTS.md "The default cpu sweep"):
    # 3 seeds in about 14 minutes; 160 test identities give ~640 queries; 120 training identities with 6 images
    # each and torchreid's softmax recipe (AMSGrad Adam, L2 5e-4, label smoothing 0.1, flip + pad-crop) plus a
    # one-epoch warm-up, 16 epochs: the baseline's seed-to-seed rank-1 std is 1.7 points over 10 seeds (2.9 with
    # 12 epochs). Weight decay is one value for every method (the paper's per-method decay would confound the
    # comparison).
    "cpu": {
        "dataset": {"synthetic_ids": 120, "synthetic_test_ids": 160, "synthetic_images_per_id": 6,
                    "synthetic_distractors": 60, "synthetic_junk": 40},
        # 16-image batches for 14 epochs = ~600 steps: the fewest that draw recognisable figures here
        # rendered as the reference renders (batch statistics, per-image stretch): of the three pools measured, the
        # one nearest the real images in the baseline's feature space (Fréchet distance 148 vs 184 running / fixed
        # map, 177 with the 6621e2c generator and 2 G steps; bench/RESULTS.md): chosen on the pool, not on test
        "gan": {"image_size": [64, 32], "g_width": 32, "d_width": 32, "epochs": 14, "batch_size": 16,
                "num_workers": 0, "sample_bn": "batch", "save_stretch": True},
        "reid": {"backbone": "resnet18", "embed_dim": 256, "image_size": [64, 32], "epochs": 16,
                 "batch_size": 32, "optimizer": "adam", "lr": 0.001, "new_lr_mult": 1.0, "weight_decay": 5e-4,
                 "warmup_epochs": 1, "lr_step": 0.75, "loader_workers": 0},
        "labels": {"num_gan": 360, "real_smoothing": 0.1},
        "sweep": {"methods": ["baseline", "lsro", "dmprl2"], "num_gan": [360], "seeds": [0, 1, 2]},
    },
    # Why the default demo's GAN methods lose (issue 27; README "Why: the controls"): the cpu recipe on a dataset
    # no tuning run saw (synthetic_seed 1; the recipe was chosen on seed 0's), its methods beside the controls that
    # explain them: unlabelled (the generated images in the batches, no loss on them), baseline_matched (the steps,
    # real images), LSRO on real images of unseen identities (synthetic_ids, LSRO's own control), and every final
    # model evaluated a second time with its BatchNorm statistics re-estimated on the real training images.
    "cpu-diagnosis": {"__base__": "cpu",
                      "dataset": {"synthetic_seed": 1},
                      "reid": {"bn_recalibrate": True},
                      "sweep": {"methods": ["baseline", "lsro", "dmprl2", "unlabelled", "baseline_matched"],
                                "pools": ["synthetic_ids"], "pool_methods": ["lsro"]}},
    # Market-1501 on GPUs, the paper's settings (docs/protocol.md): Table IV's grid plus the rank-order ablation.
    "paper": PAPER,
    # Table VII: the two-stream net, 60 epochs, lr x0.1 at 40, dMpRL-II from epoch 20, 32 pairs per batch.
    "paper-twostream": {
        **PAPER,
        "reid": {**PAPER["reid"], "model": "twostream", "epochs": 60, "lr_step_epoch": 40},
        "sweep": {"methods": ["baseline", "lsro", "dmprl2"], "num_gan": [24000], "seeds": [0, 1, 2]},
    },
    # The scale rehearsal (python -m bench.rehearsal): the paper preset's structure at Market-1501's counts and
    # 24,000 generated images, every label method, on GPU workers (logical ones on a loopback cluster), with a
    # tiny network at 32x16 and a cap of 4 steps per epoch so that it runs in minutes on CPUs; the controls too:
    # LSRO on 24,000 images of unseen identities (synthetic_ids) and every model evaluated with BN re-estimated.
    "rehearsal": {
        "dataset": {"synthetic_counts": "market1501", "synthetic_size": [32, 16]},
        "gan": {"image_size": [32, 16], "g_width": 8, "d_width": 8, "epochs": 1, "max_steps": 4, "use_gpu": True,
                "arch": "lsro", "g_steps": 2, "sample_bn": "batch", "save_stretch": True},
        "reid": {"backbone": "tiny", "pretrained": "random", "embed_dim": 64, "image_size": [32, 16], "epochs": 2,
                 "max_steps": 4, "use_gpu": True, "loader_workers": 0, "lr": 0.02, "lr_scheme": "reference_code",
                 "bn_recalibrate": True},
        "labels": {"num_gan": 24000},
        "sweep": {"methods": list(LABEL_METHODS), "num_gan": [24000], "orders": ["paper", "reference_code"],
                  "lr_schemes": ["paper"], "pools": ["synthetic_ids"], "pool_methods": ["lsro"], "seeds": [0],
                  "max_concurrent": 2},
        "cluster": {"logical_gpus": True},
    },
}


def choices_help() -> str:
    """The presets and the choice-valued keys, for ``--help`` of every entry point."""
    lines = ["presets (--preset; the README's Configuration table):", *(f"  {k}: {v}" for k, v in PRESET_HELP.items()),
             "choices (--set key=value):"]
    for key, options in (("dataset.name", DATASETS), ("reid.model", REID_MODELS), ("reid.backbone", BACKBONES),
                         ("reid.augment", AUGMENTS), ("reid.optimizer", OPTIMIZERS),
                         ("reid.pretrained", (*PRETRAINED, "PATH", "null")),
                         ("labels.method / sweep.methods", LABEL_METHODS),
                         ("labels.order / sweep.orders", LABEL_ORDERS), ("reid.distance", DISTANCES),
                         ("reid.ap", AP_MODES), ("sweep.search", SEARCHES)):
        lines.append(f"  {key}: {', '.join(options)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- construction

def load_config(preset: str = "cpu", *, file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), storage_base: Path | None = None) -> Config:
    """Resolve preset -> YAML file -> ``key.sub=value`` overrides into a validated :class:`Config`.

    ``cluster.storage_path`` is made absolute (relative to ``storage_base`` or the current directory) so that
    Ray workers, which run in other directories, see the same path.
    """
    check_choice("--preset", preset, PRESETS)
    tree: dict[str, Any] = {"preset": preset}
    for layer in _preset_layers(preset):
        _merge(tree, layer)
    if file is not None:
        _merge(tree, _read_yaml(Path(file)))
    for item in overrides:
        key, value = parse_override(item)
        _merge(tree, _nest(key, value))
    cfg = from_dict(tree)
    check_lists(cfg)
    storage = Path(cfg.cluster.storage_path).expanduser()
    if not storage.is_absolute():
        storage = (storage_base or Path.cwd()) / storage
    return replace(cfg, **{"cluster.storage_path": str(storage.resolve())})


def parse_override(item: str) -> tuple[str, Any]:
    """``"reid.epochs=3"`` -> ``("reid.epochs", 3)``; the value is parsed as YAML (so ``null``, lists work)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: value is not valid YAML ({err})") from None
    return key, value


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Build a Config from nested plain data (YAML, a Ray config dict); unknown keys raise ValueError."""
    return build(Config, tree)


def flat_dict(cfg: Any) -> dict[str, Any]:
    """``{"reid.epochs": 50, ...}``: the resolved config as MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v

    walk("", to_dict(cfg))
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **dotted: Any) -> Config:
    """``replace(cfg, **{"labels.method": "lsro"})``: a validated copy with dotted fields changed."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        _merge(tree, _nest(key, value))
    return from_dict(tree)


# ------------------------------------------------------------------------------------------ helpers

def _preset_layers(preset: str) -> list[dict[str, Any]]:
    """A preset's overrides after those of the preset it builds on (``"__base__"``), without that key."""
    layer = dict(PRESET_OVERRIDES[preset])
    base = layer.pop("__base__", None)
    return [*(_preset_layers(base) if base else []), layer]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return node


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = dict(v) if isinstance(v, Mapping) else v
