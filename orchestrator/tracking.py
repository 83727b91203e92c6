"""MLflow bookkeeping: one parent run per sweep, a child run per stage and per trial.

The driver creates every child run up front (status SCHEDULED, tagged with a deterministic key), so a resumed
sweep finds its runs again instead of duplicating them, and an interrupted one can mark what was left as KILLED.
MLflow 3 refuses the plain file store, so the local default is ``sqlite:///<storage>/mlflow.db`` with an
absolute artifact root (Ray changes the working directory of trials).
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator.provenance import run_tags

TAG_KIND = "mprl.kind"  # sweep | stage | trial
TAG_KEY = "mprl.key"  # sweep instance / stage key / trial key
TAG_PARENT = "mlflow.parentRunId"
TAG_ERROR = "mprl.error"  # why a stage or trial run FAILED
TAG_EARLY_STOPPED = "mprl.early_stopped"  # "true" on a trial a scheduler (ASHA) stopped early
TAG_STOPPED_AFTER = "mprl.stopped_after_epochs"  # the epochs it trained before that
# The unit of a run's ranking metrics (rank1/5/10, mAP, mINP under any prefix: final_, val_, bnr_, rr_, xd_<name>_):
# "percent" on every run this version creates (the unit the CLI tables and the paper print); a run without the tag
# was logged by an older version in fractions.
TAG_UNIT = "mprl.metric_unit"
PERCENT = "percent"
MAX_PARAM = 6000  # MLflow's limit on a param value's length
# The MLflow client's HTTP retries, in the sweep's driver and workers (a value the user exported wins): 10 retries
# with backoff factor 2 sleep 0, 4, 8, ..., 120 s (urllib3 caps a sleep at 120 s), about 10 minutes in all, so a
# call made while the tracking server restarts waits for it instead of failing the trial or the sweep. 10 is
# MLflow's own ceiling (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT).
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}


@dataclass(frozen=True)
class SweepRun:
    """The MLflow handles of one sweep: the client, its experiment, the sweep's name and parent run."""

    client: MlflowClient
    exp_id: str
    name: str
    parent: str
    tracking_uri: str

    def child(self, kind: str, key: str, name: str, *, tags: dict[str, str] | None = None,
              status: str = "RUNNING") -> tuple[str, bool]:
        """(run id, created?) of the sweep's child run tagged (kind, key); created with ``status`` if missing."""
        found = find_run(self.client, self.exp_id, kind, key, self.parent)
        if found:
            return found, False
        return _create_run(self.client, self.exp_id, name, {TAG_KIND: kind, TAG_KEY: key, TAG_PARENT: self.parent,
                                                             **(tags or {})}, status), True


def default_tracking_uri(storage: str | Path) -> str:
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def setup(tracking_uri: str, experiment: str, storage: str | Path) -> tuple[MlflowClient, str]:
    """Point MLflow at ``tracking_uri`` and return (client, experiment id), creating the experiment if needed."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return client, exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        location = (Path(storage).resolve() / "mlartifacts").as_uri()
    return client, client.create_experiment(experiment, artifact_location=location)


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds, naming the URI, when an HTTP tracking server does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return

    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).read()
    except Exception as err:
        raise ConnectionError(f"MLflow tracking server {tracking_uri} is not reachable ({err}); start it or "
                              f"pass another --tracking-uri") from None


def reachable(tracking_uri: str, timeout_s: float = 2.0) -> bool:
    """Whether the tracking store answers now: an HTTP server's ``/health`` within ``timeout_s`` (a local store
    always does). Asked before a call that must not block (``epoch_logger``)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).read()
        return True
    except Exception:
        return False


