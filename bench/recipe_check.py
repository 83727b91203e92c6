"""Re-check a recipe's choices on the validation split only: the baseline trained per variant and seed, compared on
``val_rank1`` / ``val_mAP`` (identities held out of training, ``reid.val_ids``); the test split is never read.

The cpu preset's recipe (bench/RESULTS.md, "The default cpu sweep") was chosen by reading test rank-1. This runs the
same choices again the honest way: the preset, and each variant that changes one of its choices, as baseline-only
sweeps (``orchestrator.sweep.run_sweep``: every training in a Ray worker) on one storage path, seeds paired, then
each variant's paired difference from the preset on the validation metrics, Holm-adjusted over the variants. A
variant better at p Holm < 0.05 says the choice changes; otherwise the preset's choice stands (or the difference is
noise at this n, and the report says so).

    python -m bench.recipe_check [--preset cpu] [--seeds 0 1 2] [--val-ids 20] [--storage DIR]
                                 [--variant NAME KEY=VALUE [KEY=VALUE ...]] ...

Without ``--variant``: the cpu recipe's own alternatives (``DEFAULT_VARIANTS``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.common import format_table, machine, reproduce
from orchestrator.config import load_config
from orchestrator.stats import adjusted, paired, summary
from trainables.checkpoints import METRICS_FILE, latest

# the cpu recipe's choices, each against the alternative it was picked over (bench/RESULTS.md)
DEFAULT_VARIANTS = {
    "12 epochs (x0.1 at 9)": ["reid.epochs=12"],
    "SGD Nesterov 0.05": ["reid.optimizer=sgd", "reid.lr=0.05"],
    "no label smoothing": ["labels.real_smoothing=0"],
}
VAL_METRICS = ("val_rank1", "val_mAP")


def baseline_val(preset: str, storage: Path, seeds: list[int], val_ids: int, extra: list[str]) -> dict:
    """seed -> {val_rank1, val_mAP} (percent) of the baseline of ``preset`` + ``extra``: the last epoch's
    validation metrics, read from each seed's baseline stage checkpoint (never its test metrics)."""
    from orchestrator.sweep import run_sweep

    base = [f"cluster.storage_path={storage}", "sweep.methods=[baseline]", f"sweep.seeds={list(seeds)}",
            f"reid.val_ids={val_ids}"]
    epochs = load_config(preset, overrides=[*base, *extra]).reid.epochs  # validate once, after the last epoch
    cfg = load_config(preset, overrides=[*base, f"reid.eval_every={epochs}", *extra])
    out = run_sweep(cfg, log_models=False)
    got = {}
    for seed, stage in out.stages.baselines.items():
        metrics = json.loads((latest(stage.out.run_dir) / METRICS_FILE).read_text())
        got[seed] = {k: 100 * metrics[k] for k in VAL_METRICS}
    return got


def compare(results: dict[str, dict[int, dict[str, float]]], reference: str) -> list[list]:
    """One row per variant: n, val rank-1 / mAP mean ± std, the paired difference from ``reference`` with raw and
    Holm-adjusted p (over the variants, per metric) and the verdict."""
    names = [n for n in results if n != reference]
    diffs = {m: adjusted([paired({s: r[m] for s, r in results[n].items()},
                                 {s: r[m] for s, r in results[reference].items()}) for n in names])
             for m in VAL_METRICS}
    rows = []
    for name in results:
        s = {m: summary([r[m] for r in results[name].values()]) for m in VAL_METRICS}
        d = {m: None if name == reference else diffs[m][names.index(name)] for m in VAL_METRICS}
        rows.append([name, s["val_rank1"].n, f"{s['val_rank1'].mean:.2f} ± {s['val_rank1'].std:.2f}",
                     f"{s['val_mAP'].mean:.2f} ± {s['val_mAP'].std:.2f}",
                     *(_diff(d[m]) for m in VAL_METRICS), d["val_rank1"].verdict if d["val_rank1"] else "(reference)"])
    return rows


def _diff(d) -> str | None:
    if d is None:
        return None
    ci = "" if d.ci is None else f" [±{d.ci:.2f}]"
    return f"{d.mean:+.2f}{ci} p={d.p:.2f} Holm {d.p_adj:.2f}" if d.p is not None else f"{d.mean:+.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--val-ids", type=int, default=20, help="training identities held out as the validation split")
    p.add_argument("--storage", default=None, help="default: a temporary folder (deleted)")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="a named variant and its --set overrides (repeatable)")
    args = p.parse_args(argv)
    if args.val_ids < 2:
        p.error("--val-ids must be >= 2: the recipe is compared on held-out identities, never on the test split")
    variants = {v[0]: v[1:] for v in args.variant} if args.variant else DEFAULT_VARIANTS
    reference = f"{args.preset} preset"
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(args.storage or tmp).resolve()
        results = {name: baseline_val(args.preset, storage, args.seeds, args.val_ids, extra)
                   for name, extra in {reference: [], **variants}.items()}
    head = f"{machine()}\n{reproduce('bench.recipe_check', argv)}"
    print(f"\n{head}\nbaseline on the validation split ({args.val_ids} training identities held out; the test split "
          f"is not read), seeds {args.seeds}; Δ = variant - preset per seed, Holm over {len(variants)} variants:\n")
    print(format_table(["variant", "n", "val rank-1", "val mAP", "Δ val rank-1", "Δ val mAP", "verdict"],
                       compare(results, reference), align="lrrrrrl"))
    better = [r[0] for r in compare(results, reference)[1:] if r[-1] == "better"]
    print("\nthe choice changes: " + ", ".join(better) if better else
          "\nno variant is better on validation at p Holm < 0.05: the preset's choices stand at this n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
