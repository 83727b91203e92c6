"""The report's tables, built from its groups: one per setting and evaluation, the paper's claims, the domains, the
pools; and the console text they make (:func:`format_report`).

Each table is an :class:`orchestrator.report_export.Table`, so the console, csv, markdown and latex print the same
rows (:func:`tables_of`). The domains table (printed where a sweep evaluated re-ranked or on other datasets) puts
each group's same-domain and cross-domain test sets side by side, plain and re-ranked, with n and rank-1 / mAP as
mean ± half-width of the 95% interval, and under each the published row where the paper has one ("none published"
otherwise): it prints no p-value, and adds none to the Holm family (:mod:`orchestrator.groups`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from orchestrator.evaluations import AS_TRAINED, Evaluation, from_label
from orchestrator.groups import CONTROLS, Group, family_size
from orchestrator.report_export import Col, Count, Num, Table, to_text
from orchestrator.stage_cache import PoolQualityOut
from trainables.methods import BASELINE

NOTES = ("rank-1 / mAP in %, mean ± std [± half-width of the 95% t interval] over n seeds (k/m: k of m trials ran "
         "to the end). Δ = paired per-seed difference (method - reference) over the seeds both ran, with its "
         "95% interval and the paired t-test's p. One DCGAN and one generated pool serve every seed: the "
         "intervals hold the re-ID runs' seed variance, not the GAN's. Paper (TIP 2019, single runs): Table IV "
         "(Market-1501, identification net, matched on the generated/real ratio), Table III (other datasets), "
         "Table VII (two-stream); * = Market-1501's numbers, for the gain only (synthetic data).")


def blocks(groups: list[Group]) -> list[tuple[str, str, list[Group]]]:
    """(setting, evaluation, its groups) in the report's order."""
    keys = dict.fromkeys((g.setting, g.evaluation) for g in groups)
    return [(s, e, [g for g in groups if (g.setting, g.evaluation) == (s, e)]) for s, e in keys]


def tables_of(groups: list[Group], pools: Sequence[tuple[str, PoolQualityOut]] = ()) -> list[Table]:
    """Every table the report prints: per setting and evaluation its groups and the paper's claims, the domains
    (where a sweep has re-ranked or cross-domain evaluations), the pools' quality."""
    out = []
    for setting, _, gs in blocks(groups):
        out.append(setting_table(setting, gs))
        if any(g.contrasts for g in gs):
            out.append(contrast_table(setting, gs))
    if any(from_label(g.evaluation) not in (Evaluation(), Evaluation(bn=True)) for g in groups):
        out.append(domains_table(groups))
    if pools:
        out.append(pool_table(pools))
    return out


def format_report(groups: list[Group]) -> str:
    """Per setting: our numbers (n, mean ± std [95% interval]), the paired differences from the controls with
    verdicts, the paper's row; then the paper's claims as contrasts; the domains; then what the p-values were
    adjusted over."""
    return "\n\n".join([*(to_text(t) for t in tables_of(groups)), *notes(groups)])


def notes(groups: list[Group]) -> list[str]:
    """What the tables need beside them: the trials a scheduler stopped, the multiplicity, how to read a cell."""
    out = []
    stopped = [g for g in groups if g.stopped]
    if stopped:
        out.append("stopped by the scheduler (ASHA; no test metrics, no verdict on these groups):\n" + "\n".join(
            f"  {g.method} #GAN {g.num_gan} ({g.pool}, order {g.order}, keep {g.keep})"
            + ("" if g.evaluation == AS_TRAINED else f" [{g.evaluation}]") + f": {g.stopped_note}; seeds "
            + ", ".join(f"{s} after {e}" for s, e in sorted(g.stopped.items())) for g in stopped))
    m1, m2 = family_size(groups, "rank1"), family_size(groups, "mAP")
    out.append(f"multiplicity: every p-value above is one of a family of {m1} rank-1 (and {m2} mAP) paired "
               f"tests, Holm-adjusted over it (p Holm); p is the raw paired t-test, kept for reference; verdicts "
               f"and 'better' / 'worse' come from p Holm < 0.05 only.")
    evs = {from_label(g.evaluation) for g in groups}
    extra = (" VII+rr = Table VII's \"+ re-ranking\" column (two-stream dMpRL-II only)." * any(e.reranked for e in evs)
             + " No cross-domain numbers are published." * any(e.domain for e in evs))
    return [*out, NOTES + extra]


