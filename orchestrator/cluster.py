"""Cluster-aware checks: fail in seconds, naming the field, before a multi-node sweep goes wrong slowly.

* :func:`check_address` probes a Ray address with one TCP connect, because ``ray.init`` against a dead address
  retries for minutes.
* :func:`check_storage_and_tracking` refuses, on a multi-node cluster, settings that silently split the results
  across machines: a storage path that is not shared and an MLflow store on the driver's disk.
* :func:`driver_resources` pins Tune driver trials to the head node of the clusters in ``clusters/``, which
  advertise the custom resource ``tune_driver`` there; :func:`scales_on_demand` recognises those clusters.
* :func:`preflight` runs the checks that need the live cluster, right after ``ray.init``.

Shared storage is *declared*, not guessed: the stage cache, the generated-image store, Ray Tune and Ray Train
all write POSIX files under ``cluster.storage_path``, so on several nodes it must be a mount (NFS, EFS, a
Kubernetes RWX volume) at the same path on every node. Whoever sets up that mount writes an empty marker file
``.mprl-shared`` at its root (the files in ``clusters/`` do it on the head; their worker setup refuses to join
when the marker is not visible), and a storage path at or below a marked folder counts as shared. The driver
also checks that every node already in the cluster sees the marker.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Collection, Mapping
from urllib.parse import urlsplit

SHARED_MARKER = ".mprl-shared"
DRIVER_RESOURCE = "tune_driver"  # advertised by the head node in clusters/*.yaml
DRIVER_SHARE = 0.01  # one driver trial's share: the head's CPUs, not this, limit how many run there
# Advertised (1000 units) by the worker nodes of clusters/*.yaml: every task that computes takes a sliver of it,
# so CPU-only stages and trials never land on the head, whose CPUs serve the driver, Tune and MLflow.
WORKER_RESOURCE = "mprl_worker"
WORKER_SHARE = 0.001
# On clusters that add GPU nodes on demand a Train worker group may wait minutes for its node; Ray Train's
# default is 60 s, after which it tears the group down and retries (research/ray_mlflow.md).
WORKER_GROUP_START_TIMEOUT_S = "900"
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "oss")
LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
_MANGLED_URI = re.compile(r"/(" + "|".join(OBJECT_STORE_SCHEMES) + r"):/")
_MLFLOW_HINT = ("start an MLflow server (bash scripts/mlflow_server.sh; the cluster files in clusters/ start one "
                "on the head node) and pass --tracking-uri http://<head-private-ip>:5000")


# ---------------------------------------------------------------------------------------- Ray address

def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``ray://host:port`` -> (host, port); ValueError naming cluster.address."""
    text = address.strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("http", "https"):
        raise ValueError(f"cluster.address={address!r} is an HTTP URL (the dashboard / job-submission address); "
                         f"ray.init needs the GCS address host:6379, ray://host:10001, or 'auto' inside a Ray job")
    if scheme not in ("", "ray"):
        raise ValueError(f"cluster.address={address!r} has an unknown scheme {scheme!r}; use host:port, "
                         f"ray://host:port, 'auto' or leave it unset for a local Ray")
    parts = urlsplit(text if scheme else f"ray://{text}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ValueError(f"cluster.address={address!r} must look like host:port (e.g. 10.0.1.5:6379), "
                         f"ray://host:10001, or 'auto'")
    return host, port


def resolve_auto() -> str | None:
    """The address ``ray.init(address="auto")`` would use first: $RAY_ADDRESS or the latest ``ray start``."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return env
    try:
        from ray._private.utils import read_ray_address  # private, stable since Ray 2.0; a probe only

        return read_ray_address()
    except (ImportError, OSError):
        return None


def check_address(address: str | None, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError within ``timeout_s`` when nothing listens at the Ray address.

    ``None``/``"local"`` (start a local Ray) pass. ``"auto"`` is resolved like Ray does; when nothing can be
    resolved, ``ray.init`` itself fails fast with its own message, so this passes.
    """
    if not address or address.strip() in ("local", ""):
        return
    shown = address
    if address.strip() == "auto":
        resolved = resolve_auto()
        if resolved is None:
            return
        shown, address = f"auto (resolved to {resolved})", resolved
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConnectionError(
            f"cluster.address={shown}: no Ray cluster answers at {host}:{port} ({reason}, {timeout_s:g} s "
            f"limit). Is the head running (`ray start --head` / `ray up`) and is the port reachable from here? "
            f"From outside the cluster, submit with `ray job submit` and pass --address auto.") from None


