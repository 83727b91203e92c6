"""Inference passes over models that may be mid-training: one context manager for eval mode.

Used by feature extraction (trainables/evaluation/distance.py), the sMpRL rank prediction
(trainables/reid/labels.py) and GAN sample grids, so that each restores the caller's train/eval mode the same way.
Imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Run the block with every module in eval mode under torch.inference_mode.

    On exit (also on an exception) each module gets its previous training flag back via
    `module.train(flag)` (which, as always in torch, sets that flag on all its submodules too).
    """
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)
