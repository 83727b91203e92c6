"""The typed config sections that the training code reads: dataset, gan, reid, labels.

A leaf (stdlib and :mod:`trainables.methods` only): the training code, the orchestrator and the benchmarks share
one schema, and the driver reads it without importing torch. Every section validates itself in ``__post_init__``:
a wrong type or an impossible value raises ``ValueError`` naming the dotted key and, for choices, the valid
options. :func:`build` turns nested plain data (YAML, a Ray config dict) into a section, :func:`to_dict` back.
The root config, the sweep/cluster sections and the presets are :mod:`orchestrator.config`. At the bottom: what a
re-ID run reads besides its config (:class:`ReidInputs`) and what it returns (:class:`ReidResult`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from trainables.methods import DEFAULT_METHOD, LABEL_METHODS
from trainables.schema import build, config_hash, get_path, to_dict  # noqa: F401 (the public names)

T = TypeVar("T")

DATASETS = ("synthetic", "market1501", "dukemtmc", "cuhk03np")
SYNTHETIC_COUNTS = ("market1501",)  # datasets/synthetic.py COUNTS (exact split sizes)
BACKBONES = ("resnet18", "resnet34", "resnet50", "tiny")  # torchvision.models.<name>; tiny: 4 conv layers (rehearsal)
REID_MODELS = ("ident", "twostream")  # trainables/reid/models.py
# LABEL_METHODS: trainables/methods.py, one row of traits per method
LABEL_ORDERS = ("paper", "reference_code")
BEFORE_SWITCH = ("ignore", "exclude")
SWITCHES = ("paper", "reference_code")  # Algorithm 1's switch | what the authors' scripts do (Method.coded_switch)
OPTIMIZERS = ("sgd", "adam")  # trainables/reid/loop.py make_optimizer
AUGMENTS = ("pad_crop", "paper", "reference_code")  # trainables/reid/augment.py
PRETRAINED = ("imagenet", "random")  # trainables/reid/weights.py (or a path to a local torchvision state dict)
DISTANCES = ("cosine", "euclidean")  # trainables/evaluation/distance.py
AP_MODES = ("standard", "market")  # trainables/evaluation/ranking.py
GAN_ARCHS = ("ours", "lsro")  # trainables/gan/nets.py: our DCGAN | the generator of layumi/Person-reID_GAN@6621e2c
SAMPLE_BN = ("running", "batch")  # trainables/gan/sample.py: BatchNorm statistics the pool is rendered with
# gan fields that change how the pool is rendered from a trained generator, not the generator (not in the GAN's key)
RENDER_FIELDS = ("sample_bn", "save_stretch")
LR_SCHEMES = ("paper", "reference_code")  # trainables/reid/models.py param_groups (docs/protocol.md)
# where a run's unlabelled extra images come from (datasets/pools.py): the DCGAN's renders | real images of
# identities outside the training and test sets, drawn by the synthetic generator (LSRO's own control) | a folder of
# images (another generator's output, real images of unseen people), checked, resized and stored like a pool
POOLS = ("gan", "synthetic_ids", "folder")


PRE_CROP_SCALE = 256 / 224  # the papers' resize before a 224x224 crop


def cache_size(image_size: tuple[int, int], augment: str) -> tuple[int, int]:
    """The size ``augment``'s rows are decoded at (trainables/reid/augment.py): ``image_size`` for pad_crop, else
    ``image_size`` x 256/224 rounded (never a tie: 8h/7 is not k + 1/2), what paper / reference_code crop from."""
    check_choice("reid.augment", augment, AUGMENTS)
    if augment == "pad_crop":
        return tuple(image_size)
    return round(image_size[0] * PRE_CROP_SCALE), round(image_size[1] * PRE_CROP_SCALE)


def check_choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, options))}")


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_fraction(key: str, value: float, *, closed_right: bool = True) -> None:
    if not (0.0 <= value <= 1.0) or (not closed_right and value == 1.0):
        raise ValueError(f"{key}={value!r} must be in [0, 1{']' if closed_right else ')'}")


def check_image_size(key: str, value: tuple[int, int]) -> None:
    if len(value) != 2 or min(value) < 8:
        raise ValueError(f"{key}={value!r} must be [height, width] with both >= 8")


@dataclass(frozen=True)
class DatasetConfig:
    """Which re-ID dataset; the synthetic one is generated on first use under the storage path."""

    name: str = "synthetic"
    root: str | None = None  # required for real datasets; for synthetic, None = <storage>/datasets/synthetic-<hash>
    synthetic_ids: int = 24  # training identities (and test identities unless synthetic_test_ids is set)
    synthetic_test_ids: int | None = None  # test identities (queries: one per camera an identity appears in)
    synthetic_images_per_id: int = 10  # mean images per identity
    synthetic_distractors: int = 40  # pid 0 gallery images
    synthetic_junk: int = 30  # pid -1 gallery images
    synthetic_size: tuple[int, int] = (128, 64)
    synthetic_seed: int = 0
    # market1501: exactly Market-1501's counts (751/12,936 train; 750 ids, 3,368 query, 15,913 gallery); the
    # synthetic_ids/images_per_id/distractors/junk fields are then ignored
    synthetic_counts: str | None = None
    # Market-format folders (a path or a list) the final model is also tested on (cross-domain): metrics xd_<name>_*
    test_root: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        check_choice("dataset.name", self.name, DATASETS)
        object.__setattr__(self, "test_root", check_test_roots(self.test_root))
        if self.synthetic_counts is not None:
            check_choice("dataset.synthetic_counts", self.synthetic_counts, SYNTHETIC_COUNTS)
        if self.name != "synthetic" and not self.root:
            raise ValueError(f"dataset.root is required for dataset.name={self.name!r} (a local folder path)")
        if not 2 <= self.synthetic_ids <= 5000:
            raise ValueError(f"dataset.synthetic_ids={self.synthetic_ids} must be in [2, 5000]")
        if self.synthetic_test_ids is not None and not 2 <= self.synthetic_test_ids <= 5000:
            raise ValueError(f"dataset.synthetic_test_ids={self.synthetic_test_ids} must be in [2, 5000]")
        if self.synthetic_images_per_id < 2:
            raise ValueError(f"dataset.synthetic_images_per_id={self.synthetic_images_per_id} must be >= 2")
        check_positive("dataset.synthetic_distractors", self.synthetic_distractors, allow_zero=True)
        check_positive("dataset.synthetic_junk", self.synthetic_junk, allow_zero=True)
        check_image_size("dataset.synthetic_size", self.synthetic_size)


def check_test_roots(roots: tuple[str, ...] | str) -> tuple[str, ...]:
    """``dataset.test_root`` as a tuple of absolute paths (Ray workers run elsewhere) with distinct test-set names."""
    roots = tuple(r and os.path.abspath(os.path.expanduser(r)) for r in ([roots] if isinstance(roots, str) else roots))
    named: dict[str, str] = {}
    for root in roots:
        name = cross_domain_name(root)
        if name in named:
            raise ValueError(f"dataset.test_root: {named[name]} and {root} have the same test-set name {name!r} "
                             f"(the folder's name, lowercased, letters and digits only); rename one folder")
        named[name] = root
    return roots


def cross_domain_name(root: str) -> str:
    """The name of a cross-domain test set in its metrics' names: its folder's name, lowercased, letters and digits
    only (``/data/DukeMTMC-reID`` -> ``dukemtmcreid``)."""
    name = re.sub(r"[^a-z0-9]", "", os.path.basename(os.path.normpath(root)).lower())
    if not name:
        raise ValueError(f"dataset.test_root={root!r}: the folder's name has no letter or digit to name its metrics")
    return name


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
    max_steps: int | None = None  # cap on steps per epoch (the scale rehearsal); None = every batch
    arch: str = "ours"  # ours | lsro: the 6621e2c generator (docs/protocol.md, "DCGAN")
    g_steps: int = 1  # G updates per D update (the reference: 2, "Run g_optim twice")
    # how the pool is rendered: running = BatchNorm running statistics (an image independent of its batch) |
    # batch = batch statistics over fixed batches of gan.batch_size (the 6621e2c sampler), running ones untouched
    sample_bn: str = "running"
    save_stretch: bool = False  # each stored image byte-scaled to its own min..max (the reference's scipy save)
    seed: int = 0

    def __post_init__(self) -> None:
        check_image_size("gan.image_size", self.image_size)
        check_choice("gan.arch", self.arch, GAN_ARCHS)
        check_choice("gan.sample_bn", self.sample_bn, SAMPLE_BN)
        check_positive("gan.g_steps", self.g_steps)
        if not isinstance(self.save_stretch, bool):
            raise ValueError(f"gan.save_stretch={self.save_stretch!r} must be true or false")
        if self.max_steps is not None:
            check_positive("gan.max_steps", self.max_steps)
        for key in ("latent_dim", "g_width", "d_width", "epochs", "batch_size"):
            check_positive(f"gan.{key}", getattr(self, key))
        check_positive("gan.lr", self.lr)
        check_fraction("gan.beta1", self.beta1, closed_right=False)
        check_fraction("gan.beta2", self.beta2, closed_right=False)
        check_workers("gan", self.num_workers, self.batch_size)


@dataclass(frozen=True)
class ReidConfig:
    """Re-ID network and its training (docs/protocol.md, "Identification net" and "Two-stream net")."""

    model: str = "ident"  # ident | twostream
    backbone: str = "resnet50"
    # imagenet: torchvision's ImageNet weights (its cache; downloaded once where online) | random: from scratch |
    # a path to a local torchvision state dict | None: not chosen (random init, allowed on synthetic data only)
    pretrained: str | None = None
    embed_dim: int | None = 512  # bottleneck size; None = plain pool5 feature (the paper)
    dropout: float = 0.5
    last_stride: int = 2
    image_size: tuple[int, int] = (256, 128)  # the network's input [H, W]
    augment: str = "pad_crop"  # pad_crop (re-ID practice) | paper (TIP) | reference_code: trainables/reid/augment.py
    epochs: int = 50
    batch_size: int = 64  # global; split across workers
    lr: float = 0.01  # backbone rate; new layers get lr * new_lr_mult
    new_lr_mult: float = 10.0
    # paper: the backbone at lr, the new layers at lr x new_lr_mult (the TIP text) | reference_code: the authors'
    # MatConvNet multipliers per parameter class, BN without decay and BN moments at rate 0.001, the FC's scaled
    # init; lr is then the conv filters' rate (docs/protocol.md "Learning rates"; trainables/reid/models.py)
    lr_scheme: str = "paper"
    lr_step: float = 0.8  # lr x lr_gamma after this fraction of training (epoch 40 of 50)
    lr_step_epoch: int | None = None  # the same as an absolute epoch (the paper's "epoch 40"); overrides lr_step
    lr_gamma: float = 0.1
    # linear warm-up (fast-reid style), per optimizer step: lr rises from warmup_factor x lr at the first step to
    # lr after warmup_epochs epochs (0 = none: the paper); the step decay applies on top
    warmup_epochs: int = 0
    warmup_factor: float = 0.1
    # sgd: (Nesterov) momentum, the paper | adam: AMSGrad Adam with L2 weight decay (torchreid's softmax baseline)
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # None = the label method's (trainables/methods.py)
    gen_fraction: float | None = None  # share of generated images per batch; None = proportional to counts
    pos_fraction: float | None = None  # two-stream positive pairs; None = the reference's 1/2 -> 1/5 schedule
    num_workers: int = 1  # Ray Train workers (0 = in-process)
    use_gpu: bool = False
    loader_workers: int = 2  # DataLoader processes per Ray Train worker
    # read the images from the decoded uint8 cache (false: decode each file on every read, in the loader workers);
    # either way they are augmented on the training device
    decoded_cache: bool = True
    # a node-local folder (local disk, /dev/shm) the decoded cache's files are copied to, once per node, and read from
    # (datasets/local_copy.py): "" = $MPRL_LOCAL_CACHE of the reading node (unset: no copy) | none = no copy
    local_cache_dir: str = ""
    max_steps: int | None = None  # cap on optimizer steps per epoch (the scale rehearsal); None = every batch
    amp: bool = True  # bf16 autocast (GPU only)
    channels_last: bool = True  # GPU only
    # identities held out of training as a validation split (query/gallery as in the test protocol): what periodic
    # evaluation, ASHA and any "best" choice read; the test split is evaluated once, for the final model
    val_ids: int = 0
    eval_every: int = 0  # evaluate the validation split every N epochs (needs val_ids > 0; 0 = never)
    checkpoint_every: int = 5  # a checkpoint (what a retry or resume starts from) every N epochs and the last
    distance: str = "cosine"
    # final test (and cross-domain) metrics also k-reciprocally re-ranked (k1=20, k2=6, lambda=0.3), as rr_*
    rerank: bool = False
    flip_test: bool = True
    # also evaluate the final model with every BatchNorm layer's statistics re-estimated on the real training images
    # (trainables/reid/bn_recalibrate.py): the report shows both evaluations
    bn_recalibrate: bool = False
    ap: str = "standard"  # standard (torchreid) | market (the devkit; the paper's numbers)
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("reid.model", self.model, REID_MODELS)
        check_choice("reid.backbone", self.backbone, BACKBONES)
        check_choice("reid.distance", self.distance, DISTANCES)
        check_choice("reid.ap", self.ap, AP_MODES)
        check_choice("reid.augment", self.augment, AUGMENTS)
        check_choice("reid.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("reid.lr_scheme", self.lr_scheme, LR_SCHEMES)
        if self.pretrained is not None and self.pretrained not in PRETRAINED and not self.pretrained.strip():
            raise ValueError("reid.pretrained must be imagenet, random, a file path, or null")
        if self.backbone == "tiny" and self.pretrained == "imagenet":
            raise ValueError("reid.backbone=tiny has no ImageNet weights; use reid.pretrained=random")
        if self.lr_step_epoch is not None and not 1 <= self.lr_step_epoch <= self.epochs:
            raise ValueError(f"reid.lr_step_epoch={self.lr_step_epoch} must be in 1..reid.epochs ({self.epochs})")
        check_choice("reid.last_stride", self.last_stride, (1, 2))
        if self.embed_dim is not None:
            check_positive("reid.embed_dim", self.embed_dim)
        check_fraction("reid.dropout", self.dropout, closed_right=False)
        check_image_size("reid.image_size", self.image_size)
        for key in ("epochs", "batch_size", "lr", "new_lr_mult", "lr_gamma"):
            check_positive(f"reid.{key}", getattr(self, key))
        check_fraction("reid.lr_step", self.lr_step)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"reid.warmup_epochs={self.warmup_epochs} must be in 0..reid.epochs-1 ({self.epochs - 1})")
        check_fraction("reid.warmup_factor", self.warmup_factor)
        check_fraction("reid.momentum", self.momentum, closed_right=False)
        if self.weight_decay is not None:
            check_positive("reid.weight_decay", self.weight_decay, allow_zero=True)
        if self.gen_fraction is not None:
            check_fraction("reid.gen_fraction", self.gen_fraction, closed_right=False)
        if self.pos_fraction is not None and not 0 < self.pos_fraction < 1:
            raise ValueError(f"reid.pos_fraction={self.pos_fraction} must be in (0, 1)")
        check_positive("reid.loader_workers", self.loader_workers, allow_zero=True)
        for key in ("decoded_cache", "rerank", "bn_recalibrate"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"reid.{key}={getattr(self, key)!r} must be true or false")
        if not isinstance(self.local_cache_dir, str):
            raise ValueError(f"reid.local_cache_dir={self.local_cache_dir!r} must be a folder, \"\" or none")
        if self.max_steps is not None:
            check_positive("reid.max_steps", self.max_steps)
        check_positive("reid.eval_every", self.eval_every, allow_zero=True)
        check_positive("reid.checkpoint_every", self.checkpoint_every)
        check_positive("reid.val_ids", self.val_ids, allow_zero=True)
        if self.eval_every and not self.val_ids:
            raise ValueError(f"reid.eval_every={self.eval_every} evaluates a validation split: set reid.val_ids > 0 "
                             f"(training identities held out); the test split is evaluated once, at the end")
        check_workers("reid", self.num_workers, self.batch_size)


@dataclass(frozen=True)
class LabelsConfig:
    """Virtual labels for generated images (docs/labels.md; trainables/reid/labels.py)."""

    method: str = DEFAULT_METHOD
    num_gan: int = 0  # generated images used by this run (the first num_gan of the store)
    order: str = "paper"  # paper | reference_code (the published MATLAB's indexing)
    keep: int | None = None  # MpRL truncation: only the `keep` most likely classes carry weight
    gen_weight: float | None = None  # lambda; None = the method's default (trainables/methods.py)
    switch_epoch: float = 0.4  # fraction of training after which switched methods turn on (epoch 20 of 50)
    switch_at: int | None = None  # the same as an absolute epoch (the paper's "epoch 20"); overrides switch_epoch
    before_switch: str = "ignore"  # ignore: sampled, zero loss (Algorithm 1) | exclude: not sampled
    # paper: Algorithm 1 | reference_code: as the authors' scripts run (dMpRL-II's loss from epoch 1 with the real
    # images' cross-entropy counted twice; the one-hot pseudo loss never on): trainables/methods.py coded_switch
    switch: str = "paper"
    real_smoothing: float = 0.0
    pool: str = "gan"  # where the generated images come from: POOLS (swept with sweep.pools)
    pool_root: str | None = None  # the folder of labels.pool=folder (images in any subfolders)

    def __post_init__(self) -> None:
        check_choice("labels.method", self.method, LABEL_METHODS)
        check_choice("labels.pool", self.pool, POOLS)
        if self.pool == "folder" and not self.pool_root:
            raise ValueError("labels.pool=folder needs labels.pool_root=PATH (a folder of images)")
        check_choice("labels.order", self.order, LABEL_ORDERS)
        check_choice("labels.before_switch", self.before_switch, BEFORE_SWITCH)
        check_choice("labels.switch", self.switch, SWITCHES)
        check_positive("labels.num_gan", self.num_gan, allow_zero=True)
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"labels.keep={self.keep} must be None or in 1..K (number of training ids)")
        if self.gen_weight is not None:
            check_positive("labels.gen_weight", self.gen_weight, allow_zero=True)
        check_fraction("labels.switch_epoch", self.switch_epoch)
        if self.switch_at is not None:
            check_positive("labels.switch_at", self.switch_at, allow_zero=True)
        check_fraction("labels.real_smoothing", self.real_smoothing, closed_right=False)


def check_workers(section: str, num_workers: int, batch_size: int) -> None:
    if num_workers < 0:
        raise ValueError(f"{section}.num_workers={num_workers} must be >= 0 (0 = in-process)")
    if num_workers > 1 and batch_size % num_workers:
        raise ValueError(
            f"{section}.batch_size={batch_size} is not divisible by {section}.num_workers={num_workers}")


# ------------------------------------------------------------------------------------- run hand-offs

METRICS = ("rank1", "rank5", "rank10", "mAP")  # fractions in [0, 1]; the names Tune, MLflow and the report share
FINAL_METRICS = (*METRICS, "mINP")  # what each final test evaluation reports
FINAL = "final_"  # the final test metrics are logged as final_<prefix><metric> (metric_names); the prefixes:
BN_RECALIBRATED = "bnr_"  # the evaluation with BatchNorm re-estimated (reid.bn_recalibrate)
RERANKED = "rr_"  # the same distances k-reciprocally re-ranked (reid.rerank)
CROSS_DOMAIN = "xd_"  # xd_<name>_: a cross-domain test set (dataset.test_root, cross_domain_name); xd_<name>_rr_
RANKED_LIST = "ranked_list.png"  # written by the final test evaluation into the run's folder, logged with the run:
PER_QUERY_AP = "per_query_ap.npy"  # float32 [Q] AP of every test query (NaN: no valid match); the picture: top-10s


def metric_prefix(test_set: str | None = None, *, reranked: bool = False) -> str:
    """The prefix of a final evaluation's metrics: "" (as trained), ``rr_``, ``xd_<name>_``, ``xd_<name>_rr_``."""
    return (f"{CROSS_DOMAIN}{test_set}_" if test_set else "") + (RERANKED if reranked else "")


