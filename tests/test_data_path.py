"""The decoded-cache data path (issue 20): device augmentation vs the torchvision transforms, the cache's lookup
and rebuild, the one persistent loader, and no image file opened after the first epoch."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from datasets.decoded_cache import DecodedDataset, decoded_rows, keys_path
from datasets.records import hold_out
from datasets.torch_data import IMAGENET_MEAN, IMAGENET_STD, ReferenceCrop, build_transform, pre_crop_size
from trainables.augment import augment_batch, cache_size, draw_params, normalize, pad_for
from trainables.reid_data import decoded_train_loader, epoch_batches

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
    else:  # PIL bicubic, as ReferenceCrop on the JPEG path
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
    img = _images(4, SIZE)
    ref = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(im.numpy())) for im in img])
    got = normalize(img)
    assert got.is_contiguous() and torch.allclose(got, ref, rtol=0, atol=2e-6)


def test_cpu_slices_equal_the_accelerator_gather():
    """augment_batch's two crop paths (a slice per image on the CPU, one gather elsewhere) give the same pixels."""
    from trainables.augment import _gathered_crops, _sliced_crops

    img = _images(16, (40, 24))
    g = torch.Generator().manual_seed(3)
    top, left = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    assert torch.equal(_sliced_crops(img, top, left, flip, SIZE), _gathered_crops(img, top, left, flip, SIZE))


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
    if augment == "reference_code":  # the sides ReferenceCrop.get_params can give, both ends reached
        torch.manual_seed(0)
        ref = [ReferenceCrop.get_params(src_h, src_w, SIZE) for _ in range(2000)]
        assert {int(v) for v in p.height.unique()} == {r[2] for r in ref}
        assert abs(p.height.float().mean().item() - np.mean([r[2] for r in ref])) < 0.2
    else:  # every offset of RandomCrop, about equally often
        counts = torch.bincount(p.top, minlength=src_h - h + 1)
        assert len(counts) == src_h - h + 1 and counts.min() > 0.7 * n / len(counts)
        assert set(p.left.tolist()) == set(range(src_w - w + 1))


def test_cache_finds_subsets_and_rebuilds_only_changed_images(tmp_path, tiny_split):
    train = tiny_split.train
    rows = decoded_rows(train, SIZE, tmp_path)
    assert len(rows.files) == 1 and keys_path(rows.files[0]).is_file()
    sub, _ = hold_out(tiny_split, 1)  # a subset, relabelled: the same file and rows
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
    loader = decoded_train_loader(train, rows, SIZE, device=torch.device("cpu"), workers=1)
    pids, seen = set(), []
    for epoch in range(3):
        batches = epoch_batches(len(train), 0, 8, gen_fraction=None, seed=5, epoch=epoch)
        got = [b["index"].tolist() for b in loader.epoch(batches, 5, 0, epoch)]
        assert got == batches and len(loader) == len(batches)
        pids |= {w.pid for w in loader.loader._iterator._workers}
        seen.append(batches)
    assert len(pids) == 1  # the same worker process every epoch
    first = [b["img"] for b in loader.epoch(seen[0], 5, 0, 0)]
    again = [b["img"] for b in loader.epoch(seen[0], 5, 0, 0)]  # a replayed epoch: the same crops and flips
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].dtype == torch.float32 and first[0].shape == (8, 3, *SIZE)


def test_decoded_dataset_matches_the_jpeg_test_transform(tmp_path, tiny_split):
    """Test time (no augmentation): the cache path gives the JPEG path's tensors (paper: at the pre-crop size),
    up to float rounding of the normalisation."""
    recs = tiny_split.query[:4]
    for augment in ("pad_crop", "paper"):
        rows = decoded_rows(recs, cache_size(SIZE, augment), tmp_path)
        got = normalize(DecodedDataset(recs, rows).__getitems__(range(4))["img"])
        want = torch.stack([build_transform(SIZE, train=False, augment=augment)(Image.open(r.path).convert("RGB"))
                            for r in recs])
        assert got.shape[-2:] == (SIZE if augment == "pad_crop" else pre_crop_size(SIZE))
        assert torch.allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("model", ["ident", "twostream"])
def test_no_image_file_is_opened_after_the_first_epoch(model, tmp_path, tiny_root, tiny_store, tiny_cfg,
                                                       monkeypatch):
    from trainables import reid as reid_mod
    from trainables.reid import ReidInputs, run_spec, train_reid

    opened: list[tuple[int, str]] = []
    state = {"epoch": -1, "on": True}

    def hook(event, args):
        if event == "open" and state["on"] and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append((state["epoch"], os.fsdecode(args[0])))

    sys.addaudithook(hook)  # cannot be removed: switched off at the end
    real = reid_mod.train_one_epoch

    def counting(*a, epoch, **kw):
        state["epoch"] = epoch
        return real(*a, epoch=epoch, **kw)

    monkeypatch.setattr(reid_mod, "train_one_epoch", counting)
    cfg = tiny_cfg("reid.epochs=2", f"reid.model={model}", "labels.method=lsro", "labels.num_gan=8")
    try:
        res = train_reid(cfg.reid, cfg.labels, ReidInputs(str(tiny_root), str(tiny_store.root)),
                         run_spec(cfg.reid, tmp_path / "runs", "r"))
    finally:
        state["on"] = False
    images = [(e, p) for e, p in opened if p.endswith((".jpg", ".png")) or str(tiny_store.root) in p]
    assert any(e <= 0 for e, _ in images)  # epoch 0 (and before) decoded them into the cache
    assert [p for e, p in images if e >= 1] == []
    assert (tmp_path / "runs" / "decoded").is_dir() and 0 <= res["rank1"] <= 1


def test_decode_stage_builds_once_and_its_check_wants_every_file(tmp_path, tiny_root, tiny_split, tiny_cfg):
    from orchestrator.pipeline import DatasetOut, Paths, Plan, StageNode, StageResult, run_stage
    from orchestrator.stages import decode_node

    cfg = tiny_cfg()
    src = StageNode("dataset", "k", DatasetOut, (), {}, lambda folder: None)
    node = decode_node(cfg, src, str(tmp_path / "decoded"), {"CPU": 1})
    data = StageResult("dataset", "k", tmp_path, True, DatasetOut(str(tiny_root), ""))

    def run():
        return run_stage(Paths(tmp_path), node.stage, node.key, node.kind, lambda f: node.build(f, data), node.check)

    res = run()
    assert not res.cached and len(res.out.files) == 3 and res.out.size == list(SIZE)
    assert res.out.images == len(tiny_split.train) + len(tiny_split.query) + len(tiny_split.gallery)
    assert run().cached
    Path(res.out.files[0]).unlink()
    assert node.check(res.path, res.out) and not run().cached  # a missing file: rebuilt
    plan = Plan({}, "data", "", generate="gen", decoded="dec", decoded_gen="decg", smprl={0: "sm"})
    assert plan.needs("lsro", 0) == ("data", "dec", "gen", "decg") and plan.needs("baseline_matched", 0) == (
        "data", "dec")
    assert plan.needs("smprl", 0) == ("data", "dec", "decg", "sm")
