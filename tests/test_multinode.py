"""A real three-node Ray cluster and a real MLflow server on loopback, and the smoke sweep run against them.

The nodes are raylets of ``ray.cluster_utils.Cluster`` on this machine, with 1 CPU each, shaped like
``clusters/*.yaml``: a head that advertises ``tune_driver`` and two workers that advertise ``mprl_worker``. The
two trials that run at once cannot share a node and nothing that computes may use the head, so the trials must
land on both workers. The nodes share the filesystem, which
the storage path declares the way a real cluster does (a ``.mprl-shared`` marker at the "mount"). The sweep
is the CLI with ``--address`` and ``--tracking-uri``, as ``ray job submit`` would run it.

Isolation on a shared machine: ``RAY_TMPDIR`` gives this cluster its own session folder and its own
"latest cluster" file (so no other ``ray.init()`` on the machine connects to it), and
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray use 127.0.0.1 as every node's address (otherwise it
advertises the machine's network address).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from bench.loopback import LOOPBACK_ENV, mlflow_server
from orchestrator import cluster, resources, tracking

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).parents[1]
@pytest.fixture
def loopback_cluster(monkeypatch) -> Iterator[object]:
    """Head (1 CPU, advertises tune_driver, like clusters/*.yaml) + two worker nodes (1 CPU, advertise
    mprl_worker), all on 127.0.0.1."""
    import ray
    import ray._private.ray_constants
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths live below it
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    for k, v in LOOPBACK_ENV.items():
        monkeypatch.setenv(k, v)  # for the processes started from here on (the sweep CLI, Ray workers)
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)  # ray is imported already
    small = {"num_cpus": 1, "object_store_memory": 150 * 1024**2, "node_ip_address": "127.0.0.1"}
    ray.shutdown()  # the shared local instance of other tests (conftest.local_ray), if it is up
    c = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False,
                                                      "resources": {resources.DRIVER_RESOURCE: 1}})
    try:
        for _ in range(2):
            c.add_node(**small, resources={resources.WORKER_RESOURCE: 1000})
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _preflight_against(c, cfg) -> None:
    """The live-cluster checks, from a driver connected the way run_sweep connects."""
    import ray

    ray.init(address=c.address)
    try:
        nodes = cluster.alive_nodes()
        assert len(nodes) == 3 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert resources.driver_resources({"CPU": 1}, ray.cluster_resources())[resources.DRIVER_RESOURCE] > 0
        marker = Path(cfg.cluster.storage_path).parent / cluster.SHARED_MARKER
        with pytest.raises(ValueError, match=r"cluster\.storage_path=.*not marked shared"):
            cluster.preflight(cfg)
        marker.touch()  # what clusters/*.yaml do on the head after mounting the shared file system
        cluster.preflight(cfg)  # also runs a probe task on each node that looks for the marker
        from orchestrator.config import replace

        with pytest.raises(ValueError, match=r"cluster\.tracking_uri"):
            cluster.preflight(replace(cfg, **{"cluster.tracking_uri": None}))
    finally:
        ray.shutdown()


def test_smoke_sweep_on_two_nodes_with_an_mlflow_server(tmp_path, loopback_cluster):
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config

    c = loopback_cluster
    storage = tmp_path / "shared" / "mprl"
    storage.mkdir(parents=True)  # run_sweep creates it before its preflight
    with mlflow_server(tmp_path / "mlflow") as url:
        cfg = load_config("smoke", overrides=[f"cluster.storage_path={storage}", f"cluster.address={c.address}",
                                              f"cluster.tracking_uri={url}"])
        _preflight_against(c, cfg)
        log = tmp_path / "sweep.log"
        start = time.perf_counter()
        with log.open("w") as out:
            res = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke",
                                  "--address", c.address, "--tracking-uri", url,
                                  "--set", f"cluster.storage_path={storage}",
                                  "--set", "sweep.max_concurrent=2"],  # required where workers join on demand
                                 cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                 stderr=subprocess.STDOUT, timeout=480)
        print(f"sweep on 2 worker nodes: {time.perf_counter() - start:.0f} s")
        assert res.returncode == 0, log.read_text()[-4000:]

        workers = {n.node_id for n in c.worker_nodes}
        assert len(workers) == 2
        client = MlflowClient(url)
        exp = client.get_experiment_by_name(cfg.cluster.experiment)
        places = [t.data.tags["mprl.where"] for t in client.search_runs(
            [exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'trial'")]  # "node <ip> (<id[:12]>) pid <pid>"
        trial_nodes = {w for w in workers for p in places if f"({w[:12]})" in p}
        assert len(places) == 3 and all(any(f"({w[:12]})" in p for w in workers) for p in places), places
        stages = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'stage'")
        built = [s.data.tags["mprl.where"] for s in stages if s.data.tags["mprl.cached"] == "false"]
        # dataset, decode, gan, generate, decode_gen, baseline, pool_quality (the smoke sweep has no sMpRL),
        # none on the head
        assert len(built) == 7 and all(any(f"({w[:12]})" in p for w in workers) for p in built), built
        stage_nodes = {w for w in workers for p in built if f"({w[:12]})" in p}
        assert stage_nodes | trial_nodes == workers, "the stages and trials did not use both worker nodes"
        assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
        sweeps = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'sweep'")
        assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
        trials = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'trial'")
        assert {t.data.params["labels.method"] for t in trials} == {"baseline", "lsro", "dmprl2"}
        for t in trials:
            assert t.info.status == "FINISHED"
            assert t.data.tags[tracking.TAG_PARENT] == sweeps[0].info.run_id
            assert 0.0 <= t.data.metrics["final_rank1"] <= 100.0 and "final_mAP" in t.data.metrics  # percent
        assert [a.path for a in client.list_artifacts(trials[0].info.run_id, "plots")] == ["plots/cmc.png",
                                                                                         "plots/ranked_list.png"]
