import json
import os

import numpy as np
import pytest
from PIL import Image

from datasets.generated import GeneratedStore
from datasets.images import read_record
from datasets.records import Record


def _imgs(n, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(n, 16, 8, 3), dtype=np.uint8)


def _filled(root, n=7, chunk_size=3):
    store = GeneratedStore.create(root, n=n, image_size=(16, 8), meta={"gan": "abc"}, chunk_size=chunk_size)
    for c in store.missing_chunks():
        a, b = store.chunk_range(c)
        store.write_chunk(c, _imgs(b - a, c))
    store.finalize()
    return store


def test_write_finalize_read(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=7, image_size=(16, 8), meta={"gan": "abc"}, chunk_size=3)
    assert store.num_chunks == 3 and store.missing_chunks() == [0, 1, 2] and not store.complete
    _filled(tmp_path / "g")
    again = GeneratedStore(tmp_path / "g")
    assert again.complete and again.verify() == [] and again.info["format"] == 2
    assert sorted(p.name for p in (tmp_path / "g" / "shards").iterdir()) == ["00000.npy", "00001.npy", "00002.npy"]
    recs = again.records()
    assert len(recs) == 7 and all(r.generated and r.label == -1 and r.pid == -1 for r in recs)
    assert [r.gen_row for r in again.records(4)] == [0, 1, 2, 3]
    assert [(r.path, r.shard_row) for r in recs[2:5]] == [
        (str(again.shard_path(0)), 2), (str(again.shard_path(1)), 0), (str(again.shard_path(1)), 1)]
    expected = np.concatenate([_imgs(3, 0), _imgs(3, 1), _imgs(1, 2)])
    for r in recs:  # every image read back equals what was written (lossless)
        img = read_record(r)
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), expected[r.gen_row])
    with pytest.raises(ValueError, match="labels.num_gan=8"):
        again.records(8)


def test_read_record_of_an_image_file(tmp_path):
    arr = _imgs(1)[0]
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = read_record(Record(path=str(tmp_path / "a.png"), pid=1, camid=0))
    assert np.array_equal(np.asarray(img), arr)
    with pytest.raises(OSError, match="b.png"):
        read_record(Record(path=str(tmp_path / "b.png"), pid=1, camid=0))


def test_read_record_notices_a_replaced_shard_and_bad_rows(tmp_path):
    store = _filled(tmp_path / "g", n=3, chunk_size=3)
    r = store.records()[1]
    first = np.asarray(read_record(r))
    np.save(tmp_path / "new.npy", _imgs(3, seed=9))
    os.replace(tmp_path / "new.npy", store.shard_path(0))  # regenerated under the same name
    assert np.array_equal(np.asarray(read_record(r)), _imgs(3, seed=9)[1]) and not np.array_equal(first, _imgs(3, 9)[1])
    with pytest.raises(OSError, match="row 5"):
        read_record(Record(path=r.path, pid=-1, camid=-1, generated=True, shard_row=5))


def test_interrupted_store_is_not_complete_and_temp_files_never_count(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={}, chunk_size=2)
    store.write_chunk(0, _imgs(2))
    (tmp_path / "g" / "shards" / ".00001.npy.abc123").write_bytes(b"half a shard")  # a writer killed mid-write
    with pytest.raises(RuntimeError, match="not written yet"):
        store.finalize()
    reopened = GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={}, chunk_size=2)
    assert reopened.missing_chunks() == [1, 2] and not reopened.complete
    with pytest.raises(RuntimeError, match="incomplete"):
        reopened.records()
    reopened.write_chunk(1, _imgs(2))
    reopened.write_chunk(2, _imgs(1))
    reopened.finalize()
    assert reopened.complete and reopened.verify() == []
    assert sorted(p.name for p in (tmp_path / "g" / "shards").iterdir()) == ["00000.npy", "00001.npy", "00002.npy"]


def test_other_settings_are_refused(tmp_path):
    GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={"gan": "a"})
    with pytest.raises(ValueError, match="other settings"):
        GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={"gan": "b"})


