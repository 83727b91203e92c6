"""The files in clusters/ (Ray's cluster launcher and KubeRay): valid against the installed Ray's own schema and, for
the RayJob, strictly against KubeRay's CRD; no credentials; one CUDA stack in the image; MLflow on PostgreSQL on a
private address; instance profiles, pinned subnets and security groups on AWS; resources that fit a paper trial
and the documented nodes; pods that pass the "restricted" Pod Security Standard; and the checks fail where they
should."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cluster, resources
from orchestrator.config import load_config
from tests.cluster_files import (
    CLUSTER_FILES,
    COMMAND_KEYS,
    CPU_NODE_BUDGET,
    GPU_NODE_BUDGET,
    ROOT,
    all_pod_specs,
    crd_problems,
    is_kuberay,
    kuberay_problems,
    launcher_files,
    node_image,
    placeholder_fill,
    pods,
    quantity,
    ray_cpu_image,
    rayjob,
    read_docs,
    requests,
    validate_launcher,
)


def test_cluster_files_exist():
    names = {p.name for p in CLUSTER_FILES}
    assert {"gpu.yaml", "local.yaml", "kuberay.yaml"} <= names


# ------------------------------------------------------------------------------------- every file

@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_is_valid(path):
    docs = read_docs(path)
    if is_kuberay(docs):
        assert kuberay_problems(docs) == []
        assert crd_problems(rayjob(docs)) == []
    else:
        assert len(docs) == 1, "a launcher file holds one YAML document"
        validate_launcher(docs[0])


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_holds_no_credentials(path):
    text = path.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)password\s*:", r"(?i)\btoken\s*:",
                    r"-----BEGIN", r"postgres\w*://[^@\s]*:[^@\s]*@"):  # the last: a password in a database URI
        assert not re.search(pattern, text), f"{path.name} matches {pattern}"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_no_image_brings_a_second_cuda_stack(path):
    """Ray's -gpu/-cuXX images carry a CUDA toolkit beside the one torch's wheel brings: never used."""
    images = re.findall(r"image:\s*(\S+)", path.read_text())
    assert images
    assert not [i for i in images if re.match(r"rayproject/ray(-ml)?:.*-(gpu|cu\d+)$", i)]


def test_typo_key_fails_launcher_validation():
    from jsonschema import ValidationError

    raw = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    raw["setup_comands"] = raw.pop("setup_commands")
    with pytest.raises(ValidationError, match="setup_comands"):
        validate_launcher(raw)
    fractional = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(ValidationError):
        validate_launcher(fractional)
    bad_priority = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    bad_priority["available_node_types"]["gpu_worker_spot"]["priority"] = "high"
    with pytest.raises(ValidationError):
        validate_launcher(bad_priority)


# ------------------------------------------------------------------------------------- KubeRay against its CRD

def test_crd_validation_rejects_unknown_and_mistyped_fields():
    """The vendored CRD schema with unknown fields rejected bites: a typo'd field anywhere in the RayJob (top level,
    deep in a pod template, in the GCS options) and a wrong type each give an error naming the field."""
    job = rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml"))
    cases = {
        "suspnd": lambda j: j["spec"].update(suspnd=j["spec"].pop("suspend")),
        "resurces": lambda j: pods(j)[0]["containers"][0].update(resurces={}),
        "redisAdress": lambda j: j["spec"]["rayClusterSpec"]["gcsFaultToleranceOptions"].update(redisAdress="x:1"),
        "backoffLimit": lambda j: j["spec"].update(backoffLimit="2"),
        "object-store-memory": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"object-store-memory": 2000000000}),  # rayStartParams values are strings
    }
    for field, mutate in cases.items():
        bad = copy.deepcopy(job)
        mutate(bad)
        problems = crd_problems(bad)
        assert problems and any(field in p for p in problems), (field, problems)
    assert crd_problems(job) == []


def test_crd_validation_still_accepts_maps_and_metadata():
    """Declared maps (labels, rayStartParams) take any key, and the object's metadata is left to the API server."""
    job = copy.deepcopy(rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml")))
    job["metadata"]["annotations"] = {"example.org/note": "x"}
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]["team"] = "reid"
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = "0"
    assert crd_problems(job) == []


