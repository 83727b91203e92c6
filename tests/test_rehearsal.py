"""The scale rehearsal (bench.rehearsal) end to end: Market-1501's counts on a loopback cluster shaped like
clusters/gpu.yaml; it fails (exit 1) when a stage or trial ran on the head or in the driver, or when the critical
path exceeds its bound."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_rehearsal_places_nothing_on_the_head_and_meets_its_critical_path_bound(tmp_path, capsys):
    from bench import rehearsal

    code = rehearsal.main(["--keep", str(tmp_path / "storage")])
    out = capsys.readouterr().out
    assert code == 0, out[-6000:]
    assert "rehearsal: passed" in out
    for name in ("dataset-", "gan-", "generate-", "baseline-", "smprl-", "pool_quality-", "pool-"):
        assert f"stage       {name}" in out  # every stage was built, in a worker
    trials = [line for line in out.splitlines() if line.startswith("trial ")]
    # 9 methods, 3 of them also in the reference code's rank order, the learning-rate ablation: 8 methods (not
    # sMpRL), its baseline trained as a trial, and LSRO on the synthetic_ids pool (24,000 unseen-identity images)
    assert len(trials) == 21
    assert any(line.startswith("trial       lsro-n24000-paper-kall-s0-psynthetic_ids") for line in trials)
    assert all("HEAD" not in line for line in out.splitlines() if line.startswith(("trial", "stage", "generation")))
    # both GPU workers ran trials (a regression ran all in one reused Tune actor: see orchestrator/trial_actor.py)
    assert len({line.split("node ")[1].split(")")[0] for line in trials}) == 2
