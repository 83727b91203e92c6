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
into a hash that is part of the group. By default the latest sweep is
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
from orchestrator.stats import Paired, Summary, adjusted, paired, summary
from orchestrator.tables import format_table
from orchestrator.trials import TrialSpec
from trainables.logs import configure_logging
from trainables.methods import BASELINE, METHODS, method

# what differs between the trials of one setting (the pool is a column of the groups, as #GAN is)
SWEPT = (*TrialSpec(BASELINE, 0).overrides(), "labels.pool", "labels.pool_root", "trial")
CONTROLS = tuple(m for m, t in METHODS.items() if t.control)  # every method's paired difference is taken against these
# the paper's claims, as paired contrasts "a vs b" at one #GAN (TIP 2019 Table IV's point is the first)
METHOD_CONTRASTS = (("dmprl2", "lsro"), ("dmprl2", "dmprl1"), ("dmprl1", "smprl"), ("smprl", "lsro"))
METRIC_NAMES = {"rank1": "rank-1", "mAP": "mAP"}
TAG_STOPPED_AFTER = "mprl.stopped_after_epochs"  # orchestrator.tuning's tag on a trial a scheduler stopped


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
    pool: str = "gan"  # labels.pool ("folder:<name>" for a folder pool)

    @property
    def group(self) -> tuple:
        """What a group of seeds shares."""
        return (self.setting, self.dataset, self.model, self.method, self.num_gan, self.order, self.keep, self.pool)

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
    stopped_after: int | None = None  # epochs trained when a scheduler (ASHA) stopped it (then no test metrics)


@dataclass(frozen=True)
class Contrast:
    """A paired difference between two groups of one setting and #GAN: ``a`` - ``b`` per seed (the paper's claims)."""

    name: str  # "dmprl2 vs lsro", "dmprl2: code order vs paper order", "lsro: synthetic_ids pool vs gan pool"
    num_gan: int
    diffs: dict[str, Paired | None]  # "rank1" / "mAP" -> the paired difference


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
    stopped: dict[int, int] = field(default_factory=dict)  # seed -> epochs trained, of trials ASHA stopped
    contrasts: tuple[Contrast, ...] = ()  # the paper's claims with this group on the left ("a vs b")

    @property
    def seeds(self) -> list[int]:
        return sorted(self.by_seed["rank1"])

    @property
    def n_total(self) -> int:
        """Trials of the group: finished ones and stopped ones."""
        return len(self.by_seed["rank1"]) + len(self.stopped)

    @property
    def stopped_note(self) -> str | None:
        """"2 of 3 seeds stopped after 4 epochs" (ASHA), or None when every trial ran to the end."""
        if not self.stopped:
            return None
        epochs = sorted(set(self.stopped.values()))
        at = f"after {epochs[0]} epochs" if len(epochs) == 1 else f"after {'/'.join(map(str, epochs))} epochs"
        return f"{len(self.stopped)} of {self.n_total} seeds stopped {at}: no verdict"


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
        stopped = tags.get("mprl.early_stopped") == "true"
        if "final_rank1" not in m and not stopped:
            continue
        rows.append(TrialResult(
            setting=setting_of(p), preset=p.get("preset", "?"), dataset=p.get("dataset.name", "synthetic"),
            model=p.get("reid.model", "ident"), method=p.get("labels.method"), num_gan=int(p.get("labels.num_gan", 0)),
            order=p.get("labels.order", "paper"), keep=p.get("labels.keep", "None"), seed=int(p.get("reid.seed", 0)),
            rank1=m.get("final_rank1", float("nan")), mAP=m.get("final_mAP", float("nan")),
            num_train=int(p.get("data.num_train", 0) or 0),
            single_baseline=p.get("sweep.single_baseline", "False") == "True",
            lr_scheme=p.get("reid.lr_scheme", "paper"), pool=pool_label(p),
            stopped_after=int(float(tags.get(TAG_STOPPED_AFTER, 0))) if stopped else None))
    return rows


def pool_label(params: dict[str, str]) -> str:
    """The pool a trial's generated images came from: ``gan``, ``synthetic_ids``, ``folder:<folder name>``."""
    pool = params.get("labels.pool", "gan")
    root = params.get("labels.pool_root") or ""
    return f"folder:{Path(root).name}" if pool == "folder" else pool


def summarise(rows: list[TrialResult]) -> list[Group]:
    """Groups of seeds with their statistics, paired differences from the controls of the same setting, the paper's
    claims as contrasts, the published row (or why there is none); every p-value Holm-adjusted over its metric's
    family (every difference the report prints for that metric)."""
    by_group: dict[tuple, list[TrialResult]] = defaultdict(list)
    for r in rows:
        by_group[r.group].append(r)
    order = sorted(by_group.items(), key=lambda kv: (*kv[0][:3], kv[0][7] != "gan", kv[0][7], kv[0][4], kv[0][3]))
    groups = [_group(rs) for _, rs in order]
    out = []
    for g in groups:
        vs = {}
        for control in CONTROLS:
            ref = _reference(groups, g, control)
            vs[control] = None if ref is None or ref is g else _compare(g, ref)
        base = _reference(groups, g, BASELINE)
        bp = base.paper if base else None
        gain = g.paper.rank1 - bp.rank1 if g.paper and bp else None
        out.append(dataclasses.replace(g, vs=vs, paper_gain_rank1=gain, contrasts=_contrasts(groups, g)))
    return _adjust(out)


