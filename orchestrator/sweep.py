"""``python -m orchestrator.sweep``: the whole experiment in one command.

dataset -> DCGAN -> generation -> baseline -> sMpRL labels (each cached) -> a Ray Tune sweep of re-ID trials
-> a results table, with everything in MLflow. With no arguments: the ``cpu`` preset on the synthetic dataset,
on a local Ray instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import stage_cache
from orchestrator.config import PRESETS, Config, choices_help, dump_yaml, flat_dict, load_config
from orchestrator.tables import format_table, pct
from orchestrator.trials import TrialContext, TrialRow, TrialSpec, build_trials
from trainables.config import ReidInputs
from trainables.logs import configure_logging

if TYPE_CHECKING:  # the modules that import Ray or MLflow load where they are used: --help stays instant
    from orchestrator import dag, stages, tracking


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    parent_run_id: str
    rows: list[TrialRow]
    stages: stage_cache.Stages
    tracking_uri: str
    seconds: float
    driver_cpu_seconds: float = 0.0  # CPU time of the driver process itself (planning, Tune, MLflow calls)
    stage_finished_at: dict[str, float] | None = None  # stage name -> seconds after the graph started
    critical_path_seconds: float = 0.0  # first stage submitted -> every stage and trial finished


def run_sweep(cfg: Config, *, resume: bool = False, log_models: bool = True) -> SweepOutcome:
    """Check inputs, then run the stage DAG and the trials on Ray (the driver only plans, schedules and tracks)."""
    from orchestrator import cluster, dag, launch_watch, resources, stages, sweep_record, tracking
    from orchestrator.config_checks import check_sweep_switch
    from orchestrator.sweep_plan import stage_needs

    start, cpu_start = time.perf_counter(), time.process_time()
    _sigterm_as_sigint()
    paths = stage_cache.Paths(Path(cfg.cluster.storage_path))
    uri = cfg.cluster.tracking_uri or tracking.default_tracking_uri(paths.storage)
    check_sweep_switch(cfg)  # a switched method whose switch epoch is past the last epoch
    named = sweep_record.resolve(cfg, paths.tune, resume)  # --resume of other settings is refused here, Ray not up
    tracking.check_reachable(uri)
    cluster.check_address(cfg.cluster.address)  # a dead address fails in seconds, not after ray.init retries
    stages.check_dataset(cfg.dataset)  # a bad dataset path or layout fails here, before Ray starts
    stages.check_pools(cfg, max(cfg.sweep.num_gan))  # and a folder pool that is missing or holds too few images
    cluster.connect(cfg)
    paths.storage.mkdir(parents=True, exist_ok=True)
    cluster.preflight(cfg)  # multi-node: shared storage, an MLflow server, every path usable on every node
    resources.check_resources(cfg)
    client, exp_id = tracking.setup(uri, cfg.cluster.experiment, paths.storage)
    name = named.name
    if named.note:
        print(f"[sweep] {named.note}", flush=True)
    for change in named.runtime_changes:
        print(f"[sweep] resuming {name} with {change}", flush=True)
    sweep_record.write_record(paths.tune, name, cfg)  # what a later --resume compares with
    parent, _ = tracking.get_or_create_run(client, exp_id, "sweep", name, name)
    run = tracking.SweepRun(client, exp_id, name, parent, uri)
    tracking.set_status(client, parent, "RUNNING")
    tracking.log_params(client, parent, flat_dict(cfg))
    client.log_text(parent, dump_yaml(cfg), "config.yaml")
    graph = watcher = None
    try:
        trials = build_trials(cfg)
        cluster.request_capacity(cfg, len(trials))  # GPU nodes boot together, not one stage at a time
        watcher = launch_watch.watch(cfg)  # says why no worker joins, and stops a launch that cannot work
        plan = stages.plan_stages(cfg, paths, *stage_needs(trials))
        graph = dag.StageGraph(plan, paths, name, on_done=lambda *a: _log_stage(run, paths, *a))
        graph.start()
        rows = _run_trials(cfg, trials, plan, run, resume=resume, log_models=log_models)
        graph.wait()
        critical = time.perf_counter() - graph.started  # first stage submitted -> last stage and trial done
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_unfinished(client, exp_id, parent, status)
        tracking.set_status(client, parent, status)
        raise
    finally:
        if watcher is not None:
            watcher.close()
        cluster.release_capacity()
        if graph is not None:
            graph.close()
    _summarise(run, rows)
    if log_models:
        _register(run, cfg.cluster.experiment)
    tracking.end_unfinished(client, exp_id, parent, "KILLED")
    tracking.set_status(client, parent, "FINISHED")
    sweep_record.write_record(paths.tune, name, cfg, finished=True)
    return SweepOutcome(name, parent, rows, _stages(plan, graph), uri, time.perf_counter() - start,
                        round(time.process_time() - cpu_start, 1), dict(graph.finished_at), round(critical, 1))


def _sigterm_as_sigint() -> None:
    """SIGTERM (a scheduler, ``kill``) stops the sweep the way Ctrl+C does: gracefully, state saved."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


