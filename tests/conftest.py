"""Shared fixtures: a tiny synthetic Market-format dataset (session-scoped; ~1 s to draw)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

TINY = dict(ids=6, images_per_id=6, distractors=5, junk=4, size=(64, 32), seed=3)


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


def tiny_reid_overrides(tmp_path) -> list[str]:
    """Overrides that make one re-ID epoch on the tiny dataset take about a second."""
    return ["reid.image_size=[32, 16]", "reid.batch_size=16", "reid.embed_dim=32", "reid.loader_workers=0",
            "reid.num_workers=0", f"cluster.storage_path={tmp_path}"]
