"""The stage DAG: stages run in Ray workers (never the driver), independent ones at once, chained by outputs;
a failed stage fails its dependants with its message; the searcher releases each trial when its inputs exist."""

import json
import os
import time
from dataclasses import dataclass

import pytest
import torch

from orchestrator import dag
from orchestrator.pipeline import ERROR, Paths, Plan, StageNode, require_finished
from orchestrator.trials import TrialSpec
from orchestrator.tuning import ReadySearcher
from trainables import runtime


@dataclass(frozen=True)
class Out:
    name: str


def _node(log, stage: str, deps=(), *, meet: str = "", fail: bool = False) -> StageNode:
    """A toy stage; with ``meet``, it waits (up to 60 s) until stage ``meet`` has started too: two stages that
    meet can only both finish if they run at the same time."""
    def build(folder, *inputs):
        start = time.time()
        (log / f"{stage}.started").touch()
        while meet and not (log / f"{meet}.started").exists() and time.time() - start < 60:
            time.sleep(0.2)
        if fail:
            raise ValueError(f"{stage} broke")
        record = {"pid": os.getpid(), "start": start, "end": time.time(), "inputs": [i.out.name for i in inputs]}
        (log / stage).write_text(json.dumps(record))
        return Out(stage)

    return StageNode(stage, "k", Out, tuple(f"{d}-k" for d in deps), {"CPU": 1}, build)


def _plan(*nodes: StageNode) -> Plan:
    return Plan({n.name: n for n in nodes}, dataset=nodes[0].name, data_root="")


def test_stages_run_in_workers_at_once_and_chained(tmp_path, local_ray):
    log = tmp_path / "log"
    log.mkdir()
    plan = _plan(_node(log, "data"), _node(log, "gan", ["data"], meet="base"), _node(log, "base", ["data"], meet="gan"),
                 _node(log, "gen", ["gan"]), _node(log, "smprl", ["base", "gen"]))
    seen = []
    graph = dag.StageGraph(plan, Paths(tmp_path), "s1", on_done=lambda n, r, e: seen.append(n.name)).start()
    graph.wait()
    graph.close()
    runs = {s: json.loads((log / s).read_text()) for s in ("data", "gan", "base", "gen", "smprl")}
    assert all(r["pid"] != os.getpid() for r in runs.values()), "a stage computed in the driver"
    assert runs["gan"]["start"] < runs["base"]["end"] and runs["base"]["start"] < runs["gan"]["end"], \
        "the GAN and the baseline did not run at the same time"
    assert runs["gen"]["start"] >= runs["gan"]["end"] and runs["smprl"]["inputs"] == ["base", "gen"]
    assert seen.index("data-k") < seen.index("gan-k") < seen.index("gen-k") < seen.index("smprl-k")
    assert all(f"pid {runs[n.split('-')[0]]['pid']}" in graph.results[n].where for n in plan.nodes)

    again = dag.StageGraph(plan, Paths(tmp_path), "s2").start()  # everything cached: nothing submitted
    assert not again._refs and all(r.cached for r in again.results.values())
    again.close()


def test_a_failed_stage_fails_its_dependants_with_its_message(tmp_path, local_ray):
    log = tmp_path / "log"
    log.mkdir()
    plan = _plan(_node(log, "data"), _node(log, "gan", ["data"], fail=True), _node(log, "gen", ["gan"]),
                 _node(log, "base", ["data"]))
    graph = dag.StageGraph(plan, Paths(tmp_path), "s3").start()
    graph.wait()
    graph.close()
    assert graph.errors["gan-k"] == "ValueError: gan broke"
    assert graph.errors["gen-k"] == "input stage gan-k failed"
    assert set(graph.results) == {"data-k", "base-k"}  # the independent branch still finished
    assert (tmp_path / "stages" / "gan-k" / ERROR).read_text().strip() == "ValueError: gan broke"
    with pytest.raises(FileNotFoundError, match="input stage gen-k has not finished: input stage gan-k failed"):
        require_finished(tmp_path / "stages" / "gen-k")
    assert not (log / "gen").exists()


class _Graph:
    def __init__(self, done):
        self.done = set(done)

    def poll(self):
        pass

    def finished(self, name):
        return name in self.done


def test_searcher_releases_trials_as_their_inputs_finish_longest_first(tmp_path, monkeypatch):
    trials = [TrialSpec("baseline", 0), TrialSpec("lsro", 480), TrialSpec("smprl", 480),
              TrialSpec("baseline_matched", 480), TrialSpec("lsro", 960)]
    needs = {"baseline-n0-paper-kall-s0": ("/s/base",), "lsro-n480-paper-kall-s0": ("/s/data", "/s/gen"),
             "lsro-n960-paper-kall-s0": ("/s/data", "/s/gen"), "smprl-n480-paper-kall-s0": ("/s/data", "/s/smprl"),
             "baseline_matched-n480-paper-kall-s0": ("/s/data",)}
    graph = _Graph({"data"})
    monkeypatch.setitem(dag._ACTIVE, "sw", graph)
    searcher = ReadySearcher("sw", trials, needs)
    assert searcher.suggest("1") == {"trial": "baseline_matched-n480-paper-kall-s0"}  # only it has its inputs
    assert searcher.suggest("2") is None
    graph.done.add("gen")
    assert searcher.suggest("3") == {"trial": "lsro-n960-paper-kall-s0"}  # the longest ready one first
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = ReadySearcher("sw", trials, needs)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.pending == searcher.pending
    assert searcher.suggest("4") == {"trial": "lsro-n480-paper-kall-s0"}
    graph.done |= {"smprl", "base"}
    assert [searcher.suggest(str(i))["trial"] for i in (5, 6)] == ["smprl-n480-paper-kall-s0",
                                                                   "baseline-n0-paper-kall-s0"]
    assert searcher.suggest("7") == ReadySearcher.FINISHED


def test_a_worker_given_a_gpu_without_cuda_fails_naming_its_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(runtime.LOGICAL_GPUS_ENV, raising=False)
    assert runtime.device_for(False) == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"(host|node) .* was given a GPU but torch sees no CUDA device"):
        runtime.device_for(True)
    monkeypatch.setenv(runtime.LOGICAL_GPUS_ENV, "1")  # cluster.logical_gpus: test clusters on CPU machines
    assert runtime.device_for(True) == torch.device("cpu")


def test_trial_actors_start_without_importing_torch_or_mlflow():
    """Tune's trial actor unpickles its trainable when it starts; that must not import torch or MLflow, or actors
    take longer to start than short trials run and Tune runs every trial in one reused actor (trial_actor.py)."""
    import subprocess
    import sys

    import cloudpickle
    import ray.tune

    from orchestrator import trial_actor

    blob = cloudpickle.dumps(ray.tune.with_parameters(trial_actor.run_trial, ctx=b"", tracking_uri=""))
    code = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
            "print(sorted(m for m in ('torch', 'torchvision', 'mlflow') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, check=True)
    assert out.stdout.decode().strip() == "[]", out.stderr.decode()[-2000:]
