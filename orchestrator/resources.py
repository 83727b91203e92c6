"""What each stage and trial asks Ray for, how many run at once, how often they are retried, and where they train.

The one rule for "in process": a training run with at most one worker (``gan.num_workers`` / ``reid.num_workers``
<= 1) inside a sweep with ``sweep.in_process`` (and in ``orchestrator.train``) trains in the stage task or Tune
trial that runs it, with no Ray Train worker group to start; :func:`train_workers` turns that into the run spec's
worker count (0 = in process).

On the clusters of ``clusters/`` the head advertises ``tune_driver`` and the worker nodes ``mprl_worker``: every
task that computes takes a sliver of the latter (never the head, whose CPUs serve the driver, Tune and MLflow),
and a trial that only drives a Train worker group takes a sliver of the former (it waits beside the MLflow server
and leaves the GPU nodes' CPUs to its workers).
"""

from __future__ import annotations

from typing import Any, Mapping

import ray

DRIVER_RESOURCE = "tune_driver"  # advertised by the head node in clusters/*.yaml
DRIVER_SHARE = 0.01  # one driver trial's share: the head's CPUs, not this, limit how many run there
WORKER_RESOURCE = "mprl_worker"  # advertised (1000 units) by the worker nodes of clusters/*.yaml
WORKER_SHARE = 0.001
CLUSTER_RETRIES = 3  # sweep.max_failures on a cluster unless set: spot capacity is reclaimed, nodes are lost


def runs_in_process(cfg: Any, section: str = "reid") -> bool:
    """Whether the ``gan`` or ``reid`` training of ``cfg`` runs in its task / trial (see the module docstring)."""
    return cfg.sweep.in_process and getattr(cfg, section).num_workers <= 1


def train_workers(cfg: Any, section: str = "reid") -> int:
    """The run spec's Ray Train worker count for the ``gan`` or ``reid`` training: 0 (in process) or the section's."""
    return 0 if runs_in_process(cfg, section) else getattr(cfg, section).num_workers


def scales_on_demand(cluster_resources: Mapping[str, float]) -> bool:
    """True on the clusters of ``clusters/`` (their head advertises ``tune_driver``): GPU workers join when
    trials ask for them, so resources missing at the start are no reason to refuse a sweep."""
    return cluster_resources.get(DRIVER_RESOURCE, 0) > 0


def driver_resources(base: Mapping[str, float], cluster_resources: Mapping[str, float]) -> dict[str, float]:
    """``base`` plus ``{"tune_driver": 0.01}`` when the cluster advertises that resource (on its head).

    For tasks and trials that only drive a Ray Train worker group (``{"CPU": 1}``). One that asks for a GPU trains
    in place and is returned unchanged (the head has no GPU: pinning it there would never schedule).
    """
    out = dict(base)
    if scales_on_demand(cluster_resources) and not base.get("GPU"):
        out[DRIVER_RESOURCE] = DRIVER_SHARE
    return out


def compute_resources(cpus: float, gpus: float, cluster_resources: Mapping[str, float]) -> dict[str, float]:
    """Resources of a task that computes: ``cpus``/``gpus``, plus a sliver of the worker-node resource where the
    cluster advertises it (never the head)."""
    out = {"CPU": float(cpus), "GPU": float(gpus)}
    if cluster_resources.get(WORKER_RESOURCE, 0) > 0 or scales_on_demand(cluster_resources):
        out[WORKER_RESOURCE] = WORKER_SHARE
    return out


def _cluster_resources() -> dict[str, float]:
    """The connected cluster's resources ({} before ``ray.init``: plain requests, e.g. for offline checks)."""

    return ray.cluster_resources() if ray.is_initialized() else {}


