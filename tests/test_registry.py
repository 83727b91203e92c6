"""The model registry: one version per label method of a sweep, chosen on validation (never on a test metric)."""

from __future__ import annotations

import mlflow
import torch

from orchestrator import registry, tracking


def _trial(client, run: tracking.SweepRun, method: str, seed: int, metrics: dict[str, float]) -> str:
    key = f"{method}-s{seed}"
    rid, _ = run.child("trial", tracking.trial_key(run.name, key), key)
    tracking.log_params(client, rid, {"labels.method": method, "reid.seed": seed, "labels.num_gan": 360,
                                      "trial": key, "reid.epochs": 2})
    tracking.log_metrics(client, rid, metrics)
    uri = tracking.log_model(rid, torch.nn.Linear(2, 2), None)
    client.set_tag(rid, "mprl.model_uri", uri)
    tracking.set_status(client, rid, "FINISHED")
    return rid


def test_the_registry_gets_the_validation_best_per_method_and_says_what_chose_it(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    client, exp = tracking.setup(uri, "e", tmp_path)
    mlflow.set_tracking_uri(uri)
    parent, _ = tracking.get_or_create_run(client, exp, "sweep", "s1", "s1")
    run = tracking.SweepRun(client, exp, "s1", parent, uri)
    # the best test rank-1 is NOT the best validation rank-1: the registry must follow validation
    lsro0 = _trial(client, run, "lsro", 0, {"val_rank1": 0.8, "final_rank1": 0.60, "final_mAP": 0.5, "loss": 2.0})
    _trial(client, run, "lsro", 1, {"val_rank1": 0.7, "final_rank1": 0.90, "final_mAP": 0.8, "loss": 1.0})
    _trial(client, run, "baseline", 0, {"final_rank1": 0.95, "loss": 1.5})
    base1 = _trial(client, run, "baseline", 1, {"final_rank1": 0.50, "loss": 0.9})
    _trial(client, run, "allinone", 2, {"final_rank1": 0.9})  # neither metric (a reused baseline stage's kind)
    all1 = _trial(client, run, "allinone", 1, {"final_rank1": 0.1})

    got = {r.name: r for r in registry.register_best(client, exp, "e", parent, "s1")}
    assert set(got) == {"mprl-e-lsro", "mprl-e-baseline", "mprl-e-allinone"}
    assert got["mprl-e-allinone"].run_id == all1 and "lowest seed" in got["mprl-e-allinone"].selected_by
    assert got["mprl-e-lsro"].run_id == lsro0 and got["mprl-e-lsro"].selected_by == "val_rank1"
    assert got["mprl-e-baseline"].run_id == base1 and "no validation split" in got["mprl-e-baseline"].selected_by
    version = client.get_model_version("mprl-e-lsro", got["mprl-e-lsro"].version)
    assert version.run_id == lsro0 and version.tags["mprl.sweep"] == "s1" and version.tags["mprl.seed"] == "0"
    assert version.tags["mprl.test_rank1"] == "60.00"  # copied for the reader, in percent
    loaded = mlflow.pytorch.load_model(f"models:/mprl-e-lsro/{version.version}")
    assert isinstance(loaded, torch.nn.Linear)
    assert "mprl-e-lsro version 1: trial lsro-s0 (chosen by val_rank1" in registry.summary(list(got.values()))

    assert registry.register_best(client, exp, "e", parent, "s1") == []  # the same sweep again (--resume): nothing
    parent2, _ = tracking.get_or_create_run(client, exp, "sweep", "s2", "s2")
    _trial(client, tracking.SweepRun(client, exp, "s2", parent2, uri), "lsro", 0, {"val_rank1": 0.5})
    again = {r.name: r for r in registry.register_best(client, exp, "e", parent2, "s2")}  # the next sweep: version 2
    assert again["mprl-e-lsro"].version == "2"


def test_nothing_to_register_is_said(tmp_path):
    client, exp = tracking.setup(tracking.default_tracking_uri(tmp_path), "e", tmp_path)
    parent, _ = tracking.get_or_create_run(client, exp, "sweep", "s1", "s1")
    assert registry.register_best(client, exp, "e", parent, "s1") == []
    assert "nothing registered" in registry.summary([])
