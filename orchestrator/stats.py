"""The statistics the report prints: n, mean ± std, a 95% t interval, and paired per-seed differences with a test.

A difference measured on one seed is not a finding: with n < 2 there is no interval and the verdict says so; with
n >= 2 the verdict is "better" / "worse" only when the paired t-test (scipy.stats.ttest_rel, two-sided) rejects
"no difference" at 5%, and otherwise "no detectable difference at n=N". A report that prints many such tests
adjusts their p-values over the family it prints (:func:`holm`, :func:`adjusted`): its verdicts come from the
adjusted p, the raw p is kept beside it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample std (0 for n = 1)
    ci: float | None  # half-width of the 95% t interval of the mean (None for n = 1)


@dataclass(frozen=True)
class Paired:
    """method - reference over the seeds both have."""

    n: int
    mean: float
    ci: float | None
    p: float | None  # the paired t-test's raw two-sided p
    verdict: str  # from p_adj once the difference is adjusted over a family (:func:`adjusted`), else from p
    p_adj: float | None = None  # Holm-adjusted over the family it was printed in (None: not adjusted)


def summary(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("summary of no values")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return Summary(n, mean, std, _half_width(std, n))


def paired(method: Mapping[int, float], reference: Mapping[int, float]) -> Paired | None:
    """Per-seed differences ``method[s] - reference[s]`` on the seeds both ran; None when they share none."""
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        return None
    diffs = [method[s] - reference[s] for s in seeds]
    s = summary(diffs)
    p = None
    if s.n > 1:

        p = 1.0 if s.std == 0 and s.mean == 0 else float(stats.ttest_rel([method[k] for k in seeds],
                                                                        [reference[k] for k in seeds]).pvalue)
        if math.isnan(p):  # every difference equal and non-zero: the test is undefined, the sign is not
            p = 0.0
    return Paired(s.n, s.mean, s.ci, p, verdict(s.n, s.mean, p))


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (Holm 1979) of one family of p-values, in their order; None entries (no test) are
    not members. With the m members sorted p_(1) <= ... <= p_(m): adj_(i) = max over j <= i of min(1, (m-j+1) p_(j)).
    Rejecting where adj < alpha controls the family-wise error rate at alpha under any dependence between the tests
    (here they share baseline runs)."""
    members = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(members):
        running = max(running, min(1.0, (len(members) - rank) * p))
        out[i] = running
    return out


def adjusted(diffs: Sequence[Paired | None]) -> list[Paired | None]:
    """The family ``diffs`` with Holm-adjusted p-values and their verdicts (differences without a test stay)."""
    adj = holm([d.p if d is not None else None for d in diffs])
    return [d if d is None or a is None else dataclasses.replace(d, p_adj=a, verdict=verdict(d.n, d.mean, a))
            for d, a in zip(diffs, adj)]


def verdict(n: int, mean: float, p: float | None) -> str:
    if n < 2 or p is None:
        return f"one seed: no test (n={n})"
    if p < ALPHA:
        return "better" if mean > 0 else "worse"
    return f"no detectable difference at n={n}"


def _half_width(std: float, n: int) -> float | None:
    if n < 2:
        return None

    return float(stats.t.ppf(1 - ALPHA / 2, n - 1) * std / math.sqrt(n))
