"""A re-ID model on its split (trainables/reid/evaluate.py): the ranking of its embeddings' distances, and
``reid.rerank`` adding the k-reciprocally re-ranked metrics to the final evaluation (the plain ones unchanged)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trainables.config import ReidConfig
from trainables.evaluation.distance import compute_distance, extract_features
from trainables.evaluation.ranking import evaluate
from trainables.evaluation.rerank import re_rank
from trainables.reid.evaluate import (
    RERANK_K1,
    RERANK_K2,
    RERANK_LAMBDA,
    Embeddings,
    distances,
    eval_batches,
    evaluate_final,
    evaluate_model,
    rank,
    reranked,
)
from trainables.reid.models import IdentificationNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_split):
    torch.manual_seed(0)
    return IdentificationNet(tiny_split.num_train_ids, backbone="resnet18", embed_dim=16).eval()


def _expected(model, split, reid: ReidConfig, rerank: bool):
    """The metrics, computed here step by step from the library functions."""
    qf, qp, qc = extract_features(model, eval_batches(split.query, reid, CPU, None), flip=True, device=CPU)
    gf, gp, gc = extract_features(model, eval_batches(split.gallery, reid, CPU, None), flip=True, device=CPU)
    dist = compute_distance(qf, gf)
    if rerank:
        dist = re_rank(dist, compute_distance(qf, qf), compute_distance(gf, gf))
    return evaluate(dist, qp, gp, qc, gc, max_rank=min(50, len(split.gallery)))


def test_rerank_leaves_the_plain_metrics_and_adds_the_reranked_ones(model, tiny_split, tmp_path):
    reid = ReidConfig(image_size=(32, 16), batch_size=8, loader_workers=0)
    assert len(tiny_split.query) + len(tiny_split.gallery) > 20  # k1 = 20 neighbours exist
    plain_want, rr_want = _expected(model, tiny_split, reid, False), _expected(model, tiny_split, reid, True)
    on = dataclasses.replace(reid, rerank=True)
    plain = evaluate_model(model, tiny_split, reid, CPU)
    assert evaluate_model(model, tiny_split, on, CPU) == plain  # validation and every plain evaluation: never re-ranked
    final = evaluate_final(model, tiny_split, (), on, CPU, run_dir=tmp_path)
    assert final["cmc"] == pytest.approx(list(plain_want.cmc)) and final["mAP"] == pytest.approx(plain_want.mAP)
    assert {k: final[k] for k in plain} == plain  # turning rerank on changes nothing of the plain metrics
    assert final["reranked"] == pytest.approx({"rank1": rr_want.cmc[0], "rank5": rr_want.cmc[4],
                                               "rank10": rr_want.cmc[9], "mAP": rr_want.mAP, "mINP": rr_want.mINP})
    assert final["reranked"]["mAP"] != plain["mAP"]  # re-ranking reorders this (untrained) model's gallery
    assert final["cross_domain"] is None
    assert evaluate_final(model, tiny_split, (), reid, CPU)["reranked"] is None  # rerank off: none


def _circle(angles) -> torch.Tensor:
    a = torch.deg2rad(torch.tensor(angles, dtype=torch.float64))
    return torch.stack([a.cos(), a.sin()], 1).float()


def test_reranking_fixes_a_top1_that_its_neighbourhood_contradicts():
    """Identity 1's gallery is a tight cluster at 0 degrees, identity 2's one at 10 degrees; one image of identity 2
    strays to 5.5 degrees, nearer the query (identity 1, at 4.5) than any image of its own identity. Plain ranking
    puts the stray first; its k-reciprocal neighbours are identity 2's, the query's identity 1's, so re-ranking puts
    a true match first."""
    ga, gb = torch.linspace(-3, 3, 12).tolist(), [*torch.linspace(7, 13, 12).tolist(), 5.5]
    g_pids = np.array([1] * len(ga) + [2] * len(gb))
    emb = Embeddings(_circle([4.5]), _circle(ga + gb), np.array([1]), np.array([0]), g_pids,
                     np.ones(len(g_pids), dtype=np.int64), None, None)
    reid = ReidConfig(rerank=True)
    dist = distances(emb, reid)
    assert g_pids[int(dist[0].argmin())] == 2  # the stray impostor is the plain top-1
    assert rank(dist, emb, reid).rank(1) == 0.0 and rank(dist, emb, reid).rank(2) == 1.0
    assert rank(reranked(dist, emb, reid), emb, reid).rank(1) == 1.0  # re-ranked: a true match first
    assert (RERANK_K1, RERANK_K2, RERANK_LAMBDA) == (20, 6, 0.3)  # torchreid's parameters


def test_rerank_is_a_checked_boolean():
    with pytest.raises(ValueError, match="reid.rerank='yes' must be true or false"):
        ReidConfig(rerank="yes")


def test_rerank_on_a_split_too_small_fails_before_training(tiny_split):
    from trainables.reid.evaluate import check_rerank

    reid = ReidConfig(rerank=True)
    check_rerank(reid, tiny_split, "test")  # large enough
    small = dataclasses.replace(tiny_split, query=tiny_split.query[:2], gallery=tiny_split.gallery[:5])
    with pytest.raises(ValueError, match="reid.rerank=true needs more than 20 query \\+ gallery images; the "
                                         "validation split has 7"):
        check_rerank(reid, small, "validation")
    check_rerank(ReidConfig(rerank=False), small, "validation")  # off: nothing to check
