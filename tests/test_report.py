"""The report compares each dataset and model only with its own published numbers, and says which row it matched."""

import pytest

from orchestrator.paper_numbers import paper_row
from orchestrator.report import TrialResult, format_report, summarise


def test_identification_runs_match_table_iv_on_the_ratio():
    row, note = paper_row("market1501", "ident", "dmprl2", 24000, 12936)
    assert (row.table, row.num_gan, row.mAP, row.rank1) == ("IV", 24000, 58.59, 80.37)  # as printed in TIP 2019
    assert "1.86x" in note and not row.reference_only
    row, _ = paper_row("market1501", "ident", "lsro", 2 * 12936, 12936)  # 2.0x: nearest is 24k (1.86x)
    assert row.num_gan == 24000


def test_ratios_outside_the_papers_range_have_no_row():
    row, note = paper_row("market1501", "ident", "lsro", 480, 4660)  # 0.10x
    assert row is None and "outside the paper's 0.93x-3.71x" in note
    assert paper_row("market1501", "ident", "lsro", 10 * 12936, 12936)[0] is None


def test_two_stream_runs_compare_with_table_vii_not_iv():
    row, _ = paper_row("market1501", "twostream", "baseline", 0, 12936)
    assert row.table == "VII" and (row.mAP, row.rank1) == (64.09, 81.83)
    assert paper_row("market1501", "twostream", "dmprl2", 24000, 12936)[0].table == "VII"
    assert paper_row("market1501", "twostream", "lsro", 24000, 12936)[0] is None  # Table VII has no LSRO row


def test_each_dataset_only_with_its_own_numbers():
    duke, _ = paper_row("dukemtmc", "ident", "baseline", 0, 16522)
    assert duke.table == "III" and duke.rank1 == 61.94
    assert paper_row("dukemtmc", "ident", "smprl", 24000, 16522)[0] is None  # Table III has no sMpRL row
    row, note = paper_row("cuhk03np", "ident", "baseline", 0, 7365)
    assert row is None and "1,367" in note
    synth, _ = paper_row("synthetic", "ident", "baseline", 0, 466)
    assert synth.reference_only and (synth.mAP, synth.rank1) == (52.68, 74.08)  # Table IV's baseline, for the gain


def _row(dataset, model, method, n, seed, r1, setting="s1", **kw):
    return TrialResult(setting, "cpu", dataset, model, method, n, kw.pop("order", "paper"), "None", seed=seed, rank1=r1,
                       mAP=r1 - 10, num_train=12936, **kw)


def test_summary_keeps_datasets_models_and_settings_apart():
    rows = [_row("market1501", "ident", "baseline", 0, s, 70 + s) for s in range(3)]
    rows += [_row("market1501", "ident", "dmprl2", 24000, s, 75 + s + (s == 2) / 10) for s in range(3)]
    rows += [_row("market1501", "twostream", "baseline", 0, 0, 80)]
    rows += [_row("market1501", "ident", "dmprl2", 24000, 0, 10, setting="s2")]  # another setting: not merged
    groups = summarise(rows)
    assert len(groups) == 4
    dm = next(g for g in groups if g.method == "dmprl2" and g.setting == "s1")
    d = dm.vs["baseline"]["rank1"]
    assert d.n == 3 and abs(d.mean - (5 + 0.1 / 3)) < 1e-6 and d.verdict == "better" and d.p < 0.05
    assert dm.paper_gain_rank1 == 80.37 - 74.08 and dm.seeds == [0, 1, 2]
    other = next(g for g in groups if g.setting == "s2")
    assert other.vs["baseline"] is None and other.rank1.n == 1  # no baseline of its own setting
    text = format_report(groups)
    assert "setting s1" in text and "setting s2" in text and "IV 24000" in text and "VII" in text


def test_the_compute_matched_control_is_taken_at_the_same_number_of_images():
    rows = [_row("market1501", "ident", "baseline", 0, s, 70) for s in range(2)]
    rows += [_row("market1501", "ident", "baseline_matched", n, s, 72 + n / 1e4) for n in (12000, 24000)
             for s in range(2)]
    rows += [_row("market1501", "ident", "lsro", 24000, s, 75 + s) for s in range(2)]
    lsro = next(g for g in summarise(rows) if g.method == "lsro")
    assert lsro.vs["baseline_matched"]["rank1"].mean == pytest.approx(1.1)  # 75.5 - 74.4: the one at 24,000
    assert lsro.vs["baseline"]["rank1"].mean == pytest.approx(5.5)
    assert "Δr1 vs baseline_matched" in format_report(summarise(rows))