def metric_names(prefix: str = "") -> tuple[str, ...]:
    """``final_<prefix>rank1`` ... ``final_<prefix>mINP``: the MLflow names of one evaluation's metrics."""
    return tuple(f"{FINAL}{prefix}{m}" for m in FINAL_METRICS)


@dataclass(frozen=True)
class ReidInputs:
    """What a re-ID run reads besides its config: the dataset, the generated store and the static labels' name."""

    data_root: str
    store_root: str | None = None
    smprl_labels: str | None = None  # name of the label file in the store (static-rank methods only)
    # the decoded-image cache folder (the decode stages' output); None: ``decoded`` beside the run's folder,
    # filled in-process on first use
    cache_dir: str | None = None
    test_roots: tuple[str, ...] = ()  # dataset.test_root: cross-domain test sets the final model is evaluated on


@dataclass(frozen=True)
class ReidResult:
    """What a finished re-ID run returns (and the baseline stage records): its final model's test metrics."""

    rank1: float  # fractions in [0, 1]
    rank5: float
    rank10: float
    mAP: float
    mINP: float
    cmc: tuple[float, ...]  # [max_rank]
    skipped_queries: int
    epoch: int  # the last epoch trained (0-based)
    num_classes: int  # K, training identities
    num_gan: int  # extra images trained on (generated, or real repeats for the compute-matched control)
    num_train: int  # real training images
    # the same test metrics with BatchNorm re-estimated on the real training images (reid.bn_recalibrate), or None
    recalibrated: dict[str, float] | None = None
    reranked: dict[str, float] | None = None  # the test metrics of the re-ranked distances (reid.rerank), or None
    cross_domain: dict[str, dict[str, float]] | None = None  # dataset.test_root: name -> its metrics (and rr_*)

    def metrics(self) -> dict[str, float]:
        """The final test metrics by their shared names (METRICS, then mINP), then those of the other evaluations
        under their prefixes (:func:`metric_prefix`): ``bnr_``, ``rr_``, ``xd_<name>_`` (and ``xd_<name>_rr_``)."""
        out = {**{k: getattr(self, k) for k in METRICS}, "mINP": self.mINP}
        out.update({f"{BN_RECALIBRATED}{k}": v for k, v in (self.recalibrated or {}).items()})
        out.update({f"{metric_prefix(reranked=True)}{k}": v for k, v in (self.reranked or {}).items()})
        for name, found in (self.cross_domain or {}).items():
            out.update({f"{metric_prefix(name)}{k}": v for k, v in found.items()})
        return out
