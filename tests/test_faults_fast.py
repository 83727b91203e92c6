"""Fast checks of the fault handling: runs found by tags, failures recorded with a reason, paths checked per node."""

from __future__ import annotations

import dataclasses
import os
import pickle
from types import SimpleNamespace

import pytest

from orchestrator import cluster, tracking
from orchestrator.config import load_config
from orchestrator.trials import TrialContext
from orchestrator.tuning import EpochLogger, failure_reason

# ------------------------------------------------------------------------------ runs found by tags

@pytest.fixture
def store(tmp_path):
    """A sqlite MLflow store with a sweep run and one trial run, created the way the sweep creates them."""
    import mlflow

    uri = tracking.default_tracking_uri(tmp_path)
    client, exp_id = tracking.setup(uri, "mprl", tmp_path)
    parent, _ = tracking.get_or_create_run(client, exp_id, "sweep", "sweep-abc-1", "sweep-abc-1")
    run = tracking.SweepRun(client, exp_id, "sweep-abc-1", parent, uri)
    trial, _ = run.child("trial", tracking.trial_key("sweep-abc-1", "lsro-n16-paper-kall-s0"), "lsro", status="RUNNING")
    yield SimpleNamespace(uri=uri, client=client, trial=trial)
    mlflow.set_tracking_uri(None)


def _trial(error=None, failures=2):
    return SimpleNamespace(config={"trial": "lsro-n16-paper-kall-s0"}, num_failures=failures, last_result={},
                           get_pickled_error=lambda: error, get_error=lambda: None)


def test_nothing_address_like_travels_with_trials_or_tune_state(store):
    fields = {f.name for f in dataclasses.fields(TrialContext)}
    assert not fields & {"tracking_uri", "run_ids"}
    logger = EpochLogger("sweep-abc-1", "mprl")
    logger.on_trial_result(0, [], _trial(), {"loss": 1.5, "epoch": 0})  # warms its client and run cache
    state = pickle.dumps(logger)  # what Tune saves with the experiment and reuses on restore
    assert store.uri.encode() not in state and store.trial.encode() not in state
    assert tracking.find_trial(store.client, "mprl", "sweep-abc-1", "lsro-n16-paper-kall-s0") == store.trial
    with pytest.raises(LookupError, match="sweep-abc-1/dmprl2"):
        tracking.find_trial(store.client, "mprl", "sweep-abc-1", "dmprl2-n16-paper-kall-s0")


def test_epoch_logger_follows_the_current_tracking_store(store, tmp_path):
    import mlflow

    logger = EpochLogger("sweep-abc-1", "mprl")
    logger.on_trial_result(0, [], _trial(), {"loss": 1.5, "epoch": 0})
    other = tracking.default_tracking_uri(tmp_path / "elsewhere")
    mlflow.set_tracking_uri(other)  # a resumed sweep on a new store: the old one is not written
    with pytest.raises(LookupError):
        logger.on_trial_result(0, [], _trial(), {"loss": 1.0, "epoch": 1})
    assert [m.value for m in store.client.get_metric_history(store.trial, "loss")] == [1.5]


def test_epochs_reported_while_the_server_is_down_are_queued_and_written_in_order_later(store, monkeypatch, capsys):
    from orchestrator import epoch_logger

    up = {"now": False}
    monkeypatch.setattr(epoch_logger.tracking, "reachable", lambda uri, timeout_s=2.0: up["now"])
    logger = EpochLogger("sweep-abc-1", "mprl")
    logger.on_trial_result(0, [], _trial(), {"loss": 1.5, "epoch": 0})  # returns at once: nothing is written
    logger.on_trial_result(0, [], _trial(), {"loss": 1.2, "epoch": 1})
    assert store.client.get_metric_history(store.trial, "loss") == [] and len(logger.pending) == 2
    logger = pickle.loads(pickle.dumps(logger))  # Tune saves its callbacks: the queue goes with them
    assert len(logger.pending) == 2
    assert not logger.flush(wait_s=0.01)  # the end of an experiment waits, then says what it could not write
    assert "lsro-n16-paper-kall-s0" in capsys.readouterr().out
    up["now"] = True
    logger.on_trial_result(0, [], _trial(), {"loss": 1.0, "epoch": 2})
    history = store.client.get_metric_history(store.trial, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 1.2), (2, 1.0)] and logger.pending == []


def test_a_trial_that_died_is_marked_failed_with_the_reason(store):
    died = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc")
    EpochLogger("sweep-abc-1", "mprl").on_trial_error(0, [], _trial(died))
    run = store.client.get_run(store.trial)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_ERROR] == ("RuntimeError: The actor died unexpectedly before finishing this "
                                                 "task. (attempts: 2)")


