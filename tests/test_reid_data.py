import numpy as np
import pytest

from datasets.torch_data import pre_crop_size
from trainables.reid_data import epoch_batches, epoch_pairs, pair_loader, train_loader
from trainables.reid_data import test_loader as make_test_loader  # a test_* name would be collected


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


@pytest.mark.parametrize("augment", ["pad_crop", "paper", "reference_code"])
def test_loaders_pass_augment_to_the_transform(tiny_split, augment):
    """reid.augment reaches build_transform: train and pair batches are image_size, test batches are larger in
    the paper / reference_code pipelines (they test on the whole 256/224-scaled image)."""
    size, recs = (56, 28), tiny_split.train[:4]
    test_size = size if augment == "pad_crop" else pre_crop_size(size)
    train = next(iter(train_loader(recs, [[0, 1]], size, workers=0, augment=augment)))
    pairs = next(iter(pair_loader(recs, np.array([[0, 1, 0, 1]]), [[0]], size, workers=0, augment=augment)))
    test = next(iter(make_test_loader(recs, size, batch_size=2, workers=0, augment=augment)))
    assert train["img"].shape == (2, 3, *size) and pairs["img1"].shape == pairs["img2"].shape == (1, 3, *size)
    assert test["img"].shape == (2, 3, *test_size)


def test_loaders_reject_a_bad_augment(tiny_split):
    recs = tiny_split.train[:2]
    for build in (lambda: train_loader(recs, [[0, 1]], (32, 16), workers=0, augment="bad"),
                  lambda: pair_loader(recs, np.zeros((1, 4), np.int64), [[0]], (32, 16), workers=0, augment="bad"),
                  lambda: make_test_loader(recs, (32, 16), batch_size=2, workers=0, augment="bad")):
        with pytest.raises(ValueError, match="reid.augment='bad'"):
            build()