def test_statistics_and_verdicts():
    from orchestrator.stats import paired, summary

    s = summary([70.0, 72.0, 74.0])
    assert (s.n, s.mean, s.std) == (3, 72.0, 2.0) and abs(s.ci - 4.968) < 1e-3  # t(0.975, 2) * 2 / sqrt(3)
    assert summary([70.0]).ci is None
    noisy = paired({0: 70.0, 1: 75.0, 2: 68.0}, {0: 69.0, 1: 70.0, 2: 71.0})
    assert noisy.verdict == "no detectable difference at n=3" and noisy.p > 0.05
    assert paired({0: 70.0}, {0: 60.0}).verdict == "one seed: no test (n=1)"
    assert paired({0: 60.0, 1: 61.0, 2: 59.5}, {0: 70.0, 1: 71.0, 2: 70.0}).verdict == "worse"
    assert paired({0: 1.0}, {1: 1.0}) is None  # no common seed: nothing to pair


def test_report_reads_one_sweep_and_never_merges_settings(tmp_path):
    """Two sweeps of different settings in one experiment: the default report reads only the latest, and the
    same sweep's groups stay apart when a non-swept field differs."""
    import time

    from orchestrator import tracking
    from orchestrator.report import collect, find_sweep, latest_sweep

    client, exp_id = tracking.setup(tracking.default_tracking_uri(tmp_path), "mprl", tmp_path)
    for name, epochs in (("sweep-a-1", 12), ("sweep-b-1", 30)):
        parent, _ = tracking.get_or_create_run(client, exp_id, "sweep", name, name)
        run = tracking.SweepRun(client, exp_id, name, parent, "")
        for seed in (0, 1):
            rid, _ = run.child("trial", f"{name}/t{seed}", f"t{seed}")
            tracking.log_params(client, rid, {"labels.method": "baseline", "labels.num_gan": 0, "reid.seed": seed,
                                              "reid.epochs": epochs, "dataset.name": "synthetic",
                                              "reid.num_workers": seed})  # runtime fields never split a group
            tracking.log_metrics(client, rid, {"final_rank1": 0.5, "final_mAP": 0.4})
            tracking.set_status(client, rid, "FINISHED")
        time.sleep(0.02)
    latest = latest_sweep(client, exp_id)
    assert latest[1] == "sweep-b-1"
    rows_b = collect(client, exp_id, latest[0])
    rows_a = collect(client, exp_id, find_sweep(client, exp_id, "sweep-a-1")[0])
    assert len(rows_b) == 2 and {r.setting for r in rows_b} != {r.setting for r in rows_a}
    assert len(summarise(rows_a + rows_b)) == 2  # 12 and 30 epochs: never averaged as seeds


def test_holm_adjustment_against_a_hand_computed_case():
    from orchestrator.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4 x 0.005 = 0.02; 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]  # no test: not a member
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def _seeds(method, n, values, **kw):
    return [_row("market1501", "ident", method, n, s, v, **kw) for s, v in enumerate(values) if v is not None]


def test_the_papers_claims_are_contrasts_adjusted_over_the_printed_family():
    """dMpRL-II vs LSRO (Table IV's point) and the other contrasts are paired per seed at one #GAN; every p of a
    metric is Holm-adjusted over the report's family; the verdict comes from the adjusted p; n is the paired n."""
    rows = _seeds("baseline", 0, [70, 71, 69])
    rows += _seeds("lsro", 24000, [72, 73.5, 71])
    rows += _seeds("dmprl2", 24000, [75, 77.5, None])  # seed 2 missing: paired n = 2
    rows += _seeds("dmprl1", 24000, [74, 73, 75])
    rows += _seeds("dmprl2", 24000, [70, 71, 72], order="reference_code")
    groups = summarise(rows)
    dm = next(g for g in groups if g.method == "dmprl2" and g.order == "paper")
    names = [c.name for c in dm.contrasts]
    assert names == ["dmprl2 vs lsro", "dmprl2 vs dmprl1"]
    vs_lsro = dm.contrasts[0].diffs["rank1"]
    assert vs_lsro.n == 2 and vs_lsro.mean == pytest.approx(((75 - 72) + (77.5 - 73.5)) / 2)
    code = next(g for g in groups if g.order == "reference_code")
    assert [c.name for c in code.contrasts] == ["dmprl2: reference_code order vs paper order"]
    # the family: 4 groups vs the baseline + 3 contrasts, every one with a test
    from orchestrator.report import family_size
    from orchestrator.stats import holm

    assert family_size(groups) == 7
    every = [g.vs["baseline"]["rank1"] for g in groups if g.vs.get("baseline")] + [
        c.diffs["rank1"] for g in groups for c in g.contrasts]
    assert [d.p_adj for d in every] == pytest.approx(holm([d.p for d in every]))
    assert all(d.p_adj >= d.p for d in every)
    for d in every:  # the verdict is the adjusted p's
        assert (d.verdict in ("better", "worse")) == (d.p_adj < 0.05)
    text = format_report(groups)
    assert "dmprl2 vs lsro" in text and "family of 7 rank-1" in text and "p Holm" in text
    assert "2 (2 paired)" not in text and "3 (2 paired)" not in text  # the baseline has every seed
    line = next(ln for ln in text.splitlines() if ln.startswith("dmprl2 vs lsro"))
    assert f"{vs_lsro.p_adj:.2f}" in line and " 2 " in line