def test_the_trials_own_failure_message_is_kept(store):
    tracking.fail(store.client, store.trial, "ValueError: bad labels")
    EpochLogger("sweep-abc-1", "mprl").on_trial_error(0, [], _trial(RuntimeError("wrapped")))
    assert store.client.get_run(store.trial).data.tags[tracking.TAG_ERROR] == "ValueError: bad labels"


def test_failure_reason_from_a_text_trace():
    trial = SimpleNamespace(num_failures=1, get_pickled_error=lambda: None,
                            get_error=lambda: "Traceback (most recent call last):\n  File x\nray.exceptions."
                                              "OutOfMemoryError: Task was killed due to the node running low")
    assert failure_reason(trial).startswith("ray.exceptions.OutOfMemoryError: Task was killed")


# ------------------------------------------------------------------------------ paths on every node

@pytest.mark.parametrize("uri", ["s3://bucket/mprl", "gs://b/x", "file:///mnt/shared"])
def test_a_storage_uri_is_refused_at_config_time(uri):
    with pytest.raises(ValueError, match=r"cluster.storage_path=.*is a URI.*POSIX files"):
        load_config("smoke", overrides=[f"cluster.storage_path={uri}"])


def test_path_problems_name_the_field_and_path(tmp_path):
    (tmp_path / "file").write_text("x")
    ok = {cluster.STORAGE_FIELD: str(tmp_path), cluster.DATASET_FIELD: str(tmp_path)}
    assert cluster.path_problems(ok) == {}
    bad = cluster.path_problems({cluster.STORAGE_FIELD: str(tmp_path / "file"),
                               cluster.DATASET_FIELD: str(tmp_path / "missing")})
    assert bad == {cluster.STORAGE_FIELD: f"cluster.storage_path={tmp_path / 'file'} is not a folder there",
                   cluster.DATASET_FIELD: f"dataset.root={tmp_path / 'missing'} does not exist there"}
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        assert "is not writable" in cluster.path_problems({cluster.STORAGE_FIELD: str(tmp_path / "ro")})[
            cluster.STORAGE_FIELD]


def test_worker_paths_and_the_message(tmp_path):
    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "dataset.name=market1501",
                                          "dataset.root=/data/market", "reid.pretrained=random"])
    assert cluster.worker_paths(cfg) == {cluster.STORAGE_FIELD: str(tmp_path), cluster.DATASET_FIELD: "/data/market"}
    synthetic = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}"])
    assert "dataset.root" not in cluster.worker_paths(synthetic)
    tested = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "dataset.test_root=[/d/Duke-A, /d/B]",
                                             "labels.pool=folder", "labels.pool_root=/d/pool"])
    got = cluster.worker_paths(tested)  # what every node must read: the test sets and a folder pool too
    assert (got["dataset.test_root[0]"], got["dataset.test_root[1]"], got["labels.pool_root"]) == (
        "/d/Duke-A", "/d/B", "/d/pool")
    assert "labels.pool_root=/d/pool does not exist there" in cluster.path_problems(got)["labels.pool_root"]
    msg = cluster.problems_message({"node 10.0.0.1 (abc)": {},
                                    "node 10.0.0.2 (def)": {"dataset.root": "dataset.root=/d does not exist there"}})
    assert "on node 10.0.0.2 (def): dataset.root=/d does not exist there" in msg and "10.0.0.1" not in msg
    assert cluster.problems_message({"node 10.0.0.1 (abc)": {}}) is None


@pytest.mark.ray
def test_paths_are_checked_from_a_ray_task_on_each_node(tmp_path, local_ray):
    import ray

    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}"])
    alive = [n for n in ray.nodes() if n["Alive"]]
    cluster.check_paths_on_nodes(cfg, alive)
    missing = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, root=str(tmp_path / "head-only")))
    with pytest.raises(ValueError, match=rf"on node {alive[0]['NodeManagerAddress']} .*dataset.root=.*head-only "
                                         r"does not exist there"):
        cluster.check_paths_on_nodes(missing, alive)


def test_trials_retry_more_on_a_cluster_unless_told():
    from orchestrator.config import load_config
    from orchestrator.resources import CLUSTER_RETRIES, trial_retries

    assert trial_retries(load_config("smoke")) == 1  # one machine: a failure is a bug, not a lost node
    assert trial_retries(load_config("smoke", overrides=["cluster.address=auto"])) == CLUSTER_RETRIES == 3
    assert trial_retries(load_config("smoke", overrides=["cluster.address=auto", "sweep.max_failures=0"])) == 0
