"""Ray Tune: the trial function, the Tuner that runs the trial list, and the driver-side MLflow callback.

:func:`run_trial` is what Tune runs per trial: it trains (or reuses the baseline stage), then logs the final
metrics, a CMC plot and the model to the trial's MLflow run. :func:`tune_trials` builds the Tuner: the search
space is only the grid of :class:`~orchestrator.trials.TrialSpec`; the shared :class:`TrialContext` travels with
``tune.with_parameters``.
"""

from __future__ import annotations

import dataclasses
import pickle
import signal
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import ray.tune
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from orchestrator import dag, resources, system_metrics, tracking, trial_actor
from orchestrator.config import Config, flat_dict, replace
from orchestrator.epoch_logger import ALREADY_FINISHED, TAG_STOPPED_AFTER, EpochLogger, failure_reason  # noqa: F401
from orchestrator.groups import group_tags
from orchestrator.plots import plot_cmc
from orchestrator.stage_cache import BaselineOut, read_output, wait_finished
from orchestrator.trials import TrialContext, TrialRow, TrialSpec, cost, input_tags
from trainables.config import PER_QUERY_AP, RANKED_LIST, ReidResult
from trainables.placement import process_label

# ------------------------------------------------------------------------------------ the Tune trial

def run_trial(config: dict, ctx: TrialContext, tracking_uri: str, started: float) -> None:
    """Tune function: train (or reuse the baseline stage), then log final metrics, CMC plot and model.

    ``tracking_uri`` comes from the sweep that runs *or resumes* the trial (Tune's saved state holds no address);
    the trial's run is found by its tags there. A run already FINISHED (its trial ended after Tune last saved
    its state) is reported to Tune again and not retrained. ``started``: ``time.perf_counter()`` when the worker
    began the trial (before the imports its actor's first trial pays, :mod:`orchestrator.trial_actor`).
    """

    mlflow.set_tracking_uri(tracking_uri)  # tracking.log_model logs through the fluent API
    trial = TrialSpec.from_key(config["trial"])
    cfg = replace(ctx.cfg, **trial.overrides())
    client = MlflowClient(tracking_uri)
    run_id = tracking.find_trial(client, cfg.cluster.experiment, ctx.sweep, trial.key)
    if _already_finished(client, run_id):
        return
    tracking.set_status(client, run_id, "RUNNING")
    params = {**flat_dict(cfg), "trial": trial.key}
    tracking.log_params(client, run_id, params)
    for tag, value in group_tags({k: str(v) for k, v in params.items()}).items():  # MLflow's group-by = the report's
        client.set_tag(run_id, tag, value)
    where = _tag_placement(client, run_id)
    try:
        with system_metrics.monitored(run_id, tracking_uri, where):  # CPU, memory, GPU of this node, on the run
            for folder in ctx.needs.get(trial.key, ()):  # a failed input stage fails the trial with its message
                wait_finished(folder)
            if trial.reuses_baseline and trial.seed in ctx.baselines:  # this seed's baseline stage
                result = _reuse_baseline(read_output(ctx.baselines[trial.seed], BaselineOut), client, run_id)
            else:
                result = _train(cfg, ctx, trial)
        _finish(client, run_id, cfg, trial, result, ctx, started)
    except SystemExit as err:
        # Tune stops a function trial (a scheduler's STOP, the end of the sweep, actor reuse) by raising
        # SystemExit(0) inside ray.tune.report; its runner thread takes that as a clean exit. Not a failure:
        # leave the MLflow run alone (the driver's EpochLogger.on_trial_complete records a scheduler's stop; an
        # interrupted sweep leaves the run RUNNING and the driver marks it KILLED).
        if err.code not in (None, 0):
            tracking.fail(client, run_id, f"SystemExit: {err.code}")
        raise
    except BaseException as err:
        if client.get_run(run_id).data.tags.get(tracking.TAG_EARLY_STOPPED) == "true":
            raise  # the scheduler stopped it (the driver recorded that); tearing its Train run down is not a failure
        if isinstance(err, KeyboardInterrupt):
            tracking.set_status(client, run_id, "KILLED")
        else:  # FAILED now; a retry (sweep.max_failures) sets it RUNNING again
            tracking.fail(client, run_id, f"{type(err).__name__}: {err}")
        raise




def _already_finished(client, run_id: str) -> bool:
    """True for a FINISHED run: its final metrics go to Tune again (the table reads them), nothing trains.
    Otherwise an earlier attempt's error is kept as ``mprl.previous_error``, so a retry that succeeds is clean."""

    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        final = {k[len("final_"):]: v for k, v in tracking.fractions(run).items() if k.startswith("final_")}
        ray.tune.report({**final, ALREADY_FINISHED: True})
        return True
    previous = run.data.tags.get(tracking.TAG_ERROR)
    if previous:
        client.set_tag(run_id, "mprl.previous_error", previous)
        client.delete_tag(run_id, tracking.TAG_ERROR)
    return False