def test_kuberay_checks_catch_mistakes():
    docs = read_docs(ROOT / "clusters" / "kuberay.yaml")
    wrong_version = copy.deepcopy(docs)
    rayjob(wrong_version)["spec"]["rayClusterSpec"]["rayVersion"] = "2.59.0"
    assert any("rayVersion" in p for p in kuberay_problems(wrong_version))
    mixed = copy.deepcopy(docs)
    pods(rayjob(mixed))[1]["containers"][0]["image"] = "rayproject/ray-ml:2.60.0-gpu"
    assert any("one image" in p for p in kuberay_problems(mixed))
    no_claim = [d for d in copy.deepcopy(docs) if d["kind"] != "PersistentVolumeClaim"]
    assert any("claim mprl-shared" in p for p in kuberay_problems(no_claim))
    root = copy.deepcopy(docs)
    pods(rayjob(root))[0]["initContainers"][0]["securityContext"] = {"runAsUser": 0}
    assert any("ray-head/wait-for-dataset" in p for p in kuberay_problems(root))
    kept = copy.deepcopy(docs)
    rayjob(kept)["spec"]["shutdownAfterJobFinishes"] = False
    assert any("suspended" in p for p in kuberay_problems(kept))
    sqlite = copy.deepcopy(docs)
    mlflow = next(d for d in sqlite if d["kind"] == "Deployment" and d["metadata"]["name"] == "mprl-mlflow")
    command = mlflow["spec"]["template"]["spec"]["containers"][0]["command"]
    command[:] = ["--backend-store-uri=sqlite:////mlflow/mlflow.db" if a.startswith("--backend-store-uri") else a
                  for a in command]
    assert any("backend store" in p for p in kuberay_problems(sqlite))
    no_redis = [d for d in copy.deepcopy(docs) if d["metadata"]["name"] != "mprl-redis" or d["kind"] != "Service"]
    assert any("redisAddress" in p for p in kuberay_problems(no_redis))


def test_kuberay_pods_fit_the_documented_nodes():
    """What kuberay.yaml's header promises: the CPU-side pods together (the head with its autoscaler sidecar, the
    submitter, MLflow, PostgreSQL, Redis, the loader) fit one 8-vCPU / 32-GiB node, a GPU worker one 16-vCPU /
    64-GiB GPU node, and a paper trial fits a GPU worker."""
    docs = read_docs(ROOT / "clusters" / "kuberay.yaml")
    spec = rayjob(docs)["spec"]
    specs = all_pod_specs(docs)
    autoscaler = {"resources": spec["rayClusterSpec"]["autoscalerOptions"]["resources"]}
    cpu_side = [c for name, p in specs.items() if not name.startswith("ray-gpu") for c in p["containers"]]
    need = requests([*cpu_side, autoscaler])
    assert need["cpu"] <= CPU_NODE_BUDGET["cpu"] and need["memory"] <= CPU_NODE_BUDGET["memory"], need
    head = requests([*specs["ray-head"]["containers"], autoscaler])
    assert head["cpu"] >= 2 and head["memory"] >= 8 * 2**30  # the driver and Tune still get room
    worker = requests(specs["ray-gpu"]["containers"])
    assert worker["cpu"] <= GPU_NODE_BUDGET["cpu"] and worker["memory"] <= GPU_NODE_BUDGET["memory"], worker
    trial = resources.trial_resources(load_config("paper", overrides=["dataset.root=/mnt/shared/data/Market-1501"]))
    limits = specs["ray-gpu"]["containers"][0]["resources"]["limits"]
    assert quantity(limits["cpu"]) >= trial["CPU"] and quantity(limits["nvidia.com/gpu"]) >= trial["GPU"]
    assert quantity("500m") == 0.5 and quantity("16Gi") == 16 * 2**30


# ------------------------------------------------------------------------------------- launcher files

