"""Batches for re-ID training: real and generated images mixed at a configured ratio, sharded over workers.

Every batch is drawn globally (``batch_size`` images across all workers) and then sliced per rank, so each
worker runs the same number of steps (DDP needs that) and the union of the workers' batches does not depend
on the number of workers. Indices refer to one concatenated record list: real images first, then generated.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from datasets.records import Record
from datasets.torch_data import ImageDataset, build_transform
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
