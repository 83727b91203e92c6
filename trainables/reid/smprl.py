"""Static multi-pseudo labels (sMpRL): the real-data baseline's class ranks for every generated image.

Computed once, after the baseline and the generation stage, and stored beside the images as uint16 ranks
[N, K] (``GeneratedStore.write_labels``); trials rebuild the targets with
:func:`trainables.reid.labels.weights_from_ranks`.
"""

from __future__ import annotations

from pathlib import Path

from datasets.generated import GeneratedStore
from trainables import runtime
from trainables.config import ReidConfig
from trainables.reid.evaluate import eval_batches
from trainables.reid.labels import predict_static_ranks
from trainables.reid.loop import load_trained


def write_static_labels(baseline_run: str | Path, store: GeneratedStore, name: str, reid: ReidConfig,
                        meta: dict) -> int:
    """Rank every image of ``store`` with the baseline run's latest model; store them as label file ``name``.

    Returns the number of labelled images. ``meta`` is saved with the ranks (plus ``num_classes``). The images are
    read as the baseline's test split was (the test-time pipeline of ``reid.augment``), from the store's shards.
    """
    model, state = load_trained(baseline_run)
    device = runtime.device_for(reid.use_gpu)
    loader = eval_batches(store.records(), reid, device, cache_dir=None)
    ranks = predict_static_ranks(model.to(device), loader, logits_fn=lambda m, x: m.classify(x), device=device)
    store.write_labels(name, ranks, {**meta, "num_classes": state["num_classes"]})
    return int(ranks.shape[0])
