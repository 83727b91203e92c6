"""The launch watch: while no GPU worker has joined, each failed launch or node is printed once with the
autoscaler's reason; past cluster.join_timeout_min with failures the sweep is stopped (once); a cluster whose
workers joined, or one with no failures, is never stopped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.config import load_config
from orchestrator.launch_watch import LaunchWatch


def _launch(ts, details="VcpuLimitExceeded: You have requested more vCPU capacity than your current vCPU limit of 0"):
    return SimpleNamespace(count=1, ray_node_type_name="gpu_worker_spot", instance_type_name="g5.4xlarge",
                           request_ts_s=ts, failed_ts_s=ts + 5, details=details)


class Cluster:
    def __init__(self):
        self.status = SimpleNamespace(failed_launches=[], failed_nodes=[], pending_launches=[])
        self.workers, self.lines, self.stops = 0, [], 0

    def watch(self, give_up_s=1800.0):
        w = LaunchWatch(give_up_s, status=lambda: self.status, workers=lambda: self.workers,
                        stop=self._stop, say=self.lines.append)
        return w

    def _stop(self):
        self.stops += 1


def test_each_failure_is_said_once_and_the_sweep_stops_past_the_deadline():
    c = Cluster()
    w = c.watch()
    t0 = w.started
    c.status.failed_launches = [_launch(100)]
    w.poll(t0 + 60)
    w.poll(t0 + 120)
    assert [line for line in c.lines if "VcpuLimitExceeded" in line] == [c.lines[0]]
    assert "gpu_worker_spot" in c.lines[0] and "g5.4xlarge" in c.lines[0]
    c.status.failed_nodes = [SimpleNamespace(instance_id="i-0abc", ray_node_type_name="gpu_worker",
                                             failure_detail="Initialization command failed.", details=None)]
    w.poll(t0 + 400)
    assert any("i-0abc" in line and "Initialization command failed" in line for line in c.lines)
    assert any("waiting 7 min" in line for line in c.lines)  # the every-5-minutes line
    assert c.stops == 0
    w.poll(t0 + 1800.5)  # not t0 + 1800: (t0 + 1800) - t0 can round below 1800 for a large monotonic t0
    w.poll(t0 + 1900)
    assert c.stops == 1 and w.stopped
    assert "no worker node joined in 30 min" in c.lines[-1] and "docs/clusters.md" in c.lines[-1]


def test_no_stop_once_a_worker_joined_or_without_failures():
    c = Cluster()
    w = c.watch(give_up_s=60)
    w.poll(w.started + 3600)  # slow, but nothing failed: keep waiting
    assert c.stops == 0
    c.workers = 1
    w.poll(w.started + 3700)
    assert w.joined and "first worker node joined" in c.lines[-1]
    c.status.failed_launches = [_launch(5000, "InsufficientInstanceCapacity")]  # a spot shortage later on
    w.poll(w.started + 3800)
    assert c.stops == 0 and "InsufficientInstanceCapacity" in c.lines[-1]


def test_zero_waits_forever_and_bad_values_are_refused():
    c = Cluster()
    w = c.watch(give_up_s=0)
    c.status.failed_launches = [_launch(1)]
    w.poll(w.started + 10 ** 6)
    assert c.stops == 0
    assert load_config("smoke").cluster.join_timeout_min == 30
    with pytest.raises(ValueError, match="cluster.join_timeout_min"):
        load_config("smoke", overrides=["cluster.join_timeout_min=-1"])


@pytest.mark.ray
def test_the_watch_reads_ray_s_own_autoscaler_status_on_an_on_demand_cluster(tmp_path):
    import ray

    from orchestrator import launch_watch, resources

    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, resources={resources.DRIVER_RESOURCE: 1})
    try:
        status = launch_watch._status()
        assert status is not None and status.failed_launches == [] and launch_watch._workers_alive() == 0
        w = launch_watch.watch(load_config("smoke", storage_base=tmp_path))
        assert w is not None and w.give_up_s == 1800.0
        w.close()
    finally:
        ray.shutdown()
