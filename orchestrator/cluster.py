"""Connecting to Ray, and the cluster checks that fail in seconds, naming the field, before a multi-node sweep goes
wrong slowly.

* :func:`connect` / :func:`start_local_ray`: the one way this project calls ``ray.init``.
* :func:`check_address` probes a Ray address with one TCP connect, because ``ray.init`` against a dead address
  retries for minutes.
* :func:`check_storage_and_tracking` refuses, on a multi-node cluster, settings that silently split the results
  across machines: a storage path that is not shared and an MLflow store on the driver's disk.
* :func:`preflight` runs the checks that need the live cluster, right after ``ray.init``: the shared-storage
  marker and every path the workers use, probed on every alive node (:func:`on_every_node`).

What each task asks for is :mod:`orchestrator.resources`.

Shared storage is *declared*, not guessed: the stage cache, the generated-image store, Ray Tune and Ray Train
all write POSIX files under ``cluster.storage_path``, so on several nodes it must be a mount (NFS, EFS, a
Kubernetes RWX volume) at the same path on every node. Whoever sets up that mount writes an empty marker file
``.mprl-shared`` at its root (the files in ``clusters/`` do it on the head; their worker setup refuses to join
when the marker is not visible), and a storage path at or below a marked folder counts as shared. The driver
also checks that every node already in the cluster sees the marker.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable, Collection
from urllib.parse import urlsplit

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.resources import capacity_bundles, runs_in_process, scales_on_demand
from orchestrator.tracking import RETRY_ENV
from trainables.placement import LOGICAL_GPUS_ENV, node_name

SHARED_MARKER = ".mprl-shared"
DATASET_FIELD = "dataset.root"  # the fields a worker path came from, for messages
STORAGE_FIELD = "cluster.storage_path"
# On clusters that add GPU nodes on demand a Train worker group may wait minutes for its node; Ray Train's
# default is 60 s, after which it tears the group down and retries (docs/clusters.md, "What runs where").
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

    return [n for n in ray.nodes() if n.get("Alive")]


def on_every_node(fn: Callable[[Any], Any], arg: Any, nodes: list[dict[str, Any]], what: str,
                  timeout_s: float = 120.0) -> dict[str, Any]:
    """``{node name: fn(arg)}``, ``fn`` run by one small Ray task pinned to each node (no CPU); ValueError naming
    ``what`` when not every node answers within ``timeout_s`` (a node without free memory, a hung mount)."""

    probe = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {node_name(n["NodeManagerAddress"], n["NodeID"]): probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(arg) for n in nodes}
    try:
        return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise ValueError(f"could not check {what} on every node within {timeout_s:g} s (a node without free "
                         f"memory or a hung mount?)") from None


def _marker_visible(path: str) -> bool:
    return Path(path).is_file()


def check_marker_on_nodes(marker: Path, nodes: list[dict[str, Any]], timeout_s: float = 120.0) -> None:
    """Raise ValueError naming the node when a node does not see the shared-storage marker."""
    seen = on_every_node(_marker_visible, str(marker), nodes, f"{STORAGE_FIELD} ({marker})", timeout_s)
    missing = [node for node, ok in seen.items() if not ok]
    if missing:
        raise ValueError(f"{STORAGE_FIELD}: the shared-storage marker {marker} exists here but not on "
                         f"{', '.join(missing)}; the mount is missing there")


def worker_paths(cfg: Any) -> dict[str, str]:
    """``{field: path}`` of what workers use: the storage path (written); a given dataset root, the cross-domain test
    sets and a folder pool (read)."""
    out = {STORAGE_FIELD: str(Path(cfg.cluster.storage_path))}
    if cfg.dataset.root:
        out[DATASET_FIELD] = str(Path(cfg.dataset.root).expanduser().absolute())
    for i, root in enumerate(getattr(cfg.dataset, "test_root", ())):  # cross-domain test sets: read by every trial
        out[f"dataset.test_root[{i}]"] = root
    if getattr(cfg.labels, "pool_root", None):  # a folder pool: read by its pool stage, wherever that runs
        out["labels.pool_root"] = str(Path(cfg.labels.pool_root).expanduser().absolute())
    return out


def path_problems(paths: dict[str, str]) -> dict[str, str]:
    """``{field: problem}`` for the paths unusable from this process: runs on each node (and is testable here).

    The dataset root must be a readable folder; the storage path a writable folder (the driver creates it
    before the check, so on shared storage it exists everywhere).
    """
    problems = {}
    for field, path in paths.items():
        p = Path(path)
        write = field == STORAGE_FIELD
        if not p.is_dir():
            problems[field] = f"{field}={path} does not exist there" if not p.exists() else \
                f"{field}={path} is not a folder there"
        elif not os.access(p, (os.W_OK if write else os.R_OK) | os.X_OK):
            problems[field] = f"{field}={path} is not {'writable' if write else 'readable'} there"
    return problems


def problems_message(found: dict[str, dict[str, str]]) -> str | None:
    """One message for ``{node: {field: problem}}``, or None when every node can use every path."""
    bad = [f"on {node}: " + "; ".join(problems.values()) for node, problems in found.items() if problems]
    if not bad:
        return None
    return ("the workers could not use these paths (every node needs the dataset and the storage at the same "
            "path, e.g. on the shared mount): " + " | ".join(bad))


def check_paths_on_nodes(cfg: Any, nodes: list[dict[str, Any]], timeout_s: float = 120.0) -> None:
    """Every path the workers read or write, checked from every node before any stage runs: the driver's own
    checks see only the driver's disk, and a ``dataset.root`` on the head's local disk, or a storage mount missing
    on one node, would only fail there, hours later. One ValueError names every node and path that is unusable."""
    paths = worker_paths(cfg)
    message = problems_message(on_every_node(path_problems, paths, nodes, ", ".join(paths.values()), timeout_s))
    if message:
        raise ValueError(message)


def preflight(cfg: Any) -> None:
    """After ``ray.init``: the storage/tracking checks against the live cluster, then, on a cluster (more than one
    node, or one given by ``cluster.address``), every path the workers use checked from every alive node. The
    storage path must exist (the sweep creates it first).

    A cluster whose head advertises ``tune_driver`` (the files in ``clusters/``) adds GPU workers on demand,
    so it counts as multi-node even while only the head is up.
    """

    nodes = alive_nodes()
    expected = max(len(nodes), 2) if scales_on_demand(ray.cluster_resources()) else len(nodes)
    check_storage_and_tracking(cfg, expected, node_ips=[n["NodeManagerAddress"] for n in nodes])
    if len(nodes) > 1:
        check_marker_on_nodes(find_marker(cfg.cluster.storage_path), nodes)
    if len(nodes) > 1 or cfg.cluster.address:
        check_paths_on_nodes(cfg, nodes)


def request_capacity(cfg: Any, trials: int) -> int:
    """On a cluster that adds workers on demand: ask Ray's autoscaler, now, for the nodes of ``trials`` concurrent
    trials (at most ``sweep.max_concurrent``), so the GPU nodes boot together instead of one stage at a time (Ray
    counts a task's demand only once its inputs exist). The request stands until :func:`release_capacity`.
    Returns the number of bundles requested (0 elsewhere: a fixed cluster or one machine)."""
    if not scales_on_demand(ray.cluster_resources()):
        return 0
    from ray.autoscaler.sdk import request_resources

    bundles = capacity_bundles(cfg, trials)
    request_resources(bundles=bundles)
    print(f"[cluster] asked the autoscaler for {len(bundles)} x {bundles[0] if bundles else {}} "
          f"({min(trials, cfg.sweep.max_concurrent)} concurrent trials) up front", flush=True)
    return len(bundles)


def release_capacity() -> None:
    """Withdraw :func:`request_capacity`'s standing request, so idle workers scale down after the sweep."""
    if ray.is_initialized() and scales_on_demand(ray.cluster_resources()):
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])


