"""Input pipeline alone: loader capacity from JPEGs vs from the decoded-image cache, vs what the train step consumes.

Rows: the training run's loader (``trainables.reid.data.train_loader``) over the JPEG files (``FileRows``: JPEG
decode + bicubic resize per sample in the loader workers) and over the decoded cache (``DecodedRows``: one
memory-mapped gather per batch), both then flip/pad/crop + normalise on the device, here the CPU
(:class:`trainables.reid.augment.DeviceAugment`), and the cache's uint8 batches alone (what the loader hands a
GPU, which augments them), each with the given DataLoader worker counts, over a synthetic Market-format dataset
(128x64 JPEGs, like Market-1501). The first two end at the network's float input.
img/s is steady state (after the first batch); per_core divides it by the processes that load (1 with 0 workers,
else the workers); torch runs one thread (``--threads``), so 0 workers is one core. first_s is the first batch's
latency. The train step's consumption is the plain loop of ``bench.train`` at the same size and batch on
in-memory data (or ``--train-rate``, e.g. 5000 for the H100 target). ``e2e_bound``: with 0 workers loading and
training take turns, 1 / (1/load + 1/train); with workers, min(load, train) if spare cores exist.

    python -m bench.data [--size 256 128] [--batch 64] [--batches 20] [--workers 0 1 2] [--train-rate R]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench.common import cycle_batches, format_table, machine, reproduce, spread, synthetic_dataset
from datasets.decoded_cache import DecodedDataset, DecodedRows, FileRows, as_batch, decoded_rows
from datasets.market1501 import load
from datasets.records import Record
from trainables.reid.data import ListBatchSampler, train_loader


def loader_rate(dataset: Any, n: int, batch: int, batches: int, workers: int, seed: int,
                device: str = "cpu") -> tuple[float, float]:
    """(steady images/s after the first batch, first-batch seconds) of one pass of a loader.

    ``dataset``: a ``DecodedDataset`` (uint8 batches: what the loader does for a GPU, which augments them) or a
    ``(records, rows, size)`` tuple (the training run's persistent loader over those rows, augmenting on
    ``device``).
    """
    order = cycle_batches(n, batch, batches + 1, seed=seed)
    if isinstance(dataset, tuple):
        records, rows, size = dataset
        loader = train_loader(records, rows, size, device=torch.device(device), workers=workers)
        loader.epoch(order, seed)
    else:
        loader = DataLoader(dataset, batch_sampler=ListBatchSampler(order), num_workers=workers, collate_fn=as_batch)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    images = sum(len(b["img"]) for b in it)
    if device == "cuda":
        torch.cuda.synchronize()  # the device augmentation of the last batches
    return images / (time.perf_counter() - t1), t1 - t0


def pipeline_rows(name: str, dataset: Any, n: int, args: argparse.Namespace, train_rate: float) -> list[list]:
    rows = []
    for w in args.workers:
        runs = [loader_rate(dataset, n, args.batch, args.batches, w, seed=r, device=args.device)
                for r in range(args.repeats)]
        rate, lo_hi = spread([r for r, _ in runs])
        bound = 1 / (1 / rate + 1 / train_rate) if w == 0 else min(rate, train_rate)
        rows.append([name, w, rate, lo_hi, rate / max(1, w), spread([f for _, f in runs])[0], rate / train_rate,
                     bound])
    return rows


def same_samples(train: tuple[Record, ...], rows: DecodedRows, size: tuple[int, int], k: int = 8) -> bool:
    """The cache holds exactly what decoding the JPEG files gives (the augmentation is one code path)."""
    index = list(range(min(k, len(train))))
    return bool((FileRows(train, size).take(index) == rows.take(index)).all())


def train_step_rate(args: argparse.Namespace) -> tuple[float, str]:
    """images/s of the plain training step at this size and batch (in-memory data), or ``--train-rate``."""
    if args.train_rate:
        return args.train_rate, "given (--train-rate)"
    from bench.common import Bench, run_epochs
    from bench.train import PlainReid

    b = Bench(backbone=args.backbone, size=tuple(args.size), batch=args.batch, steps=args.train_steps, warmup=1,
              repeats=1, device=args.device, amp=args.device == "cuda", channels_last=args.device == "cuda")
    m = run_epochs(b, PlainReid(b).epoch)
    return m.rates[0], f"plain {args.backbone} step on {args.device}, {args.train_steps} steps"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per pass (after the first)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    p.add_argument("--root", help="Market-format dataset (default: a cached synthetic one)")
    p.add_argument("--ids", type=int, default=64, help="training ids of that synthetic dataset (16 images each)")
    p.add_argument("--cache-dir", help="keep the decoded cache here (default: a temporary folder, removed)")
    p.add_argument("--cache-workers", type=int, default=0, help="processes that build the cache")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: 0 loader workers = one core)")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"),
                   help="the synthetic dataset's JPEG size (Market-1501: 128x64)")
    p.add_argument("--train-rate", type=float, help="train-step images/s to compare with (skips measuring it)")
    p.add_argument("--backbone", default="resnet50", choices=("resnet18", "resnet34", "resnet50"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--train-steps", type=int, default=3)
    a = p.parse_args(argv)
    if min(a.batch, a.batches, a.repeats, a.train_steps) < 1 or min(a.workers) < 0:
        p.error("--batch, --batches, --repeats, --train-steps must be >= 1 and --workers >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    root = args.root or synthetic_dataset(None, ids=args.ids, images_per_id=16, size=tuple(args.image_size))
    train = load(root).train
    train_rate, how = train_step_rate(args)
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="mprl-bench-cache-"))
    try:
        t0 = time.perf_counter()
        rows_ = decoded_rows(train, size, cache_dir, workers=args.cache_workers)
        build_s, cache_mib = time.perf_counter() - t0, sum(Path(f).stat().st_size for f in rows_.files) / 2**20
        identical = same_samples(train, rows_, size)
        rows = pipeline_rows("JPEG decode+augment", (train, FileRows(train, size), size), len(train), args,
                             train_rate)
        rows += pipeline_rows("decoded cache+augment", (train, rows_, size), len(train), args, train_rate)
        rows += pipeline_rows("decoded cache, uint8", DecodedDataset(train, rows_), len(train), args, train_rate)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"{machine(args.device)}\n{len(train)} training images ({args.image_size[0]}x{args.image_size[1]} JPEG) -> "
          f"{size[0]}x{size[1]}, batch {args.batch}, {args.repeats} x {args.batches} timed batches per row, "
          f"{torch.get_num_threads()} torch thread(s) (img/s: median, min-max)")
    print(format_table(("pipeline", "workers", "img/s", "min-max", "per_core", "first_s", "vs_train", "e2e_bound"),
                       rows))
    print(f"train step: {train_rate:.1f} img/s ({how})")
    print(f"decoded cache: built in {build_s:.1f} s ({len(train) / max(build_s, 1e-9):.0f} img/s, "
          f"{cache_mib:.0f} MiB), its rows equal to the JPEGs decoded anew: {'yes' if identical else 'NO'}")
    for w in args.workers:
        plain, cache, raw = (r[4] for r in rows if r[1] == w)
        print(f"{w} workers: cache {cache / plain:.1f}x JPEG per core augmenting on the CPU, {raw / plain:.1f}x "
              f"as uint8 batches for a device that augments; JPEG decode is "
              f"{'the bottleneck' if plain * max(1, w) < train_rate else 'not the bottleneck'} "
              f"(train {train_rate:.0f} img/s)")
    print(reproduce("bench.data", argv))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
