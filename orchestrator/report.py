"""``python -m orchestrator.report``: our results by method x #GAN images (mean ± std over seeds) beside the
paper's Market-1501 numbers, as a table and a chart PNG, logged to MLflow.

Absolute numbers on the synthetic dataset are not comparable with Market-1501; the gain over the baseline is,
in sign and rough size, which is what the chart shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.paper_numbers import paper_row, ratio
from orchestrator.tables import format_table


def collect(client, exp_id: str, parent: str | None = None) -> list[dict[str, Any]]:
    """Finished trial runs as rows (method, num_gan, order, keep, seed, rank1, mAP, num_train)."""
    filt = f"tags.`{tracking.TAG_KIND}` = 'trial' and attributes.status = 'FINISHED'"
    if parent:
        filt += f" and tags.`{tracking.TAG_PARENT}` = '{parent}'"
    rows = []
    for r in client.search_runs([exp_id], filt, max_results=50000):
        p, m = r.data.params, r.data.metrics
        if "final_rank1" not in m:
            continue
        rows.append({"dataset": p.get("dataset.name", "synthetic"),
                     "method": p.get("labels.method"), "num_gan": int(p.get("labels.num_gan", 0)),
                     "order": p.get("labels.order", "paper"), "keep": p.get("labels.keep", "None"),
                     "model": p.get("reid.model", "ident"), "seed": int(p.get("reid.seed", 0)),
                     "rank1": m["final_rank1"], "mAP": m.get("final_mAP", float("nan")),
                     "num_train": int(p.get("data.num_train", 0) or 0)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group by (dataset, model, method, #GAN, order, keep): mean and std of rank-1 and mAP over seeds, beside
    the published row for that dataset and model (or the reason there is none)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["method"], r["num_gan"], r["order"], r["keep"])].append(r)
    out = []
    for (dataset, model, method, n, order, keep), rs in sorted(groups.items(),
                                                                key=lambda kv: (*kv[0][:2], kv[0][3], kv[0][2])):
        def stats(k):
            vals = [100 * x[k] for x in rs]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        num_train = max(x["num_train"] for x in rs)
        paper, note = paper_row(dataset, model, method, n, num_train)
        out.append({"dataset": dataset, "model": model, "method": method, "num_gan": n, "order": order, "keep": keep,
                    "seeds": len(rs), "rank1": stats("rank1"), "mAP": stats("mAP"), "ratio": ratio(n, num_train),
                    "paper": paper, "paper_note": note})
    base = {(g["dataset"], g["model"]): g for g in out if g["method"] == "baseline"}
    for g in out:
        b = base.get((g["dataset"], g["model"]))
        g["gain_rank1"] = g["rank1"][0] - b["rank1"][0] if b else None
        bp = b["paper"] if b else None
        g["paper_gain_rank1"] = g["paper"].rank1 - bp.rank1 if g["paper"] and bp else None
    return out


def format_report(groups: list[dict[str, Any]]) -> str:
    """Ours (mean ± std over n seeds) beside the matched paper row: table, #GAN, rank-1, mAP, gain."""
    def ms(v):
        return f"{v[0]:.2f} ± {v[1]:.2f}"

    def num(v):
        return None if v is None else f"{v:.2f}"

    body = []
    for g in groups:
        p = g["paper"]
        ref = f"{p.table}{'*' if p.reference_only else ''}" if p else None
        body.append((g["dataset"], g["model"], g["method"], g["num_gan"], g["order"], g["keep"], g["seeds"],
                     ms(g["rank1"]), ms(g["mAP"]), num(g["gain_rank1"]),
                     None if g["ratio"] is None else f"{g['ratio']:.2f}x", ref, p and p.num_gan,
                     p and f"{p.rank1:.2f}", p and f"{p.mAP:.2f}", num(g["paper_gain_rank1"]),
                     "" if p else g["paper_note"]))
    head = ("dataset", "model", "method", "#GAN", "order", "keep", "n", "rank-1 (ours)", "mAP (ours)", "Δr1",
            "gen/real", "table", "paper #GAN", "rank-1", "mAP", "Δr1", "")
    notes = ("Δr1 = rank-1 gain over the baseline of the same dataset and model (ours: same seeds). Paper rows "
             "(TIP 2019): Table IV (Market-1501, identification net, matched on the generated/real ratio), Table III "
             "(other datasets, 24,000 images), Table VII (two-stream). * = Market-1501's numbers shown for the gain "
             "only (our synthetic set has no published numbers).")
    return format_table(head, body, align="lllrlrrrrrrlrrrrl") + "\n" + notes


def plot_gains(groups: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart: rank-1 gain over the baseline per method/#GAN, ours beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in groups if g["method"] != "baseline" and g["gain_rank1"] is not None]
    labels = [f"{g['method']}\n{g['num_gan']}" + ("" if g["order"] == "paper" else "\n(code order)") for g in rows]
    paper_label = "paper" + (" (Market-1501, reference)" if any(g["paper"] and g["paper"].reference_only
                                                                 for g in rows) else "")
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    ax.bar([x - 0.2 for x in xs], [g["gain_rank1"] for g in rows], 0.4, yerr=[g["rank1"][1] for g in rows],
           label="ours", color="#3572b0", capsize=3)
    ax.bar([x + 0.2 for x in xs], [g["paper_gain_rank1"] or 0 for g in rows], 0.4, label=paper_label,
           color="#d9822b")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("rank-1 gain over baseline (points)")
    ax.set_title("Generated data with virtual labels: gain over the real-data baseline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="mprl")
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<--storage>/mlflow.db")
    p.add_argument("--storage", default="runs", help="the sweep's cluster.storage_path (for the default URI)")
    p.add_argument("--sweep", help="only this sweep's parent run id (default: every finished trial)")
    p.add_argument("--out", default=None, help="also write the table and chart here")
    args = p.parse_args(argv)
    uri = args.tracking_uri or tracking.default_tracking_uri(Path(args.storage).resolve())
    client, exp_id = tracking.setup(uri, args.experiment, Path(args.storage).resolve())
    groups = summarise(collect(client, exp_id, args.sweep))
    if not groups:
        print(f"no finished trials in experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return 1
    text = format_report(groups)
    print(text)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(text + "\n")
        chart = plot_gains(groups, out / "comparison.png")
        run_id, _ = tracking.get_or_create_run(client, exp_id, "report", args.sweep or "all", "report")
        tracking.log_artifacts(client, run_id, [out / "report.txt", chart], "report")
        tracking.set_status(client, run_id, "FINISHED")
    print(f"\nchart and table logged to MLflow run {run_id}" + (f" and written to {out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