@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_file_uses_one_cuda_stack(path):
    """Ray's CPU image of the pinned Ray plus torch's wheel at setup, or the node image that clusters/Dockerfile
    builds from that CPU image (then nothing heavy is installed at boot); either way the workers' containers ask
    the NVIDIA runtime for the GPUs, which a CUDA image would have done through its environment."""
    doc = read_docs(path)[0]
    docker = doc["docker"]
    images = {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    assert images in ({ray_cpu_image()}, {node_image()})
    assert "-e NVIDIA_VISIBLE_DEVICES=all" in docker.get("worker_run_options", [])
    assert "NVIDIA_VISIBLE_DEVICES" not in " ".join(docker.get("head_run_options", []))
    if images == {node_image()}:
        dockerfile = (ROOT / "clusters" / "Dockerfile").read_text()
        assert f"FROM {ray_cpu_image()}" in dockerfile and "torch==" in dockerfile
        assert not any("torch" in c and "pip install" in c for c in doc.get("setup_commands", []))


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_commands_are_valid_bash(path):
    raw = read_docs(path)[0]
    commands = [c for key in COMMAND_KEYS for c in raw.get(key, [])]
    assert commands
    for cmd in commands:
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd!r}: {res.stderr}"


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_file_installs_the_bootstrap_torch_pin(path):
    spec = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-([^}]*)\}"', (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert spec, "scripts/bootstrap.sh no longer defines TORCH_SPEC"
    doc = read_docs(path)[0]
    setup = " ".join(doc["setup_commands"])
    if doc["docker"]["image"] == node_image():  # the node image of clusters/Dockerfile: the pin is baked in
        assert spec.group(1) in (ROOT / "clusters" / "Dockerfile").read_text()
        assert "pip install -q --no-deps -e /home/ray/mprl" in setup
        return
    assert spec.group(1) in setup
    assert 'pip install -q -e "/home/ray/mprl[postgres]"' in setup  # psycopg for the head's MLflow server


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_head_runs_mlflow_on_postgres_on_a_private_address_and_marks_storage(path):
    raw = read_docs(path)[0]
    start = " ".join(raw["head_start_ray_commands"])
    assert "mlflow_server.sh start" in start and "MLFLOW_HOST=$(" in start
    assert "0.0.0.0" not in start and "--dashboard-host=127.0.0.1" in start
    store = re.search(r"MLFLOW_BACKEND_STORE_URI='?(\S+?)'?(\s|$)", start)
    assert store and re.fullmatch(r"postgresql\+psycopg://mlflow@[\w.-]+:5432/mlflow(\?sslmode=require)?",
                                  store.group(1)), "MLflow's store: PostgreSQL, the user only (no password)"
    assert "PGPASSFILE=/home/ray/mlflow/pgpass" in start  # the password: a file on the head's disk
    assert int(re.search(r"MLFLOW_WORKERS=(\d+)", start).group(1)) > 1  # PostgreSQL takes several writers
    assert "tune_driver" in start or "tune_driver" in str(raw.get("available_node_types", {}))
    assert f"touch /mnt/shared/{cluster.SHARED_MARKER}" in " ".join(raw["head_setup_commands"])
    assert f"/mnt/shared/{cluster.SHARED_MARKER}" in " ".join(raw["worker_setup_commands"])


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_a_worker_without_a_cuda_device_refuses_to_join(path):
    """The worker setup's CUDA check, run here (no GPU on this machine): it exits non-zero and says why, which
    fails the node's setup, so the autoscaler replaces it instead of letting stages fail on it later."""
    line = next(c for c in read_docs(path)[0]["worker_setup_commands"] if "cuda.is_available" in c)
    code = re.fullmatch(r'python -c "(.+)"', " ".join(line.split())).group(1)
    import torch

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if torch.cuda.is_available():
        assert res.returncode == 0
    else:
        assert res.returncode == 1 and "driver >= 580" in res.stderr


def test_gpu_yaml_gives_every_node_a_profile_a_pinned_subnet_and_security_group():
    """Ray attaches an instance profile to the head only and picks a VPC by itself: every node_config names its
    profile (workers: their own, ECR read only), one subnet per listed zone and the pre-created security group, so
    Ray creates no group and the nodes land in the VPC of EFS and RDS."""
    raw = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    zones = raw["provider"]["availability_zone"].split(",")
    profiles = {}
    for name, t in raw["available_node_types"].items():
        nc = t["node_config"]
        profiles[name] = re.fullmatch(r"arn:aws:iam::REPLACE_ME_ACCOUNT:instance-profile/([\w-]+)",
                                      nc["IamInstanceProfile"]["Arn"]).group(1)
        assert len(nc["SubnetIds"]) == len(zones) and nc["SecurityGroupIds"] == ["sg-REPLACE_ME"], name
    assert profiles == {"head": "mprl-ray-head", "gpu_worker_spot": "mprl-ray-worker", "gpu_worker": "mprl-ray-worker"}
    assert "security_group" not in raw["provider"]  # ignored once every node type lists SecurityGroupIds
    cfg = validate_launcher(raw)  # prepare_config keeps them
    assert all("IamInstanceProfile" in t["node_config"] for t in cfg["available_node_types"].values())


def test_gpu_yaml_pulls_from_ecr_without_an_expiring_login():
    """The ECR credential helper (tokens fetched per pull from the instance profile) instead of a `docker login`
    whose token expires after 12 hours."""
    raw = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    init = " ".join(raw["initialization_commands"])
    assert "amazon-ecr-credential-helper" in init and '"ecr-login"' in init and "~/.docker/config.json" in init
    assert "docker login" not in init and "get-login-password" not in init