# ------------------------------------------------------------------------------------------ stages

def _stages(plan: stages.Plan, graph: dag.StageGraph) -> stage_cache.Stages:
    """What the stages produced (a stage that failed is absent)."""
    got = graph.results.get
    return stage_cache.Stages(got(plan.dataset), plan.gan and got(plan.gan), plan.generate and got(plan.generate),
                           {s: got(n) for s, n in plan.baselines.items() if got(n)},
                           {s: got(n) for s, n in plan.smprl.items() if got(n)},
                           tuple(got(n) for n in (plan.decoded, plan.decoded_gen) if n and got(n)),
                           plan.pool_quality and got(plan.pool_quality),
                           tuple(got(n) for p in plan.pools.values() for n in (p.writer, p.decoded_gen, p.quality)
                                 if n and got(n)))


def _log_stage(run: tracking.SweepRun, paths: stage_cache.Paths, node: stages.StageNode,
               stage: stage_cache.StageResult | None, error: str | None) -> None:
    """A stage's MLflow child run (once per stage key): its output, seconds and where it ran, or its error."""
    from orchestrator import tracking

    folder = paths.stages / node.name
    run_id, created = run.child("stage", f"{node.stage}:{node.key}", f"stage:{node.stage}",
                                tags={"mprl.cached": str(bool(stage and stage.cached)).lower(),
                                      "mprl.stage_path": str(folder)})
    if stage is None:
        tracking.fail(run.client, run_id, error)
        return
    if created or run.client.get_run(run_id).info.status != "FINISHED":
        fields = vars(stage.out)
        tracking.log_params(run.client, run_id, {k: v for k, v in fields.items()
                                                 if not (isinstance(v, tuple) or dataclasses.is_dataclass(v))})
        result = fields.get("result")  # a baseline's final test metrics and counts
        scalars = {**{k: v for k, v in dataclasses.asdict(result).items() if isinstance(v, (int, float))},
                   **result.metrics()} if result else {}
        scalars.update(stage.out.metrics() if hasattr(stage.out, "metrics") else {})  # e.g. the pool's quality
        tracking.log_metrics(run.client, run_id, {**scalars, "seconds": stage.seconds,
                                                  "cpu_seconds": stage.cpu_seconds})
        if stage.where:
            run.client.set_tag(run_id, "mprl.where", stage.where)
        files = sorted(folder.glob(node.artifacts))[-1:] if node.artifacts else []
        tracking.log_artifacts(run.client, run_id, files, "samples")
        tracking.set_status(run.client, run_id, "FINISHED")
    where = f" in {stage.seconds:.0f} s on {stage.where}" if stage.where else ""
    print(f"[pipeline] {node.name}: {'cached' if stage.cached else 'built' + where}", flush=True)


# ------------------------------------------------------------------------------------------ trials

def _links(*names: str | None) -> dict[str, str]:
    """MLflow tags naming the stage outputs a trial used (``mprl.<stage>_stage``: the stage folder's name)."""
    return {f"mprl.{n.split('-', 1)[0]}_stage": n for n in names if n is not None}


