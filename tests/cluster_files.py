"""What the cluster-file tests share (not a test module): the files of clusters/, read and checked offline."""

from __future__ import annotations

import copy
import gzip
import json
import re
from functools import cache
from pathlib import Path

import yaml

from orchestrator.cluster import SHARED_MARKER
from orchestrator.resources import DRIVER_RESOURCE

ROOT = Path(__file__).parents[1]
CLUSTER_FILES = sorted((ROOT / "clusters").glob("*.yaml"))
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
# KubeRay v1.7.0's RayJob CRD schema (openAPIV3Schema of version v1), vendored: tests/data/README.md says from where.
RAYJOB_SCHEMA = ROOT / "tests" / "data" / "kuberay-v1.7.0-rayjob-v1-openapi.json.gz"
# The nodes kuberay.yaml's header documents, as what their pods may request: an 8-vCPU / 32-GiB CPU node (about 7.9
# CPUs / 29 GiB allocatable on EKS, less ~0.4 CPU / 1 GiB of DaemonSets) and a 16-vCPU / 64-GiB 1-GPU node (about
# 15.9 CPUs / 59 GiB allocatable, less the same). Estimates from EKS's kube-reserved formula, not measured.
CPU_NODE_BUDGET = {"cpu": 7.5, "memory": 28 * 2**30}
GPU_NODE_BUDGET = {"cpu": 15.5, "memory": 58 * 2**30}


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


def ray_cpu_image() -> str:
    """Ray's CPU image of the installed Ray: no system CUDA beside the one torch's wheel brings."""
    return f"rayproject/ray:{ray_version()}-py311-cpu"


def node_image() -> str:
    """The image clusters/Dockerfile builds (tagged with the CUDA major of torch's wheel, which sets the driver)."""
    return f"REPLACE_ME_REGISTRY/mprl-orchestrator:{ray_version()}-py311-cu13"


# ------------------------------------------------------------------------------------- KubeRay CRD schema

def strict_schema(schema: dict, *, root: bool = True) -> dict:
    """``schema`` with unknown fields rejected, as the API server's strict field validation treats a structural
    schema: every object schema that neither lists ``additionalProperties`` nor carries
    ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``. The top-level ``metadata`` (an
    ObjectMeta the API server checks itself; the CRD says only ``type: object``) keeps unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: ({**v, "x-kubernetes-preserve-unknown-fields": True} if root and k == "metadata"
                                 else strict_schema(v, root=False)) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = strict_schema(out["items"], root=False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"], root=False)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(s, root=False) for s in out[key]]
    if (out.get("type") == "object" and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def rayjob_validator():
    from jsonschema import Draft7Validator

    schema = json.loads(gzip.decompress(RAYJOB_SCHEMA.read_bytes()))
    return Draft7Validator(strict_schema(schema))


def crd_problems(rayjob: dict) -> list[str]:
    """What the API server would refuse in ``rayjob`` under the vendored CRD with strict field validation:
    one line per error, with its path."""
    errors = sorted(rayjob_validator().iter_errors(rayjob), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ------------------------------------------------------------------------------------- Kubernetes quantities

_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "16Gi", "2") as a number (CPUs or bytes)."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m and (not m.group(2) or m.group(2) in _SUFFIX), f"unparsed quantity {value!r}"
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1)


def requests(containers: list[dict]) -> dict[str, float]:
    """What a pod's containers request: the sum of its containers' requests (init containers run before them and
    count only where one asks for more, which none of these do)."""
    total = {"cpu": 0.0, "memory": 0.0}
    for c in containers:
        for k in total:
            total[k] += quantity(c.get("resources", {}).get("requests", {}).get(k, 0))
    return total


def rayjob(docs: list[dict]) -> dict:
    return next(d for d in docs if d.get("kind") == "RayJob")


def pods(rayjob: dict) -> list[dict]:
    rc = rayjob["spec"]["rayClusterSpec"]
    return [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]


def all_pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec of a KubeRay file by a name: bare Pods, the templates of Deployments and StatefulSets, and the
    RayJob's head, worker groups and submitter."""
    out = {}
    for d in docs:
        if d["kind"] == "Pod":
            out[d["metadata"]["name"]] = d["spec"]
        elif d["kind"] in ("Deployment", "StatefulSet"):
            out[d["metadata"]["name"]] = d["spec"]["template"]["spec"]
        elif d["kind"] == "RayJob":
            rc = d["spec"]["rayClusterSpec"]
            out["ray-head"] = rc["headGroupSpec"]["template"]["spec"]
            out.update({f"ray-{g['groupName']}": g["template"]["spec"] for g in rc["workerGroupSpecs"]})
            if "submitterPodTemplate" in d["spec"]:
                out["ray-submitter"] = d["spec"]["submitterPodTemplate"]["spec"]
    return out


