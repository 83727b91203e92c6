"""Where a result came from: the code version of each stage, and the tags that make every MLflow run citable.

**Stage code versions.** A stage's cache key includes the version of the code its build runs
(:func:`code_version`): a hash of the parsed source (``ast.dump``: comments and layout do not count; docstrings and
every statement do) of the packages in :data:`STAGE_CODE`. The rule: a stage depends on ``datasets/`` and on
``trainables/``'s shared modules (its top-level files: config, seeding, runtime, checkpoints, ...), plus the domain
package it runs: ``trainables/gan/`` for the DCGAN and the rendering of its pool, ``trainables/reid/`` and
``trainables/evaluation/`` for the baseline and pool-quality stages; any other stage (sMpRL) depends on all of
``trainables/``. A change there re-runs those stages on
the next sweep instead of reusing an output the older code made; a change to ``orchestrator/`` (how things are
scheduled and reported) or to the other domain package does not. Trials are never cached: they always run the
current code.

**Run tags** (:func:`run_tags`, on every run :mod:`orchestrator.tracking` creates): MLflow's own
``mlflow.source.git.commit`` / ``mlflow.source.name`` / ``mlflow.source.type`` / ``mlflow.user``, and
``mprl.git_dirty`` ("true" with ``mprl.git_diff_sha256``, the hash of ``git diff HEAD``, when the checkout has
uncommitted changes to tracked files), ``mprl.host``, ``mprl.python`` and ``mprl.versions`` (the installed versions of
this package and of torch, torchvision, ray, mlflow, numpy, scipy, pyarrow; read from package metadata, nothing is
imported), and ``mprl.source_sha256``, the parsed-source hash of ``orchestrator/``, ``trainables/`` and ``datasets/``,
which identifies the code even where there is no ``.git``. In a copy without ``.git`` (the tree ``ray up`` syncs to a
cluster) the commit comes from ``$MPRL_GIT_COMMIT`` (and the dirty flag from ``$MPRL_GIT_DIRTY``), which the README's
``ray job submit`` line sets from the user's checkout; without them it is "unknown".
"""

from __future__ import annotations

import ast
import functools
import getpass
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from trainables.methods import BASELINE

ROOT = Path(__file__).resolve().parents[1]  # the project's source tree (a checkout, or the installed copy)
SHARED = ("datasets", "trainables/*.py")
REID = (*SHARED, "trainables/reid", "trainables/evaluation")
GAN = (*SHARED, "trainables/gan")
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "dataset": ("datasets",), "decode": ("datasets",), "decode_gen": ("datasets",), "pool": ("datasets",),
    "gan": GAN, "generate": GAN,
    BASELINE: REID, "pool_quality": REID,  # the baseline stage is named after its method
}
# a stage not listed (the sMpRL stage, whose name is its method's): every package, the conservative choice
DEFAULT_CODE = (*SHARED, "trainables/reid", "trainables/evaluation", "trainables/gan")
ALL_CODE = ("orchestrator", "trainables", "datasets")
# The commit (and "true"/"false" dirty flag) of a source copy that has no .git, e.g. the tree `ray up` syncs to a
# cluster's nodes: the README's `ray job submit` passes them from the user's checkout.
COMMIT_ENV, DIRTY_ENV = "MPRL_GIT_COMMIT", "MPRL_GIT_DIRTY"
PACKAGES = ("mprl-orchestrator", "torch", "torchvision", "ray", "mlflow", "numpy", "scipy", "pyarrow")


def _files(spec: str) -> list[Path]:
    if spec.endswith("*.py"):
        return sorted((ROOT / spec[:-5]).glob("*.py"))
    return sorted((ROOT / spec).rglob("*.py"))


@functools.lru_cache(maxsize=None)
def source_hash(specs: tuple[str, ...]) -> str:
    """sha256 (12 hex) of the parsed source of every .py file under ``specs`` (paths relative to the project root;
    ``dir/*.py`` = that folder's own files only), in path order."""
    h = hashlib.sha256()
    for spec in specs:
        for path in _files(spec):
            h.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
            h.update(ast.dump(ast.parse(path.read_bytes(), str(path))).encode() + b"\0")
    return h.hexdigest()[:12]


def code_version(stage: str) -> str:
    """The version of the code stage ``stage`` runs (:data:`STAGE_CODE`; every package for a stage not listed)."""
    return source_hash(STAGE_CODE.get(stage, DEFAULT_CODE))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def run_tags() -> dict[str, str]:
    """The provenance tags of this process's runs (computed once per process)."""
    commit = (_git("rev-parse", "HEAD") or "").strip()
    given = os.environ.get(COMMIT_ENV, "").strip()  # a copy without .git (a cluster node): the commit it was made of
    tags = {"mlflow.source.git.commit": commit or given or "unknown", "mlflow.source.type": "LOCAL",
            "mprl.source_sha256": source_hash(ALL_CODE),
            "mlflow.source.name": _entry_point(), "mlflow.user": _user(),
            "mprl.host": socket.gethostname(), "mprl.python": platform.python_version(),
            "mprl.versions": json.dumps({p: _version(p) for p in PACKAGES}, sort_keys=True)}
    if given and not commit:
        tags["mprl.git_dirty"] = os.environ.get(DIRTY_ENV, "unknown")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no") or ""
        tags["mprl.git_dirty"] = "true" if status.strip() else "false"
        if status.strip():
            tags["mprl.git_diff_sha256"] = hashlib.sha256((_git("diff", "HEAD") or "").encode()).hexdigest()
    return tags


def _entry_point() -> str:
    """``orchestrator.sweep`` for ``python -m orchestrator.sweep``; the script's name otherwise."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) or Path(sys.argv[0]).name or "python"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"
