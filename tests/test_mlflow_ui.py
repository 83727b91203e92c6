"""The MLflow UI after a finished smoke sweep, served by ``scripts/mlflow_server.sh`` on 127.0.0.1.

One smoke sweep (the CLI, local Ray, sqlite store) feeds two checks: the server's REST API (what the UI reads)
returns the experiment and its trial runs with final rank-1/mAP, and headless Chromium renders the runs table
with those metrics. Chromium is Debian's ``/usr/bin/chromium``; without it the browser test is skipped.
It is kept off the network: every host but 127.0.0.1 resolves to nothing and goes to a dead proxy.

Set ``MPRL_UI_SCREENSHOT=docs/mlflow_ui.png`` to refresh the README's screenshot (otherwise it stays in tmp).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from bench.loopback import LOOPBACK_ENV, mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--disable-breakpad", "--no-pings",
                  "--hide-scrollbars", "--proxy-server=127.0.0.1:9",
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                  "--window-size=1920,720", "--virtual-time-budget=20000"]
VIEW_KEY = "mprl-test"
TRIALS = ("baseline-n0-paper-kall-s0", "lsro-n64-paper-kall-s0", "dmprl2-n64-paper-kall-s0")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """Storage folder of one finished smoke sweep (its sqlite store is ``mlflow.db`` there)."""
    storage = tmp_path_factory.mktemp("ui") / "runs"
    ray_tmp = tempfile.mkdtemp(prefix="ui", dir="/tmp")  # a private Ray session folder (short socket paths)
    env = {**os.environ, **LOOPBACK_ENV, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    try:
        res = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke",
                              "--set", f"cluster.storage_path={storage}", "--set", "cluster.num_cpus=3"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return storage


def _api(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def _trial_metrics(url: str) -> tuple[str, dict[str, dict[str, float]]]:
    """(experiment id, {trial run name: metrics}) as the UI's backend serves them."""
    exp = _api(url, "experiments/get-by-name?experiment_name=mprl")["experiment"]
    runs = _api(url, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                     "filter": "tags.`mprl.kind` = 'trial'", "max_results": 100})["runs"]
    return exp["experiment_id"], {r["info"]["run_name"]: {m["key"]: m["value"] for m in r["data"]["metrics"]}
                                  for r in runs}


def _chromium(args: list[str], profile: Path, timeout: float = 120) -> str:
    """Run headless Chromium in its own session; on a timeout the whole process group is killed."""
    proc = subprocess.Popen([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out


def test_rest_api_serves_the_sweep(finished_sweep, tmp_path):
    with mlflow_server(tmp_path / "server", f"sqlite:///{finished_sweep / 'mlflow.db'}") as url:
        _, trials = _trial_metrics(url)
    assert set(trials) == set(TRIALS)
    for name, metrics in trials.items():
        assert 0.0 <= metrics["final_rank1"] <= 100.0 and 0.0 <= metrics["final_mAP"] <= 100.0, name  # percent


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")
def test_ui_shows_trials_with_rank1_and_map(finished_sweep, tmp_path):
    with mlflow_server(tmp_path / "server", f"sqlite:///{finished_sweep / 'mlflow.db'}") as url:
        exp_id, trials = _trial_metrics(url)
        # A shared view (what the UI's "Share" button stores as an experiment tag): trial runs, sorted by
        # rank-1, with the metric and label columns visible.
        view = {"searchFilter": "tags.`mprl.kind` = 'trial'", "orderByKey": "metrics.`final_rank1`",
                "orderByAsc": False,
                "selectedColumns": ["params.`labels.method`", "params.`labels.num_gan`", "metrics.`final_rank1`",
                                    "metrics.`final_rank5`", "metrics.`final_mAP`"]}
        _api(url, "experiments/set-experiment-tag",
             {"experiment_id": exp_id, "key": f"mlflow.sharedViewState.{VIEW_KEY}", "value": json.dumps(view)})
        page = f"{url}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}"
        dom = _chromium(["--dump-dom", page], tmp_path / "profile")
        png = tmp_path / "mlflow_ui.png"
        _chromium([f"--screenshot={png}", page], tmp_path / "profile")
    assert "mprl" in dom and "final_rank1" in dom and "final_mAP" in dom
    for name, metrics in trials.items():
        assert name in dom
        for key in ("final_rank1", "final_mAP"):
            assert repr(metrics[key])[:6] in dom, f"{name} {key}={metrics[key]} is not on the page"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    if os.environ.get("MPRL_UI_SCREENSHOT"):
        shutil.copyfile(png, ROOT / os.environ["MPRL_UI_SCREENSHOT"])
