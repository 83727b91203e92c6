"""A re-ID model on a query/gallery split: the glue between the training code and the ranking.

Embeds the query and gallery images (flip test-time augmentation, :func:`embed_split`), computes their distances
(``reid.distance``) and ranks the gallery for every query under the Market-1501 protocol
(``trainables.evaluation.ranking``): :func:`evaluate_model`, what validation and every plain evaluation read.
:func:`evaluate_final` is the final model's test evaluation: the same plain metrics, from the same features the
k-reciprocally re-ranked ones (``reid.rerank``: Zhong et al. 2017, torchreid's k1=20, k2=6, lambda=0.3) and the
cross-domain test sets' (``dataset.test_root``), and, into the run's folder, the ranked-list picture and the
per-query AP (``trainables.config.RANKED_LIST``, ``PER_QUERY_AP``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from datasets.decoded_cache import CacheDir, DecodedRows, FileRows, image_rows
from datasets.files import atomic_write_bytes
from datasets.market1501 import load_test
from datasets.records import Record, Split
from trainables.config import (
    FINAL_METRICS,
    PER_QUERY_AP,
    RANKED_LIST,
    RERANKED,
    ReidConfig,
    cache_size,
    cross_domain_name,
)
from trainables.evaluation.distance import compute_distance, extract_features
from trainables.evaluation.ranking import RankResult, evaluate
from trainables.evaluation.rerank import re_rank
from trainables.evaluation.visrank import chosen_queries, ranked_list
from trainables.reid.data import EpochLoader, eval_loader

RERANK_K1, RERANK_K2, RERANK_LAMBDA = 20, 6, 0.3  # torchreid's re_ranking defaults (the paper's Market-1501 setting)
VISRANK_QUERIES, VISRANK_TOPK = 8, 10  # the ranked-list picture: queries shown, gallery images per query


@dataclass(frozen=True, eq=False)
class Embeddings:
    """A split's query and gallery embeddings (L2-normalised, float32, on the evaluation device), labels and rows."""

    qf: torch.Tensor  # [Q, D]
    gf: torch.Tensor  # [G, D]
    q_pids: np.ndarray  # [Q] int64
    q_camids: np.ndarray
    g_pids: np.ndarray  # [G]
    g_camids: np.ndarray
    q_rows: DecodedRows | FileRows  # the uint8 images embedded (the ranked-list picture shows them)
    g_rows: DecodedRows | FileRows


def embed_split(model: torch.nn.Module, split: Split, reid: ReidConfig, device: torch.device, *,
                cache_dir: CacheDir | str | None = None) -> Embeddings:
    """The query and gallery embeddings of ``model`` (reid.image_size, batch_size x2, loader_workers, flip_test)."""
    q_rows, g_rows = (eval_rows(records, reid, cache_dir) for records in (split.query, split.gallery))
    qf, q_pids, q_camids = extract_features(model, _loader(split.query, q_rows, reid, device), flip=reid.flip_test,
                                            normalize=True, device=device)
    gf, g_pids, g_camids = extract_features(model, _loader(split.gallery, g_rows, reid, device), flip=reid.flip_test,
                                            normalize=True, device=device)
    return Embeddings(qf, gf, q_pids, q_camids, g_pids, g_camids, q_rows, g_rows)


def evaluate_model(model: torch.nn.Module, split: Split, reid: ReidConfig, device: torch.device, *,
                   cache_dir: CacheDir | str | None = None) -> dict[str, Any]:
    """rank-1/5/10, mAP, mINP (fractions), the CMC curve and the skipped-query count of `model`'s embeddings: the
    plain distances (``reid.rerank`` does not change them; :func:`evaluate_final` adds the re-ranked ones).

    Reads reid.image_size, batch_size (x2: no gradients), loader_workers, flip_test, distance and ap. With
    `cache_dir` the images come from the decoded-image cache there (missing ones decoded into it first), else
    decoded from their files; either way they are normalised on `device`.
    """
    emb = embed_split(model, split, reid, device, cache_dir=cache_dir)
    return summary(rank(distances(emb, reid), emb, reid))


def evaluate_final(model: torch.nn.Module, split: Split, tests: Sequence[tuple[str, Split]], reid: ReidConfig,
                   device: torch.device, *, cache_dir: CacheDir | None = None,
                   run_dir: str | Path | None = None) -> dict[str, Any]:
    """The final model's test evaluation: :func:`evaluate_model`'s result, plus ``reranked`` (the metrics of the
    re-ranked distances of the same features, with ``reid.rerank``; else None) and ``cross_domain`` (test-set name
    -> its metrics, ``rr_<metric>`` too with ``reid.rerank``; None without ``tests``). With ``run_dir``, writes the
    ranked-list picture and the per-query AP of the plain distances there."""
    emb = embed_split(model, split, reid, device, cache_dir=cache_dir)
    dist = distances(emb, reid)
    res = rank(dist, emb, reid)
    out = summary(res)
    out["reranked"] = metrics(rank(reranked(dist, emb, reid), emb, reid)) if reid.rerank else None
    if run_dir is not None:
        write_per_query_ap(res, Path(run_dir) / PER_QUERY_AP)
        write_ranked_list(emb, dist, res, Path(run_dir) / RANKED_LIST)
    # a test set is not in the decode stage: its rows are each checked against its file (never trusted)
    checked = CacheDir(cache_dir.path, trusted=False, local_dir=cache_dir.local_dir) if cache_dir else None
    out["cross_domain"] = {name: cross_domain(model, s, reid, device, checked) for name, s in tests} or None
    return out


