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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from ray.tune import Callback  # noqa: E402

from orchestrator import cluster, pipeline, tracking  # noqa: E402
from orchestrator.config import Config, config_hash, dump_yaml, flat_dict, load_config, to_dict  # noqa: E402
from orchestrator.trials import EPOCH_METRICS, Trial, build_trials, run_trial, trial_space  # noqa: E402


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    stages: dict[str, pipeline.StageResult]
    tracking_uri: str
    seconds: float


def sweep_name(cfg: Config, paths: pipeline.Paths, resume: bool) -> str:
    """``sweep-<hash>-<n>``: a fresh sweep gets the next free n; --resume takes the latest one."""
    base = f"sweep-{config_hash(cfg, 'dataset', 'gan', 'reid', 'labels', 'sweep')}"  # cluster.* is not in the hash
    n = 1
    while (paths.tune / f"{base}-{n}").exists():
        n += 1
    return f"{base}-{max(1, n - 1) if resume else n}"


def _sigterm_as_sigint() -> None:
    """SIGTERM (a scheduler, ``kill``) stops the sweep the way Ctrl+C does: gracefully, state saved."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def run_sweep(cfg: Config, *, resume: bool = False, log_models: bool = True) -> SweepOutcome:
    start = time.perf_counter()
    _sigterm_as_sigint()
    paths = pipeline.Paths(Path(cfg.cluster.storage_path))
    uri = cfg.cluster.tracking_uri or tracking.default_tracking_uri(paths.storage)
    tracking.check_reachable(uri)
    cluster.check_address(cfg.cluster.address)  # a dead address fails in seconds, not after ray.init retries
    dataset = pipeline.dataset_stage(cfg, paths)  # bad dataset input fails here, before Ray starts
    _init_ray(cfg)
    cluster.preflight(cfg)  # multi-node: shared storage and an MLflow server, or a clear error
    check_resources(cfg)
    paths.storage.mkdir(parents=True, exist_ok=True)
    client, exp_id = tracking.setup(uri, cfg.cluster.experiment, paths.storage)
    name = sweep_name(cfg, paths, resume)
    parent, _ = tracking.get_or_create_run(client, exp_id, "sweep", name, name)
    tracking.set_status(client, parent, "RUNNING")
    tracking.log_params(client, parent, flat_dict(cfg))
    client.log_text(parent, dump_yaml(cfg), "config.yaml")
    try:
        trials = build_trials(cfg)
        stages = run_stages(cfg, paths, trials, client, exp_id, parent, dataset)
        rows = _tune(cfg, paths, name, trials, stages, client, exp_id, parent, uri, resume, log_models)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_unfinished(client, exp_id, parent, status)
        tracking.set_status(client, parent, status)
        raise
    _summarise(client, parent, rows, paths)
    tracking.end_unfinished(client, exp_id, parent, "KILLED")
    tracking.set_status(client, parent, "FINISHED")
    return SweepOutcome(name, parent, rows, stages, uri, time.perf_counter() - start)


def _init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address)
        return
    num_cpus = cfg.cluster.num_cpus or max(3, os.cpu_count() or 1)
    # address="local": always a fresh instance, never one some other user's `ray start` left on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def check_resources(cfg: Config) -> None:
    """Refuse, before any stage runs, worker counts that the Ray cluster can never place (Ray would wait forever)."""
    import ray

    have = ray.cluster_resources()
    if cluster.scales_on_demand(have):  # GPU workers join when trials ask for them
        if not cfg.sweep.max_concurrent:
            raise ValueError("sweep.max_concurrent must be set on a cluster that adds GPU workers on demand")
        return
    for section in ("gan", "reid"):
        sub = getattr(cfg, section)
        kind = "GPU" if sub.use_gpu else "CPU"
        # CPU: each Train worker takes 1 CPU and the stage/trial driving it 1 more; GPU: 1 GPU per worker
        need = max(1, sub.num_workers) if sub.use_gpu else sub.num_workers + 1
        if have.get(kind, 0) < need:
            raise ValueError(f"{section}.num_workers={sub.num_workers} needs {need} {kind}s but the Ray cluster has "
                             f"{int(have.get(kind, 0))}; lower {section}.num_workers or add nodes")
    max_concurrent(cfg, _trial_resources(cfg))


# ------------------------------------------------------------------------------------------ stages

def run_stages(cfg: Config, paths: pipeline.Paths, trials: list[Trial], client, exp_id: str,
               parent: str, dataset: pipeline.StageResult) -> dict[str, pipeline.StageResult]:
    """Run (or reuse) every stage the trials need, logging each as a child run."""
    stages: dict[str, pipeline.StageResult] = {"dataset": dataset}
    print(f"[pipeline] dataset: {stages['dataset'].info.get('summary')}", flush=True)
    n_max = max((t.num_gan for t in trials), default=0)
    if n_max > 0:
        stages["gan"] = pipeline.gan_stage(cfg, paths, stages["dataset"].path)
        _log_stage(client, exp_id, parent, stages["gan"], _gan_artifacts(stages["gan"]))
        stages["generate"] = pipeline.generate_stage(cfg, paths, stages["gan"], n_max)
        _log_stage(client, exp_id, parent, stages["generate"])
    if any(t.method in ("baseline", "smprl") for t in trials):
        stages["baseline"] = pipeline.baseline_stage(cfg, paths, stages["dataset"].path)
        _log_stage(client, exp_id, parent, stages["baseline"])
    if any(t.method == "smprl" for t in trials):
        stages["smprl"] = pipeline.smprl_stage(cfg, paths, stages["baseline"], stages["generate"])
        _log_stage(client, exp_id, parent, stages["smprl"])
    return stages


def _gan_artifacts(stage: pipeline.StageResult) -> list[Path]:
    return sorted(stage.path.glob("**/samples.png"))[-1:]


def _log_stage(client, exp_id: str, parent: str, stage: pipeline.StageResult, files: list[Path] = ()) -> None:
    run_id, created = tracking.get_or_create_run(client, exp_id, "stage", f"{stage.stage}:{stage.key}",
                                                 f"stage:{stage.stage}", parent=parent,
                                                 tags={"mprl.cached": str(stage.cached).lower(),
                                                       "mprl.stage_path": str(stage.path)})
    if created:
        tracking.log_params(client, run_id, {k: v for k, v in stage.info.items() if not isinstance(v, (dict, list))})
        metrics = stage.info.get("metrics", {})
        tracking.log_metrics(client, run_id, {**metrics, "seconds": stage.info.get("seconds", 0.0)})
        tracking.log_artifacts(client, run_id, files, "samples")
        tracking.set_status(client, run_id, "FINISHED")
    print(f"[pipeline] {stage.stage}: {'cached' if stage.cached else 'built'} ({stage.path})", flush=True)


# ------------------------------------------------------------------------------------------ Tune

def _trial_resources(cfg: Config) -> dict[str, float]:
    if cfg.sweep.in_process and cfg.reid.num_workers <= 1:
        return {"CPU": 1 + cfg.reid.loader_workers, "GPU": 1 if cfg.reid.use_gpu else 0}
    return {"CPU": 1}  # the trial only drives a Train worker group, which asks for its own resources


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """Trials that fit the cluster at once (``sweep.max_concurrent`` when set)."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    import ray

    have = ray.cluster_resources()
    if cfg.sweep.in_process and cfg.reid.num_workers <= 1:
        fit = int(have.get("CPU", 1) // resources["CPU"])
        if cfg.reid.use_gpu:
            fit = min(fit, int(have.get("GPU", 0)))
    else:
        workers = max(1, cfg.reid.num_workers)
        fit = int(have.get("GPU", 0) // workers) if cfg.reid.use_gpu else int(have.get("CPU", 1) // (workers + 1))
    if fit < 1:
        raise ValueError(f"one trial needs {resources} plus {cfg.reid.num_workers} workers but the Ray cluster has "
                         f"{dict(have)}; lower reid.num_workers / reid.loader_workers or add nodes")
    return fit


def _tune(cfg: Config, paths: pipeline.Paths, name: str, trials: list[Trial], stages: dict, client, exp_id: str,
          parent: str, uri: str, resume: bool, log_models: bool) -> list[dict[str, Any]]:
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    run_ids = {}
    for t in trials:
        run_ids[t.key], _ = tracking.get_or_create_run(client, exp_id, "trial", f"{name}/{t.key}", t.key,
                                                       parent=parent, status="SCHEDULED",
                                                       tags={"mprl.method": t.method})
    inputs = {"data_root": str(stages["dataset"].path),
              "store_root": stages["generate"].info["store"] if "generate" in stages else None,
              "smprl_labels": stages["smprl"].info["labels"] if "smprl" in stages else None}
    links = {f"mprl.{s}_stage": f"{st.stage}-{st.key}" for s, st in stages.items()}
    base = stages.get("baseline")
    space = {"cfg": to_dict(cfg), "trial": ray.tune.grid_search(trial_space(trials)), "run_ids": run_ids,
             "tracking_uri": uri, "inputs": inputs, "trials_dir": str(paths.trials / name), "links": links,
             "max_failures": cfg.sweep.max_failures, "log_models": log_models,
             "baseline": {"run_dir": base.info["run_dir"], "metrics": base.info["metrics"],
                          "cmc": base.info.get("cmc", [])} if base else None}
    resources = _trial_resources(cfg)
    if not (cfg.sweep.in_process and cfg.reid.num_workers <= 1):  # the trial only drives a Train worker group
        resources = cluster.driver_resources(resources, ray.cluster_resources())
    trainable = ray.tune.with_resources(run_trial, resources)
    experiment = paths.tune / name
    if resume and ray.tune.Tuner.can_restore(str(experiment)):
        print(f"[sweep] resuming {experiment}", flush=True)
        tuner = ray.tune.Tuner.restore(str(experiment), trainable, resume_errored=True, param_space=space)
    else:
        scheduler = None
        if cfg.sweep.asha:  # epochs without evaluation carry no rank1; ASHA decides at the ones that do
            scheduler = ASHAScheduler(time_attr="training_iteration", metric="rank1", mode="max",
                                      max_t=cfg.reid.epochs, grace_period=max(1, cfg.reid.eval_every))
        tuner = ray.tune.Tuner(
            trainable, param_space=space,
            tune_config=ray.tune.TuneConfig(scheduler=scheduler, reuse_actors=True,  # skip re-imports per trial
                                            max_concurrent_trials=max_concurrent(cfg, resources)),
            run_config=ray.tune.RunConfig(name=name, storage_path=str(paths.tune), verbose=1,
                                          failure_config=ray.tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                                          callbacks=[EpochLogger(uri)]))
    grid = tuner.fit()  # a first SIGINT makes Tune stop gracefully and return; the MLflow status tells
    rows = results_rows(grid, trials)
    status = {t.key: client.get_run(run_ids[t.key]).info.status for t in trials}
    for row in rows:
        row["status"] = status[row["trial"]]
        if row["status"] == "FAILED":  # the trial's own message, not Ray's wrapped traceback header
            tag = client.get_run(run_ids[row["trial"]]).data.tags.get("mprl.error")
            row["error"] = tag or row.get("error") or "failed"
    if any(v in ("RUNNING", "SCHEDULED") for v in status.values()):
        print("\n" + format_table(rows), flush=True)
        raise KeyboardInterrupt(f"sweep {name} interrupted")
    return rows


class EpochLogger(Callback):
    """Driver-side Tune callback: every reported epoch goes to the trial's MLflow run as a step."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = None

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.tracking import MlflowClient

        self._client = self._client or MlflowClient(self.tracking_uri)
        key = Trial(**trial.config["trial"]).key
        run_id = trial.config["run_ids"][key]
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        tracking.log_metrics(self._client, run_id, {k: result[k] for k in EPOCH_METRICS if k in result}, step=step)


def results_rows(grid, trials: list[Trial]) -> list[dict[str, Any]]:
    by_key = {}
    for res in grid:
        if not res.config:  # a trial that never started (interrupted sweep)
            continue
        t = Trial(**res.config["trial"])
        m = res.metrics or {}
        by_key[t.key] = {"trial": t.key, "method": t.method, "num_gan": t.num_gan, "order": t.order,
                         "keep": t.keep, "seed": t.seed, **{k: m.get(k) for k in ("rank1", "rank5", "rank10", "mAP")},
                         "error": None if res.error is None else f"{type(res.error).__name__}: {res.error}"[:200]}
    return [by_key.get(t.key, {"trial": t.key, "method": t.method, "num_gan": t.num_gan, "order": t.order,
                               "keep": t.keep, "seed": t.seed, "error": "not run"}) for t in trials]


# ------------------------------------------------------------------------------------------ output

def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':<9} {'#GAN':>6} {'order':<14} {'keep':>5} {'seed':>4} {'rank-1':>7} {'rank-5':>7} {'mAP':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def pct(k):
            return f"{100 * r[k]:7.2f}" if r.get(k) is not None else f"{'-':>7}"

        keep = "all" if r["keep"] is None else str(r["keep"])
        line = (f"{r['method']:<9} {r['num_gan']:>6} {r['order']:<14} {keep:>5} {r['seed']:>4} "
                f"{pct('rank1')} {pct('rank5')} {pct('mAP')}")
        if r.get("error"):
            line += f"  FAILED: {r['error']}"
        lines.append(line)
    return "\n".join(lines)


def _summarise(client, parent: str, rows: list[dict[str, Any]], paths: pipeline.Paths) -> None:
    client.log_text(parent, format_table(rows), "results.txt")
    client.log_text(parent, json.dumps(rows, indent=1), "results.json")
    done = [r for r in rows if r.get("rank1") is not None]
    if done:
        best = max(done, key=lambda r: (r["rank1"], r["mAP"] or 0))
        tracking.log_metrics(client, parent, {"best_rank1": best["rank1"], "best_mAP": best["mAP"] or 0.0})
        client.set_tag(parent, "mprl.best_trial", best["trial"])


def register_best(client, exp_id: str, parent: str, model_name: str) -> str | None:
    """Register the best trial's logged model (by rank-1) under ``model_name``; returns the version."""
    import mlflow

    best_key = client.get_run(parent).data.tags.get("mprl.best_trial")
    if not best_key:
        return None
    runs = client.search_runs([exp_id], f"tags.`{tracking.TAG_PARENT}` = '{parent}' and "
                                        f"tags.`{tracking.TAG_KIND}` = 'trial'", max_results=5000)
    for r in runs:
        if r.info.run_name == best_key and "mprl.model_uri" in r.data.tags:
            return mlflow.register_model(r.data.tags["mprl.model_uri"], model_name).version
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", help="smoke | cpu | paper (default cpu)")
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
    print("\n" + format_table(out.rows))
    print(f"\nsweep {out.name} finished in {out.seconds / 60:.1f} min")
    ui = (f"mlflow ui --backend-store-uri {out.tracking_uri}" if out.tracking_uri.startswith("sqlite")
          else out.tracking_uri)
    print(f"MLflow: experiment '{cfg.cluster.experiment}', parent run {out.parent_run_id}\n  {ui}")
    return 1 if any(r.get("error") for r in out.rows) else 0


if __name__ == "__main__":  # run the imported module's main, so Ray pickles functions by reference
    from orchestrator.sweep import main as _main

    sys.exit(_main())
