"""Re-ID ranking metrics (CMC, mAP, mINP) of a query-gallery distance matrix: pure numpy / torch, no model.

Features and distances are in :mod:`trainables.evaluation.distance`, k-reciprocal re-ranking in
:mod:`trainables.evaluation.rerank`; evaluating a re-ID model on its split is ``trainables.reid.evaluate``.

Ranking protocol (Market-1501 / DukeMTMC-reID, as in torchreid and fast-reid): for each query, gallery
entries with the query's pid *and* camera are removed, and so are entries with pid -1 (junk); pid 0
(distractor) entries stay as ordinary negatives. A query with no true match left is skipped.

How the ranking is computed (exact, vectorised, memory-bounded). A query's metrics depend only on the
1-based position, among its kept gallery entries, of each true match ("hit"), and entries ranked after
its hardest hit cannot change those positions. Per chunk of queries:
- sparse path (trained models: few entries rank before the hardest hit): gather those *candidates*, sort
  them once for the whole chunk by (query, distance, gallery index) and read the hit positions off;
- dense path (float32, many candidates, e.g. an untrained model): histogram every query row's
  distances into monotone quantisation bins and count the entries below each hit's bin; only the few
  entries sharing a bin with a hit are sorted exactly;
- on an accelerator (CUDA tensors): the sparse path in torch on that device.
Ties in distance are broken by gallery index (the lower index ranks first), i.e. exactly what a stable
per-row argsort gives: float32 distances are packed with the gallery index into unique int64 keys.
Cost: Market-1501 scale (3,368 x 15,913) takes ~0.2-0.5 s on 2 CPU cores (see bench/evaluation.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from trainables.config import AP_MODES  # the choice list

_CHUNK_ELEMENTS = 1 << 21  # distance entries per query chunk: bounds working memory, stays cache-friendly
_DENSE_SHARE = 16  # use the dense path when more than 1/16 of a chunk's entries are candidates
_BINS = 2048  # dense path: quantisation bins per query row


@dataclass(frozen=True, eq=False)
class RankResult:
    """Ranking metrics of one evaluation; all values are fractions in [0, 1]."""

    cmc: np.ndarray  # [max_rank] float64: share of valid queries with a true match within rank k
    mAP: float
    mINP: float  # mean inverse negative penalty (Ye et al., AGW): ngood / position of the last hit
    num_valid_queries: int
    num_skipped_queries: int  # queries without any valid true match (excluded from every metric)
    ap: np.ndarray  # [Q] float64 per-query AP (mode given by `ap=`); NaN for skipped queries
    inp: np.ndarray  # [Q] float64 per-query INP; NaN for skipped queries

    @property
    def skipped(self) -> np.ndarray:
        """[Q] bool mask of the skipped queries."""
        return np.isnan(self.ap)

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"k must be in [1, {len(self.cmc)}] (max_rank), got {k}")
        return float(self.cmc[k - 1])

    def metrics(self) -> dict[str, float]:
        """The shared metric names (rank1/5/10, mAP) plus mINP, for trackers and Tune."""
        out = {f"rank{k}": self.rank(k) for k in (1, 5, 10) if k <= len(self.cmc)}
        out.update(mAP=self.mAP, mINP=self.mINP)
        return out


class _Labels(NamedTuple):
    """int64 label arrays plus the derived (query, gallery) pairs, each pair list sorted by query."""

    q_pid: np.ndarray  # [Q]
    q_cam: np.ndarray  # [Q]
    g_pid: np.ndarray  # [G]
    g_cam: np.ndarray  # [G]
    kept_cols: np.ndarray  # [G'] gallery indices with pid != -1
    kept_pos: np.ndarray  # [G] position of each gallery entry in kept_cols (-1 for junk)
    hit_q: np.ndarray  # [H] true matches: same pid, other camera, pid != -1
    hit_g: np.ndarray  # [H]
    same_q: np.ndarray  # [E] excluded: same pid, same camera, pid != -1
    same_g: np.ndarray  # [E]


def evaluate_rank(
    distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
    *, max_rank: int = 50, ap: str = "standard",
) -> tuple[np.ndarray, float]:
    """CMC curve [max_rank] and mAP (fractions); see `evaluate` for the details."""
    result = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, ap=ap)
    return result.cmc, result.mAP


def evaluate(
    distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
    *, max_rank: int = 50, ap: str = "standard", chunk_size: int | None = None,
) -> RankResult:
    """Rank the gallery for every query of `distmat` [Q, G] (smaller = more similar).

    `ap="standard"`: mean precision at each hit (torchreid, fast-reid). `ap="market"`: the Market-1501
    devkit's compute_AP trapezoid rule, sum over hits k at position r of
    (1/ngood) * ((k-1)/(r-1) [1 if r == 1] + k/r) / 2. The CMC is padded: once matched, a query stays
    matched up to max_rank even if fewer gallery entries remain. Equal distances rank by gallery index
    (lower first), as a stable per-row argsort would. `distmat` may be a numpy array or a torch tensor;
    CPU tensors are read without a copy, tensors on an accelerator are ranked there and only the per-hit
    positions come back; float32 is the fastest dtype on CPU (float64 is exact too, sorted with
    np.lexsort). Queries go `chunk_size` at a time (default: ~2M distance entries per chunk).
    Skipped queries (no kept true match, e.g. pid -1 queries) are excluded from every metric, counted in
    `num_skipped_queries` / `skipped` and warned about (RuntimeWarning); if all are skipped, ValueError.
    """
    dist, on_device = _prepare_distmat(distmat)
    labels = _labels(dist.shape, q_pids, g_pids, q_camids, g_camids)
    _check_finite(dist)
    if ap not in AP_MODES:
        raise ValueError(f"ap must be one of {AP_MODES}, got {ap!r}")
    if not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    num_q, num_g = dist.shape
    ngood = np.bincount(labels.hit_q, minlength=num_q)  # [Q] valid true matches per query
    num_valid = int(np.count_nonzero(ngood))
    if num_valid == 0:
        raise ValueError(
            f"no query has a valid match in the gallery ({num_q} queries, {num_g} gallery entries): every "
            "same-pid gallery entry is in the query's camera or has pid -1; check the pids/camids")
    if num_valid < num_q:
        warnings.warn(f"{num_q - num_valid} of {num_q} queries have no valid gallery match and were skipped",
                      RuntimeWarning, stacklevel=2)

    step = int(chunk_size or max(1, _CHUNK_ELEMENTS // max(num_g, 1)))
    first = np.zeros(num_q, np.int64)  # [Q] position of the first hit (0 = skipped)
    last = np.zeros(num_q, np.int64)  # [Q] position of the last hit
    ap_sum = np.zeros(num_q, np.float64)  # [Q] sum of the per-hit AP terms
    kernel = _hit_positions_torch if on_device else _hit_positions_numpy
    for r0 in range(0, num_q, step):
        r1 = min(r0 + step, num_q)
        if not ngood[r0:r1].any():
            continue
        rows, pos = kernel(dist[r0:r1], r0, labels)
        _accumulate(rows + r0, pos, ngood, ap, first, last, ap_sum)
    return _summarise(ngood, first, last, ap_sum, max_rank)


def _prepare_distmat(distmat: Any) -> tuple[Any, bool]:
    """Float view of `distmat` and whether it stays a torch tensor on an accelerator."""
    if isinstance(distmat, torch.Tensor):
        d = distmat.detach()
        if d.dtype in (torch.float16, torch.bfloat16):
            d = d.float()  # exact upcast
        elif not d.is_floating_point():
            d = d.double()
        if d.ndim != 2:
            raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(d.shape)}")
        if d.device.type != "cpu":
            return d, True
        return d.numpy(), False
    d = np.asarray(distmat)
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {d.shape}")
    if d.dtype == np.float16:
        d = d.astype(np.float32)
    elif d.dtype not in (np.float32, np.float64):
        d = d.astype(np.float64)
    return d, False


def _check_finite(dist: Any) -> None:
    """ValueError naming the first row with a NaN or inf distance."""
    if isinstance(dist, torch.Tensor):
        row_ok = torch.isfinite(dist).all(dim=1).cpu().numpy()
    elif dist.size == 0 or (np.isfinite(dist.min()) and np.isfinite(dist.max())):  # min/max keep NaN
        return
    else:
        row_ok = np.isfinite(dist).all(axis=1)
    if not row_ok.all():
        raise ValueError(f"distmat contains NaN or inf (first in row {int(np.flatnonzero(~row_ok)[0])})")


def _as_ids(values: Any, name: str, length: int, what: str) -> np.ndarray:
    """1-D int64 (copy-free when possible) pid/camid array, checked against the distmat dimension."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{name} has shape {arr.shape}, expected ({length},) to match the {what}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _labels(shape: tuple[int, int], q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any) -> _Labels:
    """Validate the label arrays and find every same-pid (query, gallery) pair, sorted by query."""
    q_pid = _as_ids(q_pids, "q_pids", shape[0], "distmat rows")
    q_cam = _as_ids(q_camids, "q_camids", shape[0], "distmat rows")
    g_pid = _as_ids(g_pids, "g_pids", shape[1], "distmat columns")
    g_cam = _as_ids(g_camids, "g_camids", shape[1], "distmat columns")
    order = np.argsort(g_pid, kind="stable")  # [G] gallery grouped by pid, index order inside a pid
    lo = np.searchsorted(g_pid[order], q_pid, side="left")  # [Q]
    counts = np.searchsorted(g_pid[order], q_pid, side="right") - lo
    counts[q_pid == -1] = 0
    qi = np.repeat(np.arange(shape[0]), counts)  # [P] one entry per same-pid pair
    gi = order[_ragged_ranges(lo, counts)]
    same = g_cam[gi] == q_cam[qi]
    kept = g_pid != -1
    return _Labels(q_pid, q_cam, g_pid, g_cam, np.flatnonzero(kept), np.cumsum(kept) - 1,
                   qi[~same], gi[~same], qi[same], gi[same])


