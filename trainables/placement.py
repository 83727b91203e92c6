"""Where this process runs, in one format for every log line, MLflow tag and error message.

``node <ip> (<first 12 characters of the Ray node id>)``, with ``pid N`` for a process. Stdlib only (Ray is
imported when it is already initialised), so the driver's cluster checks use it without importing torch.
"""

from __future__ import annotations

import os
import socket

LOGICAL_GPUS_ENV = "MPRL_LOGICAL_GPUS"  # "1": GPUs that nodes advertise may be logical (tests, the rehearsal)


def node_name(ip: str, node_id: str) -> str:
    """``node 10.0.1.5 (a1b2c3d4e5f6)``: a Ray node as every message names it."""
    return f"node {ip} ({node_id[:12]})"


def node_label() -> str:
    """The Ray node this process runs on (:func:`node_name`), or ``host <name>`` outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return node_name(ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001 - outside a Ray worker, or Ray not installed
        pass
    return f"host {socket.gethostname()}"


def process_label() -> str:
    """``node <ip> (<id>) pid <pid>``: which process built a stage, ran a trial or rendered a shard."""
    return f"{node_label()} pid {os.getpid()}"