def _slug(setting: str, evaluation: str) -> str:
    s = from_label(evaluation).slug
    return setting + (f"-{s}" if s else "")


def setting_table(setting: str, gs: list[Group]) -> Table:
    """One setting and evaluation: each group's n, rank-1, mAP, its paired differences from the controls with the
    Holm p and verdict, the generated/real ratio and the paper's row."""
    g0 = gs[0]
    protocol = "one baseline labels every seed (paper)" if g0.single_baseline else "per-seed baselines"
    head = (f"setting {setting}: preset {g0.preset}, dataset {g0.dataset}, model {g0.model}, learning rates "
            f"{g0.lr_scheme}; sMpRL labels from {protocol}{from_label(g0.evaluation).describe(g0.dataset)}")
    others = [c for c in CONTROLS if c != BASELINE and any(g.method == c for g in gs)]  # the controls swept
    rows = []
    for g in gs:
        p, gain, vb = g.paper, g.paper_gain_rank1, g.vs.get(BASELINE)
        d = vb["rank1"] if vb else None
        rows.append((g.method, g.pool, g.num_gan, g.order, g.keep,
                     Count(len(g.seeds), d and d.n, g.n_total if g.stopped else None), g.rank1, g.mAP, d,
                     d and d.p_adj, g.stopped_note or (d.verdict if d else None),
                     *((g.vs.get(c) or {}).get("rank1") for c in others),
                     None if g.ratio is None else Num(g.ratio, f"{g.ratio:.2f}x"),
                     f"{p.table}{'*' if p.reference_only else ''} {p.num_gan}" if p else g.paper_note[:60],
                     p and Num(p.rank1, f"{p.rank1:.2f}"), None if gain is None else Num(gain, f"{gain:+.2f}")))
    cols = (Col("method", align="l"), Col("pool", align="l"), Col("#GAN"), Col("order", align="l"), Col("keep"),
            Col("n", "count"), Col("rank-1", "summary"), Col("mAP", "summary"), Col(f"Δr1 vs {BASELINE}", "diff"),
            Col("p Holm", "p"), Col("verdict", align="l"), *(Col(f"Δr1 vs {c}", "diff") for c in others),
            Col("gen/real"), Col("paper row", align="l"), Col("rank-1", key="paper rank-1"),
            Col("Δr1", key="paper Δr1"))
    return Table(f"setting-{_slug(setting, g0.evaluation)}", head, cols, tuple(rows))


def contrast_table(setting: str, gs: list[Group]) -> Table:
    """The paper's claims in one setting and evaluation: one line per contrast, rank-1 and mAP, paired n, Holm p."""
    rows = []
    for g in gs:
        for c in g.contrasts:
            r1, mp = c.diffs["rank1"], c.diffs["mAP"]
            rows.append((c.name, c.num_gan, r1.n, r1, r1.p_adj, r1.verdict, mp, mp and mp.p_adj))
    cols = (Col("contrast (a vs b: a - b per seed)", align="l"), Col("#GAN"), Col("n"), Col("Δ rank-1", "diff"),
            Col("p Holm", "p", key="p Holm rank-1"), Col("verdict", align="l"), Col("Δ mAP", "diff"),
            Col("p Holm", "p", key="p Holm mAP"))
    evaluated = "" if gs[0].evaluation == AS_TRAINED else f" ({gs[0].evaluation})"
    return Table(f"contrasts-{_slug(setting, gs[0].evaluation)}", f"setting {setting}{evaluated}: the paper's claims",
                 cols, tuple(rows))


