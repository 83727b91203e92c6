"""Batches for re-ID training and evaluation: real and generated images mixed at a configured ratio, sharded over
workers, read as uint8 rows and augmented on the training device.

Every batch is drawn globally (``batch_size`` images across all workers) and then sliced per rank, so each
worker runs the same number of steps (DDP needs that) and the union of the workers' batches does not depend
on the number of workers. Indices refer to one concatenated record list: real images first, then generated.

One :class:`EpochLoader` serves a whole run (one DataLoader, persistent workers): :meth:`EpochLoader.epoch` gives
it the next pass's batches, its workers read their uint8 rows (``datasets.decoded_cache``: the memory-mapped cache,
or the image files decoded on every read when ``reid.decoded_cache`` is off), and
:class:`trainables.reid.augment.DeviceAugment` moves each batch once and augments it on the training device.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.decoded_cache import DecodedDataset, DecodedPairs, DecodedRows, FileRows, as_batch
from datasets.records import Record
from trainables.reid.augment import DeviceAugment

Rows = DecodedRows | FileRows


def epoch_batches(n_real: int, n_gen: int, batch_size: int, *, gen_fraction: float | None, rng: np.random.Generator,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches for one epoch (indices < n_real are real, the rest generated), drawn from ``rng`` (the
    epoch's ``Stream.REID_BATCHES``: the same on every rank).

    ``gen_fraction=None``: one shuffled pass over real + generated (Algorithm 1 of the paper samples mini-batches
    from the union). ``gen_fraction=f``: one pass over the real images, each global batch holding
    ``round(batch_size * f)`` generated images drawn without replacement from a shuffled cycle.
    A final global batch smaller than ``world_size * 2`` is dropped (BatchNorm needs 2 samples per worker).
    """
    if batch_size % world_size:
        raise ValueError(f"reid.batch_size={batch_size} is not divisible by the {world_size} workers")
    if gen_fraction is None or n_gen == 0:
        order = rng.permutation(n_real + n_gen)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        n_gen_batch = int(round(batch_size * gen_fraction))
        n_real_batch = batch_size - n_gen_batch
        real = rng.permutation(n_real)
        steps = -(-n_real // n_real_batch)
        gen_cycle = np.concatenate([rng.permutation(n_gen) for _ in range(-(-steps * n_gen_batch // n_gen))])
        batches = [np.concatenate([real[s * n_real_batch:(s + 1) * n_real_batch],
                                   n_real + gen_cycle[s * n_gen_batch:(s + 1) * n_gen_batch]])
                   for s in range(steps)]
    if batches and len(batches[-1]) < 2 * world_size:
        batches.pop()
    per_rank = []
    for b in batches:
        share = len(b) // world_size  # an uneven last batch is trimmed so every rank gets the same size
        per_rank.append(b[rank * share:(rank + 1) * share].tolist())
    return per_rank


class ListBatchSampler:
    """A DataLoader batch_sampler over precomputed batches (replaced before each pass)."""

    def __init__(self, batches: Sequence[Sequence]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoader:
    """One DataLoader for a whole run over uint8 rows; yields batches on the device, ready for the step.

    :meth:`epoch` gives the next pass its batches (indices, or pair rows for two-stream) and seeds the device
    augmentation; the workers (``persistent_workers``) and the memory maps stay open across epochs.
    """

    def __init__(self, dataset: Dataset, prepare: DeviceAugment, *, workers: int, pin_memory: bool = False) -> None:
        self.sampler, self.prepare = ListBatchSampler([]), prepare
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=pin_memory,
                                 persistent_workers=workers > 0, collate_fn=as_batch)

    def epoch(self, batches: Sequence[Sequence], seed: int = 0) -> "EpochLoader":
        """Set this pass's batches and seed its augmentation draws (``Stream.REID_AUGMENT`` of the epoch)."""
        self.sampler.batches = batches
        self.prepare.reseed(seed)
        return self

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield self.prepare(batch)


def train_loader(records: Sequence[Record], rows: Rows, image_size: tuple[int, int], *, device: torch.device,
                 workers: int, augment: str = "pad_crop", pairs: bool = False) -> EpochLoader:
    """Training batches of ``rows``, augmented on ``device``; ``pairs``: two-stream batches of pair rows."""
    base = DecodedDataset(records, rows)
    dataset = DecodedPairs(base) if pairs else base
    prepare = DeviceAugment(augment, image_size, device, train=True)
    return EpochLoader(dataset, prepare, workers=workers, pin_memory=device.type == "cuda")


def eval_loader(records: Sequence[Record], rows: Rows, *, batch_size: int, device: torch.device, workers: int,
                augment: str = "pad_crop") -> EpochLoader:
    """Images in order (the test-time size of ``augment``: the rows' size), normalised on ``device``."""
    prepare = DeviceAugment(augment, rows.image_size, device, train=False)
    loader = EpochLoader(DecodedDataset(records, rows), prepare, workers=workers, pin_memory=device.type == "cuda")
    return loader.epoch([list(range(i, min(i + batch_size, len(records)))) for i in range(0, len(records), batch_size)])
