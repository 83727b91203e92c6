"""A re-ID model on its dataset's query/gallery split: the glue between the training code and the ranking.

Embeds the query and gallery images (flip test-time augmentation), computes their distances
(``reid.distance``), optionally re-ranks them (``reid.rerank``: k-reciprocal, Zhong et al. 2017) and ranks the
gallery for every query under the Market-1501 protocol (``trainables.evaluation.ranking``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from datasets.decoded_cache import CacheDir, image_rows
from datasets.records import Record, Split
from trainables.config import ReidConfig, cache_size
from trainables.evaluation.distance import compute_distance, extract_features
from trainables.evaluation.ranking import evaluate
from trainables.evaluation.rerank import re_rank
from trainables.reid.data import EpochLoader, eval_loader


def evaluate_model(model: torch.nn.Module, split: Split, reid: ReidConfig, device: torch.device, *,
                   cache_dir: CacheDir | str | None = None) -> dict[str, Any]:
    """rank-1/5/10, mAP, mINP (fractions), the CMC curve and the skipped-query count of `model`'s embeddings.

    Reads reid.image_size, batch_size (x2: no gradients), loader_workers, flip_test, distance, rerank and ap. With
    `cache_dir` the images come from the decoded-image cache there (missing ones decoded into it first), else
    decoded from their files; either way they are normalised on `device`.
    """
    q, g = (eval_batches(records, reid, device, cache_dir) for records in (split.query, split.gallery))
    qf, q_pids, q_camids = extract_features(model, q, flip=reid.flip_test, normalize=True, device=device)
    gf, g_pids, g_camids = extract_features(model, g, flip=reid.flip_test, normalize=True, device=device)
    dist = compute_distance(qf, gf, metric=reid.distance)
    if reid.rerank:
        dist = re_rank(dist, compute_distance(qf, qf, metric=reid.distance),
                       compute_distance(gf, gf, metric=reid.distance), k1=RERANK_K1)
    res = evaluate(dist, q_pids, g_pids, q_camids, g_camids, max_rank=min(50, len(split.gallery)), ap=reid.ap)
    cmc = [float(v) for v in res.cmc]
    return {"rank1": cmc[0], "rank5": cmc[min(4, len(cmc) - 1)], "rank10": cmc[min(9, len(cmc) - 1)],
            "mAP": float(res.mAP), "mINP": float(res.mINP), "cmc": cmc,
            "skipped_queries": int(res.num_skipped_queries)}


RERANK_K1 = 20  # re_rank's k1: the neighbours each image's k-reciprocal set is built from


def check_rerank(reid: ReidConfig, split: Split, what: str) -> None:
    """Before training: ``reid.rerank`` needs more than k1 query + gallery images in every split it ranks."""
    n = len(split.query) + len(split.gallery)
    if reid.rerank and n <= RERANK_K1:
        raise ValueError(f"reid.rerank=true needs more than {RERANK_K1} query + gallery images; the {what} split has "
                         f"{n} (raise reid.val_ids, or turn reid.rerank off)")


def eval_batches(records: Sequence[Record], reid: ReidConfig, device: torch.device,
                 cache_dir: CacheDir | str | None) -> EpochLoader:
    """Test-time batches of `records` at the test size of ``reid.augment`` (from the cache in `cache_dir`, else from
    their files)."""
    rows = image_rows(records, cache_size(reid.image_size, reid.augment), cache_dir, workers=reid.loader_workers)
    return eval_loader(records, rows, batch_size=2 * reid.batch_size, device=device, workers=reid.loader_workers,
                       augment=reid.augment)
