"""The tracking server is not a single point of loss: the MLflow server is stopped for 45 s while a trial trains
and started again at the same address, and the sweep still ends with every run FINISHED, every epoch's metrics
logged once, and no duplicate runs.

What carries a sweep through: the MLflow client's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` with
exponential backoff, which the sweep raises for its workers: ``orchestrator.tracking.RETRY_ENV``) hold each call
until the server answers again, and the driver's per-epoch logger keeps what it could not log and logs it on the
next result (``orchestrator.epoch_logger.EpochLogger``): the trial itself never waits on the server while it trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.loopback import LOOPBACK_ENV
from orchestrator import tracking
from orchestrator.cluster import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).parents[1]
SCRIPT = str(ROOT / "scripts" / "mlflow_server.sh")
OUTAGE_S = 45
EPOCHS = 24


def _server(action: str, env: dict[str, str]) -> None:
    subprocess.run(["bash", SCRIPT, action], env=env, check=True, timeout=180)


def _epoch_logged(client, exp_name: str) -> bool:
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        return False
    runs = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'trial'")
    return any("loss" in r.data.metrics for r in runs)


def test_a_45_s_tracking_outage_mid_trial_loses_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    env = {**os.environ, **LOOPBACK_ENV, "MLFLOW_DIR": str(tmp_path / "mlflow"), "MLFLOW_PORT": str(port),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_WORKERS": "1", "MLFLOW_START_TIMEOUT": "120"}
    url = f"http://127.0.0.1:{port}"
    _server("start", env)
    log = tmp_path / "sweep.log"
    sweep = None
    try:
        with log.open("w") as out:
            sweep = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke", "--tracking-uri", url,
                 "--set", f"cluster.storage_path={tmp_path / 'storage'}", "--set", "sweep.methods=[lsro]",
                 "--set", f"reid.epochs={EPOCHS}", "--set", "reid.checkpoint_every=4"],
                cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)
            client = MlflowClient(url)
            deadline = time.monotonic() + 400
            while not _epoch_logged(client, "mprl"):  # the trial has reported its first epoch
                assert sweep.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no trial epoch was logged in time"
                time.sleep(1)
            _server("stop", env)
            down = time.time()
            time.sleep(OUTAGE_S)
            assert sweep.poll() is None, "the sweep ended during the outage:\n" + log.read_text()[-4000:]
            _server("start", env)
            up = time.time()
            print(f"tracking server down for {up - down:.0f} s")
            rc = sweep.wait(timeout=600)
        text = log.read_text()
        assert rc == 0, text[-4000:]

        exp = client.get_experiment_by_name("mprl")
        runs = client.search_runs([exp.experiment_id], "", max_results=1000)
        keys = [(r.data.tags.get(tracking.TAG_KIND), r.data.tags.get(tracking.TAG_KEY)) for r in runs]
        assert len(keys) == len(set(keys)), f"duplicate runs: {sorted(keys)}"
        assert {r.info.status for r in runs} == {"FINISHED"}, [(k, r.info.status) for k, r in zip(keys, runs)]
        trials = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"]
        assert len(trials) == 1
        history = client.get_metric_history(trials[0].info.run_id, "loss")
        steps = sorted(m.step for m in history)
        assert steps == list(range(EPOCHS)) or steps == list(range(1, EPOCHS + 1)), steps
        assert "final_rank1" in trials[0].data.metrics
        # the trial kept training while the server was down: Tune took its epochs (result.json's timestamps are
        # the trial's) during the outage, i.e. nothing on the driver's side waited on MLflow
        results = [json.loads(line) for f in (tmp_path / "storage").rglob("result.json")
                   for line in f.read_text().splitlines() if line.strip()]
        during = [r["epoch"] for r in results if down + 2 < r["timestamp"] < up - 1]
        print(f"epochs reported during the outage: {during}")
        assert len(during) >= 3, (during, [(r.get("epoch"), r["timestamp"]) for r in results], down, up)
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
        subprocess.run(["bash", SCRIPT, "stop"], env=env, timeout=60)
