"""Node-local copies of decoded-cache files (``reid.local_cache_dir``): copied once per node, then memory-mapped from
local disk instead of from the shared file system.

On a cluster the decoded cache lives under ``cluster.storage_path`` (EFS, NFS): memory-mapped from there, each
node's first epoch pages it in over the network (an EFS in bursting mode shares ~100 MiB/s among all nodes), and
pages the kernel drops under memory pressure are read over it again. :func:`local_copy` gives the path a reader maps
instead:

- **Name**: the cache file's own name, which hashes every content input (image size, each image's path, byte size
  and mtime: ``datasets.decoded_cache.cache_path``), so a local file of that name holds the same rows. It is reused
  by every later trial and sweep on the node, never rewritten in place.
- **Once per node**: the copy runs under an exclusive ``fcntl.flock`` of ``<name>.lock`` beside it; trials, DDP
  ranks and threads that wait on the lock then find the finished copy.
- **Atomic**: written to ``.<name>.tmp-<pid>``, flushed to disk, verified, then renamed (``os.replace``): a reader
  never maps a partial file; a temporary left by a killed copy is removed by the next lock holder.
- **Verified before use** (a fresh copy and one found): its byte size and ``.npy`` header (dtype, shape) equal the
  shared file's, and its first, middle and last rows are byte-identical to them; a bad copy is replaced.
- **Disk**: copied only when the local file system keeps :data:`RESERVE` bytes free after the copy; otherwise (and
  when the copy fails) the shared file is used, with a warning.

The folder comes from ``reid.local_cache_dir``, or, when that is empty, from ``$MPRL_LOCAL_CACHE`` on the node that
reads (:func:`local_dir`); nothing is ever deleted from it (cluster nodes are disposable; on a long-lived node prune
it by hand).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

LOCAL_CACHE_ENV = "MPRL_LOCAL_CACHE"  # the node's local folder when reid.local_cache_dir is empty
OFF = "none"  # reid.local_cache_dir=none
RESERVE = 1 << 30  # bytes a copy must leave free on the local file system


def local_dir(setting: str) -> str | None:
    """The local folder ``reid.local_cache_dir`` = ``setting`` names: itself; ``""``: ``$MPRL_LOCAL_CACHE`` (unset
    or empty: no copy); ``"none"``: no copy, whatever the environment says."""
    value = setting or os.environ.get(LOCAL_CACHE_ENV, "")
    return None if value in ("", OFF) else str(Path(value).expanduser())


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive ``flock`` of ``lock_file`` (created if need be); processes and threads each wait their turn."""
    with open(lock_file, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def problem(local: str | Path, shared: str | Path) -> str | None:
    """Why ``local`` is not a good copy of the ``.npy`` file ``shared`` (None: it is): size, header, sampled rows."""
    try:
        have, want = os.stat(local).st_size, os.stat(shared).st_size
        if have != want:
            return f"{have} bytes, the shared file has {want}"
        a, b = np.load(local, mmap_mode="r"), np.load(shared, mmap_mode="r")
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"holds {a.dtype} {list(a.shape)}, the shared file {b.dtype} {list(b.shape)}"
        rows = sorted({0, len(b) // 2, len(b) - 1}) if b.ndim and len(b) else []
        bad = [i for i in rows if not np.array_equal(a[i], b[i])]
        return f"row {bad[0]} differs from the shared file's" if bad else None
    except (OSError, ValueError) as err:  # truncated or damaged header: np.load cannot map it
        return f"unreadable ({type(err).__name__}: {err})"


def _copy(shared: Path, tmp: Path) -> None:
    """``shared`` -> ``tmp``, on disk when this returns."""
    shutil.copyfile(shared, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def _warn(message: str) -> None:
    print(f"[decoded cache] warning: {message}", flush=True)


def local_copy(shared: str | Path, folder: str | Path) -> str:
    """The path to map ``shared`` (a decoded-cache file) from: its verified copy in ``folder``, made now if missing
    or bad (once per node: see the module docstring), or ``shared`` itself when ``folder`` lacks the room, cannot be
    written or the copy fails (a warning says why)."""
    shared, folder = Path(shared), Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / f"{shared.name}.lock"):
            return _copy_once(shared, folder)
    except OSError as err:
        _warn(f"copying {shared} to {folder} failed ({type(err).__name__}: {err}); reading it from shared storage")
        return str(shared)


def _copy_once(shared: Path, folder: Path) -> str:
    """:func:`local_copy` with the lock held."""
    local = folder / shared.name
    if local.exists():
        why = problem(local, shared)
        if why is None:
            return str(local)  # the same name is the same content: copied by an earlier trial
        _warn(f"local copy {local} is bad ({why}); copying it again")
        local.unlink()
    for tmp in folder.glob(f".{shared.name}.tmp-*"):  # left by a copy that was killed (we hold the lock)
        tmp.unlink(missing_ok=True)
    size, free = shared.stat().st_size, shutil.disk_usage(folder).free
    if free - size < RESERVE:
        _warn(f"{folder} has {free / 2**30:.1f} GiB free, too little for {shared.name} ({size / 2**30:.1f} GiB "
              f"and {RESERVE / 2**30:.0f} GiB to spare); reading it from shared storage")
        return str(shared)
    tmp = folder / f".{shared.name}.tmp-{os.getpid()}"
    try:
        _copy(shared, tmp)
        why = problem(tmp, shared)
        if why is not None:
            raise OSError(f"the copy does not match: {why}")
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(local)
