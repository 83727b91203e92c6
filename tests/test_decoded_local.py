"""The decoded cache on a cluster: node-local copies of its files (``datasets.local_copy``) and the trusted read of
a folder the decode stage filled and checked (no stat per image file)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from datasets import local_copy as lc
from datasets.decoded_cache import CacheDir, build_cache, decoded_rows, fingerprint, image_rows
from datasets.generated import GeneratedStore
from datasets.market1501 import load
from orchestrator.stage_cache import DatasetOut, DecodedOut, Paths, StageNode, StageResult, lookup, run_stage
from orchestrator.stages import baseline_key, decode_node
from trainables.config import ReidInputs
from trainables.reid.loop import _cache_dir

SIZE = (32, 16)
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def copies(monkeypatch) -> list[str]:
    """The copies ``local_copy`` makes (slowed down, so that concurrent readers overlap)."""
    made: list[str] = []
    real = lc._copy

    def slow(shared, tmp):
        made.append(str(shared))
        time.sleep(0.2)
        real(shared, tmp)

    monkeypatch.setattr(lc, "_copy", slow)
    return made


def _own_dataset(tiny_root: Path, tmp_path: Path):
    """A private copy of the tiny dataset (its files may be changed or deleted) and its split."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    return root, load(root)


def test_a_cache_file_is_copied_once_for_concurrent_readers_and_read_locally(tiny_split, tmp_path, copies):
    shared, local = tmp_path / "shared", tmp_path / "local"
    train = tiny_split.train
    plain = decoded_rows(train, SIZE, shared)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(decoded_rows(train, SIZE, shared, local_dir=str(local))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(copies) == 1 and len(got) == 4
    name = Path(plain.files[0]).name
    assert all(rows.files == (str(local / name),) for rows in got)  # the rows map the local file
    assert (local / name).read_bytes() == Path(plain.files[0]).read_bytes()
    everything = range(len(train))
    assert all(np.array_equal(rows.take(everything), plain.take(everything)) for rows in got)
    assert [p.name for p in local.iterdir() if ".tmp-" in p.name] == []


def _copy_in_child(args: tuple[str, str, str]) -> str:
    shared, folder, log = args

    def logged(src, tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.2)
        shutil.copyfile(src, tmp)

    lc._copy = logged  # this forked process's module
    return lc.local_copy(shared, folder)


def test_processes_on_one_node_copy_once(tiny_split, tmp_path):
    shared = build_cache(tiny_split.query, SIZE, tmp_path / "shared")
    log = tmp_path / "copies.log"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        paths = pool.map(_copy_in_child, [(str(shared), str(tmp_path / "local"), str(log))] * 3)
    assert set(paths) == {str(tmp_path / "local" / shared.name)} and len(log.read_text().split()) == 1


def test_a_disk_without_room_falls_back_to_the_shared_file(tiny_split, tmp_path, monkeypatch, capsys, copies):
    shared = build_cache(tiny_split.train, SIZE, tmp_path / "shared")
    monkeypatch.setattr(lc.shutil, "disk_usage", lambda path: Usage(10 * lc.RESERVE, 10 * lc.RESERVE, lc.RESERVE))
    rows = decoded_rows(tiny_split.train, SIZE, tmp_path / "shared", local_dir=str(tmp_path / "local"))
    assert rows.files == (str(shared),) and copies == []
    assert "too little" in capsys.readouterr().out and not (tmp_path / "local" / shared.name).exists()


def test_a_bad_local_copy_is_detected_and_replaced(tiny_split, tmp_path, copies):
    shared = build_cache(tiny_split.train, SIZE, tmp_path / "shared")
    local = Path(lc.local_copy(shared, tmp_path / "local"))
    assert lc.local_copy(shared, tmp_path / "local") == str(local) and len(copies) == 1  # found: reused
    good = shared.read_bytes()
    damage = {"partial": good[: len(good) // 2],  # size
              "other rows": good[:-10] + bytes(10),  # same size, last row differs
              "other header": np.lib.format.magic(1, 0) + b"junk" + good[12:]}  # same size, no header
    for why, data in damage.items():
        local.write_bytes(data)
        assert lc.problem(local, shared) is not None, why
        assert lc.local_copy(shared, tmp_path / "local") == str(local)
        assert local.read_bytes() == good, why
    assert len(copies) == 1 + len(damage)
    (tmp_path / "local" / f".{shared.name}.tmp-999").write_bytes(b"left by a killed copy")
    local.unlink()
    lc.local_copy(shared, tmp_path / "local")
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [shared.name, f"{shared.name}.lock"]


def test_a_failed_copy_falls_back_to_the_shared_file(tiny_split, tmp_path, monkeypatch, capsys):
    shared = build_cache(tiny_split.train, SIZE, tmp_path / "shared")

    def broken(src, tmp):
        Path(tmp).write_bytes(b"x")
        raise OSError("No space left on device")

    monkeypatch.setattr(lc, "_copy", broken)
    assert lc.local_copy(shared, tmp_path / "local") == str(shared)
    assert "No space left" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "local").iterdir()] == [f"{shared.name}.lock"]