def _run_trials(cfg: Config, trials: list[TrialSpec], plan: stages.Plan, run: tracking.SweepRun, *,
                resume: bool, log_models: bool) -> list[TrialRow]:
    """Create every trial's MLflow run up front, run the trials, and read their final status back."""
    from orchestrator import progress, resources, tracking
    from orchestrator.tuning import tune_trials

    paths, name = stage_cache.Paths(Path(cfg.cluster.storage_path)), run.name
    run_ids = {t.key: run.child("trial", tracking.trial_key(name, t.key), t.key, status="SCHEDULED",
                                tags={"mprl.method": t.method})[0] for t in trials}
    finished = {r.info.run_id for r in run.client.search_runs(  # by an earlier run of this sweep (--resume)
        [run.exp_id], f"tags.`{tracking.TAG_PARENT}` = '{run.parent}' and attributes.status = 'FINISHED'",
        max_results=50000)}
    progress.start(name, len(trials), resources.max_concurrent(cfg), {k for k, i in run_ids.items() if i in finished})
    folder = lambda n: str(paths.stages / n)  # noqa: E731
    ctx = TrialContext(cfg, name, ReidInputs(plan.data_root, plan.store, cache_dir=plan.cache_dir),
                       str(paths.trials / name), _links(plan.dataset, plan.gan, plan.generate),
                       baselines={seed: folder(n) for seed, n in plan.baselines.items()},
                       smprl_labels=dict(plan.smprl_labels),
                       seed_links={seed: _links(plan.baselines.get(seed), plan.smprl.get(seed))
                                   for seed in {*plan.baselines, *plan.smprl}},
                       needs={t.key: tuple(map(folder, plan.needs(t.method, t.seed, t.reuses_baseline, t.pool)))
                              for t in trials},
                       stores={pool: p.store for pool, p in plan.pools.items()},
                       pool_links={pool: _links(p.writer) for pool, p in plan.pools.items()},
                       log_models=log_models)
    try:
        rows = [_read_back(run, run_ids[row.key], row)
                for row in tune_trials(cfg, trials, ctx, paths.tune / name, resume, run.tracking_uri)]
    finally:
        progress.stop(name)
    if any(row.status in ("RUNNING", "SCHEDULED") for row in rows):
        print("\n" + results_table(rows), flush=True)
        raise KeyboardInterrupt(f"sweep {name} interrupted")
    return rows


def _read_back(run: tracking.SweepRun, run_id: str, row: TrialRow) -> TrialRow:
    """``row`` completed from the trial's MLflow run; a trial Tune gave up on whose run no one ended is marked FAILED
    with Tune's error here (the last line of defence: a failure never reads as "interrupted")."""
    from orchestrator import tracking
    from orchestrator.tuning import TAG_STOPPED_AFTER, WORKER_SECONDS

    got = run.client.get_run(run_id)
    if got.info.status in ("RUNNING", "SCHEDULED") and row.error not in (None, "not run"):
        tracking.fail(run.client, run_id, row.error)
        got = run.client.get_run(run_id)
    tags, status = got.data.tags, got.info.status
    error = row.error
    if status == "FAILED":  # the trial's own message, not Ray's wrapped traceback header
        error = tags.get(tracking.TAG_ERROR) or row.error or "failed"
    return dataclasses.replace(row, status=status, stopped_after=tags.get(TAG_STOPPED_AFTER),
                               where=tags.get("mprl.where"), seconds=got.data.metrics.get(WORKER_SECONDS, row.seconds),
                               error=error)


# ------------------------------------------------------------------------------------------ output

def results_table(rows: list[TrialRow]) -> str:
    """The sweep's table: one line per trial, rank-1/5 and mAP in percent, failures with their message; a pool column
    where some trials ran on one of sweep.pools ("-": the config's labels.pool)."""
    pools = any(r.spec.pool for r in rows)
    body = [(r.spec.method, r.spec.num_gan, r.spec.order, "all" if r.spec.keep is None else r.spec.keep, r.spec.seed,
             *([r.spec.pool or "-"] if pools else []), pct(r.rank1), pct(r.rank5), pct(r.mAP),
             f"FAILED: {r.error}" if r.error else
             f"stopped early after epoch {r.stopped_after}" if r.stopped_after else "") for r in rows]
    return format_table(("method", "#GAN", "order", "keep", "seed", *(["pool"] if pools else []), "rank-1", "rank-5",
                         "mAP", ""), body, align="lrlrr" + ("l" if pools else "") + "rrrl")


