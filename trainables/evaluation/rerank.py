"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), numpy/scipy: refine a query-gallery distance matrix.

An optional add-on on top of trainables/evaluation/ranking.py (imports run rerank -> ranking), so `re_rank` is
imported from here, not from trainables.evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from trainables.evaluation.ranking import _ragged_ranges

# ----------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
# Encoding", CVPR 2017), written from the paper's description
# ----------------------------------------------------------------------------------------------------


def re_rank(q_g_dist: Any, q_q_dist: Any, g_g_dist: Any, k1: int = 20, k2: int = 6,
            lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query-gallery distances [Q, G] float32 (smaller = more similar).

    Paper steps over all N = Q + G samples: k-reciprocal sets R(p, k1) = {g in kNN(p, k1): p in kNN(g, k1)};
    expansion R*(p) = R(p) U R(q, k1/2) for q in R(p) sharing >= 2/3 of R(q, k1/2) with R(p); vectors
    V_p[g] = exp(-d(p, g)) on R*(p) (rows normalised to sum 1 so the Jaccard identity below holds); local
    query expansion V_p <- mean of V over the k2 nearest neighbours; Jaccard distance
    d_J = 1 - sum(min(V_p, V_g)) / sum(max(V_p, V_g)); result (1 - lambda) d_J + lambda d.
    d is the input distance divided by each row's maximum. Memory: the joint [N, N] float32 distance matrix
    (1.5 GB at Market-1501 scale) plus sparse matrices with O(N * k1 * k2) entries.
    """
    qg, qq, gg = (_as_float_matrix(x, name) for x, name in
                  ((q_g_dist, "q_g_dist"), (q_q_dist, "q_q_dist"), (g_g_dist, "g_g_dist")))
    num_q, num_g = qg.shape
    n = num_q + num_g
    if qq.shape != (num_q, num_q):
        raise ValueError(f"q_q_dist has shape {qq.shape}, expected ({num_q}, {num_q}) from q_g_dist")
    if gg.shape != (num_g, num_g):
        raise ValueError(f"g_g_dist has shape {gg.shape}, expected ({num_g}, {num_g}) from q_g_dist")
    if not 1 <= k1 < n:
        raise ValueError(f"k1 must be in [1, {n - 1}] (number of samples - 1), got {k1}")
    if not 1 <= k2 <= n:
        raise ValueError(f"k2 must be in [1, {n}] (number of samples), got {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")

    dist = np.maximum(np.block([[qq, qg], [qg.T, gg]]), np.float32(0.0))  # [N, N] float32
    dist /= np.maximum(dist.max(axis=1, keepdims=True), np.float32(1e-12))
    knn = _nearest(dist, max(k1 + 1, k2))  # [N, k] nearest first
    r_full = _reciprocal(knn[:, : k1 + 1])
    r_half = _reciprocal(knn[:, : max(1, round(k1 / 2)) + 1])
    support = _expand(r_full, r_half).tocoo()  # R*(p) as a sparse 0/1 matrix [N, N]
    weights = np.exp(-dist[support.row, support.col].astype(np.float64))
    v = sp.csr_matrix((weights, (support.row, support.col)), shape=(n, n))
    v = sp.diags(1.0 / np.maximum(np.asarray(v.sum(axis=1)).ravel(), 1e-12)) @ v  # rows sum to 1
    if k2 > 1:
        qe = sp.csr_matrix((np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), knn[:, :k2].ravel())),
                           shape=(n, n))
        v = qe @ v  # local query expansion: mean over the k2 nearest neighbours
    overlap = _min_overlap(v[:num_q].tocsr(), v[num_q:].tocsc(), num_g)  # [Q, G] sum_j min(V_p, V_g)
    jaccard = 1.0 - overlap / (2.0 - overlap)  # sum max = sum V_p + sum V_g - sum min = 2 - sum min
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[:num_q, num_q:]
    return final.astype(np.float32)


def _as_float_matrix(x: Any, name: str) -> np.ndarray:
    """2-D float32 numpy array of a distance block; rejects NaN/inf."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _nearest(dist: np.ndarray, k: int, rows_per_chunk: int = 1024) -> np.ndarray:
    """[N, k] indices of each row's k smallest distances, ascending."""
    out = np.empty((dist.shape[0], k), dtype=np.int64)
    for r0 in range(0, dist.shape[0], rows_per_chunk):
        block = dist[r0:r0 + rows_per_chunk]
        part = np.argpartition(block, k - 1, axis=1)[:, :k] if k < block.shape[1] else \
            np.broadcast_to(np.arange(block.shape[1]), block.shape)
        part = np.sort(part, axis=1)  # index order, so the stable sort below breaks ties by index
        order = np.argsort(np.take_along_axis(block, part, axis=1), axis=1, kind="stable")
        out[r0:r0 + rows_per_chunk] = np.take_along_axis(part, order, axis=1)
    return out


def _reciprocal(knn: np.ndarray) -> sp.csr_matrix:
    """Sparse 0/1 [N, N]: g in R(p) iff g in kNN(p) and p in kNN(g) (kNN includes the sample itself)."""
    n, k = knn.shape
    fwd = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), knn.ravel())), shape=(n, n))
    return fwd.multiply(fwd.T).tocsr()


def _expand(r_full: sp.csr_matrix, r_half: sp.csr_matrix) -> sp.csr_matrix:
    """R*(p) = R(p) U R(q, k1/2) for every q in R(p) with |R(p) & R(q, k1/2)| >= 2/3 |R(q, k1/2)|."""
    half_size = np.asarray(r_half.sum(axis=1)).ravel()  # [N] |R(q, k1/2)|
    shared = (r_full @ r_half.T).multiply(r_full).tocsr()  # [p, q] |R(p) & R(q, k1/2)| for q in R(p)
    accept = shared.data >= (2.0 / 3.0) * half_size[shared.indices]
    accepted = sp.csr_matrix((accept.astype(np.float64), shared.indices, shared.indptr), shape=shared.shape)
    expanded = r_full + accepted @ r_half
    expanded.data[:] = 1.0
    return expanded


def _min_overlap(vq: sp.csr_matrix, vg: sp.csc_matrix, num_g: int, budget: int = 1 << 23) -> np.ndarray:
    """[Q, G] sum_j min(vq[p, j], vg[g, j]) through the shared non-zero columns j, in query chunks."""
    col_len = np.diff(vg.indptr)  # [N] gallery entries per column
    nnz_rows = np.repeat(np.arange(vq.shape[0]), np.diff(vq.indptr))
    per_query = np.bincount(nnz_rows, col_len[vq.indices], minlength=vq.shape[0])  # [Q] expansion sizes
    out = np.zeros((vq.shape[0], num_g))
    r0 = 0
    while r0 < vq.shape[0]:
        r1 = r0 + max(1, int(np.searchsorted(np.cumsum(per_query[r0:]), budget, side="right")))
        block = vq[r0:r1].tocoo()  # (p, j, a) non-zeros of the chunk
        lens = col_len[block.col]
        idx = _ragged_ranges(vg.indptr[block.col], lens)  # gallery non-zeros of each column j
        contrib = np.minimum(np.repeat(block.data, lens), vg.data[idx])
        flat = np.repeat(block.row, lens) * num_g + vg.indices[idx]  # (p, g) as a flat index
        out[r0:r1] = np.bincount(flat, contrib, minlength=(r1 - r0) * num_g).reshape(-1, num_g)
        r0 = r1
    return out
