"""The launch rehearsal: ``clusters/gpu.yaml``'s first launch with Ray's own autoscaler, on this machine.

Ray's fake multi-node provider (``ray/autoscaler/_private/fake_multi_node``; Ray's docs "Testing Autoscaling
Locally") runs the autoscaler for real and starts each node it launches as a local raylet. The cluster file is
generated from ``clusters/gpu.yaml``: the same node types (``head``, ``gpu_worker_spot``, ``gpu_worker``), their
resources (``tune_driver`` on the head; a GPU, here logical, and ``mprl_worker`` on the workers; CPUs scaled down
to this machine), ``min_workers`` 0, ``max_workers`` capped at 2 and a short idle timeout. The head is started the
way Ray documents it (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``), with autoscaler v2 as
``ray up`` starts it, the dashboard on loopback, its own ``RAY_TMPDIR`` and free ports. Then, as on AWS:

1. the autoscaler idles with zero workers (nothing asks for anything);
2. the sweep is submitted with ``ray job submit --address http://127.0.0.1:<dashboard> -- python -m
   orchestrator.sweep --preset smoke --address auto --tracking-uri ... --set dataset.root=... --set
   cluster.storage_path=... --set sweep.max_concurrent=2 --set sweep.max_failures=3`` (README, "Running on a GPU
   cluster"), the dataset and the storage on a folder marked shared, an MLflow server on loopback;
3. worker nodes appear on demand; their launch times and the autoscaler's decisions are recorded, and where the
   sweep asks the autoscaler for ``sweep.max_concurrent`` trials' nodes up front (``request_resources``), the
   first two launches must be decided together and both workers be up before the first trial ends;
4. once a trial has written its first checkpoint, every process of its worker node is SIGKILLed (a spot
   reclaim); Tune retries the trial, which resumes from that checkpoint (its retry's first epoch is past the
   checkpoint's, the job log says "resuming re-ID training after epoch N", epoch 0 is logged to MLflow once);
5. the job ends SUCCEEDED, every trial run in MLflow is FINISHED, and no stage or trial ran on the head;
6. after the sweep the idle workers scale down, and teardown leaves no process of this cluster.

Exit code 1 when an assertion fails. ``--keep DIR`` keeps the storage, logs and ``summary.json``.

    python -m bench.launch_rehearsal [--keep DIR] [--epochs 6] [--autoscaler v2|v1]

The cluster itself (provider, cluster file, processes, teardown): ``bench.fake_cluster``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from bench.fake_cluster import (
    IDLE_TIMEOUT_MIN,
    WHERE_PID,
    Watcher,
    autoscaler_events,
    fake_cluster_config,
    list_nodes,
    log,
    node_types,
    placements,
    start_head,
    teardown,
    wait_autoscaler,
    worker_types,
)
from bench.loopback import LOOPBACK_ENV, ROOT, mlflow_server
from orchestrator.cluster import SHARED_MARKER, free_port

SOURCE = ROOT / "clusters" / "gpu.yaml"
LAUNCH_TOGETHER_S = 5.0
SMOKE_DATA = dict(ids=12, images_per_id=8, distractors=12, junk=8, size=(64, 32), seed=0)  # the smoke preset's
RESUME_LINE = re.compile(r"\(\w+ pid=(\d+)[^)]*\).*?resuming re-ID training after epoch (\d+)")  # Ray's prefix
CAPACITY_LINE = "asked the autoscaler for"


# ------------------------------------------------------------------------------------------ the rehearsal

@dataclass
class Result:
    autoscaler: str = ""
    provider: str = ""
    ray_tmp: str = ""  # the cluster's RAY_TMPDIR (removed after teardown)
    workers_before_submit: int = -1
    submit_at_s: float = 0.0
    job_status: str = ""
    submit_rc: int | None = None
    workers: list[dict] = field(default_factory=list)
    scaling: list[dict] = field(default_factory=list)  # the autoscaler's add/remove decisions
    capacity_requested: bool = False
    first_trial_end_s: float | None = None
    kill: dict | None = None
    resumed_after_epoch: int | None = None  # the "resuming re-ID training after epoch N" of the retry's process
    retry_pid: int | None = None
    retry_first_epoch: int | None = None
    epoch0_logged: int = 0
    trials: dict[str, str] = field(default_factory=dict)
    trial_nodes: dict[str, str] = field(default_factory=dict)
    stage_nodes: dict[str, str] = field(default_factory=dict)
    on_head: list[str] = field(default_factory=list)
    scaled_down_s: float | None = None
    leftover: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def sweep_command(dashboard: str, url: str, data: Path, storage: Path, epochs: int, submission_id: str) -> list[str]:
    """``ray job submit`` as the README writes it, with the smoke preset on logical GPUs."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    sets = [f"dataset.root={data}", f"cluster.storage_path={storage}", "sweep.max_concurrent=2",
            "sweep.max_failures=3",
            # a Market-format folder on the shared storage (rsync-up'd on AWS); synthetic: no ImageNet weights
            "dataset.name=market1501", "reid.pretrained=random",
            # the workers' GPUs are logical: stages and trials ask for one and run on the CPU
            "cluster.logical_gpus=true", "gan.use_gpu=true", "reid.use_gpu=true",
            # one trial long enough to be killed after its first checkpoint
            f"reid.epochs={epochs}", "reid.checkpoint_every=1"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    commit = json.dumps({"env_vars": {"MPRL_GIT_COMMIT": head.strip() or "unknown"}})  # a synced tree has no .git
    return [ray_cli, "job", "submit", "--address", dashboard, "--submission-id", submission_id,
            "--runtime-env-json", commit, "--",
            "python", "-m", "orchestrator.sweep", "--preset", "smoke", "--address", "auto", "--tracking-uri", url,
            *[a for s in sets for a in ("--set", s)]]


