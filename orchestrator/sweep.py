"""``python -m orchestrator.sweep``: the whole experiment in one command.

dataset -> DCGAN -> generation -> baseline -> sMpRL labels (each cached) -> a Ray Tune sweep of re-ID trials
-> a results table, with everything in MLflow. With no arguments: the ``cpu`` preset on the synthetic dataset,
on a local Ray instance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import cluster, pipeline, tracking
from orchestrator.config import PRESETS, Config, choices_help, config_hash, dump_yaml, flat_dict, load_config
from orchestrator.tables import format_table, pct
from orchestrator.trials import TrialContext, TrialSpec, build_trials
from orchestrator.tuning import TAG_STOPPED_AFTER, tune_trials
from trainables.reid import ReidInputs


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    stages: pipeline.Stages
    tracking_uri: str
    seconds: float


def sweep_name(cfg: Config, paths: pipeline.Paths, resume: bool) -> str:
    """``sweep-<hash>-<n>``: a fresh sweep gets the next free n; --resume takes the latest one."""
    base = f"sweep-{config_hash(cfg, 'dataset', 'gan', 'reid', 'labels', 'sweep')}"  # cluster.* is not in the hash
    n = 1
    while (paths.tune / f"{base}-{n}").exists():
        n += 1
    return f"{base}-{max(1, n - 1) if resume else n}"


def run_sweep(cfg: Config, *, resume: bool = False, log_models: bool = True) -> SweepOutcome:
    """Check inputs, run (or reuse) the stages, run the trials on Tune; every run ends in MLflow."""
    start = time.perf_counter()
    _sigterm_as_sigint()
    paths = pipeline.Paths(Path(cfg.cluster.storage_path))
    uri = cfg.cluster.tracking_uri or tracking.default_tracking_uri(paths.storage)
    tracking.check_reachable(uri)
    cluster.check_address(cfg.cluster.address)  # a dead address fails in seconds, not after ray.init retries
    dataset = pipeline.dataset_stage(cfg, paths)  # bad dataset input fails here, before Ray starts
    cluster.connect(cfg)
    cluster.preflight(cfg)  # multi-node: shared storage and an MLflow server, or a clear error
    cluster.check_resources(cfg)
    paths.storage.mkdir(parents=True, exist_ok=True)
    client, exp_id = tracking.setup(uri, cfg.cluster.experiment, paths.storage)
    name = sweep_name(cfg, paths, resume)
    parent, _ = tracking.get_or_create_run(client, exp_id, "sweep", name, name)
    run = tracking.SweepRun(client, exp_id, name, parent, uri)
    tracking.set_status(client, parent, "RUNNING")
    tracking.log_params(client, parent, flat_dict(cfg))
    client.log_text(parent, dump_yaml(cfg), "config.yaml")
    try:
        trials = build_trials(cfg)
        stages = run_stages(cfg, paths, trials, run, dataset)
        rows = _run_trials(cfg, trials, stages, run, resume=resume, log_models=log_models)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_unfinished(client, exp_id, parent, status)
        tracking.set_status(client, parent, status)
        raise
    _summarise(run, rows)
    tracking.end_unfinished(client, exp_id, parent, "KILLED")
    tracking.set_status(client, parent, "FINISHED")
    return SweepOutcome(name, parent, rows, stages, uri, time.perf_counter() - start)


def _sigterm_as_sigint() -> None:
    """SIGTERM (a scheduler, ``kill``) stops the sweep the way Ctrl+C does: gracefully, state saved."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


# ------------------------------------------------------------------------------------------ stages

def run_stages(cfg: Config, paths: pipeline.Paths, trials: list[TrialSpec], run: tracking.SweepRun,
               dataset: pipeline.StageResult) -> pipeline.Stages:
    """Run (or reuse) every stage the trials need, logging each as a child run."""
    print(f"[pipeline] dataset: {dataset.out.summary}", flush=True)
    gan = generate = None
    n_max = max((t.num_gan for t in trials if t.method != "baseline_matched"), default=0)  # real images only
    if n_max > 0:
        gan = _logged(run, pipeline.gan_stage(cfg, paths, dataset.path), "**/samples.png")
        generate = _logged(run, pipeline.generate_stage(cfg, paths, gan, n_max))
    smprl_seeds = sorted({t.seed for t in trials if t.method == "smprl"})
    label_seed = {s: cfg.reid.seed if cfg.sweep.single_baseline else s for s in smprl_seeds}
    baselines = {seed: _logged(run, pipeline.baseline_stage(cfg, paths, dataset.path, seed))
                 for seed in sorted({t.seed for t in trials if t.method == "baseline"} | set(label_seed.values()))}
    smprl = {seed: _logged(run, pipeline.smprl_stage(cfg, paths, baselines[label_seed[seed]], generate))
             for seed in smprl_seeds}  # with single_baseline every seed gets the same (cached) labels
    return pipeline.Stages(dataset, gan, generate, baselines, smprl)


def _logged(run: tracking.SweepRun, stage: pipeline.StageResult, artifacts: str | None = None):
    _log_stage(run, stage, sorted(stage.path.glob(artifacts))[-1:] if artifacts else [])
    return stage