def restricted_problems(name: str, pod: dict) -> list[str]:
    """Where ``pod`` breaks the "restricted" Pod Security Standard (the parts a manifest decides): runAsNonRoot and
    a non-root uid, the RuntimeDefault/Localhost seccomp profile, and per container no privilege escalation, all
    capabilities dropped, no root uid, no privileged mode."""
    problems = []
    psc = pod.get("securityContext", {})
    if psc.get("runAsUser") == 0:
        problems.append(f"{name}: pod runs as root")
    if psc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{name}: no RuntimeDefault seccomp profile")
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = c.get("securityContext", {})
        where = f"{name}/{c['name']}"
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) and sc.get("runAsUser", psc.get("runAsUser"))):
            problems.append(f"{where}: not runAsNonRoot with a non-root runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities not dropped (drop: [ALL])")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
    return problems


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


def secret_env(container: dict, name: str) -> dict | None:
    """The secretKeyRef that sets env ``name`` in ``container`` (None when it is unset or a literal)."""
    env = {e["name"]: e for e in container.get("env", [])}
    return env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")


def mlflow_problems(docs: list[dict], entrypoint: str) -> list[str]:
    """The sweep's --tracking-uri is an internal Service in front of one MLflow Deployment of the pinned MLflow
    version that admits the Service's Host header, and stores its runs in a PostgreSQL Service of the file
    (password from a Secret, not in the URI)."""
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
    if not re.search(rf":v{re.escape(mlflow.__version__)}(-full)?$", container["image"]):
        problems.append(f"MLflow image {container['image']} is not v{mlflow.__version__}")
    if not any(a.startswith("--allowed-hosts=") and f"{m.group(1)}:{m.group(2)}" in a for a in container["command"]):
        problems.append("the MLflow server does not allow the Service's Host header")
    store = next((a.split("=", 1)[1] for a in container["command"] if a.startswith("--backend-store-uri=")), "")
    db = re.fullmatch(r"postgresql\+(psycopg2?)://(\w+)@([a-z0-9-]+):(\d+)/\w+", store)
    if not db:
        return problems + [f"MLflow's backend store {store!r} is not postgresql+<driver>://USER@SERVICE:PORT/DB "
                           "(no password)"]
    if not container["image"].endswith("-full"):
        problems.append("MLflow's image has no PostgreSQL driver (the -full variant has psycopg and psycopg2)")
    pg = services.get(db.group(3))
    if pg is None or int(db.group(4)) not in [p["port"] for p in pg["spec"]["ports"]]:
        problems.append(f"no Service {db.group(3)} with port {db.group(4)} for the MLflow database")
    if not secret_env(container, "PGPASSWORD"):
        problems.append("MLflow's PGPASSWORD does not come from a Secret")
    return problems


