"""Batches for re-ID training: real and generated images mixed at a configured ratio, sharded over workers.

Every batch is drawn globally (``batch_size`` images across all workers) and then sliced per rank, so each
worker runs the same number of steps (DDP needs that) and the union of the workers' batches does not depend
on the number of workers. Indices refer to one concatenated record list: real images first, then generated.

Two input paths. From the decoded-image cache (the default, ``reid.decoded_cache``): one :class:`EpochLoader`
for the whole run (one DataLoader, persistent workers) reads uint8 batches from the memory-mapped cache, and
:class:`trainables.augment.DeviceAugment` moves them once and augments them on the training device. From the
JPEG files (``train_loader``, ``pair_loader``, ``test_loader``): a DataLoader per epoch decodes and augments each
image in its workers (``datasets.torch_data.build_transform``).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.decoded_cache import DecodedDataset, DecodedPairs, DecodedRows, as_batch
from datasets.records import Record
from datasets.torch_data import ImageDataset, build_transform
from trainables.augment import DeviceAugment
from trainables.pairs import sample_pairs


def epoch_batches(n_real: int, n_gen: int, batch_size: int, *, gen_fraction: float | None, seed: int,
                  epoch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches for one epoch (indices < n_real are real, the rest generated).

    ``gen_fraction=None``: one shuffled pass over real + generated (Algorithm 1 of the paper samples mini-batches
    from the union). ``gen_fraction=f``: one pass over the real images, each global batch holding
    ``round(batch_size * f)`` generated images drawn without replacement from a shuffled cycle.
    A final global batch smaller than ``world_size * 2`` is dropped (BatchNorm needs 2 samples per worker).
    """
    if batch_size % world_size:
        raise ValueError(f"reid.batch_size={batch_size} is not divisible by the {world_size} workers")
    rng = np.random.default_rng([seed, epoch])
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
    """A DataLoader batch_sampler over precomputed batches."""

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def train_loader(records: Sequence[Record], batches: list[list[int]], image_size: tuple[int, int], *,
                 workers: int, pin_memory: bool = False, augment: str = "pad_crop") -> DataLoader:
    """Training images by ``batches``, augmented by the ``augment`` pipeline (``reid.augment``)."""
    ds = ImageDataset(records, build_transform(image_size, train=True, augment=augment))
    return DataLoader(ds, batch_sampler=ListBatchSampler(batches), num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False)


def test_loader(records: Sequence[Record], image_size: tuple[int, int], *, batch_size: int, workers: int,
                pin_memory: bool = False, augment: str = "pad_crop") -> DataLoader:
    """Images in order, through the test-time part of the ``augment`` pipeline: pass the training run's
    ``reid.augment`` (the paper and reference_code pipelines test at 256/224 x ``image_size``)."""
    ds = ImageDataset(records, build_transform(image_size, train=False, augment=augment))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


# ------------------------------------------------------------------------------------ two-stream pairs

class PairDataset(Dataset):
    """Item i = two images of the underlying dataset plus ``same`` / ``verif`` flags of pair i."""

    def __init__(self, base: ImageDataset, pairs: np.ndarray) -> None:
        self.base, self.pairs = base, pairs  # pairs: int64 [P, 4] = (idx1, idx2, same, verif_ok)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        i1, i2, same, ok = (int(v) for v in self.pairs[i])
        a, b = self.base[i1], self.base[i2]
        return {**{f"{k}1": v for k, v in a.items()}, **{f"{k}2": v for k, v in b.items()},
                "same": same, "verif": bool(ok)}


def epoch_pairs(real_labels: np.ndarray, n_gen: int, *, pos_fraction: float, seed: int, epoch: int) -> np.ndarray:
    """One epoch of pairs: one real pair per real image (``pos_fraction`` positives), and each generated image
    paired with a random real one. Pairs with a generated image carry no verification loss (``verif_ok = 0``)."""
    rng = np.random.default_rng([seed, epoch, 7])
    n_real = len(real_labels)
    i1, i2, same = sample_pairs(real_labels, n_real, pos_fraction=pos_fraction, rng=rng)
    rows = [np.stack([i1, i2, same.astype(np.int64), np.ones(n_real, dtype=np.int64)], 1)]
    if n_gen:
        gen = n_real + np.arange(n_gen)
        partner = rng.integers(0, n_real, n_gen)
        rows.append(np.stack([gen, partner, np.zeros(n_gen, np.int64), np.zeros(n_gen, np.int64)], 1))
    return np.concatenate(rows)


def pair_loader(records: Sequence[Record], pairs: np.ndarray, pair_batches: list[list[int]],
                image_size: tuple[int, int], *, workers: int, pin_memory: bool = False,
                augment: str = "pad_crop") -> DataLoader:
    base = ImageDataset(records, build_transform(image_size, train=True, augment=augment))
    return DataLoader(PairDataset(base, pairs), batch_sampler=ListBatchSampler(pair_batches),
                      num_workers=workers, pin_memory=pin_memory)


# ------------------------------------------------------------------------------------ the decoded-cache path

class EpochLoader:
    """One DataLoader for a whole run over a decoded cache; yields batches on the device, ready for the step.

    :meth:`epoch` gives the next pass its batches (indices, or pair rows for two-stream) and seeds the device
    augmentation; the workers (``persistent_workers``) and the memory maps stay open across epochs.
    """

    def __init__(self, dataset: Dataset, prepare: DeviceAugment, *, workers: int, pin_memory: bool = False) -> None:
        self.sampler, self.prepare = ListBatchSampler([]), prepare
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=pin_memory,
                                 persistent_workers=workers > 0, collate_fn=as_batch)

    def epoch(self, batches: Sequence[Sequence], *seed: int) -> "EpochLoader":
        """Set this pass's batches and seed its augmentation draws with ``seed`` (e.g. seed, rank, epoch)."""
        self.sampler.batches = batches
        self.prepare.reseed(*seed)
        return self

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield self.prepare(batch)


def decoded_train_loader(records: Sequence[Record], rows: DecodedRows, image_size: tuple[int, int], *,
                         device: torch.device, workers: int, augment: str = "pad_crop",
                         pairs: bool = False) -> EpochLoader:
    """Training batches from the cache, augmented on ``device``; ``pairs``: two-stream batches of pair rows."""
    base = DecodedDataset(records, rows)
    dataset = DecodedPairs(base) if pairs else base
    prepare = DeviceAugment(augment, image_size, device, train=True)
    return EpochLoader(dataset, prepare, workers=workers, pin_memory=device.type == "cuda")


def decoded_test_loader(records: Sequence[Record], rows: DecodedRows, *, batch_size: int, device: torch.device,
                        workers: int, augment: str = "pad_crop") -> EpochLoader:
    """Images in order from the cache (the test-time size of ``augment``), normalised on ``device``."""
    prepare = DeviceAugment(augment, rows.image_size, device, train=False)
    loader = EpochLoader(DecodedDataset(records, rows), prepare, workers=workers, pin_memory=device.type == "cuda")
    return loader.epoch([list(range(i, min(i + batch_size, len(records)))) for i in range(0, len(records), batch_size)])


def pair_rows(pairs: np.ndarray, pair_batches: list[list[int]]) -> list[list[tuple[int, ...]]]:
    """Batches of pair indices -> batches of the pair rows themselves (what :class:`DecodedPairs` reads)."""
    return [[tuple(int(v) for v in pairs[i]) for i in b] for b in pair_batches]
