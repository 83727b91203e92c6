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
import dataclasses
import hashlib
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import tracking
from orchestrator.config import RUNTIME_FIELDS
from orchestrator.paper_numbers import PaperRow, paper_row, ratio
from orchestrator.plots import plot_gains
from orchestrator.stage_cache import PoolQualityOut
from orchestrator.stats import Paired, Summary, paired, summary
from orchestrator.tables import format_table
from orchestrator.trials import TrialSpec
from trainables.logs import configure_logging
from trainables.methods import BASELINE, METHODS, method

SWEPT = (*TrialSpec(BASELINE, 0).overrides(), "trial")  # what differs between the trials of one setting
CONTROLS = tuple(m for m, t in METHODS.items() if t.control)  # every method's paired difference is taken against these


def setting_of(params: dict[str, str]) -> str:
    """A short hash of every config field a trial's result depends on, except the swept ones and those that change
    where or how fast it ran (``RUNTIME_FIELDS``, ``dataset.root``: the same data elsewhere)."""
    kept = {k: v for k, v in params.items() if k not in SWEPT and k != "dataset.root"
            and k.rsplit(".", 1)[-1] not in RUNTIME_FIELDS and not k.startswith(("data.", "cluster.", "sweep."))}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Settings:
    """What a trial was, besides its seed: its setting hash (every non-swept field), dataset, model and method."""

    setting: str
    preset: str
    dataset: str
    model: str
    method: str
    num_gan: int
    order: str
    keep: str

    @property
    def group(self) -> tuple:
        """What a group of seeds shares."""
        return (self.setting, self.dataset, self.model, self.method, self.num_gan, self.order, self.keep)

    def same_setting(self, other: "Settings") -> bool:
        return (self.setting, self.dataset, self.model) == (other.setting, other.dataset, other.model)


@dataclass(frozen=True)
class TrialResult(Settings):
    """One finished trial run of a sweep, as the report reads it from MLflow."""

    seed: int = 0
    rank1: float = float("nan")  # fractions in [0, 1]
    mAP: float = float("nan")
    num_train: int = 0
    single_baseline: bool = False
    lr_scheme: str = "paper"  # reid.lr_scheme (part of the setting hash: an ablation is a setting of its own)


