"""Citable runs: provenance tags on every run, one metric unit in MLflow, the code version in stage keys."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from orchestrator import provenance, stage_cache, tracking
from orchestrator.stage_cache import StageNode


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def _tree(root: Path) -> Path:
    """A tiny project tree shaped like ours, committed in a git repository."""
    for rel, text in {"datasets/a.py": "X = 1\n", "trainables/config.py": "Y = 2\n",
                      "trainables/gan/nets.py": "def g():\n    return 1\n",
                      "trainables/reid/loop.py": "def r():\n    return 2\n",
                      "trainables/evaluation/ranking.py": "Z = 3\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return root


@pytest.fixture
def tree(tmp_path, monkeypatch):
    root = _tree(tmp_path / "proj")
    monkeypatch.setattr(provenance, "ROOT", root)
    provenance.source_hash.cache_clear()
    yield root
    provenance.source_hash.cache_clear()


def test_run_tags_name_the_commit_and_say_when_the_checkout_is_dirty(tree):
    clean = provenance.run_tags.__wrapped__()
    assert clean["mlflow.source.git.commit"] == _git(tree, "rev-parse", "HEAD").strip()
    assert clean["mprl.git_dirty"] == "false" and "mprl.git_diff_sha256" not in clean
    versions = json.loads(clean["mprl.versions"])
    assert versions["mlflow"] == "3.17.2" and set(versions) == set(provenance.PACKAGES)
    assert clean["mprl.host"] and clean["mlflow.user"]

    (tree / "datasets/a.py").write_text("X = 10\n")
    dirty = provenance.run_tags.__wrapped__()
    assert dirty["mprl.git_dirty"] == "true" and len(dirty["mprl.git_diff_sha256"]) == 64
    (tree / "datasets/a.py").write_text("X = 11\n")
    assert provenance.run_tags.__wrapped__()["mprl.git_diff_sha256"] != dirty["mprl.git_diff_sha256"]


def test_outside_a_checkout_the_commit_is_unknown_or_given(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "a.py").write_text("X = 1\n")
    provenance.source_hash.cache_clear()
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    tags = provenance.run_tags.__wrapped__()
    assert tags["mlflow.source.git.commit"] == "unknown" and "mprl.git_dirty" not in tags
    assert len(tags["mprl.source_sha256"]) == 12  # the code is still identified
    monkeypatch.setenv(provenance.COMMIT_ENV, "abc123")  # a synced copy: ray job submit passes the commit
    monkeypatch.setenv(provenance.DIRTY_ENV, "false")
    given = provenance.run_tags.__wrapped__()
    assert given["mlflow.source.git.commit"] == "abc123" and given["mprl.git_dirty"] == "false"
    provenance.source_hash.cache_clear()


def test_a_stage_code_version_follows_its_own_code_only(tree):
    before = {s: provenance.code_version(s) for s in ("gan", "baseline", "dataset")}
    (tree / "trainables/gan/nets.py").write_text("def g():\n    # a comment and a blank line change nothing\n\n"
                                                 "    return 1\n")
    provenance.source_hash.cache_clear()
    assert {s: provenance.code_version(s) for s in before} == before
    (tree / "trainables/gan/nets.py").write_text("def g():\n    return 2\n")
    provenance.source_hash.cache_clear()
    after = {s: provenance.code_version(s) for s in before}
    assert after["gan"] != before["gan"] and after["baseline"] == before["baseline"]
    assert after["dataset"] == before["dataset"]
    (tree / "trainables/config.py").write_text("Y = 3\n")  # a shared module: both domains' stages
    provenance.source_hash.cache_clear()
    shared = {s: provenance.code_version(s) for s in before}
    assert shared["gan"] != after["gan"] and shared["baseline"] != after["baseline"]
    assert shared["dataset"] == before["dataset"]


def test_a_stage_node_key_carries_the_code_version(monkeypatch):
    a = StageNode("baseline", "cfghash", dict, (), {}, lambda folder: None)
    monkeypatch.setattr(stage_cache, "code_version", lambda stage: "other-code")
    b = StageNode("baseline", "cfghash", dict, (), {}, lambda folder: None)
    assert a.key != b.key and a.name == f"baseline-{a.key}" and len(a.key) == 12


def test_every_run_is_tagged_and_ranking_metrics_are_percent_in_mlflow(tmp_path):
    client, exp = tracking.setup(tracking.default_tracking_uri(tmp_path), "e", tmp_path)
    parent, _ = tracking.get_or_create_run(client, exp, "sweep", "s1", "s1")
    run = tracking.SweepRun(client, exp, "s1", parent, "")
    child, _ = run.child("trial", "t1", "t1")
    for rid in (parent, child):
        tags = client.get_run(rid).data.tags
        assert tags[tracking.TAG_UNIT] == tracking.PERCENT
        assert tags["mlflow.source.git.commit"] == provenance.run_tags()["mlflow.source.git.commit"]
    tracking.log_metrics(client, child, {"final_rank1": 0.5, "final_xd_duke_rr_mAP": 0.25, "val_rank1": 0.75,
                                         "loss": 1.5, "final_bnr_mINP": 0.125, "rank1_gap": 0.5})
    got = client.get_run(child)
    assert got.data.metrics == {"final_rank1": 50.0, "final_xd_duke_rr_mAP": 25.0, "val_rank1": 75.0, "loss": 1.5,
                                "final_bnr_mINP": 12.5, "rank1_gap": 0.5}
    assert tracking.fractions(got) == {"final_rank1": 0.5, "final_xd_duke_rr_mAP": 0.25, "val_rank1": 0.75,
                                       "loss": 1.5, "final_bnr_mINP": 0.125, "rank1_gap": 0.5}


def test_a_run_of_an_older_version_reads_as_fractions(tmp_path):
    client, exp = tracking.setup(tracking.default_tracking_uri(tmp_path), "e", tmp_path)
    old = client.create_run(exp, run_name="old").info.run_id  # no unit tag: logged in fractions
    client.log_metric(old, "final_rank1", 0.5)
    assert tracking.fractions(client.get_run(old))["final_rank1"] == 0.5