def _ragged_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) over the pairs (s, n), without a Python loop (also used by rerank)."""
    return np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())


def _chunk_pairs(q: np.ndarray, g: np.ndarray, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of queries [r0, r1) with chunk-local query rows."""
    i0, i1 = np.searchsorted(q, [r0, r1])
    return q[i0:i1] - r0, g[i0:i1]


def _hit_positions_numpy(d: np.ndarray, r0: int, lab: _Labels) -> tuple[np.ndarray, np.ndarray]:
    """(row, 1-based position among kept entries) of every hit of chunk `d` [C, G], by (row, position)."""
    hit_r, hit_g = _chunk_pairs(lab.hit_q, lab.hit_g, r0, r0 + d.shape[0])
    q_pid, q_cam = lab.q_pid[r0:r0 + d.shape[0]], lab.q_cam[r0:r0 + d.shape[0]]
    thr = np.full(d.shape[0], -np.inf, dtype=d.dtype)  # [C] distance of the hardest hit
    np.maximum.at(thr, hit_r, d[hit_r, hit_g])
    near = d <= thr[:, None]  # [C, G] candidates: ranked no later than the hardest hit
    if np.count_nonzero(near) * _DENSE_SHARE > near.size:
        same_r, same_g = _chunk_pairs(lab.same_q, lab.same_g, r0, r0 + d.shape[0])
        found = _positions_binned(d, hit_r, hit_g, same_r, same_g, q_pid, lab)
        if found is not None:
            return found
    rows, cols = np.divmod(np.flatnonzero(near), d.shape[1])  # [K] row-major (gallery order inside a row)
    gp = lab.g_pid[cols]
    kept = (gp != -1) & ~((gp == q_pid[rows]) & (lab.g_cam[cols] == q_cam[rows]))
    rows, _, rank = _hit_ranks(d, rows[kept], cols[kept], q_pid, lab.g_pid)
    return rows, rank


