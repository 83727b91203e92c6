"""``python -m orchestrator.report``: one sweep's results with honest statistics, beside the paper's numbers.

Per group of trials that differ only in the seed: n, mean ± std and the 95% interval of rank-1 and mAP. Per label
method: the paired per-seed difference from the baseline (and from the compute-matched baseline, where swept)
with its interval, a paired t-test and a plain verdict ("better", "worse", "no detectable difference at n=3").
Groups never mix settings: every config field that is not swept (dataset, preset, backbone, epochs, image size,
label hyperparameters, AP mode, ...) goes into a hash that is part of the group. By default the latest sweep is
reported; ``--sweep`` picks another (its parent run id or name). The table and a chart go to MLflow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.paper_numbers import paper_row, ratio
from orchestrator.stats import paired, summary
from orchestrator.tables import format_table

SWEPT = ("labels.method", "labels.num_gan", "labels.order", "labels.keep", "reid.seed", "trial")
# where and how fast, not what: never part of a setting
RUNTIME = ("reid.num_workers", "reid.use_gpu", "reid.loader_workers", "reid.channels_last", "gan.num_workers",
           "gan.use_gpu", "dataset.root")
REFERENCES = ("baseline", "baseline_matched")  # what each method's paired difference is taken against


def setting_of(params: dict[str, str]) -> str:
    """A short hash of every config field a trial's result depends on, except the swept ones."""
    kept = {k: v for k, v in params.items() if k not in SWEPT and k not in RUNTIME
            and not k.startswith(("data.", "cluster.", "sweep."))}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


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


def collect(client, exp_id: str, parent: str) -> list[dict[str, Any]]:
    """The sweep's finished trial runs as rows (setting, dataset, model, method, #GAN, order, keep, seed, metrics)."""
    filt = (f"tags.`{tracking.TAG_KIND}` = 'trial' and attributes.status = 'FINISHED' and "
            f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    rows = []
    for r in client.search_runs([exp_id], filt, max_results=50000):
        p, m = r.data.params, r.data.metrics
        if "final_rank1" not in m:
            continue
        rows.append({"setting": setting_of(p), "preset": p.get("preset", "?"),
                     "dataset": p.get("dataset.name", "synthetic"), "model": p.get("reid.model", "ident"),
                     "method": p.get("labels.method"), "num_gan": int(p.get("labels.num_gan", 0)),
                     "order": p.get("labels.order", "paper"), "keep": p.get("labels.keep", "None"),
                     "seed": int(p.get("reid.seed", 0)), "rank1": m["final_rank1"],
                     "mAP": m.get("final_mAP", float("nan")), "num_train": int(p.get("data.num_train", 0) or 0),
                     "single_baseline": p.get("sweep.single_baseline", "False")})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of seeds (setting, dataset, model, method, #GAN, order, keep) with their statistics, paired
    differences from the references of the same setting, and the published row (or why there is none)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["setting"], r["dataset"], r["model"], r["method"], r["num_gan"], r["order"], r["keep"])].append(r)
    out = [_group(key, rs) for key, rs in sorted(groups.items(), key=lambda kv: (*kv[0][:3], kv[0][4], kv[0][3]))]
    for g in out:
        for ref in REFERENCES:
            b = _reference(out, g, ref)
            g[f"vs_{ref}"] = None if b is None or b is g else {
                k: paired(g["by_seed"][k], b["by_seed"][k]) for k in ("rank1", "mAP")}
        base = _reference(out, g, "baseline")
        bp = base["paper"] if base else None
        g["paper_gain_rank1"] = g["paper"].rank1 - bp.rank1 if g["paper"] and bp else None
    return out


def _group(key: tuple, rs: list[dict]) -> dict[str, Any]:
    setting, dataset, model, method, n, order, keep = key
    num_train = max(x["num_train"] for x in rs)
    paper, note = paper_row(dataset, model, method, n, num_train)
    by_seed = {k: {x["seed"]: 100 * x[k] for x in rs} for k in ("rank1", "mAP")}
    return {"setting": setting, "preset": rs[0]["preset"], "dataset": dataset, "model": model, "method": method,
            "num_gan": n, "order": order, "keep": keep, "seeds": sorted(by_seed["rank1"]), "by_seed": by_seed,
            "rank1": summary(list(by_seed["rank1"].values())), "mAP": summary(list(by_seed["mAP"].values())),
            "ratio": ratio(n, num_train), "paper": paper, "paper_note": note,
            "single_baseline": rs[0]["single_baseline"] == "True"}


def _reference(groups: list[dict], g: dict, ref: str) -> dict | None:
    """The baseline group of g's setting (baseline_matched: the one at g's #GAN)."""
    for b in groups:
        same = (b["setting"], b["dataset"], b["model"]) == (g["setting"], g["dataset"], g["model"])
        if same and b["method"] == ref and (ref == "baseline" or b["num_gan"] == g["num_gan"]):
            return b
    return None


