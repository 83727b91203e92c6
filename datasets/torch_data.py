"""Thin torch wrappers over records: transforms and an image dataset that yields dict samples."""

from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from datasets.records import Record

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(image_size: tuple[int, int], *, train: bool, pad: int = 10) -> Callable:
    """Train: resize, flip, pad + random crop back to size, normalise. Test: resize, normalise."""
    h, w = image_size
    steps: list = [T.Resize((h, w), interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        steps += [T.RandomHorizontalFlip(), T.Pad(max(1, pad * h // 256)), T.RandomCrop((h, w))]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # name the file: a bare PIL error in a DataLoader worker is hard to trace
        raise OSError(f"cannot read image {path}: {err}") from err


class ImageDataset(Dataset):
    """Records -> ``{"img", "label", "pid", "camid", "generated", "gen_row"}`` (one path for real and generated)."""

    def __init__(self, records: Sequence[Record], transform: Callable) -> None:
        self.records = tuple(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {"img": self.transform(read_image(r.path)), "label": r.label, "pid": r.pid, "camid": r.camid,
                "generated": r.generated, "gen_row": r.gen_row, "index": i}