def ray_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """``{"CPU": c, "GPU": g, "x": v}`` -> the keyword arguments of ``ray.remote`` / ``.options``."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0),
            **({"resources": custom} if custom else {})}


def stage_resources(cfg: Any, stage: str) -> dict[str, float]:
    """What a stage's Ray task asks for. ``cpu``: the dataset and decode stages; ``gan``/``reid``: training (a task
    that only drives a Train worker group asks for what a driver trial does); ``generate``/``smprl``: inference."""
    have = _cluster_resources()
    if stage == "cpu":
        return compute_resources(1, 0, have)
    section = "gan" if stage in ("gan", "generate") else "reid"
    sub = getattr(cfg, section)
    if stage in ("gan", "reid") and not runs_in_process(cfg, section):
        return driver_resources({"CPU": 1}, have)
    workers = getattr(sub, "loader_workers", 0)
    return compute_resources(1 + workers, 1 if sub.use_gpu else 0, have)


def trial_resources(cfg: Any) -> dict[str, float]:
    """What one Tune trial asks for: all of an in-process trial; only the driver of a Train worker group."""
    if runs_in_process(cfg):
        return compute_resources(1 + cfg.reid.loader_workers, 1 if cfg.reid.use_gpu else 0, _cluster_resources())
    return driver_resources({"CPU": 1}, _cluster_resources())


def generation_helpers(cfg: Any) -> int:
    """Generation workers besides the stage's own: one per other GPU (0 on CPU). On a cluster that adds GPU nodes
    on demand, as many as ``sweep.max_concurrent`` allows (the GPUs it will have), not the GPUs up now."""
    if not cfg.gan.use_gpu:
        return 0
    have = _cluster_resources()
    gpus = cfg.sweep.max_concurrent if scales_on_demand(have) else int(have.get("GPU", 0))
    return max(0, gpus - 1)


def trial_retries(cfg: Any) -> int:
    """``sweep.max_failures``, else 3 on a cluster (``cluster.address`` set) and 1 on one machine."""
    if cfg.sweep.max_failures is not None:
        return cfg.sweep.max_failures
    return CLUSTER_RETRIES if cfg.cluster.address else 1


def max_concurrent(cfg: Any) -> int:
    """Trials that fit the cluster at once (``sweep.max_concurrent`` when set)."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent

    have = ray.cluster_resources()
    if runs_in_process(cfg):
        fit = int(have.get("CPU", 1) // (1 + cfg.reid.loader_workers))
        if cfg.reid.use_gpu:
            fit = min(fit, int(have.get("GPU", 0)))
    else:
        workers = max(1, cfg.reid.num_workers)
        fit = int(have.get("GPU", 0) // workers) if cfg.reid.use_gpu else int(have.get("CPU", 1) // (workers + 1))
    if fit < 1:
        raise ValueError(f"one trial needs {trial_resources(cfg)} plus {cfg.reid.num_workers} workers but the Ray "
                         f"cluster has {dict(have)}; lower reid.num_workers / reid.loader_workers or add nodes")
    return fit


def capacity_bundles(cfg: Any, trials: int) -> list[dict[str, float]]:
    """The resource shapes ``trials`` concurrent trials occupy on worker nodes (for the autoscaler's request): an
    in-process trial's own bundle, or one ``{"CPU": 1, "GPU": g}`` per Ray Train worker (ScalingConfig's default)."""
    n = max(0, min(trials, max_concurrent(cfg)))
    if runs_in_process(cfg):
        return [trial_resources(cfg)] * n
    gpu = 1.0 if cfg.reid.use_gpu else 0.0
    return [{"CPU": 1.0, "GPU": gpu}] * (n * max(1, cfg.reid.num_workers))


def check_resources(cfg: Any) -> None:
    """Refuse, before any stage runs, worker counts that the Ray cluster can never place (Ray would wait forever)."""

    have = ray.cluster_resources()
    if scales_on_demand(have):  # GPU workers join when trials ask for them
        if not have.get(WORKER_RESOURCE):
            print(f"[cluster] no node advertises {WORKER_RESOURCE} yet: stages and trials wait for worker nodes "
                  f"that do (the clusters/*.yaml workers do; a head with {DRIVER_RESOURCE} computes nothing)",
                  flush=True)
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
    max_concurrent(cfg)
