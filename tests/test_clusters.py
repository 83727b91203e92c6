"""Deployment files and cluster checks, without a cluster (seconds).

Every ``clusters/*.yaml`` is validated offline: launcher files against the installed Ray's own schema
(``prepare_config`` + ``validate_config``, no cloud calls), KubeRay files structurally (see
:func:`kuberay_problems`). New files are picked up by the glob.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from orchestrator import cluster

ROOT = Path(__file__).parents[1]
CLUSTER_FILES = sorted((ROOT / "clusters").glob("*.yaml"))
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _is_kuberay(docs: list[dict]) -> bool:
    return any(str(d.get("apiVersion", "")).startswith("ray.io/") for d in docs)


def _launcher_files() -> list[Path]:
    return [p for p in CLUSTER_FILES if not _is_kuberay(_docs(p))]


def _kuberay_files() -> list[Path]:
    return [p for p in CLUSTER_FILES if _is_kuberay(_docs(p))]


def _validate_launcher(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config  # private, offline

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def _ray_version() -> str:
    import ray

    return ray.__version__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_files_exist():
    names = {p.name for p in CLUSTER_FILES}
    assert {"gpu.yaml", "local.yaml", "kuberay.yaml"} <= names


# ------------------------------------------------------------------------------------- every file

@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_is_valid(path):
    docs = _docs(path)
    if _is_kuberay(docs):
        assert kuberay_problems(docs) == []
    else:
        assert len(docs) == 1, "a launcher file holds one YAML document"
        _validate_launcher(docs[0])


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_holds_no_credentials(path):
    text = path.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)password\s*:", r"(?i)\btoken\s*:",
                    r"-----BEGIN"):
        assert not re.search(pattern, text), f"{path.name} matches {pattern}"


def test_typo_key_fails_launcher_validation():
    from jsonschema import ValidationError

    raw = _docs(ROOT / "clusters" / "gpu.yaml")[0]
    raw["setup_comands"] = raw.pop("setup_commands")
    with pytest.raises(ValidationError, match="setup_comands"):
        _validate_launcher(raw)
    fractional = _docs(ROOT / "clusters" / "gpu.yaml")[0]
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(ValidationError):
        _validate_launcher(fractional)


# ------------------------------------------------------------------------------------- launcher files

@pytest.mark.parametrize("path", _launcher_files(), ids=lambda p: p.name)
def test_launcher_file_uses_the_pinned_ray_image(path):
    """The plain pinned Ray image, or the node image that clusters/Dockerfile builds from it (then nothing heavy
    is installed at boot)."""
    doc = _docs(path)[0]
    docker = doc["docker"]
    images = {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    pinned = f"rayproject/ray:{_ray_version()}-py311-gpu"
    baked = f"REPLACE_ME_REGISTRY/mprl-orchestrator:{_ray_version()}-py311-gpu"
    assert images in ({pinned}, {baked})
    if images == {baked}:
        dockerfile = (Path(__file__).parents[1] / "clusters" / "Dockerfile").read_text()
        assert f"FROM {pinned}" in dockerfile and "torch==" in dockerfile
        assert not any("torch" in c and "pip install" in c for c in doc.get("setup_commands", []))


@pytest.mark.parametrize("path", _launcher_files(), ids=lambda p: p.name)
def test_launcher_commands_are_valid_bash(path):
    raw = _docs(path)[0]
    commands = [c for key in COMMAND_KEYS for c in raw.get(key, [])]
    assert commands
    for cmd in commands:
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd!r}: {res.stderr}"


@pytest.mark.parametrize("path", _launcher_files(), ids=lambda p: p.name)
def test_launcher_file_installs_the_bootstrap_torch_pin(path):
    spec = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-([^}]*)\}"', (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert spec, "scripts/bootstrap.sh no longer defines TORCH_SPEC"
    doc = _docs(path)[0]
    setup = " ".join(doc["setup_commands"])
    if "mprl-orchestrator" in doc["docker"]["image"]:  # the node image of clusters/Dockerfile: the pin is baked in
        assert spec.group(1) in (ROOT / "clusters" / "Dockerfile").read_text()
        assert "pip install -q --no-deps -e /home/ray/mprl" in setup
        return
    assert spec.group(1) in setup
    assert "pip install -q -e /home/ray/mprl" in setup


@pytest.mark.parametrize("path", _launcher_files(), ids=lambda p: p.name)
def test_launcher_head_runs_mlflow_on_a_private_address_and_marks_storage(path):
    raw = _docs(path)[0]
    start = " ".join(raw["head_start_ray_commands"])
    assert "mlflow_server.sh start" in start and "MLFLOW_HOST=$(" in start
    assert "0.0.0.0" not in start and "--dashboard-host=127.0.0.1" in start
    assert "tune_driver" in start or "tune_driver" in str(raw.get("available_node_types", {}))
    assert f"touch /mnt/shared/{cluster.SHARED_MARKER}" in " ".join(raw["head_setup_commands"])
    assert f"/mnt/shared/{cluster.SHARED_MARKER}" in " ".join(raw["worker_setup_commands"])


def test_gpu_workers_fit_a_paper_trial():
    from orchestrator.config import load_config
    need = cluster.trial_resources(load_config("paper", overrides=["dataset.root=/mnt/shared/data/Market-1501"]))
    assert need.get("GPU", 0) >= 1
    types = _docs(ROOT / "clusters" / "gpu.yaml")[0]["available_node_types"]
    fits = [name for name, t in types.items()
            if all(t["resources"].get(k, 0) >= v for k, v in need.items())]
    assert fits, f"no node type of gpu.yaml can run a paper trial needing {need}"
    assert types["head"]["resources"].get(cluster.DRIVER_RESOURCE, 0) > 0
    for group in _rayjob(_docs(ROOT / "clusters" / "kuberay.yaml"))["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits["cpu"]) >= need["CPU"] and int(limits["nvidia.com/gpu"]) >= need["GPU"]


def test_only_worker_nodes_advertise_the_compute_resource():
    """Stages and trials ask for a sliver of mprl_worker (where the cluster has it): the head never computes."""
    types = _docs(ROOT / "clusters" / "gpu.yaml")[0]["available_node_types"]
    assert types["gpu_worker"]["resources"][cluster.WORKER_RESOURCE] >= 1 / cluster.WORKER_SHARE
    assert cluster.WORKER_RESOURCE not in types["head"]["resources"]
    local = _docs(ROOT / "clusters" / "local.yaml")[0]
    assert cluster.WORKER_RESOURCE in " ".join(local["worker_start_ray_commands"])
    assert cluster.WORKER_RESOURCE not in " ".join(local["head_start_ray_commands"])
    spec = _rayjob(_docs(ROOT / "clusters" / "kuberay.yaml"))["spec"]["rayClusterSpec"]
    assert all(cluster.WORKER_RESOURCE in g["rayStartParams"]["resources"] for g in spec["workerGroupSpecs"])
    assert cluster.WORKER_RESOURCE not in spec["headGroupSpec"]["rayStartParams"].get("resources", "")
    with_workers = {"CPU": 24.0, "GPU": 1.0, cluster.WORKER_RESOURCE: 1000.0}
    assert cluster.compute_resources(2, 1, with_workers) == {"CPU": 2, "GPU": 1, cluster.WORKER_RESOURCE: 0.001}
    assert cluster.compute_resources(2, 0, {"CPU": 3.0}) == {"CPU": 2, "GPU": 0}  # a laptop: plain requests


# ------------------------------------------------------------------------------------- KubeRay files

def _rayjob(docs: list[dict]) -> dict:
    return next(d for d in docs if d.get("kind") == "RayJob")


def _pods(rayjob: dict) -> list[dict]:
    rc = rayjob["spec"]["rayClusterSpec"]
    return [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]


def _arg(entrypoint: str, flag: str) -> str | None:
    m = re.search(rf"{re.escape(flag)}[ =](\S+)", entrypoint)
    return m.group(1) if m else None


def _pod_problems(pod: dict, claims: set[str], where: str) -> list[str]:
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


def _mlflow_problems(docs: list[dict], entrypoint: str) -> list[str]:
    import mlflow

    uri = _arg(entrypoint, "--tracking-uri")
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
    if rc.get("rayVersion") != _ray_version():
        problems.append(f"rayVersion {rc.get('rayVersion')} != installed ray {_ray_version()}")
    images = {c["image"] for pod in _pods(jobs[0]) for c in pod["containers"]}
    if len(images) != 1 or not next(iter(images)).endswith(f":{_ray_version()}-py311-gpu"):
        problems.append(f"Ray pods must share one image tagged {_ray_version()}-py311-gpu: {images}")
    if cluster.DRIVER_RESOURCE not in rc["headGroupSpec"].get("rayStartParams", {}).get("resources", ""):
        problems.append("the head does not advertise tune_driver")
    for g in rc["workerGroupSpecs"]:
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
            problems.append(f"worker group {g.get('groupName')}: replicas outside [minReplicas, maxReplicas]")
    if not any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
               for g in rc["workerGroupSpecs"]):
        problems.append("no worker group asks for nvidia.com/gpu")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for i, pod in enumerate(_pods(jobs[0])):
        problems += _pod_problems(pod, claims, f"Ray pod {i}")
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        storage = _arg(entry, "cluster.storage_path") or ""
        if not any(storage.startswith(mp.rstrip("/") + "/") for mp in mounts):
            problems.append(f"Ray pod {i} does not mount cluster.storage_path={storage}")
    head = rc["headGroupSpec"]["template"]["spec"]
    if f"/{cluster.SHARED_MARKER}" not in str(head.get("initContainers", [])):
        problems.append("the head does not mark the shared volume")
    return problems + _mlflow_problems(docs, entry)


def test_kuberay_checks_catch_mistakes():
    docs = _docs(ROOT / "clusters" / "kuberay.yaml")
    wrong_version = copy.deepcopy(docs)
    _rayjob(wrong_version)["spec"]["rayClusterSpec"]["rayVersion"] = "2.59.0"
    assert any("rayVersion" in p for p in kuberay_problems(wrong_version))
    mixed = copy.deepcopy(docs)
    _pods(_rayjob(mixed))[1]["containers"][0]["image"] = "rayproject/ray-ml:2.60.0-gpu"
    assert any("one image" in p for p in kuberay_problems(mixed))
    no_claim = [d for d in copy.deepcopy(docs) if d["kind"] != "PersistentVolumeClaim"]
    assert any("claim mprl-shared" in p for p in kuberay_problems(no_claim))


# ------------------------------------------------------------------------------------- mlflow_server.sh

def test_mlflow_server_script_binds_loopback_by_default():
    script = ROOT / "scripts" / "mlflow_server.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert 'MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"' in script.read_text()


# ------------------------------------------------------------------------------------- orchestrator.cluster

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
    port = _free_port()  # bound then released: nothing listens there now
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}"):
        cluster.check_address(f"127.0.0.1:{port}", timeout_s=10)
    with pytest.raises(ConnectionError, match=rf"ray://127\.0\.0\.1:{port}"):
        cluster.check_address(f"ray://127.0.0.1:{port}")
    assert time.perf_counter() - start < 5


def test_check_address_resolves_auto_from_ray_address(monkeypatch):
    port = _free_port()
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
    assert cluster.scales_on_demand({"CPU": 8.0, cluster.DRIVER_RESOURCE: 1.0})
    assert not cluster.scales_on_demand({"CPU": 8.0, "GPU": 1.0})


def test_driver_resources_pins_drivers_only_where_the_head_advertises_it():
    with_head = {"CPU": 24.0, "GPU": 4.0, cluster.DRIVER_RESOURCE: 1.0}
    assert cluster.driver_resources({"CPU": 1}, with_head) == {"CPU": 1, cluster.DRIVER_RESOURCE: 0.01}
    assert cluster.driver_resources({"CPU": 1}, {"CPU": 8.0}) == {"CPU": 1}
    assert cluster.driver_resources({"CPU": 9, "GPU": 1}, with_head) == {"CPU": 9, "GPU": 1}  # trains in place


def test_cli_names_an_unreachable_address_within_seconds(tmp_path):
    port = _free_port()
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
    cfg = load_config("rehearsal")
    assert cluster.worker_env(cfg) == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900", LOGICAL_GPUS_ENV: "1"}
    assert LOGICAL_GPUS_ENV not in cluster.worker_env(load_config("smoke"))  # real GPUs must be real
    # under `ray job submit --runtime-env-json`, ray.init refuses a key the job's runtime env sets already
    job = {"runtime_env": {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1800"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert cluster.worker_env(cfg) == {LOGICAL_GPUS_ENV: "1"}

