"""The label methods, one row each: everything the code needs to know about a method besides its target rule.

A leaf module (stdlib only), read by the training code, the orchestrator (planning, folding, the report) and the
benchmarks alike, so that no other module compares method names. Adding a method is one row here, plus a target
rule in :mod:`trainables.reid.labels` when none of the existing ones fits (``docs/labels.md``, "Adding a method").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How a generated image's target q is made (trainables/reid/labels.py ``TARGET_RULES``):
TARGET_RULES = (
    "extra_class",  # all mass on a (K+1)-th class (All-in-one)
    "argmax",  # one-hot on the most likely real class (one-hot pseudo label)
    "uniform",  # 1/K on every real class (LSRO)
    "static_ranks",  # MpRL weights from ranks the real-data baseline predicted once (sMpRL stage)
    "dynamic_ranks",  # MpRL weights from the ranks of the image's own current logits (dMpRL)
    "no_loss",  # in the batches, never in the loss (the unlabelled control: presence and BN statistics only)
)
RANK_RULES = ("static_ranks", "dynamic_ranks")
CODED_SWITCHES = ("from_start", "never")


@dataclass(frozen=True)
class Method:
    """The traits of one label method (TIP 2019 Sec. III; the reference code's per-method scripts)."""

    # the target rule of its generated images; None: the method draws no generated images
    targets: str | None
    # its generated images carry loss only from labels.switch_epoch on (Algorithm 1: pseudo, dMpRL-II)
    switched: bool = False
    # what the authors' script of a switched method does instead (labels.switch=reference_code; docs/protocol.md):
    # "from_start": its loss layer ignores the 0 weight before the switch, so the generated images' loss is on from
    # epoch 1 and the real images' cross-entropy is counted twice (Pseudo_Loss_Multi_Dynamic_2 beside the softmax
    # loss) | "never": the switch is written on a copy of opts and never applied, the generated loss stays off
    coded_switch: str | None = None
    gen_weight: float = 1.0  # default lambda, the weight of a generated image's loss
    weight_decay: float = 1e-4  # the reference code's default for this method (reid.weight_decay=None)
    # the labels.num_gan extra batch slots hold repeated REAL images (the compute-matched control)
    real_repeats: bool = False
    control: bool = False  # a reference: the report takes every method's paired difference against it

    def __post_init__(self) -> None:
        if self.targets is not None and self.targets not in TARGET_RULES:
            raise ValueError(f"Method.targets={self.targets!r}: choose one of {TARGET_RULES} or None")
        if self.coded_switch not in (None, *CODED_SWITCHES) or (self.coded_switch is not None) != self.switched:
            raise ValueError(f"Method.coded_switch={self.coded_switch!r}: one of {CODED_SWITCHES} for a switched "
                             f"method, None otherwise")
        if self.targets is not None and self.real_repeats:
            raise ValueError("a Method fills its extra batch slots with generated images (targets) or with real "
                             "repeats (real_repeats), not both")

    @property
    def generated(self) -> bool:
        """Trains on generated images (needs the GAN, the generation stage and a store)."""
        return self.targets is not None

    @property
    def extra_images(self) -> bool:
        """Its runs add labels.num_gan images to the real ones (generated, or real repeats)."""
        return self.generated or self.real_repeats

    @property
    def labelled(self) -> bool:
        """Its generated images carry a loss (at some epoch): every generated method but the unlabelled control."""
        return self.generated and self.targets != "no_loss"

    @property
    def ranked(self) -> bool:
        """labels.order and labels.keep matter (MpRL weights come from class ranks)."""
        return self.targets in RANK_RULES

    @property
    def static_ranks(self) -> bool:
        """Needs the sMpRL stage: ranks predicted once by the real-data baseline."""
        return self.targets == "static_ranks"

    @property
    def extra_class(self) -> bool:
        """The classifier has K + 1 outputs (the extra one dropped at test time)."""
        return self.targets == "extra_class"


BASELINE = "baseline"  # real images only: every sweep trains it per seed as a stage, and folds to it
METHODS: dict[str, Method] = {
    BASELINE: Method(None, gen_weight=0.0, control=True),
    "allinone": Method("extra_class"),
    # LSRO paper Sec. 4.2; its script: layumi/Person-reID_GAN@da4b90a train_id_net_res_market_pseudo.m:40-42
    "pseudo": Method("argmax", switched=True, gen_weight=0.1, weight_decay=5e-4, coded_switch="never"),
    "lsro": Method("uniform"),
    "smprl": Method("static_ranks"),
    "dmprl1": Method("dynamic_ranks", weight_decay=5e-4),
    # its script: Huang-3/MpRL-for-person-re-ID@53c8808 code/train/train_res_iden_MpRL3.m:33, 47-49
    "dmprl2": Method("dynamic_ranks", switched=True, gen_weight=0.1, weight_decay=5e-4, coded_switch="from_start"),
    # as many optimizer steps as a run with labels.num_gan generated images, from real images only: separates
    # "more training" from "the labels"
    "baseline_matched": Method(None, gen_weight=0.0, real_repeats=True, control=True),
    # the generated images in every batch as any GAN method has them, with no loss on them at any epoch (whatever
    # labels.gen_weight says): what their presence alone does (the BatchNorm statistics they enter, the steps they
    # add); a label method minus this control is what its labels do (fidelity review wave 3, Q4 E2)
    "unlabelled": Method("no_loss", gen_weight=0.0, control=True),
}
LABEL_METHODS = tuple(METHODS)
# the paper's claims between methods, as paired contrasts "a vs b" at one #GAN (the report's; TIP 2019 Table IV's
# point, dMpRL-II over LSRO, first)
PAPER_CONTRASTS = (("dmprl2", "lsro"), ("dmprl2", "dmprl1"), ("dmprl1", "smprl"), ("smprl", "lsro"))
# the two-stream net's weight decay for every method: the authors' two-stream scripts use 1e-4, dMpRL-II included
# (Huang-3/MpRL-for-person-re-ID@0f663eb code/train/train_2stream_MpRL3.m:34, train_2stream_baseline.m)
TWO_STREAM_WEIGHT_DECAY = 1e-4
DEFAULT_METHOD = "lsro"  # labels.method unless a preset or the command line says otherwise
PAPER_SWITCH_FRACTION = 0.4  # paper: active after epoch 20 of 50 (Algorithm 1; code `epoch > 20`, 1-based)


def switch_epoch_for(epochs: int, fraction: float = PAPER_SWITCH_FRACTION) -> int:
    """Absolute 0-based switch epoch for a run of `epochs` epochs: round(fraction * epochs), half up. The one
    formula: the training loop (``trainables.reid``) and the driver's check (``orchestrator.config_checks``) read it.

    The paper switches on after epoch 20 of 50 (active in 1-based epochs 21..50 = 0-based 20..49): 0.4 * 50 = 20.
    """
    if epochs < 0 or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"labels.switch_epoch fraction must be in [0, 1] and epochs >= 0, got {fraction}, {epochs}")
    return int(math.floor(fraction * epochs + 0.5))


def method(name: str) -> Method:
    """The traits of ``name``; ValueError naming ``labels.method`` and the valid ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"labels.method={name!r} is not valid; choose one of "
                         f"{', '.join(map(repr, LABEL_METHODS))}") from None
