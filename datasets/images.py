"""Reading one image of a record: an image file, or a row of a generated-image shard (memory-mapped once per process).

The input pipelines (resize, crops, flips, normalisation) are not here: :mod:`datasets.decoded_cache` decodes and
resizes rows once (or, without the cache, on every read), and ``trainables.reid.augment`` does the rest on the
training device.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from datasets.records import Record

MAX_OPEN_SHARDS = 512  # memory-mapped shard files kept open per process (a full generated pool is ~240)


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # name the file: a bare PIL error in a DataLoader worker is hard to trace
        raise OSError(f"cannot read image {path}: {err}") from err


# path -> ((inode, size, mtime_ns), memory-mapped uint8 [B, H, W, 3]): each process (DataLoader worker) opens a
# shard once; the stat key notices a shard replaced under the same name (a regenerated store).
_shards: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}


def _shard(path: str) -> np.ndarray:
    try:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = _shards.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        array = np.load(path, mmap_mode="r")
    except Exception as err:
        raise OSError(f"cannot read image shard {path}: {err}") from err
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise OSError(f"image shard {path} holds {array.dtype} {list(array.shape)}, expected uint8 [B, H, W, 3]")
    if len(_shards) >= MAX_OPEN_SHARDS:
        _shards.pop(next(iter(_shards)))
    _shards[path] = (stamp, array)
    return array


def read_record(r: Record) -> Image.Image:
    """The RGB image of a record: row ``r.shard_row`` of a shard file, or the image file ``r.path``."""
    if r.shard_row < 0:
        return read_image(r.path)
    array = _shard(r.path)
    if r.shard_row >= len(array):
        raise OSError(f"image shard {r.path} has {len(array)} rows; row {r.shard_row} requested")
    return Image.fromarray(np.array(array[r.shard_row]))  # copied out of the map
