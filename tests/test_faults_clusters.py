"""The cluster files' fault defaults: spot workers preferred with an on-demand fallback, tracking on a database that
outlives the head, workers that do not outlive a lost head, a KubeRay job that waits for its dataset and survives a
head restart, a volume prepared without root, and a node image with the dependencies and weights baked in."""

import os
import re
import socket
import subprocess
import sys
import tomllib

from orchestrator import cluster
from tests.cluster_files import (
    ROOT,
    all_pod_specs,
    arg,
    node_image,
    pods,
    ray_cpu_image,
    rayjob,
    read_docs,
    secret_env,
)


def test_gpu_yaml_prefers_spot_workers_with_an_on_demand_fallback():
    types = read_docs(ROOT / "clusters" / "gpu.yaml")[0]["available_node_types"]
    spot, on_demand = types["gpu_worker_spot"], types["gpu_worker"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in on_demand["node_config"]
    assert spot["resources"] == on_demand["resources"]  # a trial fits either: the fallback runs the same work
    assert spot["node_config"]["InstanceType"] == on_demand["node_config"]["InstanceType"]
    # autoscaler v2 ranks equal fits by recent launch failures first, then by priority (higher first)
    assert spot.get("priority", 0) > on_demand.get("priority", 0)


def test_tracking_data_outlives_the_head():
    """AWS: the MLflow store is RDS PostgreSQL (not sqlite on EFS, which two heads could corrupt), the password read
    into a PGPASSFILE from SSM on the head. KubeRay: a PostgreSQL StatefulSet on its own volume and an MLflow
    Deployment, neither part of the RayJob's cluster."""
    gpu = read_docs(ROOT / "clusters" / "gpu.yaml")[0]
    start = " ".join(gpu["head_start_ray_commands"])
    assert "MLFLOW_BACKEND_STORE_URI='postgresql+psycopg://mlflow@REPLACE_ME_RDS_HOST:5432/mlflow" in start
    assert "sqlite" not in start and "/mnt/shared/mlflow-db" not in str(gpu)
    assert "get_parameter(Name='/mprl/mlflow-db-password', WithDecryption=True)" in start and "umask 077" in start
    pgpass = next(c for c in gpu["head_start_ray_commands"] if "umask 077" in c)
    compile(re.search(r'python -c "(.+)" >', pgpass).group(1), "gpu.yaml", "exec")
    docs = read_docs(ROOT / "clusters" / "kuberay.yaml")
    pg = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "mprl-postgres")
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert secret_env(pg["spec"]["template"]["spec"]["containers"][0], "POSTGRES_PASSWORD") == {
        "name": "mprl-postgres", "key": "password"}
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mprl-mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri=postgresql+psycopg://mlflow@mprl-postgres:5432/mlflow" in container["command"]
    assert secret_env(container, "PGPASSWORD") == {"name": "mprl-postgres", "key": "password"}
    assert int(next(a for a in container["command"] if a.startswith("--workers=")).split("=")[1]) >= 2


def test_the_head_writes_the_database_password_file_from_ssm(tmp_path):
    """gpu.yaml's password line, run with a stand-in boto3: a libpq password file, mode 0600, for the user mlflow."""
    line = next(c for c in read_docs(ROOT / "clusters" / "gpu.yaml")[0]["head_start_ray_commands"] if "umask" in c)
    (tmp_path / "boto3.py").write_text(
        "class _SSM:\n"
        "    def get_parameter(self, Name, WithDecryption):\n"
        "        assert Name == '/mprl/mlflow-db-password' and WithDecryption\n"
        "        return {'Parameter': {'Value': '0123abcd'}}\n"
        "def client(service, region_name):\n"
        "    assert service == 'ssm'\n"
        "    return _SSM()\n")
    target = tmp_path / "pgpass"
    line = line.replace("/home/ray/mlflow/pgpass", str(target)).replace("python -c", f"{sys.executable} -c")
    subprocess.run(["bash", "-c", line], env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True, timeout=60)
    assert target.read_text() == "*:*:*:mlflow:0123abcd\n"
    assert target.stat().st_mode & 0o777 == 0o600
    start = " ".join(read_docs(ROOT / "clusters" / "gpu.yaml")[0]["head_start_ray_commands"])
    assert "PGPASSFILE=/home/ray/mlflow/pgpass" in start and "@REPLACE_ME_RDS_HOST" in start


