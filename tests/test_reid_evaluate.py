"""A re-ID model on its split (trainables/reid/evaluate.py): the ranking of its embeddings' distances, and
``reid.rerank`` switching k-reciprocal re-ranking on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainables.config import ReidConfig
from trainables.evaluation.distance import compute_distance, extract_features
from trainables.evaluation.ranking import evaluate
from trainables.evaluation.rerank import re_rank
from trainables.reid.evaluate import eval_batches, evaluate_model
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


def test_rerank_switch_changes_the_distances_ranked(model, tiny_split):
    reid = ReidConfig(image_size=(32, 16), batch_size=8, loader_workers=0)
    assert len(tiny_split.query) + len(tiny_split.gallery) > 20  # k1 = 20 neighbours exist
    plain = evaluate_model(model, tiny_split, reid, CPU)
    ranked = evaluate_model(model, tiny_split, dataclasses.replace(reid, rerank=True), CPU)
    for got, rerank in ((plain, False), (ranked, True)):
        want = _expected(model, tiny_split, reid, rerank)
        assert got["cmc"] == pytest.approx(list(want.cmc)) and got["mAP"] == pytest.approx(want.mAP)
    assert ranked["mAP"] != plain["mAP"]  # re-ranking reorders this (untrained) model's gallery


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