def test_paired_n_is_shown_where_a_group_has_more_seeds_than_it_pairs():
    rows = _seeds("baseline", 0, [70, 71, None]) + _seeds("lsro", 360, [72, 73, 71])
    text = format_report(summarise(rows))
    assert "3 (2 paired)" in text


def test_a_verdict_that_does_not_survive_the_adjustment_is_no_finding():
    """Raw p < 0.05 alone, in a family of many tests, does not make 'better'."""
    from orchestrator.stats import adjusted, paired

    one = paired({0: 71.0, 1: 72.1, 2: 73.0}, {0: 70.0, 1: 70.9, 2: 72.1})
    assert one.p < 0.05 and one.verdict == "better"
    fam = adjusted([one] + [paired({0: 70.0, 1: 71.0, 2: 69.0}, {0: 70.5, 1: 70.0, 2: 70.0})] * 9)
    assert fam[0].p == one.p and fam[0].p_adj > 0.05 and fam[0].verdict == "no detectable difference at n=3"


def test_asha_stopped_trials_are_listed_and_their_group_gets_no_verdict():
    rows = _seeds("baseline", 0, [70, 71, 69]) + _seeds("lsro", 360, [80, None, None])
    rows += [TrialResult("s1", "cpu", "market1501", "ident", "lsro", 360, "paper", "None", seed=s, stopped_after=4,
                         num_train=12936) for s in (1, 2)]
    groups = summarise(rows)
    lsro = next(g for g in groups if g.method == "lsro")
    assert lsro.stopped == {1: 4, 2: 4} and lsro.seeds == [0] and lsro.n_total == 3
    assert lsro.vs["baseline"] is None  # no verdict on the survivors
    text = format_report(groups)
    assert "2 of 3 seeds stopped after 4 epochs: no verdict" in text and "1/3" in text
    assert "seeds 1 after 4, 2 after 4" in text
    from orchestrator.report import family_size

    assert family_size(groups) == 0


def test_the_unlabelled_control_is_taken_on_the_same_pool_and_number_of_images():
    rows = _seeds("baseline", 0, [70, 71, 69]) + _seeds("lsro", 360, [66, 67, 65])
    rows += _seeds("unlabelled", 360, [64, 66, 65]) + _seeds("unlabelled", 720, [60, 60, 60])
    rows += _seeds("lsro", 360, [72, 73, 71], pool="synthetic_ids")
    groups = summarise(rows)
    lsro = next(g for g in groups if g.method == "lsro" and g.pool == "gan")
    assert lsro.vs["unlabelled"]["rank1"].mean == pytest.approx(1.0)
    real = next(g for g in groups if g.pool == "synthetic_ids")
    assert real.vs["unlabelled"] is None  # no unlabelled run on that pool
    assert [c.name for c in real.contrasts] == ["lsro: synthetic_ids pool vs gan pool"]
    assert real.contrasts[0].diffs["rank1"].mean == pytest.approx(6.0)
    assert "Δr1 vs unlabelled" in format_report(groups)


def test_bn_re_estimated_evaluations_are_compared_only_with_each_other():
    """reid.bn_recalibrate: each run's second evaluation forms its own groups, paired against the baseline's own
    re-estimated evaluation, printed in a block of its own."""
    from orchestrator.groups import BN_RECALIBRATED

    rows = _seeds("baseline", 0, [70, 71, 69]) + _seeds("lsro", 360, [64, 65, 63])
    rows += _seeds("baseline", 0, [71, 72, 70], evaluation=BN_RECALIBRATED)
    rows += _seeds("lsro", 360, [70, 71.5, 69], evaluation=BN_RECALIBRATED)
    groups = summarise(rows)
    plain, fixed = (next(g for g in groups if g.method == "lsro" and g.evaluation == e)
                    for e in ("as trained", BN_RECALIBRATED))
    assert plain.vs["baseline"]["rank1"].mean == pytest.approx(-6.0)
    assert fixed.vs["baseline"]["rank1"].mean == pytest.approx(-2.5 / 3)
    text = format_report(groups)
    assert text.count("setting s1:") == 2 and "statistics re-estimated on the real training images" in text
