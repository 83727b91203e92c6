"""Decoded images: a record list's images decoded and resized once into uint8 ``.npy`` memmaps; the rows readers take.

Decoding a JPEG and bicubic-resizing it is most of an input pipeline's work and is deterministic, so
:func:`build_cache` stores its result once (``uint8 [N, H, W, 3]``); the random part (flip, pad, crop) and the
normalisation run on the training device, on whole batches (``trainables.reid.augment``). :class:`DecodedRows`
serves a record list's rows from the cache files; :class:`FileRows` serves the same rows decoded from the image
files on every read (``reid.decoded_cache=false``), so both paths share one augmentation.

The file name hashes the image size and every image's path, byte size and modification time (and, for an image
stored as a row of a generated-image shard, that row), so a changed dataset gets a new file. It is written under
a temporary name and renamed (a reader never sees a partial cache). Memory-mapped, one copy in the page cache
serves every DataLoader worker and every trial on a node. No torch in the file format; ``np.load(path,
mmap_mode="r")`` reads it.

Beside each cache file, ``<name>.keys.json`` lists its rows' images as ``[path, shard_row, bytes, mtime_ns]``
(written before the rename). :func:`decoded_rows` reads those lists to find any record subset (a validation
hold-out, the first ``n`` generated images, repeats) in the files of a cache folder, checks each image's stat
against its row, and builds the missing ones into a new file: training and evaluation open no image file once a
folder holds the images (the decode stage fills it; a single run fills it in-process).

A reader of a folder the decode stage filled (a sweep's baselines and trials: :class:`CacheDir` ``trusted``) skips
that stat for the image files (a round trip to the shared file system each: ~52 k per Market-1501 trial on a
cluster) and matches rows by ``(path, shard_row)`` alone, taking each from the newest keys file that lists it: the
row the stat check would accept. That is sound because the decode stage's check
(``orchestrator.stages.decode_node``, on the driver at every sweep's start) compares :func:`fingerprint` of the
images (every file's bytes and mtime) with the one it recorded and rebuilds the stage when any differs, so the files
are those its build matched against the keys. Not covered: an image changed while a sweep runs, which no stage
notices (the GAN and baselines read the images too). Rows of generated-image shards keep their stat, one per shard
file (a shard rewritten by a rebuilt pool stage keeps its path). ``CacheDir.local_dir`` maps node-local copies of
the files (``datasets.local_copy``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from datasets.images import read_record
from datasets.local_copy import local_copy
from datasets.records import Record

CACHE_VERSION = 1
CHUNK = 256  # images per write job
KEYS = ".keys.json"  # suffix of the row list beside a cache file
STAT_THREADS = 16  # stats in flight at once for many files (each a round trip on NFS / EFS)


@dataclass(frozen=True)
class CacheDir:
    """A decoded-cache folder and how a reader uses it: ``trusted`` when the decode stage filled and checked it (no
    stat of image files: see the module docstring), ``local_dir`` to map node-local copies of its files."""

    path: str
    trusted: bool = False
    local_dir: str | None = None


def _stat_one(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _stats(records: Sequence[Record], trusted: bool = False) -> list[tuple[int, int] | None]:
    """(bytes, mtime_ns) of each record's file; one stat per file (the rows of a shard share it), many in threads.
    With ``trusted`` an image file (not a shard row) is not stat'ed: None."""
    paths = list(dict.fromkeys(r.path for r in records if not (trusted and r.shard_row < 0)))
    if len(paths) < 4 * STAT_THREADS:
        seen = {p: _stat_one(p) for p in paths}
    else:
        with ThreadPoolExecutor(STAT_THREADS) as pool:
            seen = dict(zip(paths, pool.map(_stat_one, paths)))
    return [seen.get(r.path) for r in records]


def fingerprint(records: Sequence[Record]) -> str:
    """A digest of each record's (path, shard_row) and its file's (bytes, mtime_ns), in any order: it changes when an
    image file does. The decode stage records it; its check compares it before trials trust the cache."""
    stamped = sorted({(r.path, r.shard_row): s for r, s in zip(records, _stats(records))}.items())
    digest = hashlib.sha256()
    for (path, row), (size, mtime) in stamped:
        digest.update(f"{path}\0{row}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | Path, records: Sequence[Record], image_size: tuple[int, int]) -> Path:
    """Where the cache of ``records`` at ``image_size`` lives (the name changes when any image file does)."""
    h, w = image_size
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "size": [h, w]}).encode())
    for r, (size, mtime) in zip(records, _stats(records)):
        row = f"\0{r.shard_row}" if r.shard_row >= 0 else ""  # rows of one shard share its path and stat
        digest.update(f"{r.path}\0{size}\0{mtime}{row}\n".encode())
    return Path(cache_dir) / f"decoded-{h}x{w}-{len(records)}-{digest.hexdigest()[:16]}.npy"


