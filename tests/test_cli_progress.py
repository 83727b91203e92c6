"""The sweep's progress line (orchestrator/progress.py): the ETA arithmetic, and the line Tune's callback prints
when a trial ends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator import progress, tracking
from orchestrator.epoch_logger import ALREADY_FINISHED, EpochLogger


def test_eta_spreads_the_remaining_trials_over_the_concurrency():
    assert progress.eta_seconds(done=2, total=10, mean_s=600.0, concurrency=4) == 8 * 600 / 4
    assert progress.eta_seconds(done=8, total=10, mean_s=600.0, concurrency=4) == 600.0  # 2 left run side by side
    assert progress.eta_seconds(done=3, total=4, mean_s=90.0, concurrency=1) == 90.0
    assert progress.eta_seconds(done=0, total=4, mean_s=None, concurrency=2) is None  # no trial has ended yet
    assert progress.eta_seconds(done=4, total=4, mean_s=None, concurrency=2) == 0.0
    assert progress.eta_seconds(done=1, total=3, mean_s=60.0, concurrency=0) == 120.0  # 0 counts as 1


def test_clock_is_hours_and_minutes():
    seconds = (0, 20, 60, 61, 3599, 3600, 5 * 3600 + 7 * 60)
    assert [progress.clock(s, up=True) for s in seconds] == ["0:00", "0:01", "0:01", "0:02", "1:00", "1:00", "5:07"]
    assert [progress.clock(s) for s in seconds] == ["0:00", "0:00", "0:01", "0:01", "0:59", "1:00", "5:07"]


def test_the_line_says_unknown_until_a_trial_has_a_time():
    p = progress.Progress(total=6, concurrency=2, started=100.0)
    assert p.line(now=170.0) == "[sweep] 0/6 trials done, elapsed 0:01, ETA unknown"
    p.done |= {"a", "b"}
    p.seconds += [1200.0, 600.0]
    assert p.line(now=100.0 + 1800) == "[sweep] 2/6 trials done, elapsed 0:30, ETA ~0:30"  # 4 x 900 s / 2


def test_trial_ended_counts_each_trial_once_and_times_only_the_trained(capsys):
    progress.start("sweep-eta-1", total=3, concurrency=1, done={"done-before"})
    try:
        assert progress.trial_ended("sweep-eta-1", "a", None).endswith("2/3 trials done, elapsed 0:00, ETA unknown")
        line = progress.trial_ended("sweep-eta-1", "b", 120.0)
        assert line.endswith("3/3 trials done, elapsed 0:00, ETA ~0:00")
        assert progress.trial_ended("sweep-eta-1", "b", 999.0).startswith("[sweep] 3/3")  # again: no double count
        assert progress._SWEEPS["sweep-eta-1"].seconds == [120.0]
        assert capsys.readouterr().out.count("[sweep] ") == 3
    finally:
        progress.stop("sweep-eta-1")
    assert progress.trial_ended("sweep-eta-1", "c", 1.0) is None  # not a registered sweep: silent


@pytest.fixture
def store(tmp_path):
    """A sweep's parent run and three trial runs in a sqlite store, created the way the sweep creates them."""
    import mlflow

    uri = tracking.default_tracking_uri(tmp_path)
    client, exp_id = tracking.setup(uri, "mprl", tmp_path)
    parent, _ = tracking.get_or_create_run(client, exp_id, "sweep", "sweep-eta-2", "sweep-eta-2")
    run = tracking.SweepRun(client, exp_id, "sweep-eta-2", parent, uri)
    for key in ("lsro-n16-paper-kall-s0", "lsro-n16-paper-kall-s1", "lsro-n16-paper-kall-s2"):
        run.child("trial", tracking.trial_key("sweep-eta-2", key), key, status="RUNNING")
    yield client
    mlflow.set_tracking_uri(None)


def _trial(key: str, result: dict) -> SimpleNamespace:
    return SimpleNamespace(config={"trial": key}, last_result=result, num_failures=0,
                           get_pickled_error=lambda: RuntimeError("boom"), get_error=lambda: None)


def test_the_callback_prints_progress_as_trials_end(store, capsys):
    progress.start("sweep-eta-2", total=3, concurrency=2)
    logger = EpochLogger("sweep-eta-2", "mprl")
    try:
        logger.on_trial_complete(0, [], _trial("lsro-n16-paper-kall-s0", {"epoch": 1, "time_total_s": 3000.0}))
        logger.on_trial_error(0, [], _trial("lsro-n16-paper-kall-s1", {}))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep]")]
        # 2 left after the first, side by side: 50 min; the failed one counts as done and adds no time
        assert lines[0].startswith("[sweep] 1/3 trials done") and lines[0].endswith("ETA ~0:50")
        assert lines[1].startswith("[sweep] 2/3 trials done") and lines[1].endswith("ETA ~0:50")
        # a trial a resumed sweep found FINISHED: done, no time (it did not train now)
        logger.on_trial_complete(0, [], _trial("lsro-n16-paper-kall-s2", {ALREADY_FINISHED: True, "time_total_s": 1}))
        assert capsys.readouterr().out.strip().endswith("3/3 trials done, elapsed 0:00, ETA ~0:00")
        assert progress._SWEEPS["sweep-eta-2"].seconds == [3000.0]
    finally:
        progress.stop("sweep-eta-2")
    assert store.search_runs([store.get_experiment_by_name("mprl").experiment_id],
                             "attributes.status = 'FAILED'")[0].data.tags[tracking.TAG_ERROR].startswith("RuntimeError")
