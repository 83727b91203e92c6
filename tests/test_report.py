"""The report compares each dataset and model only with its own published numbers, and says which row it matched."""

from orchestrator.paper_numbers import BASELINE, TABLE_IV, TABLE_VII, paper_row
from orchestrator.report import format_report, summarise


def test_identification_runs_match_table_iv_on_the_ratio():
    row, note = paper_row("market1501", "ident", "dmprl2", 24000, 12936)
    assert (row.table, row.num_gan, row.mAP, row.rank1) == ("IV", 24000, *TABLE_IV["dmprl2"][24000])
    assert "1.86x" in note and not row.reference_only
    row, _ = paper_row("market1501", "ident", "lsro", 2 * 12936, 12936)  # 2.0x: nearest is 24k (1.86x)
    assert row.num_gan == 24000


def test_ratios_outside_the_papers_range_have_no_row():
    row, note = paper_row("market1501", "ident", "lsro", 480, 4660)  # 0.10x
    assert row is None and "outside the paper's 0.93x-3.71x" in note
    assert paper_row("market1501", "ident", "lsro", 10 * 12936, 12936)[0] is None


def test_two_stream_runs_compare_with_table_vii_not_iv():
    row, _ = paper_row("market1501", "twostream", "baseline", 0, 12936)
    assert row.table == "VII" and (row.mAP, row.rank1) == TABLE_VII["market1501"]["baseline"]
    assert paper_row("market1501", "twostream", "dmprl2", 24000, 12936)[0].table == "VII"
    assert paper_row("market1501", "twostream", "lsro", 24000, 12936)[0] is None  # Table VII has no LSRO row


def test_each_dataset_only_with_its_own_numbers():
    duke, _ = paper_row("dukemtmc", "ident", "baseline", 0, 16522)
    assert duke.table == "III" and duke.rank1 == 61.94
    assert paper_row("dukemtmc", "ident", "smprl", 24000, 16522)[0] is None  # Table III has no sMpRL row
    row, note = paper_row("cuhk03np", "ident", "baseline", 0, 7365)
    assert row is None and "1,367" in note
    synth, _ = paper_row("synthetic", "ident", "baseline", 0, 466)
    assert synth.reference_only and (synth.mAP, synth.rank1) == BASELINE


def _row(dataset, model, method, n, seed, r1):
    return {"dataset": dataset, "model": model, "method": method, "num_gan": n, "order": "paper", "keep": "None",
            "seed": seed, "rank1": r1, "mAP": r1 - 0.1, "num_train": 12936}


def test_summary_keeps_datasets_and_models_apart():
    rows = [_row("market1501", "ident", "baseline", 0, s, 0.70 + s / 100) for s in range(2)]
    rows += [_row("market1501", "ident", "dmprl2", 24000, s, 0.75) for s in range(2)]
    rows += [_row("market1501", "twostream", "baseline", 0, 0, 0.80)]
    groups = summarise(rows)
    assert len(groups) == 3
    dm = next(g for g in groups if g["method"] == "dmprl2")
    assert abs(dm["gain_rank1"] - 4.5) < 1e-9  # vs the identification baseline (70.5), not the two-stream one
    text = format_report(groups)
    assert "Table IV" in text and "1.86x" in text and "VII" in text