def test_workers_copy_the_decoded_cache_to_their_own_disk():
    """The variable datasets/local_copy.py reads points, on every GPU worker, at a folder on the node's own disk: a
    host folder the AWS workers' containers mount, an emptyDir on Kubernetes."""
    from datasets.local_copy import LOCAL_CACHE_ENV

    raw = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    options = raw["docker"]["worker_run_options"]
    folder = next(o.split("=", 1)[1] for o in options if o.startswith(f"-e {LOCAL_CACHE_ENV}="))
    mounts = dict(o.removeprefix("-v ").split(":")[::-1] for o in options if o.startswith("-v "))
    inside = next(m for m in mounts if folder.startswith(m.rstrip("/") + "/"))
    assert not mounts[inside].startswith("/mnt/shared") and mounts[inside] in " ".join(raw["initialization_commands"])
    for group in rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml"))["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        folder = next(e["value"] for e in container["env"] if e["name"] == LOCAL_CACHE_ENV)
        mount = next(m for m in container["volumeMounts"] if folder.startswith(m["mountPath"].rstrip("/") + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory"


def test_docs_sed_line_fills_every_placeholder_of_gpu_yaml():
    """docs/clusters.md's sed line, applied to clusters/gpu.yaml, leaves no REPLACE_ME anywhere."""
    fills = placeholder_fill((ROOT / "docs" / "clusters.md").read_text(), "~/.mprl/gpu.yaml")
    assert fills
    text = (ROOT / "clusters" / "gpu.yaml").read_text()
    for pattern, _ in fills:
        assert pattern in text, f"the docs fill {pattern}, which gpu.yaml does not have"
        text = text.replace(pattern, "FILLED")
    assert re.findall(r"\S*REPLACE_ME\S*", text) == []


def test_gpu_workers_fit_a_paper_trial():
    need = resources.trial_resources(load_config("paper", overrides=["dataset.root=/mnt/shared/data/Market-1501"]))
    assert need.get("GPU", 0) >= 1
    types = read_docs(ROOT / "clusters" / "gpu.yaml")[0]["available_node_types"]
    fits = [name for name, t in types.items()
            if all(t["resources"].get(k, 0) >= v for k, v in need.items())]
    assert fits, f"no node type of gpu.yaml can run a paper trial needing {need}"
    assert types["head"]["resources"].get(resources.DRIVER_RESOURCE, 0) > 0
    for group in rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml"))["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits["cpu"]) >= need["CPU"] and int(limits["nvidia.com/gpu"]) >= need["GPU"]


def test_only_worker_nodes_advertise_the_compute_resource():
    """Stages and trials ask for a sliver of mprl_worker (where the cluster has it): the head never computes."""
    types = read_docs(ROOT / "clusters" / "gpu.yaml")[0]["available_node_types"]
    assert types["gpu_worker"]["resources"][resources.WORKER_RESOURCE] >= 1 / resources.WORKER_SHARE
    assert resources.WORKER_RESOURCE not in types["head"]["resources"]
    local = read_docs(ROOT / "clusters" / "local.yaml")[0]
    assert resources.WORKER_RESOURCE in " ".join(local["worker_start_ray_commands"])
    assert resources.WORKER_RESOURCE not in " ".join(local["head_start_ray_commands"])
    spec = rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml"))["spec"]["rayClusterSpec"]
    assert all(resources.WORKER_RESOURCE in g["rayStartParams"]["resources"] for g in spec["workerGroupSpecs"])
    assert resources.WORKER_RESOURCE not in spec["headGroupSpec"]["rayStartParams"].get("resources", "")
    with_workers = {"CPU": 24.0, "GPU": 1.0, resources.WORKER_RESOURCE: 1000.0}
    assert resources.compute_resources(2, 1, with_workers) == {"CPU": 2, "GPU": 1, resources.WORKER_RESOURCE: 0.001}
    assert resources.compute_resources(2, 0, {"CPU": 3.0}) == {"CPU": 2, "GPU": 0}  # a laptop: plain requests


# ------------------------------------------------------------------------------------- mlflow_server.sh

def test_mlflow_server_script_binds_loopback_by_default():
    script = ROOT / "scripts" / "mlflow_server.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert 'MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"' in script.read_text()


def test_the_image_build_context_leaves_the_heavy_folders_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", ".git"} <= ignored
    assert Path(ROOT / "clusters" / "Dockerfile").is_file()
