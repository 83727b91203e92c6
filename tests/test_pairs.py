"""Two-stream pairs (trainables/reid/pairs.py): sampling, the reference's positive-pair schedule, one epoch's pairs."""

from __future__ import annotations

import numpy as np
import pytest

from trainables.reid.pairs import epoch_pairs, pair_rows, pos_fraction_for_epoch, sample_pairs

LABELS = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])  # class 2 and 4 have one image


def test_sample_pairs_counts_and_labels() -> None:
    idx1, idx2, same = sample_pairs(LABELS, 50, pos_fraction=1 / 3, rng=np.random.default_rng(0))
    assert len(idx1) == len(idx2) == len(same) == 50
    assert same.sum() == round(50 / 3)
    assert np.all(LABELS[idx1[same]] == LABELS[idx2[same]])
    assert np.all(idx1[same] != idx2[same])
    assert np.all(LABELS[idx1[~same]] != LABELS[idx2[~same]])
    assert idx1.min() >= 0 and max(idx1.max(), idx2.max()) < len(LABELS)


def test_sample_pairs_depend_on_the_generator_only() -> None:
    """The same generator state gives the same pairs, another state other pairs (resume replays an epoch)."""
    a = sample_pairs(LABELS, 20, pos_fraction=0.5, rng=np.random.default_rng(3))
    b = sample_pairs(LABELS, 20, pos_fraction=0.5, rng=np.random.default_rng(3))
    c = sample_pairs(LABELS, 20, pos_fraction=0.5, rng=np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_sample_pairs_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 2 images"):
        sample_pairs(np.array([0, 1, 2]), 4, pos_fraction=0.5, rng=rng)
    with pytest.raises(ValueError, match="2 classes"):
        sample_pairs(np.array([5, 5, 5]), 4, pos_fraction=0.5, rng=rng)


def test_pos_fraction_schedule() -> None:
    assert pos_fraction_for_epoch(0) == pytest.approx(1 / 2)
    assert pos_fraction_for_epoch(10) == pytest.approx(1 / (2 * 1.01**10))
    assert pos_fraction_for_epoch(200) == pytest.approx(1 / 5)
    # the reference's per-batch count round(B / r) of B = 32 pairs
    assert pos_fraction_for_epoch(0, batch_size=32) == 16 / 32
    assert pos_fraction_for_epoch(59, batch_size=32) == 9 / 32
    assert pos_fraction_for_epoch(200, batch_size=32) == 6 / 32


def test_epoch_pairs_flags():
    labels = np.repeat(np.arange(5), 4)
    pairs = epoch_pairs(labels, 6, pos_fraction=1 / 3, rng=np.random.default_rng(0))
    real, gen = pairs[:20], pairs[20:]
    assert real[:, 2].sum() == round(20 / 3) and (real[:, 3] == 1).all()
    assert (labels[real[real[:, 2] == 1, 0]] == labels[real[real[:, 2] == 1, 1]]).all()
    assert (gen[:, 0] >= 20).all() and (gen[:, 1] < 20).all() and (gen[:, 2:] == 0).all()


def test_pair_rows_are_the_batches_rows():
    pairs = np.array([[0, 1, 1, 1], [2, 3, 0, 1], [4, 0, 0, 0]])
    assert pair_rows(pairs, [[2, 0], [1]]) == [[(4, 0, 0, 0), (0, 1, 1, 1)], [(2, 3, 0, 1)]]
