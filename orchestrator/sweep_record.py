"""A sweep's name, the record of its config, and which sweep ``--resume`` continues.

A sweep is ``sweep-<hash>-<n>`` (its Tune experiment ``<storage>/tune/<name>``, its MLflow parent run): the hash
covers what its results depend on, the ``dataset``, ``gan``, ``reid``, ``labels`` and ``sweep`` sections without
their runtime fields (``RUNTIME_FIELDS``: workers, GPUs, loader processes; ``SWEEP_RUNTIME_FIELDS``:
``sweep.max_concurrent``, ``sweep.max_failures``; ``cluster.*`` never counts, but ``--resume`` refuses a changed
``cluster.experiment``); ``n`` numbers the sweeps of one
config. A sweep writes its resolved config into its folder (:data:`RECORD`) when it starts and marks it finished
at its end.

``--resume`` continues the latest sweep of the same hash (a runtime field that changed is listed, and accepted).
Without one, it reads the record of the latest sweep in the storage: an interrupted sweep that ran with other
settings is refused, naming each changed field (old -> new); after a finished one, or none, a new sweep starts (and
says so: a job that always passes ``--resume`` starts its first sweep that way). :func:`resolve` only reads.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.files import atomic_write_bytes
from orchestrator.config import RUNTIME_FIELDS, SWEEP_RUNTIME_FIELDS, Config, to_dict

RECORD = "mprl_sweep.json"  # in the sweep's Tune folder: {"name", "config", "finished", "written"}
SECTIONS = ("dataset", "gan", "reid", "labels", "sweep")
RUNTIME_HELP = (f"gan./reid.{{{','.join(RUNTIME_FIELDS)}}}, sweep.{{{','.join(SWEEP_RUNTIME_FIELDS)}}}, "
                "cluster.* but cluster.experiment")
ABSENT = "(absent)"  # a field one of two compared configs does not have (written by another version)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class SweepName:
    """What a sweep command runs: a sweep's name, whether it continues that sweep, and what changed since."""

    name: str
    resumed: bool
    runtime_changes: tuple[Change, ...] = ()
    note: str | None = None  # one line for the user (a new sweep started by --resume, a sweep named the old way)


@dataclass(frozen=True)
class Record:
    name: str
    config: dict[str, Any]
    finished: bool
    mtime: float


def runtime_field(key: str) -> bool:
    """Whether a dotted config field changes where or how fast a sweep runs, not what it produces."""
    section, _, name = key.partition(".")
    # every cluster field but the MLflow experiment: the restored Tune state logs into the experiment it began with
    return ((section == "cluster" and name != "experiment") or (section in ("gan", "reid") and name in RUNTIME_FIELDS)
            or (section == "sweep" and name in SWEEP_RUNTIME_FIELDS))


def result_fields(tree: dict[str, Any]) -> dict[str, Any]:
    """The flat fields of a config tree (``to_dict``) that its results depend on (the hash's)."""
    return {k: v for k, v in _flatten(tree).items() if k.split(".", 1)[0] in SECTIONS and not runtime_field(k)}


def sweep_hash(cfg: Config) -> str:
    blob = json.dumps(result_fields(to_dict(cfg)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every field of :data:`SECTIONS` (and ``cluster``) in which two config trees differ, in key order."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in {*a, *b} if k.split(".", 1)[0] in (*SECTIONS, "cluster"))
    return [Change(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys if a.get(k, ABSENT) != b.get(k, ABSENT)]


def resolve(cfg: Config, tune: Path, resume: bool) -> SweepName:
    """The sweep a command runs (see the module docstring); ValueError when ``--resume`` would continue an
    interrupted sweep of other settings. Reads ``tune`` only."""
    base = f"sweep-{sweep_hash(cfg)}"
    n = _latest(tune, base)
    if not resume:
        return SweepName(f"{base}-{n + 1}", False)
    if n:
        name = f"{base}-{n}"
        record = read_record(tune / name)
        found = changes(record.config, to_dict(cfg)) if record else []  # the hash is the same: cluster.* at most
        _refuse(name, "", [c for c in found if not runtime_field(c.key)])
        return SweepName(name, True, tuple(found))
    legacy = f"sweep-{legacy_hash(cfg)}"  # named before the runtime fields left the hash
    if _latest(tune, legacy):
        return SweepName(f"{legacy}-{_latest(tune, legacy)}", True)
    last = latest_record(tune)
    if last is not None and not last.finished:
        fixed = [c for c in changes(last.config, to_dict(cfg)) if not runtime_field(c.key)]
        _refuse(last.name, " (interrupted)", fixed)
    return SweepName(f"{base}-1", False, note=f"--resume: no interrupted sweep of this config under {tune}; "
                                              f"starting {base}-1")


def _refuse(name: str, state: str, fixed: list[Change]) -> None:
    if fixed:
        raise ValueError(f"--resume: the latest sweep, {name}{state}, ran with other settings: "
                         f"{'; '.join(map(str, fixed))}. Only runtime fields may change on --resume "
                         f"({RUNTIME_HELP}): set these back to resume it, or drop --resume to start a new sweep")


def legacy_hash(cfg: Config) -> str:
    """The name hash of sweeps made before this version: every field of :data:`SECTIONS`, runtime ones too, and no
    ``dataset.test_root`` (it did not exist; an empty one is left out so that those sweeps are found)."""
    tree = {s: to_dict(cfg)[s] for s in SECTIONS}
    if not tree["dataset"].get("test_root"):
        tree["dataset"] = {k: v for k, v in tree["dataset"].items() if k != "test_root"}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def write_record(tune: Path, name: str, cfg: Config, *, finished: bool = False) -> Path:
    """Write (atomically) the config ``name`` runs with, and whether it finished."""
    path = tune / name / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"name": name, "config": to_dict(cfg), "finished": finished, "written": time.time()}
    atomic_write_bytes(path, json.dumps(blob, indent=1).encode())
    return path


def read_record(folder: Path) -> Record | None:
    """The record in a sweep's folder; None when it has none (a sweep of an older version) or it is unreadable."""
    path = folder / RECORD
    try:
        blob = json.loads(path.read_text())
        return Record(blob["name"], blob["config"], bool(blob["finished"]), path.stat().st_mtime)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_record(tune: Path) -> Record | None:
    """The record written last under ``tune`` (any config), or None."""
    found = [r for r in (read_record(p.parent) for p in tune.glob(f"sweep-*/{RECORD}")) if r is not None]
    return max(found, key=lambda r: r.mtime, default=None)


def _latest(tune: Path, base: str) -> int:
    """The highest n with a folder ``<base>-<n>`` (numbered from 1, no gaps), 0 when there is none."""
    n = 0
    while (tune / f"{base}-{n + 1}").exists():
        n += 1
    return n


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    return value if value == ABSENT else json.dumps(value)