def _watchdog(head_ip: str | None, port: int, tmp_path, max_sleeps: int = 3) -> tuple[str, bool]:
    """Run gpu.yaml's watchdog line with stand-ins: `sudo systemd-run` runs the unit in the foreground with its
    --setenv variables, `shutdown`/`logger` record their call, and `sleep` returns at once (and ends the loop after
    max_sleeps or once shutdown was called). LIMIT is 0 and the head's port is ``port``, so one failed probe is
    enough. Returns (what systemd-run was asked to run, whether shutdown was called)."""
    line = next(c for c in read_docs(ROOT / "clusters" / "gpu.yaml")[0]["initialization_commands"]
                if "mprl-head-watchdog" in c)
    line = line.replace("--setenv=LIMIT=900", "--setenv=LIMIT=0").replace("/6379", f"/{port}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    stubs = {
        "sudo": f"""case "$1" in
  systemctl) exit 0 ;;
  systemd-run) shift; envs=()
    while [[ "$1" == --* ]]; do [[ "$1" == --setenv=* ]] && envs+=("${{1#--setenv=}}"); shift; done
    echo "${{envs[*]}} $*" > {tmp_path}/unit; exec env "${{envs[@]}}" "$@" ;;
esac""",
        "shutdown": f"touch {tmp_path}/shutdown",
        "logger": f'echo "$*" >> {tmp_path}/log',
        "sleep": f"""n=$(cat {tmp_path}/sleeps 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/sleeps
[ ! -f {tmp_path}/shutdown ] && [ "$n" -lt {max_sleeps} ]""",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    if head_ip:
        line = f"export RAY_HEAD_IP={head_ip}; {line}"
    subprocess.run(["bash", "-c", line], env=env, check=True, timeout=60)
    unit = tmp_path / "unit"
    return (unit.read_text() if unit.exists() else ""), (tmp_path / "shutdown").exists()


def test_a_worker_whose_head_is_gone_powers_itself_off(tmp_path):
    """After a head loss nothing else stops the GPU workers' billing: the watchdog that gpu.yaml installs on each
    worker host powers it off once the head's GCS port stops answering, and InstanceInitiatedShutdownBehavior
    turns that power-off into a termination."""
    with socket.socket() as s:  # a port with nothing behind it: the probe is refused at once
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    unit, shut = _watchdog("127.0.0.1", dead, tmp_path / "dead")
    assert shut and unit.startswith("HEAD=127.0.0.1 LIMIT=0 /bin/bash -c")
    assert "powering off" in (tmp_path / "dead" / "log").read_text()
    types = read_docs(ROOT / "clusters" / "gpu.yaml")[0]["available_node_types"]
    assert all(types[t]["node_config"]["InstanceInitiatedShutdownBehavior"] == "terminate"
               for t in ("gpu_worker_spot", "gpu_worker"))


def test_the_watchdog_leaves_a_worker_with_a_live_head_and_the_head_alone(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        unit, shut = _watchdog("127.0.0.1", server.getsockname()[1], tmp_path / "live")
    assert unit and not shut
    unit, shut = _watchdog(None, 1, tmp_path / "head")  # `ray up` runs the head's commands without RAY_HEAD_IP
    assert unit == "" and not shut


def test_kuberay_waits_for_the_dataset_and_retries_a_lost_sweep():
    """The RayJob is created suspended (no cluster until you unsuspend it after copying the dataset), the head
    waits for the dataset as well, GCS fault tolerance keeps the cluster through a head restart, and a failed sweep
    is retried on a new cluster with --resume, which continues it from its Tune state."""
    spec = rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml"))["spec"]
    assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
    assert 1 <= spec["backoffLimit"] <= 3 and " --resume " in f" {spec['entrypoint']} "
    assert "sweep.max_failures=3" in spec["entrypoint"]
    assert spec["rayClusterSpec"]["gcsFaultToleranceOptions"]["redisAddress"] == "mprl-redis:6379"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    wait = " ".join(head["initContainers"][0]["command"])
    assert wait.count("until ") == 1 and arg(spec["entrypoint"], "dataset.root") in wait


def test_kuberay_prepares_the_volume_without_root():
    """Nothing runs as root (a "restricted" namespace refuses such pods): the loader pod creates the folders and the
    marker as the image's user, fsGroup 100 makes volumes that honour it writable to that group, and every worker
    refuses to start without the marker."""
    docs = read_docs(ROOT / "clusters" / "kuberay.yaml")
    specs = all_pod_specs(docs)
    assert not re.search(r"runAsUser:\s*0\b", (ROOT / "clusters" / "kuberay.yaml").read_text())
    loader = specs["mprl-shared-loader"]
    assert loader["securityContext"]["runAsUser"] == 1000 and loader["securityContext"]["fsGroup"] == 100
    assert f"touch /mnt/shared/{cluster.SHARED_MARKER}" in " ".join(loader["containers"][0]["command"])
    spec = rayjob(docs)["spec"]
    for pod in pods(rayjob(docs)):
        assert pod["securityContext"]["fsGroup"] == 100
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        assert "lifecycle" not in pod["containers"][0]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert f"/mnt/shared/{cluster.SHARED_MARKER}" in " ".join(pod["initContainers"][0]["command"])


def test_dockerfile_bakes_one_cuda_stack_the_dependencies_and_the_weights():
    text = (ROOT / "clusters" / "Dockerfile").read_text()
    assert f"FROM {ray_cpu_image()}" in text and text.count("FROM ") == 1  # no system CUDA in the base
    spec = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-([^}]*)\}"', (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert spec and f"pip install --no-cache-dir {spec.group(1)}" in text
    assert "--index-url" not in text and "--extra-index-url" not in text  # PyPI's wheel: CUDA 13, driver >= 580
    assert 'pip install --no-cache-dir -e ".[postgres]"' in text
    # the postgres extra installs the driver that the clusters' MLflow URIs name (postgresql+<driver>://)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = {re.match(r"[\w-]+", d).group(0).removesuffix("-binary") for d in extras["postgres"]}
    for name in ("gpu.yaml", "local.yaml"):
        driver = re.search(r"postgresql\+(\w+)://", (ROOT / "clusters" / name).read_text()).group(1)
        assert driver in installs, (name, driver, extras["postgres"])
    # the weights the project loads for reid.pretrained=imagenet, fetched into TORCH_HOME's hub cache at build time
    from trainables.reid.weights import IMAGENET_WEIGHTS

    weights = IMAGENET_WEIGHTS["resnet50"]
    assert f"torchvision.models.{type(weights).__name__}.{weights.name}.get_state_dict(" in text
    assert re.search(r"^ENV TORCH_HOME=/\S+", text, re.M)
    assert "imagenet_cache_file" in text  # and checked where trainables/reid/weights.py looks
    joined = text.replace("\\\n", "")  # Docker's line continuations
    snippets = re.findall(r'python -c "([^"]+)"', joined)
    assert len(snippets) >= 3
    for code in snippets:
        compile(code, "Dockerfile", "exec")  # each build-time check is valid Python
    spec_pods = pods(rayjob(read_docs(ROOT / "clusters" / "kuberay.yaml")))
    images = {c["image"] for pod in spec_pods for c in [*pod["containers"], *pod.get("initContainers", [])]}
    assert images == {node_image()}


def test_documented_shell_blocks_parse():
    """Every ```bash block of docs/clusters.md and README.md (the one-time AWS steps, their line continuations and
    quoting included) is valid bash."""
    for doc in ("README.md", "docs/clusters.md"):
        blocks = re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S)
        assert blocks
        for block in blocks:
            res = subprocess.run(["bash", "-n", "-c", block], capture_output=True, text=True)
            assert res.returncode == 0, f"{doc}: {res.stderr}\n{block}"


def test_documented_teardowns_always_reach_ray_down():
    """A copy chained with && before `ray down` skips it when the copy fails, and the cluster keeps billing."""
    for doc in ("README.md", "docs/clusters.md"):
        shell = "\n".join(re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S)).replace("\\\n", " ")
        lines = [x for x in shell.splitlines() if re.search(r"\bray down\b", x) and not x.lstrip().startswith("#")]
        assert lines, f"{doc} shows no teardown"
        assert not [x for x in lines if re.search(r"&&\s*ray down", x)], doc
