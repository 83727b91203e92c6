"""Epoch batches and the run's loaders (trainables/reid/data.py) over decoded-cache rows and image-file rows."""

import pytest
import torch

from datasets.decoded_cache import FileRows, decoded_rows
from trainables.config import cache_size
from trainables.reid.data import epoch_batches, eval_loader, train_loader
from trainables.seeding import Stream, numpy_rng

CPU = torch.device("cpu")


def _rng(seed: int, epoch: int):
    return numpy_rng(Stream.REID_BATCHES, seed, epoch)


def test_proportional_epoch_covers_union_once():
    b = epoch_batches(50, 30, 16, gen_fraction=None, rng=_rng(0, 0))
    flat = [i for batch in b for i in batch]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(80)) and len(flat) == 80
    assert b != epoch_batches(50, 30, 16, gen_fraction=None, rng=_rng(0, 1))  # reshuffled per epoch
    assert b == epoch_batches(50, 30, 16, gen_fraction=None, rng=_rng(0, 0))  # deterministic


def test_gen_fraction_gives_exact_mix():
    b = epoch_batches(64, 10, 16, gen_fraction=0.25, rng=_rng(1, 0))
    assert len(b) == 64 // 12 + 1
    for batch in b[:-1]:
        assert sum(i >= 64 for i in batch) == 4 and len(batch) == 16
    real = [i for batch in b for i in batch if i < 64]
    assert sorted(real) == list(range(64))  # one pass over the real images


@pytest.mark.parametrize("world", [2, 4])
def test_shards_partition_the_global_batches(world):
    one = epoch_batches(70, 20, 16, gen_fraction=None, rng=_rng(3, 2))
    shards = [epoch_batches(70, 20, 16, gen_fraction=None, rng=_rng(3, 2), rank=r, world_size=world)
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    for step, batch in enumerate(one[: len(shards[0])]):
        union = sorted(i for s in shards for i in s[step])
        assert set(union) <= set(batch) and len(union) >= len(batch) - world + 1


def test_small_last_batch_dropped_and_divisibility():
    b = epoch_batches(17, 0, 16, gen_fraction=None, rng=_rng(0, 0))
    assert [len(x) for x in b] == [16]
    with pytest.raises(ValueError, match="reid.batch_size=15"):
        epoch_batches(17, 0, 15, gen_fraction=None, rng=_rng(0, 0), world_size=2)


@pytest.mark.parametrize("augment", ["pad_crop", "paper", "reference_code"])
@pytest.mark.parametrize("source", ["files", "cache"])
def test_loaders_pass_augment_to_the_device_pipeline(tiny_split, augment, source, tmp_path):
    """reid.augment reaches the device augmentation: train and pair batches are image_size, normalised floats; test
    batches are larger in the paper / reference_code pipelines (they test on the whole 256/224-scaled image). Rows
    decoded from the files and from the cache give the same test batches."""
    size, recs = (56, 28), tiny_split.train[:4]
    rows = FileRows(recs, cache_size(size, augment))
    if source == "cache":
        rows = decoded_rows(recs, cache_size(size, augment), tmp_path)
    train = next(iter(train_loader(recs, rows, size, device=CPU, workers=0, augment=augment).epoch([[0, 1]], 0)))
    pairs = train_loader(recs, rows, size, device=CPU, workers=0, augment=augment, pairs=True)
    pair = next(iter(pairs.epoch([[(0, 1, 0, 1)]], 0)))
    test = next(iter(eval_loader(recs, rows, batch_size=2, device=CPU, workers=0, augment=augment)))
    assert train["img"].shape == (2, 3, *size) and train["img"].dtype == torch.float32
    assert pair["img1"].shape == pair["img2"].shape == (1, 3, *size) and pair["verif"].tolist() == [True]
    assert test["img"].shape == (2, 3, *cache_size(size, augment))
    files = next(iter(eval_loader(recs, FileRows(recs, rows.image_size), batch_size=2, device=CPU, workers=0,
                                  augment=augment)))
    assert torch.equal(test["img"], files["img"])


def test_loaders_reject_a_bad_augment(tiny_split):
    recs = tiny_split.train[:2]
    rows = FileRows(recs, (32, 16))
    for build in (lambda: train_loader(recs, rows, (32, 16), device=CPU, workers=0, augment="bad"),
                  lambda: eval_loader(recs, rows, batch_size=2, device=CPU, workers=0, augment="bad")):
        with pytest.raises(ValueError, match="reid.augment='bad'"):
            build()