def family_size(groups: list[Group], metric: str = "rank1") -> int:
    """How many tested differences of ``metric`` the report prints (the family its p-values are adjusted over)."""
    return sum(d is not None and d.p is not None for d in _diffs(groups, metric))


def _diffs(groups: list[Group], metric: str) -> list[Paired | None]:
    """Every difference of ``metric`` in the report's order: each group's against each control, then its contrasts."""
    return [*(None if g.vs.get(c) is None else g.vs[c][metric] for g in groups for c in CONTROLS),
            *(c.diffs[metric] for g in groups for c in g.contrasts)]


def _adjust(groups: list[Group]) -> list[Group]:
    """The groups with each metric's family Holm-adjusted (put back in :func:`_diffs`' order)."""
    fixed = {m: iter(adjusted(_diffs(groups, m))) for m in METRIC_NAMES}
    out = []
    for g in groups:
        vs = {}
        for c in CONTROLS:  # one entry per (group, control) in _diffs, None ones included
            got = {m: next(fixed[m]) for m in METRIC_NAMES}
            vs[c] = None if g.vs.get(c) is None else got
        out.append(dataclasses.replace(g, vs=vs))
    for i, g in enumerate(out):  # the contrasts come after every control difference in _diffs
        cs = tuple(dataclasses.replace(c, diffs={m: next(fixed[m]) for m in METRIC_NAMES}) for c in g.contrasts)
        out[i] = dataclasses.replace(g, contrasts=cs)
    return out


def _compare(a: Group, b: Group) -> dict[str, Paired | None] | None:
    """a - b per seed and metric; None when either has trials a scheduler stopped (no verdict on survivors)."""
    if a.stopped or b.stopped or not a.by_seed["rank1"] or not b.by_seed["rank1"]:
        return None
    return {k: paired(a.by_seed[k], b.by_seed[k]) for k in METRIC_NAMES}


def _contrasts(groups: list[Group], g: Group) -> tuple[Contrast, ...]:
    """The paper's claims with ``g`` on the left, against the groups of its setting and #GAN that exist."""

    def find(**want) -> Group | None:
        return next((b for b in groups if b.same_setting(g) and b.num_gan == g.num_gan
                     and all(getattr(b, k) == v for k, v in want.items())), None)

    out = []
    if g.order == "paper" and g.keep == "None":
        for a, b in METHOD_CONTRASTS:
            other = find(method=b, order="paper", keep="None", pool=g.pool) if g.method == a else None
            if other is not None:
                out.append((f"{a} vs {b}", other))
    if g.order != "paper":  # the rank-order ablation
        other = find(method=g.method, order="paper", keep=g.keep, pool=g.pool)
        if other is not None:
            out.append((f"{g.method}: {g.order} order vs paper order", other))
    if g.pool != "gan" and method(g.method).generated:  # another pool against the DCGAN's
        other = find(method=g.method, order=g.order, keep=g.keep, pool="gan")
        if other is not None:
            out.append((f"{g.method}: {g.pool} pool vs gan pool", other))
    return tuple(Contrast(name, g.num_gan, d) for name, other in out if (d := _compare(g, other)) is not None)


def _group(rs: list[TrialResult]) -> Group:
    r0 = rs[0]
    done = [x for x in rs if x.stopped_after is None]
    num_train = max(x.num_train for x in rs)
    paper, note = paper_row(r0.dataset, r0.model, r0.method, r0.num_gan, num_train)
    by_seed = {k: {x.seed: 100 * getattr(x, k) for x in done} for k in METRIC_NAMES}
    return Group(*(getattr(r0, f.name) for f in dataclasses.fields(Settings)), by_seed=by_seed,
                 rank1=summary(list(by_seed["rank1"].values())) if done else None,
                 mAP=summary(list(by_seed["mAP"].values())) if done else None,
                 ratio=ratio(r0.num_gan, num_train), paper=paper, paper_note=note, single_baseline=r0.single_baseline,
                 lr_scheme=r0.lr_scheme, stopped={x.seed: x.stopped_after for x in rs if x.stopped_after is not None})


def _reference(groups: list[Group], g: Group, control: str) -> Group | None:
    """The ``control`` group of g's setting: at g's #GAN when the control has extra images (the compute-matched one),
    and on g's pool when they are generated ones (the unlabelled control)."""
    traits = method(control)
    for b in groups:
        if b.same_setting(g) and b.method == control and (not traits.extra_images or b.num_gan == g.num_gan) and (
                not traits.generated or b.pool == g.pool):
            return b
    return None


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
    for setting in dict.fromkeys(g.setting for g in groups):
        gs = [g for g in groups if g.setting == setting]
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
    head = (f"setting {setting}: preset {g0.preset}, dataset {g0.dataset}, model {g0.model}, learning rates "
            f"{g0.lr_scheme}; sMpRL labels from {protocol}")
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
    return f"setting {setting}: the paper's claims\n" + format_table(cols, body, align="lrrrrlrr")


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