def cross_domain(model: torch.nn.Module, split: Split, reid: ReidConfig, device: torch.device,
                 cache_dir: CacheDir | None) -> dict[str, float]:
    """The metrics of one cross-domain test set (``rr_<metric>`` too with ``reid.rerank``), without a prefix."""
    emb = embed_split(model, split, reid, device, cache_dir=cache_dir)
    dist = distances(emb, reid)
    out = metrics(rank(dist, emb, reid))
    if reid.rerank:
        out.update({f"{RERANKED}{k}": v for k, v in metrics(rank(reranked(dist, emb, reid), emb, reid)).items()})
    return out


def load_test_sets(roots: Sequence[str]) -> tuple[tuple[str, Split], ...]:
    """``dataset.test_root``'s folders as (name, query/gallery split) pairs (``datasets.market1501.load_test``)."""
    return tuple((cross_domain_name(root), load_test(root)) for root in roots)


def distances(emb: Embeddings, reid: ReidConfig) -> torch.Tensor:
    """[Q, G] query-gallery distances (``reid.distance``) on the embeddings' device."""
    return compute_distance(emb.qf, emb.gf, metric=reid.distance)


def reranked(dist: torch.Tensor, emb: Embeddings, reid: ReidConfig) -> np.ndarray:
    """[Q, G] k-reciprocally re-ranked distances (torchreid's k1, k2, lambda) of ``dist`` and the same features."""
    return re_rank(dist, compute_distance(emb.qf, emb.qf, metric=reid.distance),
                   compute_distance(emb.gf, emb.gf, metric=reid.distance), k1=RERANK_K1, k2=RERANK_K2,
                   lambda_value=RERANK_LAMBDA)


def rank(dist: Any, emb: Embeddings, reid: ReidConfig) -> RankResult:
    return evaluate(dist, emb.q_pids, emb.g_pids, emb.q_camids, emb.g_camids, max_rank=min(50, len(emb.g_pids)),
                    ap=reid.ap)


def metrics(res: RankResult) -> dict[str, float]:
    """rank1/5/10, mAP, mINP (``FINAL_METRICS``; ranks past a small gallery's size: its last CMC value)."""
    cmc = [float(v) for v in res.cmc]
    out = {"rank1": cmc[0], "rank5": cmc[min(4, len(cmc) - 1)], "rank10": cmc[min(9, len(cmc) - 1)],
           "mAP": float(res.mAP), "mINP": float(res.mINP)}
    return {k: out[k] for k in FINAL_METRICS}


def summary(res: RankResult) -> dict[str, Any]:
    """:func:`metrics`, the CMC curve and the skipped-query count."""
    return {**metrics(res), "cmc": [float(v) for v in res.cmc], "skipped_queries": int(res.num_skipped_queries)}


def write_per_query_ap(res: RankResult, path: Path) -> None:
    """float32 [Q]: every query's AP (NaN for a query without a valid match), as ``np.load`` reads it."""
    buf = io.BytesIO()
    np.save(buf, res.ap.astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())


def write_ranked_list(emb: Embeddings, dist: torch.Tensor, res: RankResult, path: Path) -> None:
    """The ranked-list picture (``trainables.evaluation.visrank``) of ``VISRANK_QUERIES`` queries evenly spaced over
    those with a valid match, each with its top ``VISRANK_TOPK``."""
    chosen = chosen_queries(~res.skipped, VISRANK_QUERIES)
    rows = dist[torch.as_tensor(chosen, device=dist.device)].cpu().numpy()  # [n, G]
    picture = ranked_list(emb.q_rows.take(chosen), emb.g_rows.take, rows, emb.q_pids[chosen], emb.q_camids[chosen],
                          emb.g_pids, emb.g_camids, k=VISRANK_TOPK)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def check_rerank(reid: ReidConfig, split: Split, what: str) -> None:
    """Before training: ``reid.rerank`` needs more than k1 query + gallery images in every split it re-ranks."""
    n = len(split.query) + len(split.gallery)
    if reid.rerank and n <= RERANK_K1:
        raise ValueError(f"reid.rerank=true needs more than {RERANK_K1} query + gallery images; the {what} split has "
                         f"{n} (turn reid.rerank off)")


def eval_rows(records: Sequence[Record], reid: ReidConfig, cache_dir: CacheDir | str | None) -> DecodedRows | FileRows:
    """The uint8 rows of `records` at the test size of ``reid.augment`` (from the cache in `cache_dir`, missing ones
    decoded into it first; else decoded from their files on every read)."""
    return image_rows(records, cache_size(reid.image_size, reid.augment), cache_dir, workers=reid.loader_workers)


def eval_batches(records: Sequence[Record], reid: ReidConfig, device: torch.device,
                 cache_dir: CacheDir | str | None) -> EpochLoader:
    """Test-time batches of `records` at the test size of ``reid.augment`` (from the cache in `cache_dir`, else from
    their files)."""
    return _loader(records, eval_rows(records, reid, cache_dir), reid, device)


def _loader(records: Sequence[Record], rows: DecodedRows | FileRows, reid: ReidConfig,
            device: torch.device) -> EpochLoader:
    return eval_loader(records, rows, batch_size=2 * reid.batch_size, device=device, workers=reid.loader_workers,
                       augment=reid.augment)
