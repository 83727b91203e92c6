"""The re-ID input pipelines (``reid.augment``), on the training device, on whole uint8 batches of decoded rows.

The one implementation of every pipeline; the rows come resized to ``cache_size`` (from the decoded cache, or
decoded from the files: ``datasets.decoded_cache``). For a network input ``image_size`` (H, W):

- ``pad_crop`` (common PyTorch re-ID practice): rows at (H, W); train = flip (p 1/2), zero-pad (10 px at H = 256,
  scaled), random (H, W) crop; test = the rows as they are.
- ``paper`` (MpRL / LSRO papers): rows at 256/224 x (H, W) (256x256 for 224x224); train = random (H, W) crop,
  flip; test = the whole larger image: the authors' test scripts feed it to the fully convolutional net
  (``test/test_gallery_query_crazy.m``), which keeps the training scale.
- ``reference_code`` (the authors' MatConvNet code): rows at that size too (their ``prepare_data.m``
  stores 256x256 images); train = a random crop of 85-100% of each side (one factor for both, the output's
  aspect ratio; MatConvNet's ``vl_imreadjpeg(..., 'CropSize', [0.85, 1])``) resized (bicubic) to (H, W), flip;
  test as ``paper``.

Then to float and ImageNet normalisation. The random parameters of a batch are drawn on the CPU from one
``torch.Generator`` per epoch (the same numbers on CPU and GPU, and a resumed run replays them) by the
distributions of the torchvision transforms (``RandomHorizontalFlip``, ``Pad`` + ``RandomCrop``); the pixels move
once, as uint8, and are cropped and flipped with one gather. Nothing in a batch waits for the device: the
normalisation constants live there, and a batch's draws reach it in one pinned, non-blocking copy.
``tests/test_augment.py`` checks the geometry against torchvision's own transforms for the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainables.config import AUGMENTS, cache_size, check_choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_SIDE = (0.85, 1.0)  # the reference code's vl_imreadjpeg 'CropSize', [min, max] fraction of a side


def check_augment(augment: str) -> None:
    check_choice("reid.augment", augment, AUGMENTS)


def pad_for(image_size: tuple[int, int], pad: int = 10) -> int:
    """pad_crop's zero padding: 10 pixels at H = 256, scaled by H/256 (at least 1)."""
    return max(1, pad * image_size[0] // 256)


@dataclass(frozen=True)
class CropParams:
    """One batch's draws, int64 [B] each: crop box (in the padded image for pad_crop) and horizontal flips."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor  # bool


def draw_params(augment: str, n: int, image_size: tuple[int, int], generator: torch.Generator) -> CropParams:
    """Random parameters for ``n`` images by the ``augment`` pipeline's distributions (see the module docstring).

    pad_crop offsets are uniform in [0, 2 pad] of the padded image, paper offsets uniform in the larger image;
    reference_code draws the side fraction s with s^2 uniform in [0.85^2, 1] (uniform in area).
    """
    h, w = image_size
    src_h, src_w = cache_size(image_size, augment)
    flip = torch.rand(n, generator=generator) < 0.5
    if augment == "reference_code":
        lo, hi = REFERENCE_SIDE
        s = torch.sqrt(lo * lo + torch.rand(n, generator=generator, dtype=torch.float64) * (hi * hi - lo * lo))
        fit = min(src_h / h, src_w / w)
        ch = torch.floor(h * fit * s + 0.5).long().clamp(max=src_h)
        cw = torch.floor(w * fit * s + 0.5).long().clamp(max=src_w)
    else:
        ch, cw = torch.full((n,), h), torch.full((n,), w)
        if augment == "pad_crop":
            src_h, src_w = src_h + 2 * pad_for(image_size), src_w + 2 * pad_for(image_size)
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (src_h - ch + 1)).long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (src_w - cw + 1)).long()
    return CropParams(top, left, ch, cw, flip)


def norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1, 3, 1, 1] on ``device``: ``x / 255`` then ImageNet's Normalize as ``x * scale - shift``.
    Made once per pipeline: a tensor built from Python numbers on an accelerator is a blocking host copy."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (1 / (255 * std)).to(device), (mean / std).to(device)


def normalize(img: torch.Tensor, constants: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W]: ToTensor + Normalize(ImageNet) as one scale and shift (within
    1e-6 of them), converted and transposed in one copy. ``constants``: :func:`norm_constants` of the device."""
    scale, shift = constants if constants is not None else norm_constants(img.device)
    x = torch.empty((len(img), 3, *img.shape[1:3]), device=img.device).copy_(img.permute(0, 3, 1, 2))
    return x.mul_(scale).sub_(shift)


def params_to(p: CropParams, device: torch.device) -> CropParams:
    """``p`` on ``device`` in one copy: stacked, pinned and non-blocking on CUDA (no host-device wait)."""
    if device.type == "cpu":
        return p
    stacked = torch.stack([p.top, p.left, p.height, p.width, p.flip.long()])
    if device.type == "cuda":
        stacked = stacked.pin_memory()
    top, left, height, width, flip = stacked.to(device, non_blocking=True).unbind(0)
    return CropParams(top, left, height, width, flip.bool())


def augment_batch(img: torch.Tensor, augment: str, image_size: tuple[int, int], p: CropParams,
                  on_device: CropParams | None = None) -> torch.Tensor:
    """uint8 [B, H', W', 3] (cache size, any device) -> uint8 [B, H, W, 3], cropped and flipped by ``p``.

    pad_crop flips before its crop and the others after; a flip before a crop at ``left`` equals the crop at
    ``2 pad - left`` flipped, so every pipeline is one crop then one flip here (same output for the same draws).
    On an accelerator one gather does every crop; on the CPU a slice per image is faster. ``p`` stays on the CPU
    (the per-image loops read it there); ``on_device`` is the same draws on the images' device
    (:func:`params_to`), made here when not given.
    """
    if img.device.type != "cpu" and on_device is None:
        on_device = params_to(p, img.device)
    if augment == "reference_code":
        return _resized_crops(img, p, image_size, None if on_device is None else on_device.flip)
    if on_device is not None:
        p = on_device
    left = p.left
    if augment == "pad_crop":
        pad = pad_for(image_size)
        img = F.pad(img, (0, 0, pad, pad, pad, pad))  # zeros around H and W of [B, H, W, 3]
        left = torch.where(p.flip, 2 * pad - left, left)  # flip-then-crop as crop-then-flip
    crops = sliced_crops if img.device.type == "cpu" else gathered_crops
    return crops(img, p.top, left, p.flip, image_size)


def gathered_crops(img: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                   image_size: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, H', W', 3] -> [B, h, w, 3]: every crop (and flip) in one gather, on the images' device."""
    h, w = image_size
    dev = img.device
    rows = top.to(dev)[:, None] + torch.arange(h, device=dev)  # [B, h]
    cols = left.to(dev)[:, None] + torch.arange(w, device=dev)  # [B, w]
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    batch = torch.arange(len(img), device=dev)[:, None, None]
    return img[batch, rows[:, :, None], cols[:, None, :]]  # [B, h, w, 3]


def sliced_crops(img: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                 image_size: tuple[int, int]) -> torch.Tensor:
    """The same pixels as :func:`gathered_crops`, a slice per image (faster on the CPU)."""
    h, w = image_size
    out = torch.empty((len(img), h, w, 3), dtype=img.dtype)
    for i, (t, c, f) in enumerate(zip(top.tolist(), left.tolist(), flip.tolist())):
        crop = img[i, t:t + h, c:c + w]
        out[i] = crop.flip(1) if f else crop
    return out


def _resized_crops(img: torch.Tensor, p: CropParams, image_size: tuple[int, int],
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """reference_code: each crop resized to ``image_size`` (bicubic, antialiased like PIL's), rounded, flipped.
    ``p`` on the CPU (its boxes are read per image, no device value is); ``flip``: ``p.flip`` on the images' device."""
    out = torch.empty((len(img), *image_size, 3), dtype=torch.uint8, device=img.device)
    for i, (t, left, ch, cw) in enumerate(zip(*(v.tolist() for v in (p.top, p.left, p.height, p.width)))):
        crop = img[i, t:t + ch, left:left + cw].permute(2, 0, 1)[None].float()  # [1, 3, ch, cw]
        if (ch, cw) != tuple(image_size):
            crop = F.interpolate(crop, size=image_size, mode="bicubic", antialias=True, align_corners=False)
        out[i] = crop.round_().clamp_(0, 255)[0].permute(1, 2, 0).to(torch.uint8)
    flip = p.flip.to(img.device) if flip is None else flip
    return torch.where(flip[:, None, None, None], out.flip(2), out)


class DeviceAugment:
    """Moves a decoded batch to ``device`` once and turns its images (keys starting with ``img``) into network
    inputs: augmented (``train``) and normalised float [B, 3, H, W]; other tensors are moved as they are."""

    def __init__(self, augment: str, image_size: tuple[int, int], device: torch.device, *, train: bool) -> None:
        check_augment(augment)
        self.augment, self.image_size, self.device, self.train = augment, tuple(image_size), device, train
        self.generator = torch.Generator().manual_seed(0)
        self.constants = norm_constants(device)  # on the device once, not per batch

    def reseed(self, seed: int) -> None:
        """Seed the draws (per epoch: a resumed run replays an epoch's crops and flips)."""
        self.generator.manual_seed(seed)

    def __call__(self, batch: dict) -> dict:
        non_blocking = self.device.type == "cuda"
        out = {k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
        for key in sorted(k for k in out if k.startswith("img")):
            img = out[key]
            if self.train:
                params = draw_params(self.augment, len(img), self.image_size, self.generator)  # on the CPU
                img = augment_batch(img, self.augment, self.image_size, params, params_to(params, self.device))
            out[key] = normalize(img, self.constants)
        return out

