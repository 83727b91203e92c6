"""Tune's side of a sweep (orchestrator/tuning.py, orchestrator/trial_actor.py): the searcher releases each trial
when its inputs exist, longest first, and survives a save/restore; trial actors start without importing torch."""

import os
import subprocess
import sys

from orchestrator import dag
from orchestrator.trials import TrialSpec
from orchestrator.tuning import ReadySearcher


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


def test_trial_actors_start_without_importing_torch_or_mlflow():
    """Tune's trial actor unpickles its trainable when it starts; that must not import torch or MLflow, or actors
    take longer to start than short trials run and Tune runs every trial in one reused actor (trial_actor.py)."""
    import cloudpickle
    import ray.tune

    from orchestrator import trial_actor

    blob = cloudpickle.dumps(ray.tune.with_parameters(trial_actor.run_trial, ctx=b"", tracking_uri=""))
    code = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
            "print(sorted(m for m in ('torch', 'torchvision', 'mlflow') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, check=True)
    assert out.stdout.decode().strip() == "[]", out.stderr.decode()[-2000:]


def test_a_resume_applies_the_new_concurrency_and_retries_to_the_restored_tuner(tmp_path, local_ray):
    """Ray keeps a restored Tuner's saved limits; apply_runtime sets this run's (the private attributes it writes
    exist in the pinned Ray, or this test fails)."""
    import ray.tune

    from orchestrator.config import load_config
    from orchestrator.tuning import apply_runtime

    tuner = ray.tune.Tuner(lambda config: None, tune_config=ray.tune.TuneConfig(max_concurrent_trials=1),
                           run_config=ray.tune.RunConfig(name="t", storage_path=str(tmp_path),
                                                         failure_config=ray.tune.FailureConfig(max_failures=0)))
    cfg = load_config("smoke", overrides=["sweep.max_concurrent=4", "sweep.max_failures=2"])
    internal = apply_runtime(tuner, cfg)._local_tuner
    assert internal._tune_config.max_concurrent_trials == 4
    assert internal._run_config.failure_config.max_failures == 2
