"""Ray's fake multi-node autoscaler for the launch rehearsal (``bench.launch_rehearsal``): the cluster file made from
``clusters/gpu.yaml``, the provider, the head's start, the processes of one fake cluster (to kill one node, or all
at teardown), and what the autoscaler and the State API say (nodes, decisions, placements).

Two things differ from ``ray up`` on purpose. The provider is ``type: external`` naming
:class:`GpuYamlFakeProvider`, Ray's ``FakeMultiNodeProvider`` with the head tagged as the file's head type: Ray
2.60's wheel does not ship ``fake_multi_node/example.yaml``, so ``type: fake_multinode`` kills the autoscaler at
start (FileNotFoundError on that defaults file), and Ray's class tags the head ``ray.head.default``, which
autoscaler v2 looks up among the file's node types (KeyError). And teardown kills only the processes of this
cluster (its ``RAY_TMPDIR`` in their environment or on their command line), never ``ray stop --force``, which
stops every Ray process of the user on the machine, other clusters included.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

from orchestrator.resources import DRIVER_RESOURCE

PROVIDER = "bench.fake_cluster.GpuYamlFakeProvider"
HEAD_CPUS, WORKER_CPUS, MAX_WORKERS = 2, 2, 2
OBJECT_STORE_MB = 200
IDLE_TIMEOUT_MIN = 0.25
LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s"
ADDING = re.compile(LOG_TIME + r".*Adding (\d+) node\(s\) of type (\S+?)\.$", re.M)  # the autoscaler's decisions
REMOVING = re.compile(LOG_TIME + r".*Removing (\d+) nodes of type (\S+?) \((\w+)\)\.$", re.M)
ALLOCATED = re.compile(r"type=([\w.-]+), .*allocated unassigned cloud instance ([0-9a-f]{56})")
NODE_ID_ARG = re.compile(r"--node[-_]id=([0-9a-f]{56})")
WHERE_PID = re.compile(r" pid (\d+)$")


def log(msg: str, t0: float) -> None:
    print(f"[launch {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ the cluster file

class GpuYamlFakeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, with the head tagged as the cluster file's head type (``head`` in
    ``clusters/gpu.yaml``): Ray's tags it ``ray.head.default``, which autoscaler v2 then looks up among the
    file's node types (KeyError: 'ray.head.default'). Runs in the autoscaler's process."""

    def __init__(self, provider_config: dict, cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        head_type = provider_config.get("head_node_type")
        if head_type:
            self._nodes[self._head_node_id]["tags"][TAG_RAY_USER_NODE_TYPE] = head_type


def fake_cluster_config(source: dict, *, gcs_address: str, autoscaler: str = "v2") -> dict:
    """The fake-provider cluster file of ``source`` (``clusters/gpu.yaml`` parsed): its node types and custom
    resources, CPUs scaled down to this machine, at most ``MAX_WORKERS`` workers, a short idle timeout."""
    head = source["head_node_type"]
    provider: dict[str, Any] = {"type": "external", "module": PROVIDER, "head_node_type": head,
                                "use_node_id_as_ip": True, "disable_node_updaters": True,
                                "disable_launch_config_check": True, "gcs_address": gcs_address}
    if autoscaler == "v2":  # as ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True) configures it
        provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
    types = {}
    for name, spec in source["available_node_types"].items():
        res = dict(spec.get("resources") or {})
        if name == head:
            out = {"resources": {**res, "CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0}
        else:
            res.update(CPU=WORKER_CPUS, object_store_memory=OBJECT_STORE_MB * 2**20)
            out = {"resources": res, "node_config": {}, "min_workers": int(spec.get("min_workers", 0)),
                   "max_workers": min(int(spec.get("max_workers", MAX_WORKERS)), MAX_WORKERS)}
        for key in ("priority", "labels"):  # autoscaler-v2 fields, when the source sets them
            if key in spec:
                out[key] = spec[key]
        types[name] = out
    return {"cluster_name": f"{source['cluster_name']}-fake", "max_workers": min(source["max_workers"], MAX_WORKERS),
            "upscaling_speed": source.get("upscaling_speed", 1.0), "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
            "provider": provider, "auth": {"ssh_user": "ray"}, "available_node_types": types, "head_node_type": head,
            "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


def worker_types(config: dict) -> dict[str, dict]:
    return {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}


# ------------------------------------------------------------------------------------------ processes

def _ray_psutil():
    import ray  # noqa: F401, I001  (first: it puts Ray's bundled psutil on sys.path)
    import psutil

    return psutil


def cluster_processes(ray_tmp: str) -> list:
    """Every process of this cluster: its ``RAY_TMPDIR`` in the environment or its temp folder on the command line
    (the head's daemons, the fake worker nodes the autoscaler started, their workers); never this process."""
    psutil = _ray_psutil()
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid in mine:
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if ray_tmp in cmd or p.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def node_processes(ray_tmp: str, node_id: str) -> list:
    """The processes of one node: those naming its node id (raylet, agents) and all their descendants."""
    psutil = _ray_psutil()
    roots = []
    for p in cluster_processes(ray_tmp):
        try:
            if any(m.group(1) == node_id for m in NODE_ID_ARG.finditer(" ".join(p.cmdline()))):
                roots.append(p)
        except psutil.Error:
            continue
    out = {p.pid: p for p in roots}
    for p in roots:
        try:
            out.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    return list(out.values())


def node_of_pid(pid: int) -> str | None:
    """The Ray node id of a worker process: the ``--node_id`` of its raylet ancestor."""
    psutil = _ray_psutil()
    try:
        for p in [psutil.Process(pid), *psutil.Process(pid).parents()]:
            m = NODE_ID_ARG.search(" ".join(p.cmdline()))
            if m and p.name().startswith("raylet"):
                return m.group(1)
    except psutil.Error:
        return None
    return None


def kill(processes: list, sig: int = signal.SIGKILL) -> None:
    psutil = _ray_psutil()
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def teardown(ray_tmp: str, t0: float) -> list[str]:
    """SIGTERM every process of the cluster, then SIGKILL what is left after 15 s; what survived (should be [])."""
    psutil = _ray_psutil()
    procs = cluster_processes(ray_tmp)
    log(f"teardown: stopping {len(procs)} processes of this cluster", t0)
    kill(procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    kill(alive)
    psutil.wait_procs(alive, timeout=10)
    for _ in range(3):  # a process may have been starting while we looked
        rest = cluster_processes(ray_tmp)
        if not rest:
            break
        kill(rest)
        psutil.wait_procs(rest, timeout=5)
    out = []
    for p in cluster_processes(ray_tmp):
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            continue
    return out


# ------------------------------------------------------------------------------------------ watching

@dataclass
class NodeSeen:
    node_id: str
    node_type: str
    first_seen_s: float
    dead_at_s: float | None = None


@dataclass
class Kill:
    trial: str
    node_id: str
    pid: int
    checkpoint_epoch: int
    at_s: float
    processes: int


@dataclass
class Watch:
    """What the watcher thread saw: nodes (first seen alive, dead), the kill, pid -> node of trial processes."""

    nodes: dict[str, NodeSeen] = field(default_factory=dict)
    kill: Kill | None = None
    pid_nodes: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Watcher(threading.Thread):
    """Polls the cluster's nodes (State API) and the storage folder; kills the node of the first trial that has
    written a checkpoint (a spot reclaim), once."""

    def __init__(self, dashboard: str, ray_tmp: str, storage: Path, tracking_uri: str, experiment: str,
                 epochs: int, t0: float, monitor_log: Path) -> None:
        super().__init__(daemon=True, name="launch-rehearsal-watcher")
        self.dashboard, self.ray_tmp, self.storage, self.t0 = dashboard, ray_tmp, storage, t0
        self.monitor_log = monitor_log
        self.uri, self.experiment, self.epochs = tracking_uri, experiment, epochs
        self.watch = Watch()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll_nodes()
                if self.watch.kill is None:
                    self.maybe_kill()
            except Exception as err:  # noqa: BLE001 - reported, the watch goes on
                if len(self.watch.errors) < 20:
                    self.watch.errors.append(f"{type(err).__name__}: {err}")
            self.stop.wait(0.5)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def poll_nodes(self) -> None:
        for n in list_nodes(self.dashboard):
            seen = self.watch.nodes.get(n["node_id"])
            if seen is None and n["state"] == "ALIVE":
                kind = node_types(self.monitor_log).get(n["node_id"], n["type"])
                self.watch.nodes[n["node_id"]] = seen = NodeSeen(n["node_id"], kind, round(self.now(), 1))
                if n["node_id"] != FAKE_HEAD_NODE_ID:
                    log(f"worker node {n['node_id'][-5:]}{f' ({kind})' if kind != '?' else ''} is up", self.t0)
            if seen is not None and n["state"] == "DEAD" and seen.dead_at_s is None:
                seen.dead_at_s = round(self.now(), 1)
                log(f"node {n['node_id'][-5:]} is DEAD in the GCS", self.t0)

    def trial_pids(self) -> dict[str, int]:
        """``{trial key: pid}`` of the trials running now (their ``mprl.where`` tag)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return {}
        out = {}
        for r in client.search_runs([exp.experiment_id], "tags.`mprl.kind` = 'trial' and attributes.status = "
                                                          "'RUNNING'"):
            m = WHERE_PID.search(r.data.tags.get("mprl.where", ""))
            if m:
                out[r.data.params.get("trial") or r.data.tags.get("mprl.key", "").split("/")[-1]] = int(m.group(1))
        return out

    def maybe_kill(self) -> None:
        done = {}
        for ckpt in self.storage.glob("trials/*/*/checkpoint_*/metrics.json"):
            if (ckpt.parent / "state.pt").is_file():
                epoch = int(json.loads(ckpt.read_text()).get("epoch", -1))
                done[ckpt.parent.parent.name] = max(epoch, done.get(ckpt.parent.parent.name, -1))
        ready = {k: e for k, e in done.items() if 0 <= e < self.epochs - 2}  # mid-trial: epochs still to go
        if not ready:
            return
        pids = self.trial_pids()
        for trial, epoch in sorted(ready.items()):
            pid = pids.get(trial)
            node = node_of_pid(pid) if pid else None
            if node is None or node == FAKE_HEAD_NODE_ID:
                continue
            self.watch.pid_nodes[pid] = node
            procs = node_processes(self.ray_tmp, node)
            kill(procs)
            self.watch.kill = Kill(trial, node, pid, epoch, round(self.now(), 1), len(procs))
            log(f"SPOT RECLAIM: killed node {node[-5:]} ({len(procs)} processes) running trial {trial} (pid "
                f"{pid}) after its checkpoint of epoch {epoch + 1}/{self.epochs} (index {epoch})", self.t0)
            return


def list_nodes(dashboard: str) -> list[dict]:
    """``[{node_id, state, type}]`` from the State API (dashboard address); type: "head" or "?"."""
    from ray.util.state import list_nodes as state_nodes

    out = []
    for n in state_nodes(address=dashboard, limit=1000, raise_on_missing_output=False, timeout=10):
        d = n if isinstance(n, dict) else asdict(n)
        out.append({"node_id": d["node_id"], "state": d["state"], "type": "head" if d.get("is_head_node") else "?"})
    return out


def node_types(monitor_log: Path) -> dict[str, str]:
    """``{node id: node type}`` of the nodes the autoscaler launched (the fake provider's node id is its cloud
    instance id)."""
    text = monitor_log.read_text(errors="replace") if monitor_log.is_file() else ""
    return {m.group(2): m.group(1) for m in ALLOCATED.finditer(text)}


def autoscaler_events(monitor_log: Path, t0_wall: float) -> list[dict]:
    """The autoscaler's scaling decisions: ``[{at_s, action, count, type, why}]`` (seconds since the start)."""
    from datetime import datetime

    text = monitor_log.read_text(errors="replace") if monitor_log.is_file() else ""
    at = lambda stamp: round(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0_wall, 1)  # noqa: E731
    out = [{"at_s": at(m.group(1)), "action": "add", "count": int(m.group(2)), "type": m.group(3), "why": "demand"}
           for m in ADDING.finditer(text)]
    out += [{"at_s": at(m.group(1)), "action": "remove", "count": int(m.group(2)), "type": m.group(3),
             "why": m.group(4)} for m in REMOVING.finditer(text)]
    return sorted(out, key=lambda e: e["at_s"])


def placements(dashboard: str) -> dict[int, str]:
    """``{pid: node id}`` of every actor and task of the cluster the State API still knows."""
    from ray.util.state import list_actors, list_tasks

    out: dict[int, str] = {}
    for a in list_actors(address=dashboard, limit=10000, raise_on_missing_output=False, detail=True, timeout=30):
        d = a if isinstance(a, dict) else asdict(a)
        if d.get("pid") and d.get("node_id"):
            out[int(d["pid"])] = d["node_id"]
    for t in list_tasks(address=dashboard, limit=10000, raise_on_missing_output=False, detail=True, timeout=30):
        d = t if isinstance(t, dict) else asdict(t)
        if d.get("worker_pid") and d.get("node_id"):
            out.setdefault(int(d["worker_pid"]), d["node_id"])
    return out


def start_head(config_file: Path, env: dict, ports: dict[str, int], logs: Path, t0: float) -> None:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "start", "--head", f"--port={ports['gcs']}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
           f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
           f"--num-cpus={HEAD_CPUS}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_MB * 2**20}",
           f"--resources={json.dumps({DRIVER_RESOURCE: 1})}", f"--autoscaling-config={config_file}",
           "--disable-usage-stats"]
    log("RAY_FAKE_CLUSTER=1 " + " ".join(cmd[1:]), t0)
    with (logs / "ray_start.log").open("w") as out:
        subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=180)


def wait_autoscaler(ray_tmp: str, timeout_s: float = 60) -> Path:
    """The head's log folder once the autoscaler's monitor is up; RuntimeError with its error output when it
    died (as it does on a missing provider defaults file)."""
    logs = Path(ray_tmp) / "ray" / "session_latest" / "logs"
    deadline, up_since = time.time() + timeout_s, None
    while time.time() < deadline:
        err = logs / "monitor.err"
        if err.is_file() and "Traceback" in err.read_text(errors="replace"):
            raise RuntimeError("the autoscaler (monitor.py) failed:\n" + err.read_text(errors="replace")[-3000:])
        alive = any("monitor.py" in " ".join(p.cmdline()) for p in cluster_processes(ray_tmp))
        up_since = (up_since or time.time()) if alive else None
        if up_since is not None and time.time() - up_since >= 3:  # and still alive 3 s later
            return logs
        time.sleep(1)
    raise RuntimeError(f"no autoscaler monitor running after {timeout_s:.0f} s (see {logs})")
