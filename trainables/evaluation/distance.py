"""Re-ID embeddings and query-gallery distances (the input of trainables/evaluation/ranking.py).

`extract_features` embeds a loader's images (flip test-time augmentation, L2 normalisation);
`compute_distance` turns query and gallery features into a [Q, G] distance matrix, chunked to bound memory.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import DISTANCES as DISTANCE_METRICS  # the choice list
from trainables.modes import eval_mode


def extract_features(
    model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]],
    *, flip: bool = True, normalize: bool = True, device: torch.device | str | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embed every batch of `loader` (dicts with "img" [B,3,H,W], "pid" [B], "camid" [B]).

    With `flip`, the embedding is model(x) + model(x flipped horizontally) (flip test-time augmentation);
    with `normalize`, rows are L2-normalised. The model runs under `eval_mode` (eval mode, inference_mode,
    previous train/eval mode restored afterwards) on `device` (default: its first parameter's device).
    Returns feats [N, D] float32 on `device` (so distances can be computed there), pids [N], camids [N].
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    feats, pids, camids = [], [], []
    with eval_mode(model):
        for i, batch in enumerate(loader):
            missing = [key for key in ("img", "pid", "camid") if key not in batch]
            if missing:
                raise ValueError(f"loader batch {i} lacks key(s) {missing}; expected 'img', 'pid', 'camid'")
            x = batch["img"].to(device, non_blocking=True)  # [B, 3, H, W]
            f = model(x)  # [B, D]
            if flip:
                f = f + model(torch.flip(x, dims=[3]))
            feats.append(f.float())
            pids.append(torch.as_tensor(batch["pid"]).reshape(-1).cpu())
            camids.append(torch.as_tensor(batch["camid"]).reshape(-1).cpu())
    if not feats:
        raise ValueError("loader yielded no batches")
    out = torch.cat(feats)  # [N, D]
    if normalize:
        out = F.normalize(out, p=2, dim=1)
    return out, torch.cat(pids).numpy().astype(np.int64), torch.cat(camids).numpy().astype(np.int64)


def compute_distance(qf: Any, gf: Any, metric: str = "cosine", *, chunk_size: int | None = None) -> torch.Tensor:
    """Distance matrix [Q, G] between query feats [Q, D] and gallery feats [G, D], on qf's device.

    "cosine" = 1 - cosine similarity; "euclidean" = squared euclidean distance (clamped at 0). Computed
    `chunk_size` query rows at a time (default ~16M entries per matmul) to bound temporaries.
    """
    if metric not in DISTANCE_METRICS:
        raise ValueError(f"metric must be one of {DISTANCE_METRICS}, got {metric!r}")
    qf, gf = torch.as_tensor(qf), torch.as_tensor(gf)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf and gf must be [N, D] with the same D, got {tuple(qf.shape)} and {tuple(gf.shape)}")
    dtype = torch.promote_types(qf.dtype, gf.dtype) if qf.is_floating_point() else torch.float32
    qf, gf = qf.to(dtype), gf.to(device=qf.device, dtype=dtype)
    if metric == "cosine":
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    g_sq = (gf * gf).sum(dim=1)  # [G]
    step = int(chunk_size or max(1, (1 << 24) // max(gf.shape[0], 1)))
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=dtype, device=qf.device)  # [Q, G]
    for r0 in range(0, qf.shape[0], step):
        q = qf[r0:r0 + step]
        dot = q @ gf.T  # [c, G]
        if metric == "cosine":
            out[r0:r0 + step] = 1.0 - dot
        else:
            out[r0:r0 + step] = ((q * q).sum(dim=1, keepdim=True) + g_sq - 2.0 * dot).clamp_(min=0.0)
    return out
