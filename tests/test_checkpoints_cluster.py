"""A worker node lost mid-trial (its raylet killed, on a loopback cluster shaped like clusters/gpu.yaml): Tune
retries the in-process trial on the other worker node, which resumes after its last checkpoint (slow: ~1-2 min)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.loops import toy_loop
from trainables import checkpoints, runtime

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def node_trial(config: dict) -> None:
    """Records where each attempt runs and the checkpoint it starts from, then trains like an in-process trial."""
    import ray

    spec = runtime.RunSpec(name="trial", storage_path=config["runs"], report_to_tune=True)
    latest = checkpoints.latest(spec.run_dir)
    start = None if latest is None else checkpoints.load(latest / checkpoints.STATE_FILE)["epoch"]
    with open(Path(config["runs"]) / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"node": ray.get_runtime_context().get_node_id(), "after_epoch": start}) + "\n")
    runtime.fit(toy_loop, config, spec)


def _attempts(runs: Path) -> list[dict]:
    path = runs / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _kill_when_checkpointed(c, runs: Path, killed: dict, deadline: float) -> None:
    """Kill the raylet of the first attempt's node once the run holds a checkpoint after epoch >= 1."""
    while time.time() < deadline:
        time.sleep(0.5)
        latest, attempts = checkpoints.latest(runs / "trial"), _attempts(runs)
        if latest is None or not attempts or checkpoints.load(latest / checkpoints.STATE_FILE)["epoch"] < 1:
            continue
        node = next(n for n in c.worker_nodes if n.node_id == attempts[0]["node"])
        killed.update(node=node.node_id, epoch=checkpoints.load(latest / checkpoints.STATE_FILE)["epoch"],
                      at=time.perf_counter())
        node.kill_raylet()
        return


def test_a_lost_worker_node_resumes_the_trial_on_another_node_from_its_checkpoint(tmp_path):
    import ray
    import ray.tune

    from bench.loopback import gpu_cluster
    from orchestrator.resources import WORKER_RESOURCE

    runs = tmp_path / "runs"
    runs.mkdir()
    cfg = {"epochs": 10, "every": 1, "sleep": 1.5, "runs": str(runs)}
    with gpu_cluster(workers=2, worker_cpus=1, gpus_per_worker=0) as c:
        ray.init(address=c.address)
        trainable = ray.tune.with_resources(node_trial, {"CPU": 1, WORKER_RESOURCE: 1})
        tuner = ray.tune.Tuner(trainable, param_space=cfg, run_config=ray.tune.RunConfig(
            name="exp", storage_path=str(tmp_path / "tune"), verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=2),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1)))
        killed: dict = {}
        killer = threading.Thread(target=_kill_when_checkpointed, args=(c, runs, killed, time.time() + 300))
        start = time.perf_counter()
        killer.start()
        (result,) = tuner.fit()
        killer.join()
        total = time.perf_counter() - start
    attempts = _attempts(runs)
    print(f"killed node {killed.get('node', '?')[:12]} after epoch {killed.get('epoch')} at "
          f"{killed.get('at', start) - start:.0f} s; attempts {attempts}; total {total:.0f} s")
    assert killed, "the trial never checkpointed"
    assert result.error is None, result.error
    first, *retries = attempts
    assert first["after_epoch"] is None and first["node"] == killed["node"]
    last = retries[-1]
    assert last["node"] != killed["node"]  # the other worker node
    assert last["after_epoch"] is not None and last["after_epoch"] >= killed["epoch"]  # its last checkpoint
    frame = result.metrics_dataframe
    assert frame["epoch"].iloc[-1] == 9 and frame["training_iteration"].iloc[-1] == 10  # the count continued
    (ckpt,) = checkpoints.checkpoints(runs / "trial")
    assert checkpoints.load(ckpt / checkpoints.STATE_FILE)["w"][0] == 10.0  # every epoch applied exactly once
