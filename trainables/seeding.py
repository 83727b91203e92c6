"""One seeding scheme: every random stream is named, and seeded from (its name, the configured seed, the coordinates
that vary within a run) through numpy's SeedSequence.

Distinct tuples give statistically independent streams, and no seed is ever added to or multiplied with another,
so (seed 0, rank 1) is not (seed 1, rank 0), and the crops of an epoch are not the numbers its dropout draws. The
same tuple gives the same stream on any machine, so a resumed run replays an epoch exactly. The synthetic dataset
(``datasets/``, which imports nothing of the training code) draws from its own ``dataset.synthetic_seed``.
"""

from __future__ import annotations

import enum
import random

import numpy as np
import torch

_MASK = (1 << 64) - 1  # SeedSequence takes non-negative integers


class Stream(enum.IntEnum):
    """The project's random streams and their coordinates. The value is part of every seed: never renumber one."""

    REID_INIT = 1  # (seed, rank): the re-ID model's initial weights (torch's global generator)
    REID_EPOCH = 2  # (seed, rank, epoch): the global generators during a re-ID epoch (dropout)
    REID_BATCHES = 3  # (seed, epoch): the epoch's global batches
    REID_AUGMENT = 4  # (seed, rank, epoch): crops and flips of the epoch's batches
    PAIRS = 5  # (seed, epoch): the two-stream net's pairs
    PAIR_BATCHES = 6  # (seed, epoch): the batches of those pairs
    MATCHED_REPEATS = 7  # (seed,): which real images the compute-matched control repeats
    VALIDATION_IDS = 8  # (): the identities held out for validation, the same for every seed
    GAN_INIT = 9  # (seed,): the DCGAN's initial weights, the same on every rank
    GAN_ORDER = 10  # (seed, epoch): the epoch's permutation of the training images
    GAN_EPOCH = 11  # (seed, rank, epoch): latents and flips during a DCGAN epoch
    GAN_FIXED_Z = 12  # (seed,): the latents of the per-epoch sample grid
    GENERATION = 13  # (seed, chunk): the latents of one chunk of the generated pool
    BENCH = 14  # (seed, rank): the synthetic tensors of the benchmarks
    BENCH_BATCHES = 15  # (seed, epoch): the benchmarks' batch orders


def derive_seed(stream: Stream, *parts: int) -> int:
    """A 32-bit seed that depends on the stream and every part."""
    return int(np.random.SeedSequence([int(stream), *(int(p) & _MASK for p in parts)]).generate_state(1)[0])


def numpy_rng(stream: Stream, *parts: int) -> np.random.Generator:
    """A numpy generator of the stream at these coordinates."""
    return np.random.default_rng(derive_seed(stream, *parts))


def torch_generator(stream: Stream, *parts: int) -> torch.Generator:
    """A CPU torch generator of the stream at these coordinates (the same numbers whatever the training device)."""
    return torch.Generator().manual_seed(derive_seed(stream, *parts))


def seed_everything(stream: Stream, *parts: int) -> int:
    """Seed Python's, numpy's and torch's global generators from the stream's seed; returns it."""
    seed = derive_seed(stream, *parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed
