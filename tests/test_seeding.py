"""One seeding scheme (trainables/seeding.py): named streams, independent for distinct coordinates, reproducible,
and no module doing arithmetic on seeds."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.seeding import Stream, derive_seed, numpy_rng, seed_everything, torch_generator

ROOT = Path(__file__).parents[1]


def test_distinct_coordinates_and_streams_give_distinct_seeds():
    seeds = {derive_seed(stream, seed, rank, epoch) for stream in Stream for seed in range(3) for rank in range(3)
             for epoch in range(3)}
    assert len(seeds) == len(Stream) * 27
    assert derive_seed(Stream.GAN_EPOCH, 0, 1, 5) != derive_seed(Stream.GAN_EPOCH, 1, 0, 5)  # seed + rank would tie
    assert derive_seed(Stream.REID_EPOCH, 0, 0, 3) != derive_seed(Stream.REID_AUGMENT, 0, 0, 3)  # dropout vs crops


def test_streams_replay_exactly():
    assert np.array_equal(numpy_rng(Stream.REID_BATCHES, 2, 7).permutation(50),
                          numpy_rng(Stream.REID_BATCHES, 2, 7).permutation(50))
    assert torch.equal(torch.rand(5, generator=torch_generator(Stream.GENERATION, 0, 3)),
                       torch.rand(5, generator=torch_generator(Stream.GENERATION, 0, 3)))
    seed_everything(Stream.REID_INIT, 4, 0)
    a = torch.rand(3)
    seed_everything(Stream.REID_INIT, 4, 0)
    assert torch.equal(a, torch.rand(3))


def test_stream_values_are_unique():
    assert len({int(s) for s in Stream}) == len(Stream)


def _seed_arithmetic(path: Path) -> list[int]:
    """Lines of ``x + seed``, ``seed * 1000`` ...: a BinOp with an operand whose name ends in ``seed``."""
    def named_seed(node: ast.AST) -> bool:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return name.endswith("seed")

    tree = ast.parse(path.read_text(), str(path))
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.BinOp) and (named_seed(n.left) or named_seed(n.right))]


def test_no_module_does_arithmetic_on_seeds(tmp_path):
    found = [f"{path.relative_to(ROOT)}:{line}" for package in ("datasets", "trainables", "orchestrator", "bench")
             for path in sorted((ROOT / package).rglob("*.py")) for line in _seed_arithmetic(path)]
    assert found == []
    probe = tmp_path / "probe.py"  # the check itself finds what it looks for
    probe.write_text("def f(cfg, rank, seed):\n    return cfg.seed * 1000 + rank, seed + 1\n")
    assert len(_seed_arithmetic(probe)) == 2


def test_a_checkpoint_of_another_scheme_is_not_resumed():
    from trainables.seeding import STREAMS, check_streams

    check_streams({"streams": STREAMS}, "re-ID")
    for old in ({}, {"streams": STREAMS - 1}):  # written before the streams were named: scheme 1
        with pytest.raises(ValueError, match="re-ID checkpoint to resume was made under seeding scheme 1"):
            check_streams(old, "re-ID")


def test_the_stages_that_draw_random_numbers_key_on_the_scheme(monkeypatch):
    from orchestrator import stages
    from orchestrator.config import load_config

    cfg = load_config("smoke")
    before = stages.baseline_key(cfg)
    monkeypatch.setattr(stages, "STREAMS", 99)
    assert stages.baseline_key(cfg) != before
