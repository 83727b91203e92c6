"""The report's tables in every format (text, csv, markdown, latex) carry the groups' numbers; each evaluation of the
final models (re-ranked, cross-domain) gets blocks of its own in the one Holm family, and the domains table shows
them side by side with the published row where the paper has one."""

import csv
import io
import re

import pytest

from orchestrator.evaluations import AS_TRAINED, Evaluation, final_metrics, from_label, parse_prefix
from orchestrator.groups import TrialResult, family_size, summarise
from orchestrator.paper_numbers import NO_CROSS_DOMAIN, paper_row
from orchestrator.report_export import latex_escape, render, to_csv, to_latex, to_markdown, write_tables
from orchestrator.report_tables import format_report, tables_of
from orchestrator.stats import holm

RR, XD, XD_RR = "re-ranked", "cross-domain dukemtmcreid", "cross-domain dukemtmcreid, re-ranked"


def _seeds(method, n, values, model="ident", evaluation=AS_TRAINED, **kw):
    """Trials in percent (what collect hands summarise), one per seed with a value."""
    order = kw.pop("order", "paper")
    return [TrialResult("s1", "cpu", "market1501", model, method, n, order, "None", seed=s,
                        rank1=v, mAP=v - 20, num_train=12936, evaluation=evaluation, **kw)
            for s, v in enumerate(values) if v is not None]


def _groups():
    rows = _seeds("baseline", 0, [70, 71, 69]) + _seeds("lsro", 24000, [72, 73.5, 71])
    rows += _seeds("dmprl2", 24000, [75, 77.5, None]) + _seeds("dmprl2", 24000, [70, 71, 72], order="reference_code")
    rows += _seeds("lsro", 24000, [73, 73, 71.5], pool="folder:my_pool#1")  # a name LaTeX must escape
    return summarise(rows)


def _parse(text):
    return list(csv.DictReader(io.StringIO(text)))


def _num(s):
    return None if s == "" else float(s)


def test_csv_rows_carry_the_groups_numbers():
    groups = _groups()
    tables = {t.name: t for t in tables_of(groups)}
    assert list(tables) == ["setting-s1", "contrasts-s1"]
    rows = _parse(to_csv(tables["setting-s1"]))
    assert len(rows) == len(groups)
    for g, r in zip(groups, rows):
        assert (r["method"], r["pool"], int(r["#GAN"]), r["order"]) == (g.method, g.pool, g.num_gan, g.order)
        assert int(r["n"]) == len(g.seeds)
        for col, s in (("rank-1", g.rank1), ("mAP", g.mAP)):
            assert float(r[f"{col} mean"]) == s.mean and float(r[f"{col} std"]) == s.std
            assert _num(r[f"{col} ci95"]) == s.ci
        d = (g.vs.get("baseline") or {}).get("rank1")
        if d is None:
            assert r["Δr1 vs baseline"] == r["p Holm"] == "" and r["verdict"] == ""
            continue
        assert float(r["Δr1 vs baseline"]) == d.mean and _num(r["Δr1 vs baseline ci95"]) == d.ci
        assert float(r["Δr1 vs baseline p"]) == d.p and float(r["p Holm"]) == d.p_adj and r["verdict"] == d.verdict
        assert _num(r["n paired"]) == d.n
        assert float(r["paper rank-1"]) == g.paper.rank1 and float(r["paper Δr1"]) == pytest.approx(g.paper_gain_rank1)
    dm = next(r for r in rows if r["method"] == "dmprl2" and r["order"] == "paper")
    assert (dm["n"], dm["n paired"]) == ("2", "2") and float(dm["gen/real"]) == pytest.approx(24000 / 12936)
    contrasts = _parse(to_csv(tables["contrasts-s1"]))
    every = [c for g in groups for c in g.contrasts]
    assert [r["contrast (a vs b: a - b per seed)"] for r in contrasts] == [c.name for c in every]
    for r, c in zip(contrasts, every):
        assert float(r["Δ rank-1"]) == c.diffs["rank1"].mean and float(r["p Holm rank-1"]) == c.diffs["rank1"].p_adj
        assert float(r["Δ mAP p"]) == c.diffs["mAP"].p and float(r["p Holm mAP"]) == c.diffs["mAP"].p_adj


