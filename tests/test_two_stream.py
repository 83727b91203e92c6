"""The two-stream net learns: a few hundred steps of our real epoch loop and pair step on the tiny synthetic set.

Regression test for the divergence of the verification head (a NaN within the first epoch of the cpu preset):
the images are preloaded (no DataLoader) so it runs in seconds, but the step, the loss and the optimiser are the
ones `reid_loop` uses (cpu preset: ResNet-18, 256-d bottleneck, lr 0.02, new layers x10, Nesterov, wd 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

from datasets.decoded_cache import decode
from trainables.reid.augment import IMAGENET_MEAN, IMAGENET_STD
from trainables.reid.engine import pair_step, train_one_epoch
from trainables.reid.labels import LabelSpec
from trainables.reid.models import TwoStreamNet
from trainables.reid.pairs import pos_fraction_for_epoch, sample_pairs

PAIRS, EPOCHS = 8, 40  # 16 images per step; 4 steps an epoch on the tiny set: 160 steps in all


def _batches(imgs: torch.Tensor, labels: np.ndarray, epoch: int) -> list[dict]:
    rng = np.random.default_rng([0, epoch])
    n = (len(labels) // PAIRS) * PAIRS
    i1, i2, same = sample_pairs(labels, n, pos_fraction=pos_fraction_for_epoch(epoch, batch_size=PAIRS), rng=rng)
    out = []
    for s in range(0, n, PAIRS):
        a, b = torch.from_numpy(i1[s:s + PAIRS]), torch.from_numpy(i2[s:s + PAIRS])
        real = torch.zeros(PAIRS, dtype=torch.bool)
        out.append({"img1": imgs[a], "img2": imgs[b], "label1": torch.from_numpy(labels)[a],
                    "label2": torch.from_numpy(labels)[b], "generated1": real, "generated2": real,
                    "gen_row1": torch.full((PAIRS,), -1), "gen_row2": torch.full((PAIRS,), -1),
                    "same": torch.from_numpy(same[s:s + PAIRS]).long(), "verif": ~real})
    return out


def test_two_stream_loss_is_finite_and_falls(tiny_split):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one trajectory whatever the machine (thread count changes float sums)
    try:
        losses = _epoch_losses(tiny_split)
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses  # it learns
    assert max(losses[EPOCHS // 2:]) < losses[0], losses  # and does not blow up later


def _images(tiny_split) -> torch.Tensor:
    """[N, 3, 32, 16]: the training images resized, to [0, 1], ImageNet-normalised (torchvision's own ops)."""
    return torch.stack([TF.normalize(TF.to_tensor(row), IMAGENET_MEAN, IMAGENET_STD)
                        for row in decode(tiny_split.train, (32, 16))])


def _epoch_losses(tiny_split) -> list[float]:
    torch.manual_seed(0)
    imgs = _images(tiny_split)
    labels = np.array([r.label for r in tiny_split.train])
    k = tiny_split.num_train_ids
    model = TwoStreamNet(k, backbone="resnet18", embed_dim=256, dropout=0.5, verif_dropout=0.9)
    opt = torch.optim.SGD(model.param_groups(0.02, new_lr_mult=10.0, weight_decay=1e-4), lr=0.02, momentum=0.9,
                          nesterov=True)
    step = pair_step(LabelSpec("baseline", k), None, lambda: torch.autocast("cpu", enabled=False))
    return [train_one_epoch(model, _batches(imgs, labels, e), opt, step, epoch=e,
                            device=torch.device("cpu"))["loss"] for e in range(EPOCHS)]


def test_the_epoch_loss_is_the_optimised_loss(tiny_split):
    """The epoch's logged loss is the mean of what the optimizer minimised (0.5 id1 + 0.5 id2 + verification per
    pair), not that sum spread over both images of a pair: on one batch, with lr 0 (nothing moves) and no dropout,
    it equals the step's own loss."""
    torch.manual_seed(0)
    imgs = _images(tiny_split)
    labels = np.array([r.label for r in tiny_split.train])
    k = tiny_split.num_train_ids
    model = TwoStreamNet(k, backbone="resnet18", embed_dim=32, dropout=0.0, verif_dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = pair_step(LabelSpec("baseline", k), None, lambda: torch.autocast("cpu", enabled=False))
    batch = _batches(imgs, labels, 0)[:1]
    logged = train_one_epoch(model, batch, opt, step, epoch=0, device=torch.device("cpu"))["loss"]
    assert logged == pytest.approx(float(step(model, batch[0], 0).loss), rel=1e-5)
