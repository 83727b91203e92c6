"""The re-ID ranking protocol written as plainly as possible, one query at a time: the oracle that
`trainables.evaluation.ranking.evaluate` (vectorised, chunked) is checked against, by bench/evaluation.py and
tests/test_evaluation.py.

Per query: stable argsort of its distances (ties: lower gallery index first); drop gallery entries with
pid -1 and those with the query's pid *and* camera; the true matches' 1-based positions among the rest
give the CMC, the AP (`ap="standard"`: mean precision at each hit; `ap="market"`: the Market-1501
devkit's compute_AP trapezoid rule) and the INP (ngood / position of the last hit, Ye et al., AGW).
Queries without a true match are skipped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from trainables.config import AP_MODES


class ReferenceResult(NamedTuple):
    """Metrics over the valid queries (fractions); a plain tuple (cmc, mAP, mINP) too."""

    cmc: np.ndarray  # [max_rank] float64
    mAP: float
    mINP: float


def reference_rank(distmat: Any, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                   g_camids: np.ndarray, max_rank: int, ap: str) -> ReferenceResult | None:
    """(cmc, mAP, mINP) of `distmat` [Q, G] by a per-query loop, or None when every query is skipped."""
    if ap not in AP_MODES:
        raise ValueError(f"ap must be one of {AP_MODES}, got {ap!r}")
    distmat = np.asarray(distmat)
    if distmat.dtype not in (np.float32, np.float64):  # float32 stays: upcasting would not change any order
        distmat = distmat.astype(np.float64)
    cmc, aps, inps = np.zeros(max_rank), [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        keep = (pids != -1) & ~((pids == q_pids[i]) & (cams == q_camids[i]))
        matches = pids[keep] == q_pids[i]
        if not matches.any():
            continue
        positions = np.flatnonzero(matches) + 1  # [ngood] 1-based ranks of the true matches
        if positions[0] <= max_rank:
            cmc[positions[0] - 1:] += 1
        aps.append(_average_precision(positions, ap))
        inps.append(len(positions) / positions[-1])
    if not aps:
        return None
    return ReferenceResult(cmc / len(aps), float(np.mean(aps)), float(np.mean(inps)))


def _average_precision(positions: np.ndarray, ap: str) -> float:
    """AP of one query from the 1-based positions of its true matches."""
    ngood, total, old_recall = len(positions), 0.0, 0.0
    for k, r in enumerate(positions, start=1):
        precision = k / r
        if ap == "standard":
            total += precision / ngood
        else:  # Market devkit compute_AP; old_precision = precision at the previous kept position
            old_precision = (k - 1) / (r - 1) if r > 1 else 1.0
            recall = k / ngood
            total += (recall - old_recall) * (old_precision + precision) / 2
            old_recall = recall
    return total
