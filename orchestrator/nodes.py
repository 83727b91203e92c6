"""Every path the workers read or write, checked from every node before any stage runs.

The driver's own checks (``stages.check_dataset``, the storage marker) see the driver's disk. Stages and trials
run on worker nodes, so a ``dataset.root`` on the head's local disk, or a storage mount missing on one node,
would only fail there, hours later. :func:`check_paths_on_nodes` runs one small Ray task on each alive node
(pinned there, no CPU) that looks at the same paths, and raises one ValueError naming every node and path that
is unusable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# the field a path came from, for messages; the probe knows how each is used
DATASET_FIELD = "dataset.root"
STORAGE_FIELD = "cluster.storage_path"


def worker_paths(cfg: Any) -> dict[str, str]:
    """``{field: path}`` of what workers use: the storage path (written) and a given dataset root (read)."""
    out = {STORAGE_FIELD: str(Path(cfg.cluster.storage_path))}
    if cfg.dataset.root:
        out[DATASET_FIELD] = str(Path(cfg.dataset.root).expanduser().absolute())
    return out


def path_problems(paths: dict[str, str]) -> dict[str, str]:
    """``{field: problem}`` for the paths unusable from this process: runs on each node (and is testable here).

    The dataset root must be a readable folder; the storage path a writable folder (the driver creates it
    before the check, so on shared storage it exists everywhere).
    """
    problems = {}
    for field, path in paths.items():
        p = Path(path)
        write = field == STORAGE_FIELD
        if not p.is_dir():
            problems[field] = f"{field}={path} does not exist there" if not p.exists() else \
                f"{field}={path} is not a folder there"
        elif not os.access(p, (os.W_OK if write else os.R_OK) | os.X_OK):
            problems[field] = f"{field}={path} is not {'writable' if write else 'readable'} there"
    return problems


def _node_name(node: dict[str, Any]) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:12]})"


def check_paths_on_nodes(cfg: Any, nodes: list[dict[str, Any]], timeout_s: float = 120.0) -> None:
    """Raise ValueError naming each node and path the workers could not use (one task per node in ``nodes``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = worker_paths(cfg)
    probe = ray.remote(num_cpus=0, max_retries=0)(path_problems)
    refs = {_node_name(n): probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(paths) for n in nodes}
    try:
        found = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise ValueError(f"could not check {', '.join(paths.values())} on every node within {timeout_s:g} s "
                         f"(a node without free memory or a hung mount?)") from None
    message = problems_message(found)
    if message:
        raise ValueError(message)


def problems_message(found: dict[str, dict[str, str]]) -> str | None:
    """One message for ``{node: {field: problem}}``, or None when every node can use every path."""
    bad = [f"on node {node}: " + "; ".join(problems.values()) for node, problems in found.items() if problems]
    if not bad:
        return None
    return ("the workers could not use these paths (every node needs the dataset and the storage at the same "
            "path, e.g. on the shared mount): " + " | ".join(bad))