def check_trial_fits(config: dict, epochs: int, storage: Path) -> dict[str, float]:
    """One trial's resource request (orchestrator.resources on this cluster's head resources); ValueError unless a
    worker node type can hold it."""
    from orchestrator import resources
    from orchestrator.config import load_config

    cfg = load_config("smoke", overrides=["cluster.logical_gpus=true", "gan.use_gpu=true", "reid.use_gpu=true",
                                          f"reid.epochs={epochs}", "sweep.max_concurrent=2",
                                          f"cluster.storage_path={storage}"])
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    with mock.patch.object(resources, "_cluster_resources", return_value=dict(head)):
        need = resources.trial_resources(cfg)
    for name, t in worker_types(config).items():
        if all(t["resources"].get(k, 0) >= v for k, v in need.items()):
            return need
    raise ValueError(f"a trial asks for {need}, which no worker type of the fake cluster holds")


def mlflow_checks(url: str, experiment: str, res: Result, pid_nodes: dict[int, str], t0_wall: float) -> None:
    """Trial statuses, placement of trials and built stages (pid -> node), and the killed trial's epoch history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        res.problems.append(f"no MLflow experiment {experiment!r}")
        return
    runs = client.search_runs([exp.experiment_id], "tags.`mprl.kind` = 'trial'")
    for r in runs:
        key = r.data.params.get("trial", r.info.run_name)
        res.trials[key] = r.info.status
        res.trial_nodes[key] = _node_of_where(r.data.tags.get("mprl.where", ""), pid_nodes)
        end = r.info.end_time
        if end and r.data.tags.get("mprl.reused_stage") is None:
            at = end / 1000 - t0_wall
            res.first_trial_end_s = at if res.first_trial_end_s is None else min(res.first_trial_end_s, at)
    for s in client.search_runs([exp.experiment_id], "tags.`mprl.kind` = 'stage'"):
        if s.data.tags.get("mprl.cached") == "false":
            res.stage_nodes[s.info.run_name] = _node_of_where(s.data.tags.get("mprl.where", ""), pid_nodes)
    res.on_head = [f"{k} ({v})" for k, v in {**res.trial_nodes, **res.stage_nodes}.items()
                   if v == FAKE_HEAD_NODE_ID or v == "?"]
    if res.kill:
        run = next((r for r in runs if r.data.params.get("trial", r.info.run_name) == res.kill["trial"]), None)
        if run is not None:
            m = WHERE_PID.search(run.data.tags.get("mprl.where", ""))
            res.retry_pid = int(m.group(1)) if m else None
            history = client.get_metric_history(run.info.run_id, "loss")
            res.epoch0_logged = sum(1 for m in history if m.step == 0)
            kill_ms = (t0_wall + res.kill["at_s"]) * 1000
            after = sorted((m.timestamp, m.step) for m in history if m.timestamp > kill_ms)
            res.retry_first_epoch = after[0][1] if after else None


def _node_of_where(where: str, pid_nodes: dict[int, str]) -> str:
    m = WHERE_PID.search(where)
    return pid_nodes.get(int(m.group(1)), "?") if m else "?"


def rehearse(root: Path, *, epochs: int = 6, autoscaler: str = "v2") -> Result:
    from datasets.synthetic import generate

    t0, t0_wall = time.perf_counter(), time.time()
    res = Result(autoscaler=autoscaler)
    shared = root / "shared"  # "the EFS mount": marked shared, as clusters/gpu.yaml's head setup does
    storage, data, logs = shared / "mprl", shared / "data" / "synth-market", root / "logs"
    for d in (storage, data.parent, logs):
        d.mkdir(parents=True, exist_ok=True)
    (shared / SHARED_MARKER).touch()
    if not (data / "bounding_box_train").is_dir():
        generate(data, workers=1, **SMOKE_DATA)
    res.seconds["dataset"] = round(time.perf_counter() - t0, 1)

    ray_tmp = res.ray_tmp = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's socket paths live below it
    ports = {k: free_port() for k in ("gcs", "dashboard", "client", "agent")}
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    config = fake_cluster_config(yaml.safe_load(SOURCE.read_text()), gcs_address=f"127.0.0.1:{ports['gcs']}",
                                 autoscaler=autoscaler)
    res.provider = config["provider"]["type"]
    config_file = root / "fake_gpu.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    need = check_trial_fits(config, epochs, storage)
    log(f"cluster file {config_file} from {SOURCE.relative_to(ROOT)}: provider {res.provider}, node types "
        + ", ".join(f"{n} {t['resources']}" for n, t in config["available_node_types"].items())
        + f"; one trial asks for {need}", t0)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({**LOOPBACK_ENV, "RAY_TMPDIR": ray_tmp, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "PATH": venv_bin + os.pathsep + env.get("PATH", "")})
    if autoscaler == "v2":  # what `ray up` starts (RAY_UP_enable_autoscaler_v2 defaults to 1 in Ray 2.60)
        env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                    "RAY_NODE_TYPE_NAME": config["head_node_type"]})
    else:
        env["RAY_enable_autoscaler_v2"] = "0"
    watcher = None
    try:
        with mlflow_server(root / "mlflow") as url:
            log(f"MLflow server {url}", t0)
            start_head(config_file, env, ports, logs, t0)
            ray_logs = wait_autoscaler(ray_tmp)
            res.seconds["head_up"] = round(time.perf_counter() - t0, 1)
            log(f"head up, autoscaler {autoscaler} running (logs {ray_logs})", t0)
            time.sleep(5)  # five autoscaler rounds with nothing asked for
            nodes = list_nodes(dashboard)
            res.workers_before_submit = sum(1 for n in nodes if n["state"] == "ALIVE" and
                                            n["node_id"] != FAKE_HEAD_NODE_ID)
            status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address",
                                     f"127.0.0.1:{ports['gcs']}"], env=env, capture_output=True, text=True,
                                    timeout=60)
            (logs / "ray_status_before.txt").write_text(status.stdout + status.stderr)
            log(f"before the job: {len(nodes)} node(s), {res.workers_before_submit} workers", t0)

            from orchestrator.config import load_config

            experiment = load_config("smoke").cluster.experiment
            watcher = Watcher(dashboard, ray_tmp, storage, url, experiment, epochs, t0, ray_logs / "monitor.log")
            watcher.start()
            submission = f"mprl-launch-rehearsal-{int(t0_wall)}"
            cmd = sweep_command(dashboard, url, data, storage, epochs, submission)
            res.submit_at_s = round(time.perf_counter() - t0, 1)
            log("$ " + " ".join(cmd[cmd.index("job"):]), t0)
            with (logs / "job.log").open("w") as out:
                proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600, cwd=ROOT)
            res.submit_rc = proc.returncode
            res.seconds["job"] = round(time.perf_counter() - t0 - res.submit_at_s, 1)
            from ray.job_submission import JobSubmissionClient

            res.job_status = str(JobSubmissionClient(dashboard).get_job_status(submission))
            res.job_status = res.job_status.split(".")[-1]
            log(f"job {submission}: {res.job_status} (ray job submit exit code {proc.returncode}) after "
                f"{res.seconds['job']:.0f} s", t0)
            job_log = (logs / "job.log").read_text(errors="replace")
            res.capacity_requested = CAPACITY_LINE in job_log

            pid_nodes = {**placements(dashboard), **watcher.watch.pid_nodes}
            res.kill = asdict(watcher.watch.kill) if watcher.watch.kill else None
            mlflow_checks(url, experiment, res, pid_nodes, t0_wall)
            resumed = [int(m.group(2)) for m in RESUME_LINE.finditer(job_log) if int(m.group(1)) == res.retry_pid]
            res.resumed_after_epoch = max(resumed) if resumed else None
            # idle workers go after the sweep withdrew its request (idle_timeout_minutes)
            deadline = time.perf_counter() + IDLE_TIMEOUT_MIN * 60 + 75
            while time.perf_counter() < deadline:
                alive = [n for n in list_nodes(dashboard) if n["state"] == "ALIVE" and n["node_id"] !=
                         FAKE_HEAD_NODE_ID]
                if not alive:
                    res.scaled_down_s = round(time.perf_counter() - t0 - res.submit_at_s - res.seconds["job"], 1)
                    break
                time.sleep(1)
            log("workers scaled down to zero " + (f"{res.scaled_down_s:.0f} s after the job ended"
                                                   if res.scaled_down_s is not None else "NOT within the wait"), t0)
            watcher.stop.set()
            watcher.join(10)
            types = node_types(ray_logs / "monitor.log")
            res.workers = [{**asdict(n), "node_type": types.get(n.node_id, n.node_type)}
                           for n in watcher.watch.nodes.values() if n.node_id != FAKE_HEAD_NODE_ID]
            res.scaling = autoscaler_events(ray_logs / "monitor.log", t0_wall)
            if watcher.watch.errors:
                (logs / "watcher_errors.txt").write_text("\n".join(watcher.watch.errors))
    finally:
        if watcher is not None:
            watcher.stop.set()
        session = Path(ray_tmp) / "ray" / "session_latest" / "logs"
        for name in ("monitor.log", "monitor.err", "monitor.out"):
            if (session / name).is_file():
                shutil.copy(session / name, logs / name)
        res.leftover = teardown(ray_tmp, t0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    res.seconds["total"] = round(time.perf_counter() - t0, 1)
    res.problems += problems(res, epochs)
    return res


def problems(res: Result, epochs: int) -> list[str]:
    found = []
    if res.workers_before_submit != 0:
        found.append(f"{res.workers_before_submit} worker nodes were up before the job (min_workers is 0)")
    early = [w for w in res.workers if w["first_seen_s"] < res.submit_at_s]
    if early:
        found.append(f"worker nodes up before the job was submitted: {early}")
    if len({w["node_id"] for w in res.workers}) < 2:
        found.append(f"the autoscaler started {len(res.workers)} worker node(s), expected at least 2")
    if res.job_status != "SUCCEEDED" or res.submit_rc != 0:
        found.append(f"the job ended {res.job_status} (ray job submit exit code {res.submit_rc})")
    if not res.trials or any(s != "FINISHED" for s in res.trials.values()):
        found.append(f"not every trial run is FINISHED: {res.trials}")
    if res.on_head:
        found.append(f"ran on the head or placement unknown: {res.on_head}")
    k = res.kill
    if k is None:
        found.append("no worker node was killed (no trial checkpointed mid-trial?)")
    else:
        if res.trials.get(k["trial"]) != "FINISHED":
            found.append(f"the killed trial {k['trial']} did not finish: {res.trials.get(k['trial'])}")
        if res.resumed_after_epoch is None or res.resumed_after_epoch < k["checkpoint_epoch"]:
            found.append(f"the retry (pid {res.retry_pid}) logged 'resuming re-ID training after epoch "
                         f"{res.resumed_after_epoch}', expected >= {k['checkpoint_epoch']} (the kill's checkpoint)")
        if res.retry_pid == k["pid"]:
            found.append("the killed trial's run names the killed process as its last attempt")
        if res.retry_first_epoch is None or res.retry_first_epoch <= 0 or (
                res.retry_first_epoch < k["checkpoint_epoch"] + 1):
            found.append(f"the retry's first logged epoch is {res.retry_first_epoch}, not past the killed "
                         f"checkpoint's epoch {k['checkpoint_epoch']}")
        if res.epoch0_logged != 1:
            found.append(f"epoch 0 of the killed trial was logged {res.epoch0_logged} times (restarted?)")
        if res.trial_nodes.get(k["trial"]) == k["node_id"]:
            found.append("the killed trial's last attempt ran on the killed node")
    if res.capacity_requested:  # the sweep asked for sweep.max_concurrent trials' nodes at its start
        ups = sorted(w["first_seen_s"] for w in res.workers)
        if len(ups) < 2 or res.first_trial_end_s is None or ups[1] > res.first_trial_end_s:
            found.append(f"the sweep asked for capacity up front, but the second worker came up at "
                         f"{ups[1] if len(ups) > 1 else None} s, after the first trial ended at "
                         f"{res.first_trial_end_s} s")
        adds = [e for e in res.scaling if e["action"] == "add"]
        first_two = [e["at_s"] for e in adds for _ in range(e["count"])][:2]
        if len(first_two) < 2 or first_two[1] - first_two[0] > LAUNCH_TOGETHER_S:
            found.append(f"the first two worker launches were not decided together (within {LAUNCH_TOGETHER_S} s): "
                         f"{adds}")
    if res.scaled_down_s is None:
        found.append("the idle workers did not scale down after the sweep")
    if res.leftover:
        found.append(f"processes of the cluster survived teardown: {res.leftover}")
    return found


def report(res: Result) -> str:
    lines = [f"autoscaler {res.autoscaler}, provider {res.provider}; workers before the job: "
             f"{res.workers_before_submit}; job submitted at {res.submit_at_s:.0f} s"]
    for w in sorted(res.workers, key=lambda w: w["first_seen_s"]):
        dead = f", dead at {w['dead_at_s']:.0f} s" if w["dead_at_s"] is not None else ""
        lines.append(f"  worker {w['node_id'][-5:]} ({w['node_type']}): up at {w['first_seen_s']:.0f} s "
                     f"({w['first_seen_s'] - res.submit_at_s:+.0f} s after submit){dead}")
    for e in res.scaling:
        lines.append(f"  autoscaler at {e['at_s']:.0f} s: {e['action']} {e['count']} x {e['type']} ({e['why']})")
    lines.append(f"capacity asked for up front by the sweep: {'yes' if res.capacity_requested else 'no'}; "
                 f"first trained trial ended at {res.first_trial_end_s or float('nan'):.0f} s")
    if res.kill:
        k = res.kill
        lines.append(f"killed node {k['node_id'][-5:]} at {k['at_s']:.0f} s ({k['processes']} processes), trial "
                     f"{k['trial']} (pid {k['pid']}) after its checkpoint of epoch index {k['checkpoint_epoch']}; "
                     f"the retry (pid {res.retry_pid}) logged 'resuming ... after epoch {res.resumed_after_epoch}', "
                     f"its first epoch logged to MLflow is {res.retry_first_epoch}, epoch 0 logged "
                     f"{res.epoch0_logged}x")
    for key, status in sorted(res.trials.items()):
        lines.append(f"  trial {key}: {status} on node {res.trial_nodes.get(key, '?')[-5:]}")
    lines.append(f"stages built on nodes: {sorted({v[-5:] for v in res.stage_nodes.values()})} (head is 00000)")
    lines.append(f"job {res.job_status}; idle workers gone {res.scaled_down_s} s after the job; leftover processes: "
                 f"{len(res.leftover)}; seconds {res.seconds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", help="folder to keep (storage, logs, summary.json; default: a temporary one, deleted)")
    p.add_argument("--epochs", type=int, default=6, help="re-ID epochs of each trial (default 6)")
    p.add_argument("--autoscaler", choices=("v2", "v1"), default="v2",
                   help="v2: what `ray up` starts in Ray 2.60 (default); v1: the older one")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="launch-rehearsal-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        res = rehearse(root, epochs=args.epochs, autoscaler=args.autoscaler)
        (root / "summary.json").write_text(json.dumps(asdict(res), indent=1))
        print("\n" + report(res))
        for line in res.problems:
            print(f"FAIL: {line}", file=sys.stderr)
        print("launch rehearsal: " + ("FAILED" if res.problems else
                                      "passed: zero workers at rest, workers on demand, a spot reclaim resumed "
                                      "from its checkpoint, the job SUCCEEDED, nothing left running"))
        return 1 if res.problems else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