def find_run(client: MlflowClient, exp_id: str, kind: str, key: str, parent: str | None = None) -> str | None:
    filt = f"tags.`{TAG_KIND}` = '{kind}' and tags.`{TAG_KEY}` = '{key}'"
    if parent:
        filt += f" and tags.`{TAG_PARENT}` = '{parent}'"
    runs = client.search_runs([exp_id], filt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def trial_key(sweep: str, trial: str) -> str:
    """The ``mprl.key`` tag of a trial's run: the sweep's name and the trial's key, nothing address-like."""
    return f"{sweep}/{trial}"


def find_trial(client: MlflowClient, experiment: str, sweep: str, trial: str) -> str:
    """The run id of ``trial`` of ``sweep``, looked up by its tags in the experiment named ``experiment``.

    Trials and the driver's Tune callback find their runs this way, in whatever store the running (or resuming)
    sweep points at, so nothing in Tune's saved state names a run id or a tracking URI.
    """
    exp = client.get_experiment_by_name(experiment)
    found = exp and find_run(client, exp.experiment_id, "trial", trial_key(sweep, trial))
    if not found:
        raise LookupError(f"no MLflow run tagged {TAG_KEY}={trial_key(sweep, trial)!r} in experiment {experiment!r} "
                          f"at {client.tracking_uri}; the sweep creates it before its trials start")
    return found


def fail(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run FAILED with ``mprl.error`` = the reason (the table and the report show it)."""
    client.set_tag(run_id, TAG_ERROR, reason[:5000])
    set_status(client, run_id, "FAILED")


def get_or_create_run(client: MlflowClient, exp_id: str, kind: str, key: str, name: str) -> tuple[str, bool]:
    """(run id, created?) for the top-level run tagged (kind, key) (a sweep, a report); see SweepRun.child."""
    found = find_run(client, exp_id, kind, key)
    if found:
        return found, False
    return _create_run(client, exp_id, name, {TAG_KIND: kind, TAG_KEY: key}, "RUNNING"), True


def _create_run(client: MlflowClient, exp_id: str, name: str, tags: dict[str, str], status: str) -> str:
    """The one place runs are made: each carries the provenance tags (git commit, dirty flag, user, host, package
    versions: :func:`orchestrator.provenance.run_tags`) and its metrics' unit."""
    run = client.create_run(exp_id, run_name=name, tags={**run_tags(), TAG_UNIT: PERCENT, **tags})
    if status != "RUNNING":
        client.update_run(run.info.run_id, status=status)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params, skipping keys already logged (MLflow refuses to change a param's value)."""
    have = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


def is_ranking_metric(name: str) -> bool:
    """True for rank1/5/10, mAP, mINP under any prefix (final_, val_, bnr_, rr_, xd_<name>_): the metrics the
    code keeps as fractions and MLflow holds in percent (``TAG_UNIT``)."""
    return RANKING.fullmatch(name) is not None


RANKING = re.compile(r"(final_|val_)?(bnr_|xd_[a-z0-9]+_)?(rr_)?(rank1|rank5|rank10|mAP|mINP)")


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric values of ``metrics``; the ranking metrics (fractions in the code) in percent, the unit the
    CLI tables and the paper print, so MLflow's columns and charts read the same numbers."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v) * (100.0 if is_ranking_metric(k) else 1.0), now, step or 0)
             for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if items:
        client.log_batch(run_id, metrics=items)


def fractions(run) -> dict[str, float]:
    """A run's metrics with its ranking metrics as fractions again, whatever unit it was logged in."""
    scale = 0.01 if run.data.tags.get(TAG_UNIT) == PERCENT else 1.0
    return {k: v * scale if is_ranking_metric(k) else v for k, v in run.data.metrics.items()}


def set_status(client: MlflowClient, run_id: str, status: str) -> None:
    if status in ("FINISHED", "FAILED", "KILLED"):
        client.set_terminated(run_id, status=status)
    else:
        client.update_run(run_id, status=status)


def end_unfinished(client: MlflowClient, exp_id: str, parent: str, status: str = "KILLED") -> int:
    """Mark the parent's children that are still RUNNING/SCHEDULED as ``status``; returns how many."""
    runs = client.search_runs([exp_id], f"tags.`{TAG_PARENT}` = '{parent}'", max_results=5000)
    n = 0
    for r in runs:
        if r.info.status in ("RUNNING", "SCHEDULED"):
            set_status(client, r.info.run_id, status)
            n += 1
    return n


def log_model(run_id: str, model, input_example) -> str:
    """Log a torch model so that ``mlflow.pytorch.load_model`` returns it (pickle format: fast, no export)."""
    import mlflow.pytorch

    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                        serialization_format="pickle",
                                        pip_requirements=["torch", "torchvision"])
    return info.model_uri


def log_artifacts(client: MlflowClient, run_id: str, paths: Iterable[Path], folder: str | None = None) -> None:
    for p in paths:
        if Path(p).is_file():
            client.log_artifact(run_id, str(p), artifact_path=folder)