def test_old_layout_is_refused_and_never_overwritten(tmp_path):
    root = tmp_path / "g"
    (root / "images").mkdir(parents=True)
    old = {"n": 5, "chunk_size": 500, "image_size": [16, 8], "meta": {}, "complete": True}
    (root / "store.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"old one-JPEG-per-image layout.*delete .*g to regenerate"):
        GeneratedStore(root)
    with pytest.raises(ValueError, match="old one-JPEG-per-image layout"):
        GeneratedStore.create(root, n=5, image_size=(16, 8), meta={})
    assert json.loads((root / "store.json").read_text()) == old and not (root / "shards").exists()


def test_verify_finds_missing_and_truncated_shards(tmp_path):
    store = _filled(tmp_path / "g", n=7, chunk_size=3)
    shard = store.shard_path(1)
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) - 10])
    problems = store.verify()
    assert len(problems) == 1 and "1 of 3 shards" in problems[0] and "00001.npy cannot be read" in problems[0]
    shard.write_bytes(data)
    assert store.verify() == []
    store.shard_path(2).unlink()
    assert "00002.npy is missing" in store.verify()[0]
    np.save(store.shard_path(2), _imgs(2))  # a shard of the wrong length
    assert "expected uint8 [1, 16, 8, 3]" in store.verify()[0]


def test_bad_chunk_shape(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=3, image_size=(16, 8), meta={}, chunk_size=3)
    with pytest.raises(ValueError, match="chunk 0 needs uint8"):
        store.write_chunk(0, _imgs(2))
    with pytest.raises(ValueError, match=r"image_size \[16, 8\]"):
        store.write_chunk(0, np.zeros((3, 8, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        store.write_chunk(1, _imgs(3))
    assert store.missing_chunks() == [0]


def test_labels_round_trip_and_damage(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=4, image_size=(16, 8), meta={}, chunk_size=4)
    ranks = np.stack([np.random.default_rng(i).permutation(5) + 1 for i in range(4)]).astype(np.uint16)
    assert store.read_labels("smprl-x") is None
    path = store.write_labels("smprl-x", ranks, {"baseline": "run1"})
    got, meta = store.read_labels("smprl-x")
    assert np.array_equal(got, ranks) and got.dtype == np.uint16 and meta == {"baseline": "run1"}
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="damaged"):
        store.read_labels("smprl-x")
    with pytest.raises(ValueError, match=r"expected \[4, K\]"):
        store.write_labels("bad", ranks[:2], {})
    ranks[2, :2] = 1  # not a permutation: refused when read, naming the file
    store.write_labels("smprl-x", ranks, {})
    with pytest.raises(ValueError, match=r"smprl-x.npz: a row of ranks is not a permutation of 1..5"):
        store.read_labels("smprl-x")


def test_corrupt_store_json(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "store.json").write_text("{nope")
    with pytest.raises(ValueError, match="corrupt"):
        GeneratedStore(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="store.json"):
        GeneratedStore(tmp_path / "none")


def test_decoded_cache_of_shard_records(tmp_path):
    from datasets.decoded_cache import FileRows, build_cache, cache_path

    recs = _filled(tmp_path / "g", n=7, chunk_size=3).records()
    assert cache_path(tmp_path, recs[:2], (16, 8)) != cache_path(tmp_path, (recs[0], recs[0]), (16, 8))
    file = build_cache(recs, (16, 8), tmp_path / "cache")
    expected = np.concatenate([_imgs(3, 0), _imgs(3, 1), _imgs(1, 2)])
    assert np.array_equal(np.load(file), expected)  # same size: the bicubic resize is the identity
    assert np.array_equal(FileRows(recs, (16, 8)).take(range(len(recs))), expected)  # the same rows, no cache


def test_shard_records_are_read_in_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    from datasets.decoded_cache import DecodedDataset, FileRows, as_batch

    recs = _filled(tmp_path / "g", n=7, chunk_size=3).records()
    data = DecodedDataset(recs, FileRows(recs, (16, 8)))
    batches = list(DataLoader(data, batch_sampler=[[0, 1, 2, 3], [4, 5, 6]], num_workers=2, collate_fn=as_batch))
    got = np.concatenate([b["img"].numpy() for b in batches])
    assert np.array_equal(got, np.concatenate([_imgs(3, 0), _imgs(3, 1), _imgs(1, 2)]))
    assert [int(i) for b in batches for i in b["gen_row"]] == list(range(7))