def test_the_local_folder_setting(monkeypatch):
    monkeypatch.delenv(lc.LOCAL_CACHE_ENV, raising=False)
    assert lc.local_dir("") is None and lc.local_dir("/nvme/x") == "/nvme/x"
    monkeypatch.setenv(lc.LOCAL_CACHE_ENV, "/tmp/mprl-decoded")
    assert lc.local_dir("") == "/tmp/mprl-decoded" and lc.local_dir("/nvme/x") == "/nvme/x"
    assert lc.local_dir("none") is None


def test_a_sweeps_cache_is_trusted_and_a_single_runs_is_checked(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(lc.LOCAL_CACHE_ENV, str(tmp_path / "local"))
    reid = tiny_cfg().reid
    assert _cache_dir(reid, ReidInputs("d", cache_dir="/shared/decoded"), str(tmp_path / "runs" / "r")) == CacheDir(
        "/shared/decoded", trusted=True, local_dir=str(tmp_path / "local"))
    assert _cache_dir(reid, ReidInputs("d"), str(tmp_path / "runs" / "r")) == CacheDir(
        str(tmp_path / "runs" / "decoded"), local_dir=str(tmp_path / "local"))
    off = tiny_cfg("reid.local_cache_dir=none")
    assert _cache_dir(off.reid, ReidInputs("d"), "r").local_dir is None
    assert baseline_key(off) == baseline_key(tiny_cfg())  # where the cache is read from: no stage key


def _image_stats(monkeypatch, paths: set[str]) -> list[str]:
    """The os.stat calls on ``paths`` from now on."""
    seen: list[str] = []
    real = os.stat

    def counting(path, *a, **kw):
        if os.fspath(path) in paths:
            seen.append(os.fspath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "stat", counting)
    return seen


def test_a_trusted_read_stats_no_image_file(tiny_root, tmp_path, monkeypatch):
    root, split = _own_dataset(tiny_root, tmp_path)
    records = (*split.train, *split.query)
    built = decoded_rows(records, SIZE, tmp_path / "decoded")
    stats = _image_stats(monkeypatch, {r.path for r in records})
    trusted = image_rows(records, SIZE, CacheDir(str(tmp_path / "decoded"), trusted=True))
    assert stats == [] and trusted.files == built.files
    decoded_rows(records, SIZE, tmp_path / "decoded")
    assert len(stats) == len(records)  # the checked read: one stat per image
    for r in records:  # with the images gone the trusted read still works, the checked one cannot
        os.unlink(r.path)
    everything = range(len(records))
    again = decoded_rows(records, SIZE, tmp_path / "decoded", trusted=True, build=False)
    assert np.array_equal(again.take(everything), built.take(everything))
    with pytest.raises(FileNotFoundError):
        decoded_rows(records, SIZE, tmp_path / "decoded", build=False)


def test_a_trusted_read_still_stats_each_generated_shard_once(tiny_store, tmp_path, monkeypatch):
    records = GeneratedStore(tiny_store.root).records()
    decoded_rows(records, SIZE, tmp_path)
    shards = {r.path for r in records}
    stats = _image_stats(monkeypatch, shards)
    decoded_rows(records, SIZE, tmp_path, trusted=True, build=False)
    assert sorted(stats) == sorted(shards) and len(shards) == 3  # 24 images in shards of 10


def test_the_decode_stage_is_rebuilt_when_an_image_changed(tiny_root, tmp_path, tiny_cfg):
    root, split = _own_dataset(tiny_root, tmp_path)
    src = StageNode("dataset", "k", DatasetOut, (), {}, lambda folder: None)
    node = decode_node(tiny_cfg(), src, str(tmp_path / "decoded"), {"CPU": 1})
    data = StageResult("dataset", "k", tmp_path, True, DatasetOut(str(root), ""))
    paths = Paths(tmp_path)

    def run():
        return run_stage(paths, node.stage, node.key, node.kind, lambda f: node.build(f, data), node.check)

    first = run()
    assert first.out.source == str(root)
    assert first.out.fingerprint == fingerprint([*split.train, *split.query, *split.gallery])
    assert run().cached
    st = os.stat(split.query[0].path)
    os.utime(split.query[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # changed in place
    hit, problems = lookup(paths, node.stage, node.key, node.kind, node.check)
    assert hit is None and problems == [f"the images in {root} changed since it ran"]
    second = run()
    assert not second.cached and second.out.fingerprint != first.out.fingerprint
    assert len(second.out.files) == len(first.out.files) + 1  # the changed image decoded into a file of its own
    old = DecodedOut(first.out.cache_dir, second.out.files, first.out.images, first.out.size)  # no fingerprint
    assert node.check(tmp_path, old) and node.check(tmp_path, second.out) == []
    shutil.rmtree(root)
    assert "cannot be read" in node.check(tmp_path, second.out)[0]


def test_an_unwritable_local_folder_falls_back_to_the_shared_file(tiny_split, tmp_path, capsys):
    shared = build_cache(tiny_split.train, SIZE, tmp_path / "shared")
    (tmp_path / "file").write_text("not a folder")
    assert lc.local_copy(shared, tmp_path / "file" / "local") == str(shared)
    assert "reading it from shared storage" in capsys.readouterr().out
