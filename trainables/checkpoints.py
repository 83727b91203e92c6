"""Checkpoint files of a run: the cadence, the background writer, the run folder's layout and Tune manifests.

A run's checkpoints live in its folder, ``<run_dir>/checkpoint_NNNNNN/{state.pt,metrics.json,...}`` (Ray Train
runs: ``checkpoint_<timestamp>`` folders Ray writes there). In-process runs write them with :class:`Writer`: the
training thread serialises the state to bytes (a CPU copy, so training may change the tensors at once), a thread
writes them into a temporary sibling and renames it (a crash never leaves a folder that looks complete). One write
is in flight at a time: the next one, and the end of the run, join it.

Tune learns of an in-process run's checkpoint through a *manifest*: a small folder naming the checkpoint folder,
reported with ``ray.tune.report(checkpoint=...)`` once that folder is complete. Tune orders, restores and prunes
manifests like any checkpoint (``CheckpointConfig(num_to_keep=1)``) while the state is written once, off the
training thread (a Tune checkpoint of the state itself would be copied again, on the training thread, by
``ray.tune.report``). It is Ray's "pointer checkpoint" pattern (``ray/train/v2/_internal/execution/context.py``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
_STAGING = "mprl_ckpt_"  # + "<pid>_": Ray Train checkpoints before their upload (:func:`staging_folder`)
_LOCAL_NAME = re.compile(r"checkpoint_(\d+)")  # in-process checkpoint folders (Ray Train's carry a timestamp)


# ------------------------------------------------------------------------------------- cadence

def due(state: dict) -> bool:
    """Whether the epoch of ``state`` is checkpointed: every ``reid.checkpoint_every`` epochs and the last one
    for re-ID states (they carry their ``reid`` section); every epoch for the others (the GAN's)."""
    reid = state.get("reid")
    if not isinstance(reid, dict) or "epoch" not in state:
        return True
    every = int(reid.get("checkpoint_every", 1))
    return (state["epoch"] + 1) % every == 0 or is_final(state)


def is_final(state: dict) -> bool:
    """True for the last epoch of a re-ID run (its checkpoint is written before the run returns)."""
    reid = state.get("reid")
    return isinstance(reid, dict) and state.get("epoch") == reid.get("epochs", 0) - 1


def with_iteration(metrics: dict) -> dict:
    """``training_iteration`` = epochs done (Tune keeps a reported one): a retried or resumed trial, which resumes
    at its checkpoint's epoch, continues the count ASHA reads instead of restarting it."""
    if "epoch" not in metrics:
        return metrics
    return {**metrics, "training_iteration": int(metrics["epoch"]) + 1}


# ------------------------------------------------------------------------------------- the run folder

def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_folder(folder: Path, metrics: dict, state: dict, files: dict[str, Path]) -> None:
    """A checkpoint folder written on the calling thread (Ray Train workers: a local folder Ray uploads)."""
    torch.save(state, folder / STATE_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, default=float))
    for name, src in files.items():
        shutil.copyfile(src, folder / name)


def staging_folder() -> Path:
    """A new temporary folder for a Ray Train checkpoint, named by this process: Ray uploads it and deletes it;
    a worker killed during that upload leaves it behind (90-380 MB), so the folders of processes no longer alive
    are removed first. Assumes the processes that share this temporary folder share one PID namespace (one host or
    one container, as Ray's nodes are)."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{_STAGING}*_*"):
        pid = old.name[len(_STAGING):].split("_", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}_", dir=tmp))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (in-process ``checkpoint_NNNNNN`` and Ray Train's
    ``checkpoint_<timestamp>`` names do not sort together, so order by modification time, then name)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.name.startswith("checkpoint_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (in-process or Ray Train layout), or None."""
    found = checkpoints(Path(run_dir))
    return found[-1] if found else None