def test_csv_on_stdout_and_one_file_per_table(tmp_path):
    tables = tables_of(_groups())
    parts = render(tables, "csv").split("\n\n")
    assert [p.splitlines()[0] for p in parts] == [f"# {t.name}" for t in tables]
    assert [_parse(p.split("\n", 1)[1]) for p in parts] == [_parse(to_csv(t)) for t in tables]
    files = write_tables(tables, "csv", tmp_path / "out")
    assert sorted(f.name for f in files) == ["contrasts-s1.csv", "setting-s1.csv"]
    assert _parse(files[0].read_text()) == _parse(to_csv(tables[0]))


def test_markdown_pipe_tables():
    t = tables_of(_groups())[0]
    lines = to_markdown(t).splitlines()
    assert lines[0] == f"**{t.title}**" and lines[1] == ""
    table = lines[2:]
    assert all(ln.startswith("|") and ln.endswith("|") for ln in table) and len(table) == 2 + len(t.rows)
    assert re.fullmatch(r"\|(:---\|)(:---\|)(---:\|).*", table[1])  # method, pool left; #GAN right
    cells = [re.split(r"(?<!\\)\|", ln)[1:-1] for ln in table]
    assert {len(c) for c in cells} == {len(t.cols)}
    assert "70.00 ± 1.00 [±2.48]" in table[2]  # the console's cell


def test_latex_tabulars_compile_looking():
    groups = _groups()
    tables = tables_of(groups)
    for t in tables:
        tex = to_latex(t)
        body = [ln for ln in tex.splitlines() if not ln.startswith("%")]
        assert body[0] == rf"\begin{{tabular}}{{{''.join(c.align for c in t.cols)}}}" and body[-1] == r"\end{tabular}"
        assert [body[1], body[3], body[-2]] == [r"\toprule", r"\midrule", r"\bottomrule"]
        text = "\n".join(body)
        depth = 0
        for ch in re.sub(r"\\[{}]", "", text):  # escaped braces are text
            depth += {"{": 1, "}": -1}.get(ch, 0)
            assert depth >= 0
        assert depth == 0
        assert not re.search(r"(?<!\\)[_%#]", text)  # every underscore, percent and hash escaped
        assert "±" not in text and "Δ" not in text
        for ln in body[2:-2]:
            if ln not in (r"\midrule",):
                assert ln.endswith(r" \\") and len(re.findall(r"(?<!\\)&", ln)) == len(t.cols) - 1
    tex = to_latex(tables[0])
    assert r"70.00 $\pm$ 1.00 [$\pm$2.48]" in tex and r"$\Delta$r1 vs baseline" in tex
    assert r"folder:my\_pool\#1" in tex and r"reference\_code" in tex
    assert latex_escape("50% & $x_1$ {a} ~ ^ \\") == (r"50\% \& \$x\_1\$ \{a\} \textasciitilde{} "
                                                      r"\textasciicircum{} \textbackslash{}")


def test_the_text_format_is_the_console_report():
    groups = _groups()
    text = format_report(groups)
    assert text.startswith("\n\n".join(render([t], "text") for t in tables_of(groups)) + "\n\nmultiplicity: ")
    assert text.splitlines()[1].split() == ["method", "pool", "#GAN", "order", "keep", "n", "rank-1", "mAP", "Δr1",
                                            "vs", "baseline", "p", "Holm", "verdict", "gen/real", "paper", "row",
                                            "rank-1", "Δr1"]
    assert "multiplicity: every p-value above is one of a family of" in text


def test_evaluations_from_metric_prefixes():
    m = {"final_rank1": 70.0, "final_mAP": 50.0, "final_rank5": 90.0, "final_bnr_rank1": 71.0, "final_rr_rank1": 72.0,
         "final_rr_mAP": 60.0, "final_xd_dukemtmcreid_rank1": 30.0, "final_xd_dukemtmcreid_mAP": 15.0,
         "final_xd_dukemtmcreid_rr_rank1": 33.0, "final_xd_Duke_rank1": 1.0, "val_rank1": 5.0}
    got = final_metrics(m)
    assert [e.label for e in got] == ["as trained", RR, "BN re-estimated", XD, XD_RR]
    assert got[Evaluation(reranked=True)] == {"rank1": 72.0, "mAP": 60.0}
    assert got[Evaluation("dukemtmcreid")] == {"rank1": 30.0, "mAP": 15.0}
    xd_rr = got[Evaluation("dukemtmcreid", reranked=True)]
    assert xd_rr["rank1"] == 33.0 and xd_rr["mAP"] != xd_rr["mAP"]  # no mAP logged: NaN
    for e in got:
        assert from_label(e.label) == e and parse_prefix(e.prefix) == e
    assert Evaluation("dukemtmcreid", reranked=True).slug == "xd_dukemtmcreid_rr"
    from trainables.config import BN_RECALIBRATED

    assert Evaluation(bn=True).prefix == BN_RECALIBRATED
    with pytest.raises(ValueError, match="not an evaluation label"):
        from_label("re-ranked twice")