def kuberay_problems(docs: list[dict]) -> list[str]:
    """Structural checks of a KubeRay file; an empty list means it passed. (The RayJob's fields against KubeRay's
    CRD: `crd_problems`.)"""
    problems = [f"document {i} lacks apiVersion/kind/metadata.name" for i, d in enumerate(docs)
                if not (d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"))]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    if problems or len(jobs) != 1 or jobs[0]["apiVersion"] != "ray.io/v1":
        return problems + [f"expected one ray.io/v1 RayJob, found {len(jobs)}"]
    spec = jobs[0]["spec"]
    entry = " ".join(spec.get("entrypoint", "").split())
    if not entry.startswith("python -m orchestrator.sweep") or "--address auto" not in entry:
        problems.append(f"entrypoint {entry!r} does not run the sweep against the job's cluster")
    # the operator's own rule (ray-operator/controllers/ray/utils/validation.go, ValidateRayJobSpec)
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("a suspended RayJob needs shutdownAfterJobFinishes: true (KubeRay refuses it otherwise)")
    rc = spec["rayClusterSpec"]
    if rc.get("rayVersion") != ray_version():
        problems.append(f"rayVersion {rc.get('rayVersion')} != installed ray {ray_version()}")
    ray_pods = pods(jobs[0]) + ([spec["submitterPodTemplate"]["spec"]] if "submitterPodTemplate" in spec else [])
    images = {c["image"] for pod in ray_pods for c in [*pod["containers"], *pod.get("initContainers", [])]}
    if images != {node_image()}:
        problems.append(f"Ray pods must share one image, {node_image()}: {images}")
    if DRIVER_RESOURCE not in rc["headGroupSpec"].get("rayStartParams", {}).get("resources", ""):
        problems.append("the head does not advertise tune_driver")
    for g in rc["workerGroupSpecs"]:
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
            problems.append(f"worker group {g.get('groupName')}: replicas outside [minReplicas, maxReplicas]")
    if not any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
               for g in rc["workerGroupSpecs"]):
        problems.append("no worker group asks for nvidia.com/gpu")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    storage = arg(entry, "cluster.storage_path") or ""
    for i, pod in enumerate(pods(jobs[0])):
        problems += pod_problems(pod, claims, f"Ray pod {i}")
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        if not any(storage.startswith(mp.rstrip("/") + "/") for mp in mounts):
            problems.append(f"Ray pod {i} does not mount cluster.storage_path={storage}")
    # the marker: written by a pod outside the Ray cluster (before it exists), awaited by the head
    marker = f"/mnt/shared/{SHARED_MARKER}"
    writers = [n for n, p in all_pod_specs(docs).items() if not n.startswith("ray-")
               and f"touch {marker}" in " ".join(" ".join(c.get("command", [])) for c in p["containers"])]
    if not writers:
        problems.append("no pod outside the Ray cluster writes the shared marker")
    head = rc["headGroupSpec"]["template"]["spec"]
    waits = " ".join(" ".join(c.get("command", [])) for c in head.get("initContainers", []))
    dataset = arg(entry, "dataset.root") or ""
    if marker not in waits or not dataset or dataset not in waits:
        problems.append(f"the head does not wait for the shared marker and dataset.root={dataset}")
    # GCS fault tolerance: a Redis Service of this file
    redis = rc.get("gcsFaultToleranceOptions", {}).get("redisAddress", "")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    host, _, port = redis.rpartition(":")
    if not (host in services and port.isdigit() and int(port) in [p["port"] for p in services[host]["spec"]["ports"]]):
        problems.append(f"gcsFaultToleranceOptions.redisAddress {redis!r} is not a Service of the file")
    for name, pod in all_pod_specs(docs).items():
        problems += restricted_problems(name, pod)
    return problems + mlflow_problems(docs, entry)


def placeholder_fill(docs_text: str, target: str) -> list[tuple[str, str]]:
    """The (pattern, delimiter) pairs of the ``sed -e "s/PATTERN/.../g"`` line in ``docs_text`` that writes
    ``target`` (e.g. ``~/.mprl/gpu.yaml``)."""
    lines = docs_text.replace("\\\n", " ").splitlines()
    line = next((x for x in lines if "sed " in x and f"> {target}" in x), "")
    return [(pat, delim) for delim, pat in re.findall(r'-e "s(.)(.+?)\1', line)]
