"""Tracking on a real database: the smoke sweep on the loopback cluster, logging to an MLflow server whose backend
store is PostgreSQL, as on the clusters (sqlite stays the laptop default).

The PostgreSQL server is Debian's (``scripts/postgres_local.sh``: a throwaway cluster in the test's folder on a free
loopback port; ``.ci/run`` installs the package), the MLflow server is ``scripts/mlflow_server.sh`` with
``MLFLOW_BACKEND_STORE_URI=postgresql://...``, and the sweep is the CLI with ``--address`` and ``--tracking-uri``, as
``ray job submit`` runs it on a cluster. The runs are read back through MLflow and straight from PostgreSQL's
tables (so a silent sqlite fallback could not pass), and teardown leaves no server process behind.

The test skips only where this machine has no PostgreSQL server binaries (the script's exit status 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.loopback import gpu_cluster, mlflow_server, postgres_server
from orchestrator import tracking
from orchestrator.cluster import SHARED_MARKER

ROOT = Path(__file__).parents[1]
SCRIPT = str(ROOT / "scripts" / "postgres_local.sh")
EPOCHS = 2  # reid.epochs of the smoke preset
PER_EPOCH = ("loss", "train_acc", "lr")  # logged after every epoch whatever the evaluation settings


def _require_postgres() -> None:
    res = subprocess.run(["bash", SCRIPT, "bin"], capture_output=True, text=True, timeout=30)
    if res.returncode == 3:
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0, res.stderr


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (pid 1 may never reap it)


def _server_processes(folder: Path) -> set[int]:
    """The postmaster of the server in ``folder`` and its children (background workers, connection backends)."""
    try:
        postmaster = int((folder / "pid").read_text())
    except (OSError, ValueError):  # not started
        return set()
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            children.add(int(stat.parent.name))
    return {postmaster, *children}


def test_script_refuses_bad_arguments(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for args, rc, message in [([], 2, "usage"), (["start"], 2, "usage"), (["restart", str(tmp_path)], 2, "usage"),
                              (["start", str(not_a_folder)], 2, "is not a folder")]:
        res = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30)
        assert (res.returncode, message in res.stderr) == (rc, True), (args, res.returncode, res.stderr)
    res = subprocess.run(["bash", SCRIPT, "start", str(tmp_path / "pg")], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PG_BIN": str(tmp_path / "nowhere")})
    assert res.returncode == 3 and "apt-get install postgresql" in res.stderr, res.stderr
    assert not (tmp_path / "pg").exists()  # nothing created before the binaries were found
    res = subprocess.run(["bash", SCRIPT, "stop", str(tmp_path / "never-started")], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0 and "not running" in res.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_sweep_on_the_loopback_cluster_logs_to_postgresql(tmp_path):
    _require_postgres()
    import psycopg
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config

    pg_dir = tmp_path / "postgres"
    storage = tmp_path / "shared" / "mprl"
    storage.mkdir(parents=True)
    (storage.parent / SHARED_MARKER).touch()  # what clusters/*.yaml do after mounting the shared file system
    processes: set[int] = set()
    with postgres_server(pg_dir) as uri:
        processes |= _server_processes(pg_dir)
        try:
            assert uri.startswith("postgresql://mlflow:") and "@127.0.0.1:" in uri
            with mlflow_server(tmp_path / "mlflow", backend_store_uri=uri) as url, \
                    gpu_cluster(workers=2, worker_cpus=1, gpus_per_worker=0) as c:
                processes |= _server_processes(pg_dir)  # with the MLflow server's connections
                log = tmp_path / "sweep.log"
                start = time.perf_counter()
                with log.open("w") as out:
                    res = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke",
                                          "--address", c.address, "--tracking-uri", url,
                                          "--set", f"cluster.storage_path={storage}",
                                          "--set", "sweep.max_concurrent=2"],
                                         cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                         stderr=subprocess.STDOUT, timeout=480)
                print(f"smoke sweep on the loopback cluster, tracking on PostgreSQL: "
                      f"{time.perf_counter() - start:.0f} s")
                assert res.returncode == 0, log.read_text()[-4000:]
                processes |= _server_processes(pg_dir)

                cfg = load_config("smoke")
                client = MlflowClient(url)
                exp = client.get_experiment_by_name(cfg.cluster.experiment)
                runs = client.search_runs([exp.experiment_id], "", max_results=1000)
                keys = [(r.data.tags.get(tracking.TAG_KIND), r.data.tags.get(tracking.TAG_KEY)) for r in runs]
                assert len(keys) == len(set(keys)), f"duplicate runs: {sorted(keys)}"
                assert {r.info.status for r in runs} == {"FINISHED"}, [(k, r.info.status) for k, r in zip(keys, runs)]
                by_kind = {kind: [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == kind]
                           for kind in ("sweep", "stage", "trial")}
                assert sum(map(len, by_kind.values())) == len(runs), keys
                (sweep,) = by_kind["sweep"]
                trials, stages = by_kind["trial"], by_kind["stage"]
                assert {t.data.params["labels.method"] for t in trials} == set(cfg.sweep.methods)
                assert len(trials) == len(cfg.sweep.methods) and stages
                for r in trials + stages:
                    assert r.data.tags[tracking.TAG_PARENT] == sweep.info.run_id
                for t in trials:
                    assert 0.0 <= t.data.metrics["final_rank1"] <= 100.0 and "final_mAP" in t.data.metrics  # percent
                # the baseline trial reuses the baseline stage's model (trained in the stage: no epochs of its own)
                trained = [t for t in trials if "mprl.reused_stage" not in t.data.tags]
                assert {t.data.params["labels.method"] for t in trained} == set(cfg.sweep.methods) - {"baseline"}
                for t in trained:
                    for name in PER_EPOCH:
                        steps = sorted(m.step for m in client.get_metric_history(t.info.run_id, name))
                        assert steps in (list(range(EPOCHS)), list(range(1, EPOCHS + 1))), (
                            t.data.params["labels.method"], name, steps)

                # the same runs, read from PostgreSQL itself: the server's store is this database, not a sqlite file
                assert not list((tmp_path / "mlflow").glob("*.db"))
                with psycopg.connect(uri) as db, db.cursor() as cur:
                    cur.execute("SELECT version()")
                    assert cur.fetchone()[0].startswith("PostgreSQL")
                    cur.execute("SELECT r.run_uuid, r.status, k.value FROM runs r JOIN experiments e"
                                " ON e.experiment_id = r.experiment_id JOIN tags k ON k.run_uuid = r.run_uuid"
                                " AND k.key = %s WHERE e.name = %s AND r.lifecycle_stage = 'active'",
                                (tracking.TAG_KIND, cfg.cluster.experiment))
                    rows = cur.fetchall()
                    assert sorted(rows) == sorted((r.info.run_id, "FINISHED", k) for r, (k, _) in zip(runs, keys))
                    cur.execute("SELECT run_uuid, key, step, count(*) FROM metrics WHERE run_uuid = ANY(%s)"
                                " AND key = ANY(%s) GROUP BY run_uuid, key, step",
                                ([t.info.run_id for t in trained], list(PER_EPOCH)))
                    logged = cur.fetchall()
                    assert len(logged) == len(trained) * len(PER_EPOCH) * EPOCHS, logged
                    assert all(n == 1 for *_, n in logged), "an epoch's metric was logged twice"
        finally:
            processes |= _server_processes(pg_dir)
    left = sorted(p for p in processes if _alive(p))
    assert not left, f"PostgreSQL processes left running: {left}"
    assert not (pg_dir / "pid").exists() and not (pg_dir / "uri").exists()
