"""Helpers shared by the benchmarks: tables, the reproduce line, timing, benchmark settings and their data."""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from orchestrator.tables import cell, format_table  # noqa: F401  (format_table: re-exported for bench/*)
from trainables.methods import BASELINE, method
from trainables.seeding import Stream, derive_seed, torch_generator

if TYPE_CHECKING:
    from orchestrator.config import Config

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "mprl-bench"


def reproduce(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "reproduce: python -m " + " ".join([module, *map(shlex.quote, args)])


def machine(device: str = "cpu") -> str:
    """One line: torch version, CPU cores and threads, the GPU when used."""
    gpu = ""
    if device == "cuda" and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return (f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads in the "
            f"driver{gpu}")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def spread(values: Sequence[float]) -> tuple[float, str]:
    """(median, "min-max") of repeated measurements (the spread shows how noisy the machine was)."""
    if not values:
        return float("nan"), "-"
    lo, hi = min(values), max(values)
    return statistics.median(values), f"{cell(lo)}-{cell(hi)}"


def cycle_batches(n: int, batch: int, steps: int, *, seed: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """``steps`` global batches of ``batch`` indices from repeated permutations of ``range(n)``, sliced per
    rank as :func:`trainables.reid.data.epoch_batches` does (so any ``steps`` works on a small dataset)."""
    if batch % world_size:
        raise ValueError(f"--batch {batch} is not divisible by the {world_size} workers")
    rng = np.random.default_rng(seed)
    need = steps * batch
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    share = batch // world_size
    return [order[s * batch + rank * share: s * batch + (rank + 1) * share].tolist() for s in range(steps)]


class Cycle:
    """``steps`` items cycling over a short list (in-memory batches): a loader of any length, no copies."""

    def __init__(self, items: Sequence[Any], steps: int) -> None:
        self.items, self.steps = items, steps

    def __iter__(self) -> Iterator[Any]:
        return (self.items[s % len(self.items)] for s in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def synthetic_dataset(root: str | Path | None, *, ids: int, images_per_id: int,
                      size: tuple[int, int] = (128, 64)) -> Path:
    """A synthetic Market-format dataset (JPEG, Market's 128x64 by default), drawn once and then reused."""
    from datasets.synthetic import generate

    if root is None:
        root = DEFAULT_CACHE / f"synthetic-{ids}x{images_per_id}-{size[0]}x{size[1]}"
    root = Path(root).expanduser().resolve()
    generate(root, ids=ids, images_per_id=images_per_id, distractors=4, junk=2, size=tuple(size),
             test_ids=2, seed=0)
    return root


# ------------------------------------------------------------------------------------------ timing

def timed(fn: Callable[[], int], device: torch.device | str) -> tuple[int, float]:
    """(fn's image count, seconds), with the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    n = fn()
    synchronize(device)
    return n, time.perf_counter() - t0


def slowest_rank(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (one all-reduce) when a process group is up, else ``seconds``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """Turn cudnn autotuning on inside the block, then restore the previous setting."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# ------------------------------------------------------------------------------------------ settings (bench.train)

SYNTHETIC_BATCHES = 4  # distinct in-memory batches, cycled


@dataclass(frozen=True)
class Bench:
    """Everything a variant needs (also shipped to the Ray workers)."""

    backbone: str = "resnet50"
    size: tuple[int, int] = (256, 128)
    batch: int = 64
    steps: int = 20
    warmup: int = 3
    repeats: int = 3
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    data: str = "synthetic"
    loader_workers: int = 0
    method: str = BASELINE
    gen_share: float = 0.25  # share of each synthetic batch marked generated (label methods other than baseline)
    classes: int = 751  # Market-1501's training ids (synthetic data)
    data_root: str | None = None
    plain_in_memory: bool = False  # the plain loop reads in-memory tensors whatever ``data`` is (end-to-end ratio)
    gan_size: tuple[int, int] = (64, 32)
    gan_width: int = 64
    gan_batch: int = 64
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


@dataclass
class Measured:
    rates: list[float]  # images/s of each timed epoch (all workers)
    seconds: list[float]  # time inside every epoch, warm-up included
    threads: int  # torch threads per worker
    world: int = 1  # workers
    wall: float = 0.0


def bench_config(b: Bench) -> Config:
    """The project config these settings correspond to (what ``_build`` / ``gan_loop`` read)."""
    from orchestrator.config import Config, replace

    return replace(Config(), **{
        "reid.backbone": b.backbone, "reid.image_size": list(b.size), "reid.batch_size": b.batch,
        "reid.amp": b.amp, "reid.channels_last": b.channels_last, "reid.use_gpu": b.cuda, "reid.num_workers": 0,
        "reid.loader_workers": b.loader_workers, "labels.method": b.method, "gan.image_size": list(b.gan_size),
        "gan.g_width": b.gan_width, "gan.d_width": b.gan_width, "gan.batch_size": b.gan_batch, "gan.use_gpu": b.cuda})


# ------------------------------------------------------------------------------------------ data

@functools.lru_cache(maxsize=1)
def _split(root: str):
    from datasets.market1501 import load

    return load(root)


def num_classes(b: Bench) -> int:
    return _split(b.data_root).num_train_ids if b.data != "synthetic" else b.classes


@functools.lru_cache(maxsize=4)
def _reid_loader(b: Bench, rank: int, world: int):
    """One persistent loader, as ``reid_loop`` builds it: over the decoded cache (``DEFAULT_CACHE/decoded``) for
    ``data=cache``, over the JPEG files (decoded on every read) for ``data=images``."""
    from datasets.decoded_cache import image_rows
    from trainables.reid.data import train_loader

    train = _split(b.data_root).train
    cache = DEFAULT_CACHE / "decoded" if b.data == "cache" else None
    rows = image_rows(train, b.size, cache, workers=b.loader_workers)
    device = torch.device(b.device if b.device == "cpu" else f"cuda:{rank}")
    return train_loader(train, rows, b.size, device=device, workers=b.loader_workers)


@functools.lru_cache(maxsize=4)
def _tensors(b: Bench, what: str, rank: int, world: int) -> list[dict]:
    """In-memory batches of this rank (pinned on CUDA): re-ID dicts as the training loader yields them (images
    normalised), or DCGAN batches as its loader yields them (uint8 rows)."""
    g = torch_generator(Stream.BENCH, b.seed, rank)
    local = (b.batch if what == "reid" else b.gan_batch) // world
    idx = torch.arange(local)
    n_gen = round(local * b.gen_share) if method(b.method).generated else 0
    out = []
    for _ in range(SYNTHETIC_BATCHES):
        if what == "gan":
            img = torch.randint(0, 256, (local, *b.gan_size, 3), generator=g, dtype=torch.uint8)
            out.append({"img": img.pin_memory() if b.cuda else img})
            continue
        img = torch.randn(local, 3, *b.size, generator=g)
        out.append({"img": img.pin_memory() if b.cuda else img,
                    "label": torch.randint(0, num_classes(b), (local,), generator=g),
                    "generated": idx < n_gen, "gen_row": torch.where(idx < n_gen, idx, -1)})
    return out


def epoch_data(b: Bench, what: str, steps: int, epoch: int, rank: int = 0, world: int = 1) -> Iterable[dict]:
    """One epoch of ``steps`` batches for this rank: cycled tensors (``synthetic``), or the run's persistent loader
    over the decoded cache (``cache``) or the JPEG files decoded on every read (``images``), augmented on the
    device; DCGAN batches are uint8 rows of the cache or the files."""
    if b.data == "synthetic":
        return Cycle(_tensors(b, what, rank, world), steps)
    from torch.utils.data import DataLoader

    from datasets.decoded_cache import DecodedDataset, as_batch, image_rows
    from trainables.reid.data import ListBatchSampler

    train = _split(b.data_root).train
    batches = cycle_batches(len(train), b.batch if what == "reid" else b.gan_batch, steps,
                            seed=derive_seed(Stream.BENCH_BATCHES, b.seed, epoch), rank=rank, world_size=world)
    if what == "reid":
        return _reid_loader(b, rank, world).epoch(batches, derive_seed(Stream.REID_AUGMENT, b.seed, rank, epoch))
    rows = image_rows(train, b.gan_size, DEFAULT_CACHE / "decoded" if b.data == "cache" else None)
    return DataLoader(DecodedDataset(train, rows), batch_sampler=ListBatchSampler(batches),
                      num_workers=b.loader_workers, pin_memory=b.cuda, collate_fn=as_batch)


# ------------------------------------------------------------------------------------------ epochs

EpochFn = Callable[[int, int], "tuple[int, float]"]  # (steps, epoch) -> (this rank's images, seconds)


def run_epochs(b: Bench, run_epoch: EpochFn, world: int = 1, before: EpochFn | None = None) -> Measured:
    """A warm-up epoch, then ``repeats`` timed ones; ``before`` runs ahead of each (the interleaved plain loop)."""
    rates, seconds = [], []
    for epoch in range(1 + b.repeats):
        steps = b.warmup if epoch == 0 else b.steps
        if steps == 0:
            continue
        if before is not None:
            before(steps, epoch)
        images, secs = run_epoch(steps, epoch)
        secs = slowest_rank(secs)
        seconds.append(secs)
        if epoch:
            rates.append(images * world / secs)
    return Measured(rates, seconds, torch.get_num_threads(), world)


def maybe_compile(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    return torch.compile(model) if on else model
