"""Faults and bad input: nothing is lost, errors name what is wrong."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_config
from tests.sweep_output import trial_table
from trainables import faults
from trainables.config import ReidInputs
from trainables.reid.loop import load_trained, run_spec, train_reid

ROOT = Path(__file__).parents[1]


def _cfg(tiny_cfg, *extra):
    return tiny_cfg("reid.epochs=3", "labels.method=lsro", "labels.num_gan=16", "reid.checkpoint_every=1", *extra)


def _train(cfg, inputs, parent, name, max_failures=0, **kw):
    run = run_spec(cfg.reid, parent, name, num_workers=cfg.reid.num_workers, max_failures=max_failures)
    return train_reid(cfg.reid, cfg.labels, inputs, run, **kw)


def test_failure_plan_parsing():
    plan = faults.FailurePlan.parse("rank=1,epoch=2,step=3,mode=exit,match=lsro")
    assert (plan.rank, plan.epoch, plan.step, plan.mode, plan.match) == (1, 2, 3, "exit", "lsro")
    for bad in ("rank=1", "epoch=x", "epoch=1,mode=boom", "epoch=1,colour=red"):
        with pytest.raises(ValueError, match=faults.FAILURE_ENV):
            faults.FailurePlan.parse(bad)


def test_in_process_failure_then_rerun_matches_uninterrupted(tmp_path, tiny_root, tiny_store, tiny_cfg):
    """A run that dies mid-epoch and is restarted ends exactly where an uninterrupted run ends."""
    cfg = _cfg(tiny_cfg)
    inputs = ReidInputs(str(tiny_root), str(tiny_store.root))
    clean = _train(cfg, inputs, tmp_path / "runs", "clean")
    with pytest.raises(RuntimeError, match="injected failure at rank 0, epoch 1, step 1"):
        _train(cfg, inputs, tmp_path / "runs", "faulty", inject_failure="rank=0,epoch=1,step=1,mode=raise")
    _, state = load_trained(tmp_path / "runs" / "faulty")
    assert state["epoch"] == 0  # the finished epoch's checkpoint survived the crash
    resumed = _train(cfg, inputs, tmp_path / "runs", "faulty", inject_failure="rank=0,epoch=1,step=1,mode=raise")
    for k in ("rank1", "rank5", "mAP"):
        assert getattr(resumed, k) == pytest.approx(getattr(clean, k), abs=1e-6)


@pytest.mark.slow
@pytest.mark.ray
def test_killed_ray_train_worker_is_retried(tmp_path, tiny_root, tiny_store, tiny_cfg, local_ray):
    """Rank 1 dies (os._exit) mid-epoch; FailureConfig restarts the group from the last checkpoint."""
    cfg = _cfg(tiny_cfg, "reid.num_workers=2", "reid.batch_size=16")
    inputs = ReidInputs(str(tiny_root), str(tiny_store.root))
    clean = _train(cfg, inputs, tmp_path / "runs", "clean")
    faulty = _train(cfg, inputs, tmp_path / "runs", "faulty", max_failures=1,
                    inject_failure="rank=1,epoch=1,step=1,mode=exit")
    assert (tmp_path / "runs" / "faulty" / ".failure_injected").is_file()
    for k in ("rank1", "mAP"):
        assert getattr(faulty, k) == pytest.approx(getattr(clean, k), abs=1e-3)


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_retries_transient_and_reports_permanent_failures(tmp_path):
    from orchestrator import tracking

    env = {**os.environ, faults.FAILURE_ENV: "rank=0,epoch=1,step=0,mode=raise,match=lsro"}
    cmd = [sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke", "--set", f"cluster.storage_path={tmp_path}",
           "--set", "cluster.num_cpus=3", "--set", "reid.epochs=2", "--set", "sweep.max_failures=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client, exp_id = tracking.setup(tracking.default_tracking_uri(tmp_path), "mprl", tmp_path)
    trials = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert sorted(t.info.run_name.split("-")[0] for t in trials) == ["baseline", "dmprl2", "lsro"]  # one run each
    assert all(t.info.status == "FINISHED" for t in trials)
    assert list((tmp_path / "trials").glob("*/lsro*/.failure_injected"))
    stats = res.stdout[res.stdout.index("over seeds"):]  # the statistics block follows the per-trial table
    assert "Δr1 vs baseline" in stats and "one seed: no test" in stats

    # a permanent failure: reported in the table with its error, the other trials complete
    env[faults.FAILURE_ENV] = "rank=0,epoch=0,step=0,mode=always,match=dmprl2"
    res = subprocess.run([*cmd, "--set", "sweep.methods=[lsro, dmprl2]", "--set", "reid.seed=5"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 1
    table = trial_table(res.stdout)
    dm = next(line for line in table.splitlines() if line.startswith("dmprl2"))
    ls = next(line for line in table.splitlines() if line.startswith("lsro"))
    assert "FAILED" in dm and "injected permanent failure" in dm and "FAILED" not in ls


# ----------------------------------------------------------------------------------------- bad input

def _sweep(tmp_path, *args, env=None, timeout=120):
    cmd = [sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke",
           "--set", f"cluster.storage_path={tmp_path}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--set", "labels.num_gan=-5"], "labels.num_gan=-5 must be >= 0"),
    (["--set", "sweep.methods=[lsro, dmpr2]"], "sweep.methods='dmpr2' is not valid"),
    (["--set", "reid.batch_size=33", "--set", "reid.num_workers=2"], "reid.batch_size=33 is not divisible"),
    (["--set", "reid.learning_rate=0.1"], "unknown config key 'reid.learning_rate'"),
    (["--set", "dataset.name=market1501", "--set", "dataset.root=/nonexistent/market",
      "--set", "reid.pretrained=random"],
     "dataset root not found: /nonexistent/market"),
    (["--set", "reid.num_workers=8", "--set", "cluster.num_cpus=3"], "reid.num_workers=8 needs 9 CPUs"),
    (["--tracking-uri", "http://127.0.0.1:9"], "not reachable"),
])
def test_bad_input_fails_fast_naming_the_field(tmp_path, args, message):
    res = _sweep(tmp_path, *args)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert message in res.stderr
    assert not (tmp_path / "stages").exists()  # nothing expensive started


def test_synthetic_root_outside_storage_is_not_written(tmp_path):
    from orchestrator.stages import dataset_root

    cfg = load_config("smoke", overrides=[f"dataset.root={tmp_path / 'elsewhere'}"])
    with pytest.raises(ValueError, match="dataset.root"):
        dataset_root(cfg.dataset, tmp_path / "cache")
    assert not (tmp_path / "elsewhere").exists()


def test_single_run_cli_refuses_a_missing_store_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, "-m", "orchestrator.train", "reid", "--preset", "smoke", "--label-method",
                          "lsro", "--num-gan", "8", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "needs --gan-store DIR" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # no dataset drawn, no run folder, no Ray started