def test_published_re_ranked_and_cross_domain_rows():
    row, _ = paper_row("market1501", "twostream", "dmprl2", 24000, 12936, reranked=True)
    assert (row.table, row.mAP, row.rank1) == ("VII+rr", 81.18, 87.96)  # TIP 2019 Table VII, + re-ranking
    assert paper_row("dukemtmc", "twostream", "dmprl2", 24000, 16522, reranked=True)[0].rank1 == 81.28
    for args in (("market1501", "ident", "dmprl2", 24000, 12936), ("market1501", "twostream", "baseline", 0, 12936)):
        row, note = paper_row(*args, reranked=True)
        assert row is None and note.startswith("none published")
    assert paper_row("market1501", "ident", "baseline", 0, 12936, domain="dukemtmcreid") == (None, NO_CROSS_DOMAIN)


def _evaluated():
    rows = []
    for ev, shift in ((AS_TRAINED, 0), (RR, 8), (XD, -40), (XD_RR, -36)):
        rows += _seeds("baseline", 0, [80 + shift, 81 + shift, 79 + shift], model="twostream", evaluation=ev)
        rows += _seeds("dmprl2", 24000, [84 + shift, 85.5 + shift, 83 + shift], model="twostream", evaluation=ev)
    rows += _seeds("dmprl2", 24000, [84, 85, 83], model="twostream", evaluation="BN re-estimated")
    return summarise(rows)


def test_each_evaluation_is_its_own_block_in_one_holm_family():
    groups = _evaluated()
    labels = list(dict.fromkeys(g.evaluation for g in groups))
    assert labels == ["as trained", RR, "BN re-estimated", XD, XD_RR]
    for g in groups:  # paired only within an evaluation: each dmprl2 is 4, 4.5, 4 above its own evaluation's baseline
        if g.method == "dmprl2" and g.evaluation != "BN re-estimated":
            assert g.vs["baseline"]["rank1"].mean == pytest.approx(12.5 / 3)
    every = [g.vs["baseline"]["rank1"] for g in groups if g.vs.get("baseline")]
    assert family_size(groups) == len(every) == 4  # as trained, re-ranked, and the two cross-domain ones
    assert [d.p_adj for d in every] == pytest.approx(holm([d.p for d in every]))
    text = format_report(groups)
    assert "distances k-reciprocal re-ranked" in text
    assert "tested on another dataset, dukemtmcreid (cross-domain: trained on market1501)" in text
    assert "family of 4 rank-1" in text


def test_the_domains_table_sets_test_sets_side_by_side_with_the_published_rows():
    groups = _evaluated()
    t = next(t for t in tables_of(groups) if t.name == "domains")
    assert [t.name for t in tables_of(_groups())] == ["setting-s1", "contrasts-s1"]  # none without such evaluations
    rows = _parse(to_csv(t))
    dm = [r for r in rows if r["method"] == "dmprl2"]
    assert [r["row"] for r in dm] == ["plain", "paper, plain (Table VII 24000)", "re-ranked",
                                      "paper, re-ranked (Table VII+rr 24000)"]
    g = {g.evaluation: g for g in groups if g.method == "dmprl2"}
    assert float(dm[0]["same-domain rank-1 mean"]) == g[AS_TRAINED].rank1.mean
    assert float(dm[0]["same-domain rank-1 ci95"]) == g[AS_TRAINED].rank1.ci
    assert float(dm[2]["dukemtmcreid mAP mean"]) == g[XD_RR].mAP.mean and dm[2]["dukemtmcreid n"] == "3"
    assert (dm[1]["same-domain rank-1 mean"], dm[1]["same-domain mAP mean"]) == ("85.75", "67.53")
    assert (dm[3]["same-domain rank-1 mean"], dm[3]["same-domain mAP mean"]) == ("87.96", "81.18")
    assert dm[1]["dukemtmcreid rank-1 mean"] == dm[3]["dukemtmcreid mAP mean"] == "none published"
    base_rr = next(r for r in rows if r["method"] == "baseline" and r["row"].startswith("paper, re-ranked"))
    assert base_rr["same-domain rank-1 mean"] == "none published"  # Table VII re-ranks only + dMpRL-II
    text = render([t], "text")
    assert "84.17 ± " in text and "none published" in text
