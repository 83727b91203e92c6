"""The cluster files' fault defaults: spot workers with an on-demand fallback, tracking that outlives the head,
a KubeRay volume prepared before Ray starts, and a node image with the dependencies baked in."""

import re

from orchestrator import cluster
from tests.cluster_files import ROOT, pods, ray_version, rayjob, read_docs


def test_gpu_yaml_has_spot_workers_with_an_on_demand_fallback():
    types = read_docs(ROOT / "clusters" / "gpu.yaml")[0]["available_node_types"]
    spot, on_demand = types["gpu_worker_spot"], types["gpu_worker"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in on_demand["node_config"]
    assert spot["resources"] == on_demand["resources"]  # a trial fits either: the fallback runs the same work
    assert spot["node_config"]["InstanceType"] == on_demand["node_config"]["InstanceType"]


def test_tracking_data_outlives_the_head():
    gpu = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    start = " ".join(gpu["head_start_ray_commands"])
    assert "MLFLOW_BACKEND_STORE_URI=sqlite:////mnt/shared/" in start and "MLFLOW_WORKERS=1" in start
    docs = read_docs(ROOT / "clusters" / "kuberay.yaml")
    deploy = next(d for d in docs if d["kind"] == "Deployment")  # MLflow: not part of the RayJob's cluster
    volumes = deploy["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "mprl-mlflow-db" for v in volumes)


def test_kuberay_prepares_the_volume_before_ray_starts_and_retries_trials():
    spec = rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml"))["spec"]
    assert "sweep.max_failures=3" in spec["entrypoint"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["securityContext"]["fsGroup"] == 100 and "lifecycle" not in head["containers"][0]
    init = head["initContainers"][0]
    assert init["securityContext"]["runAsUser"] == 0 and "chown 1000:100" in " ".join(init["command"])
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["fsGroup"] == 100
        assert f"/mnt/shared/{cluster.SHARED_MARKER}" in " ".join(pod["initContainers"][0]["command"])


def test_dockerfile_bakes_the_dependencies_into_the_pinned_ray_image():
    text = (ROOT / "clusters" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_version()}-py311-gpu" in text
    spec = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-([^}]*)\}"', (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert spec and f"pip install --no-cache-dir {spec.group(1)}" in text
    assert "pip install --no-cache-dir -e ." in text
    spec_pods = pods(rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml")))
    images = {c["image"] for pod in spec_pods for c in [*pod["containers"], *pod.get("initContainers", [])]}
    assert images == {"REPLACE_ME_REGISTRY/mprl-orchestrator:2.60.0-py311-gpu"}
