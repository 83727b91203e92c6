"""Static multi-pseudo labels (sMpRL): the real-data baseline's class ranks for every generated image.

Computed once, after the baseline and the generation stage, and stored beside the images as uint16 ranks
[N, K] (``GeneratedStore.write_labels``); trials rebuild the targets with :func:`trainables.labels.weights_from_ranks`.
"""

from __future__ import annotations

from pathlib import Path

from datasets.generated import GeneratedStore
from trainables import runtime
from trainables.config import ReidConfig
from trainables.labels import predict_static_ranks
from trainables.reid import load_trained
from trainables.reid_data import test_loader


def write_static_labels(baseline_run: str | Path, store: GeneratedStore, name: str, reid: ReidConfig,
                        meta: dict) -> int:
    """Rank every image of ``store`` with the baseline run's latest model; store them as label file ``name``.

    Returns the number of labelled images. ``meta`` is saved with the ranks (plus ``num_classes``).
    """
    model, state = load_trained(baseline_run)
    device = runtime.device_for(reid.use_gpu)
    loader = test_loader(store.records(), reid.image_size, batch_size=2 * reid.batch_size,
                         workers=reid.loader_workers, augment=reid.augment)  # as the baseline was evaluated
    ranks = predict_static_ranks(model.to(device), loader, logits_fn=lambda m, x: m.classify(x), device=device)
    store.write_labels(name, ranks, {**meta, "num_classes": state["num_classes"]})
    return int(ranks.shape[0])
