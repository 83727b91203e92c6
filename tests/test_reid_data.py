import numpy as np
import pytest

from trainables.reid_data import epoch_batches, epoch_pairs


def test_proportional_epoch_covers_union_once():
    b = epoch_batches(50, 30, 16, gen_fraction=None, seed=0, epoch=0)
    flat = [i for batch in b for i in batch]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(80)) and len(flat) == 80
    assert b != epoch_batches(50, 30, 16, gen_fraction=None, seed=0, epoch=1)  # reshuffled per epoch
    assert b == epoch_batches(50, 30, 16, gen_fraction=None, seed=0, epoch=0)  # deterministic


def test_gen_fraction_gives_exact_mix():
    b = epoch_batches(64, 10, 16, gen_fraction=0.25, seed=1, epoch=0)
    assert len(b) == 64 // 12 + 1
    for batch in b[:-1]:
        assert sum(i >= 64 for i in batch) == 4 and len(batch) == 16
    real = [i for batch in b for i in batch if i < 64]
    assert sorted(real) == list(range(64))  # one pass over the real images


@pytest.mark.parametrize("world", [2, 4])
def test_shards_partition_the_global_batches(world):
    one = epoch_batches(70, 20, 16, gen_fraction=None, seed=3, epoch=2)
    shards = [epoch_batches(70, 20, 16, gen_fraction=None, seed=3, epoch=2, rank=r, world_size=world)
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    for step, batch in enumerate(one[: len(shards[0])]):
        union = sorted(i for s in shards for i in s[step])
        assert set(union) <= set(batch) and len(union) >= len(batch) - world + 1


def test_small_last_batch_dropped_and_divisibility():
    b = epoch_batches(17, 0, 16, gen_fraction=None, seed=0, epoch=0)
    assert [len(x) for x in b] == [16]
    with pytest.raises(ValueError, match="reid.batch_size=15"):
        epoch_batches(17, 0, 15, gen_fraction=None, seed=0, epoch=0, world_size=2)


def test_epoch_pairs_flags():
    labels = np.repeat(np.arange(5), 4)
    pairs = epoch_pairs(labels, 6, pos_fraction=1 / 3, seed=0, epoch=0)
    real, gen = pairs[:20], pairs[20:]
    assert real[:, 2].sum() == round(20 / 3) and (real[:, 3] == 1).all()
    assert (labels[real[real[:, 2] == 1, 0]] == labels[real[real[:, 2] == 1, 1]]).all()
    assert (gen[:, 0] >= 20).all() and (gen[:, 1] < 20).all() and (gen[:, 2:] == 0).all()
