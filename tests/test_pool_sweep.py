"""Pools as a sweep dimension (labels.pool, sweep.pools; orchestrator/trials.py, orchestrator/stages.py): the
config checks, the trials on another pool, the stages each pool gets, and a folder checked before any cluster time."""

from pathlib import Path

import pytest
from PIL import Image

from orchestrator import stages
from orchestrator.config import load_config, replace
from orchestrator.stage_cache import Paths
from orchestrator.trials import TrialSpec, build_trials


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 32), (i * 7 % 255, 40, 90)).save(root / f"{i:03d}.png")
    return root


def test_pool_choices_and_their_requirements_are_checked():
    with pytest.raises(ValueError, match="labels.pool='stylegan'.*choose one of"):
        load_config("smoke", overrides=["labels.pool=stylegan"])
    with pytest.raises(ValueError, match="labels.pool=folder needs labels.pool_root"):
        load_config("smoke", overrides=["labels.pool=folder"])
    with pytest.raises(ValueError, match="needs labels.pool_root"):
        load_config("smoke", overrides=["sweep.pools=[folder]"])
    with pytest.raises(ValueError, match="repeats a pool or labels.pool='gan'"):
        load_config("smoke", overrides=["sweep.pools=[gan]"])
    with pytest.raises(ValueError, match="synthetic_ids pool .* needs dataset.name=synthetic"):
        load_config("paper", overrides=["dataset.root=/x", "sweep.pools=[synthetic_ids]"])
    with pytest.raises(ValueError, match="sweep.pool_methods contains 'smprl'"):
        load_config("smoke", overrides=["sweep.pools=[synthetic_ids]", "sweep.pool_methods=[smprl]"])


def test_trials_on_another_pool():
    """sweep.pools: the generated methods of pool_methods again on each pool (keys parse back, the trial's config
    names the pool); the real-only methods and sMpRL are not repeated."""
    cfg = load_config("smoke", overrides=["sweep.methods=[baseline, lsro, smprl, dmprl2, baseline_matched]",
                                          "sweep.pools=[synthetic_ids]", "sweep.seeds=[0, 1]"])
    pooled = [t for t in build_trials(cfg) if t.pool]
    assert sorted(t.key for t in pooled if t.seed == 0) == ["dmprl2-n64-paper-kall-s0-psynthetic_ids",
                                                           "lsro-n64-paper-kall-s0-psynthetic_ids"]
    assert len(pooled) == 4
    for t in pooled:
        assert TrialSpec.from_key(t.key) == t
        assert replace(cfg, **t.overrides()).labels.pool == "synthetic_ids"
    only = load_config("smoke", overrides=["sweep.pools=[synthetic_ids]", "sweep.pool_methods=[lsro]"])
    assert [t.method for t in build_trials(only) if t.pool] == ["lsro"]
    t = TrialSpec("lsro", 64, "paper", None, 0, "paper", "folder")  # both suffixes
    assert TrialSpec.from_key(t.key) == t


def test_each_pool_gets_its_stages_and_its_trials_read_them(tmp_path):
    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "sweep.pools=[synthetic_ids]"])
    plan = stages.plan_stages(cfg, Paths(tmp_path), [("lsro", 64, 0), ("baseline", 0, 0)], {"synthetic_ids": 64})
    (pool,) = plan.pools.values()
    assert pool.writer.startswith("pool-") and plan.nodes[pool.writer].stage == "pool"
    assert plan.generate.startswith("generate-") and plan.gan.startswith("gan-")
    assert plan.nodes[pool.quality].deps[-1] == pool.writer  # its own quality measure
    assert plan.needs("lsro", 0, pool="synthetic_ids")[-2:] == (pool.writer, pool.decoded_gen)
    assert plan.generate not in plan.needs("lsro", 0, pool="synthetic_ids")
    # labels.pool=synthetic_ids: no GAN trained at all
    alone = stages.plan_stages(replace(cfg, **{"labels.pool": "synthetic_ids", "sweep.pools": []}), Paths(tmp_path),
                               [("lsro", 64, 0)])
    assert alone.gan is None and alone.generate.startswith("pool-")
    assert not any(n.stage in ("gan", "generate") for n in alone.nodes.values())


def test_a_folder_pool_is_checked_before_any_cluster_time_and_keyed_on_its_files(tmp_path):
    folder = _folder(tmp_path / "imgs", 5)
    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "labels.pool=folder",
                                          f"labels.pool_root={folder}"])
    with pytest.raises(ValueError, match=r"holds 5 image files .* fewer than the 64"):
        stages.check_pools(cfg, 64)
    stages.check_pools(cfg, 5)
    missing = replace(cfg, **{"labels.pool_root": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="labels.pool_root=.*nope does not exist"):
        stages.check_pools(missing, 5)
    key = stages.plan_stages(cfg, Paths(tmp_path), [("lsro", 5, 0)]).generate
    Image.new("RGB", (16, 33), (1, 2, 3)).save(folder / "002.png")  # a changed image: a new pool stage
    assert stages.plan_stages(cfg, Paths(tmp_path), [("lsro", 5, 0)]).generate != key
