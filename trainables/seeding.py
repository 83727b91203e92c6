"""One seeding scheme: every random stream is named, and seeded from (its name, the configured seed, the coordinates
that vary within a run) through numpy's SeedSequence.

Distinct tuples give statistically independent streams, and no seed is ever added to or multiplied with another,
so (seed 0, rank 1) is not (seed 1, rank 0), and the crops of an epoch are not the numbers its dropout draws. The
same tuple gives the same stream on any machine, so a resumed run replays an epoch exactly. The synthetic dataset
(``datasets/``, which imports nothing of the training code) draws from its own ``dataset.synthetic_seed``.

``STREAMS`` numbers the scheme: the keys of the stages that draw random numbers include it, and a checkpoint made
under another scheme is not resumed, so nothing cached under one scheme is mixed into a run of the other. torch
is imported by the two functions that need it: the driver reads ``STREAMS`` without importing torch.
"""

from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from datasets.records import Split

STREAMS = 2  # 1: the scheme before named streams (until 2026-12-07); bump when any stream's derivation changes
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


def validation_split(split: "Split", val_ids: int) -> tuple["Split", "Split | None"]:
    """(the training split without the ``val_ids`` held-out identities, their validation split; None when 0): the one
    draw of ``Stream.VALIDATION_IDS``, the same for every seed and for every stage that reads the training images
    (the re-ID runs, the DCGAN, the pool-quality measure)."""
    from datasets.records import hold_out

    return hold_out(split, val_ids, numpy_rng(Stream.VALIDATION_IDS)) if val_ids else (split, None)


def torch_generator(stream: Stream, *parts: int) -> torch.Generator:
    """A CPU torch generator of the stream at these coordinates (the same numbers whatever the training device)."""
    import torch

    return torch.Generator().manual_seed(derive_seed(stream, *parts))


def seed_everything(stream: Stream, *parts: int) -> int:
    """Seed Python's, numpy's and torch's global generators from the stream's seed; returns it."""
    import torch

    seed = derive_seed(stream, *parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def check_streams(state: dict, what: str) -> None:
    """ValueError when a checkpoint ``state`` was written under another seeding scheme (no ``streams`` entry: 1)."""
    saved = state.get("streams", 1)
    if saved != STREAMS:
        raise ValueError(f"the {what} checkpoint to resume was made under seeding scheme {saved}, this code uses "
                         f"{STREAMS} (trainables/seeding.py): its epochs would not replay; use another run name or "
                         f"storage path")
