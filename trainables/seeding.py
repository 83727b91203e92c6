"""One seeding scheme: every random stream is seeded from a tuple of integers through numpy's SeedSequence.

``(seed, rank, epoch)`` for a training epoch, ``(seed, chunk)`` for a generation chunk, ...: distinct tuples give
statistically independent streams (no ``seed * 1000 + rank`` collisions), and the same tuple gives the same
stream on any machine, so a resumed run replays an epoch exactly.
"""

from __future__ import annotations

import random

import numpy as np
import torch

_MASK = (1 << 64) - 1  # SeedSequence takes non-negative integers


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part."""
    return int(np.random.SeedSequence([int(p) & _MASK for p in parts]).generate_state(1)[0])


def seed_everything(*parts: int) -> int:
    """Seed Python's, numpy's and torch's global generators from ``parts``; returns the derived seed."""
    seed = derive_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed
