"""The re-ID input pipelines on the device (trainables/reid/augment.py), checked against torchvision's own transforms
for the same draws, and the draws against the transforms' distributions (``reid.augment``: pad_crop, paper,
reference_code)."""

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from trainables.config import cache_size
from trainables.reid.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceAugment,
    augment_batch,
    draw_params,
    gathered_crops,
    normalize,
    pad_for,
    sliced_crops,
)

SIZE = (32, 16)


def _images(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """uint8 [n, H, W, 3] with structure (gradients + noise), so crops and flips are told apart."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ramp = (torch.arange(h)[:, None] * 7 + torch.arange(w)[None, :] * 3)[None, :, :, None]
    return ((ramp + torch.randint(0, 60, (n, h, w, 3), generator=g)) % 256).to(torch.uint8)


def _reference(img: torch.Tensor, augment: str, p, i: int) -> torch.Tensor:
    """The torchvision pipeline (after its resize) on image i with the draws of ``p``: uint8 [3, H, W]."""
    x = img[i].permute(2, 0, 1)  # [3, H', W']
    t, left, ch, cw, flip = (int(v[i]) for v in (p.top, p.left, p.height, p.width, p.flip))
    if augment == "pad_crop":
        x = F.hflip(x) if flip else x
        return F.crop(F.pad(x, [pad_for(SIZE)]), t, left, *SIZE)
    if augment == "paper":
        x = F.crop(x, t, left, *SIZE)
    else:  # PIL's bicubic resized crop
        pil = F.resized_crop(F.to_pil_image(x), t, left, ch, cw, list(SIZE), interpolation=T.InterpolationMode.BICUBIC)
        x = F.pil_to_tensor(pil)
    return F.hflip(x) if flip else x


@pytest.mark.parametrize("augment", ["pad_crop", "paper", "reference_code"])
def test_device_augment_equals_the_transforms_for_the_same_draws(augment):
    img = _images(64, cache_size(SIZE, augment))
    p = draw_params(augment, 64, SIZE, torch.Generator().manual_seed(1))
    out = augment_batch(img, augment, SIZE, p).permute(0, 3, 1, 2)  # [B, 3, H, W]
    ref = torch.stack([_reference(img, augment, p, i) for i in range(64)])
    assert out.shape == ref.shape == (64, 3, *SIZE)
    diff = (out.int() - ref.int()).abs()
    if augment == "reference_code":  # torch's antialiased bicubic vs PIL's (fixed point): a grey level or so
        assert diff.float().mean() < 0.5 and (diff > 4).float().mean() < 0.01
    else:
        assert diff.max() == 0


def test_normalize_is_totensor_then_normalize():
    """The device normalisation is torchvision's ToTensor + Normalize(ImageNet), as one scale and shift."""
    img = _images(4, SIZE)
    ref = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(im.numpy())) for im in img])
    got = normalize(img)
    assert got.is_contiguous() and torch.allclose(got, ref, rtol=0, atol=2e-6)


def test_cpu_slices_equal_the_accelerator_gather():
    """augment_batch's two crop paths (a slice per image on the CPU, one gather elsewhere) give the same pixels."""
    img = _images(16, (40, 24))
    g = torch.Generator().manual_seed(3)
    top, left = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    boxes = dict(top=top, left=left, flip=flip, image_size=SIZE)
    assert torch.equal(sliced_crops(img, **boxes), gathered_crops(img, **boxes))


@pytest.mark.parametrize("augment", ["pad_crop", "paper", "reference_code"])
def test_draws_stay_inside_and_follow_the_transforms_distributions(augment):
    n, (h, w) = 20000, SIZE
    src_h, src_w = cache_size(SIZE, augment)
    if augment == "pad_crop":
        src_h, src_w = src_h + 2 * pad_for(SIZE), src_w + 2 * pad_for(SIZE)
    p = draw_params(augment, n, SIZE, torch.Generator().manual_seed(2))
    assert abs(p.flip.float().mean().item() - 0.5) < 0.02  # RandomHorizontalFlip's p
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= src_h).all() and (p.left + p.width <= src_w).all()
    if augment == "reference_code":  # crops of 85-100% of each side (rounded), both ends reached
        fit = min(src_h / h, src_w / w)
        assert {int(v) for v in p.height.unique()} == set(range(round(0.85 * h * fit), min(src_h, round(h * fit)) + 1))
    else:  # every offset of RandomCrop, about equally often
        counts = torch.bincount(p.top, minlength=src_h - h + 1)
        assert len(counts) == src_h - h + 1 and counts.min() > 0.7 * n / len(counts)
        assert set(p.left.tolist()) == set(range(src_w - w + 1))


