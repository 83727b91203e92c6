"""The stage cache (orchestrator/stage_cache.py): keys that hash only a stage's fields, reuse, rebuild of a damaged
output (moved aside), an interrupted build that never looks complete, typed outputs that round-trip."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.config import load_config, replace
from orchestrator.stage_cache import DONE, BaselineOut, Paths, read_output, run_stage, stage_key
from orchestrator.stages import baseline_key
from trainables.config import ReidResult


def test_stage_keys_depend_only_on_their_fields():
    cfg = load_config("smoke")
    other_labels = replace(cfg, **{"labels.method": "smprl", "labels.keep": 3, "sweep.seeds": [4]})
    more_workers = replace(cfg, **{"gan.num_workers": 2, "reid.num_workers": 2, "reid.loader_workers": 3})
    assert stage_key(cfg, "dataset", "gan") == stage_key(other_labels, "dataset", "gan")
    assert stage_key(cfg, "dataset", "gan") == stage_key(more_workers, "dataset", "gan")
    assert baseline_key(cfg) == baseline_key(other_labels) == baseline_key(more_workers)
    assert baseline_key(cfg) != baseline_key(replace(cfg, **{"reid.epochs": 3}))
    assert stage_key(cfg, "dataset", "gan") != stage_key(replace(cfg, **{"gan.epochs": 9}), "dataset", "gan")
    assert baseline_key(cfg) != baseline_key(replace(cfg, **{"reid.amp": not cfg.reid.amp}))  # bf16 != fp32


@dataclass(frozen=True)
class Toy:
    out: str


def test_stage_cache_reuse_failure_and_corruption(tmp_path):
    paths = Paths(tmp_path)
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("x")
        return Toy(str(folder / "out.txt"))

    def check(folder, out):
        return [] if Path(out.out).is_file() else ["out.txt missing"]

    first = run_stage(paths, "toy", "k1", Toy, build, check)
    again = run_stage(paths, "toy", "k1", Toy, build, check)
    assert not first.cached and again.cached and len(calls) == 1
    assert again.out == first.out == Toy(str(first.path / "out.txt"))  # the typed output survives the round trip

    (first.path / "out.txt").unlink()  # a damaged output is moved aside and rebuilt
    rebuilt = run_stage(paths, "toy", "k1", Toy, build, check)
    assert not rebuilt.cached and len(calls) == 2
    assert len(list(tmp_path.glob("stages/toy-k1.corrupt-*"))) == 1

    (rebuilt.path / DONE).write_text("{broken")
    run_stage(paths, "toy", "k1", Toy, build, check)
    assert len(calls) == 3

    def boom(folder):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run_stage(paths, "toy", "k2", Toy, boom)
    assert not (tmp_path / "stages" / "toy-k2" / DONE).exists()  # never looks complete
    assert json.loads((rebuilt.path / DONE).read_text())["key"] == "k1"


def test_a_baseline_output_round_trips_its_typed_result(tmp_path):
    result = ReidResult(rank1=0.75, rank5=0.9, rank10=0.95, mAP=0.7, mINP=0.4, cmc=(0.75, 0.8, 0.9),
                        skipped_queries=0, epoch=15, num_classes=120, num_gan=0, num_train=766)
    done = run_stage(Paths(tmp_path), "baseline", "k", BaselineOut, lambda folder: BaselineOut("/runs/r", result))
    assert read_output(done.path, BaselineOut) == BaselineOut("/runs/r", result)
    assert run_stage(Paths(tmp_path), "baseline", "k", BaselineOut, lambda folder: None).out.result == result
