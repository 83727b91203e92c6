"""orchestrator/cluster.py: storage and tracking rules for several nodes, the Ray address probe, the workers'
environment; orchestrator/resources.py: what tasks ask for on the clusters of clusters/."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from orchestrator import cluster, resources, tracking
from orchestrator.cluster import free_port
from tests.cluster_files import ROOT


def _cfg(storage: str, tracking: str | None) -> SimpleNamespace:
    return SimpleNamespace(cluster=SimpleNamespace(storage_path=storage, tracking_uri=tracking))


def test_single_node_accepts_local_storage_and_sqlite(tmp_path):
    cluster.check_storage_and_tracking(_cfg(str(tmp_path), None), 1)
    cluster.check_storage_and_tracking(_cfg(str(tmp_path), f"sqlite:///{tmp_path}/mlflow.db"), 1)


@pytest.mark.parametrize("uri", [None, "sqlite:////tmp/x/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"])
def test_multi_node_refuses_a_local_tracking_store(tmp_path, uri):
    (tmp_path / cluster.SHARED_MARKER).touch()
    with pytest.raises(ValueError, match=r"cluster\.tracking_uri.*scripts/mlflow_server\.sh"):
        cluster.check_storage_and_tracking(_cfg(str(tmp_path), uri), 2)


def test_multi_node_refuses_unshared_or_object_store_storage(tmp_path):
    with pytest.raises(ValueError, match=r"cluster\.storage_path=.*not marked shared"):
        cluster.check_storage_and_tracking(_cfg(str(tmp_path / "runs"), "http://10.0.0.5:5000"), 3)
    with pytest.raises(ValueError, match=r"cluster\.storage_path=.*object-store URI"):
        cluster.check_storage_and_tracking(_cfg("s3://bucket/mprl", "http://10.0.0.5:5000"), 3)
    with pytest.raises(ValueError, match="object-store URI"):  # what load_config makes of s3://bucket/mprl
        cluster.check_storage_and_tracking(_cfg("/work/main/s3:/bucket/mprl", "http://10.0.0.5:5000"), 3)


def test_multi_node_accepts_marked_storage_and_a_server(tmp_path):
    (tmp_path / cluster.SHARED_MARKER).touch()
    deep = tmp_path / "mprl" / "not-yet-created"
    cluster.check_storage_and_tracking(_cfg(str(deep), "http://10.0.0.5:5000"), 4, node_ips=["10.0.0.5", "10.0.0.6"])
    cluster.check_storage_and_tracking(_cfg(str(deep), "postgresql://db.internal/mlflow"), 2)
    assert cluster.find_marker(deep) == tmp_path / cluster.SHARED_MARKER


def test_loopback_tracking_uri_only_when_all_nodes_share_an_ip(tmp_path):
    (tmp_path / cluster.SHARED_MARKER).touch()
    cfg = _cfg(str(tmp_path), "http://127.0.0.1:5000")
    cluster.check_storage_and_tracking(cfg, 2, node_ips=["127.0.0.1", "127.0.0.1"])  # one machine
    with pytest.raises(ValueError, match="loopback"):
        cluster.check_storage_and_tracking(cfg, 2, node_ips=["10.0.0.5", "10.0.0.6"])


def test_check_address_fails_fast_on_a_closed_port():
    port = free_port()  # bound then released: nothing listens there now
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}"):
        cluster.check_address(f"127.0.0.1:{port}", timeout_s=10)
    with pytest.raises(ConnectionError, match=rf"ray://127\.0\.0\.1:{port}"):
        cluster.check_address(f"ray://127.0.0.1:{port}")
    assert time.perf_counter() - start < 5


def test_check_address_resolves_auto_from_ray_address(monkeypatch):
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match=rf"auto \(resolved to 127\.0\.0\.1:{port}\)"):
        cluster.check_address("auto", timeout_s=3)


def test_check_address_passes_a_listening_port_and_local():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cluster.check_address(f"127.0.0.1:{srv.getsockname()[1]}")
        cluster.check_address(f"ray://127.0.0.1:{srv.getsockname()[1]}")
    cluster.check_address(None)
    cluster.check_address("local")


@pytest.mark.parametrize("bad", ["headnode", "http://10.0.0.5:8265", "tcp://10.0.0.5:6379", "10.0.0.5:99999"])
def test_check_address_rejects_malformed_addresses(bad):
    with pytest.raises(ValueError, match=r"cluster\.address="):
        cluster.check_address(bad)


def test_parse_address_forms():
    assert cluster.parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert cluster.parse_address("ray://head.internal:10001") == ("head.internal", 10001)
    assert cluster.parse_address("[::1]:6379") == ("::1", 6379)


def test_scales_on_demand_only_with_the_head_marker():
    assert resources.scales_on_demand({"CPU": 8.0, resources.DRIVER_RESOURCE: 1.0})
    assert not resources.scales_on_demand({"CPU": 8.0, "GPU": 1.0})


def test_driver_resources_pins_drivers_only_where_the_head_advertises_it():
    with_head = {"CPU": 24.0, "GPU": 4.0, resources.DRIVER_RESOURCE: 1.0}
    assert resources.driver_resources({"CPU": 1}, with_head) == {"CPU": 1, resources.DRIVER_RESOURCE: 0.01}
    assert resources.driver_resources({"CPU": 1}, {"CPU": 8.0}) == {"CPU": 1}
    assert resources.driver_resources({"CPU": 9, "GPU": 1}, with_head) == {"CPU": 9, "GPU": 1}  # trains in place


def test_cli_names_an_unreachable_address_within_seconds(tmp_path):
    port = free_port()
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke", "--address",
                          f"127.0.0.1:{port}", "--set", f"cluster.storage_path={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and f"127.0.0.1:{port}" in res.stderr, res.stderr[-2000:]
    assert time.perf_counter() - start < 60  # interpreter + ray/mlflow imports; ray.init would hang minutes


def test_worker_env_raises_the_start_timeout_and_leaves_job_keys_alone(monkeypatch):
    from orchestrator.config import load_config
    from trainables.runtime import LOGICAL_GPUS_ENV

    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    for k in tracking.RETRY_ENV:
        monkeypatch.delenv(k, raising=False)
    cfg = load_config("rehearsal")
    assert cluster.worker_env(cfg) == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900", LOGICAL_GPUS_ENV: "1",
                                       "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",
                                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}
    assert LOGICAL_GPUS_ENV not in cluster.worker_env(load_config("smoke"))  # real GPUs must be real
    # under `ray job submit --runtime-env-json`, ray.init refuses a key the job's runtime env sets already
    job = {"runtime_env": {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1800"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # one the user exported wins
    assert cluster.worker_env(cfg) == {LOGICAL_GPUS_ENV: "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}

