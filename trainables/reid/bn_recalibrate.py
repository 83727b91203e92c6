"""BatchNorm re-estimation (``reid.bn_recalibrate``): a trained model's BN statistics recomputed on real images.

A run that trains on real + generated images has BatchNorm running statistics that are a mix of both: the test
images are then normalised with statistics partly of images unlike them. :func:`recalibrated` returns a copy of
the model whose every BatchNorm layer holds the mean and (unbiased) variance of its input over the real training
images, at the test transform, weights untouched (the fidelity review's E1: if a gap closes, the harm was the test
time statistics, not the labels). One pass, as ``torch.optim.swa_utils.update_bn`` and AdaBN do it: the BN layers
normalise each batch with its own statistics during the pass (every other layer in eval mode: no dropout), and each
layer's statistics are pooled exactly over all the images (sums and sums of squares), not a running average of
per-batch values.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def bn_layers(model: torch.nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that keep running statistics (those test time reads)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


@torch.no_grad()
def recalibrated(model: torch.nn.Module, loader: Iterable[dict], device: torch.device | str) -> torch.nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm layer's running mean / var the exact pooled statistics
    of its input over the images of ``loader`` (batches of dicts with "img" [B, 3, H, W]); ValueError on a model
    without BatchNorm or a loader without images."""
    out = copy.deepcopy(model).eval()
    layers = bn_layers(out)
    if not layers:
        raise ValueError("reid.bn_recalibrate: the model has no BatchNorm layer")
    sums: dict[int, list] = {}

    def hook(layer: _BatchNorm, args: tuple) -> None:
        x = args[0].detach().double()
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        n = x.numel() // x.shape[1]
        s, sq, count = sums.get(id(layer), (0.0, 0.0, 0))
        sums[id(layer)] = [s + x.sum(dims), sq + (x * x).sum(dims), count + n]

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        for layer in layers:
            layer.train()  # normalise with the batch's own statistics during the pass
        images = 0
        for batch in loader:
            x = batch["img"].to(device)
            images += len(x)
            out(x)
        if images == 0:
            raise ValueError("reid.bn_recalibrate: no images to re-estimate the BatchNorm statistics on")
    finally:
        for h in handles:
            h.remove()
        out.eval()
    for layer in layers:
        s, sq, n = sums[id(layer)]
        mean = s / n
        var = (sq - n * mean * mean) / max(n - 1, 1)  # unbiased, as BatchNorm keeps it
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.clamp_min(0).to(layer.running_var.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(0)
    return out
