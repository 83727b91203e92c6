"""While a sweep waits for GPU workers that join on demand, say what the autoscaler is doing, and stop the sweep
when no worker ever comes.

A first launch that cannot work (no ECR rights, a vCPU quota of 0, an NFS mount that hangs, an AMI whose driver
is too old for the image's CUDA) shows up as nothing but waiting: the autoscaler launches a node, its setup
fails, it terminates it and launches the next, and every one of those bills. :class:`LaunchWatch` polls the
autoscaler's status (Ray's ``autoscaler.v2.sdk.get_cluster_status``: pending and failed launches, failed nodes
with their reasons) every ``interval_s`` on a daemon thread of the driver and prints

* each failed launch or node once, with the autoscaler's reason ("VcpuLimitExceeded ...", "setup failed"),
* every 5 minutes while none has joined, what is pending, and
* after ``cluster.join_timeout_min`` minutes with no worker node ever joined and at least one failure, a
  message naming the failures and docs/clusters.md, and then stops the sweep the way Ctrl+C does (state saved,
  runs KILLED, the capacity request withdrawn).

Only before the first worker joins: later failures (a spot reclaim) are printed, never acted on.
"""

from __future__ import annotations

import _thread
import threading
import time
from typing import Any, Callable

import ray

from orchestrator.resources import WORKER_RESOURCE

REPORT_EVERY_S = 300.0  # "still waiting" lines while no worker has joined


def _status() -> Any:
    """The autoscaler's view (v2 SDK), or None where it has none (a fixed cluster, the v1 autoscaler)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        return get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
    except Exception:
        return None


def _workers_alive() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(WORKER_RESOURCE))


class LaunchWatch:
    """See the module docstring. ``status``, ``workers`` and ``stop`` are injectable for tests."""

    def __init__(self, give_up_s: float, *, interval_s: float = 30.0, status: Callable[[], Any] = _status,
                 workers: Callable[[], int] = _workers_alive, stop: Callable[[], None] = _thread.interrupt_main,
                 say: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.give_up_s, self.interval_s = give_up_s, interval_s
        self._status, self._workers, self._stop, self._say = status, workers, stop, say
        self.started = time.monotonic()
        self.joined = False
        self.failures: list[str] = []
        self._seen: set[tuple] = set()
        self._last_report = self.started
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.stopped = False

    def start(self) -> LaunchWatch:
        self._thread = threading.Thread(target=self._loop, name="launch-watch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._done.set()

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                self.poll()
            except Exception as err:  # never take the sweep down over a status read
                self._say(f"[cluster] could not read the autoscaler's status: {err}")
            if self.stopped:
                return

    def poll(self, now: float | None = None) -> None:
        """One look at the cluster; prints what is new and, past the deadline, stops the sweep (once)."""
        now = time.monotonic() if now is None else now
        if not self.joined and self._workers() > 0:
            self.joined = True
            self._say(f"[cluster] the first worker node joined after {(now - self.started) / 60:.1f} min")
        status = self._status()
        if status is not None:
            self._new_failures(status)
        if self.joined or self.stopped:
            return
        waited = now - self.started
        if self.give_up_s and waited >= self.give_up_s and self.failures:
            self.stopped = True
            self._say(f"[cluster] no worker node joined in {waited / 60:.0f} min and the autoscaler reports "
                      f"{len(self.failures)} failed launch(es) or node(s), last: {self.failures[-1]}. Stopping the "
                      f"sweep (resume it with --resume once the cause is fixed). The usual first-launch causes and "
                      f"their one-time fixes: docs/clusters.md 'Before the first ray up' (instance profiles and ECR "
                      f"rights, G-instance vCPU quotas, the EFS security group, NVIDIA driver >= 580). "
                      f"cluster.join_timeout_min=0 waits forever.")
            self._stop()
        elif now - self._last_report >= REPORT_EVERY_S:
            self._last_report = now
            pending = [f"{p.count} x {p.ray_node_type_name}" for p in getattr(status, "pending_launches", [])]
            self._say(f"[cluster] waiting {waited / 60:.0f} min for a worker node: "
                      f"{', '.join(pending) or 'no launch pending'}; {len(self.failures)} failed so far "
                      f"(`ray status` on the head shows the autoscaler's view)")

    def _new_failures(self, status: Any) -> None:
        for launch in getattr(status, "failed_launches", []):
            key = ("launch", launch.ray_node_type_name, launch.request_ts_s, launch.failed_ts_s)
            if key not in self._seen:
                self._seen.add(key)
                self._failed(f"launch of {launch.count} x {launch.ray_node_type_name} ({launch.instance_type_name}) "
                             f"failed: {launch.details or 'no reason given'}")
        for node in getattr(status, "failed_nodes", []):
            key = ("node", node.instance_id)
            if key not in self._seen:
                self._seen.add(key)
                self._failed(f"node {node.instance_id} ({node.ray_node_type_name}) failed: "
                             f"{node.failure_detail or node.details or 'no reason given'}")

    def _failed(self, what: str) -> None:
        self.failures.append(what)
        self._say(f"[cluster] {what}")


def watch(cfg: Any) -> LaunchWatch | None:
    """A started watch on a cluster that adds workers on demand (else None)."""
    from orchestrator.resources import scales_on_demand

    if not scales_on_demand(ray.cluster_resources()):
        return None
    return LaunchWatch(cfg.cluster.join_timeout_min * 60.0).start()