def _hit_ranks(d: np.ndarray, rows: np.ndarray, cols: np.ndarray, q_pid: np.ndarray,
               g_pid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort entries (given row-major) by (row, distance, gallery index); (row, col, 1-based rank in its
    row among the given entries) of the hits, ordered by (row, rank)."""
    rows, cols = _sort_candidates(d[rows, cols], rows, cols, d.shape[1])
    is_hit = g_pid[cols] == q_pid[rows]
    counts = np.bincount(rows, minlength=d.shape[0])  # [C] entries per row
    rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts) + 1
    return rows[is_hit], cols[is_hit], rank[is_hit]


def _sort_candidates(vals: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                     num_g: int) -> tuple[np.ndarray, np.ndarray]:
    """Order entries by (row, value, column); `cols` is ascending inside each row on input.

    float32: one unique int64 key per entry (order-preserving IEEE bits between row and column), so a
    plain value sort is exact; other dtypes: np.lexsort, which is stable.
    """
    col_bits = max(1, int(num_g - 1).bit_length())
    row_bits = max(1, int(rows[-1]).bit_length()) if len(rows) else 1
    if vals.dtype != np.float32 or 32 + col_bits + row_bits > 63:
        order = np.lexsort((vals, rows))
        return rows[order], cols[order]
    bits = (vals + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)  # negative floats: reverse the magnitude order
    key = bits.astype(np.int64)
    key += 1 << 31  # now in [0, 2^32)
    key <<= col_bits
    key |= cols
    key |= rows << (32 + col_bits)
    key.sort()
    return key >> (32 + col_bits), key & ((1 << col_bits) - 1)


def _positions_binned(d: np.ndarray, hit_r: np.ndarray, hit_g: np.ndarray, same_r: np.ndarray,
                      same_g: np.ndarray, q_pid: np.ndarray, lab: _Labels) -> tuple[np.ndarray, np.ndarray] | None:
    """Hit positions of a chunk [C, G] from a per-row histogram of quantised distances.

    Quantising a row by bin = trunc((x - row_min) * scale) is monotone (IEEE subtract, multiply and
    truncate all are), so an entry in a lower bin than a hit ranks before it and one in a higher bin after
    it; only the entries sharing a bin with one of their row's hits are sorted exactly.
    Returns None (the caller takes the sparse path) if a row's range overflows.
    """
    num_c, width = d.shape[0], _BINS + 1  # bin _BINS (the last) parks the excluded entries
    if num_c * width >= 2**31:
        return None
    x = np.take(d, lab.kept_cols, axis=1)  # [C, G'] kept entries, quantised in place
    lo = x.min(axis=1, keepdims=True)  # [C, 1]
    with np.errstate(over="ignore", divide="ignore"):
        span = x.max(axis=1, keepdims=True) - lo
        if not np.isfinite(span).all():
            return None
        scale = np.minimum((_BINS - 1) / span, np.finfo(x.dtype).max).astype(x.dtype)  # span 0: one bin
    x -= lo
    x *= scale
    bins = x.astype(np.int32)  # [C, G'] bin of every kept entry
    np.minimum(bins, _BINS - 1, out=bins)
    bins[same_r, lab.kept_pos[same_g]] = _BINS  # same pid + same camera: excluded
    bins += (np.arange(num_c, dtype=np.int32) * width)[:, None]  # flat (row, bin) index
    shared = np.zeros(num_c * width, dtype=bool)  # [C * width] bins that hold a hit
    shared[bins[hit_r, lab.kept_pos[hit_g]]] = True
    hist = np.bincount(bins.ravel(), minlength=num_c * width)
    hist[shared] = 0  # entries in shared bins are ranked exactly below
    below = np.cumsum(hist)  # [C * width] unshared entries up to each flat bin (rows' bins in order)
    rows, cols = np.divmod(np.flatnonzero(shared[bins.ravel()]), x.shape[1])  # [A] shared entries
    rows, cols, rank = _hit_ranks(d, rows, lab.kept_cols[cols], q_pid, lab.g_pid)
    row_start = below[rows * width] - hist[rows * width]  # unshared entries of the previous rows
    return rows, below[bins[rows, lab.kept_pos[cols]]] - row_start + rank


def _hit_positions_torch(d: torch.Tensor, r0: int, lab: _Labels) -> tuple[np.ndarray, np.ndarray]:
    """Same as `_hit_positions_numpy` (sparse path) for a tensor chunk `d` [C, G], on `d.device`."""
    dev, r1 = d.device, r0 + d.shape[0]
    hit_r, hit_g = (torch.as_tensor(a, device=dev) for a in _chunk_pairs(lab.hit_q, lab.hit_g, r0, r1))
    q_pid, q_cam = (torch.as_tensor(a[r0:r1], device=dev) for a in (lab.q_pid, lab.q_cam))
    g_pid, g_cam = (torch.as_tensor(a, device=dev) for a in (lab.g_pid, lab.g_cam))
    thr = torch.full((d.shape[0],), -float("inf"), dtype=d.dtype, device=dev)
    thr.scatter_reduce_(0, hit_r, d[hit_r, hit_g], reduce="amax")  # [C] hardest hit
    rows, cols = torch.nonzero(d <= thr[:, None], as_tuple=True)  # [K] row-major candidates
    gp = g_pid[cols]
    kept = (gp != -1) & ~((gp == q_pid[rows]) & (g_cam[cols] == q_cam[rows]))
    rows, cols = rows[kept], cols[kept]
    order = torch.argsort(d[rows, cols], stable=True)  # ties keep gallery order
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols = rows[order], cols[order]
    is_hit = g_pid[cols] == q_pid[rows]
    counts = torch.bincount(rows, minlength=d.shape[0])
    pos = torch.arange(len(rows), device=dev) - (torch.cumsum(counts, 0) - counts)[rows] + 1
    return rows[is_hit].cpu().numpy(), pos[is_hit].cpu().numpy()


def _accumulate(rows: np.ndarray, pos: np.ndarray, ngood: np.ndarray, ap: str,
                first: np.ndarray, last: np.ndarray, ap_sum: np.ndarray) -> None:
    """Fold per-hit positions (sorted by row, then position) into the per-query accumulators."""
    starts = np.cumsum(ngood) - ngood  # [Q] offset of each query's hits in the global hit order
    k = np.arange(len(rows)) - (starts[rows] - starts[rows[0]]) + 1  # [H] 1-based hit number
    kf, pf = k.astype(np.float64), pos.astype(np.float64)
    precision = kf / pf
    if ap == "standard":
        terms = precision
    else:  # Market devkit: trapezoid between the precision before and at this hit
        old_precision = np.where(pos > 1, (kf - 1) / np.maximum(pf - 1, 1), 1.0)
        terms = (old_precision + precision) / 2
    np.add.at(ap_sum, rows, terms)
    first[rows[k == 1]] = pos[k == 1]
    is_last = k == ngood[rows]
    last[rows[is_last]] = pos[is_last]


def _summarise(ngood: np.ndarray, first: np.ndarray, last: np.ndarray, ap_sum: np.ndarray,
               max_rank: int) -> RankResult:
    """Per-query arrays -> RankResult (CMC padded to max_rank)."""
    valid = ngood > 0
    n_valid = int(valid.sum())
    hits_at = np.bincount(first[valid], minlength=max_rank + 1)[1:max_rank + 1]  # [max_rank]
    cmc = np.cumsum(hits_at) / n_valid
    ap = np.full(len(ngood), np.nan)
    ap[valid] = ap_sum[valid] / ngood[valid]
    inp = np.full(len(ngood), np.nan)
    inp[valid] = ngood[valid] / last[valid]
    return RankResult(cmc=cmc, mAP=float(ap[valid].mean()), mINP=float(inp[valid].mean()),
                      num_valid_queries=n_valid, num_skipped_queries=len(ngood) - n_valid, ap=ap, inp=inp)