def domains_table(groups: list[Group]) -> Table:
    """Per group of seeds (method, pool, #GAN, order, keep, setting): its own test set and each other one, plain and
    re-ranked, each with the published row under it (BN re-estimated evaluations keep their own blocks only)."""
    by_key: dict[tuple, dict[Evaluation, Group]] = defaultdict(dict)
    for g in groups:
        ev = from_label(g.evaluation)
        if not ev.bn:
            by_key[(g.method, g.pool, g.num_gan, g.order, g.keep, g.setting)][ev] = g
    sets = sorted({ev.domain for evs in by_key.values() for ev in evs})  # "" (its own test set) first
    names = {d: d or "same-domain" for d in sets}
    rows = []
    for key, evs in by_key.items():
        for rr in sorted({ev.reranked for ev in evs}):
            label = "re-ranked" if rr else "plain"
            found = [evs.get(Evaluation(d, reranked=rr)) for d in sets]
            ours = [c for g in found for c in ((len(g.seeds), g.rank1, g.mAP) if g else (None,) * 3)]
            paper = [c for g in found for c in _published(g)]
            refs = [_ref(g.paper) for g in found if g and g.paper]
            rows += [(*key, label, *ours), (*key, f"paper, {label}" + (f" ({refs[0]})" if refs else ""), *paper)]
    cols = (Col("method", align="l"), Col("pool", align="l"), Col("#GAN"), Col("order", align="l"), Col("keep"),
            Col("setting", align="l"), Col("row", align="l"),
            *(c for d in sets for c in (Col("n", key=f"{names[d]} n"), Col(f"{names[d]} rank-1", "interval"),
                                        Col(f"{names[d]} mAP", "interval"))))
    return Table("domains", "domains: each model on its own test set and on the others (rank-1 / mAP in %, mean ± "
                 "half-width of the 95% interval; paper: the published row, where one exists)", cols, tuple(rows))


def _published(g: Group | None) -> tuple:
    """A domains-table group's published (n, rank-1, mAP) cells: its matched row, or "none published"."""
    if g is None:
        return None, None, None
    if g.paper is None:
        return None, "none published", "none published"
    return None, Num(g.paper.rank1, f"{g.paper.rank1:.2f}"), Num(g.paper.mAP, f"{g.paper.mAP:.2f}")


def _ref(row) -> str:
    return f"Table {row.table}{'*' if row.reference_only else ''} {row.num_gan}"


def pool_table(pools: Sequence[tuple[str, PoolQualityOut]]) -> Table:
    """Each generated pool against the real training images (its pool_quality stage)."""
    def rgb(v: tuple) -> str:
        return "/".join(f"{x:.1f}" for x in v)

    rows = tuple((key, q.rendering, q.gen_n, q.real_n, Num(q.fd, f"{q.fd:.2f}"),
                  Num(q.fd_real_halves, f"{q.fd_real_halves:.2f}"), rgb(q.gen_mean), rgb(q.real_mean), rgb(q.gen_std),
                  rgb(q.real_std), Num(q.gen_contrast, f"{q.gen_contrast:.1f}"),
                  Num(q.real_contrast, f"{q.real_contrast:.1f}"), Num(q.gen_confidence, f"{q.gen_confidence:.3f}"),
                  Num(q.real_confidence, f"{q.real_confidence:.3f}"), q.sheet) for key, q in pools)
    cols = (Col("stage key", align="l"), Col("rendering", align="l"), Col("gen n"), Col("real n"), Col("FD"),
            Col("FD real halves"), Col("gen mean RGB"), Col("real mean RGB"), Col("gen std RGB"), Col("real std RGB"),
            Col("gen contrast"), Col("real contrast"), Col("gen confidence"), Col("real confidence"),
            Col("sheet", align="l"))
    return Table("pool-quality", "generated pools vs the real training images (pixel statistics 0..255; Fréchet "
                 "distance in the baseline's feature space)", cols, rows)
