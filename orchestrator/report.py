"""``python -m orchestrator.report``: one sweep's results with honest statistics, beside the paper's numbers.

Per group of trials that differ only in the seed: n, mean ± std and the 95% interval of rank-1 and mAP. Per label
method: the paired per-seed difference from each control (the baseline; the compute-matched baseline and the
unlabelled control where swept) with its interval and a paired t-test; then the paper's own claims as paired
contrasts between methods (dMpRL-II vs LSRO, dMpRL-II vs dMpRL-I, dMpRL-I vs sMpRL, sMpRL vs LSRO; the code's rank
order vs the paper's; a pool vs the DCGAN's) at each #GAN present. Every p-value the report prints for a metric is
one family: Holm-adjusted over it (its size printed, the raw p kept), and the plain verdict ("better", "worse", "no
detectable difference at n=3") comes from the adjusted p. A group with trials a scheduler (ASHA) stopped is listed
with them ("2 of 3 seeds stopped after 4 epochs") and gets no verdict. Groups never mix settings: every config
field that is not swept (dataset, preset, backbone, epochs, image size, label hyperparameters, AP mode, ...) goes
into a hash that is part of the group (:mod:`orchestrator.groups`). By default the latest sweep is reported;
``--sweep`` picks another (its parent run id or name). The table and a chart go to MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from orchestrator import tracking
from orchestrator.groups import (  # noqa: F401 (the report's public names)
    AS_TRAINED,
    BN_RECALIBRATED,
    CONTROLS,
    SWEPT,
    Contrast,
    Group,
    Settings,
    TrialResult,
    family_size,
    pool_label,
    setting_of,
    summarise,
)
from orchestrator.plots import plot_gains
from orchestrator.stage_cache import PoolQualityOut
from orchestrator.tables import format_table
from trainables.config import BN_RECALIBRATED as BNR
from trainables.logs import configure_logging
from trainables.methods import BASELINE, method


def latest_sweep(client, exp_id: str) -> tuple[str, str] | None:
    """(parent run id, name) of the most recently started sweep of the experiment."""
    runs = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'sweep'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return (runs[0].info.run_id, runs[0].info.run_name) if runs else None


def find_sweep(client, exp_id: str, ref: str) -> tuple[str, str]:
    """A sweep by parent run id or by name; ValueError naming what exists otherwise."""
    runs = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'sweep'", max_results=5000)
    for r in runs:
        if ref in (r.info.run_id, r.info.run_name):
            return r.info.run_id, r.info.run_name
    names = ", ".join(r.info.run_name for r in runs[:10]) or "none"
    raise ValueError(f"--sweep {ref!r}: no such sweep in this experiment (sweeps: {names})")


def collect(client, exp_id: str, parent: str) -> list[TrialResult]:
    """The sweep's finished trial runs: those with final test metrics, and those a scheduler (ASHA) stopped (no test
    metrics; the report lists them, so that a group is never silently its survivors)."""
    filt = (f"tags.`{tracking.TAG_KIND}` = 'trial' and attributes.status = 'FINISHED' and "
            f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    rows = []
    for r in client.search_runs([exp_id], filt, max_results=50000):
        p, m, tags = r.data.params, r.data.metrics, r.data.tags
        stopped = tags.get(tracking.TAG_EARLY_STOPPED) == "true"
        if "final_rank1" not in m and not stopped:
            continue
        row = TrialResult(
            setting=setting_of(p), preset=p.get("preset", "?"), dataset=p.get("dataset.name", "synthetic"),
            model=p.get("reid.model", "ident"), method=p.get("labels.method"), num_gan=int(p.get("labels.num_gan", 0)),
            order=p.get("labels.order", "paper"), keep=p.get("labels.keep", "None"), seed=int(p.get("reid.seed", 0)),
            rank1=m.get("final_rank1", float("nan")), mAP=m.get("final_mAP", float("nan")),
            num_train=int(p.get("data.num_train", 0) or 0),
            single_baseline=p.get("sweep.single_baseline", "False") == "True",
            lr_scheme=p.get("reid.lr_scheme", "paper"),
            pool=pool_label(p) if method(p.get("labels.method", BASELINE)).generated else "-",
            stopped_after=int(float(tags.get(tracking.TAG_STOPPED_AFTER, 0))) if stopped else None)
        rows.append(row)
        if f"final_{BNR}rank1" in m:  # reid.bn_recalibrate: the same model evaluated with BN re-estimated
            rows.append(dataclasses.replace(row, evaluation=BN_RECALIBRATED, rank1=m[f"final_{BNR}rank1"],
                                            mAP=m.get(f"final_{BNR}mAP", float("nan"))))
    return rows


# ------------------------------------------------------------------------------------------ output

def _ms(s) -> str | None:
    if s is None:
        return None
    ci = "" if s.ci is None else f" [±{s.ci:.2f}]"
    return f"{s.mean:.2f} ± {s.std:.2f}{ci}"


def _diff(d) -> str | None:
    """"+1.23 [±0.50] p=0.03": the paired difference, its 95% interval and the raw p."""
    if d is None:
        return None
    ci = "" if d.ci is None else f" [±{d.ci:.2f}]"
    p = "" if d.p is None else f" p={d.p:.2f}"
    return f"{d.mean:+.2f}{ci}{p}"


def _adj(d) -> str | None:
    return None if d is None or d.p_adj is None else f"{d.p_adj:.2f}"


def _n(g: Group, d) -> str:
    """The group's n, and the paired n of its difference from the baseline where that is fewer seeds."""
    if g.stopped:
        return f"{len(g.seeds)}/{g.n_total}"
    return str(len(g.seeds)) if d is None or d.n == len(g.seeds) else f"{len(g.seeds)} ({d.n} paired)"