# ---------------------------------------------------------------------------------- storage + tracking

def find_marker(path: str | Path) -> Path | None:
    """The ``.mprl-shared`` marker in ``path`` or its nearest ancestor that has one (path need not exist)."""
    p = Path(path).expanduser().absolute()
    for folder in (p, *p.parents):
        candidate = folder / SHARED_MARKER
        if candidate.is_file():
            return candidate
    return None


def storage_problem(storage_path: str) -> str | None:
    """Why ``cluster.storage_path`` cannot serve several nodes, or None when it can."""
    scheme = storage_path.split("://", 1)[0].lower() if "://" in storage_path else ""
    if scheme or _MANGLED_URI.search(storage_path):
        return (f"cluster.storage_path={storage_path!r} is (or was given as) an object-store URI; the stage "
                f"cache and the generated-image store write POSIX files, so use a shared mount (EFS, NFS, a "
                f"Kubernetes ReadWriteMany volume) at the same path on every node instead")
    if find_marker(storage_path) is None:
        return (f"cluster.storage_path={storage_path!r} is a local path that is not marked shared: trials on "
                f"other nodes would write to their own disks. Put it on a mount every node has at the same path "
                f"and mark the mount with `touch <mount>/{SHARED_MARKER}` (clusters/*.yaml do this on the head)")
    return None


def tracking_problem(tracking_uri: str | None, node_ips: Collection[str] = ()) -> str | None:
    """Why ``cluster.tracking_uri`` cannot serve several nodes, or None when it can."""
    if not tracking_uri:
        return (f"cluster.tracking_uri is not set, so MLflow would use sqlite on the driver's disk, which trials "
                f"on other nodes cannot reach; {_MLFLOW_HINT}")
    parts = urlsplit(tracking_uri)
    if parts.scheme.lower() in LOCAL_TRACKING_SCHEMES or len(parts.scheme) == 1:  # "C:\..." is a path
        return (f"cluster.tracking_uri={tracking_uri!r} is a store on one machine's disk, which trials on other "
                f"nodes cannot reach; {_MLFLOW_HINT}")
    distinct = set(node_ips)
    if parts.hostname in LOOPBACK_HOSTS and len(distinct) > 1:
        return (f"cluster.tracking_uri={tracking_uri!r} points at loopback, but the nodes have different IPs "
                f"({', '.join(sorted(distinct))}), so each would talk to itself; use the head's private IP")
    return None


def check_storage_and_tracking(cfg: Any, num_nodes: int, *, node_ips: Collection[str] = ()) -> None:
    """On more than one node: raise ValueError unless storage is shared and MLflow is a server.

    ``cfg`` is the sweep :class:`~orchestrator.config.Config` (only ``cfg.cluster`` is read); ``node_ips``
    (optional) enables the loopback check of the tracking URI.
    """
    if num_nodes <= 1:
        return
    problems = [p for p in (tracking_problem(cfg.cluster.tracking_uri, node_ips),
                            storage_problem(cfg.cluster.storage_path)) if p]
    if problems:
        raise ValueError(f"the Ray cluster has {num_nodes} nodes (or adds them on demand): " + "; and ".join(problems))


# ------------------------------------------------------------------------------------ live cluster

def alive_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()`` entries of the nodes that are alive (needs ``ray.init``)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def num_nodes() -> int:
    """How many nodes of the connected Ray cluster are alive."""
    return len(alive_nodes())


def scales_on_demand(cluster_resources: Mapping[str, float]) -> bool:
    """True on the clusters of ``clusters/`` (their head advertises ``tune_driver``): GPU workers join when
    trials ask for them, so resources missing at the start are no reason to refuse a sweep."""
    return cluster_resources.get(DRIVER_RESOURCE, 0) > 0


def driver_resources(base: Mapping[str, float], cluster_resources: Mapping[str, float]) -> dict[str, float]:
    """``base`` plus ``{"tune_driver": 0.01}`` when the cluster advertises that resource (on its head).

    Use it for trials that only drive a Ray Train worker group (``{"CPU": 1}``): they then run next to the
    MLflow server on the head and leave the GPU nodes' CPUs to the workers. A trial that asks for a GPU trains
    in place and is returned unchanged (the head has no GPU, pinning it there would never schedule).
    """
    out = dict(base)
    if scales_on_demand(cluster_resources) and not base.get("GPU"):
        out[DRIVER_RESOURCE] = DRIVER_SHARE
    return out


def _marker_visible(path: str) -> bool:
    return Path(path).is_file()


