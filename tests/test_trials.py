"""The sweep's trial list (orchestrator/trials.py): equivalent settings folded, random search, the overrides a
trial applies, keys that parse back, and the typed row of the results table."""

from orchestrator.config import load_config, replace
from orchestrator.trials import TrialRow, TrialSpec, build_trials


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


def test_trial_keys_round_trip():
    """Tune's search space and live table hold the trial key; it parses back to the same settings."""
    for t in (TrialSpec("baseline", 0), TrialSpec("smprl", 480, "reference_code", 5, 2),
              TrialSpec("baseline_matched", 480, "paper", None, 1)):
        assert TrialSpec.from_key(t.key) == t


def test_a_trial_row_flattens_for_results_json():
    row = TrialRow(TrialSpec("lsro", 360, seed=2), rank1=0.7, mAP=0.6, status="FINISHED")
    flat = row.as_dict()
    assert flat["trial"] == "lsro-n360-paper-kall-s2" and (flat["method"], flat["num_gan"], flat["seed"]) == (
        "lsro", 360, 2)
    assert (flat["rank1"], flat["mAP"], flat["status"], flat["error"]) == (0.7, 0.6, "FINISHED", None)
