"""A Ray cluster and an MLflow server on loopback, shaped like ``clusters/gpu.yaml``, for tests and the rehearsal.

The nodes are raylets of ``ray.cluster_utils.Cluster`` on this machine: a head with no GPU that advertises the
driver resource (as the head of ``clusters/gpu.yaml`` does) and worker nodes that advertise logical GPUs and the
worker-node resource. They share the filesystem, which the storage path declares the way a real cluster does (a
``.mprl-shared`` marker at the "mount").

Isolation on a shared machine: ``RAY_TMPDIR`` gives the cluster its own session folder and "latest cluster" file
(no other ``ray.init()`` on the machine connects to it), and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray
use 127.0.0.1 as every node's address.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from orchestrator.cluster import free_port
from orchestrator.resources import DRIVER_RESOURCE, WORKER_RESOURCE

ROOT = Path(__file__).parents[1]
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # no traffic off this machine


@contextmanager
def mlflow_server(folder: Path, backend_store_uri: str | None = None) -> Iterator[str]:
    """``scripts/mlflow_server.sh start`` on a free loopback port; stopped (by its pid file) on exit."""
    env = {**os.environ, **LOOPBACK_ENV, "MLFLOW_DIR": str(folder), "MLFLOW_PORT": str(free_port()),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_WORKERS": "1", "MLFLOW_START_TIMEOUT": "120"}
    if backend_store_uri:
        env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri
    script = str(ROOT / "scripts" / "mlflow_server.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True, timeout=180)
    try:
        yield (folder / "url").read_text().strip()
    finally:
        subprocess.run(["bash", script, "stop"], env=env, timeout=60)


@contextmanager
def gpu_cluster(workers: int = 2, *, head_cpus: int = 1, worker_cpus: int = 2, gpus_per_worker: int = 1,
                object_store_mb: int = 200) -> Iterator[object]:
    """A head (CPUs, the driver resource, no GPU) and ``workers`` nodes with logical GPUs, on 127.0.0.1.

    Sets the loopback environment for this process and the ones it starts; restores it on exit.
    """
    import ray
    import ray._private.ray_constants
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in (*LOOPBACK_ENV, "RAY_TMPDIR")}
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live below it
    os.environ.update({**LOOPBACK_ENV, "RAY_TMPDIR": ray_tmp})
    enable = ray._private.ray_constants.ENABLE_RAY_CLUSTER
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # ray may be imported already
    small = {"object_store_memory": object_store_mb * 1024**2, "node_ip_address": "127.0.0.1"}
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={**small, "num_cpus": head_cpus, "num_gpus": 0,
                                                      "include_dashboard": False,
                                                      "resources": {DRIVER_RESOURCE: 1}})
    try:
        for _ in range(workers):
            c.add_node(**small, num_cpus=worker_cpus, num_gpus=gpus_per_worker, resources={WORKER_RESOURCE: 1000})
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = enable
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def postgres_server(folder: Path) -> Iterator[str]:
    """``scripts/postgres_local.sh start`` on a free loopback port: yields its ``postgresql://`` URI (a role and a
    database ``mlflow``, for ``mlflow_server(backend_store_uri=...)``); stopped on exit, even after a failure.

    Raises ``FileNotFoundError`` when this machine has no PostgreSQL server binaries (the script's exit status 3).
    """
    script = str(ROOT / "scripts" / "postgres_local.sh")
    try:
        res = subprocess.run(["bash", script, "start", str(folder)], capture_output=True, text=True, timeout=180)
        if res.returncode == 3:
            raise FileNotFoundError(res.stderr.strip())
        if res.returncode != 0:
            raise RuntimeError(f"postgres_local.sh start failed ({res.returncode}):\n{res.stderr[-4000:]}")
        yield (Path(folder) / "uri").read_text().strip()
    finally:
        subprocess.run(["bash", script, "stop", str(folder)], capture_output=True, timeout=120)
