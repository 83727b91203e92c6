"""The only module of the training code that touches Ray Train: run a per-worker loop, report, checkpoint.

A loop is an ordinary function ``loop(config: dict) -> dict | None``. It asks :func:`context` for its rank,
world size and device, :func:`load_state` for the latest checkpoint, and calls :func:`report` once per epoch on
every rank (rank 0 passes the state to checkpoint; :func:`checkpoints.due` picks the epochs kept: every
``reid.checkpoint_every`` and the last). :func:`fit` runs it either

* on a Ray Train ``TorchTrainer`` worker group (``num_workers >= 1``; DDP over gloo on CPU, NCCL on GPU; a
  restarted run with the same ``name`` and ``storage_path`` resumes from the latest checkpoint, which Ray
  uploads off the training thread), or
* in this process (``num_workers == 0``): the same loop, no worker group (saves the ~25 s start-up of a Train
  run on small machines). Checkpoints go to ``storage_path/name/checkpoint_NNNNNN``, written by a background
  thread (:class:`checkpoints.Writer`), and resume works the same way. Inside a Tune trial each finished
  checkpoint is also reported to Tune (a manifest naming it), so a retried or resumed trial is restored from it.

In both modes reports carry ``training_iteration`` = epochs done, so the count continues across retries.
"""

from __future__ import annotations

import contextvars
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainables import checkpoints
from trainables.checkpoints import METRICS_FILE, STATE_FILE  # noqa: F401 (public names)
from trainables.checkpoints import latest as latest_checkpoint  # noqa: F401
from trainables.logs import configure_logging
from trainables.placement import LOGICAL_GPUS_ENV, node_label


@dataclass(frozen=True)
class RunSpec:
    """Where and how one training run executes. ``name`` must be deterministic (resume relies on it)."""

    name: str
    storage_path: str
    num_workers: int = 0
    use_gpu: bool = False
    max_failures: int = 0
    keep_checkpoints: int = 1  # the latest (Tune keeps one manifest per in-process trial, too)
    report_to_tune: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path) / self.name


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    in_process: bool


@dataclass(frozen=True)
class _LocalRun:
    spec: RunSpec
    writer: checkpoints.Writer


_LOCAL: contextvars.ContextVar[_LocalRun | None] = contextvars.ContextVar("mprl_local_run", default=None)


# ------------------------------------------------------------------------------------- driver side

def fit(loop: Callable[[dict], Any], config: dict, spec: RunSpec) -> Any:
    """Run ``loop(config)`` as described in the module docstring; returns rank 0's return value."""
    configure_logging()  # this process's messages show (a stage task, a Tune trial)
    if spec.num_workers == 0:
        run = _LocalRun(spec, checkpoints.Writer(spec.run_dir))
        token = _LOCAL.set(run)
        try:
            return loop(config)
        finally:
            _LOCAL.reset(token)
            _close(run)
    return _fit_ray(loop, config, spec)


def _close(run: _LocalRun) -> None:
    """Join the write in flight (also when the loop failed: that checkpoint completes). Outside Tune it is the
    run's latest; inside, Tune was not told of it, so the older one its manifest names stays."""
    run.writer.join()
    done = run.writer.take()
    if done is not None and not run.spec.report_to_tune:
        checkpoints.prune(run.spec.run_dir, done.path, run.spec.keep_checkpoints)


def _fit_ray(loop: Callable[[dict], Any], config: dict, spec: RunSpec) -> Any:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    callbacks = []
    if spec.report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        _ray_worker_entry,
        train_loop_config={"loop": loop, "config": config},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=spec.storage_path, callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result.return_value


def _ray_worker_entry(train_config: dict) -> Any:
    configure_logging()  # a Ray Train worker process
    return train_config["loop"](train_config["config"])


# ------------------------------------------------------------------------------------- worker side

def context() -> Context:
    """Rank, world size and device of the calling worker."""
    run = _LOCAL.get()
    if run is not None:
        return Context(0, 1, device_for(run.spec.use_gpu), True)
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        device = device_for(bool(_granted_gpus()))
    return Context(ctx.get_world_rank(), ctx.get_world_size(), device, False)