def format_report(groups: list[Group]) -> str:
    """Per setting: our numbers (n, mean ± std [95% interval]), the paired differences from the controls with
    verdicts, the paper's row; then the paper's claims as contrasts; then what the p-values were adjusted over."""
    blocks = []
    for setting, evaluation in dict.fromkeys((g.setting, g.evaluation) for g in groups):
        gs = [g for g in groups if (g.setting, g.evaluation) == (setting, evaluation)]
        blocks.append(_setting_block(setting, gs))
        if any(g.contrasts for g in gs):
            blocks.append(_contrast_block(setting, gs))
    stopped = [g for g in groups if g.stopped]
    if stopped:
        blocks.append("stopped by the scheduler (ASHA; no test metrics, no verdict on these groups):\n" + "\n".join(
            f"  {g.method} #GAN {g.num_gan} ({g.pool}, order {g.order}, keep {g.keep}): {g.stopped_note}; seeds "
            + ", ".join(f"{s} after {e}" for s, e in sorted(g.stopped.items())) for g in stopped))
    m1, m2 = family_size(groups, "rank1"), family_size(groups, "mAP")
    blocks.append(f"multiplicity: every p-value above is one of a family of {m1} rank-1 (and {m2} mAP) paired "
                  f"tests, Holm-adjusted over it (p Holm); p is the raw paired t-test, kept for reference; verdicts "
                  f"and 'better' / 'worse' come from p Holm < 0.05 only.")
    notes = ("rank-1 / mAP in %, mean ± std [± half-width of the 95% t interval] over n seeds (k/m: k of m trials ran "
             "to the end). Δ = paired per-seed difference (method - reference) over the seeds both ran, with its "
             "95% interval and the paired t-test's p. One DCGAN and one generated pool serve every seed: the "
             "intervals hold the re-ID runs' seed variance, not the GAN's. Paper (TIP 2019, single runs): Table IV "
             "(Market-1501, identification net, matched on the generated/real ratio), Table III (other datasets), "
             "Table VII (two-stream); * = Market-1501's numbers, for the gain only (synthetic data).")
    return "\n\n".join(blocks) + "\n\n" + notes


def _setting_block(setting: str, gs: list[Group]) -> str:
    g0 = gs[0]
    protocol = "one baseline labels every seed (paper)" if g0.single_baseline else "per-seed baselines"
    evaluated = "" if g0.evaluation == AS_TRAINED else (
        "; evaluated with every BatchNorm layer's statistics re-estimated on the real training images "
        "(reid.bn_recalibrate)")
    head = (f"setting {setting}: preset {g0.preset}, dataset {g0.dataset}, model {g0.model}, learning rates "
            f"{g0.lr_scheme}; sMpRL labels from {protocol}{evaluated}")
    others = [c for c in CONTROLS if c != BASELINE and any(g.method == c for g in gs)]  # the controls swept
    body = []
    for g in gs:
        p, gain, vb = g.paper, g.paper_gain_rank1, g.vs.get(BASELINE)
        d = vb["rank1"] if vb else None
        body.append((g.method, g.pool, g.num_gan, g.order, g.keep, _n(g, d), _ms(g.rank1), _ms(g.mAP),
                     _diff(d), _adj(d), g.stopped_note or (d.verdict if d else None),
                     *(_diff((g.vs.get(c) or {}).get("rank1")) for c in others),
                     None if g.ratio is None else f"{g.ratio:.2f}x",
                     f"{p.table}{'*' if p.reference_only else ''} {p.num_gan}" if p else g.paper_note[:60],
                     p and f"{p.rank1:.2f}", None if gain is None else f"{gain:+.2f}"))
    cols = ("method", "pool", "#GAN", "order", "keep", "n", "rank-1", "mAP", f"Δr1 vs {BASELINE}", "p Holm",
            "verdict", *(f"Δr1 vs {c}" for c in others), "gen/real", "paper row", "rank-1", "Δr1")
    return head + "\n" + format_table(cols, body, align="llrlrrrrrrl" + "r" * len(others) + "rlrr")