@dataclass(frozen=True)
class Group(Settings):
    """Trials that differ only in the seed: their statistics, paired differences and the published row."""

    by_seed: dict[str, dict[int, float]] = field(default_factory=dict)  # "rank1" / "mAP" -> seed -> percent
    rank1: Summary | None = None
    mAP: Summary | None = None
    ratio: float | None = None  # generated / real training images
    paper: PaperRow | None = None
    paper_note: str = ""
    single_baseline: bool = False
    lr_scheme: str = "paper"
    vs: dict[str, dict[str, Paired | None]] = field(default_factory=dict)  # control -> metric -> paired difference
    paper_gain_rank1: float | None = None  # the published rank-1 gain over the published baseline

    @property
    def seeds(self) -> list[int]:
        return sorted(self.by_seed["rank1"])


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
    """The sweep's finished trial runs (those with final test metrics)."""
    filt = (f"tags.`{tracking.TAG_KIND}` = 'trial' and attributes.status = 'FINISHED' and "
            f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    rows = []
    for r in client.search_runs([exp_id], filt, max_results=50000):
        p, m = r.data.params, r.data.metrics
        if "final_rank1" not in m:
            continue
        rows.append(TrialResult(
            setting=setting_of(p), preset=p.get("preset", "?"), dataset=p.get("dataset.name", "synthetic"),
            model=p.get("reid.model", "ident"), method=p.get("labels.method"), num_gan=int(p.get("labels.num_gan", 0)),
            order=p.get("labels.order", "paper"), keep=p.get("labels.keep", "None"), seed=int(p.get("reid.seed", 0)),
            rank1=m["final_rank1"], mAP=m.get("final_mAP", float("nan")),
            num_train=int(p.get("data.num_train", 0) or 0),
            single_baseline=p.get("sweep.single_baseline", "False") == "True",
            lr_scheme=p.get("reid.lr_scheme", "paper")))
    return rows


def summarise(rows: list[TrialResult]) -> list[Group]:
    """Groups of seeds with their statistics, paired differences from the controls of the same setting, and the
    published row (or why there is none)."""
    by_group: dict[tuple, list[TrialResult]] = defaultdict(list)
    for r in rows:
        by_group[r.group].append(r)
    groups = [_group(rs) for _, rs in sorted(by_group.items(), key=lambda kv: (*kv[0][:3], kv[0][4], kv[0][3]))]
    out = []
    for g in groups:
        vs = {}
        for control in CONTROLS:
            ref = _reference(groups, g, control)
            vs[control] = None if ref is None or ref is g else {
                k: paired(g.by_seed[k], ref.by_seed[k]) for k in ("rank1", "mAP")}
        base = _reference(groups, g, BASELINE)
        bp = base.paper if base else None
        gain = g.paper.rank1 - bp.rank1 if g.paper and bp else None
        out.append(dataclasses.replace(g, vs=vs, paper_gain_rank1=gain))
    return out


def _group(rs: list[TrialResult]) -> Group:
    r0 = rs[0]
    num_train = max(x.num_train for x in rs)
    paper, note = paper_row(r0.dataset, r0.model, r0.method, r0.num_gan, num_train)
    by_seed = {k: {x.seed: 100 * getattr(x, k) for x in rs} for k in ("rank1", "mAP")}
    return Group(*(getattr(r0, f.name) for f in dataclasses.fields(Settings)), by_seed=by_seed,
                 rank1=summary(list(by_seed["rank1"].values())), mAP=summary(list(by_seed["mAP"].values())),
                 ratio=ratio(r0.num_gan, num_train), paper=paper, paper_note=note, single_baseline=r0.single_baseline,
                 lr_scheme=r0.lr_scheme)


def _reference(groups: list[Group], g: Group, control: str) -> Group | None:
    """The ``control`` group of g's setting: at g's #GAN when the control has extra images (the compute-matched one)."""
    extra = method(control).extra_images
    for b in groups:
        if b.same_setting(g) and b.method == control and (not extra or b.num_gan == g.num_gan):
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


def format_report(groups: list[Group]) -> str:
    """Per setting: our numbers (n, mean ± std [95% interval]), the paired differences with verdicts, the paper."""
    blocks = []
    for setting in dict.fromkeys(g.setting for g in groups):
        gs = [g for g in groups if g.setting == setting]
        blocks.append(_setting_block(setting, gs))
    notes = ("rank-1 / mAP in %, mean ± std [± half-width of the 95% t interval] over n seeds. Δ = paired per-seed "
             "difference (method - reference) over the seeds both ran, with its 95% interval and the paired t-test's "
             "p; the verdict calls a difference only at p < 0.05. Paper (TIP 2019, single runs): Table IV "
             "(Market-1501, identification net, matched on the generated/real ratio), Table III (other datasets), "
             "Table VII (two-stream); * = Market-1501's numbers, for the gain only (synthetic data).")
    return "\n\n".join(blocks) + "\n\n" + notes


def _setting_block(setting: str, gs: list[Group]) -> str:
    g0 = gs[0]
    protocol = "one baseline labels every seed (paper)" if g0.single_baseline else "per-seed baselines"
    head = (f"setting {setting}: preset {g0.preset}, dataset {g0.dataset}, model {g0.model}, learning rates "
            f"{g0.lr_scheme}; sMpRL labels from {protocol}")
    others = [c for c in CONTROLS if c != BASELINE]
    body = []
    for g in gs:
        p, gain, vb = g.paper, g.paper_gain_rank1, g.vs.get(BASELINE)
        body.append((g.method, g.num_gan, g.order, g.keep, g.rank1.n, _ms(g.rank1), _ms(g.mAP),
                     _diff(vb and vb["rank1"]), vb["rank1"].verdict if vb and vb["rank1"] else None,
                     *(_diff((g.vs.get(c) or {}).get("rank1")) for c in others),
                     None if g.ratio is None else f"{g.ratio:.2f}x",
                     f"{p.table}{'*' if p.reference_only else ''} {p.num_gan}" if p else g.paper_note[:60],
                     p and f"{p.rank1:.2f}", None if gain is None else f"{gain:+.2f}"))
    cols = ("method", "#GAN", "order", "keep", "n", "rank-1", "mAP", f"Δr1 vs {BASELINE}", "verdict",
            *(f"Δr1 vs {c}" for c in others), "gen/real", "paper row", "rank-1", "Δr1")
    return head + "\n" + format_table(cols, body, align="lrlrrrrrl" + "r" * len(others) + "rlrr")


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
        chart = plot_gains([g for g in groups if not method(g.method).control], BASELINE, out / "comparison.png")
        run_id, _ = tracking.get_or_create_run(client, exp_id, "report", found[0], "report")
        tracking.log_artifacts(client, run_id, [out / "report.txt", chart], "report")
        tracking.set_status(client, run_id, "FINISHED")
    print(f"\nchart and table logged to MLflow run {run_id}" + (f" and written to {out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