def check_marker_on_nodes(marker: Path, nodes: list[dict[str, Any]], timeout_s: float = 120.0) -> None:
    """Raise ValueError naming the node when a node does not see the shared-storage marker."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_marker_visible)
    refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:12]: probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
        for n in nodes}
    try:
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise ValueError(f"cluster.storage_path: could not check {marker} on every node within "
                         f"{timeout_s:g} s") from None
    missing = [node for node, ok in seen.items() if not ok]
    if missing:
        raise ValueError(f"cluster.storage_path: the shared-storage marker {marker} exists here but not on node(s) "
                         f"{', '.join(missing)}; the mount is missing there")


def preflight(cfg: Any) -> None:
    """After ``ray.init``: the storage/tracking checks against the live cluster, then, on a cluster (more than one
    node, or one given by ``cluster.address``), every path the workers use checked from every alive node
    (:mod:`orchestrator.nodes`). The storage path must exist (the sweep creates it first).

    A cluster whose head advertises ``tune_driver`` (the files in ``clusters/``) adds GPU workers on demand,
    so it counts as multi-node even while only the head is up.
    """
    import ray

    from orchestrator import nodes as node_checks

    nodes = alive_nodes()
    expected = max(len(nodes), 2) if scales_on_demand(ray.cluster_resources()) else len(nodes)
    check_storage_and_tracking(cfg, expected, node_ips=[n["NodeManagerAddress"] for n in nodes])
    if len(nodes) > 1:
        check_marker_on_nodes(find_marker(cfg.cluster.storage_path), nodes)
    if len(nodes) > 1 or cfg.cluster.address:
        node_checks.check_paths_on_nodes(cfg, nodes)


# ------------------------------------------------------------------------------------ resources

def runs_in_process(cfg: Any) -> bool:
    """A single-worker re-ID run trains inside its Tune trial / stage task (no Train worker group start-up)."""
    return cfg.sweep.in_process and cfg.reid.num_workers <= 1


def connect(cfg: Any) -> None:
    """``ray.init`` for the sweep: the cluster at ``cluster.address``, else a fresh local instance."""
    import ray

    if ray.is_initialized():
        return
    env = worker_env(cfg)
    os.environ.update(env)  # the driver's own checks see what the workers see
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, runtime_env={"env_vars": env})
        return
    num_cpus = cfg.cluster.num_cpus or max(3, os.cpu_count() or 1)
    dashboard: dict = {"include_dashboard": False}
    if not runs_in_process(cfg):
        # Trials that drive Ray Train runs: when Tune stops one (ASHA), its Train controller dies with the trial
        # actor and Train's PlacementGroupCleaner frees the workers' placement group once the State API (served by
        # the dashboard) says so; without it the next trial waits for those CPUs/GPUs forever. Pin the State API
        # address (inherited by the workers): with other Ray instances on the machine auto-detection fails.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        dashboard = {"include_dashboard": True, "dashboard_port": port}
    # address="local": always a fresh instance, never one some other user's `ray start` left on this machine
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, runtime_env={"env_vars": env}, **dashboard)


def worker_env(cfg: Any) -> dict[str, str]:
    """Environment of every worker of the sweep's Ray job: the Train worker-group start timeout (a value the user
    exported wins) and, with ``cluster.logical_gpus``, leave to run on the CPU where a logical GPU was granted."""
    from trainables.runtime import LOGICAL_GPUS_ENV

    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                                                                    WORKER_GROUP_START_TIMEOUT_S)}
    if cfg.cluster.logical_gpus:
        env[LOGICAL_GPUS_ENV] = "1"
    return {k: v for k, v in env.items() if k not in _job_env_keys()}


def _job_env_keys() -> set[str]:
    """Env vars the ``ray job submit`` runtime env sets already (ray.init refuses the same key twice)."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def compute_resources(cpus: float, gpus: float, cluster_resources: Mapping[str, float]) -> dict[str, float]:
    """Resources of a task that computes: ``cpus``/``gpus``, plus a sliver of the worker-node resource where the
    cluster advertises it (never the head)."""
    out = {"CPU": float(cpus), "GPU": float(gpus)}
    if cluster_resources.get(WORKER_RESOURCE, 0) > 0 or scales_on_demand(cluster_resources):
        out[WORKER_RESOURCE] = WORKER_SHARE
    return out


def _cluster_resources() -> dict[str, float]:
    """The connected cluster's resources ({} before ``ray.init``: plain requests, e.g. for offline checks)."""
    import ray

    return ray.cluster_resources() if ray.is_initialized() else {}