def _tag_placement(client, run_id: str) -> str:
    """Where the trial runs (``mprl.where``: node and pid), for the placement checks of the rehearsal; returns the
    node (the system metrics' name for it: ``node <ip> (<id>)``, the same across retries)."""
    where = process_label()
    client.set_tag(run_id, "mprl.where", where)
    return where.split(" pid ")[0]


def _train(cfg: Config, ctx: TrialContext, trial: TrialSpec) -> ReidResult:
    from trainables.reid.loop import run_spec, train_reid

    run = run_spec(cfg.reid, ctx.trials_dir, trial.key, num_workers=resources.train_workers(cfg, "reid"),
                   report_to_tune=True, max_failures=resources.trial_retries(cfg))
    inputs = dataclasses.replace(ctx.inputs, smprl_labels=ctx.smprl_labels.get(trial.seed),
                                 test_roots=cfg.dataset.test_root)  # the cross-domain test sets
    if trial.pool is not None:  # a trial on one of sweep.pools reads that pool's store
        inputs = dataclasses.replace(inputs, store_root=ctx.stores[trial.pool], smprl_labels=None)
    return train_reid(cfg.reid, cfg.labels, inputs, run)


def _reuse_baseline(baseline: BaselineOut, client, run_id: str) -> ReidResult:

    client.set_tag(run_id, "mprl.reused_stage", baseline.run_dir)
    result = baseline.result
    ray.tune.report({**result.metrics(), "epoch": result.epoch})
    return result


def _finish(client, run_id: str, cfg: Config, trial: TrialSpec, result: ReidResult, ctx: TrialContext,
            start: float) -> None:

    tracking.log_metrics(client, run_id, {f"final_{k}": v for k, v in result.metrics().items()})
    tracking.log_params(client, run_id, {"data.num_train": result.num_train, "data.num_classes": result.num_classes})
    pool = ctx.pool_links.get(trial.pool, {}) if trial.pool is not None else {}
    run_dir = _run_dir(ctx, trial)
    inputs = input_tags(run_dir, ctx.inputs.data_root, cfg.dataset.test_root)  # what orchestrator.export reads
    for tag, value in {**ctx.links, **ctx.seed_links.get(trial.seed, {}), **pool, **inputs}.items():
        client.set_tag(run_id, tag, value)
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_cmc({trial.key: result.cmc}, Path(tmp) / "cmc.png", title=trial.key)
        tracking.log_artifacts(client, run_id, [png, run_dir / RANKED_LIST], "plots")
    tracking.log_artifacts(client, run_id, [run_dir / PER_QUERY_AP], "evaluation")  # the final test's, per query
    if ctx.log_models:
        _log_model(client, run_id, cfg, run_dir)
    # the trial's whole time in its worker (imports, training, evaluation, logging): what the rehearsal counts as
    # compute
    tracking.log_metrics(client, run_id, {WORKER_SECONDS: round(time.perf_counter() - start, 2)})
    tracking.set_status(client, run_id, "FINISHED")


def _run_dir(ctx: TrialContext, trial: TrialSpec) -> Path:
    """The folder of the run that trained the trial's final model: its own, or its seed's baseline stage's."""
    run_dir = Path(ctx.trials_dir) / trial.key
    if not run_dir.exists() and trial.seed in ctx.baselines:
        run_dir = Path(read_output(ctx.baselines[trial.seed], BaselineOut).run_dir)
    return run_dir


def _log_model(client, run_id: str, cfg: Config, run_dir: Path) -> None:

    from trainables.reid.loop import load_trained

    try:
        model, _ = load_trained(run_dir)
    except FileNotFoundError:
        return
    h, w = cfg.reid.image_size
    uri = tracking.log_model(run_id, model, np.zeros((1, 3, h, w), dtype=np.float32))
    client.set_tag(run_id, "mprl.model_uri", uri)


# ------------------------------------------------------------------------------------ the Tuner

def tune_trials(cfg: Config, trials: list[TrialSpec], ctx: TrialContext, experiment: Path, resume: bool,
                tracking_uri: str) -> list[TrialRow]:
    """Run the trials on Ray Tune (or resume the interrupted ``experiment``); one result row per trial.

    The stages of the sweep's :class:`~orchestrator.dag.StageGraph` (registered under ``experiment.name``) run
    meanwhile; :class:`ReadySearcher` hands Tune each trial once its inputs exist.
    """


    # the trainable, with its parameters, is built anew by every run and resume (Tuner.restore takes it again)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_actor.run_trial, ctx=pickle.dumps(ctx), tracking_uri=tracking_uri),
        resources.trial_resources(cfg))
    if resume and ray.tune.Tuner.can_restore(str(experiment)):
        print(f"[sweep] resuming {experiment}", flush=True)
        tuner = apply_runtime(ray.tune.Tuner.restore(str(experiment), trainable, resume_errored=True), cfg)
    else:
        searcher = ReadySearcher(experiment.name, trials, {t.key: ctx.needs.get(t.key, ()) for t in trials})
        tuner = ray.tune.Tuner(trainable, tune_config=_tune_config(cfg, searcher, len(trials)),
                               run_config=ray.tune.RunConfig(
                                   name=experiment.name, storage_path=str(experiment.parent), verbose=1,
                                   failure_config=ray.tune.FailureConfig(max_failures=resources.trial_retries(cfg)),
                                   # in-process trials report a manifest per finished checkpoint (the run folder
                                   # keeps the state, trainables/checkpoints.py): the latest restores a retry
                                   checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1),
                                   callbacks=[EpochLogger(ctx.sweep, cfg.cluster.experiment)]))
    grid = tuner.fit()  # a first SIGINT makes Tune stop gracefully and return; the MLflow status tells
    return results_rows(grid, trials)


