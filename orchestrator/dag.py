"""The stage DAG on Ray: every stage that is not cached runs as a Ray task, chained to its inputs by ObjectRefs.

The driver only plans and watches: :meth:`StageGraph.start` looks up each stage's cache and submits the rest
(Ray runs a task once the tasks it takes refs from are done, so the GAN and the baselines start at once, the
generation after the GAN, sMpRL after its baseline and the generation). :meth:`StageGraph.poll` collects finished
stages without blocking (the trial searcher calls it before each suggestion, so a trial starts as soon as its own
inputs exist) and hands each to ``on_done`` (the MLflow stage run). A failed stage's message is written to
``error.txt`` in its folder, where the trials that needed it read it.

Tune's searcher lives in the driver and is pickled with the experiment (``Tuner.restore``), so it finds the
graph of the running sweep by name (:func:`active`), never by holding it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import ray

from datasets.files import atomic_write_bytes
from orchestrator.resources import ray_options
from orchestrator.stage_cache import ERROR, Paths, StageResult, lookup, run_stage
from orchestrator.stages import Plan, StageNode
from trainables.logs import configure_logging
from trainables.placement import process_label

# sweep name -> its graph, in this driver process. The one piece of module state: Tune pickles the searcher with the
# experiment (Tuner.restore rebuilds it), so the searcher finds the live graph by name instead of holding it.
_ACTIVE: dict[str, "StageGraph"] = {}


def active(sweep: str) -> "StageGraph":
    try:
        return _ACTIVE[sweep]
    except KeyError:
        raise RuntimeError(f"no stage graph is running for sweep {sweep}") from None


def execute(paths: Paths, node: StageNode, *deps: StageResult) -> StageResult:
    """Body of a stage's Ray task: build (or reuse) the node's output; records where it ran and its CPU time."""
    configure_logging()  # the stage's messages show (a worker process)
    cpu = time.process_time()
    res = run_stage(paths, node.stage, node.key, node.kind, lambda folder: node.build(folder, *deps), node.check)
    return dataclasses.replace(res, where=process_label(), cpu_seconds=round(time.process_time() - cpu, 1),
                               ended=time.time())


class StageGraph:
    """Runs a :class:`~orchestrator.stages.Plan`'s stages as Ray tasks; see the module docstring."""

    def __init__(self, plan: Plan, paths: Paths, sweep: str,
                 on_done: Callable[[StageNode, StageResult | None, str | None], None] | None = None) -> None:
        self.plan, self.paths, self.sweep, self.on_done = plan, paths, sweep, on_done
        self.results: dict[str, StageResult] = {}
        self.errors: dict[str, str] = {}
        self._refs: dict[str, object] = {}  # node name -> ObjectRef of its task
        self.started, self._started_unix = time.perf_counter(), time.time()
        self.finished_at: dict[str, float] = {}  # node name -> seconds after start when it finished

    def start(self) -> "StageGraph":
        """Reuse cached stages, submit the others (in topological order); returns at once."""

        task = ray.remote(max_retries=1)(execute)  # a retry only for a lost worker/node, not for an error
        for name, node in self.plan.nodes.items():
            hit, _ = lookup(self.paths, node.stage, node.key, node.kind, node.check)
            if hit is not None:
                self._finish(node, hit, None)
                continue
            args = [self.results.get(d) or self._refs[d] for d in node.deps]
            (self.paths.stages / name / ERROR).unlink(missing_ok=True)  # a resumed sweep retries a failed stage
            print(f"[pipeline] {name}: submitted ({_fmt(node.resources)})", flush=True)
            self._refs[name] = task.options(name=f"stage:{name}", **ray_options(node.resources)).remote(
                self.paths, node, *args)
        _ACTIVE[self.sweep] = self
        return self

    def poll(self, timeout: float | None = 0) -> None:
        """Collect the stages that finished (waiting up to ``timeout`` s for the first one; None = for all)."""

        if not self._refs:
            return
        refs = list(self._refs.values())
        ready, _ = ray.wait(refs, num_returns=len(refs) if timeout is None else 1, timeout=timeout)
        if timeout is not None and ready:  # then take every other one that is also done
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        order = list(self.plan.nodes)
        by_ref = {ref: name for name, ref in self._refs.items()}
        for name in sorted((by_ref[r] for r in ready), key=order.index):  # inputs before their dependants
            ref, node = self._refs.pop(name), self.plan.nodes[name]
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a stage's failure fails its dependants, not the sweep
                failed = [d for d in node.deps if d in self.errors]
                self._finish(node, None, f"input stage {failed[0]} failed" if failed else _message(err))
                for other, dep_node in self.plan.nodes.items():  # do not let dependants wait for resources
                    if name in dep_node.deps and other in self._refs:
                        ray.cancel(self._refs[other])
            else:
                self._finish(node, result, None)

    def wait(self) -> None:
        """Block until every submitted stage has finished or failed."""
        while self._refs:
            self.poll(timeout=None)

    def finished(self, name: str) -> bool:
        """True once the stage has a result or an error."""
        if name not in self.plan.nodes:  # a trial would wait forever for it
            raise RuntimeError(f"stage {name} is not part of this sweep's plan")
        return name in self.results or name in self.errors

    def close(self) -> None:
        """Cancel stages still running (an interrupted sweep) and forget the graph."""

        for ref in self._refs.values():
            ray.cancel(ref, force=True)
        _ACTIVE.pop(self.sweep, None)

    def _finish(self, node: StageNode, result: StageResult | None, error: str | None) -> None:
        ended = result.ended if result is not None and result.ended else time.time()  # the task's own clock
        self.finished_at[node.name] = round(ended - self._started_unix, 1)
        if result is not None:
            self.results[node.name] = result
            (self.paths.stages / node.name / ERROR).unlink(missing_ok=True)
        else:
            self.errors[node.name] = error
            folder = self.paths.stages / node.name
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / ERROR, (error + "\n").encode())
            print(f"[pipeline] {node.name} FAILED: {error}", flush=True)
        if self.on_done:
            try:
                self.on_done(node, result, error)
            except Exception as err:  # noqa: BLE001 - a logging failure must not fail the stage or stop Tune
                print(f"[pipeline] could not log {node.name} to MLflow: {type(err).__name__}: {err}", flush=True)


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in resources.items() if v)


def _message(err: BaseException) -> str:
    """The stage's own exception, not Ray's wrapped traceback header (a dependant's error names its input)."""
    cause = getattr(err, "cause", None)
    inner = cause if isinstance(cause, BaseException) else err
    text = f"{type(inner).__name__}: {inner}"
    return text.splitlines()[0][:2000] if "RayTaskError" in type(err).__name__ and cause is None else text[:2000]