def ray_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """``{"CPU": c, "GPU": g, "x": v}`` -> the keyword arguments of ``ray.remote`` / ``.options``."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0),
            **({"resources": custom} if custom else {})}


def stage_resources(cfg: Any, stage: str) -> dict[str, float]:
    """What a stage's Ray task asks for. ``cpu``: the dataset stage; ``gan``/``reid``: training (a task that only
    drives a Train worker group asks for what a driver trial does); ``generate``/``smprl``: inference."""
    have = _cluster_resources()
    if stage == "cpu":
        return compute_resources(1, 0, have)
    sub = cfg.gan if stage in ("gan", "generate") else cfg.reid
    if stage in ("gan", "reid") and not (cfg.sweep.in_process and sub.num_workers <= 1):
        return driver_resources({"CPU": 1}, have)
    workers = getattr(sub, "loader_workers", 0)
    return compute_resources(1 + workers, 1 if sub.use_gpu else 0, have)


def generation_helpers(cfg: Any) -> int:
    """Generation workers besides the stage's own: one per other GPU (0 on CPU). On a cluster that adds GPU nodes
    on demand, as many as ``sweep.max_concurrent`` allows (the GPUs it will have), not the GPUs up now."""
    if not cfg.gan.use_gpu:
        return 0
    have = _cluster_resources()
    gpus = cfg.sweep.max_concurrent if scales_on_demand(have) else int(have.get("GPU", 0))
    return max(0, gpus - 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial_resources(cfg: Any) -> dict[str, float]:
    """What one Tune trial asks for: all of an in-process trial; only the driver of a Train worker group."""
    if runs_in_process(cfg):
        return compute_resources(1 + cfg.reid.loader_workers, 1 if cfg.reid.use_gpu else 0, _cluster_resources())
    return driver_resources({"CPU": 1}, _cluster_resources())


CLUSTER_RETRIES = 3  # sweep.max_failures on a cluster unless set: spot capacity is reclaimed, nodes are lost


def trial_retries(cfg: Any) -> int:
    """``sweep.max_failures``, else 3 on a cluster (``cluster.address`` set) and 1 on one machine."""
    if cfg.sweep.max_failures is not None:
        return cfg.sweep.max_failures
    return CLUSTER_RETRIES if cfg.cluster.address else 1


def max_concurrent(cfg: Any) -> int:
    """Trials that fit the cluster at once (``sweep.max_concurrent`` when set)."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    import ray

    have = ray.cluster_resources()
    if runs_in_process(cfg):
        fit = int(have.get("CPU", 1) // (1 + cfg.reid.loader_workers))
        if cfg.reid.use_gpu:
            fit = min(fit, int(have.get("GPU", 0)))
    else:
        workers = max(1, cfg.reid.num_workers)
        fit = int(have.get("GPU", 0) // workers) if cfg.reid.use_gpu else int(have.get("CPU", 1) // (workers + 1))
    if fit < 1:
        raise ValueError(f"one trial needs {trial_resources(cfg)} plus {cfg.reid.num_workers} workers but the Ray "
                         f"cluster has {dict(have)}; lower reid.num_workers / reid.loader_workers or add nodes")
    return fit


def check_resources(cfg: Any) -> None:
    """Refuse, before any stage runs, worker counts that the Ray cluster can never place (Ray would wait forever)."""
    import ray

    have = ray.cluster_resources()
    if scales_on_demand(have):  # GPU workers join when trials ask for them
        if not have.get(WORKER_RESOURCE):
            print(f"[cluster] no node advertises {WORKER_RESOURCE} yet: stages and trials wait for worker nodes "
                  f"that do (the clusters/*.yaml workers do; a head with {DRIVER_RESOURCE} computes nothing)",
                  flush=True)
        if not cfg.sweep.max_concurrent:
            raise ValueError("sweep.max_concurrent must be set on a cluster that adds GPU workers on demand")
        return
    for section in ("gan", "reid"):
        sub = getattr(cfg, section)
        kind = "GPU" if sub.use_gpu else "CPU"
        # CPU: each Train worker takes 1 CPU and the stage/trial driving it 1 more; GPU: 1 GPU per worker
        need = max(1, sub.num_workers) if sub.use_gpu else sub.num_workers + 1
        if have.get(kind, 0) < need:
            raise ValueError(f"{section}.num_workers={sub.num_workers} needs {need} {kind}s but the Ray cluster has "
                             f"{int(have.get(kind, 0))}; lower {section}.num_workers or add nodes")
    max_concurrent(cfg)