# ------------------------------------------------------------------------------------ ray.init

def connect(cfg: Any) -> None:
    """``ray.init`` for a sweep or a training CLI: the cluster at ``cluster.address``, else a fresh local instance
    of ``cluster.num_cpus`` CPUs (0: max(3, the machine's))."""

    if ray.is_initialized():
        return
    env = worker_env(cfg)
    os.environ.update(env)  # the driver's own checks see what the workers see
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, runtime_env={"env_vars": env})
        return
    # Trials that drive Ray Train runs: when Tune stops one (ASHA), its Train controller dies with the trial actor
    # and Train's PlacementGroupCleaner frees the workers' placement group once the State API (served by the
    # dashboard) says so; without it the next trial waits for those CPUs/GPUs forever.
    start_local_ray(cfg.cluster.num_cpus or max(3, os.cpu_count() or 1), env=env,
                    dashboard=not runs_in_process(cfg))


def start_local_ray(num_cpus: int, *, env: dict[str, str] | None = None, dashboard: bool = False,
                    **options: Any) -> None:
    """A fresh local Ray instance (``address="local"``: never one some other user's ``ray start`` left on this
    machine). ``dashboard``: with the dashboard, on a free port that the State API address is pinned to (inherited by
    the workers; with other Ray instances on the machine auto-detection fails). ``options`` go to ``ray.init``."""

    if dashboard:
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        options.update(include_dashboard=True, dashboard_port=port)
    else:
        options.setdefault("include_dashboard", False)
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, runtime_env={"env_vars": env or {}},
             **options)


def worker_env(cfg: Any) -> dict[str, str]:
    """Environment of every worker of the sweep's Ray job: the Train worker-group start timeout (a value the user
    exported wins), the MLflow client's longer HTTP retries (``tracking.RETRY_ENV``) and, with
    ``cluster.logical_gpus``, leave to run on the CPU where a logical GPU was granted."""
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                                                                    WORKER_GROUP_START_TIMEOUT_S)}
    env.update({k: os.environ.get(k, v) for k, v in RETRY_ENV.items()})  # MLflow calls outlast a server restart
    if cfg.cluster.logical_gpus:
        env[LOGICAL_GPUS_ENV] = "1"
    return {k: v for k, v in env.items() if k not in _job_env_keys()}


def _job_env_keys() -> set[str]:
    """Env vars the ``ray job submit`` runtime env sets already (ray.init refuses the same key twice)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def free_port() -> int:
    """A TCP port free on loopback now (for a dashboard, an MLflow server of a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
