"""The stage DAG on Ray (orchestrator/dag.py): stages run in Ray workers (never the driver), independent ones at
once, chained by outputs; a failed stage fails its dependants with its message."""

import json
import os
import time
from dataclasses import dataclass

import pytest

from orchestrator import dag
from orchestrator.stage_cache import ERROR, Paths, require_finished, versioned_key
from orchestrator.stages import Plan, StageNode


@dataclass(frozen=True)
class Out:
    name: str


def nm(stage: str) -> str:
    """The folder name of toy stage ``stage`` with key "k" (the key carries the stage's code version)."""
    return f"{stage}-{versioned_key(stage, 'k')}"


def _node(log, stage: str, deps=(), *, meet: str = "", fail: bool = False) -> StageNode:
    """A toy stage; with ``meet``, it waits (up to 60 s) until stage ``meet`` has started too: two stages that
    meet can only both finish if they run at the same time."""
    def build(folder, *inputs):
        start = time.time()
        (log / f"{stage}.started").touch()
        while meet and not (log / f"{meet}.started").exists() and time.time() - start < 60:
            time.sleep(0.2)
        if fail:
            raise ValueError(f"{stage} broke")
        record = {"pid": os.getpid(), "start": start, "end": time.time(), "inputs": [i.out.name for i in inputs]}
        (log / stage).write_text(json.dumps(record))
        return Out(stage)

    return StageNode(stage, "k", Out, tuple(nm(d) for d in deps), {"CPU": 1}, build)


def _plan(*nodes: StageNode) -> Plan:
    return Plan({n.name: n for n in nodes}, dataset=nodes[0].name, data_root="")


def test_stages_run_in_workers_at_once_and_chained(tmp_path, local_ray):
    log = tmp_path / "log"
    log.mkdir()
    plan = _plan(_node(log, "data"), _node(log, "gan", ["data"], meet="base"), _node(log, "base", ["data"], meet="gan"),
                 _node(log, "gen", ["gan"]), _node(log, "smprl", ["base", "gen"]))
    seen = []
    graph = dag.StageGraph(plan, Paths(tmp_path), "s1", on_done=lambda n, r, e: seen.append(n.name)).start()
    graph.wait()
    graph.close()
    runs = {s: json.loads((log / s).read_text()) for s in ("data", "gan", "base", "gen", "smprl")}
    assert all(r["pid"] != os.getpid() for r in runs.values()), "a stage computed in the driver"
    assert runs["gan"]["start"] < runs["base"]["end"] and runs["base"]["start"] < runs["gan"]["end"], \
        "the GAN and the baseline did not run at the same time"
    assert runs["gen"]["start"] >= runs["gan"]["end"] and runs["smprl"]["inputs"] == ["base", "gen"]
    assert seen.index(nm("data")) < seen.index(nm("gan")) < seen.index(nm("gen")) < seen.index(nm("smprl"))
    assert all(f"pid {runs[n.split('-')[0]]['pid']}" in graph.results[n].where for n in plan.nodes)

    again = dag.StageGraph(plan, Paths(tmp_path), "s2").start()  # everything cached: nothing submitted
    assert not again._refs and all(r.cached for r in again.results.values())
    again.close()


def test_a_failed_stage_fails_its_dependants_with_its_message(tmp_path, local_ray):
    log = tmp_path / "log"
    log.mkdir()
    plan = _plan(_node(log, "data"), _node(log, "gan", ["data"], fail=True), _node(log, "gen", ["gan"]),
                 _node(log, "base", ["data"]))
    graph = dag.StageGraph(plan, Paths(tmp_path), "s3").start()
    graph.wait()
    graph.close()
    assert graph.errors[nm("gan")] == "ValueError: gan broke"
    assert graph.errors[nm("gen")] == f"input stage {nm('gan')} failed"
    assert set(graph.results) == {nm("data"), nm("base")}  # the independent branch still finished
    assert (tmp_path / "stages" / nm("gan") / ERROR).read_text().strip() == "ValueError: gan broke"
    with pytest.raises(FileNotFoundError,
                       match=f"input stage {nm('gen')} has not finished: input stage {nm('gan')} failed"):
        require_finished(tmp_path / "stages" / nm("gen"))
    assert not (log / "gen").exists()
