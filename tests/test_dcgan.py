"""The GAN stage (trainables.dcgan, trainables.generation): one step, in-process run + resume, a real 2-worker
Ray Train run + resume (marked ``ray``), and generation into the store (count, determinism, resume, refusal, and
Ray helper actors: identical shards, a dead helper, unplaceable helpers)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.generated import GeneratedStore
from datasets.torch_data import read_record
from orchestrator.config import load_config, replace, to_dict
from orchestrator.train import main
from trainables import generation, runtime
from trainables.dcgan import GlobalBatchSampler, gan_loop, train_epoch, train_gan, train_step
from trainables.gan_models import Discriminator, Generator
from trainables.generation import export_generator, generate, read_export

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
    batches = [{"img": torch.zeros(4, 3, 32, 16)}, {"img": torch.full((4, 3, 32, 16), float("nan"))}]
    with pytest.raises(FloatingPointError, match="epoch 7, step 1"):
        train_epoch(G, D, opt_g, opt_d, batches, 16, torch.device("cpu"), 7)


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
            "--set", "dataset.synthetic_ids=4", "--num-images", "12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[gan] epoch 1/1" in out and "img/s" in out and "generated:" in out
    assert GeneratedStore(tmp_path / "generated").complete and (tmp_path / "samples.png").is_file()


# ------------------------------------------------------------------------------------- generation

def _export(tmp_path: Path, seed: int = 0, name: str = "generator.pt") -> Path:
    gan = _cfg(f"gan.seed={seed}").gan
    torch.manual_seed(seed)
    G = Generator(gan.latent_dim, gan.image_size, gan.g_width)
    return export_generator({"epoch": 0, "G": G.state_dict(), "gan_config": to_dict(gan)}, tmp_path / name)


def _pixels(store: GeneratedStore) -> np.ndarray:
    return np.concatenate([np.load(store.shard_path(c)) for c in range(store.num_chunks)])


def _shard_bytes(store: GeneratedStore) -> list[bytes]:
    return [store.shard_path(c).read_bytes() for c in range(store.num_chunks)]


def test_generate_writes_n_readable_images(tmp_path: Path) -> None:
    gen = generate(_export(tmp_path), tmp_path / "s", 23, chunk_size=10, device="cpu")
    store = gen.store
    assert store.complete and store.verify() == [] and len(store.records()) == 23
    assert (gen.root, gen.n) == (store.root, 23)
    assert sorted(os.listdir(tmp_path / "s" / "shards")) == ["00000.npy", "00001.npy", "00002.npy"]
    assert list(gen.workers.values()) == [3] and f"pid={os.getpid()}" in next(iter(gen.workers))
    pixels = _pixels(store)
    assert pixels.shape == (23, 32, 16, 3) and pixels.std() > 0
    r = store.records()[17]
    assert np.array_equal(np.asarray(read_record(r)), pixels[17])
    again = generate(_export(tmp_path), tmp_path / "s", 23, chunk_size=10)
    assert again.workers == {} and again.store.complete  # a complete store returns at once


def test_generate_is_deterministic_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _export(tmp_path)
    full = generate(gen, tmp_path / "full", 25, seed=3, chunk_size=10).store
    again = generate(gen, tmp_path / "again", 25, seed=3, chunk_size=10).store
    assert _shard_bytes(full) == _shard_bytes(again)
    other_seed = generate(gen, tmp_path / "seed4", 25, seed=4, chunk_size=10).store
    assert not np.array_equal(_pixels(full), _pixels(other_seed))

    real_render, calls = generation.render_chunk, []

    def interrupted(G, store, chunk, seed):  # renders the first shard, then crashes
        calls.append(chunk)
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return real_render(G, store, chunk, seed)

    monkeypatch.setattr(generation, "render_chunk", interrupted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(gen, tmp_path / "cut", 25, seed=3, chunk_size=10)
    monkeypatch.undo()
    cut = GeneratedStore(tmp_path / "cut")
    assert cut.missing_chunks() == [1, 2] and not cut.complete
    (tmp_path / "cut" / "shards" / ".00001.npy.x1y2").write_bytes(b"partial")  # a writer killed mid-shard
    resumed = generate(gen, tmp_path / "cut", 25, seed=3, chunk_size=10)
    assert resumed.store.complete and list(resumed.workers.values()) == [2]  # only the missing shards
    assert _shard_bytes(full) == _shard_bytes(resumed.store)
    assert sorted(os.listdir(tmp_path / "cut" / "shards")) == ["00000.npy", "00001.npy", "00002.npy"]


def test_store_of_another_generator_is_refused(tmp_path: Path) -> None:
    generate(_export(tmp_path, seed=0, name="g0.pt"), tmp_path / "s", 5)
    with pytest.raises(ValueError, match="other settings"):
        generate(_export(tmp_path, seed=1, name="g1.pt"), tmp_path / "s", 5)


def test_generate_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        generate(tmp_path / "missing.pt", tmp_path / "s", 5)
    torch.save({"G": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lacks"):
        generate(tmp_path / "bad.pt", tmp_path / "s", 5)
    with pytest.raises(ValueError, match="helpers=-1"):
        generate(_export(tmp_path), tmp_path / "s", 5, helpers=-1)


# ------------------------------------------------------------------------------------- real Ray

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


class _RecordedPool(generation._HelperPool):
    """The helper pool, remembered so that a test can reach its actors."""

    made: list = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)


def _caller_waits_for_helpers(monkeypatch: pytest.MonkeyPatch, kill_first: bool = False) -> None:
    """Make the caller's first shard wait until every helper runs (so helpers surely get shards); optionally
    kill the first helper then, after it started, so the shards it is handed fail."""
    import ray

    real_render = generation.render_chunk
    _RecordedPool.made.clear()
    monkeypatch.setattr(generation, "_HelperPool", _RecordedPool)

    def render(G, store, chunk, seed):
        if _RecordedPool.made and not getattr(render, "waited", False):
            render.waited = True
            actors = _RecordedPool.made[0].actors
            ray.get([a.ready.remote() for a in actors], timeout=120)
            if kill_first:
                ray.kill(actors[0])
                with pytest.raises(ray.exceptions.RayActorError):
                    for _ in range(60):
                        ray.get(actors[0].ready.remote(), timeout=10)
        return real_render(G, store, chunk, seed)

    monkeypatch.setattr(generation, "render_chunk", render)


def _wait_for_cpus(ray, cpus: float) -> bool:
    for _ in range(100):
        if ray.available_resources().get("CPU", 0) == cpus:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.ray
def test_helpers_render_identical_shards(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _export(tmp_path)
    alone = generate(gen, tmp_path / "alone", 25, chunk_size=2, helpers=0, device="cpu")
    assert len(alone.workers) == 1
    cpus = local_ray.available_resources().get("CPU", 0)
    _caller_waits_for_helpers(monkeypatch)
    helped = generate(gen, tmp_path / "helped", 25, chunk_size=2, helpers=2, device="cpu")
    assert helped.store.complete and helped.store.verify() == []
    assert len(helped.workers) == 3 and sum(helped.workers.values()) == 13  # caller + 2 helpers rendered
    assert _shard_bytes(helped.store) == _shard_bytes(alone.store)  # whoever renders a shard
    assert _wait_for_cpus(local_ray, cpus)  # the helpers were killed


@pytest.mark.ray
def test_a_dead_helper_gives_its_shards_back(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    gen = _export(tmp_path)
    _caller_waits_for_helpers(monkeypatch, kill_first=True)
    res = generate(gen, tmp_path / "s", 25, chunk_size=2, helpers=1, device="cpu")
    assert "a helper died" in capsys.readouterr().out
    assert res.store.complete and res.store.verify() == [] and sum(res.workers.values()) == 13
    alone = generate(gen, tmp_path / "alone", 25, chunk_size=2, helpers=0, device="cpu")
    assert _shard_bytes(res.store) == _shard_bytes(alone.store)


@pytest.mark.ray
def test_unplaceable_helpers_are_not_waited_for(local_ray, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    res = generate(_export(tmp_path), tmp_path / "s", 25, chunk_size=2, helpers=2, helper_resources={"num_cpus": 64})
    assert res.store.complete and list(res.workers.values()) == [13] and time.perf_counter() - t0 < 30


def test_gan_images_are_the_transform_of_the_cache_rows() -> None:
    from trainables.dcgan import gan_images

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

    from trainables import dcgan

    opened, state = [], {"on": False}

    def hook(event, args):
        if event == "open" and state["on"] and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # cannot be removed: switched off at the end
    real = dcgan.train_epoch

    def counting(*a, **kw):
        state["on"] = True
        try:
            return real(*a, **kw)
        finally:
            state["on"] = False

    cfg = _cfg("gan.epochs=2")
    try:
        dcgan.train_epoch = counting
        train_gan(cfg.gan, tiny_root, tmp_path, "gan")
    finally:
        dcgan.train_epoch, state["on"] = real, False
    assert list((tmp_path / "decoded").glob("decoded-32x16-*.npy"))
    root = str(Path(tiny_root).resolve())  # the checkpoint thread may write a samples.png meanwhile: not an input
    images = [p for p in opened if p.startswith(root)]
    assert not images, images[:5]  # only the cache's memmap is read
    assert any("/decoded/decoded-32x16-" in p for p in opened)
