"""ASHA early stopping end to end, in both trial shapes (slow: ~1.5 min in-process, ~3.5 min with a 2-worker
Train run per trial, on 2 CPU cores). Put it in tests/ (e.g. tests/test_asha.py); run with `pytest -m slow`.

What it guards against (Ray 2.60):
* in-process trials: Tune stops a function trial by raising SystemExit(0) inside ray.tune.report; run_trial must not
  record that as a failure (it used to: "FAILED: SystemExit: 0", exit code 1);
* trials that drive a Ray Train run (reid.num_workers=2): reuse_actors=True made the next trial's reset fail
  ("Trainable runner reuse requires reset_config() ...") and Tune then waited forever; and the stopped run's
  worker placement group must be freed (PlacementGroupCleaner + State API), or the next trial waits forever.

Deterministic early stop: with sweep.max_concurrent=1 the grid runs in order baseline -> lsro -> dmprl2. The baseline
trial reuses the baseline stage and reports that stage's final metrics (epoch = reid.epochs - 1 = 1) as its
training_iteration 1. ASHA's only rung is at iteration 1 (grace_period = eval_every = 1, max_t = epochs = 2,
reduction_factor 4), so ranking on sweep.asha_metric=epoch (mode max) records 1 for the baseline, and lsro and
dmprl2, which report epoch 0 at iteration 1, fall below the cutoff (1, then the 75th percentile of {1, 0}) and are
stopped, whatever their accuracy. With the default metric (val_rank1) whether a trial is stopped depends on the
numbers. (The reused baseline reports no validation metric, so with val_rank1 it never biases ASHA's rungs.)
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.sweep_output import trial_table

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 840  # a hang fails the test (under pytest's 900 s timeout) instead of blocking CI


def _run_sweep(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke",
           "--set", f"cluster.storage_path={tmp_path}", "--set", "cluster.num_cpus=3",
           "--set", "sweep.asha=true", "--set", "reid.eval_every=1", "--set", "reid.val_ids=2",
           "--set", "sweep.asha_metric=epoch", "--set", "sweep.max_concurrent=1", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
        out, _ = proc.communicate()
        pytest.fail(f"sweep hung for {TIMEOUT_S} s; last output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


@pytest.mark.parametrize("shape", [[], ["--set", "reid.num_workers=2"]], ids=["in_process", "train_workers"])
def test_asha_early_stop_is_a_clean_stop(tmp_path, shape):
    # The baseline stage first (a one-trial sweep): in the ASHA sweep its stage is cached, so the baseline trial is
    # the only one ready at the start and runs first; it reports its last epoch (1) at iteration 1, and ASHA on
    # `epoch` then stops lsro and dmprl2, which are at epoch 0 there. (Without it, trials start in the order their
    # inputs appear, longest first, and which one ASHA stops would depend on timing.)
    assert _run_sweep(tmp_path, *shape, "--set", "sweep.methods=[baseline]").returncode == 0
    res = _run_sweep(tmp_path, *shape)
    assert res.returncode == 0, res.stdout[-4000:]
    table = trial_table(res.stdout)
    assert "FAILED" not in table and "SystemExit" not in table  # (Ray may log a torn-down actor's SystemExit)
    assert "Could not re-use actor" not in res.stdout
    for method in ("lsro", "dmprl2"):
        assert any(line.startswith(method) and "stopped early after epoch 1" in line for line in table.splitlines())
        # the statistics list the stopped trials and give their groups no verdict (no silent survivorship)
        assert f"  {method} #GAN 64 (gan, order paper, keep None): 1 of 1 seeds stopped after 1 epoch: no verdict" \
            in res.stdout

    client, exp_id = tracking.setup(tracking.default_tracking_uri(tmp_path), "mprl", tmp_path)
    runs = client.search_runs([exp_id], "", max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED"}  # nothing FAILED, KILLED, or left RUNNING/SCHEDULED
    trials = {r.data.params["labels.method"]: r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"}
    assert set(trials) == {"baseline", "lsro", "dmprl2"}
    for method in ("lsro", "dmprl2"):  # stopped by ASHA: marked, no final_* metrics (report.collect skips them)
        tags, metrics = trials[method].data.tags, trials[method].data.metrics
        assert tags.get("mprl.early_stopped") == "true" and tags.get("mprl.stopped_after_epochs") == "1"
        assert "mprl.error" not in tags and "val_rank1" in metrics  # validated each epoch
        assert "final_rank1" not in metrics and "rank1" not in metrics  # the test split: final models only
    base = trials["baseline"]
    assert "mprl.early_stopped" not in base.data.tags and "final_rank1" in base.data.metrics
    if shape:  # lsro's Train run was torn down with its trial and its worker placement group freed for dmprl2
        assert "Detected that the Ray Train controller actor" in res.stdout
