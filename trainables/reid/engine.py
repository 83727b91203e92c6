"""One re-ID epoch loop and the two step functions it runs (identification, two-stream).

The split of torchreid's ``engine.train`` / ``forward_backward``, with a function argument instead of a class
hierarchy: :func:`train_one_epoch` owns the skeleton (device transfer, channels-last, the optimizer step,
running totals, finiteness checks, timing); a step function computes one batch's loss. Every image goes
through one soft-target cross entropy (TIP Eq. 11) with its target from :func:`trainables.reid.labels.targets_for`;
dynamic (dMpRL, pseudo) targets come from the detached logits of the same forward pass.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch

from trainables.reid.labels import LabelSpec, soft_cross_entropy, targets_for
from trainables.reid.models import two_stream_loss

CHECK_EVERY = 25  # steps between loss finiteness checks (each one is a host-device sync)


@dataclass(frozen=True)
class StepOut:
    """What the loop needs from one step: the loss to minimise and what the running accuracy reads."""

    loss: torch.Tensor  # scalar: the batch's mean loss (over images; over pairs for two-stream)
    logits: torch.Tensor  # [B, K] logits over the real classes (first stream for two-stream)
    labels: torch.Tensor  # [B]: the B items the loss is a mean over
    real: torch.Tensor  # [B] bool: real images (accuracy is measured on those)
    images: int  # images this step trained on (2B for two-stream)


StepFn = Callable[[torch.nn.Module, dict, int], StepOut]
Autocast = Callable[[], AbstractContextManager]


def ident_step(spec: LabelSpec, static_ranks: torch.Tensor | None, autocast: Autocast) -> StepFn:
    """The identification net's step: one soft-target CE over real and generated images."""

    def step(model: torch.nn.Module, batch: dict, epoch: int) -> StepOut:
        with autocast():
            logits = model(batch["img"])  # [B, C]
        ranks = static_ranks[batch["gen_row"].clamp(min=0)] if static_ranks is not None else None
        targets, weights = targets_for(spec, logits.float(), batch["label"], batch["generated"], epoch, ranks)
        loss = soft_cross_entropy(logits, targets, weights)
        return StepOut(loss, logits[:, :spec.num_classes], batch["label"], ~batch["generated"], len(batch["label"]))

    return step


def pair_step(spec: LabelSpec, static_ranks: torch.Tensor | None, autocast: Autocast) -> StepFn:
    """The two-stream net's step: 0.5 id1 + 0.5 id2 + verification on real pairs (Zheng et al.)."""

    def step(model: torch.nn.Module, batch: dict, epoch: int) -> StepOut:
        with autocast():
            logits1, logits2, verif = model(batch["img1"], batch["img2"])
        parts = []
        for s, logits in (("1", logits1), ("2", logits2)):
            ranks = static_ranks[batch["gen_row" + s].clamp(min=0)] if static_ranks is not None else None
            parts.append(targets_for(spec, logits.float(), batch["label" + s], batch["generated" + s], epoch, ranks))
        loss = two_stream_loss(logits1, logits2, verif, parts[0][0], parts[1][0], batch["same"],
                               id_loss_fn=soft_cross_entropy, weights1=parts[0][1], weights2=parts[1][1],
                               verif_mask=batch["verif"])
        return StepOut(loss, logits1[:, :spec.num_classes], batch["label1"], ~batch["generated1"],
                       len(batch["label1"]) + len(batch["img2"]))

    return step


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, step_fn: StepFn, *,
                    epoch: int, device: torch.device, channels_last: bool = False,
                    on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns the mean optimised loss (over the steps, weighted by their batch size), the
    accuracy on real images, the images trained on, images/s and seconds.

    Running totals stay on the device (no host sync per step); finiteness is checked every few steps.
    """
    model.train()
    totals = _new_totals(device)
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if on_step:
            on_step(step)
        out = step_fn(model, to_device(batch, device, channels_last=channels_last), epoch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        _accumulate(totals, out, epoch, step)
    return _epoch_metrics(totals, time.perf_counter() - start, epoch)


def to_device(batch: dict, device: torch.device, *, channels_last: bool = False) -> dict:
    """Tensors of a batch on ``device`` (images [B, 3, H, W] in channels-last memory format when asked)."""
    non_blocking = device.type == "cuda"
    out = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        out = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
               for k, v in out.items()}
    return out


def _new_totals(device: torch.device) -> dict:
    zero = torch.zeros((), device=device)
    return {"loss": zero.clone(), "correct": zero.clone(), "real": zero.clone(), "items": 0, "images": 0}


def _accumulate(totals: dict, out: StepOut, epoch: int, step: int) -> None:
    totals["loss"] += out.loss.detach().float() * len(out.labels)
    totals["items"] += len(out.labels)
    totals["images"] += out.images
    totals["correct"] += ((out.logits.detach().argmax(1) == out.labels) & out.real).sum()
    totals["real"] += out.real.sum()
    if step % CHECK_EVERY == CHECK_EVERY - 1:
        _check_finite(totals["loss"], epoch, step)


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(f"re-ID loss became {loss_sum.item()} by epoch {epoch} step {step}; lower reid.lr?")


def _epoch_metrics(totals: dict, seconds: float, epoch: int) -> dict[str, float]:
    _check_finite(totals["loss"], epoch, -1)
    return {"loss": float(totals["loss"]) / max(totals["items"], 1),
            "train_acc": float(totals["correct"]) / max(float(totals["real"]), 1), "images": totals["images"],
            "images_per_s": totals["images"] / max(seconds, 1e-9), "epoch_time_s": seconds}
