"""The sweep's plan before anything runs: the trials, the stages they wait for, and ``--dry-run``'s listing of both.

:func:`stage_needs` turns the trial list into what :func:`orchestrator.stages.plan_stages` plans (the sweep uses it
too). :func:`describe` prints, for one config, the sweep it would run (or resume), each stage with its key,
whether its output is cached (``stage_cache.lookup``, with the stage's own check, as the sweep's graph asks) and
the Ray resources its task asks for, and each trial with its resources and the stages it waits for. No Ray, no
MLflow, nothing written: the resources are the plain requests (on the clusters of ``clusters/`` each also takes a
sliver of the node-type resource, ``orchestrator/resources.py``), and a cluster's own limit on concurrent trials is
known only once it is up.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator import resources, stage_cache, stages, sweep_record
from orchestrator.config import Config
from orchestrator.config_checks import check_sweep_switch
from orchestrator.tables import format_table
from orchestrator.trials import TrialSpec, build_trials


def stage_needs(trials: list[TrialSpec]) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
    """``plan_stages``'s inputs: (method, #GAN, seed) of the trials on the config's own pool and learning-rate
    scheme, and each other pool (sweep.pools) with the largest #GAN read from it."""
    needs = [(t.method, t.num_gan, t.seed) for t in trials if t.lr_scheme is None and t.pool is None]
    pools = {t.pool for t in trials} - {None}
    return needs, {pool: max(t.num_gan for t in trials if t.pool == pool) for pool in pools}


def describe(cfg: Config, resume: bool = False) -> str:
    """``--dry-run``: the checks a sweep makes before Ray starts, then its stages and trials (module docstring)."""
    paths = stage_cache.Paths(Path(cfg.cluster.storage_path))
    stages.check_dataset(cfg.dataset)
    stages.check_pools(cfg, max(cfg.sweep.num_gan))
    check_sweep_switch(cfg)
    named = sweep_record.resolve(cfg, paths.tune, resume)
    trials = build_trials(cfg)
    plan = stages.plan_stages(cfg, paths, *stage_needs(trials))
    rows, cached = [], 0
    for name, node in plan.nodes.items():
        hit, problems = stage_cache.lookup(paths, node.stage, node.key, node.kind, node.check)
        cached += hit is not None
        status = "cached" if hit else f"to rebuild ({problems[0]})" if problems else "to run"
        rows.append((node.stage, node.key, status, *_cpu_gpu(node.resources), _short(node.deps, plan)))
    out = [_sweep_line(named, paths, len(trials), len(plan.nodes), cached), "", "stages:",
           format_table(("stage", "key", "status", "CPU", "GPU", "waits for"), rows, align="lllrrl")]
    each = resources.trial_resources(cfg)
    workers = resources.train_workers(cfg, "reid")
    gpu = 1 if cfg.reid.use_gpu else 0
    group = f"{workers} x (1 CPU, {gpu} GPU)" if workers else None  # ScalingConfig's default per worker
    body = [(t.key, *_cpu_gpu(each), group,
             _short(plan.needs(t.method, t.seed, t.reuses_baseline, t.pool), plan)) for t in trials]
    limit = (f"at most {cfg.sweep.max_concurrent} at once (sweep.max_concurrent)" if cfg.sweep.max_concurrent
             else "as many at once as fit the Ray cluster (sweep.max_concurrent=0)")
    out += ["", f"trials: {limit}; workers: each trial's Ray Train worker group ('-': it trains in its own process)",
            format_table(("trial", "CPU", "GPU", "workers", "waits for"), body, align="lrrll"),
            "", "dry run: nothing started (no Ray, no MLflow run, nothing written); resources as asked of a plain Ray "
                "cluster (the clusters/ files add a sliver of their node-type resource)"]
    return "\n".join(out)


def _sweep_line(named: sweep_record.SweepName, paths: stage_cache.Paths, trials: int, nodes: int, cached: int) -> str:
    how = "resumes" if named.resumed else "a new sweep"
    changed = f"; runtime changes accepted: {'; '.join(map(str, named.runtime_changes))}" if (
        named.runtime_changes) else ""
    note = f"\n{named.note}" if named.note else ""
    return (f"sweep {named.name} ({how}) under {paths.storage}: {trials} trials, {nodes} stages ({cached} cached, "
            f"{nodes - cached} to run){changed}{note}")


def _cpu_gpu(res: dict[str, float]) -> tuple[str, str]:
    return f"{res.get('CPU', 0):g}", f"{res.get('GPU', 0):g}"


def _short(names: tuple[str, ...], plan: stages.Plan) -> str:
    """Stage node names as ``stage:<first 6 characters of the key>`` (the stage table has the whole key)."""
    return ", ".join(f"{plan.nodes[n].stage}:{plan.nodes[n].key[:6]}" for n in names) or "-"