def next_folder(run_dir: Path) -> Path:
    numbers = [int(m.group(1)) for p in run_dir.glob("checkpoint_*") if (m := _LOCAL_NAME.fullmatch(p.name))]
    return run_dir / f"checkpoint_{max(numbers) + 1 if numbers else 0:06d}"


def prune(run_dir: Path, newest: Path, keep: int) -> None:
    """Delete the complete checkpoints older than ``newest`` but the ``keep - 1`` youngest of them (never a newer
    one: it may not be reported yet)."""
    found = checkpoints(run_dir)
    if newest not in found:
        return
    older = found[:found.index(newest)]
    for old in older[:len(older) - (keep - 1)] if keep > 1 else older:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- the writer

@dataclass(frozen=True)
class Written:
    """A finished write: where, how big, how long the thread took, how long training waited for it."""

    path: Path
    epoch: int | None
    mb: float
    write_s: float
    stall_s: float

    def metrics(self) -> dict[str, float]:
        return {"checkpoint_mb": round(self.mb, 3), "checkpoint_write_s": round(self.write_s, 4),
                "checkpoint_stall_s": round(self.stall_s, 4)}


class Writer:
    """Writes checkpoint folders of one run on a background thread, one at a time."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._thread: threading.Thread | None = None
        self._done: Written | None = None  # the newest finished write nobody took yet
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, state: dict, metrics: dict, files: dict[str, Path]) -> None:
        """Serialise ``state`` here (the training thread), write it on a thread; joins the previous write first."""
        start = time.perf_counter()
        self.join()
        buf = io.BytesIO()
        torch.save(state, buf)  # CPU bytes: CUDA tensors are copied, later in-place updates do not reach them
        blobs = {STATE_FILE: buf.getbuffer(), METRICS_FILE: json.dumps(metrics, default=float).encode()}
        blobs.update({name: Path(src).read_bytes() for name, src in files.items()})  # caller may delete them
        self.run_dir.mkdir(parents=True, exist_ok=True)
        target, stall = next_folder(self.run_dir), time.perf_counter() - start
        self._thread = threading.Thread(target=self._write, args=(target, blobs, state.get("epoch"), stall),
                                        name=f"checkpoint-writer-{target.name}", daemon=True)
        self._thread.start()

    def _write(self, target: Path, blobs: dict[str, Any], epoch: int | None, stall: float) -> None:
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=".tmp_checkpoint_"))
        try:
            for name, blob in blobs.items():
                (tmp / name).write_bytes(blob)
            tmp.rename(target)
            mb = sum(len(b) for b in blobs.values()) / 2**20
            with self._lock:
                self._done = Written(target, epoch, mb, time.perf_counter() - start, stall)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread by join()
            shutil.rmtree(tmp, ignore_errors=True)
            self._error = err

    def join(self) -> None:
        """Wait for the write in flight; raise its error on the training thread."""
        if self._thread is not None:
            start = time.perf_counter()
            self._thread.join()
            self._thread = None
            waited = time.perf_counter() - start
            with self._lock:
                if self._done is not None and waited > 1e-3:
                    self._done = replace(self._done, stall_s=self._done.stall_s + waited)
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint under {self.run_dir} failed: {err}") from err

    def take(self) -> Written | None:
        """The newest finished write not taken yet (without waiting), or None."""
        if self._thread is not None and not self._thread.is_alive():
            self.join()
        with self._lock:
            done, self._done = self._done, None
        return done


# ------------------------------------------------------------------------------------- Tune manifests

def write_manifest(folder: Path, written: Written, metrics: dict) -> None:
    """The Tune checkpoint of an in-process run: the checkpoint folder's name (relative to the run folder) and its
    epoch. Tune restores it on a retry or a resume with the trial's training_iteration and time."""
    (folder / MANIFEST_FILE).write_text(json.dumps({"checkpoint": written.path.name, "epoch": written.epoch}))
    (folder / METRICS_FILE).write_text(json.dumps(metrics, default=float))
