"""MLflow system metrics on a trial's run (CPU and memory here; GPU where NVML finds one)."""

from __future__ import annotations

import time

from orchestrator import system_metrics, tracking


def test_system_metrics_land_on_the_run_while_the_block_runs(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    client, exp = tracking.setup(uri, "e", tmp_path)
    rid, _ = tracking.get_or_create_run(client, exp, "trial", "t", "t")
    with system_metrics.monitored(rid, uri, "node 127.0.0.1 (abc) pid 1", interval_s=0.5) as monitor:
        assert monitor is not None
        time.sleep(2.5)
    keys = set(client.get_run(rid).data.metrics)
    node = "node_127.0.0.1__abc__pid_1"
    assert f"system/{node}/cpu_utilization_percentage" in keys, keys
    assert f"system/{node}/system_memory_usage_megabytes" in keys, keys


def test_they_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(system_metrics.DISABLE_ENV, "0")
    uri = tracking.default_tracking_uri(tmp_path)
    client, exp = tracking.setup(uri, "e", tmp_path)
    rid, _ = tracking.get_or_create_run(client, exp, "trial", "t", "t")
    with system_metrics.monitored(rid, uri, "n", interval_s=0.2) as monitor:
        assert monitor is None
        time.sleep(0.5)
    assert not [k for k in client.get_run(rid).data.metrics if k.startswith("system/")]


def test_a_block_shorter_than_one_interval_still_gets_a_sample(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    client, exp = tracking.setup(uri, "e", tmp_path)
    rid, _ = tracking.get_or_create_run(client, exp, "trial", "t", "t")
    with system_metrics.monitored(rid, uri, "n", interval_s=60):
        time.sleep(0.2)
    assert "system/n/cpu_utilization_percentage" in client.get_run(rid).data.metrics