def _contrast_block(setting: str, gs: list[Group]) -> str:
    """The paper's claims in setting ``setting``: one line per contrast, rank-1 and mAP, paired n, Holm p, verdict."""
    body = []
    for g in gs:
        for c in g.contrasts:
            r1, mp = c.diffs["rank1"], c.diffs["mAP"]
            body.append((c.name, c.num_gan, r1.n, _diff(r1), _adj(r1), r1.verdict, _diff(mp), _adj(mp)))
    cols = ("contrast (a vs b: a - b per seed)", "#GAN", "n", "Δ rank-1", "p Holm", "verdict", "Δ mAP", "p Holm")
    evaluated = "" if gs[0].evaluation == AS_TRAINED else f" ({gs[0].evaluation})"
    return f"setting {setting}{evaluated}: the paper's claims\n" + format_table(cols, body, align="lrrrrlrr")


def pool_quality(client, exp_id: str, parent: str) -> str:
    """The quality of each generated pool the sweep used (its pool_quality stage runs), or ""."""
    filt = (f"tags.`{tracking.TAG_KIND}` = 'stage' and attributes.status = 'FINISHED' and "
            f"tags.`{tracking.TAG_PARENT}` = '{parent}' and tags.`{tracking.TAG_KEY}` LIKE 'pool_quality:%'")
    runs = client.search_runs([exp_id], filt, max_results=100)
    return "\n".join(PoolQualityOut.from_metrics(r.data.metrics, r.data.params.get("sheet", "?"),
                                                r.data.params.get("rendering", "?")).summary() for r in runs)


def sweep_statistics(tracking_uri: str, experiment: str, storage: Path, parent: str) -> str:
    """The statistics block of one sweep (what the sweep prints after its per-trial table), then its pools' quality."""
    client, exp_id = tracking.setup(tracking_uri, experiment, storage)
    groups = summarise(collect(client, exp_id, parent))
    text = format_report(groups) if groups else "no finished trials: no statistics"
    pools = pool_quality(client, exp_id, parent)
    return text + (f"\n\n{pools}" if pools else "")


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="mprl")
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<--storage>/mlflow.db")
    p.add_argument("--storage", default="runs", help="the sweep's cluster.storage_path (for the default URI)")
    p.add_argument("--sweep", help="a sweep's parent run id or name (default: the latest sweep)")
    p.add_argument("--out", default=None, help="also write the table and chart here")
    args = p.parse_args(argv)
    uri = args.tracking_uri or tracking.default_tracking_uri(Path(args.storage).resolve())
    client, exp_id = tracking.setup(uri, args.experiment, Path(args.storage).resolve())
    try:
        found = find_sweep(client, exp_id, args.sweep) if args.sweep else latest_sweep(client, exp_id)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    groups = summarise(collect(client, exp_id, found[0])) if found else []
    if not groups:
        print(f"no finished trials in experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return 1
    pools = pool_quality(client, exp_id, found[0])
    text = f"sweep {found[1]} (parent run {found[0]})\n\n" + format_report(groups) + (f"\n\n{pools}" if pools else "")
    print(text)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(text + "\n")
        chart = plot_gains([g for g in groups if g.method != BASELINE and g.evaluation == AS_TRAINED],  # controls too
                           BASELINE, out / "comparison.png")
        run_id, _ = tracking.get_or_create_run(client, exp_id, "report", found[0], "report")
        tracking.log_artifacts(client, run_id, [out / "report.txt", chart], "report")
        tracking.set_status(client, run_id, "FINISHED")
    print(f"\nchart and table logged to MLflow run {run_id}" + (f" and written to {out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
