"""Image pairs for the two-stream (identification + verification) net: every piece of pair code.

Pairs are drawn from REAL images only: the verification loss is defined on real identities (docs/protocol.md,
"Two-stream net"); a generated image is paired with a random real one and carries only identification loss.
The reference code grows the share of negative pairs over training: ``r = min(5, 2 * 1.01**epoch)`` and
``round(batch / r)`` of a batch's pairs are positive, i.e. a positive fraction 1/r: 1/2 at epoch 0 (1:1) down to
1/5 (1 positive : 4 negatives, reached at epoch 93).
"""

from __future__ import annotations

import math

import numpy as np


def pos_fraction_for_epoch(
    epoch: int, *, batch_size: int | None = None, start_ratio: float = 2.0, growth: float = 1.01,
    max_ratio: float = 5.0,
) -> float:
    """Positive-pair fraction 1 / r with r = min(max_ratio, start_ratio * growth**epoch) pairs per positive.

    The reference (MpRL/LSRO ``getBatch``) makes ``round(batch / r)`` of each batch's pairs positive: 1/2 at
    epoch 0, 1/5 from epoch 93 (0.5 and 0.2 at epochs 0 and 200). With ``batch_size`` the reference's per-batch
    rounding is applied: round(B / r) / B (B = 32: 16/32 at epoch 0, 6/32 = 0.1875 once r = 5). Its epochs
    count from 1, so its first epoch has r = 2.02 (still 16 of 32 pairs).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    ratio = min(max_ratio, start_ratio * growth**epoch)
    if batch_size is None:
        return 1.0 / ratio
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return math.floor(batch_size / ratio + 0.5) / batch_size  # MATLAB round: half away from zero


def _class_layout(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices sorted by label, and per image: its class's start in that order and its class size."""
    order = np.argsort(labels, kind="stable")
    _, cls, counts = np.unique(labels, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order, starts[cls], counts[cls]


def _positives(
    labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n (anchor, partner) pairs, same label, distinct indices; anchors uniform over images of classes >= 2."""
    order, start, count = _class_layout(labels)
    eligible = np.flatnonzero(count >= 2)
    if eligible.size == 0:
        raise ValueError("sample_pairs: positive pairs need a class with at least 2 images; none has")
    anchors = rng.choice(eligible, size=n)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)  # position of each image in the label-sorted order
    offset = rank[anchors] - start[anchors]  # anchor's position inside its class
    r = rng.integers(0, count[anchors] - 1)  # pick among the class's other images
    partner = order[start[anchors] + np.where(r < offset, r, r + 1)]
    return anchors, partner


def _negatives(
    labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n (anchor, partner) pairs with different labels; anchor uniform, partner uniform over other classes."""
    order, start, count = _class_layout(labels)
    if count[0] == labels.size:
        raise ValueError("sample_pairs: negative pairs need at least 2 classes; only one exists")
    anchors = rng.integers(0, labels.size, size=n)
    r = rng.integers(0, labels.size - count[anchors])  # position among images outside the anchor's class
    partner = order[np.where(r < start[anchors], r, r + count[anchors])]
    return anchors, partner


def sample_pairs(
    labels: np.ndarray, num_pairs: int, *, pos_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``num_pairs`` index pairs into a dataset of real images labelled ``labels`` [N].

    Exactly ``round(num_pairs * pos_fraction)`` pairs are positive (same label, distinct indices); the rest
    are negative (different labels). Order is shuffled. Returns (idx1 [P] int64, idx2 [P] int64, same [P]
    bool). Deterministic for a given ``rng`` state.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"sample_pairs: labels must be a non-empty 1-D array, got shape {labels.shape}")
    if num_pairs < 0:
        raise ValueError(f"sample_pairs: num_pairs must be >= 0, got {num_pairs!r}")
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"sample_pairs: pos_fraction must be in [0, 1], got {pos_fraction!r}")
    n_pos = int(round(num_pairs * pos_fraction))
    n_neg = num_pairs - n_pos
    empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    p1, p2 = _positives(labels, n_pos, rng) if n_pos else empty
    q1, q2 = _negatives(labels, n_neg, rng) if n_neg else empty
    idx1 = np.concatenate([p1, q1]).astype(np.int64)
    idx2 = np.concatenate([p2, q2]).astype(np.int64)
    same = np.concatenate([np.ones(n_pos, dtype=bool), np.zeros(n_neg, dtype=bool)])
    perm = rng.permutation(num_pairs)
    return idx1[perm], idx2[perm], same[perm]


def epoch_pairs(real_labels: np.ndarray, n_gen: int, *, pos_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """One epoch of pairs, int64 [P, 4] = (idx1, idx2, same, verif_ok): one real pair per real image
    (``pos_fraction`` positives), and each generated image paired with a random real one. Pairs with a generated
    image carry no verification loss (``verif_ok = 0``). ``rng``: the epoch's ``Stream.PAIRS``."""
    n_real = len(real_labels)
    i1, i2, same = sample_pairs(real_labels, n_real, pos_fraction=pos_fraction, rng=rng)
    rows = [np.stack([i1, i2, same.astype(np.int64), np.ones(n_real, dtype=np.int64)], 1)]
    if n_gen:
        gen = n_real + np.arange(n_gen)
        partner = rng.integers(0, n_real, n_gen)
        rows.append(np.stack([gen, partner, np.zeros(n_gen, np.int64), np.zeros(n_gen, np.int64)], 1))
    return np.concatenate(rows)


def pair_rows(pairs: np.ndarray, pair_batches: list[list[int]]) -> list[list[tuple[int, ...]]]:
    """Batches of pair indices -> batches of the pair rows themselves (what ``DecodedPairs`` reads)."""
    return [[tuple(int(v) for v in pairs[i]) for i in b] for b in pair_batches]
