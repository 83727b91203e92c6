"""Evaluate a re-ID model on its dataset's query/gallery split (Market-1501 protocol, via evaluate_rank)."""

from __future__ import annotations

from typing import Any

import torch

from datasets.records import Split
from orchestrator.config import Config
from trainables.evaluation import compute_distance, evaluate, extract_features
from trainables.reid_data import test_loader


def evaluate_model(model: torch.nn.Module, split: Split, cfg: Config, device: torch.device) -> dict[str, Any]:
    """rank-1/5/10, mAP, mINP (fractions) and the CMC curve of ``model``'s embeddings."""
    r = cfg.reid
    pin = device.type == "cuda"
    q = test_loader(split.query, r.image_size, batch_size=2 * r.batch_size, workers=r.loader_workers, pin_memory=pin)
    g = test_loader(split.gallery, r.image_size, batch_size=2 * r.batch_size, workers=r.loader_workers,
                    pin_memory=pin)
    qf, q_pids, q_camids = extract_features(model, q, flip=r.flip_test, normalize=True, device=device)
    gf, g_pids, g_camids = extract_features(model, g, flip=r.flip_test, normalize=True, device=device)
    dist = compute_distance(qf, gf, metric=r.distance)
    res = evaluate(dist, q_pids, g_pids, q_camids, g_camids, max_rank=min(50, len(split.gallery)), ap=r.ap)
    cmc = [float(v) for v in res.cmc]
    return {"rank1": cmc[0], "rank5": cmc[min(4, len(cmc) - 1)], "rank10": cmc[min(9, len(cmc) - 1)],
            "mAP": float(res.mAP), "mINP": float(res.mINP), "cmc": cmc,
            "skipped_queries": int(res.num_skipped_queries)}
