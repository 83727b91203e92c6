"""Groups of seeds, their paired differences from the controls, the paper's claims as contrasts, and one Holm family.

What :mod:`orchestrator.report` prints, without MLflow or formatting: :func:`summarise` turns a sweep's
:class:`TrialResult` rows into :class:`Group` s (trials that differ only in the seed), each with its paired
differences from every control of its setting (``vs``) and the contrasts of the paper's claims with it on the left
(``contrasts``), every p-value of a metric Holm-adjusted over the family the report prints (:func:`family_size`).

Evaluations (:mod:`orchestrator.evaluations`): each way a final model was evaluated (as trained, BN re-estimated,
re-ranked, on each other dataset, ...) makes groups of its own, compared only with groups evaluated the same way.
Every one of them joins the one Holm family per metric: the report prints each evaluation's differences with their
p-values, so each p is adjusted over every difference printed, whatever its evaluation (a larger family than one per
evaluation: conservative, and honest about what is on the page). The domains table prints no p-value.

In MLflow: :func:`group_tags` are the tags a trial run carries (``mprl.setting``, ``mprl.group``), so that MLflow's
"group by tag" rebuilds these groups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import RUNTIME_FIELDS
from orchestrator.evaluations import AS_TRAINED, BN_RECALIBRATED, from_label  # noqa: F401 (the groups' labels)
from orchestrator.paper_numbers import PaperRow, paper_row, ratio
from orchestrator.stats import Paired, Summary, adjusted, paired, summary
from orchestrator.trials import TrialSpec
from trainables.methods import BASELINE, METHODS, PAPER_CONTRASTS, method

# what differs between the trials of one setting (the pool is a column of the groups, as #GAN is)
SWEPT = (*TrialSpec(BASELINE, 0).overrides(), "labels.pool", "labels.pool_root", "trial")
CONTROLS = tuple(m for m, t in METHODS.items() if t.control)  # every method's paired difference is taken against these
METRIC_NAMES = {"rank1": "rank-1", "mAP": "mAP"}
TAG_SETTING, TAG_GROUP = "mprl.setting", "mprl.group"  # a trial run's group, as tags (group_tags)
MAX_PARAM = 6000  # = tracking.MAX_PARAM (not imported: this module loads without MLflow)


# where the data lives, not what it is: the same data elsewhere is the same setting (the other test sets of a
# cross-domain evaluation are told apart by their names, in the metric names: orchestrator.evaluations)
LOCATIONS = ("dataset.root", "dataset.test_root")


def setting_of(params: dict[str, str]) -> str:
    """A short hash of every config field a trial's result depends on, except the swept ones and those that change
    where or how fast it ran (``RUNTIME_FIELDS``, :data:`LOCATIONS`)."""
    kept = {k: v for k, v in params.items() if k not in SWEPT and k not in LOCATIONS
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
    pool: str = "gan"  # labels.pool ("folder:<name>" for a folder pool; "-" for a method without generated images)
    # how the final model was evaluated (orchestrator.evaluations' label): as trained, BN re-estimated, re-ranked,
    # cross-domain <name>, ... (each from the same runs)
    evaluation: str = AS_TRAINED

    @property
    def group(self) -> tuple:
        """What a group of seeds shares."""
        return (self.setting, self.dataset, self.model, self.method, self.num_gan, self.order, self.keep, self.pool,
                self.evaluation)

    def same_setting(self, other: "Settings") -> bool:
        """Compared with each other: the same setting, dataset and model, evaluated the same way."""
        return ((self.setting, self.dataset, self.model, self.evaluation)
                == (other.setting, other.dataset, other.model, other.evaluation))


@dataclass(frozen=True)
class TrialResult(Settings):
    """One finished trial run of a sweep, as the report reads it from MLflow."""

    seed: int = 0
    rank1: float = float("nan")  # percent (collect converts a run logged in fractions)
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
    key: str = ""  # what ``b`` is, short: its method ("lsro"), "paper_order", "gan_pool" (MLflow metric names)


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
        unit = "epoch" if epochs == [1] else "epochs"
        at = f"after {'/'.join(map(str, epochs))} {unit}"
        return f"{len(self.stopped)} of {self.n_total} seeds stopped {at}: no verdict"


def pool_label(params: dict[str, str]) -> str:
    """The pool a trial's generated images came from: ``gan``, ``synthetic_ids``, ``folder:<folder name>``."""
    pool = params.get("labels.pool", "gan")
    root = params.get("labels.pool_root") or ""
    return f"folder:{Path(root).name}" if pool == "folder" else pool