def timing_summary(out: SweepOutcome) -> str:
    """Where the time went: stages built (in workers), trial compute, and the driver's own CPU seconds."""
    built = out.stages.seconds()
    trials = sum(r.seconds or 0.0 for r in out.rows)
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in built.items()) or "all cached"
    return (f"stages built in Ray workers: {parts}; trials: {trials:.0f} s of worker time; "
            f"driver process CPU: {out.driver_cpu_seconds:.1f} s")


def _summarise(run: tracking.SweepRun, rows: list[TrialRow]) -> None:
    run.client.log_text(run.parent, results_table(rows), "results.txt")
    run.client.log_text(run.parent, json.dumps([r.as_dict() for r in rows], indent=1), "results.json")


def _register(run: tracking.SweepRun, experiment: str) -> None:
    """Each label method's chosen model into MLflow's model registry (orchestrator/registry.py: on validation, never
    on a test metric). A registry that refuses does not undo a finished sweep: it is said, and the sweep ends."""
    from orchestrator import registry

    try:
        print(registry.summary(registry.register_best(run.client, run.exp_id, experiment, run.parent, run.name)),
              flush=True)
    except Exception as err:  # e.g. a tracking server without a model registry
        print(f"[registry] not registered: {type(err).__name__}: {err}", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.replace("``", ""),
                                epilog=choices_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=PRESETS, metavar="NAME",
                   help=f"the config to start from: {', '.join(PRESETS)} (default: cpu; orchestrator.train's is smoke)")
    p.add_argument("--config", metavar="FILE", help="YAML file of overrides, applied after the preset (default: none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field after --config, e.g. --set reid.epochs=5 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest sweep of this config (runtime fields such as sweep.max_concurrent may "
                        "change; other changes are refused, listed); with none, start a new one")
    p.add_argument("--address", metavar="ADDR",
                   help="an existing Ray cluster: auto or ray://host:10001 (default: start a local Ray)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default: cluster.tracking_uri, else sqlite:///<storage>/mlflow.db)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned stages (cached or to run) and trials with their resources and exit, "
                        "starting no Ray and no MLflow run")
    return p


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = _parser().parse_args(argv)
    extra = [f"cluster.address={args.address}"] if args.address else []
    extra += [f"cluster.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    try:
        from orchestrator.config_checks import check_sweep_switch

        cfg = load_config(args.preset, file=args.config, overrides=[*args.overrides, *extra])
        check_sweep_switch(cfg)
        if args.dry_run:
            from orchestrator.sweep_plan import describe

            print(describe(cfg, resume=args.resume))
            return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    try:
        out = run_sweep(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: unfinished MLflow runs were marked KILLED; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    from orchestrator import report

    print("\n" + results_table(out.rows))
    print("\nover seeds (python -m orchestrator.report: the same, with a chart):\n")
    print(report.sweep_statistics(out.tracking_uri, cfg.cluster.experiment, Path(cfg.cluster.storage_path),
                                  out.parent_run_id))
    print(f"\nsweep {out.name} finished in {out.seconds / 60:.1f} min")
    print(timing_summary(out))
    ui = (f"mlflow ui --backend-store-uri {out.tracking_uri}" if out.tracking_uri.startswith("sqlite")
          else out.tracking_uri)
    print(f"MLflow: experiment '{cfg.cluster.experiment}', parent run {out.parent_run_id}\n  {ui}")
    return 1 if any(r.error for r in out.rows) else 0


if __name__ == "__main__":  # run the imported module's main, so Ray pickles functions by reference
    from orchestrator.sweep import main as _main

    sys.exit(_main())
