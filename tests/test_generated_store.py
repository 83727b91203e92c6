
import numpy as np
import pytest
from PIL import Image

from datasets.generated import GeneratedStore


def _imgs(n, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(n, 16, 8, 3), dtype=np.uint8)


def test_write_finalize_read(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=7, image_size=(16, 8), meta={"gan": "abc"}, chunk_size=3)
    assert store.num_chunks == 3 and store.missing_chunks() == [0, 1, 2] and not store.complete
    for c in range(3):
        a, b = store.chunk_range(c)
        store.write_chunk(c, _imgs(b - a, c))
    store.finalize()
    again = GeneratedStore(tmp_path / "g")
    assert again.complete and again.verify() == []
    recs = again.records()
    assert len(recs) == 7 and all(r.generated and r.label == -1 for r in recs)
    assert [r.gen_row for r in again.records(4)] == [0, 1, 2, 3]
    with Image.open(recs[6].path) as im:
        assert im.size == (8, 16)
    with pytest.raises(ValueError, match="labels.num_gan=8"):
        again.records(8)


def test_interrupted_store_is_not_complete(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={}, chunk_size=2)
    store.write_chunk(0, _imgs(2))
    with pytest.raises(RuntimeError, match="not written yet"):
        store.finalize()
    reopened = GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={}, chunk_size=2)
    assert reopened.missing_chunks() == [1, 2] and not reopened.complete
    with pytest.raises(RuntimeError, match="incomplete"):
        reopened.records()


def test_other_settings_are_refused(tmp_path):
    GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={"gan": "a"})
    with pytest.raises(ValueError, match="other settings"):
        GeneratedStore.create(tmp_path / "g", n=5, image_size=(16, 8), meta={"gan": "b"})


def test_verify_detects_missing_files(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=3, image_size=(16, 8), meta={}, chunk_size=3)
    store.write_chunk(0, _imgs(3))
    store.finalize()
    store.image_path(1).unlink()
    assert "1 image files missing" in store.verify()[0]


def test_bad_chunk_shape(tmp_path):
    store = GeneratedStore.create(tmp_path / "g", n=3, image_size=(16, 8), meta={}, chunk_size=3)
    with pytest.raises(ValueError, match="chunk 0 needs uint8"):
        store.write_chunk(0, _imgs(2))


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


def test_corrupt_store_json(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "store.json").write_text("{nope")
    with pytest.raises(ValueError, match="corrupt"):
        GeneratedStore(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="store.json"):
        GeneratedStore(tmp_path / "none")