def pool_of(params: dict[str, str]) -> str:
    """A trial's pool column: :func:`pool_label` for a method with generated images, ``-`` for the others."""
    return pool_label(params) if method(params.get("labels.method", BASELINE)).generated else "-"


def group_name(method_name: str, pool: str, num_gan: int, order: str, keep: str, setting: str) -> str:
    """The readable key of a group of seeds: ``lsro pool=gan gan=360 order=paper keep=None setting=1a2b3c4d``."""
    return f"{method_name} pool={pool} gan={num_gan} order={order} keep={keep} setting={setting}"


def group_tags(params: dict[str, object]) -> dict[str, str]:
    """The tags that put a trial run in its report group in MLflow's UI: ``mprl.setting`` (:func:`setting_of`) and
    ``mprl.group`` (:func:`group_name`). ``params``: the params logged on the run (``{**flat_dict(cfg), "trial":
    key}``), as values or as the strings MLflow stores (``tracking.log_params``: ``str(v)[:MAX_PARAM]``)."""
    p = {k: str(v)[:MAX_PARAM] for k, v in params.items()}
    setting = setting_of(p)
    name = group_name(p.get("labels.method", BASELINE), pool_of(p), int(p.get("labels.num_gan", 0)),
                      p.get("labels.order", "paper"), p.get("labels.keep", "None"), setting)
    return {TAG_SETTING: setting, TAG_GROUP: name}


def summarise(rows: list[TrialResult]) -> list[Group]:
    """Groups of seeds with their statistics, paired differences from the controls of the same setting, the paper's
    claims as contrasts, the published row (or why there is none); every p-value Holm-adjusted over its metric's
    family (every difference the report prints for that metric)."""
    by_group: dict[tuple, list[TrialResult]] = defaultdict(list)
    for r in rows:
        by_group[r.group].append(r)
    # by setting, evaluation, then the config's pool (and the real-only methods, pool "-") before the other pools
    order = sorted(by_group.items(), key=lambda kv: (*kv[0][:3], from_label(kv[0][8]).order,
                                                     kv[0][7] not in ("-", "gan"), kv[0][7], kv[0][4], kv[0][3]))
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
        for a, b in PAPER_CONTRASTS:
            other = find(method=b, order="paper", keep="None", pool=g.pool) if g.method == a else None
            if other is not None:
                out.append((f"{a} vs {b}", b, other))
    if g.order != "paper":  # the rank-order ablation
        other = find(method=g.method, order="paper", keep=g.keep, pool=g.pool)
        if other is not None:
            out.append((f"{g.method}: {g.order} order vs paper order", "paper_order", other))
    if g.pool != "gan" and method(g.method).generated:  # another pool against the DCGAN's
        other = find(method=g.method, order=g.order, keep=g.keep, pool="gan")
        if other is not None:
            out.append((f"{g.method}: {g.pool} pool vs gan pool", "gan_pool", other))
    return tuple(Contrast(name, g.num_gan, d, key) for name, key, other in out if (d := _compare(g, other)) is not None)


def _group(rs: list[TrialResult]) -> Group:
    r0 = rs[0]
    done = [x for x in rs if x.stopped_after is None]
    num_train = max(x.num_train for x in rs)
    ev = from_label(r0.evaluation)  # BN re-estimated: the same published row as trained
    paper, note = paper_row(r0.dataset, r0.model, r0.method, r0.num_gan, num_train, domain=ev.domain,
                            reranked=ev.reranked)
    by_seed = {k: {x.seed: getattr(x, k) for x in done} for k in METRIC_NAMES}
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
