"""The decoded-cache data path: the cache's lookup and rebuild, the one persistent loader, no image file opened
after the first epoch, and the decode stage."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.decoded_cache import FileRows, decoded_rows, keys_path
from datasets.records import hold_out
from orchestrator.stage_cache import DatasetOut, Paths, StageResult, run_stage
from orchestrator.stages import Plan, StageNode, decode_node
from trainables.config import ReidInputs, cache_size
from trainables.reid import loop as reid_loop
from trainables.reid.data import epoch_batches, train_loader
from trainables.reid.loop import run_spec, train_reid

SIZE = (32, 16)


def test_build_cache_writes_the_decoded_rows_once(tiny_split, tmp_path):
    from datasets.decoded_cache import build_cache, cache_path

    train, size = tiny_split.train, (48, 24)  # a real resize (the images are 64x32)
    path = build_cache(train, size, tmp_path, workers=2)
    assert path == cache_path(tmp_path, train, size) and np.load(path, mmap_mode="r").shape == (len(train), 48, 24, 3)
    mtime = path.stat().st_mtime_ns
    assert build_cache(train, size, tmp_path) == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert np.array_equal(np.load(path), FileRows(train, size).take(range(len(train))))


def test_cached_rows_in_dataloader_workers(tiny_split, tmp_path):
    """The rows travel to DataLoader workers without their memory maps and open them there."""
    from torch.utils.data import DataLoader

    from datasets.decoded_cache import DecodedDataset, as_batch

    train = tiny_split.train[:8]
    rows = decoded_rows(train, SIZE, tmp_path)
    loader = DataLoader(DecodedDataset(train, rows), batch_sampler=[list(range(8))], num_workers=1, collate_fn=as_batch)
    batch = next(iter(loader))
    assert batch["img"].shape == (8, *SIZE, 3) and batch["img"].dtype == torch.uint8
    assert np.array_equal(batch["img"].numpy(), rows.take(range(8)))


def test_cache_finds_subsets_and_rebuilds_only_changed_images(tmp_path, tiny_split):
    train = tiny_split.train
    rows = decoded_rows(train, SIZE, tmp_path)
    assert len(rows.files) == 1 and keys_path(rows.files[0]).is_file()
    sub, _ = hold_out(tiny_split, 1, np.random.default_rng(0))  # a subset, relabelled: the same file and rows
    again = decoded_rows(sub.train, SIZE, tmp_path, build=False)
    assert again.files == rows.files
    paths = [r.path for r in train]
    assert np.array_equal(again.take([0, 3]), rows.take([paths.index(sub.train[i].path) for i in (0, 3)]))
    st = os.stat(train[0].path)
    os.utime(train[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "changed": rebuilt alone
    with pytest.raises(FileNotFoundError, match="lacks 1 of"):
        decoded_rows(train, SIZE, tmp_path, build=False)
    fresh = decoded_rows(train, SIZE, tmp_path)
    assert len(fresh.files) == 2 and fresh.file[0] != fresh.file[1]
    want = np.asarray(Image.open(train[0].path).convert("RGB").resize(SIZE[::-1], Image.BICUBIC))
    assert np.array_equal(fresh.take([0])[0], want)


def test_one_persistent_loader_keeps_each_epochs_batch_order(tmp_path, tiny_split):
    train = tiny_split.train
    rows = decoded_rows(train, SIZE, tmp_path)
    loader = train_loader(train, rows, SIZE, device=torch.device("cpu"), workers=1)
    pids, seen = set(), []
    for epoch in range(3):
        batches = epoch_batches(len(train), 0, 8, gen_fraction=None, rng=np.random.default_rng([5, epoch]))
        got = [b["index"].tolist() for b in loader.epoch(batches, epoch)]
        assert got == batches and len(loader) == len(batches)
        pids |= {w.pid for w in loader.loader._iterator._workers}
        seen.append(batches)
    assert len(pids) == 1  # the same worker process every epoch
    first = [b["img"] for b in loader.epoch(seen[0], 0)]
    again = [b["img"] for b in loader.epoch(seen[0], 0)]  # a replayed epoch: the same crops and flips
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].dtype == torch.float32 and first[0].shape == (8, 3, *SIZE)


def test_cached_rows_are_the_files_decoded(tmp_path, tiny_split):
    """The cache holds exactly what decoding the files gives (paper: at the pre-crop size), so both data paths feed
    the one device pipeline the same pixels."""
    recs = tiny_split.query[:4]
    for augment in ("pad_crop", "paper"):
        size = cache_size(SIZE, augment)
        rows = decoded_rows(recs, size, tmp_path)
        assert rows.take(range(4)).shape == (4, *size, 3)
        assert np.array_equal(rows.take(range(4)), FileRows(recs, size).take(range(4)))


@pytest.mark.parametrize("model", ["ident", "twostream"])
def test_no_image_file_is_opened_after_the_first_epoch(model, tmp_path, tiny_root, tiny_store, tiny_cfg,
                                                       monkeypatch):
    opened: list[tuple[int, str]] = []
    state = {"epoch": -1, "on": True}

    def hook(event, args):
        if event == "open" and state["on"] and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append((state["epoch"], os.fsdecode(args[0])))

    sys.addaudithook(hook)  # cannot be removed: switched off at the end
    real = reid_loop.train_one_epoch

    def counting(*a, epoch, **kw):
        state["epoch"] = epoch
        return real(*a, epoch=epoch, **kw)

    monkeypatch.setattr(reid_loop, "train_one_epoch", counting)
    cfg = tiny_cfg("reid.epochs=2", f"reid.model={model}", "labels.method=lsro", "labels.num_gan=8")
    try:
        res = train_reid(cfg.reid, cfg.labels, ReidInputs(str(tiny_root), str(tiny_store.root)),
                         run_spec(cfg.reid, tmp_path / "runs", "r", num_workers=0))
    finally:
        state["on"] = False
    images = [(e, p) for e, p in opened if p.endswith((".jpg", ".png")) or str(tiny_store.root) in p]
    assert any(e <= 0 for e, _ in images)  # epoch 0 (and before) decoded them into the cache
    assert [p for e, p in images if e >= 1] == []
    assert (tmp_path / "runs" / "decoded").is_dir() and 0 <= res.rank1 <= 1


def test_decode_stage_builds_once_and_its_check_wants_every_file(tmp_path, tiny_root, tiny_split, tiny_cfg):
    cfg = tiny_cfg()
    src = StageNode("dataset", "k", DatasetOut, (), {}, lambda folder: None)
    node = decode_node(cfg, src, str(tmp_path / "decoded"), {"CPU": 1})
    data = StageResult("dataset", "k", tmp_path, True, DatasetOut(str(tiny_root), ""))

    def run():
        return run_stage(Paths(tmp_path), node.stage, node.key, node.kind, lambda f: node.build(f, data), node.check)

    res = run()
    assert not res.cached and len(res.out.files) == 3 and res.out.size == SIZE
    assert res.out.images == len(tiny_split.train) + len(tiny_split.query) + len(tiny_split.gallery)
    assert run().cached
    Path(res.out.files[0]).unlink()
    assert node.check(res.path, res.out) and not run().cached  # a missing file: rebuilt
    plan = Plan({}, "data", "", generate="gen", decoded="dec", decoded_gen="decg", smprl={0: "sm"})
    assert plan.needs("lsro", 0) == ("data", "dec", "gen", "decg") and plan.needs("baseline_matched", 0) == (
        "data", "dec")
    assert plan.needs("smprl", 0) == ("data", "dec", "decg", "sm")
