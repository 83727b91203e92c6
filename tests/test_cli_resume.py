"""``--resume`` (orchestrator/sweep_record.py): a changed runtime field resumes the same sweep; a changed result
field is refused, listing each change, before Ray starts and without writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import cluster, stage_cache, sweep, sweep_record, tracking
from orchestrator.config import load_config


def _cfg(storage: Path, *extra: str):
    return load_config("smoke", overrides=[f"cluster.storage_path={storage}", "cluster.num_cpus=3", *extra])


def _started(storage: Path, *extra: str) -> str:
    """A sweep that started and was interrupted: named and recorded as run_sweep does before its Tune experiment
    runs, with its MLflow parent run."""
    cfg = _cfg(storage, *extra)
    name = sweep_record.resolve(cfg, stage_cache.Paths(storage).tune, resume=False).name
    client, exp_id = tracking.setup(tracking.default_tracking_uri(storage), "mprl", storage)
    tracking.get_or_create_run(client, exp_id, "sweep", name, name)
    sweep_record.write_record(stage_cache.Paths(storage).tune, name, cfg)
    return name


def _tree(root: Path) -> dict[str, tuple[float, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime, p.stat().st_size) for p in root.rglob("*")}


def _no_ray(monkeypatch):
    def never(cfg):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster, "connect", never)


def test_a_changed_runtime_field_resumes_the_same_sweep(tmp_path):
    name = _started(tmp_path, "sweep.max_concurrent=1")
    tune = stage_cache.Paths(tmp_path).tune
    got = sweep_record.resolve(_cfg(tmp_path, "sweep.max_concurrent=4", "sweep.max_failures=2",
                                    "reid.loader_workers=1"), tune, resume=True)
    assert got.name == name and got.resumed and got.note is None
    assert [str(c) for c in got.runtime_changes] == ["reid.loader_workers: 0 -> 1", "sweep.max_concurrent: 1 -> 4",
                                                     "sweep.max_failures: null -> 2"]
    # without --resume the same config is the next sweep of its hash
    assert sweep_record.resolve(_cfg(tmp_path, "sweep.max_concurrent=4"), tune, resume=False).name == name[:-1] + "2"


def test_dry_run_resume_shows_the_sweep_it_continues(tmp_path, capsys):
    name = _started(tmp_path, "sweep.max_concurrent=1")
    assert sweep.main(["--preset", "smoke", "--set", f"cluster.storage_path={tmp_path}", "--set", "cluster.num_cpus=3",
                       "--set", "sweep.max_concurrent=4", "--resume", "--dry-run"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"sweep {name} (resumes)") and "sweep.max_concurrent: 1 -> 4" in first


def test_a_changed_result_field_is_refused_before_ray_writing_nothing(tmp_path, monkeypatch, capsys):
    name = _started(tmp_path)
    _no_ray(monkeypatch)
    before = _tree(tmp_path)
    with pytest.raises(ValueError) as err:
        sweep.run_sweep(_cfg(tmp_path, "reid.epochs=3", "labels.num_gan=32", "sweep.max_concurrent=2"), resume=True)
    text = str(err.value)
    assert name in text and "reid.epochs: 2 -> 3" in text and "labels.num_gan: 64 -> 32" in text
    assert "max_concurrent" not in text.split("Only runtime")[0]  # runtime changes are not the problem
    assert _tree(tmp_path) == before
    # the command line: exit 2, one line
    capsys.readouterr()
    assert sweep.main(["--preset", "smoke", "--set", f"cluster.storage_path={tmp_path}", "--set", "reid.epochs=3",
                       "--resume"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "reid.epochs: 2 -> 3" in err_text
    assert _tree(tmp_path) == before


def test_resume_after_a_finished_sweep_of_other_settings_starts_a_new_one(tmp_path):
    name = _started(tmp_path)
    tune = stage_cache.Paths(tmp_path).tune
    sweep_record.write_record(tune, name, _cfg(tmp_path), finished=True)
    got = sweep_record.resolve(_cfg(tmp_path, "reid.epochs=3"), tune, resume=True)
    assert not got.resumed and got.name != name and got.name.endswith("-1") and "no interrupted sweep" in got.note
    # and on an empty storage (a job that always passes --resume) too
    assert not sweep_record.resolve(_cfg(tmp_path / "fresh"), tmp_path / "fresh" / "tune", resume=True).resumed


def test_a_sweep_named_before_the_runtime_fields_left_the_hash_resumes(tmp_path):
    cfg = _cfg(tmp_path)
    tune = stage_cache.Paths(tmp_path).tune
    # the name commit 19c0583 gave this config (its config_hash over the sections, runtime fields included, before
    # dataset.test_root existed): computed by running that commit's code
    old = "sweep-006bde9959eb-1"
    assert sweep_record.legacy_hash(cfg) == old[6:-2]
    (tune / old).mkdir(parents=True)  # an older version's Tune folder: no record
    got = sweep_record.resolve(cfg, tune, resume=True)
    assert got.name == old and got.resumed
    assert sweep_record.sweep_hash(cfg) == sweep_record.sweep_hash(_cfg(tmp_path, "sweep.max_concurrent=8",
                                                                        "reid.num_workers=2", "cluster.num_cpus=8"))
    assert sweep_record.sweep_hash(cfg) != sweep_record.sweep_hash(_cfg(tmp_path, "reid.epochs=3"))


def test_a_changed_experiment_is_refused_on_resume(tmp_path):
    """cluster.* is runtime, but not the MLflow experiment: the restored Tune state logs into the one it began with."""
    _started(tmp_path)
    with pytest.raises(ValueError, match='cluster.experiment: "mprl" -> "other"'):
        sweep_record.resolve(_cfg(tmp_path, "cluster.experiment=other"), stage_cache.Paths(tmp_path).tune, resume=True)
