"""Sampling the generated-image store (trainables/gan/sample.py): count, determinism, resume, refusal, errors, and
Ray helper actors (identical shards, a dead helper, unplaceable helpers; marked ``ray``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.generated import GeneratedStore
from datasets.images import read_record
from orchestrator.config import load_config, to_dict
from trainables.gan import sample as generation
from trainables.gan.nets import Generator
from trainables.gan.sample import export_generator, generate

TINY_GAN = ["gan.image_size=[32,16]", "gan.g_width=8", "gan.d_width=8", "gan.latent_dim=16"]
CPU = torch.device("cpu")


def _export(tmp_path: Path, seed: int = 0, name: str = "generator.pt") -> Path:
    """A generator file of a randomly initialised tiny G (what the GAN stage exports)."""
    gan = load_config("smoke", overrides=[*TINY_GAN, f"gan.seed={seed}"]).gan
    torch.manual_seed(seed)
    G = Generator(gan.latent_dim, gan.image_size, gan.g_width)
    return export_generator({"epoch": 0, "G": G.state_dict(), "gan_config": to_dict(gan)}, tmp_path / name)


def _pixels(store: GeneratedStore) -> np.ndarray:
    return np.concatenate([np.load(store.shard_path(c)) for c in range(store.num_chunks)])


def _shard_bytes(store: GeneratedStore) -> list[bytes]:
    return [store.shard_path(c).read_bytes() for c in range(store.num_chunks)]


def test_generate_writes_n_readable_images(tmp_path: Path) -> None:
    gen = generate(_export(tmp_path), tmp_path / "s", 23, chunk_size=10, device=CPU)
    store = gen.store
    assert store.complete and store.verify() == [] and len(store.records()) == 23
    assert (gen.root, gen.n) == (store.root, 23)
    assert sorted(os.listdir(tmp_path / "s" / "shards")) == ["00000.npy", "00001.npy", "00002.npy"]
    assert list(gen.workers.values()) == [3] and next(iter(gen.workers)).endswith(f" pid {os.getpid()}")
    pixels = _pixels(store)
    assert pixels.shape == (23, 32, 16, 3) and pixels.std() > 0
    r = store.records()[17]
    assert np.array_equal(np.asarray(read_record(r)), pixels[17])
    again = generate(_export(tmp_path), tmp_path / "s", 23, chunk_size=10, device=CPU)
    assert again.workers == {} and again.store.complete  # a complete store returns at once


def test_generate_is_deterministic_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _export(tmp_path)
    full = generate(gen, tmp_path / "full", 25, seed=3, chunk_size=10, device=CPU).store
    again = generate(gen, tmp_path / "again", 25, seed=3, chunk_size=10, device=CPU).store
    assert _shard_bytes(full) == _shard_bytes(again)
    other_seed = generate(gen, tmp_path / "seed4", 25, seed=4, chunk_size=10, device=CPU).store
    assert not np.array_equal(_pixels(full), _pixels(other_seed))

    real_render, calls = generation.render_chunk, []

    def interrupted(G, store, chunk, seed, *render):  # renders the first shard, then crashes
        calls.append(chunk)
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return real_render(G, store, chunk, seed, *render)

    monkeypatch.setattr(generation, "render_chunk", interrupted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(gen, tmp_path / "cut", 25, seed=3, chunk_size=10, device=CPU)
    monkeypatch.undo()
    cut = GeneratedStore(tmp_path / "cut")
    assert cut.missing_chunks() == [1, 2] and not cut.complete
    (tmp_path / "cut" / "shards" / ".00001.npy.x1y2").write_bytes(b"partial")  # a writer killed mid-shard
    resumed = generate(gen, tmp_path / "cut", 25, seed=3, chunk_size=10, device=CPU)
    assert resumed.store.complete and list(resumed.workers.values()) == [2]  # only the missing shards
    assert _shard_bytes(full) == _shard_bytes(resumed.store)
    assert sorted(os.listdir(tmp_path / "cut" / "shards")) == ["00000.npy", "00001.npy", "00002.npy"]


def test_store_of_another_generator_is_refused(tmp_path: Path) -> None:
    generate(_export(tmp_path, seed=0, name="g0.pt"), tmp_path / "s", 5, device=CPU)
    with pytest.raises(ValueError, match="other settings"):
        generate(_export(tmp_path, seed=1, name="g1.pt"), tmp_path / "s", 5, device=CPU)


def test_generate_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        generate(tmp_path / "missing.pt", tmp_path / "s", 5, device=CPU)
    torch.save({"G": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lacks"):
        generate(tmp_path / "bad.pt", tmp_path / "s", 5, device=CPU)
    with pytest.raises(ValueError, match="helpers=-1"):
        generate(_export(tmp_path), tmp_path / "s", 5, helpers=-1, device=CPU)


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

    def render(G, store, chunk, seed, *rendering):
        if _RecordedPool.made and not getattr(render, "waited", False):
            render.waited = True
            actors = _RecordedPool.made[0].actors
            ray.get([a.ready.remote() for a in actors], timeout=120)
            if kill_first:
                ray.kill(actors[0])
                with pytest.raises(ray.exceptions.RayActorError):
                    for _ in range(60):
                        ray.get(actors[0].ready.remote(), timeout=10)
        return real_render(G, store, chunk, seed, *rendering)

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
    alone = generate(gen, tmp_path / "alone", 25, chunk_size=2, helpers=0, device=CPU)
    assert len(alone.workers) == 1
    cpus = local_ray.available_resources().get("CPU", 0)
    _caller_waits_for_helpers(monkeypatch)
    helped = generate(gen, tmp_path / "helped", 25, chunk_size=2, helpers=2, device=CPU)
    assert helped.store.complete and helped.store.verify() == []
    assert len(helped.workers) == 3 and sum(helped.workers.values()) == 13  # caller + 2 helpers rendered
    assert _shard_bytes(helped.store) == _shard_bytes(alone.store)  # whoever renders a shard
    assert _wait_for_cpus(local_ray, cpus)  # the helpers were killed


@pytest.mark.ray
def test_a_dead_helper_gives_its_shards_back(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    gen = _export(tmp_path)
    _caller_waits_for_helpers(monkeypatch, kill_first=True)
    res = generate(gen, tmp_path / "s", 25, chunk_size=2, helpers=1, device=CPU)
    assert "a helper died" in capsys.readouterr().out
    assert res.store.complete and res.store.verify() == [] and sum(res.workers.values()) == 13
    alone = generate(gen, tmp_path / "alone", 25, chunk_size=2, helpers=0, device=CPU)
    assert _shard_bytes(res.store) == _shard_bytes(alone.store)


@pytest.mark.ray
def test_unplaceable_helpers_are_not_waited_for(local_ray, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    res = generate(_export(tmp_path), tmp_path / "s", 25, chunk_size=2, helpers=2, helper_resources={"num_cpus": 64},
                   device=CPU)
    assert res.store.complete and list(res.workers.values()) == [13] and time.perf_counter() - t0 < 30


