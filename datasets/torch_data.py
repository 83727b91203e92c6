"""Thin torch wrappers over records: transforms and an image dataset that yields dict samples.

Three input pipelines (``reid.augment``; research/mprl.md §4 "Input"), for a network input ``image_size`` (H, W):

- ``pad_crop`` (common PyTorch re-ID practice): train = resize to (H, W), flip, zero-pad and random (H, W) crop;
  test = resize to (H, W).
- ``paper`` (MpRL / LSRO papers): train = resize to :func:`pre_crop_size` (256x256 for 224x224), random (H, W)
  crop, flip; test = resize to :func:`pre_crop_size`, no crop: the authors' test scripts feed the whole 256x256
  image to the fully convolutional net (``test/test_gallery_query_crazy.m``), which keeps the training scale.
- ``reference_code`` (the authors' MatConvNet code): train = resize to :func:`pre_crop_size` (their
  ``prepare_data.m`` stores 256x256 images), :class:`ReferenceCrop` (a random crop of 85-100% of each side,
  one factor for both) resized to (H, W), flip; test as ``paper``.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F

from datasets.records import Record

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reid.augment choices. datasets/ must not import trainables, so this repeats trainables.config.AUGMENTS;
# tests/test_transforms.py asserts that the two are equal.
AUGMENTS = ("pad_crop", "paper", "reference_code")
PRE_CROP_SCALE = 256 / 224  # the papers' resize before a 224x224 crop
REFERENCE_SIDE = (0.85, 1.0)  # the reference code's vl_imreadjpeg 'CropSize', [min, max] fraction of a side
BICUBIC = T.InterpolationMode.BICUBIC
MAX_OPEN_SHARDS = 512  # memory-mapped shard files kept open per process (a full generated pool is ~240)


def check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise ValueError(f"reid.augment={augment!r} is not valid; choose one of {', '.join(map(repr, AUGMENTS))}")


def pre_crop_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) * 256/224, rounded: the resize before the crop in the paper and reference_code pipelines."""
    h, w = image_size
    return round(h * PRE_CROP_SCALE), round(w * PRE_CROP_SCALE)  # never a tie: 8h/7 is not k + 1/2


class ReferenceCrop(torch.nn.Module):
    """A random crop resized to ``size`` (H, W), as MatConvNet's ``vl_imreadjpeg(..., 'Resize', size,
    'CropLocation', 'random', 'CropSize', [0.85, 1])`` with its default 'CropAnisotropy' [1 1] does.

    The crop has the output's aspect ratio; its sides are a fraction ``s`` of the largest such crop that fits the
    image, one ``s`` for both sides with ``s**2`` uniform in [0.85**2, 1] (uniform in area); it is placed uniformly
    at random (integer offsets). Draws use torch's RNG, like the torchvision transforms.
    """

    def __init__(self, size: tuple[int, int], side: tuple[float, float] = REFERENCE_SIDE) -> None:
        super().__init__()
        self.size, self.side = (int(size[0]), int(size[1])), side

    @staticmethod
    def get_params(height: int, width: int, size: tuple[int, int],
                   side: tuple[float, float] = REFERENCE_SIDE) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) in an image of ``height`` x ``width``."""
        lo, hi = side
        s = math.sqrt(lo * lo + torch.rand(1).item() * (hi * hi - lo * lo))
        fit = min(height / size[0], width / size[1])  # the largest crop of the output's aspect ratio
        ch = min(math.floor(size[0] * fit * s + 0.5), height)
        cw = min(math.floor(size[1] * fit * s + 0.5), width)
        top = int(torch.randint(0, height - ch + 1, (1,)).item())
        left = int(torch.randint(0, width - cw + 1, (1,)).item())
        return top, left, ch, cw

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        _, height, width = F.get_dimensions(img)
        top, left, ch, cw = self.get_params(height, width, self.size, self.side)
        return F.resized_crop(img, top, left, ch, cw, list(self.size), interpolation=BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, side={self.side})"


def build_transform(image_size: tuple[int, int], *, train: bool, pad: int = 10,
                    augment: str = "pad_crop") -> Callable:
    """PIL image -> normalised float tensor [3, H', W'] by the ``augment`` pipeline (see the module docstring).

    H', W' = ``image_size``, except at test time in the paper and reference_code pipelines
    (:func:`pre_crop_size`). ``pad`` (scaled by H/256) is used by pad_crop only.
    """
    check_augment(augment)
    h, w = image_size
    if augment == "pad_crop":
        steps: list = [T.Resize((h, w), interpolation=BICUBIC)]
        if train:
            steps += [T.RandomHorizontalFlip(), T.Pad(max(1, pad * h // 256)), T.RandomCrop((h, w))]
    else:
        steps = [T.Resize(pre_crop_size((h, w)), interpolation=BICUBIC)]
        if train:
            crop = T.RandomCrop((h, w)) if augment == "paper" else ReferenceCrop((h, w))
            steps += [crop, T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


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


class ImageDataset(Dataset):
    """Records -> ``{"img", "label", "pid", "camid", "generated", "gen_row", "index"}`` (real and generated alike)."""

    def __init__(self, records: Sequence[Record], transform: Callable) -> None:
        self.records = tuple(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {"img": self.transform(read_record(r)), "label": r.label, "pid": r.pid, "camid": r.camid,
                "generated": r.generated, "gen_row": r.gen_row, "index": i}
