"""The evaluations of a final model, read from its metric names.

A trial logs its final test metrics as ``final_<prefix><metric>``; the prefix says how the model was evaluated:
``""`` as trained on its own dataset's test split, ``bnr_`` with every BatchNorm layer's statistics re-estimated
(``reid.bn_recalibrate``), ``rr_`` with the distances k-reciprocal re-ranked (the same test split), ``xd_<name>_``
on another Market-format dataset ``<name>`` (lowercase alphanumerics: cross-domain), and their combinations
(``xd_<name>_rr_``). Each :class:`Evaluation` becomes groups of its own in the report (:mod:`orchestrator.groups`),
compared only with groups evaluated the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AS_TRAINED, BN_RECALIBRATED, RE_RANKED = "as trained", "BN re-estimated", "re-ranked"
CROSS = "cross-domain "
# final_ + any of xd_<name>_, bnr_, rr_ + the metric (the report reads rank-1 and mAP)
_FINAL = re.compile(r"final_((?:xd_[a-z0-9]+_|bnr_|rr_)*)(rank1|mAP)")
_PART = re.compile(r"xd_([a-z0-9]+)_|(bnr_)|(rr_)")


@dataclass(frozen=True)
class Evaluation:
    """How a final model was evaluated: on which test set, with BatchNorm re-estimated, re-ranked."""

    domain: str = ""  # "" = its own dataset's test split; else the other dataset's name (cross-domain)
    bn: bool = False  # reid.bn_recalibrate
    reranked: bool = False  # k-reciprocal re-ranking of the distances

    @property
    def prefix(self) -> str:
        """The metric-name prefix after ``final_``: ``xd_<name>_``, then ``bnr_``, then ``rr_``."""
        return (f"xd_{self.domain}_" if self.domain else "") + ("bnr_" if self.bn else "") + (
            "rr_" if self.reranked else "")

    @property
    def slug(self) -> str:
        """The prefix without its last underscore ("" as trained): a short name for files and metric keys."""
        return self.prefix.rstrip("_")

    @property
    def label(self) -> str:
        """"as trained", "re-ranked", "BN re-estimated", "cross-domain dukemtmcreid, re-ranked", ...: the group's
        ``evaluation`` (:func:`from_label` reads it back)."""
        parts = [f"{CROSS}{self.domain}"] * bool(self.domain) + [BN_RECALIBRATED] * self.bn
        parts += [RE_RANKED] * self.reranked
        return ", ".join(parts) or AS_TRAINED

    @property
    def order(self) -> tuple:
        """The report's order: its own test set first (plain, re-ranked, BN re-estimated), then each other one."""
        return bool(self.domain), self.domain, self.bn, self.reranked

    def describe(self, dataset: str) -> str:
        """What a setting block's heading adds for this evaluation ("" as trained)."""
        out = []
        if self.domain:
            out.append(f"tested on another dataset, {self.domain} (cross-domain: trained on {dataset})")
        if self.bn:
            out.append("evaluated with every BatchNorm layer's statistics re-estimated on the real training images "
                       "(reid.bn_recalibrate)")
        if self.reranked:
            out.append("distances k-reciprocal re-ranked (Zhong et al. 2017)")
        return "".join(f"; {s}" for s in out)


def from_label(label: str) -> Evaluation:
    """The evaluation of a group's ``evaluation`` label (:attr:`Evaluation.label`); ValueError for another text."""
    if label == AS_TRAINED:
        return Evaluation()
    domain, bn, rr = "", False, False
    for part in label.split(", "):
        if part.startswith(CROSS):
            domain = part[len(CROSS):]
        elif part in (BN_RECALIBRATED, RE_RANKED):
            bn, rr = bn or part == BN_RECALIBRATED, rr or part == RE_RANKED
        else:
            raise ValueError(f"not an evaluation label: {label!r}")
    return Evaluation(domain, bn, rr)


def parse_prefix(prefix: str) -> Evaluation:
    """The evaluation of a metric prefix (``xd_duke_rr_``: its parts in any order)."""
    domain, bn, rr, at = "", False, False, 0
    while at < len(prefix):
        m = _PART.match(prefix, at)
        if m is None:
            raise ValueError(f"not an evaluation prefix: {prefix!r}")
        domain, bn, rr, at = m.group(1) or domain, bn or bool(m.group(2)), rr or bool(m.group(3)), m.end()
    return Evaluation(domain, bn, rr)


def final_metrics(metrics: dict[str, float]) -> dict[Evaluation, dict[str, float]]:
    """A run's final test metrics by evaluation: {Evaluation: {"rank1": .., "mAP": ..}} (as logged, any unit); an
    evaluation without a rank-1 is left out, a missing mAP is NaN. In the report's order."""
    found: dict[Evaluation, dict[str, float]] = {}
    for key, value in metrics.items():
        m = _FINAL.fullmatch(key)
        if m:
            found.setdefault(parse_prefix(m.group(1)), {})[m.group(2)] = value
    return {e: {"rank1": v["rank1"], "mAP": v.get("mAP", float("nan"))}
            for e, v in sorted(found.items(), key=lambda kv: kv[0].order) if "rank1" in v}

