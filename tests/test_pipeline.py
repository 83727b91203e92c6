import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.config import load_config, replace
from orchestrator.pipeline import DONE, Paths, run_stage, stage_key
from orchestrator.stages import baseline_key
from orchestrator.trials import TrialSpec, build_trials


def test_trials_fold_equivalent_settings():
    cfg = load_config("smoke", overrides=["sweep.methods=[baseline, lsro, smprl]", "sweep.num_gan=[0, 64]",
                                          "sweep.orders=[paper, reference_code]", "sweep.seeds=[0, 1]"])
    keys = [t.key for t in build_trials(cfg)]
    assert len(keys) == len(set(keys))
    # per seed: 1 baseline, lsro at 64 (order folded), smprl at 64 in both orders
    assert sorted(k for k in keys if k.endswith("s0")) == sorted([
        "baseline-n0-paper-kall-s0", "lsro-n64-paper-kall-s0", "smprl-n64-paper-kall-s0",
        "smprl-n64-reference_code-kall-s0"])
    assert len(keys) == 8


def test_random_search_samples_the_grid():
    cfg = load_config("smoke", overrides=["sweep.methods=[lsro, smprl, dmprl1, dmprl2]", "sweep.num_gan=[32, 64]",
                                          "sweep.search=random", "sweep.num_samples=3"])
    a, b = build_trials(cfg), build_trials(cfg)
    assert a == b and len(a) == 3 and len({t.key for t in a}) == 3


def test_trial_overrides_apply():
    cfg = load_config("smoke")
    t = TrialSpec("smprl", 64, "reference_code", 5, 2)
    c = replace(cfg, **t.overrides())
    assert (c.labels.method, c.labels.num_gan, c.labels.order, c.labels.keep, c.reid.seed) == \
        ("smprl", 64, "reference_code", 5, 2)


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


def test_trial_keys_round_trip():
    """Tune's search space and live table hold the trial key; it parses back to the same settings."""
    for t in (TrialSpec("baseline", 0), TrialSpec("smprl", 480, "reference_code", 5, 2),
              TrialSpec("baseline_matched", 480, "paper", None, 1)):
        assert TrialSpec.from_key(t.key) == t
