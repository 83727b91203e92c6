"""Faults at cluster scale: the driver killed and resumed against a new MLflow store, trials that always fail.

Each sweep runs in a subprocess on its own local Ray instance, whose session folder lives under a private
``RAY_TMPDIR``, so that the processes a SIGKILLed driver leaves behind can be found (by that folder in their
command line) and ended by pid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.sweep_output import trial_table
from trainables import faults

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).parents[1]


def _cmd(storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke", "--set", f"cluster.storage_path={storage}",
            "--set", "cluster.num_cpus=3", "--set", "sweep.max_concurrent=1", "--set", "reid.epochs=3", *extra]


def _trials(uri: str, storage: Path) -> dict:
    client, exp_id = tracking.setup(uri, "mprl", storage)
    runs = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'trial'", max_results=1000)
    return {r.info.run_name: r for r in runs}


def _end_leftovers(ray_tmp: str) -> list[int]:
    """SIGKILL the processes whose command line names ``ray_tmp`` (the killed driver's Ray instance)."""
    ended = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if ray_tmp.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
                ended.append(int(proc.name))
        except OSError:
            continue
    return ended


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ray_tmp():
    folder = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths live below it
    yield folder
    _end_leftovers(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_driver_sigkill_then_resume_on_a_new_tracking_store(tmp_path, ray_tmp):
    """SIGKILL of the driver mid-trial; the MLflow database copied to a new path (a replaced head: new URI);
    ``--resume --tracking-uri <new>``: every trial FINISHED once in the new store, none retrained, old store
    untouched."""
    storage = tmp_path / "shared"
    old_uri = tracking.default_tracking_uri(storage)
    tracking.setup(old_uri, "mprl", storage)  # created before polling starts (no migration race)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    log = (tmp_path / "killed.log").open("w")
    start = time.perf_counter()
    longer = ("--set", "reid.epochs=8")  # trials long enough to be caught mid-way by 2-s polling
    proc = subprocess.Popen(_cmd(storage, *longer), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline, mid_trial = time.time() + 600, False
    while time.time() < deadline and proc.poll() is None and not mid_trial:
        time.sleep(2)
        runs = _trials(old_uri, storage).values()
        client, _ = tracking.setup(old_uri, "mprl", storage)
        running = [r for r in runs if r.info.status == "RUNNING" and client.get_metric_history(r.info.run_id, "loss")]
        mid_trial = any(r.info.status == "FINISHED" for r in runs) and bool(running)
    assert mid_trial, (tmp_path / "killed.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = time.perf_counter() - start
    leftovers = _end_leftovers(ray_tmp)
    time.sleep(2)  # the killed instance's processes are gone before the copy

    new_db = tmp_path / "new-head" / "mlflow.db"
    new_db.parent.mkdir()
    shutil.copy2(storage / "mlflow.db", new_db)
    old_sha = _sha(storage / "mlflow.db")
    new_uri = f"sqlite:///{new_db}"
    before = _trials(new_uri, storage)
    client, _ = tracking.setup(new_uri, "mprl", storage)
    done = {k: (r.info.end_time, len(client.get_metric_history(r.info.run_id, "loss")))
            for k, r in before.items() if r.info.status == "FINISHED"}

    res = subprocess.run(_cmd(storage, *longer, "--resume", "--tracking-uri", new_uri), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    resumed_s = time.perf_counter() - start - killed_at
    print(f"killed after {killed_at:.0f} s with {len(done)} trial(s) finished ({len(leftovers)} leftover "
          f"processes ended); resume took {resumed_s:.0f} s")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = _trials(new_uri, storage)
    assert len(after) == len(before) == 3  # no duplicated runs
    assert {k: r.info.status for k, r in after.items()} == {k: "FINISHED" for k in after}
    client, exp_id = tracking.setup(new_uri, "mprl", storage)
    for k, (end, losses) in done.items():  # a trial finished before the kill did not train again
        assert after[k].info.end_time == end and len(client.get_metric_history(after[k].info.run_id, "loss")) == losses
    sweeps = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert _sha(storage / "mlflow.db") == old_sha, "the resumed sweep wrote to the old MLflow database"


def test_a_trial_that_always_fails_ends_failed_with_its_reason(tmp_path, ray_tmp):
    """A trial that dies every attempt (its worker process exits: no Python exception reaches run_trial) ends
    FAILED in MLflow with a reason once its retries are spent; the others finish; the exit code is 1."""
    storage = tmp_path / "shared"
    always = "rank=0,epoch=1,step=0,mode=always_exit,match=lsro"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, faults.FAILURE_ENV: always}
    res = subprocess.run(_cmd(storage, "--set", "sweep.max_failures=1"), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    trials = _trials(tracking.default_tracking_uri(storage), storage)
    lsro = next(r for k, r in trials.items() if k.startswith("lsro"))
    assert lsro.info.status == "FAILED", lsro.info
    assert "attempts: 2" in lsro.data.tags[tracking.TAG_ERROR], lsro.data.tags[tracking.TAG_ERROR]
    assert all(r.info.status == "FINISHED" for k, r in trials.items() if not k.startswith("lsro"))
    table = trial_table(res.stdout)
    line = next(row for row in table.splitlines() if row.startswith("lsro"))
    assert "FAILED" in line
