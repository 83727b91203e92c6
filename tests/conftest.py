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
