"""Decoded-image cache: the images of a record list decoded and resized once into one uint8 ``.npy`` memmap.

``build_transform(size, train=True)`` decodes a JPEG and bicubic-resizes it for every sample of every epoch,
which is most of the input pipeline's work. The resize is deterministic, so :func:`build_cache` stores its result
once (``uint8 [N, H, W, 3]``) and :class:`CachedImageDataset` applies only the random part (flip, pad, crop) and
the normalisation, on tensors. With the same torch RNG state it yields exactly the samples of
``ImageDataset(records, build_transform(size, train=...))``: the same random draws on the same pixels.

The file name hashes the image size and every image's path, byte size and modification time (and, for an image
stored as a row of a generated-image shard, that row), so a changed dataset gets a new file. It is written under
a temporary name and renamed (a reader never sees a partial cache). Memory-mapped, one copy in the page cache
serves every DataLoader worker and every trial on a node. No torch in the file format; ``np.load(path,
mmap_mode="r")`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from datasets.records import Record
from datasets.torch_data import IMAGENET_MEAN, IMAGENET_STD, check_augment, read_record

CACHE_VERSION = 1
CHUNK = 256  # images per write job


def cache_path(cache_dir: str | Path, records: Sequence[Record], image_size: tuple[int, int]) -> Path:
    """Where the cache of ``records`` at ``image_size`` lives (the name changes when any image file does)."""
    h, w = image_size
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "size": [h, w]}).encode())
    for r in records:
        st = os.stat(r.path)
        row = f"\0{r.shard_row}" if r.shard_row >= 0 else ""  # rows of one shard share its path and stat
        digest.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}{row}\n".encode())
    return Path(cache_dir) / f"decoded-{h}x{w}-{len(records)}-{digest.hexdigest()[:16]}.npy"


def decode(records: Sequence[Record], image_size: tuple[int, int]) -> np.ndarray:
    """uint8 [n, H, W, 3]: each image read as RGB and resized exactly as ``build_transform`` does."""
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def tensor_transform(image_size: tuple[int, int], *, train: bool, pad: int = 10,
                     augment: str = "pad_crop") -> Callable[[torch.Tensor], torch.Tensor]:
    """``build_transform`` after its resize, on uint8 [3, H, W] tensors: flip, pad, crop, to float, normalise.

    Only the pad_crop pipeline: the cache holds ``image_size`` images, while the paper and reference_code
    pipelines resize to ``pre_crop_size(image_size)`` before their crop.
    """
    check_augment(augment)
    if augment != "pad_crop":
        raise ValueError(f"reid.augment={augment!r}: the decoded-image cache supports only 'pad_crop'")
    h, w = image_size
    steps: list = []
    if train:
        steps += [T.RandomHorizontalFlip(), T.Pad(max(1, pad * h // 256)), T.RandomCrop((h, w))]
    steps += [T.ConvertImageDtype(torch.float32), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class CachedImageDataset(Dataset):
    """``ImageDataset``'s samples, with the images read from a :func:`build_cache` file (row i = record i)."""

    def __init__(self, records: Sequence[Record], cache_file: str | Path, image_size: tuple[int, int], *,
                 train: bool, pad: int = 10) -> None:
        self.records = tuple(records)
        self.cache_file = str(cache_file)
        self.transform = tensor_transform(image_size, train=train, pad=pad)
        shape = np.load(self.cache_file, mmap_mode="r").shape
        if shape != (len(self.records), *image_size, 3):
            raise ValueError(f"decoded cache {cache_file} holds {shape}, expected "
                             f"{(len(self.records), *image_size, 3)} for these records and image size")
        self._array: np.ndarray | None = None  # opened lazily in each process (DataLoader workers)

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # never pickle the mapped data itself

    def __getitem__(self, i: int) -> dict:
        if self._array is None:
            self._array = np.load(self.cache_file, mmap_mode="r")
        img = torch.from_numpy(self._array[i].transpose(2, 0, 1).copy())  # uint8 [3, H, W]
        r = self.records[i]
        return {"img": self.transform(img), "label": r.label, "pid": r.pid, "camid": r.camid,
                "generated": r.generated, "gen_row": r.gen_row, "index": i}
