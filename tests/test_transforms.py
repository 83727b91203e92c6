"""The three input pipelines of datasets/torch_data.build_transform (reid.augment): crop geometry, flips, sizes."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from datasets.decoded_cache import tensor_transform
from datasets.torch_data import AUGMENTS, IMAGENET_MEAN, IMAGENET_STD, ReferenceCrop, build_transform, pre_crop_size

BICUBIC = T.InterpolationMode.BICUBIC


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def coord_image(h: int, w: int) -> Image.Image:
    """Red = row, green = column (so a crop's pixels tell where they came from); h, w <= 256."""
    rows, cols = np.mgrid[:h, :w]
    return Image.fromarray(np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8))


def to_pixels(t: torch.Tensor) -> np.ndarray:
    """Undo ToTensor + Normalize: float [3, H, W] -> float pixel values [3, H, W] (0..255)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((t * std + mean) * 255).numpy()


def normalised(img: Image.Image) -> torch.Tensor:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))


def test_augments_match_the_config_choices():
    from trainables.config import AUGMENTS as CONFIG_AUGMENTS

    assert AUGMENTS == CONFIG_AUGMENTS


@pytest.mark.parametrize("train", [True, False])
def test_bad_mode_names_reid_augment(train):
    with pytest.raises(ValueError, match=r"reid\.augment='crop'.*'pad_crop', 'paper', 'reference_code'"):
        build_transform((64, 32), train=train, augment="crop")


def test_decoded_cache_transform_supports_only_pad_crop():
    assert tensor_transform((64, 32), train=True, augment="pad_crop") is not None
    with pytest.raises(ValueError, match=r"reid\.augment='paper'.*only 'pad_crop'"):
        tensor_transform((64, 32), train=True, augment="paper")
    with pytest.raises(ValueError, match=r"reid\.augment='crop'"):
        tensor_transform((64, 32), train=False, augment="crop")


def test_pad_crop_is_the_old_pipeline():
    img = noise_image(50, 30)
    old_train = T.Compose([T.Resize((64, 32), interpolation=BICUBIC), T.RandomHorizontalFlip(), T.Pad(2),
                           T.RandomCrop((64, 32)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    old_test = T.Compose([T.Resize((64, 32), interpolation=BICUBIC), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for new in (build_transform((64, 32), train=True), build_transform((64, 32), train=True, augment="pad_crop")):
        for seed in range(8):
            torch.manual_seed(seed)
            a = new(img)
            torch.manual_seed(seed)
            assert torch.equal(a, old_train(img))
    assert torch.equal(build_transform((64, 32), train=False)(img), old_test(img))


def test_pre_crop_size():
    assert pre_crop_size((224, 224)) == (256, 256)
    assert pre_crop_size((224, 112)) == (256, 128)
    assert pre_crop_size((256, 128)) == (293, 146)


def test_paper_resizes_to_256_then_crops_224_then_flips():
    """A 128x64 image: resized to 256x256, then the same crop and flip draws as a hand-built pipeline."""
    img = noise_image(128, 64)
    big = T.Resize((256, 256), interpolation=BICUBIC)(img)
    tf = build_transform((224, 224), train=True, augment="paper")
    for seed in range(4):
        torch.manual_seed(seed)
        out = tf(img)
        torch.manual_seed(seed)
        top, left, _, _ = T.RandomCrop.get_params(big, (224, 224))
        flip = torch.rand(1) < 0.5
        want = normalised(big)[:, top:top + 224, left:left + 224]
        assert out.shape == (3, 224, 224)
        assert torch.allclose(out, want.flip(-1) if flip else want)


def test_paper_crop_offsets_and_flips():
    """On a 256x256 coordinate image (the pre-crop resize is then the identity) the output is an exact crop."""
    tf = build_transform((224, 224), train=True, augment="paper")
    img = coord_image(256, 256)
    tops, lefts, flips = [], [], 0
    for seed in range(64):
        torch.manual_seed(seed)
        px = np.rint(to_pixels(tf(img))).astype(int)
        rows, cols = px[0], px[1]
        flipped = cols[0, 0] > cols[0, -1]
        top, left = rows[0, 0], cols[0].min()
        assert (rows == top + np.arange(224)[:, None]).all()
        want_cols = left + np.arange(224)
        assert (cols == (want_cols[::-1] if flipped else want_cols)[None, :]).all()
        tops.append(top)
        lefts.append(left)
        flips += int(flipped)
    assert min(tops) >= 0 and max(tops) <= 32 and min(lefts) >= 0 and max(lefts) <= 32
    assert len(set(tops)) > 12 and len(set(lefts)) > 12  # the offset varies with the seed
    assert 16 <= flips <= 48  # about half


def test_reference_crop_params():
    """One factor s for both sides, s**2 uniform in [0.85**2, 1] (MatConvNet CropSize [0.85, 1])."""
    torch.manual_seed(0)
    height, width = 2560, 1280  # large, so that rounding to whole pixels does not blur the statistics
    fh, fw = [], []
    for _ in range(40000):
        top, left, ch, cw = ReferenceCrop.get_params(height, width, (224, 112))
        assert 0 <= top <= height - ch and 0 <= left <= width - cw
        fh.append(ch / height)
        fw.append(cw / width)
    fh, fw = np.array(fh), np.array(fw)
    assert fh.min() >= 0.85 - 1e-3 and fh.max() <= 1.0 and fh.min() < 0.86 and fh.max() > 0.99
    assert np.abs(fh - fw).max() < 2e-3  # height and width share the factor
    assert abs((fh ** 2).mean() - (0.85 ** 2 + 1) / 2) < 1.5e-3  # uniform in area (per side it would be 0.8575)
    # The crop keeps the output's aspect ratio: a square output takes a square crop of a tall image.
    for _ in range(100):
        _, _, ch, cw = ReferenceCrop.get_params(128, 64, (224, 224))
        assert ch == cw and 54 <= cw <= 64


def test_reference_code_crops_85_to_100_percent_per_side():
    """Recover each crop box from a coordinate image: a resized crop maps output row y to about
    top + (y + 0.5) * crop_height / H - 0.5 (likewise columns)."""
    size = (224, 112)
    tf = build_transform(size, train=True, augment="reference_code")
    img = coord_image(*pre_crop_size(size))  # 256 x 128: the pre-crop resize is the identity
    fracs_h, flips = [], 0
    for seed in range(48):
        torch.manual_seed(seed)
        box = ReferenceCrop.get_params(*pre_crop_size(size), size)  # the transform's first draws
        torch.manual_seed(seed)
        out = tf(img)
        assert out.shape == (3, *size)
        px = to_pixels(out)
        ys, xs = np.arange(8, 216), np.arange(6, 106)  # interior: away from the filter's clipped borders
        slope_h, icpt_h = np.polyfit(ys + 0.5, px[0, ys, 56], 1)
        col_values = px[1, 112, xs]
        flipped = col_values[0] > col_values[-1]
        slope_w, icpt_w = np.polyfit((111 - xs if flipped else xs) + 0.5, col_values, 1)
        crop_h, crop_w = slope_h * size[0], slope_w * size[1]
        top, left = icpt_h + 0.5, icpt_w + 0.5
        assert np.allclose([top, left, crop_h, crop_w], box, atol=1.0)  # resampling and uint8 rounding
        fh, fw = crop_h / 256, crop_w / 128
        assert 0.83 <= fh <= 1.02 and 0.83 <= fw <= 1.02 and abs(fh - fw) < 0.03
        assert -1.5 <= top and top + crop_h <= 256 + 1.5 and -1.5 <= left and left + crop_w <= 128 + 1.5
        fracs_h.append(fh)
        flips += int(flipped)
    assert max(fracs_h) - min(fracs_h) > 0.1  # the crop size varies with the seed
    assert 12 <= flips <= 36  # about half


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("size", [(64, 32), (224, 224)])
def test_test_mode_is_deterministic_and_sized(augment, size):
    img = noise_image(128, 64)
    tf = build_transform(size, train=False, augment=augment)
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(1)
    assert torch.equal(a, tf(img))
    assert a.shape == (3, *(size if augment == "pad_crop" else pre_crop_size(size)))


@pytest.mark.parametrize("augment", ["paper", "reference_code"])
def test_paper_and_reference_code_test_on_the_whole_pre_crop_image(augment):
    """As the authors' test scripts: the whole image at 256/224 x image_size, no crop, no flip."""
    img = coord_image(256, 256)
    px = np.rint(to_pixels(build_transform((224, 224), train=False, augment=augment)(img))).astype(int)
    assert (px[0] == np.arange(256)[:, None]).all() and (px[1] == np.arange(256)[None, :]).all()
