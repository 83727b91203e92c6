"""The driver's Tune callback that writes each trial's epochs and end to its MLflow run, and survives a tracking
server that is restarting or unreachable for a while.

Every event (an epoch's metrics, a trial stopped by the scheduler, a trial that failed for good) is queued and
written in order. When the server does not answer (``tracking.reachable``: its ``/health`` within 2 s), the
queue is kept and the callback returns at once: Tune's loop, and with it every trial's next ``report``, never
waits on MLflow. The next event, or the end of the experiment, writes what was queued; the end waits for the
server for up to :data:`FLUSH_WAIT_S` and then says, naming the trials, what could not be written. Trials'
own calls (their start and end) and the driver's other calls ride on the MLflow client's HTTP retries, which the
sweep lengthens (``tracking.RETRY_ENV``). Each trial's end also prints the sweep's progress line with its ETA
(:mod:`orchestrator.progress`).
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from orchestrator import progress, tracking
from orchestrator.trials import EPOCH_METRICS

ALREADY_FINISHED = "mprl_already_finished"  # in the Tune result of a trial whose MLflow run was FINISHED
CHECKPOINT_METRICS = ("checkpoint_mb", "checkpoint_write_s", "checkpoint_stall_s")  # at the epochs that wrote one
TAG_STOPPED_AFTER = tracking.TAG_STOPPED_AFTER  # on trials a scheduler (ASHA) stopped early
FLUSH_WAIT_S = 900.0  # how long the end of an experiment waits for an unreachable tracking server


class EpochLogger(Callback):
    """Driver-side Tune callback: every reported epoch goes to the trial's MLflow run as a step; a trial the
    scheduler stops early is marked FINISHED with ``mprl.early_stopped=true`` (and no ``final_*`` metrics); a trial
    that errored for good (its retries spent; a dead worker, node or OOM kill included) is marked FAILED with
    the reason, unless the trial recorded its own.

    Tune pickles its callbacks with the experiment and reuses them on ``Tuner.restore``, so this holds only the
    sweep's and the experiment's names (and the queue of unwritten events, which name trials by key): runs are
    found by tags in the driver's current MLflow store (``mlflow.get_tracking_uri()``, which the sweep sets), the
    new one after a resume with another URI.
    """

    def __init__(self, sweep: str, experiment: str) -> None:
        self.sweep, self.experiment = sweep, experiment
        self._client, self._runs = None, {}
        self.pending: list[tuple[str, str, Any]] = []  # (event, trial key, data), oldest first

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_runs": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"pending": [], **state})

    def _run(self, key: str) -> tuple[Any, str]:
        uri = mlflow.get_tracking_uri()
        if self._client is None or self._client.tracking_uri != uri:
            self._client, self._runs = MlflowClient(uri), {}
        if key not in self._runs:
            self._runs[key] = tracking.find_trial(self._client, self.experiment, self.sweep, key)
        return self._client, self._runs[key]

    # ---------------------------------------------------------------------------------- Tune's hooks

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(ALREADY_FINISHED):
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        logged = {k: result[k] for k in (*EPOCH_METRICS, *CHECKPOINT_METRICS) if k in result}
        self._queue("epoch", trial, (logged, step))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        """Called on the driver when a trial ends without error, before its actor stops: run_trial returned (its
        run is FINISHED already) or the scheduler stopped it while training (its run is still RUNNING). An
        interrupted sweep does not come here."""
        last = trial.last_result or {}
        self._queue("complete", trial, int(last.get("epoch", -1)) + 1)
        # a trial found FINISHED (a resumed sweep) adds no time to the ETA: it did not train now
        progress.trial_ended(self.sweep, trial.config["trial"],
                             None if last.get(ALREADY_FINISHED) else last.get("time_total_s"))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        """The trial failed and Tune will not retry it: its run ends FAILED, with the trial's own message when
        run_trial recorded one, else with what Tune saw (a dead actor: node lost, OOM kill, ``os._exit``)."""
        self._queue("error", trial, failure_reason(trial))
        progress.trial_ended(self.sweep, trial.config["trial"], None)

    def on_experiment_end(self, trials, **info) -> None:
        self.flush(wait_s=FLUSH_WAIT_S)

    # ---------------------------------------------------------------------------------- the queue

    def _queue(self, event: str, trial, data: Any) -> None:
        self.pending.append((event, trial.config["trial"], data))
        self.flush()

    def flush(self, wait_s: float = 0.0) -> bool:
        """Write the queued events in order while the server answers; with ``wait_s``, keep trying that long.
        True when nothing is left. An error other than an unreachable server is raised (a wrong store, say)."""
        deadline = time.monotonic() + wait_s
        while self.pending:
            if not tracking.reachable(mlflow.get_tracking_uri()):
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                continue
            event, key, data = self.pending[0]
            try:
                self._write(event, key, data)
            except Exception:
                if tracking.reachable(mlflow.get_tracking_uri()):
                    raise
                continue  # it went away mid-call: the event stays first in the queue
            self.pending.pop(0)
        if self.pending and wait_s:
            keys = sorted({k for _, k, _ in self.pending})
            print(f"[mlflow] the tracking server {mlflow.get_tracking_uri()} did not answer for {wait_s:.0f} s: "
                  f"{len(self.pending)} epoch/end records of {', '.join(keys)} were not written", flush=True)
        return not self.pending

    def _write(self, event: str, key: str, data: Any) -> None:
        client, run_id = self._run(key)
        if event == "epoch":
            logged, step = data
            tracking.log_metrics(client, run_id, logged, step=step)
        elif event == "complete":
            if client.get_run(run_id).info.status != "RUNNING":
                return
            client.set_tag(run_id, tracking.TAG_EARLY_STOPPED, "true")
            client.set_tag(run_id, TAG_STOPPED_AFTER, str(data))
            tracking.set_status(client, run_id, "FINISHED")
        elif event == "error":
            run = client.get_run(run_id)
            if run.info.status == "FINISHED" or (run.info.status == "FAILED" and tracking.TAG_ERROR in run.data.tags):
                return
            tracking.fail(client, run_id, data)


def failure_reason(trial) -> str:
    """One line for the table: the exception type and its first line, and how many attempts were made."""
    err = trial.get_pickled_error() or trial.get_error() or "unknown error"
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = next((line for line in lines if "Error" in line or "died" in line), lines[0] if lines else "unknown")
    return f"{first[:400]} (attempts: {trial.num_failures})"
