"""The files in clusters/ (Ray's cluster launcher and KubeRay): valid against the installed Ray's own schema, no
credentials, the pinned image and torch, MLflow on a private address, resources that fit a paper trial, and the
structural checks of a KubeRay file (which can fail)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest

from orchestrator import cluster, resources
from orchestrator.config import load_config
from tests.cluster_files import (
    CLUSTER_FILES,
    COMMAND_KEYS,
    ROOT,
    is_kuberay,
    kuberay_problems,
    launcher_files,
    pods,
    ray_version,
    rayjob,
    read_docs,
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
    else:
        assert len(docs) == 1, "a launcher file holds one YAML document"
        validate_launcher(docs[0])


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_holds_no_credentials(path):
    text = path.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)password\s*:", r"(?i)\btoken\s*:",
                    r"-----BEGIN"):
        assert not re.search(pattern, text), f"{path.name} matches {pattern}"


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


# ------------------------------------------------------------------------------------- launcher files

@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_file_uses_the_pinned_ray_image(path):
    """The plain pinned Ray image, or the node image that clusters/Dockerfile builds from it (then nothing heavy
    is installed at boot)."""
    doc = read_docs(path)[0]
    docker = doc["docker"]
    images = {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    pinned = f"rayproject/ray:{ray_version()}-py311-gpu"
    baked = f"REPLACE_ME_REGISTRY/mprl-orchestrator:{ray_version()}-py311-gpu"
    assert images in ({pinned}, {baked})
    if images == {baked}:
        dockerfile = (Path(__file__).parents[1] / "clusters" / "Dockerfile").read_text()
        assert f"FROM {pinned}" in dockerfile and "torch==" in dockerfile
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
    if "mprl-orchestrator" in doc["docker"]["image"]:  # the node image of clusters/Dockerfile: the pin is baked in
        assert spec.group(1) in (ROOT / "clusters" / "Dockerfile").read_text()
        assert "pip install -q --no-deps -e /home/ray/mprl" in setup
        return
    assert spec.group(1) in setup
    assert "pip install -q -e /home/ray/mprl" in setup


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_head_runs_mlflow_on_a_private_address_and_marks_storage(path):
    raw = read_docs(path)[0]
    start = " ".join(raw["head_start_ray_commands"])
    assert "mlflow_server.sh start" in start and "MLFLOW_HOST=$(" in start
    assert "0.0.0.0" not in start and "--dashboard-host=127.0.0.1" in start
    assert "tune_driver" in start or "tune_driver" in str(raw.get("available_node_types", {}))
    assert f"touch /mnt/shared/{cluster.SHARED_MARKER}" in " ".join(raw["head_setup_commands"])
    assert f"/mnt/shared/{cluster.SHARED_MARKER}" in " ".join(raw["worker_setup_commands"])


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


# ------------------------------------------------------------------------------------- mlflow_server.sh

def test_mlflow_server_script_binds_loopback_by_default():
    script = ROOT / "scripts" / "mlflow_server.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert 'MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"' in script.read_text()


