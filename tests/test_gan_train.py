"""DCGAN training (trainables/gan/train.py): one step, the global batches, an in-process run with checkpoints and
resume, the export, the decoded-cache input, the CLI, and a real 2-worker Ray Train run + resume (marked ``ray``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.generated import GeneratedStore
from orchestrator.config import load_config, replace, to_dict
from orchestrator.train import main
from trainables import runtime
from trainables.gan.nets import Discriminator, Generator
from trainables.gan.sample import read_export
from trainables.gan.train import GlobalBatchSampler, gan_images, gan_loop, train_epoch, train_gan, train_step

TINY_GAN = ["gan.image_size=[32,16]", "gan.g_width=8", "gan.d_width=8", "gan.batch_size=8", "gan.num_workers=0",
            "gan.latent_dim=16"]


def _cfg(*extra: str):
    return load_config("smoke", overrides=[*TINY_GAN, *extra])


def _fit(cfg, root: Path, parent: Path, name: str = "gan") -> dict:
    spec = runtime.RunSpec(name=name, storage_path=str(parent), num_workers=cfg.gan.num_workers)
    return runtime.fit(gan_loop, {"gan": to_dict(cfg.gan), "data_root": str(root)}, spec)


def _state(run_dir: Path) -> dict:
    return torch.load(runtime.latest_checkpoint(run_dir) / runtime.STATE_FILE, weights_only=True)


# ------------------------------------------------------------------------------------- training

def test_one_step_leaves_losses_and_parameters_finite() -> None:
    torch.manual_seed(0)
    G, D = Generator(16, (32, 16), 8), Discriminator((32, 16), 8)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999)) for m in (G, D))
    before = [p.detach().clone() for p in G.parameters()]
    vals = train_step(G, D, opt_g, opt_d, torch.rand(8, 3, 32, 16) * 2 - 1, 16)
    assert vals.shape == (4,) and torch.isfinite(vals).all() and 0 < vals[2] < 1 and 0 < vals[3] < 1
    assert all(torch.isfinite(p).all() for p in (*G.parameters(), *D.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, G.parameters()))


def test_non_finite_loss_names_epoch_and_step() -> None:
    G, D = Generator(16, (32, 16), 8), Discriminator((32, 16), 8)
    opt_g, opt_d = (torch.optim.Adam(m.parameters()) for m in (G, D))

    def batches():  # uint8 rows, as the loader gives them; D turns to NaN after the first step
        yield {"img": torch.zeros(4, 32, 16, 3, dtype=torch.uint8)}
        with torch.no_grad():
            D.head.weight.fill_(float("nan"))
        yield {"img": torch.zeros(4, 32, 16, 3, dtype=torch.uint8)}

    with pytest.raises(FloatingPointError, match="epoch 7, step 1"):
        train_epoch(G, D, opt_g, opt_d, batches(), 16, torch.device("cpu"), 7)


def test_global_batches_do_not_depend_on_world_size() -> None:
    one = list(GlobalBatchSampler(37, 8, 0, 1, seed=5))
    parts = [list(GlobalBatchSampler(37, 8, r, 2, seed=5)) for r in range(2)]
    assert len(one) == 32 and all(len(p) == 16 for p in parts)
    for step in range(4):  # global batch `step` = rank 0's 4 + rank 1's 4, in order
        assert one[step * 8:(step + 1) * 8] == parts[0][step * 4:(step + 1) * 4] + parts[1][step * 4:(step + 1) * 4]
    s = GlobalBatchSampler(37, 8, 0, 1, seed=5)
    s.set_epoch(1)
    assert list(s) != one


def test_in_process_run_writes_checkpoints_and_resumes(tiny_root: Path, tmp_path: Path) -> None:
    cfg = _cfg("gan.epochs=2")
    assert _fit(cfg, tiny_root, tmp_path / "a")["epoch"] == 1
    run = tmp_path / "a" / "gan"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000001"]  # the latest kept
    with Image.open(run / "checkpoint_000001" / "samples.png") as im:
        assert im.size == (8 * 16 + 9 * 2, 8 * 32 + 9 * 2)  # 8x8 grid of 32x16 images, 2 px padding
    state = _state(run)
    assert state["epoch"] == 1 and set(state) >= {"G", "D", "opt_g", "opt_d", "gan_config"}

    resumed = _fit(replace(cfg, **{"gan.epochs": 3}), tiny_root, tmp_path / "a")
    assert resumed["epoch"] == 2 and np.isfinite([resumed["loss_d"], resumed["loss_g"]]).all()
    names = sorted(p.name for p in run.glob("checkpoint_*"))
    assert names == ["checkpoint_000002"]  # one new checkpoint, counter continued, the latest kept
    # per-epoch seeding: 2 epochs + 1 resumed epoch == 3 uninterrupted epochs
    _fit(replace(cfg, **{"gan.epochs": 3}), tiny_root, tmp_path / "b")
    straight = _state(tmp_path / "b" / "gan")
    assert _state(run)["epoch"] == straight["epoch"] == 2
    for k, v in straight["G"].items():
        torch.testing.assert_close(_state(run)["G"][k], v, msg=k)


def test_in_process_resumes_a_ray_layout_checkpoint(tiny_root: Path, tmp_path: Path) -> None:
    _fit(_cfg("gan.epochs=1"), tiny_root, tmp_path)
    run = tmp_path / "gan"
    ray_style = run / "checkpoint_2026-01-01_00-00-00.000000"  # what a Ray Train run leaves
    (run / "checkpoint_000000").rename(ray_style)
    assert _fit(_cfg("gan.epochs=2"), tiny_root, tmp_path)["epoch"] == 1
    assert runtime.latest_checkpoint(run) == run / "checkpoint_000000" and _state(run)["epoch"] == 1
    assert not ray_style.exists()  # the latest kept


def test_train_gan_exports_once(tiny_root: Path, tmp_path: Path) -> None:
    cfg = _cfg("gan.epochs=1")
    path = train_gan(cfg.gan, tiny_root, tmp_path, "g")
    data = read_export(path)
    assert path == tmp_path / "g" / "generator.pt"
    assert (data["epochs"], data["image_size"], data["latent_dim"], data["g_width"]) == (1, [32, 16], 16, 8)
    mtime = path.stat().st_mtime_ns
    assert train_gan(cfg.gan, tiny_root, tmp_path, "g") == path and path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="gan.g_width=8"):  # same run name, other architecture
        train_gan(replace(cfg, **{"gan.g_width": 16, "gan.epochs": 2}).gan, tiny_root, tmp_path, "g")


def test_batch_larger_than_dataset(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gan.batch_size=512"):
        _fit(_cfg("gan.batch_size=512"), tiny_root, tmp_path)


def test_cli_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["gan", "--preset", "smoke", "--out", str(tmp_path), "--set", "gan.num_workers=0", "--set", "gan.epochs=1",
            "--set", "dataset.synthetic_ids=4", "--num-images", "12", "--set", f"cluster.storage_path={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[gan] epoch 1/1" in out and "img/s" in out and "generated:" in out
    assert GeneratedStore(tmp_path / "generated").complete and (tmp_path / "samples.png").is_file()


@pytest.mark.ray
def test_two_worker_ray_run_and_resume(local_ray, tiny_root: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke", overrides=["gan.num_workers=2", "gan.epochs=1"])
    assert _fit(cfg, tiny_root, tmp_path)["epoch"] == 0
    run = tmp_path / "gan"
    first = runtime.latest_checkpoint(run)
    assert first is not None and _state(run)["epoch"] == 0 and (first / "samples.png").is_file()

    path = train_gan(replace(cfg, **{"gan.epochs": 2}).gan, tiny_root, tmp_path, "gan")  # same name: resumes
    assert read_export(path)["epochs"] == 2 and _state(run)["epoch"] == 1
    assert runtime.latest_checkpoint(run) != first and not first.exists()  # the latest kept (num_to_keep=1)


def test_gan_images_scale_rows_to_minus_one_one_and_flip_half() -> None:
    img = torch.randint(0, 256, (400, 4, 3, 3), dtype=torch.uint8)
    torch.manual_seed(0)
    x = gan_images(img, torch.device("cpu"))
    ref = img.permute(0, 3, 1, 2).float() / 127.5 - 1  # ToTensor + Normalize(0.5, 0.5)
    flipped = (x - ref.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    same = (x - ref).abs().amax((1, 2, 3)) < 1e-5
    assert bool((flipped | same).all()) and x.min() >= -1 and x.max() <= 1
    assert 0.4 < flipped[~same].float().sum() / len(x) < 0.6  # each image flipped with probability 1/2


def test_train_gan_reads_the_decoded_cache_and_opens_no_image_after_it(tiny_root: Path, tmp_path: Path) -> None:
    """train_gan decodes the training images once into ``<parent>/decoded`` at gan.image_size; its epochs open no
    image file."""
    import sys

    from trainables.gan import train as gan_train

    opened, state = [], {"on": False}

    def hook(event, args):
        if event == "open" and state["on"] and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # cannot be removed: switched off at the end
    real = gan_train.train_epoch

    def counting(*a, **kw):
        state["on"] = True
        try:
            return real(*a, **kw)
        finally:
            state["on"] = False

    cfg = _cfg("gan.epochs=2")
    try:
        gan_train.train_epoch = counting
        train_gan(cfg.gan, tiny_root, tmp_path, "gan")
    finally:
        gan_train.train_epoch, state["on"] = real, False
    assert list((tmp_path / "decoded").glob("decoded-32x16-*.npy"))
    root = str(Path(tiny_root).resolve())  # the checkpoint thread may write a samples.png meanwhile: not an input
    images = [p for p in opened if p.startswith(root)]
    assert not images, images[:5]  # only the cache's memmap is read
    assert any("/decoded/decoded-32x16-" in p for p in opened)
