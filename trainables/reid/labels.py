"""Virtual labels for GAN-generated images: baseline, All-in-one, one-hot pseudo, LSRO, sMpRL, dMpRL-I/II.

Pure torch (no Ray). Semantics follow Huang et al., "Multi-pseudo Regularized Label for Generated Data in
Person Re-Identification", IEEE TIP 28(3), 2019 (TIP Eqs. 1, 6-11, Algorithm 1) and, where selected with
``order="reference_code"``, the authors' MatConvNet code (``update_multi_pseudo.m``,
``prepare_sMpRL_label4data.m``). See ``docs/labels.md``. What a method is (its target rule, whether it is
switched, its default lambda) is its row in :mod:`trainables.methods`; this module knows target rules, not methods.

Every method produces a target distribution q_i over the classifier outputs and a per-image weight w_i, and the
training loop applies one loss to every image (TIP Eq. 11): ``soft_cross_entropy(logits, q, w)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.config import BEFORE_SWITCH, SWITCHES  # the choice lists
from trainables.config import LABEL_ORDERS as ORDERS
from trainables.methods import PAPER_SWITCH_FRACTION, Method, method, switch_epoch_for  # noqa: F401 (re-exported)
from trainables.modes import eval_mode

# --------------------------------------------------------------------------------------------------------------
# MpRL core: ranks -> weights -> targets
# --------------------------------------------------------------------------------------------------------------


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"labels.order must be one of {ORDERS}, got {order!r}")


def _check_keep(keep: int | None, k: int) -> int:
    """Return v (number of kept classes); None means all K."""
    if keep is None:
        return k
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= k:
        raise ValueError(f"labels.keep must be None or an integer in 1..{k} (K={k}), got {keep!r}")
    return keep


def ranks_from_probs(probs: Tensor) -> Tensor:
    """Ascending rank alpha_k in 1..K of each class (TIP Eqs. 6-8): least likely class 1, most likely K.

    Ties are broken by class index (lower index ranks lower), i.e. the order of a stable ascending sort.
    Only the order matters, so logits may be passed instead of probabilities (softmax is strictly monotone).
    probs: [N, K] -> LongTensor [N, K].
    """
    if probs.dim() != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must have shape [N, K] with K >= 1, got {tuple(probs.shape)}")
    n, k = probs.shape
    order = torch.argsort(probs.detach(), dim=1, stable=True)  # [N, K]: order[i, j] = class of rank j+1
    ascending = torch.arange(1, k + 1, device=probs.device).expand(n, k)
    return torch.empty((n, k), dtype=torch.long, device=probs.device).scatter_(1, order, ascending)


def _check_ranks(ranks: Tensor) -> Tensor:
    """``ranks`` as int64, or ValueError unless every row of [N, K] is a permutation of 1..K."""
    if ranks.dim() != 2 or ranks.shape[1] < 1:
        raise ValueError(f"ranks must have shape [N, K], got {tuple(ranks.shape)}")
    ranks = ranks.long()
    k = ranks.shape[1]
    expected = torch.arange(1, k + 1, device=ranks.device)
    if ranks.numel() and not torch.equal(ranks.sort(dim=1).values, expected.expand_as(ranks)):
        raise ValueError(f"ranks must hold a permutation of 1..{k} in every row")
    return ranks


def weights_from_ranks(
    ranks: Tensor, *, keep: int | None = None, order: str = "paper", dtype: torch.dtype = torch.float32,
    check: bool = True,
) -> Tensor:
    """Multi-pseudo label (TIP Eqs. 9-10) rebuilt from stored ascending ranks [N, K] (any integer dtype).

    order="paper":          w_k = alpha_k / K                   (class of ascending rank r gets r/K)
    order="reference_code": w_k = idx(k) / K, idx = argsort(p)  (MATLAB `[~,idx]=sort(p); w=label(idx)`,
                            a gather where a scatter was meant: idx is the inverse permutation of the ranks)
    keep=v: weights <= (K-v)/K are set to 0, i.e. only the v largest weights survive (code's `sparse_rate`,
    `prepare_sMpRL_label4data.m`); for "paper" these are the v most likely classes.
    Returns [N, K] in `dtype`. ``check=False`` skips the permutation check (a sort and a wait for the device):
    for ranks that are permutations by construction (`ranks_from_probs`, stored ranks checked when read).
    """
    _check_order(order)
    ranks = _check_ranks(ranks) if check else ranks.long()
    n, k = ranks.shape
    v = _check_keep(keep, k)
    if order == "paper":
        value = ranks  # [N, K], a permutation of 1..K per row
    else:
        inverse = torch.empty_like(ranks).scatter_(1, ranks - 1, torch.arange(k, device=ranks.device).expand(n, k))
        value = inverse + 1  # [N, K]: 1-based index of the class whose rank is k
    weights = value.to(dtype) / k
    return torch.where(value > k - v, weights, torch.zeros_like(weights))


def mprl_weights(probs: Tensor, *, keep: int | None = None, order: str = "paper") -> Tensor:
    """Multi-pseudo label from class probabilities [N, K]: weight r/K for the class of ascending rank r.

    See `weights_from_ranks` for `keep` and `order` (TIP Eqs. 6-10; `update_multi_pseudo.m`). No gradient.
    Returns float64 [N, K] for float64 probs, else float32 (r/K is not exact in half precision).
    """
    _check_order(order)
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    return weights_from_ranks(ranks_from_probs(probs), keep=keep, order=order, dtype=dtype)


def mprl_normaliser(k: int, keep: int | None = None) -> float:
    """sigma_v = 2K / ((2K - v + 1) v): makes the kept weights sum to 1 (v = K gives TIP's sigma = 2/(K+1))."""
    v = _check_keep(keep, k)
    return 2.0 * k / ((2 * k - v + 1) * v)


def _targets_from_ranks(ranks: Tensor, *, keep: int | None, order: str, check: bool = True) -> Tensor:
    k = ranks.shape[1]
    return weights_from_ranks(ranks, keep=keep, order=order, check=check) * mprl_normaliser(k, keep)


def mprl_targets(probs: Tensor, *, keep: int | None = None, order: str = "paper") -> Tensor:
    """MpRL target q_k = sigma_v * w_k (TIP Eq. 11 with sigma = 2/(K+1); code's sparse normaliser for keep=v).

    Rows sum to 1. probs: [N, K] -> float32 [N, K].
    """
    _check_order(order)
    return _targets_from_ranks(ranks_from_probs(probs), keep=keep, order=order)


def lsro_targets(
    n: int, k: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """LSRO target q_k = 1/K (TIP Eq. 1; Zheng et al. ICCV 2017 Eq. 6). Returns [n, k]."""
    if k < 1 or n < 0:
        raise ValueError(f"lsro_targets needs n >= 0 and k >= 1, got n={n}, k={k}")
    return torch.full((n, k), 1.0 / k, device=device, dtype=dtype)


def soft_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Batch loss (TIP Eq. 11): L = (1/N) sum_i w_i * sum_k -q_ik log softmax(x_i)_k.

    Computed in float32 with autocast disabled (stable for |logits| ~ 1e4 and under bf16 autocast). Targets are
    constants: dL/dx_i = w_i (softmax(x_i) - q_i) / N. logits, targets: [N, C]; weights: [N] or None (all 1).
    """
    if logits.dim() != 2 or targets.shape != logits.shape:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"logits and targets must both be [N, C], got {shapes}")
    n = logits.shape[0]
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must have shape [N]=({n},), got {tuple(weights.shape)}")
    if n == 0:
        return logits.float().sum() * 0.0
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = F.log_softmax(logits.float(), dim=1)  # [N, C]
        q = targets.detach().float()
        per_image = -torch.where(q > 0, q * log_p, torch.zeros_like(log_p)).sum(dim=1)  # [N]
        if weights is not None:
            per_image = per_image * weights.detach().float()
        return per_image.mean()


# --------------------------------------------------------------------------------------------------------------
# One entry point for the training loop
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSpec:
    """How generated images are labelled and weighted. Validated on construction."""

    method: str
    num_classes: int  # K, number of real training identities
    order: str = "paper"  # MpRL rank order: "paper" | "reference_code"
    keep: int | None = None  # MpRL: keep the v largest weights (None = all K)
    gen_weight: float | None = None  # lambda; None -> the method's (trainables/methods.py)
    switch_epoch: int = 0  # absolute 0-based epoch from which pseudo/dmprl2 are active
    before_switch: str = "ignore"  # "ignore": sampled with weight 0 | "exclude": not sampled
    real_smoothing: float = 0.0  # label smoothing epsilon for real images
    switch: str = "paper"  # "paper": Algorithm 1 | "reference_code": the method's coded_switch (its script)

    def __post_init__(self) -> None:
        method(self.method)  # ValueError naming the valid methods
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"labels.num_classes must be an integer >= 2, got {self.num_classes!r}")
        _check_order(self.order)
        _check_keep(self.keep, self.num_classes)
        if self.gen_weight is not None and not (math.isfinite(self.gen_weight) and self.gen_weight >= 0):
            raise ValueError(f"labels.gen_weight must be None or a finite number >= 0, got {self.gen_weight!r}")
        if isinstance(self.switch_epoch, bool) or not isinstance(self.switch_epoch, int) or self.switch_epoch < 0:
            raise ValueError(f"labels.switch_epoch must be an integer >= 0, got {self.switch_epoch!r}")
        if self.before_switch not in BEFORE_SWITCH:
            raise ValueError(f"labels.before_switch must be one of {BEFORE_SWITCH}, got {self.before_switch!r}")
        if not 0.0 <= self.real_smoothing < 1.0:
            raise ValueError(f"labels.real_smoothing must be in [0, 1), got {self.real_smoothing!r}")
        if self.switch not in SWITCHES:
            raise ValueError(f"labels.switch must be one of {SWITCHES}, got {self.switch!r}")

    @property
    def traits(self) -> Method:
        return method(self.method)

    @property
    def coded_switch(self) -> str | None:
        """The method's coded switch when ``switch=reference_code`` (else None: Algorithm 1)."""
        return self.traits.coded_switch if self.switch == "reference_code" else None

    @property
    def real_weight(self) -> float:
        """The weight of a real image's loss: 2 where the script counts its cross-entropy twice."""
        return 2.0 if self.coded_switch == "from_start" else 1.0

    @property
    def effective_gen_weight(self) -> float:
        """lambda actually applied to generated images when active (the method's default unless set)."""
        return self.traits.gen_weight if self.gen_weight is None else float(self.gen_weight)


def num_outputs(spec: LabelSpec) -> int:
    """Classifier width C: K + 1 with an extra class (All-in-one; dropped at test time), else K."""
    return spec.num_classes + 1 if spec.traits.extra_class else spec.num_classes


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0 (0-based), got {epoch!r}")


def is_active(spec: LabelSpec, epoch: int) -> bool:
    """Whether generated images carry loss in 0-based `epoch` (Algorithm 1: switched methods from the switch)."""
    _check_epoch(epoch)
    traits = spec.traits
    if not traits.labelled:  # baseline_matched's extra slots hold real images; unlabelled's carry no loss
        return False
    if spec.coded_switch is not None:
        return spec.coded_switch == "from_start"
    return epoch >= spec.switch_epoch if traits.switched else True


def samples_generated(spec: LabelSpec, epoch: int) -> bool:
    """Whether the data sampler should draw generated images in `epoch` (for the sampler, not the loss)."""
    _check_epoch(epoch)
    traits = spec.traits
    if not traits.extra_images:
        return False
    if traits.switched and spec.before_switch == "exclude" and spec.coded_switch is None:
        return epoch >= spec.switch_epoch
    return True


def _check_labels(labels: Tensor, k: int) -> None:
    """Labels of real images in 0..K-1: a ValueError on the CPU; on an accelerator a device-side assertion, which
    fails the run at the next wait for the device but does not make every step wait for it."""
    if not labels.numel():
        return
    if labels.device.type == "cpu":
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            lo, hi = int(labels.min()), int(labels.max())
            raise ValueError(f"labels of real images must be in 0..{k - 1}, got min {lo}, max {hi}")
        return
    torch._assert_async(((labels >= 0) & (labels < k)).all(), f"labels of real images must be in 0..{k - 1}")


def _real_targets(spec: LabelSpec, labels: Tensor, c: int) -> Tensor:
    """(1 - eps) * onehot(y) + eps / K over the K real classes; column K (All-in-one) stays 0. -> [M, C]."""
    k, eps = spec.num_classes, spec.real_smoothing
    _check_labels(labels, k)
    q = torch.zeros((labels.shape[0], c), dtype=torch.float32, device=labels.device)
    q[:, :k] = eps / k
    q.scatter_(1, labels.view(-1, 1), (1.0 - eps) + eps / k)
    return q


def _generated_targets(spec: LabelSpec, logits: Tensor, static_ranks: Tensor | None) -> Tensor:
    """Targets [M, C] for M generated images by the method's target rule (``trainables.methods.TARGET_RULES``),
    from their own detached logits [M, C] or stored ranks."""
    m, k, c = logits.shape[0], spec.num_classes, logits.shape[1]
    q = torch.zeros((m, c), dtype=torch.float32, device=logits.device)
    real_logits = logits.detach().float()[:, :k]  # [M, K]; ranks of logits == ranks of softmax(logits)
    match spec.traits.targets:
        case "extra_class":
            q[:, k] = 1.0  # the extra class K
        case "argmax":
            q.scatter_(1, real_logits.argmax(dim=1, keepdim=True), 1.0)  # one-hot on argmax p
        case "uniform":
            q[:, :k] = 1.0 / k
        case "static_ranks":  # stored ranks are checked when read (datasets.generated.GeneratedStore.read_labels)
            q[:, :k] = _targets_from_ranks(static_ranks, keep=spec.keep, order=spec.order, check=False)
        case "dynamic_ranks":
            ranks = ranks_from_probs(real_logits)  # a permutation per row by construction
            q[:, :k] = _targets_from_ranks(ranks, keep=spec.keep, order=spec.order, check=False)
        case rule:
            raise ValueError(f"labels.method={spec.method!r} has target rule {rule!r}, which "
                             f"trainables.reid.labels does not implement (a method without generated images "
                             f"has no generated targets)")
    return q


def targets_for(
    spec: LabelSpec,
    logits: Tensor,
    labels: Tensor,
    is_generated: Tensor,
    epoch: int,
    static_ranks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Targets [N, C] (rows sum to 1) and per-image weights [N] for one batch; feed to `soft_cross_entropy`.

    logits [N, C] (C = num_outputs(spec), the batch being trained on; only read, detached); labels [N] long
    (real: 0..K-1, generated: ignored); is_generated [N] bool; static_ranks [N, K] ascending ranks 1..K for the
    generated rows (smprl only). Weights: 1 for real (2 with the coded switch "from_start"), lambda for generated
    when `is_active`, else 0 (their target is then uniform over the K real classes). No gradient flows into the
    targets.

    Every row gets both its real and its generated target and a select keeps one: no boolean indexing and no
    branch on the batch's contents, so a step on an accelerator never waits for the device here.
    """
    n, c = logits.shape[0], num_outputs(spec)
    if logits.dim() != 2 or logits.shape[1] != c:
        raise ValueError(f"logits must be [N, {c}] for labels.method={spec.method!r}, got {tuple(logits.shape)}")
    if labels.shape != (n,) or is_generated.shape != (n,):
        shapes = f"{tuple(labels.shape)}, {tuple(is_generated.shape)}"
        raise ValueError(f"labels and is_generated must be [N]=({n},), got {shapes}")
    if spec.traits.static_ranks and static_ranks is None:
        raise ValueError(f"labels.method={spec.method!r} needs static_ranks [N, K] (from predict_static_ranks)")
    if static_ranks is not None and static_ranks.shape != (n, spec.num_classes):
        raise ValueError(f"static_ranks must be [N, K]=({n}, {spec.num_classes}), got {tuple(static_ranks.shape)}")
    gen = is_generated.to(device=logits.device, dtype=torch.bool)
    active = is_active(spec, epoch)
    with torch.no_grad():
        real = _real_targets(spec, labels.to(logits.device).long().masked_fill(gen, 0), c)  # [N, C]
        if active:
            ranks = static_ranks.to(logits.device, torch.long) if spec.traits.static_ranks else None
            fake = _generated_targets(spec, logits, ranks)  # [N, C]
        else:  # weight 0: any distribution
            uniform = lsro_targets(1, spec.num_classes, device=logits.device)  # [1, K]
            fake = F.pad(uniform, (0, c - spec.num_classes)).expand(n, c)
        targets = torch.where(gen.unsqueeze(1), fake, real)
        lam = spec.effective_gen_weight if active else 0.0
        weights = torch.where(gen, torch.full((n,), lam, device=logits.device),
                              torch.full((n,), spec.real_weight, device=logits.device))
    return targets, weights


# --------------------------------------------------------------------------------------------------------------
# sMpRL stage: ranks predicted once by the real-data-only baseline (`prepare_sMpRL_label4data.m`)
# --------------------------------------------------------------------------------------------------------------


def _default_logits_fn(model: torch.nn.Module, imgs: Tensor) -> Tensor:
    return model(imgs)


def predict_static_ranks(
    model: torch.nn.Module,
    loader: Iterable[dict],
    *,
    logits_fn: Callable[[torch.nn.Module, Tensor], Tensor] = _default_logits_fn,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Ascending ranks (1..K) of each image's class probabilities, in loader order -> uint16 [N, K].

    Runs under `eval_mode` (eval mode, restored afterwards; torch.inference_mode); batches are dicts with
    "img" [B, 3, H, W]; `logits_fn(model, imgs)` must return logits [B, K]. Runs on `device`, else on the
    model's device.
    Store these and rebuild any keep/order with `weights_from_ranks` / `mprl_targets`.
    """
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    chunks: list[np.ndarray] = []
    with eval_mode(model):
        for batch in loader:
            if not isinstance(batch, dict) or "img" not in batch:
                raise ValueError("predict_static_ranks: loader batches must be dicts with key 'img'")
            logits = logits_fn(model, batch["img"].to(device)).float()  # [B, K]
            if logits.shape[1] > np.iinfo(np.uint16).max:
                raise ValueError(f"num_classes {logits.shape[1]} too large for uint16 ranks (max 65535)")
            chunks.append(ranks_from_probs(logits).cpu().numpy().astype(np.uint16))
    if not chunks:
        raise ValueError("predict_static_ranks: loader yielded no batches")
    return np.concatenate(chunks, axis=0)