def keys_path(cache_file: str | Path) -> Path:
    """The row list beside a cache file."""
    cache_file = Path(cache_file)
    return cache_file.with_name(cache_file.name.removesuffix(".npy") + KEYS)


def decode(records: Sequence[Record], image_size: tuple[int, int]) -> np.ndarray:
    """uint8 [n, H, W, 3]: each image read as RGB and resized to ``image_size`` (bicubic, PIL's antialiasing)."""
    resize = T.Resize(tuple(image_size), interpolation=T.InterpolationMode.BICUBIC)
    return np.stack([np.asarray(resize(read_record(r))) for r in records])


def _fill(job: tuple[str, int, Sequence[Record], tuple[int, int]]) -> int:
    file, start, records, image_size = job
    array = np.load(file, mmap_mode="r+")
    array[start:start + len(records)] = decode(records, image_size)
    array.flush()
    return len(records)


def build_cache(records: Sequence[Record], image_size: tuple[int, int], cache_dir: str | Path, *,
                workers: int = 0) -> Path:
    """Write the cache of ``records`` at ``image_size`` unless it exists; return its path.

    ``workers > 1`` decodes in that many processes (each writes its own rows of the memmap).
    """
    if not records:
        raise ValueError("build_cache needs at least one record")
    path = cache_path(cache_dir, records, image_size)
    if path.is_file():
        if not keys_path(path).is_file():  # written before the row lists existed
            _write_keys(path, records)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    h, w = image_size
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(records), h, w, 3)).flush()
    jobs = [(str(tmp), i, records[i:i + CHUNK], (h, w)) for i in range(0, len(records), CHUNK)]
    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                list(pool.map(_fill, jobs))
        else:
            for job in jobs:
                _fill(job)
        _write_keys(path, records)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_keys(cache_file: Path, records: Sequence[Record]) -> None:
    keys = [[r.path, r.shard_row, size, mtime] for r, (size, mtime) in zip(records, _stats(records))]
    final = keys_path(cache_file)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "keys": keys}))
    os.replace(tmp, final)


class DecodedRows:
    """Where each of a record list's images is: ``files[file[i]]`` row ``row[i]`` (uint8 [H, W, 3]).

    :meth:`take` gathers a batch with one fancy index per file; the memory maps open lazily in each process
    (DataLoader workers) and are never pickled.
    """

    def __init__(self, files: Sequence[str], file: np.ndarray, row: np.ndarray, image_size: tuple[int, int]) -> None:
        self.files, self.file, self.row = tuple(files), file, row  # file, row: int64 [N]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.row)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def take(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3]: the images of records ``index``."""
        if self._arrays is None:
            self._arrays = [np.load(f, mmap_mode="r") for f in self.files]
        index = np.asarray(index, dtype=np.int64)
        file, row = self.file[index], self.row[index]
        out = np.empty((len(index), *self.image_size, 3), dtype=np.uint8)
        for f in np.unique(file):
            picked = file == f
            out[picked] = self._arrays[f][row[picked]]
        return out


@functools.lru_cache(maxsize=64)
def _keys(keys_file: str, mtime_ns: int, size: int) -> tuple[tuple[str, int, int, int], ...]:
    """A keys file's rows, parsed once per process and version of the file (a trial reads them several times)."""
    return tuple((path, shard_row, nbytes, mtime) for path, shard_row, nbytes, mtime in
                 json.loads(Path(keys_file).read_text())["keys"])


def _index(cache_dir: Path, image_size: tuple[int, int]) -> tuple[list[str], dict]:
    """Cache files at ``image_size`` (newest first) and (path, shard_row) -> (file no, row, bytes, mtime_ns)."""
    h, w = image_size
    files: list[str] = []
    index: dict[tuple[str, int], tuple[int, int, int, int]] = {}
    found = [(p, p.stat()) for p in cache_dir.glob(f"decoded-{h}x{w}-*{KEYS}")]
    for keys_file, st in sorted(found, key=lambda f: f[1].st_mtime_ns, reverse=True):
        npy = keys_file.with_name(keys_file.name.removesuffix(KEYS) + ".npy")
        if not npy.is_file():
            continue
        files.append(str(npy))
        for row, (path, shard_row, size, mtime) in enumerate(_keys(str(keys_file), st.st_mtime_ns, st.st_size)):
            index.setdefault((path, shard_row), (len(files) - 1, row, size, mtime))
    return files, index


