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
from orchestrator.paper_numbers import BASELINE, paper_row


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
        rows.append({"method": p.get("labels.method"), "num_gan": int(p.get("labels.num_gan", 0)),
                     "order": p.get("labels.order", "paper"), "keep": p.get("labels.keep", "None"),
                     "model": p.get("reid.model", "ident"), "seed": int(p.get("reid.seed", 0)),
                     "rank1": m["final_rank1"], "mAP": m.get("final_mAP", float("nan")),
                     "num_train": int(p.get("data.num_train", 0) or 0)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group by (model, method, #GAN, order, keep): mean and std of rank-1 and mAP over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["method"], r["num_gan"], r["order"], r["keep"])].append(r)
    out = []
    for (model, method, n, order, keep), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        def stats(k):
            vals = [100 * x[k] for x in rs]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        num_train = max(x["num_train"] for x in rs)
        paper = paper_row(method, n, num_train)
        out.append({"model": model, "method": method, "num_gan": n, "order": order, "keep": keep, "seeds": len(rs),
                    "rank1": stats("rank1"), "mAP": stats("mAP"), "paper_num_gan": paper[0] if paper else None,
                    "paper_mAP": paper[1][0] if paper else None, "paper_rank1": paper[1][1] if paper else None})
    base = {(g["model"]): g for g in out if g["method"] == "baseline"}
    for g in out:
        b = base.get(g["model"])
        g["gain_rank1"] = g["rank1"][0] - b["rank1"][0] if b else None
        g["paper_gain_rank1"] = g["paper_rank1"] - BASELINE[1] if g["paper_rank1"] is not None else None
    return out


def format_report(groups: list[dict[str, Any]]) -> str:
    head = (f"{'model':<9} {'method':<9} {'#GAN':>6} {'order':<14} {'keep':>5} {'n':>2}  {'rank-1 (ours)':>14} "
            f"{'mAP (ours)':>14} {'Δr1':>6} | {'paper #GAN':>10} {'rank-1':>7} {'mAP':>7} {'Δr1':>6}")
    lines = [head, "-" * len(head)]
    for g in groups:
        def ms(v):
            return f"{v[0]:6.2f} ± {v[1]:5.2f}"

        def num(v, w=7):
            return f"{v:{w}.2f}" if v is not None else f"{'-':>{w}}"

        lines.append(f"{g['model']:<9} {g['method']:<9} {g['num_gan']:>6} {g['order']:<14} {str(g['keep']):>5} "
                     f"{g['seeds']:>2}  {ms(g['rank1']):>14} {ms(g['mAP']):>14} {num(g['gain_rank1'], 6)} | "
                     f"{str(g['paper_num_gan'] if g['paper_num_gan'] is not None else '-'):>10} "
                     f"{num(g['paper_rank1'])} {num(g['paper_mAP'])} {num(g['paper_gain_rank1'], 6)}")
    lines.append("Δr1 = rank-1 gain over the baseline of the same table (ours: same model and seeds; paper: "
                 f"{BASELINE[1]}). Paper: TIP 2019 Table IV, Market-1501, ResNet-50 identification net.")
    return "\n".join(lines)


def plot_gains(groups: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart: rank-1 gain over the baseline per method/#GAN, ours beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in groups if g["method"] != "baseline" and g["gain_rank1"] is not None]
    labels = [f"{g['method']}\n{g['num_gan']}" + ("" if g["order"] == "paper" else "\n(code order)") for g in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    ax.bar([x - 0.2 for x in xs], [g["gain_rank1"] for g in rows], 0.4, yerr=[g["rank1"][1] for g in rows],
           label="ours (synthetic)", color="#3572b0", capsize=3)
    ax.bar([x + 0.2 for x in xs], [g["paper_gain_rank1"] or 0 for g in rows], 0.4, label="paper (Market-1501)",
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