def device_for(use_gpu: bool) -> torch.device:
    """``cuda`` for a worker that was given a GPU, else ``cpu``.

    A worker given a GPU (``use_gpu``, or GPUs granted by Ray) that sees no CUDA device raises an error naming
    its node, instead of silently training on the CPU for hours. With ``MPRL_LOGICAL_GPUS=1`` (set by
    ``cluster.logical_gpus``, for test clusters whose nodes advertise logical GPUs) it runs on the CPU.
    """
    if not (use_gpu or _granted_gpus()):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(LOGICAL_GPUS_ENV) == "1":
        return torch.device("cpu")
    raise RuntimeError(f"{node_label()} was given a GPU but torch sees no CUDA device (torch "
                       f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                       f"check the node's driver and torch build, or set cluster.logical_gpus=true when the "
                       f"cluster's GPUs are logical on purpose (tests)")


def _granted_gpus() -> list:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return []


def wrap_model(model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
    """Move to the worker's device; wrap in DDP when there are several workers."""
    ctx = context()
    if ctx.in_process or ctx.world_size == 1:
        return model.to(ctx.device)
    import ray.train.torch

    return ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under a DDP wrapper (for state dicts and eval-mode methods)."""
    return getattr(model, "module", model)


def load_state() -> dict | None:
    """The latest checkpoint's state dict (on CPU), or None on a fresh run.

    In-process: the run folder's newest complete checkpoint. In a Tune trial that is the one whose manifest Tune
    restored on a retry or ``--resume``, or a newer one whose write finished after the last report (folders
    newer than the reported one are never pruned).
    """
    run = _LOCAL.get()
    if run is not None:
        found = checkpoints.latest(run.spec.run_dir)
        return None if found is None else checkpoints.load(found / STATE_FILE)
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return checkpoints.load(Path(d) / STATE_FILE)


def report(metrics: dict[str, float], state: dict | None = None, files: dict[str, Path] | None = None) -> None:
    """Report this epoch's metrics; with ``state`` (rank 0 only) also save a checkpoint if the epoch is due.

    Every rank must call this the same number of times (it is a barrier on a worker group). ``files`` are
    copied into the checkpoint folder next to the state (e.g. a sample grid PNG). A finished checkpoint adds
    ``checkpoint_mb``, ``checkpoint_write_s`` and ``checkpoint_stall_s`` (time the training thread spent on it).
    """
    metrics = checkpoints.with_iteration(metrics)
    due = state is not None and checkpoints.due(state)
    run = _LOCAL.get()
    if run is not None:
        _report_local(run, metrics, state if due else None, files or {})
        return
    import ray.train

    if not due:
        ray.train.report(metrics)
        return
    start, tmp = time.perf_counter(), checkpoints.staging_folder()
    checkpoints.write_folder(tmp, metrics, state, files or {})
    mb = sum(f.stat().st_size for f in tmp.iterdir()) / 2**20
    written = {"checkpoint_mb": round(mb, 3), "checkpoint_write_s": round(time.perf_counter() - start, 4)}
    # ASYNC: Ray uploads the folder on a thread and deletes it; the next report waits for that upload
    ray.train.report({**metrics, **written}, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def _report_local(run: _LocalRun, metrics: dict, state: dict | None, files: dict[str, Path]) -> None:
    """Start this epoch's checkpoint write (the last epoch's completes first); report the newest finished one."""
    if state is not None:
        run.writer.submit(state, metrics, files)
        if checkpoints.is_final(state):
            run.writer.join()
    done = run.writer.take()
    if done is not None:
        metrics = {**metrics, **done.metrics()}
    if run.spec.report_to_tune:
        _tune_report(metrics, done)
    if done is not None:  # after Tune holds its manifest: the older folders are no longer named anywhere
        checkpoints.prune(run.spec.run_dir, done.path, run.spec.keep_checkpoints)


def _tune_report(metrics: dict, done: checkpoints.Written | None) -> None:
    import ray.tune

    if done is None:
        ray.tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:  # Tune copies it into the trial's storage
        checkpoints.write_manifest(Path(tmp), done, metrics)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