def apply_runtime(tuner, cfg: Config):
    """A restored Tuner with this run's runtime limits (``sweep.max_concurrent``, ``sweep.max_failures``): Ray 2.60's
    ``Tuner.restore`` keeps the saved ones, so a resume that changed them (which ``--resume`` accepts) would not
    apply them. Sets TunerInternal's ``_tune_config`` / ``_run_config`` (private; Ray is pinned to 2.60.x and a test
    checks that they exist)."""
    internal = tuner._local_tuner
    internal._tune_config.max_concurrent_trials = resources.max_concurrent(cfg)
    internal._run_config.failure_config = ray.tune.FailureConfig(max_failures=resources.trial_retries(cfg))
    return tuner


def _tune_config(cfg: Config, searcher: Searcher, num_samples: int):

    scheduler = None
    if cfg.sweep.asha:  # epochs without validation carry no metric; ASHA decides at the ones that do
        # stop_last_trials=False: a trial that survives every rung ends by itself after its last epoch, so
        # run_trial logs its final (test) metrics and model (True would STOP it inside its last report)
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=cfg.sweep.asha_metric,
                                  mode=cfg.sweep.asha_mode, max_t=cfg.reid.epochs,
                                  grace_period=max(1, cfg.reid.eval_every), stop_last_trials=False)
    # Reusing an actor needs the previous trial's thread to end within 2 s of reset_config: an in-process trial
    # does (SystemExit in ray.tune.report), one blocked in TorchTrainer.fit does not, and a failed reset leaves
    # Tune waiting forever (Ray 2.60). A stopped Train-driving trial's actor is torn down, ending its Train run.
    return ray.tune.TuneConfig(scheduler=scheduler, search_alg=searcher, num_samples=num_samples,
                               reuse_actors=resources.runs_in_process(cfg),
                               max_concurrent_trials=resources.max_concurrent(cfg), trial_name_creator=trial_name,
                               trial_dirname_creator=trial_name)


def trial_name(trial) -> str:
    """Tune's name for a trial: method, #GAN, order, keep and seed (``lsro-n480-paper-kall-s0``)."""
    return trial.config["trial"]


class ReadySearcher(Searcher):
    """Suggests each trial once, as soon as the stages it reads have finished, longest first.

    Holds only trial keys and stage folders (it is pickled with the experiment); the live stage graph is looked
    up by sweep name. A trial whose input stage failed is still suggested: it fails at once with that stage's
    message, so the sweep's table and MLflow say why.
    """

    def __init__(self, sweep: str, trials: list[TrialSpec], needs: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.sweep, self.needs = sweep, needs
        self.pending = [t.key for t in sorted(trials, key=cost, reverse=True)]  # stable: ties keep grid order
        self._armed = False  # Tune's SIGINT handler was seen (see _interrupted)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the trial list is the search space; ASHA reads its own metric

    def suggest(self, trial_id: str) -> dict | str | None:

        if not self.pending:
            return Searcher.FINISHED
        graph = dag.active(self.sweep)
        graph.poll()
        for key in self.pending:
            if all(graph.finished(Path(folder).name) for folder in self.needs[key]):
                self.pending.remove(key)
                return {"trial": key}
        if self._interrupted():
            raise KeyboardInterrupt("sweep interrupted while its trials waited for their input stages")
        return None  # Tune asks again on its next step

    def _interrupted(self) -> bool:
        """True after Ctrl+C / SIGTERM. With nothing running, Tune waits for the next trial in a loop (up to 600 s)
        that does not check its own interrupt flag; its SIGINT handler restores the previous one when it fires."""
        if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "signal_interrupt_tune_run":
            self._armed = True
            return False
        return getattr(self, "_armed", False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_armed": False}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"pending": self.pending}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.pending = pickle.load(f)["pending"]


WORKER_SECONDS = "worker_seconds"  # a metric of each finished trial run: its whole time in the worker


def results_rows(grid, trials: list[TrialSpec]) -> list[TrialRow]:
    """One row per trial, in trial order: its settings, final metrics and error ("not run" if it never started)."""
    by_key = {}
    for res in grid:
        if not res.config:  # a trial that never started (interrupted sweep)
            continue
        t, m = TrialSpec.from_key(res.config["trial"]), res.metrics or {}
        error = None if res.error is None else f"{type(res.error).__name__}: {res.error}"[:200]
        by_key[t.key] = TrialRow(t, m.get("rank1"), m.get("rank5"), m.get("rank10"), m.get("mAP"),
                                 seconds=m.get("time_total_s"), error=error)
    return [by_key.get(t.key, TrialRow(t, error="not run")) for t in trials]