def decoded_rows(records: Sequence[Record], image_size: tuple[int, int], cache_dir: str | Path, *,
                 build: bool = True, workers: int = 0, trusted: bool = False,
                 local_dir: str | None = None) -> DecodedRows:
    """The rows of ``records`` at ``image_size`` in the cache files of ``cache_dir``.

    An image whose file changed (bytes or mtime) or that no file holds is missing: with ``build`` the missing
    ones are decoded into a new cache file (``workers`` processes), else FileNotFoundError. ``trusted``: an image
    file's row is taken without a stat of the file (the decode stage checked them: module docstring). With
    ``local_dir`` the rows are read from node-local copies of the files (``datasets.local_copy``).
    """
    if not records:
        raise ValueError("decoded_rows needs at least one record")
    cache_dir = Path(cache_dir)
    files, index = _index(cache_dir, image_size) if cache_dir.is_dir() else ([], {})
    where = np.full((len(records), 2), -1, dtype=np.int64)  # [N] (file no, row)
    for i, (r, stat) in enumerate(zip(records, _stats(records, trusted))):
        hit = index.get((r.path, r.shard_row))
        if hit is not None and (stat is None or hit[2:] == stat):  # None: a trusted image file
            where[i] = hit[:2]
    missing = np.flatnonzero(where[:, 0] < 0)
    if len(missing) and not build:
        raise FileNotFoundError(f"decoded cache {cache_dir} lacks {len(missing)} of {len(records)} images at "
                                f"{image_size[0]}x{image_size[1]} (first: {records[missing[0]].path})")
    if len(missing):
        files.append(str(build_cache([records[i] for i in missing], image_size, cache_dir, workers=workers)))
        where[missing, 0], where[missing, 1] = len(files) - 1, np.arange(len(missing))
    used = np.unique(where[:, 0])  # keep only the files these records read
    remap = np.full(len(files), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    read = [local_copy(files[f], local_dir) if local_dir else files[f] for f in used]
    return DecodedRows(read, remap[where[:, 0]], where[:, 1], image_size)


class FileRows:
    """The rows :class:`DecodedRows` would give, decoded from the image files on every :meth:`take` (no cache)."""

    def __init__(self, records: Sequence[Record], image_size: tuple[int, int]) -> None:
        self.records = tuple(records)
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return len(self.records)

    def take(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3]: the images of records ``index``."""
        return decode([self.records[i] for i in np.asarray(index, dtype=np.int64)], self.image_size)


def image_rows(records: Sequence[Record], image_size: tuple[int, int], cache_dir: CacheDir | str | Path | None, *,
               workers: int = 0) -> DecodedRows | FileRows:
    """The uint8 rows of ``records`` at ``image_size``: from the cache in ``cache_dir`` (missing images decoded into
    it first, ``workers`` processes; a :class:`CacheDir` says how to read it), or, with no ``cache_dir``, decoded
    from their files on every read."""
    if cache_dir is None:
        return FileRows(records, image_size)
    cache = cache_dir if isinstance(cache_dir, CacheDir) else CacheDir(str(cache_dir))
    return decoded_rows(records, image_size, cache.path, workers=workers, trusted=cache.trusted,
                        local_dir=cache.local_dir)


class DecodedDataset(Dataset):
    """Records -> whole uint8 batches of their rows (no transform: augmentation runs on the device).

    ``__getitems__`` (what a DataLoader with a batch sampler calls) gathers a batch with one copy and returns
    it already collated: ``{"img": uint8 [B, H, W, 3], "label", "pid", "camid", "generated", "gen_row",
    "index"}``; pass ``collate_fn=as_batch``.
    """

    def __init__(self, records: Sequence[Record], rows: DecodedRows | FileRows) -> None:
        if len(rows) != len(records):
            raise ValueError(f"{len(rows)} decoded rows for {len(records)} records")
        self.records, self.rows = tuple(records), rows
        self.meta = {k: torch.tensor([getattr(r, k) for r in records]) for k in ("label", "pid", "camid", "gen_row")}
        self.meta["generated"] = torch.tensor([r.generated for r in records], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, index: Sequence[int]) -> dict:
        idx = torch.as_tensor(index, dtype=torch.int64)
        return {"img": torch.from_numpy(self.rows.take(idx.numpy())), **{k: v[idx] for k, v in self.meta.items()},
                "index": idx}


class DecodedPairs(Dataset):
    """Two-stream batches: items are pair rows ``(idx1, idx2, same, verif_ok)``; keys of image i end in ``i``."""

    def __init__(self, base: DecodedDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, pairs: Sequence[Sequence[int]]) -> dict:
        p = torch.as_tensor(np.asarray(pairs, dtype=np.int64).reshape(-1, 4))  # [B, 4]
        a, b = self.base.__getitems__(p[:, 0].tolist()), self.base.__getitems__(p[:, 1].tolist())
        return {**{f"{k}1": v for k, v in a.items()}, **{f"{k}2": v for k, v in b.items()},
                "same": p[:, 2], "verif": p[:, 3].bool()}


def as_batch(batch: dict) -> dict:
    """collate_fn of the decoded datasets: their ``__getitems__`` already returns a collated batch."""
    return batch