def _log_stage(run: tracking.SweepRun, stage: pipeline.StageResult, files: list[Path] = ()) -> None:
    run_id, created = run.child("stage", f"{stage.stage}:{stage.key}", f"stage:{stage.stage}",
                                tags={"mprl.cached": str(stage.cached).lower(), "mprl.stage_path": str(stage.path)})
    if created:
        fields = vars(stage.out)
        tracking.log_params(run.client, run_id, {k: v for k, v in fields.items() if not isinstance(v, (dict, list))})
        tracking.log_metrics(run.client, run_id, {**fields.get("metrics", {}), "seconds": stage.seconds})
        tracking.log_artifacts(run.client, run_id, files, "samples")
        tracking.set_status(run.client, run_id, "FINISHED")
    print(f"[pipeline] {stage.stage}: {'cached' if stage.cached else 'built'} ({stage.path})", flush=True)


# ------------------------------------------------------------------------------------------ trials

def _links(*stages: pipeline.StageResult | None) -> dict[str, str]:
    """MLflow tags naming the stage outputs a trial used (``mprl.<stage>_stage``)."""
    return {f"mprl.{st.stage}_stage": f"{st.stage}-{st.key}" for st in stages if st is not None}


def _run_trials(cfg: Config, trials: list[TrialSpec], stages: pipeline.Stages, run: tracking.SweepRun, *,
                resume: bool, log_models: bool) -> list[dict[str, Any]]:
    """Create every trial's MLflow run up front, run the trials, and read their final status back."""
    paths, name = pipeline.Paths(Path(cfg.cluster.storage_path)), run.name
    run_ids = {t.key: run.child("trial", f"{name}/{t.key}", t.key, status="SCHEDULED",
                                tags={"mprl.method": t.method})[0] for t in trials}
    ctx = TrialContext(cfg, run.tracking_uri, run_ids,
                       ReidInputs(str(stages.dataset.path), stages.generate.out.store if stages.generate else None),
                       str(paths.trials / name), _links(stages.dataset, stages.gan, stages.generate),
                       baselines={seed: st.out for seed, st in stages.baselines.items()},
                       smprl_labels={seed: st.out.labels for seed, st in stages.smprl.items()},
                       seed_links={seed: _links(stages.baselines.get(seed), stages.smprl.get(seed))
                                   for seed in {*stages.baselines, *stages.smprl}}, log_models=log_models)
    rows = tune_trials(cfg, trials, ctx, paths.tune / name, resume)
    status = {t.key: run.client.get_run(run_ids[t.key]).info.status for t in trials}
    for row in rows:
        row["status"] = status[row["trial"]]
        row["stopped_after"] = run.client.get_run(run_ids[row["trial"]]).data.tags.get(TAG_STOPPED_AFTER)
        if row["status"] == "FAILED":  # the trial's own message, not Ray's wrapped traceback header
            tag = run.client.get_run(run_ids[row["trial"]]).data.tags.get("mprl.error")
            row["error"] = tag or row.get("error") or "failed"
    if any(v in ("RUNNING", "SCHEDULED") for v in status.values()):
        print("\n" + results_table(rows), flush=True)
        raise KeyboardInterrupt(f"sweep {name} interrupted")
    return rows


# ------------------------------------------------------------------------------------------ output

def results_table(rows: list[dict[str, Any]]) -> str:
    """The sweep's table: one line per trial, rank-1/5 and mAP in percent, failures with their message."""
    body = [(r["method"], r["num_gan"], r["order"], "all" if r["keep"] is None else r["keep"], r["seed"],
             pct(r.get("rank1")), pct(r.get("rank5")), pct(r.get("mAP")),
             f"FAILED: {r['error']}" if r.get("error") else
             f"stopped early after epoch {r['stopped_after']}" if r.get("stopped_after") else "") for r in rows]
    return format_table(("method", "#GAN", "order", "keep", "seed", "rank-1", "rank-5", "mAP", ""), body,
                        align="lrlrrrrrl")


def _summarise(run: tracking.SweepRun, rows: list[dict[str, Any]]) -> None:
    run.client.log_text(run.parent, results_table(rows), "results.txt")
    run.client.log_text(run.parent, json.dumps(rows, indent=1), "results.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=choices_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=PRESETS, help="default cpu")
    p.add_argument("--config", help="YAML file of overrides")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set reid.epochs=5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep of this config")
    p.add_argument("--address", help="existing Ray cluster: auto or ray://host:10001 (default: start a local one)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<storage>/mlflow.db)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    extra = [f"cluster.address={args.address}"] if args.address else []
    extra += [f"cluster.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    try:
        cfg = load_config(args.preset, file=args.config, overrides=[*args.overrides, *extra])
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
    print("\n" + results_table(out.rows))
    print(f"\nsweep {out.name} finished in {out.seconds / 60:.1f} min")
    ui = (f"mlflow ui --backend-store-uri {out.tracking_uri}" if out.tracking_uri.startswith("sqlite")
          else out.tracking_uri)
    print(f"MLflow: experiment '{cfg.cluster.experiment}', parent run {out.parent_run_id}\n  {ui}")
    return 1 if any(r.get("error") for r in out.rows) else 0


if __name__ == "__main__":  # run the imported module's main, so Ray pickles functions by reference
    from orchestrator.sweep import main as _main

    sys.exit(_main())
