"""The run and report charts (orchestrator/plots.py): PNG files, bad input named."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.plots import plot_cmc, plot_gains


def test_plot_cmc_writes_png(tmp_path):
    curves = {"baseline": np.linspace(0.6, 1.0, 50), "dmprl2": np.linspace(0.7, 1.0, 50)}
    out = plot_cmc(curves, tmp_path / "plots" / "cmc.png", max_rank=20, title="Market-1501")
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plot_cmc({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="fractions"):
        plot_cmc({"pct": [60.0, 80.0]}, tmp_path / "x.png")


def test_plot_gains_draws_the_paired_gain_of_each_group(tmp_path):
    from orchestrator.report import TrialResult, summarise

    rows = [TrialResult("s", "cpu", "synthetic", "ident", m, n, "paper", "None", seed=seed, rank1=r, mAP=r,
                        num_train=766)
            for m, n, r in (("baseline", 0, 0.70), ("lsro", 360, 0.68), ("dmprl2", 360, 0.66)) for seed in (0, 1)]
    groups = [g for g in summarise(rows) if g.method != "baseline"]
    out = plot_gains(groups, "baseline", tmp_path / "gain.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_the_chart_draws_no_paper_bar_for_a_row_the_paper_does_not_have(tmp_path, monkeypatch):
    """A group without a matched paper row gets our bar and no paper bar (never a zero-height one)."""
    from orchestrator.report import TrialResult, summarise

    rows = [TrialResult("s", "cpu", "market1501", "ident", m, n, "paper", "None", seed=seed, rank1=r, mAP=r,
                        num_train=12936)
            for m, n, r in (("baseline", 0, 0.70), ("dmprl2", 24000, 0.72), ("unlabelled", 24000, 0.69))
            for seed in (0, 1)]
    groups = [g for g in summarise(rows) if g.method != "baseline"]
    assert [g.paper_gain_rank1 is None for g in groups] == [False, True]  # Table IV has dMpRL-II, no "unlabelled"
    drawn = []
    from matplotlib.axes import Axes

    real_bar = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, h, *a, **k: drawn.append((list(x), list(h))) or real_bar(
        self, x, h, *a, **k))
    plot_gains(groups, "baseline", tmp_path / "gain.png")
    ours, paper = drawn
    assert len(ours[0]) == 2 and paper[0] == [0.2] and paper[1] == [pytest.approx(80.37 - 74.08)]
