"""Ranked-list pictures (as torchreid's ``visrank``): a few queries, each followed by its top-k gallery images, a true
match framed green and a false one red. Pure functions of images, distance rows and labels (numpy and PIL, no model).

The gallery is ranked as the metrics rank it (``trainables.evaluation.ranking``, the Market-1501 protocol): entries
with the query's pid *and* camera are removed, and so are junk entries (pid -1); distractors (pid 0) stay as false
matches; equal distances rank by gallery index (a stable sort).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

GREEN = (0, 255, 0)  # a true match: the query's pid from another camera
RED = (255, 0, 0)  # a false match
QUERY_FRAME = (0, 0, 0)
BACKGROUND = (255, 255, 255)
BORDER = 3  # frame width in pixels
GAP = 4  # between two cells; the query is set off by GAP * 4


def chosen_queries(valid: np.ndarray, n: int) -> np.ndarray:
    """``n`` query indices evenly spaced over the queries with ``valid`` true (those with a true match to show),
    first and last included: the same choice for the same split, whatever the model."""
    candidates = np.flatnonzero(np.asarray(valid, dtype=bool))
    if n < 1 or not len(candidates):
        return np.zeros(0, dtype=np.int64)
    picks = np.linspace(0, len(candidates) - 1, min(n, len(candidates))).round().astype(np.int64)
    return candidates[np.unique(picks)]


def top_matches(dist_row: np.ndarray, q_pid: int, q_camid: int, g_pids: np.ndarray, g_camids: np.ndarray,
                k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(gallery indices [<=k], is a true match [<=k]) of one query's ``k`` nearest kept gallery entries."""
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    dist_row = np.asarray(dist_row)
    if dist_row.shape != g_pids.shape or g_pids.shape != g_camids.shape:
        raise ValueError(f"a distance row of shape {dist_row.shape} needs gallery pids and camids of that shape, got "
                         f"{g_pids.shape} and {g_camids.shape}")
    kept = (g_pids != -1) & ~((g_pids == q_pid) & (g_camids == q_camid))
    order = np.argsort(dist_row, kind="stable")
    order = order[kept[order]][:k]
    return order, g_pids[order] == q_pid


def draw(queries: np.ndarray, galleries: list[np.ndarray], matched: list[np.ndarray]) -> Image.Image:
    """One row per query: the query (black frame), a gap, then its gallery images in rank order, each framed green
    (``matched``) or red. ``queries`` uint8 [n, H, W, 3]; ``galleries[i]`` uint8 [k_i, H, W, 3]; ``matched[i]``
    bool [k_i]."""
    queries = np.asarray(queries)
    if queries.ndim != 4 or queries.shape[-1] != 3 or queries.dtype != np.uint8:
        raise ValueError(f"queries must be uint8 [n, H, W, 3], got {queries.dtype} {queries.shape}")
    if len(galleries) != len(queries) or len(matched) != len(queries):
        raise ValueError(f"{len(queries)} queries need as many gallery lists and match lists, got "
                         f"{len(galleries)} and {len(matched)}")
    h, w = queries.shape[1:3]
    cell_h, cell_w = h + 2 * BORDER, w + 2 * BORDER
    k = max((len(g) for g in galleries), default=0)
    width = cell_w + 4 * GAP + k * (cell_w + GAP)
    canvas = Image.new("RGB", (width, max(1, len(queries)) * (cell_h + GAP) + GAP), BACKGROUND)
    for i, (query, gallery, hits) in enumerate(zip(queries, galleries, matched)):
        if len(gallery) != len(hits):
            raise ValueError(f"query {i}: {len(gallery)} gallery images but {len(hits)} match flags")
        top = GAP + i * (cell_h + GAP)
        _paste(canvas, query, 0, top, QUERY_FRAME)
        for j, (image, hit) in enumerate(zip(gallery, hits)):
            _paste(canvas, image, cell_w + 4 * GAP + j * (cell_w + GAP), top, GREEN if hit else RED)
    return canvas


def ranked_list(query_images: np.ndarray, gallery_images: Callable[[np.ndarray], np.ndarray], dist: np.ndarray,
                q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray, g_camids: np.ndarray,
                k: int = 10) -> Image.Image:
    """The picture of the queries ``query_images`` (uint8 [n, H, W, 3]) with distance rows ``dist`` [n, G] and labels
    ``q_pids``/``q_camids`` [n]: each query's top ``k`` (:func:`top_matches`), their images taken with
    ``gallery_images(indices)`` (uint8 [k, H, W, 3], e.g. ``DecodedRows.take``)."""
    dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[0] != len(query_images):
        raise ValueError(f"dist must be [n queries, G], got {dist.shape} for {len(query_images)} queries")
    galleries, matched = [], []
    for row, pid, cam in zip(dist, q_pids, q_camids):
        idx, hits = top_matches(row, int(pid), int(cam), g_pids, g_camids, k)
        galleries.append(np.asarray(gallery_images(idx)) if len(idx) else np.zeros((0, *query_images.shape[1:]),
                                                                                   dtype=np.uint8))
        matched.append(hits)
    return draw(query_images, galleries, matched)


def _paste(canvas: Image.Image, image: np.ndarray, left: int, top: int, frame: tuple[int, int, int]) -> None:
    """``image`` (uint8 [H, W, 3]) at (left + BORDER, top + BORDER), inside a ``frame``-coloured border."""
    h, w = image.shape[:2]
    canvas.paste(Image.new("RGB", (w + 2 * BORDER, h + 2 * BORDER), frame), (left, top))
    canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (left + BORDER, top + BORDER))
