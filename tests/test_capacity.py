"""The sweep's up-front capacity request: on a cluster that adds GPU workers on demand (its head advertises
``tune_driver``) the sweep asks Ray's autoscaler for ``sweep.max_concurrent`` trials' bundles at once, and
withdraws the request when it ends; on a fixed cluster it asks for nothing. (That the autoscaler then boots
the nodes together is shown by Ray's own fake autoscaling cluster in tests/test_launch_rehearsal.py.)"""

from __future__ import annotations

import json

import pytest
import ray

from orchestrator import cluster, resources
from orchestrator.config import load_config

pytestmark = pytest.mark.ray


def _standing_request() -> list[dict]:
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


@pytest.fixture
def head_only():
    """A one-node Ray whose node advertises the driver resource, like the head of clusters/gpu.yaml."""
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
             resources={resources.DRIVER_RESOURCE: 1})
    yield
    ray.shutdown()


def test_an_on_demand_cluster_is_asked_for_every_concurrent_trial_then_released(tmp_path, head_only):
    cfg = load_config("smoke", overrides=["sweep.max_concurrent=3", "reid.loader_workers=2"],
                      storage_base=tmp_path)
    assert cluster.request_capacity(cfg, trials=10) == 3
    want = resources.compute_resources(3, 1 if cfg.reid.use_gpu else 0, {resources.DRIVER_RESOURCE: 1})
    assert _standing_request() == [want] * 3
    assert want[resources.WORKER_RESOURCE] > 0  # only worker nodes can take it: the head is never sized for it
    cluster.release_capacity()
    assert _standing_request() == []


def test_no_more_bundles_than_trials_and_one_per_train_worker(tmp_path, head_only):
    cfg = load_config("smoke", overrides=["sweep.max_concurrent=4"], storage_base=tmp_path)
    assert cluster.request_capacity(cfg, trials=2) == 2
    multi = load_config("smoke", overrides=["sweep.max_concurrent=4", "reid.num_workers=2"], storage_base=tmp_path)
    assert len(resources.capacity_bundles(multi, 3)) == 6


def test_a_fixed_cluster_is_asked_for_nothing(tmp_path):
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = load_config("smoke", overrides=["sweep.max_concurrent=2"], storage_base=tmp_path)
        assert cluster.request_capacity(cfg, trials=5) == 0
        assert _standing_request() == []
    finally:
        ray.shutdown()
