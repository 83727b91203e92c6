"""datasets/pools.py: the synthetic_ids and folder pools, written into generated-image stores like a DCGAN pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import pools
from datasets.generated import GeneratedStore
from datasets.images import read_record
from datasets.market1501 import load
from datasets.synthetic import plan
from trainables.config import DatasetConfig


def _tiny_cfg(tiny_params: dict, **kw) -> DatasetConfig:
    """The DatasetConfig of the conftest's tiny synthetic dataset."""
    p = tiny_params
    return DatasetConfig(synthetic_ids=p["ids"], synthetic_images_per_id=p["images_per_id"],
                         synthetic_distractors=p["distractors"], synthetic_junk=p["junk"],
                         synthetic_size=p["size"], synthetic_seed=p["seed"], **kw)


def _pixels(store: GeneratedStore) -> np.ndarray:
    return np.stack([np.asarray(read_record(r)) for r in store.records()])


def _shard_bytes(store: GeneratedStore) -> list[bytes]:
    return [store.shard_path(c).read_bytes() for c in range(store.num_chunks)]


# -------------------------------------------------------------------------------------------- synthetic_ids

def test_module_is_light():
    out = subprocess.run([sys.executable, "-c", "import datasets.pools, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False"
    assert pools.POOLS == ("gan", "synthetic_ids", "folder")


def test_synthetic_ids_pool_store(tmp_path, tiny_params):
    args = pools.synthetic_ids_args(_tiny_cfg(tiny_params))
    store = pools.write_synthetic_ids_pool(tmp_path / "a", 130, (32, 16), workers=1, **args)
    assert store.complete and store.verify() == [] and store.n == 130 and store.num_chunks == 2
    assert store.image_size == (32, 16) and len(store.records()) == 130
    x = _pixels(store)
    assert x.shape == (130, 32, 16, 3) and x.dtype == np.uint8
    assert len({im.tobytes() for im in x}) == 130 and x.std(axis=(1, 2, 3)).min() > 5  # all distinct, none flat
    meta = store.info["meta"]
    assert (meta["pool"], meta["seed"], meta["first_pid"], meta["ids"]) == ("synthetic_ids", 3, 13, 22)
    assert meta["images_per_id"] == 6 and meta["source_size"] == [64, 32] and meta["dataset"] == args["dataset"]
    np.testing.assert_array_equal(pools.synthetic_ids_pids(store), 13 + np.arange(130) // 6)
    # deterministic: byte-identical, whatever the number of processes; reopened when complete
    again = pools.write_synthetic_ids_pool(tmp_path / "b", 130, (32, 16), workers=2, **args)
    assert _shard_bytes(again) == _shard_bytes(store)
    assert (tmp_path / "a" / "store.json").read_bytes() == (tmp_path / "b" / "store.json").read_bytes()
    assert pools.write_synthetic_ids_pool(tmp_path / "a", 130, (32, 16), **args).complete
    # the first m images of a pool of n are the pool of m
    small = pools.write_synthetic_ids_pool(tmp_path / "c", 7, (32, 16), workers=1, **args)
    np.testing.assert_array_equal(_pixels(small), x[:7])


def test_synthetic_ids_disjoint_from_dataset(tmp_path, tiny_root, tiny_params):
    """New pids above the dataset's; no new person equals a dataset person; no image equals a dataset image."""
    split = load(tiny_root)
    args = pools.synthetic_ids_args(_tiny_cfg(tiny_params))
    size = tuple(tiny_params["size"])
    store = pools.write_synthetic_ids_pool(tmp_path / "s", 60, (32, 16), workers=1, **args)
    data_pids = {r.pid for r in (*split.train, *split.query, *split.gallery)}
    assert max(data_pids) == 2 * tiny_params["ids"] == args["first_pid"] - 1 and args["source_size"] == size
    assert not set(pools.synthetic_ids_pids(store).tolist()) & data_pids
    # the persons: plan()'s own, and the new ones differ from each in a visible attribute
    kw = {k: tiny_params[k] for k in ("ids", "images_per_id", "distractors", "junk")}
    persons, cameras, _ = plan(**kw, seed=tiny_params["seed"])
    assert pools.dataset_persons(args["seed"], args["dataset"]) == (persons, cameras)
    new = pools.draw_identities(store.info["meta"]["ids"], args["seed"], persons)
    assert not {pools.person_key(p) for p in new} & {pools.person_key(p) for p in persons}
    # pixels: every dataset image (a JPEG at source_size) through the same resize
    real = {pools.resize_rgb(Image.open(r.path), (32, 16)).tobytes()
            for r in (*split.train, *split.query, *split.gallery)}
    assert not {im.tobytes() for im in _pixels(store)} & real
    # without the dataset's arguments: the same cameras (plan's first draws), only the exclusion is left out
    alone = pools.write_synthetic_ids_pool(tmp_path / "alone", 12, (32, 16), workers=1,
                                           **{**args, "dataset": None})
    np.testing.assert_array_equal(_pixels(alone), _pixels(store)[:12])


def test_draw_identities_redraws_an_excluded_person():
    plain = pools.draw_identities(8, 5)
    avoid = pools.draw_identities(8, 5, exclude=plain)  # the same stream would repeat every one of them
    assert not {pools.person_key(p) for p in avoid} & {pools.person_key(p) for p in plain}
    assert pools.draw_identities(8, 5) == plain


def test_synthetic_ids_args(tiny_root, tiny_params):
    market = pools.synthetic_ids_args(DatasetConfig(synthetic_counts="market1501", synthetic_size=(32, 16)))
    assert market == {"source_size": (32, 16), "seed": 0, "first_pid": 751 + 750 + 1,
                      "dataset": {"counts": "market1501"}}
    plain = pools.synthetic_ids_args(DatasetConfig(synthetic_ids=30, synthetic_test_ids=40, synthetic_seed=2))
    assert plain["first_pid"] == 71 and plain["seed"] == 2 and plain["source_size"] == (128, 64)
    assert plain["dataset"] == {"ids": 30, "test_ids": 40, "images_per_id": 10, "distractors": 40, "junk": 30}
    # a given synthetic root: its marker's arguments, the same as the config that drew it
    given = pools.synthetic_ids_args(DatasetConfig(root=str(tiny_root), synthetic_ids=99))
    assert given == pools.synthetic_ids_args(_tiny_cfg(tiny_params))
    with pytest.raises(ValueError, match=r"dataset.name=synthetic.*labels.pool=folder with labels.pool_root="):
        pools.synthetic_ids_args(DatasetConfig(name="market1501", root="/data/market"))
    with pytest.raises(ValueError, match="first_pid=12 is a pid of the dataset"):
        pools.write_synthetic_ids_pool(Path("/nonexistent"), 5, (32, 16), **{**market, "first_pid": 12,
                                                                            "dataset": plain["dataset"]})


# -------------------------------------------------------------------------------------------- folder

def _image_folder(root: Path) -> list[tuple[str, np.ndarray]]:
    """PNGs and JPGs of different sizes in nested folders, plus files the pool must skip; returns (relative name,
    pixels) of the images in the pool's order."""
    rng = np.random.default_rng(0)
    made = []
    for rel, (h, w), fmt in [("b/z.PNG", (40, 20), "PNG"), ("a/deep/er/1.jpg", (64, 32), "JPEG"),
                             ("a.png", (10, 30), "PNG"), ("b/a.jpeg", (32, 16), "JPEG"), ("c.bmp", (50, 25), "BMP"),
                             ("a/2.Jpg", (17, 9), "JPEG")]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
        made.append(rel)
    Image.new("L", (12, 24), 128).save(root / "a" / "grey.png")  # converted to RGB
    made.append("a/grey.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "skip.png")
    Image.new("RGB", (8, 8)).save(root / "._skip.jpg")
    order = sorted(made)
    return [(rel, np.asarray(Image.open(root / rel).convert("RGB").resize((16, 32), Image.BICUBIC)))
            for rel in order]


def test_folder_pool(tmp_path):
    expected = _image_folder(tmp_path / "imgs")
    assert [rel for rel, _ in expected][:3] == ["a.png", "a/2.Jpg", "a/deep/er/1.jpg"]
    files = pools.check_folder_pool(tmp_path / "imgs", 5)
    assert [p.relative_to(tmp_path / "imgs").as_posix() for p in files] == [rel for rel, _ in expected[:5]]
    store = pools.write_folder_pool(tmp_path / "store", 6, (32, 16), tmp_path / "imgs", threads=2)
    assert store.complete and store.verify() == [] and store.n == 6 and store.image_size == (32, 16)
    np.testing.assert_array_equal(_pixels(store), np.stack([x for _, x in expected[:6]]))
    meta = store.info["meta"]
    used = pools.check_folder_pool(tmp_path / "imgs", 6)
    assert meta == {"pool": "folder", "root": str((tmp_path / "imgs").resolve()), "files": 6,
                    "sha256": pools.folder_digest(tmp_path / "imgs", used), "resize": "bicubic"}
    # the same files: reopened; other bytes under the same names: another digest, refused (never reused)
    assert pools.write_folder_pool(tmp_path / "store", 6, (32, 16), tmp_path / "imgs").complete
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match="other settings"):
        pools.write_folder_pool(tmp_path / "store", 6, (32, 16), tmp_path / "imgs")


def test_folder_pool_too_few_and_missing(tmp_path):
    _image_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"labels.pool_root=.*imgs.* holds 7 image files.*fewer than the 8"):
        pools.check_folder_pool(tmp_path / "imgs", 8)
    with pytest.raises(ValueError, match=r"labels.pool_root=.*nowhere does not exist"):
        pools.check_folder_pool(tmp_path / "nowhere", 1)
    with pytest.raises(ValueError, match=r"labels.pool_root=.*notes.txt is not a folder"):
        pools.write_folder_pool(tmp_path / "store", 1, (32, 16), tmp_path / "imgs" / "notes.txt")
    assert not (tmp_path / "store").exists()


def test_folder_pool_corrupt_file(tmp_path):
    _image_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "a" / "x.jpg"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=f"{bad}.*cannot be decoded|cannot be decoded.*{bad}"):
        pools.write_folder_pool(tmp_path / "store", 8, (32, 16), tmp_path / "imgs")
    assert not (tmp_path / "store" / "store.json").exists()  # refused before any store is written


def test_folder_pool_failure_mid_write_is_never_complete(tmp_path, monkeypatch):
    """A file that goes bad after the check: ValueError naming it, and the store stays unfinalized."""
    _image_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "c.bmp"
    bad.write_bytes(b"BM not really")
    monkeypatch.setattr(pools, "_read_checked", lambda path: (path.read_bytes(), None))
    with pytest.raises(ValueError, match=f"{bad}"):
        pools.write_folder_pool(tmp_path / "store", 7, (32, 16), tmp_path / "imgs")
    store = GeneratedStore(tmp_path / "store")
    assert not store.complete and store.missing_chunks() == [0]
    with pytest.raises(RuntimeError, match="incomplete"):
        store.records()
    assert json.loads((tmp_path / "store" / "store.json").read_text())["complete"] is False


def test_the_pool_names_are_the_configs():
    from datasets.pools import POOLS
    from trainables.config import POOLS as CONFIG_POOLS

    assert POOLS == CONFIG_POOLS  # datasets/ cannot import trainables/ (tests/test_layers.py)


def test_a_changed_folder_is_a_new_pool(tmp_path):
    from datasets.pools import folder_listing

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 16), (10 * i, 0, 0)).save(root / f"{i}.png")
    before = folder_listing(root, 3)
    assert folder_listing(root, 3) == before and folder_listing(root, 2) != before
    Image.new("RGB", (8, 17), (99, 0, 0)).save(root / "1.png")
    assert folder_listing(root, 3) != before
