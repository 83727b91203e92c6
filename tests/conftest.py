"""Shared fixtures: a tiny synthetic Market-format dataset and generated store, config factories, one Ray.

Importing :mod:`orchestrator` sets the Ray/MLflow environment defaults (orchestrator/env.py) before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

import orchestrator  # noqa: F401  (environment defaults)

TINY = dict(ids=6, images_per_id=6, distractors=5, junk=4, size=(64, 32), seed=3)


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    """The arguments of ``datasets.synthetic.generate`` that draw the tiny dataset."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "tiny"
    generate(root, workers=1, **TINY)
    return root


@pytest.fixture(scope="session")
def tiny_split(tiny_root: Path):
    from datasets.market1501 import load

    return load(tiny_root)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_split):
    """A complete generated-image store of 24 images (gallery crops stand in for GAN output)."""
    import numpy as np
    from PIL import Image

    from datasets.generated import GeneratedStore

    store = GeneratedStore.create(tmp_path_factory.mktemp("gen") / "store", n=24, image_size=(32, 16),
                                  meta={"test": True}, chunk_size=10)
    imgs = np.stack([np.asarray(Image.open(r.path).convert("RGB").resize((16, 32)))
                     for r in tiny_split.gallery[:24]])
    for c in store.missing_chunks():
        a, b = store.chunk_range(c)
        store.write_chunk(c, imgs[a:b])
    store.finalize()
    return store


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides that make one re-ID epoch on the tiny dataset take about a second (storage in tmp_path)."""
    return ["reid.image_size=[32, 16]", "reid.batch_size=16", "reid.embed_dim=32", "reid.loader_workers=0",
            "reid.num_workers=0", f"cluster.storage_path={tmp_path}"]


@pytest.fixture
def tiny_cfg(tiny_overrides: list[str]) -> Callable[..., "object"]:
    """``tiny_cfg("labels.method=lsro", ...)``: the smoke preset with the tiny overrides, then these."""
    from orchestrator.config import load_config

    return lambda *extra: load_config("smoke", overrides=[*tiny_overrides, *extra])


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def local_ray(_ray_session):
    """A local Ray instance (3 CPUs), started once and shared by the tests that need real Ray.

    Tests that build their own cluster (multi-node on loopback) shut it down first; the next user starts it again.
    """
    import ray

    if not ray.is_initialized():
        from orchestrator.cluster import start_local_ray

        start_local_ray(3, object_store_memory=150 * 1024**2)
    return ray
