"""What the cluster-file tests share (not a test module): the files of clusters/, read and checked offline."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from orchestrator.cluster import SHARED_MARKER
from orchestrator.resources import DRIVER_RESOURCE

ROOT = Path(__file__).parents[1]
CLUSTER_FILES = sorted((ROOT / "clusters").glob("*.yaml"))
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def read_docs(path: Path) -> list[dict]:
    """The YAML documents of a cluster file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def is_kuberay(docs: list[dict]) -> bool:
    return any(str(d.get("apiVersion", "")).startswith("ray.io/") for d in docs)


def launcher_files() -> list[Path]:
    return [p for p in CLUSTER_FILES if not is_kuberay(read_docs(p))]


def kuberay_files() -> list[Path]:
    return [p for p in CLUSTER_FILES if is_kuberay(read_docs(p))]


def validate_launcher(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config  # private, offline

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def ray_version() -> str:
    import ray

    return ray.__version__


def rayjob(docs: list[dict]) -> dict:
    return next(d for d in docs if d.get("kind") == "RayJob")


def pods(rayjob: dict) -> list[dict]:
    rc = rayjob["spec"]["rayClusterSpec"]
    return [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]


def arg(entrypoint: str, flag: str) -> str | None:
    m = re.search(rf"{re.escape(flag)}[ =](\S+)", entrypoint)
    return m.group(1) if m else None


def pod_problems(pod: dict, claims: set[str], where: str) -> list[str]:
    problems = []
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{where}: volumeMount {m['name']} has no volume")
    for v in volumes.values():
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim and claim not in claims:
            problems.append(f"{where}: claim {claim} is not defined in the file")
    return problems


def mlflow_problems(docs: list[dict], entrypoint: str) -> list[str]:
    import mlflow

    uri = arg(entrypoint, "--tracking-uri")
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", uri or "")
    if not m:
        return [f"--tracking-uri {uri!r} is not http://<service>:<port>"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    svc = services.get(m.group(1))
    if svc is None or int(m.group(2)) not in [p["port"] for p in svc["spec"]["ports"]]:
        return [f"no Service {m.group(1)} with port {m.group(2)}"]
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
        return [f"Service {m.group(1)} must stay internal (ClusterIP)"]
    deps = [d for d in docs if d["kind"] == "Deployment" and
            svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    if len(deps) != 1:
        return [f"Service {m.group(1)} selects {len(deps)} Deployments"]
    container = deps[0]["spec"]["template"]["spec"]["containers"][0]
    problems = []
    if not container["image"].endswith(f":v{mlflow.__version__}"):
        problems.append(f"MLflow image {container['image']} is not v{mlflow.__version__}")
    if not any(a.startswith("--allowed-hosts=") and f"{m.group(1)}:{m.group(2)}" in a for a in container["command"]):
        problems.append("the MLflow server does not allow the Service's Host header")
    return problems


def kuberay_problems(docs: list[dict]) -> list[str]:
    """Structural checks of a KubeRay file; an empty list means it passed."""
    problems = [f"document {i} lacks apiVersion/kind/metadata.name" for i, d in enumerate(docs)
                if not (d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"))]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    if problems or len(jobs) != 1 or jobs[0]["apiVersion"] != "ray.io/v1":
        return problems + [f"expected one ray.io/v1 RayJob, found {len(jobs)}"]
    spec = jobs[0]["spec"]
    entry = " ".join(spec.get("entrypoint", "").split())
    if not entry.startswith("python -m orchestrator.sweep") or "--address auto" not in entry:
        problems.append(f"entrypoint {entry!r} does not run the sweep against the job's cluster")
    rc = spec["rayClusterSpec"]
    if rc.get("rayVersion") != ray_version():
        problems.append(f"rayVersion {rc.get('rayVersion')} != installed ray {ray_version()}")
    images = {c["image"] for pod in pods(jobs[0]) for c in pod["containers"]}
    if len(images) != 1 or not next(iter(images)).endswith(f":{ray_version()}-py311-gpu"):
        problems.append(f"Ray pods must share one image tagged {ray_version()}-py311-gpu: {images}")
    if DRIVER_RESOURCE not in rc["headGroupSpec"].get("rayStartParams", {}).get("resources", ""):
        problems.append("the head does not advertise tune_driver")
    for g in rc["workerGroupSpecs"]:
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
            problems.append(f"worker group {g.get('groupName')}: replicas outside [minReplicas, maxReplicas]")
    if not any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
               for g in rc["workerGroupSpecs"]):
        problems.append("no worker group asks for nvidia.com/gpu")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for i, pod in enumerate(pods(jobs[0])):
        problems += pod_problems(pod, claims, f"Ray pod {i}")
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        storage = arg(entry, "cluster.storage_path") or ""
        if not any(storage.startswith(mp.rstrip("/") + "/") for mp in mounts):
            problems.append(f"Ray pod {i} does not mount cluster.storage_path={storage}")
    head = rc["headGroupSpec"]["template"]["spec"]
    if f"/{SHARED_MARKER}" not in str(head.get("initContainers", [])):
        problems.append("the head does not mark the shared volume")
    return problems + mlflow_problems(docs, entry)


