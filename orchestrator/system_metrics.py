"""MLflow system metrics for a trial: CPU, memory, disk, network and, where NVML finds one, GPU utilisation and memory.

MLflow's own monitor (``mlflow.system_metrics``: psutil, and NVIDIA's NVML bindings for GPUs) samples the machine the
trial's process runs on every :data:`INTERVAL_S` seconds (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it)
and logs ``system/<node>/...`` metrics on the trial's run, the node named as in the placement tags. A trial whose
training runs in a Ray Train worker group is sampled on its trial actor's node, which holds rank 0 when one node
has the whole group. A trial shorter than one interval gets one sample, at its end. A missing library or a monitor
that fails to start never fails the trial: it is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Iterator

INTERVAL_S = 10.0
DISABLE_ENV = "MPRL_SYSTEM_METRICS"  # "0": no system metrics
log = logging.getLogger(__name__)


@contextlib.contextmanager
def monitored(run_id: str, tracking_uri: str, node: str, *, interval_s: float = INTERVAL_S) -> Iterator[object]:
    """Sample system metrics onto run ``run_id`` while the block runs; yields the monitor (None when off)."""
    monitor = None
    if os.environ.get(DISABLE_ENV, "1") != "0":
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                           node_id=re.sub(r"[^A-Za-z0-9_.-]", "_", node), tracking_uri=tracking_uri)
            monitor.start()
        except Exception as err:  # psutil missing, NVML broken, ...: the trial goes on without them
            log.warning("system metrics are off for run %s: %s", run_id, err)
            monitor = None
    first_step = getattr(monitor, "_logging_step", None)
    try:
        yield monitor
    finally:
        if monitor is not None:
            try:
                monitor.finish()
                if getattr(monitor, "_logging_step", None) == first_step:  # shorter than one interval: one sample
                    monitor.collect_metrics()
                    monitor.publish_metrics(monitor.aggregate_metrics())
                    monitor.mlflow_logger.flush()
            except Exception as err:
                log.warning("system metrics of run %s did not finish cleanly: %s", run_id, err)
