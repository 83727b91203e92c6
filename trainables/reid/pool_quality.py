"""How a generated pool compares with the real images it imitates, measured before any trial trains on it.

For the pool and the real training images (the GAN's training set: without ``reid.val_ids`` identities), both read
at the re-ID test size through the same pipeline the trials use:

- per-channel mean and std of the pixel values (0..255), and the mean per-image std (contrast);
- the Fréchet distance between the two sets' embeddings in the feature space of a real-data baseline (the network
  the static labels come from; no Inception download), with the same distance between two halves of the real
  images as the scale of sampling noise (images alternate between the halves, so both hold every identity);
- the baseline's mean max-softmax on each set (how confidently the labelling network assigns an image a class);
- a sheet of real (top rows) and generated (bottom rows) images, at that size.

At most :data:`MAX_IMAGES` images of each set enter the statistics (evenly spaced: deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
from torchvision.utils import save_image

from datasets.decoded_cache import image_rows
from datasets.generated import GeneratedStore
from datasets.market1501 import load
from datasets.records import Record
from trainables import runtime
from trainables.config import ReidConfig, cache_size
from trainables.modes import eval_mode
from trainables.reid.augment import DeviceAugment
from trainables.reid.loop import load_trained
from trainables.seeding import validation_split

MAX_IMAGES = 10_000  # per set (a 2048-d covariance needs more than 2048)
SHEET_COLUMNS = 16
SHEET_ROWS = 2  # per set
SHEET_FILE = "pool_sheet.png"


@dataclass(frozen=True)
class SetStats:
    """One image set's statistics (pixel values 0..255)."""

    n: int
    mean: tuple[float, float, float]  # per channel (RGB)
    std: tuple[float, float, float]  # per channel, over every pixel of the set
    contrast: float  # the mean over images of each image's pixel std
    confidence: float  # the baseline's mean max-softmax
    feat_mean: np.ndarray
    feat_cov: np.ndarray


def spread(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` evenly spaced indices of ``range(n)``."""
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) (Heusel et al. 2017), in float64."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
    root = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all():  # near-singular product: regularise (as pytorch-fid does)
        eps = 1e-6 * np.eye(len(cov1))
        root = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root.real))
    return max(value, 0.0)


def set_stats(model: torch.nn.Module, records: Sequence[Record], reid: ReidConfig, device: torch.device,
              batch_size: int = 128) -> tuple[SetStats, np.ndarray, np.ndarray]:
    """The statistics of ``records`` (at most MAX_IMAGES, evenly spaced), the uint8 images of the sheet and the
    embeddings [n, D]."""
    records = [records[i] for i in spread(len(records), MAX_IMAGES)]
    if len(records) < 2:
        raise ValueError(f"pool quality needs at least 2 images per set, got {len(records)}")
    size = cache_size(reid.image_size, reid.augment)
    rows = image_rows(records, size, None)
    prepare = DeviceAugment(reid.augment, size, device, train=False)
    sums, sq, contrast, conf, feats = np.zeros(3), np.zeros(3), 0.0, 0.0, []
    with eval_mode(model):
        for start in range(0, len(records), batch_size):
            u8 = rows.take(np.arange(start, min(start + batch_size, len(records))))  # [B, H, W, 3]
            px = u8.reshape(len(u8), -1, 3).astype(np.float64)
            sums += px.sum((0, 1))
            sq += (px ** 2).sum((0, 1))
            contrast += float(px.reshape(len(u8), -1).std(1).sum())
            x = prepare({"img": torch.from_numpy(u8)})["img"]
            emb = model.embed(x)
            probs = torch.softmax(model.classify_embedding(emb).float(), 1)
            conf += float(probs.max(1).values.sum())
            feats.append(emb.float().cpu().numpy().astype(np.float64))
    n, pixels = len(records), len(records) * size[0] * size[1]
    mean = sums / pixels
    std = np.sqrt(np.maximum(sq / pixels - mean ** 2, 0.0))
    f = np.concatenate(feats)
    stats = SetStats(n, tuple(mean.round(2).tolist()), tuple(std.round(2).tolist()), round(contrast / n, 2),
                     round(conf / n, 4), f.mean(0), np.cov(f, rowvar=False))
    sheet = rows.take(spread(n, SHEET_COLUMNS * SHEET_ROWS))
    return stats, sheet, f


def pool_quality(model: torch.nn.Module, real: Sequence[Record], generated: Sequence[Record], reid: ReidConfig,
                 device: torch.device, out_dir: str | Path) -> dict:
    """Compare ``generated`` with ``real`` (see the module docstring); writes the sheet to ``out_dir``."""
    model = model.to(device)
    real_stats, real_sheet, real_feats = set_stats(model, real, reid, device)
    gen_stats, gen_sheet, _ = set_stats(model, generated, reid, device)
    fd = frechet_distance(real_stats.feat_mean, real_stats.feat_cov, gen_stats.feat_mean, gen_stats.feat_cov)
    a, b = real_feats[0::2], real_feats[1::2]
    floor = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    sheet = Path(out_dir) / SHEET_FILE
    write_sheet(real_sheet, gen_sheet, sheet)
    out = {"fd": round(fd, 4), "fd_real_halves": round(floor, 4), "sheet": str(sheet)}
    for name, s in (("real", real_stats), ("gen", gen_stats)):
        out.update({f"{name}_n": s.n, f"{name}_mean": s.mean, f"{name}_std": s.std, f"{name}_contrast": s.contrast,
                    f"{name}_confidence": s.confidence})
    return out


def measure_pool(baseline_run: str | Path, store_root: str | Path, data_root: str | Path, reid: ReidConfig,
                 out_dir: str | Path) -> dict:
    """:func:`pool_quality` of the whole store against the training images (minus ``reid.val_ids`` identities: what
    the GAN trained on), in the feature space of the baseline run's latest model."""
    model, _ = load_trained(baseline_run)
    split, _ = validation_split(load(data_root), reid.val_ids)
    store = GeneratedStore(store_root)
    meta = store.info["meta"]
    bn = f"batch statistics over {meta['bn_batch']}" if meta.get("bn") == "batch" else "running statistics"
    rendering = f"BatchNorm {bn}, {'per-image min-max' if meta.get('stretch') else 'fixed [-1, 1]'} byte map"
    if meta.get("pool") == "synthetic_ids":
        rendering = f"synthetic_ids: {meta.get('ids', '?')} unseen identities drawn by the synthetic generator"
    elif meta.get("pool") == "folder":
        rendering = f"folder: {meta.get('root', '?')}"
    out = pool_quality(model, split.train, store.records(), reid, runtime.device_for(reid.use_gpu), out_dir)
    return {**out, "rendering": rendering}


def write_sheet(real: np.ndarray, generated: np.ndarray, path: Path) -> Path:
    """Real images in the top rows, generated ones below (uint8 [N, H, W, 3] each), SHEET_COLUMNS per row."""
    def rows(u8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255  # [N, 3, H, W]
        pad = (-len(x)) % SHEET_COLUMNS
        return torch.cat([x, torch.ones(pad, *x.shape[1:])]) if pad else x

    save_image(torch.cat([rows(real), rows(generated)]), str(path), nrow=SHEET_COLUMNS, padding=2, pad_value=1.0)
    return path