# ------------------------------------------------------------------------------------------ output

def _ms(s) -> str:
    ci = "" if s.ci is None else f" [±{s.ci:.2f}]"
    return f"{s.mean:.2f} ± {s.std:.2f}{ci}"


def _diff(d) -> str | None:
    if d is None:
        return None
    ci = "" if d.ci is None else f" [±{d.ci:.2f}]"
    p = "" if d.p is None else f" p={d.p:.2f}"
    return f"{d.mean:+.2f}{ci}{p}"


def format_report(groups: list[dict[str, Any]]) -> str:
    """Per setting: our numbers (n, mean ± std [95% interval]), the paired differences with verdicts, the paper."""
    blocks = []
    for setting in dict.fromkeys(g["setting"] for g in groups):
        gs = [g for g in groups if g["setting"] == setting]
        blocks.append(_setting_block(setting, gs))
    notes = ("rank-1 / mAP in %, mean ± std [± half-width of the 95% t interval] over n seeds. Δ = paired per-seed "
             "difference (method - reference) over the seeds both ran, with its 95% interval and the paired t-test's "
             "p; the verdict calls a difference only at p < 0.05. Paper (TIP 2019, single runs): Table IV "
             "(Market-1501, identification net, matched on the generated/real ratio), Table III (other datasets), "
             "Table VII (two-stream); * = Market-1501's numbers, for the gain only (synthetic data).")
    return "\n\n".join(blocks) + "\n\n" + notes


def _setting_block(setting: str, gs: list[dict]) -> str:
    g0 = gs[0]
    protocol = "one baseline labels every seed (paper)" if g0["single_baseline"] else "per-seed baselines"
    head = (f"setting {setting}: preset {g0['preset']}, dataset {g0['dataset']}, model {g0['model']}; "
            f"sMpRL labels from {protocol}")
    body = []
    for g in gs:
        p, gain = g["paper"], g["paper_gain_rank1"]
        vb, vm = g.get("vs_baseline"), g.get("vs_baseline_matched")
        body.append((g["method"], g["num_gan"], g["order"], g["keep"], g["rank1"].n, _ms(g["rank1"]), _ms(g["mAP"]),
                     _diff(vb and vb["rank1"]), vb["rank1"].verdict if vb and vb["rank1"] else None,
                     _diff(vm and vm["rank1"]), None if g["ratio"] is None else f"{g['ratio']:.2f}x",
                     f"{p.table}{'*' if p.reference_only else ''} {p.num_gan}" if p else g["paper_note"][:60],
                     p and f"{p.rank1:.2f}", None if gain is None else f"{gain:+.2f}"))
    cols = ("method", "#GAN", "order", "keep", "n", "rank-1", "mAP", "Δr1 vs baseline", "verdict",
            "Δr1 vs matched", "gen/real", "paper row", "rank-1", "Δr1")
    return head + "\n" + format_table(cols, body, align="lrlrrrrrlrrlrr")


def sweep_statistics(tracking_uri: str, experiment: str, storage: Path, parent: str) -> str:
    """The statistics block of one sweep (what the sweep prints after its per-trial table)."""
    client, exp_id = tracking.setup(tracking_uri, experiment, storage)
    groups = summarise(collect(client, exp_id, parent))
    return format_report(groups) if groups else "no finished trials: no statistics"


def plot_gains(groups: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart: paired rank-1 gain over the baseline per method/#GAN with its 95% interval, beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in groups if g["method"] not in REFERENCES and g.get("vs_baseline")]
    labels = [f"{g['method']}\n{g['num_gan']}" + ("" if g["order"] == "paper" else "\n(code order)") for g in rows]
    gains = [g["vs_baseline"]["rank1"] for g in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    n = max((d.n for d in gains), default=0)
    ours = f"ours (mean, 95% interval; n={n})" if n > 1 else "ours (one seed: no interval, no finding)"
    ax.bar([x - 0.2 for x in xs], [d.mean for d in gains], 0.4, yerr=[d.ci or 0 for d in gains], capsize=3,
           label=ours, color="#3572b0")
    reference = any(g["paper"] and g["paper"].reference_only for g in rows)
    ax.bar([x + 0.2 for x in xs], [g["paper_gain_rank1"] or 0 for g in rows], 0.4, color="#d9822b",
           label="paper (Market-1501" + (", reference)" if reference else ")"))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("rank-1 gain over baseline (points)")
    ax.set_title("Paired rank-1 gain over the real-data baseline")
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
    text = f"sweep {found[1]} (parent run {found[0]})\n\n" + format_report(groups)
    print(text)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(text + "\n")
        chart = plot_gains(groups, out / "comparison.png")
        run_id, _ = tracking.get_or_create_run(client, exp_id, "report", found[0], "report")
        tracking.log_artifacts(client, run_id, [out / "report.txt", chart], "report")
        tracking.set_status(client, run_id, "FINISHED")
    print(f"\nchart and table logged to MLflow run {run_id}" + (f" and written to {out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
