"""The only module of the training code that touches Ray Train: run a per-worker loop, report, checkpoint.

A loop is an ordinary function ``loop(config: dict) -> dict | None``. It asks :func:`context` for its rank,
world size and device, :func:`load_state` for the latest checkpoint, and calls :func:`report` once per epoch on
every rank (rank 0 passes the state to checkpoint). :func:`fit` runs it either

* on a Ray Train ``TorchTrainer`` worker group (``num_workers >= 1``; DDP over gloo on CPU, NCCL on GPU; a
  restarted run with the same ``name`` and ``storage_path`` resumes from the latest checkpoint), or
* in this process (``num_workers == 0``): the same loop, no worker group (saves the ~25 s start-up of a Train
  run on small machines). Checkpoints then go to ``storage_path/name/checkpoint_NNNNNN`` and resume works the
  same way. Inside a Tune trial, metrics are forwarded to Tune in both modes.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
_LOCAL_NAME = re.compile(r"checkpoint_\d+")  # in-process checkpoint folders (Ray Train's carry a timestamp)


@dataclass(frozen=True)
class RunSpec:
    """Where and how one training run executes. ``name`` must be deterministic (resume relies on it)."""

    name: str
    storage_path: str
    num_workers: int = 0
    use_gpu: bool = False
    max_failures: int = 0
    keep_checkpoints: int = 2
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


LOGICAL_GPUS_ENV = "MPRL_LOGICAL_GPUS"  # "1": GPUs that nodes advertise may be logical (tests, the rehearsal)
_LOCAL: contextvars.ContextVar[RunSpec | None] = contextvars.ContextVar("mprl_local_run", default=None)


# ------------------------------------------------------------------------------------- driver side

def fit(loop: Callable[[dict], Any], config: dict, spec: RunSpec) -> Any:
    """Run ``loop(config)`` as described in the module docstring; returns rank 0's return value."""
    if spec.num_workers == 0:
        token = _LOCAL.set(spec)
        try:
            return loop(config)
        finally:
            _LOCAL.reset(token)
    return _fit_ray(loop, config, spec)


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
    return train_config["loop"](train_config["config"])


# ------------------------------------------------------------------------------------- worker side

def context() -> Context:
    """Rank, world size and device of the calling worker."""
    spec = _LOCAL.get()
    if spec is not None:
        return Context(0, 1, device_for(spec.use_gpu), True)
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


def node_label() -> str:
    """``node <ip> (<node id prefix>)`` inside Ray, else the host name: where this process runs."""
    import socket

    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return f"node {ray.util.get_node_ip_address()} ({ctx.get_node_id()[:12]})"
    except Exception:  # noqa: BLE001
        pass
    return f"host {socket.gethostname()}"


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
    """The latest checkpoint's state dict (on CPU), or None on a fresh run."""
    spec = _LOCAL.get()
    if spec is not None:
        latest = latest_checkpoint(spec.run_dir)
        return None if latest is None else _load(latest / STATE_FILE)
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return _load(Path(d) / STATE_FILE)


def report(metrics: dict[str, float], state: dict | None = None, files: dict[str, Path] | None = None) -> None:
    """Report this epoch's metrics; with ``state`` (rank 0 only) also save a checkpoint.

    Every rank must call this the same number of times (it is a barrier on a worker group). ``files`` are
    copied into the checkpoint folder next to the state (e.g. a sample grid PNG).
    """
    spec = _LOCAL.get()
    if spec is not None:
        if state is not None:
            _save_local(spec, metrics, state, files or {})
        if spec.report_to_tune:
            import ray.tune

            ray.tune.report(metrics)
        return
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(Path(tmp), metrics, state, files or {})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ------------------------------------------------------------------------------------- checkpoints

def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _write_checkpoint(folder: Path, metrics: dict, state: dict, files: dict[str, Path]) -> None:
    torch.save(state, folder / STATE_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, default=float))
    for name, src in files.items():
        shutil.copyfile(src, folder / name)


def _save_local(spec: RunSpec, metrics: dict, state: dict, files: dict[str, Path]) -> None:
    """Write into a temporary sibling and rename: a crash never leaves a checkpoint that looks complete."""
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[len("checkpoint_"):]) for p in _checkpoints(run_dir) if _LOCAL_NAME.fullmatch(p.name)]
    index = max(numbers) + 1 if numbers else 0
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tmp_checkpoint_"))
    try:
        _write_checkpoint(tmp, metrics, state, files)
        os.replace(tmp, run_dir / f"checkpoint_{index:06d}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(run_dir)[:-spec.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (in-process ``checkpoint_NNNNNN`` and Ray Train's
    ``checkpoint_<timestamp>`` names do not sort together, so order by modification time, then name)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.name.startswith("checkpoint_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (in-process or Ray Train layout), or None."""
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


# ------------------------------------------------------------------------------------- fault injection

FAILURE_ENV = "MPRL_INJECT_FAILURE"


@dataclass(frozen=True)
class FailurePlan:
    """Make one rank fail once at (epoch, step): the test hook for worker-failure recovery.

    Spec string: ``"rank=1,epoch=1,step=2,mode=exit[,match=lsro]"``. ``mode``: ``exit`` (``os._exit``: a dead
    worker process), ``raise`` (an exception, once), ``always`` (raise on every attempt: a permanent failure) or
    ``always_exit`` (``os._exit`` on every attempt: a process that keeps dying, like an OOM kill).
    ``match`` limits it to runs whose name contains that text. "Once" is remembered by a marker file in the run
    folder, so the retried worker goes on.
    """

    rank: int
    epoch: int
    step: int
    mode: str = "raise"
    match: str = ""

    @classmethod
    def parse(cls, spec: str) -> "FailurePlan":
        try:
            fields = dict(item.split("=", 1) for item in spec.split(",") if item)
            plan = cls(int(fields.pop("rank", 0)), int(fields.pop("epoch")), int(fields.pop("step", 0)),
                       fields.pop("mode", "raise"), fields.pop("match", ""))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{FAILURE_ENV}={spec!r} must look like rank=1,epoch=1,step=2,mode=exit ({err})") from None
        if fields or plan.mode not in ("exit", "raise", "always", "always_exit"):
            raise ValueError(f"{FAILURE_ENV}={spec!r}: unknown keys {sorted(fields)} or mode {plan.mode!r} "
                             f"(exit | raise | always | always_exit)")
        return plan

    def maybe_fail(self, run_dir: str, run_name: str, rank: int, epoch: int, step: int) -> None:
        if (rank, epoch, step) != (self.rank, self.epoch, self.step) or self.match not in run_name:
            return
        marker = Path(run_dir) / ".failure_injected"
        if self.mode == "always_exit":
            os._exit(17)
        if self.mode == "always":
            raise RuntimeError(f"injected permanent failure at rank {rank}, epoch {epoch}, step {step}")
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank={rank} epoch={epoch} step={step}\n")
        if self.mode == "exit":
            os._exit(17)
        raise RuntimeError(f"injected failure at rank {rank}, epoch {epoch}, step {step}")
