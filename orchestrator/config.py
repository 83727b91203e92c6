"""One frozen, typed configuration tree for the whole experiment.

Build it with :func:`load_config` (preset -> YAML file -> ``--set key.sub=value`` overrides, in that order).
Every section validates itself in ``__post_init__``: an unknown key, a value of the wrong type or an impossible
value raises ``ValueError`` naming the dotted key and, for choices, the valid options. The tree is converted to a
plain dict only at the Ray boundary (:func:`to_dict`) and back with :func:`from_dict` on the worker's first line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

DATASETS = ("synthetic", "market1501", "dukemtmc", "cuhk03np")
BACKBONES = ("resnet18", "resnet34", "resnet50")
REID_MODELS = ("ident", "twostream")
LABEL_METHODS = ("baseline", "allinone", "pseudo", "lsro", "smprl", "dmprl1", "dmprl2")
LABEL_ORDERS = ("paper", "reference_code")
BEFORE_SWITCH = ("ignore", "exclude")
SEARCHES = ("grid", "random")
DISTANCES = ("cosine", "euclidean")
AP_MODES = ("standard", "market")
PRESETS = ("smoke", "cpu", "paper")


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, options))}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _fraction(key: str, value: float, *, closed_right: bool = True) -> None:
    if not (0.0 <= value <= 1.0) or (not closed_right and value == 1.0):
        raise ValueError(f"{key}={value!r} must be in [0, 1{']' if closed_right else ')'}")


def _image_size(key: str, value: tuple[int, int]) -> None:
    if len(value) != 2 or min(value) < 8:
        raise ValueError(f"{key}={value!r} must be [height, width] with both >= 8")


@dataclass(frozen=True)
class DatasetConfig:
    """Which re-ID dataset; the synthetic one is generated on first use under the storage path."""

    name: str = "synthetic"
    root: str | None = None  # required for real datasets; for synthetic, None = <storage>/datasets/synthetic-<hash>
    synthetic_ids: int = 24  # identities per split (train and test each)
    synthetic_images_per_id: int = 10  # mean images per identity
    synthetic_distractors: int = 40  # pid 0 gallery images
    synthetic_junk: int = 30  # pid -1 gallery images
    synthetic_size: tuple[int, int] = (128, 64)
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        _choice("dataset.name", self.name, DATASETS)
        if self.name != "synthetic" and not self.root:
            raise ValueError(f"dataset.root is required for dataset.name={self.name!r} (a local folder path)")
        if not 2 <= self.synthetic_ids <= 5000:
            raise ValueError(f"dataset.synthetic_ids={self.synthetic_ids} must be in [2, 5000]")
        if self.synthetic_images_per_id < 2:
            raise ValueError(f"dataset.synthetic_images_per_id={self.synthetic_images_per_id} must be >= 2")
        _positive("dataset.synthetic_distractors", self.synthetic_distractors, allow_zero=True)
        _positive("dataset.synthetic_junk", self.synthetic_junk, allow_zero=True)
        _image_size("dataset.synthetic_size", self.synthetic_size)


@dataclass(frozen=True)
class GanConfig:
    """DCGAN (Radford et al. 2016) with the LSRO settings: Adam(2e-4, beta1 0.5), uniform latent."""

    image_size: tuple[int, int] = (64, 32)  # generator output [H, W]; resized to reid.image_size for re-ID
    latent_dim: int = 100
    g_width: int = 64  # channels of the last generator stage (doubles per stage towards the latent)
    d_width: int = 64
    epochs: int = 30
    batch_size: int = 64  # global; split across workers
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    num_workers: int = 1  # Ray Train workers (0 = in-process, no worker group)
    use_gpu: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _image_size("gan.image_size", self.image_size)
        for key in ("latent_dim", "g_width", "d_width", "epochs", "batch_size"):
            _positive(f"gan.{key}", getattr(self, key))
        _positive("gan.lr", self.lr)
        _fraction("gan.beta1", self.beta1, closed_right=False)
        _fraction("gan.beta2", self.beta2, closed_right=False)
        _workers("gan", self.num_workers, self.batch_size)


@dataclass(frozen=True)
class ReidConfig:
    """Re-ID network and its training (research/mprl.md §4)."""

    model: str = "ident"  # ident | twostream
    backbone: str = "resnet50"
    pretrained: str | None = None  # local torchvision ImageNet state dict; never downloaded
    embed_dim: int | None = 512  # bottleneck size; None = plain pool5 feature (the paper)
    dropout: float = 0.5
    last_stride: int = 2
    image_size: tuple[int, int] = (256, 128)
    epochs: int = 50
    batch_size: int = 64  # global; split across workers
    lr: float = 0.01  # backbone rate; new layers get lr * new_lr_mult
    new_lr_mult: float = 10.0
    lr_step: float = 0.8  # lr x lr_gamma after this fraction of training (epoch 40 of 50)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # None = per label method (1e-4; 5e-4 for dmprl1/dmprl2)
    gen_fraction: float | None = None  # share of generated images per batch; None = proportional to counts
    pos_fraction: float | None = None  # two-stream positive pairs; None = reference schedule 1/3 -> 1/6
    num_workers: int = 1  # Ray Train workers (0 = in-process)
    use_gpu: bool = False
    loader_workers: int = 2  # DataLoader processes per Ray Train worker
    amp: bool = True  # bf16 autocast (GPU only)
    channels_last: bool = True  # GPU only
    eval_every: int = 0  # evaluate every N epochs (0 = only at the end)
    distance: str = "cosine"
    flip_test: bool = True
    ap: str = "standard"  # standard (torchreid) | market (the devkit; the paper's numbers)
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("reid.model", self.model, REID_MODELS)
        _choice("reid.backbone", self.backbone, BACKBONES)
        _choice("reid.distance", self.distance, DISTANCES)
        _choice("reid.ap", self.ap, AP_MODES)
        _choice("reid.last_stride", self.last_stride, (1, 2))
        if self.embed_dim is not None:
            _positive("reid.embed_dim", self.embed_dim)
        _fraction("reid.dropout", self.dropout, closed_right=False)
        _image_size("reid.image_size", self.image_size)
        for key in ("epochs", "batch_size", "lr", "new_lr_mult", "lr_gamma"):
            _positive(f"reid.{key}", getattr(self, key))
        _fraction("reid.lr_step", self.lr_step)
        _fraction("reid.momentum", self.momentum, closed_right=False)
        if self.weight_decay is not None:
            _positive("reid.weight_decay", self.weight_decay, allow_zero=True)
        if self.gen_fraction is not None:
            _fraction("reid.gen_fraction", self.gen_fraction, closed_right=False)
        if self.pos_fraction is not None and not 0 < self.pos_fraction < 1:
            raise ValueError(f"reid.pos_fraction={self.pos_fraction} must be in (0, 1)")
        _positive("reid.loader_workers", self.loader_workers, allow_zero=True)
        _positive("reid.eval_every", self.eval_every, allow_zero=True)
        _workers("reid", self.num_workers, self.batch_size)


@dataclass(frozen=True)
class LabelsConfig:
    """Virtual labels for generated images (research/mprl.md §2; trainables/labels.py)."""

    method: str = "lsro"
    num_gan: int = 0  # generated images used by this run (the first num_gan of the store)
    order: str = "paper"  # paper | reference_code (the published MATLAB's indexing)
    keep: int | None = None  # MpRL truncation: only the `keep` most likely classes carry weight
    gen_weight: float | None = None  # lambda; None = the method's default (0.1 pseudo/dmprl2, else 1)
    switch_epoch: float = 0.4  # fraction of training after which pseudo/dmprl2 turn on (epoch 20 of 50)
    before_switch: str = "ignore"  # ignore: sampled, zero loss (Algorithm 1) | exclude: not sampled
    real_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _choice("labels.method", self.method, LABEL_METHODS)
        _choice("labels.order", self.order, LABEL_ORDERS)
        _choice("labels.before_switch", self.before_switch, BEFORE_SWITCH)
        _positive("labels.num_gan", self.num_gan, allow_zero=True)
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"labels.keep={self.keep} must be None or in 1..K (number of training ids)")
        if self.gen_weight is not None:
            _positive("labels.gen_weight", self.gen_weight, allow_zero=True)
        _fraction("labels.switch_epoch", self.switch_epoch)
        _fraction("labels.real_smoothing", self.real_smoothing, closed_right=False)


@dataclass(frozen=True)
class SweepConfig:
    """The Ray Tune search space and how trials are run."""

    methods: tuple[str, ...] = ("baseline", "lsro", "smprl", "dmprl1", "dmprl2")
    num_gan: tuple[int, ...] = (0, 12000, 24000, 36000, 48000)
    orders: tuple[str, ...] = ("paper",)
    keeps: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = (0,)
    search: str = "grid"  # grid: every combination | random: num_samples draws
    num_samples: int = 1
    asha: bool = False  # ASHA early stopping on rank-1 (needs reid.eval_every > 0)
    max_concurrent: int = 0  # 0 = from the cluster's resources
    in_process: bool = True  # run single-worker trials inside the Tune trial (no Train worker group)
    max_failures: int = 1

    def __post_init__(self) -> None:
        for m in self.methods:
            _choice("sweep.methods", m, LABEL_METHODS)
        for o in self.orders:
            _choice("sweep.orders", o, LABEL_ORDERS)
        for key in ("methods", "num_gan", "orders", "keeps", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"sweep.{key} must not be empty")
        for n in self.num_gan:
            _positive("sweep.num_gan", n, allow_zero=True)
        for k in self.keeps:
            if k is not None and k < 1:
                raise ValueError(f"sweep.keeps contains {k}; each must be None or >= 1")
        _choice("sweep.search", self.search, SEARCHES)
        _positive("sweep.num_samples", self.num_samples)
        _positive("sweep.max_concurrent", self.max_concurrent, allow_zero=True)
        _positive("sweep.max_failures", self.max_failures, allow_zero=True)


@dataclass(frozen=True)
class ClusterConfig:
    """Where things run and where results go."""

    address: str | None = None  # None = start a local Ray; "auto" or "ray://host:10001" = existing cluster
    storage_path: str = "runs"  # stage cache, Ray results, MLflow artifacts; made absolute on load
    tracking_uri: str | None = None  # None = sqlite:///<storage_path>/mlflow.db
    experiment: str = "mprl"
    num_cpus: int = 0  # local Ray only; 0 = max(3, os.cpu_count())

    def __post_init__(self) -> None:
        if not self.storage_path:
            raise ValueError("cluster.storage_path must not be empty")
        if not self.experiment:
            raise ValueError("cluster.experiment must not be empty")
        _positive("cluster.num_cpus", self.num_cpus, allow_zero=True)


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
        _choice("preset", self.preset, PRESETS)
        if self.sweep.asha and self.reid.eval_every == 0:
            raise ValueError("sweep.asha=true needs reid.eval_every > 0 (ASHA compares trials on rank1)")
        if self.labels.keep is not None and self.dataset.name == "synthetic":
            if self.labels.keep > self.dataset.synthetic_ids:
                raise ValueError(
                    f"labels.keep={self.labels.keep} exceeds the number of training ids "
                    f"(dataset.synthetic_ids={self.dataset.synthetic_ids})")


def _workers(section: str, num_workers: int, batch_size: int) -> None:
    if num_workers < 0:
        raise ValueError(f"{section}.num_workers={num_workers} must be >= 0 (0 = in-process)")
    if num_workers > 1 and batch_size % num_workers:
        raise ValueError(
            f"{section}.batch_size={batch_size} is not divisible by {section}.num_workers={num_workers}")


# --------------------------------------------------------------------------------------------- presets
# Each preset is a set of overrides of the defaults above; the defaults are the paper's values where a
# paper value exists.

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
    # The default demo: a few minutes per trial on a laptop.
    "cpu": {
        "dataset": {"synthetic_ids": 40, "synthetic_images_per_id": 12, "synthetic_distractors": 60,
                    "synthetic_junk": 40},
        # 16-image batches for 20 epochs = ~600 steps: the fewest that draw recognisable figures here
        "gan": {"image_size": [64, 32], "g_width": 32, "d_width": 32, "epochs": 20, "batch_size": 16,
                "num_workers": 0},
        "reid": {"backbone": "resnet18", "embed_dim": 256, "image_size": [128, 64], "epochs": 12,
                 "batch_size": 32, "lr": 0.02, "loader_workers": 1, "eval_every": 4},
        "labels": {"num_gan": 480},
        "sweep": {"methods": ["baseline", "lsro", "smprl", "dmprl1", "dmprl2"], "num_gan": [480]},
    },
    # Market-1501 scale on GPUs, the paper's settings (research/mprl.md §4).
    "paper": {
        "dataset": {"name": "market1501"},
        "gan": {"image_size": [128, 128], "epochs": 30, "use_gpu": True},
        "reid": {"backbone": "resnet50", "embed_dim": None, "dropout": 0.75, "image_size": [256, 128],
                 "epochs": 50, "batch_size": 64, "lr": 0.002, "new_lr_mult": 50.0, "use_gpu": True,
                 "loader_workers": 8, "eval_every": 10, "ap": "market"},
        "labels": {"num_gan": 24000},
        "sweep": {"methods": ["baseline", "lsro", "smprl", "dmprl1", "dmprl2"],
                  "num_gan": [0, 12000, 24000, 36000, 48000], "seeds": [0, 1, 2]},
    },
}


# ------------------------------------------------------------------------------------- construction

def load_config(preset: str = "cpu", *, file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), storage_base: Path | None = None) -> Config:
    """Resolve preset -> YAML file -> ``key.sub=value`` overrides into a validated :class:`Config`.

    ``cluster.storage_path`` is made absolute (relative to ``storage_base`` or the current directory) so that
    Ray workers, which run in other directories, see the same path.
    """
    _choice("--preset", preset, PRESETS)
    tree: dict[str, Any] = {"preset": preset}
    _merge(tree, PRESET_OVERRIDES[preset])
    if file is not None:
        _merge(tree, _read_yaml(Path(file)))
    for item in overrides:
        key, value = parse_override(item)
        _merge(tree, _nest(key, value))
    cfg = from_dict(tree)
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
    return _build(Config, tree, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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


def config_hash(cfg: Any, *sections: str, length: int = 12) -> str:
    """A stable hash of the given dotted sections/fields of ``cfg`` (the whole tree when none are given)."""
    tree = to_dict(cfg)
    picked = {s: _get(tree, s) for s in sections} if sections else tree
    blob = json.dumps(picked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def replace(cfg: Config, **dotted: Any) -> Config:
    """``replace(cfg, **{"labels.method": "lsro"})``: a validated copy with dotted fields changed."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        _merge(tree, _nest(key, value))
    return from_dict(tree)


# ------------------------------------------------------------------------------------------ helpers

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


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"unknown config key {dotted!r}")
        node = node[part]
    return node


def _build(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; valid keys under "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotation (int, float, str, bool, X | None, tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key} must have {len(args)} elements, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {hint!r} for {key}")  # a bug in this module, not user input