def test_cache_size_is_the_papers_256_over_224():
    assert cache_size((64, 32), "pad_crop") == (64, 32)
    assert cache_size((224, 224), "paper") == (256, 256) == cache_size((224, 224), "reference_code")
    assert cache_size((224, 112), "paper") == (256, 128)
    assert cache_size((256, 128), "paper") == (293, 146)
    with pytest.raises(ValueError, match=r"reid\.augment='crop'.*'pad_crop', 'paper', 'reference_code'"):
        cache_size((64, 32), "crop")


def test_reference_code_draws_one_side_factor_uniform_in_area():
    """One factor s for both sides, s**2 uniform in [0.85**2, 1] (MatConvNet CropSize [0.85, 1]); the crop keeps
    the output's aspect ratio."""
    size = (1920, 960)  # large, so that rounding to whole pixels does not blur the statistics
    p = draw_params("reference_code", 40000, size, torch.Generator().manual_seed(0))
    src_h, src_w = cache_size(size, "reference_code")
    fh, fw = (p.height.double() / src_h).numpy(), (p.width.double() / src_w).numpy()
    assert fh.min() >= 0.85 - 1e-3 and fh.max() <= 1.0 and fh.min() < 0.86 and fh.max() > 0.99
    assert np.abs(fh - fw).max() < 2e-3  # height and width share the factor
    assert abs((fh ** 2).mean() - (0.85 ** 2 + 1) / 2) < 1.5e-3  # uniform in area (per side it would be 0.8575)
    square = draw_params("reference_code", 100, (224, 224), torch.Generator().manual_seed(1))
    assert torch.equal(square.height, square.width)  # a square output takes a square crop


@pytest.mark.parametrize("augment", ["pad_crop", "paper", "reference_code"])
def test_test_time_is_the_rows_normalised(augment):
    """Test time: no crop, no flip, any seed: the rows (at the pipeline's test size) normalised."""
    rows = _images(4, cache_size(SIZE, augment))
    prepare = DeviceAugment(augment, cache_size(SIZE, augment), torch.device("cpu"), train=False)
    for seed in (0, 1):
        prepare.reseed(seed)
        assert torch.equal(prepare({"img": rows})["img"], normalize(rows))


def test_training_draws_follow_the_seed():
    prepare = DeviceAugment("pad_crop", SIZE, torch.device("cpu"), train=True)
    rows = _images(8, SIZE)
    outs = []
    for seed in (3, 3, 4):
        prepare.reseed(seed)
        outs.append(prepare({"img": rows})["img"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("augment", ["pad_crop", "paper", "reference_code"])
@pytest.mark.parametrize("train", [True, False])
def test_the_pipeline_reads_no_device_value(augment, train):
    """On meta tensors (shapes, no data) any read of a device value (``.item()``, ``.tolist()``, a branch on a
    tensor) raises: the pipeline runs to the end, so on a GPU it never waits for the device (issue 29). The draws
    stay on the CPU, where reading them costs no sync."""
    meta = torch.device("meta")
    prep = DeviceAugment(augment, SIZE, meta, train=train)
    assert all(c.device == meta for c in prep.constants)
    h, w = cache_size(SIZE, augment)
    batch = {"img": torch.zeros(6, h, w, 3, dtype=torch.uint8), "label": torch.arange(6)}
    out = prep(batch)
    shape = SIZE if train else (h, w)  # at test time paper / reference_code feed the whole larger image
    assert out["img"].device == meta and out["img"].shape == (6, 3, *shape) and out["img"].dtype == torch.float32
    assert out["label"].device == meta
    with pytest.raises((NotImplementedError, RuntimeError)):  # the probe itself: a value read on meta raises
        out["img"].sum().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_suite.sh runs it)")
@pytest.mark.parametrize("augment", ["pad_crop", "paper", "reference_code"])
def test_augmentation_and_a_training_step_do_not_synchronise_cuda(augment):
    """The decoded-cache path's training step on a GPU under CUDA's own detector (any host-device wait raises):
    a pinned uint8 batch through DeviceAugment, the identification step, backward and the optimizer step."""
    from trainables.reid.engine import ident_step
    from trainables.reid.labels import LabelSpec

    dev = torch.device("cuda")
    h, w = cache_size(SIZE, augment)
    batch = {"img": _images(8, (h, w)).pin_memory(), "label": torch.arange(8).pin_memory(),
             "generated": torch.zeros(8, dtype=torch.bool).pin_memory(),
             "gen_row": torch.full((8,), -1).pin_memory()}
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 8)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    prep = DeviceAugment(augment, SIZE, dev, train=True)
    step = ident_step(LabelSpec("baseline", 8), None, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    prep(batch)  # the first call may initialise CUDA state (cuBLAS handles, caching allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(model, prep(batch), 0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()
