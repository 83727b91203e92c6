"""Training throughput: our re-ID and DCGAN loops vs a plain PyTorch loop on the same model, data and batch.

Rows, per loop (``reid``: ``trainables.reid.engine.train_one_epoch`` on the model/optimizer of
``trainables.reid.loop.build_training``; ``gan``: ``trainables.gan.train.train_epoch`` on the models/optimizers
``gan_loop`` builds):

* ``plain``: model + optimizer + loss in a bare loop in this process (re-ID: SGD + ``soft_cross_entropy`` on
  one-hot targets; DCGAN: the D then G step), no per-step host syncs, cudnn.benchmark on CUDA;
* ``ours``: our epoch function run through ``trainables.runtime.fit`` with ``num_workers=0`` (in this process:
  what the sweep runs for single-worker trials), and with ``--ray`` on a Ray Train worker group of 1 and 2
  workers (gloo on CPU, NCCL on GPU; 2 GPU workers need 2 GPUs).

Every variant runs a warm-up epoch (``--warmup`` steps: cudnn autotuning, torch.compile) and then ``--repeats``
timed epochs of ``--steps`` steps; img/s is the median over the timed epochs (global over workers, measured
inside the loop), wall_s the whole variant including Ray start-up, setup_s = wall_s - time inside epochs.
The plain loop and ours in-process run interleaved, epoch by epoch (A B A B ...), so that drift and other load
on the machine hit both alike; their ratio (the median of the epoch pairs' ratios) is the number to watch.
``--data synthetic`` feeds in-memory tensors (pure compute); ``--data images`` decodes the JPEGs of a synthetic
Market-format dataset on every read (in the loader workers) and ``--data cache`` reads them from the decoded-image
cache, both through the training run's persistent loader with device augmentation (end to end);
``--plain-in-memory`` keeps the plain loop on in-memory tensors, so ours/plain is end to end vs in memory. The GPU
target (H100, ResNet-50, 256x128):

    python -m bench.train --what reid --backbone resnet50 --size 256 128 --batch 128 --device cuda --amp \
        --channels-last --data synthetic --steps 50 --warmup 10 --repeats 5 --ray
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.common import (
    Bench,
    Measured,
    bench_config,
    cudnn_benchmark,
    epoch_data,
    format_table,
    machine,
    maybe_compile,
    num_classes,
    reproduce,
    run_epochs,
    spread,
    synthetic_dataset,
    timed,
)
from orchestrator.config import from_dict, to_dict
from trainables import runtime
from trainables.gan.train import gan_images
from trainables.methods import BASELINE, LABEL_METHODS, method
from trainables.reid import loop as reid_module
from trainables.reid.engine import ident_step, train_one_epoch
from trainables.seeding import Stream, seed_everything

TARGET_RATIO = 0.95
H100_TARGET = 2000.0  # images/s, ResNet-50 at 256x128


# ------------------------------------------------------------------------------------------ re-ID

class PlainReid:
    """Bare loop: the network and SGD groups of ``reid.build_training``, one-hot targets, no per-step host syncs."""

    def __init__(self, b: Bench) -> None:
        from trainables.reid.labels import num_outputs

        cfg, self.b, self.device = bench_config(b), b, torch.device(b.device)
        r, self.cl, self.amp = cfg.reid, b.cuda and b.channels_last, b.cuda and b.amp
        seed_everything(Stream.REID_INIT, b.seed, 0)  # as reid_loop
        self.classes = num_outputs(reid_module.label_spec(cfg.reid, cfg.labels, num_classes(b)))
        model = reid_module.build_model(r, self.classes, device_type=self.device.type).to(self.device)
        wd = reid_module.weight_decay(cfg.reid, cfg.labels)
        groups = model.param_groups(r.lr, new_lr_mult=r.new_lr_mult, weight_decay=wd)
        self.opt = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov)
        self.model = maybe_compile(model, b.compile)

    def epoch(self, steps: int, epoch: int) -> tuple[int, float]:
        with cudnn_benchmark(self.b.cuda):
            return timed(lambda: self._epoch(steps, epoch), self.device)

    def _epoch(self, steps: int, epoch: int) -> int:
        from trainables.reid.labels import soft_cross_entropy

        self.model.train()
        n = 0
        for batch in epoch_data(self.b, "reid", steps, epoch):
            x = batch["img"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            if self.cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(x)  # [B, C]
            loss = soft_cross_entropy(logits, F.one_hot(y, self.classes).float())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            n += len(y)
        return n


def reid_worker(config: dict) -> dict:
    """Per-worker loop: ``reid.build_training`` (model, SGD, DDP wrap) + ``train_one_epoch``, as ``reid_loop``
    runs them."""
    b, cfg, ctx = Bench(**config["bench"]), from_dict(config["cfg"]), runtime.context()
    seed_everything(Stream.REID_INIT, b.seed, ctx.rank)  # as reid_loop
    spec = reid_module.label_spec(cfg.reid, cfg.labels, num_classes(b))
    wd = reid_module.weight_decay(cfg.reid, cfg.labels)
    model, optimizer, _ = reid_module.build_training(cfg.reid, spec, wd, ctx)
    model = maybe_compile(model, b.compile)
    cuda = ctx.device.type == "cuda"  # as reid_loop
    amp, channels_last = cfg.reid.amp and cuda, cfg.reid.channels_last and cuda
    step_fn = ident_step(spec, None, lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp))

    def epoch(steps: int, e: int) -> tuple[int, float]:
        data = epoch_data(b, "reid", steps, e, ctx.rank, ctx.world_size)
        m = train_one_epoch(model, data, optimizer, step_fn, epoch=e, device=ctx.device,
                            channels_last=channels_last)
        runtime.report({"epoch": e, **m})
        return m["images"], m["epoch_time_s"]

    return asdict(run_epochs(b, epoch, ctx.world_size, config.get("before")))


# ------------------------------------------------------------------------------------------ DCGAN

def _gan_setup(b: Bench, wrap: Callable[[torch.nn.Module], torch.nn.Module]):
    """G, D and their Adam optimizers as ``gan_loop`` builds them (compiled with ``--compile``)."""
    from trainables.gan.nets import Discriminator, Generator

    gan = bench_config(b).gan
    seed_everything(Stream.GAN_INIT, gan.seed)  # as gan_loop
    G = wrap(Generator(gan.latent_dim, gan.image_size, gan.g_width))
    D = wrap(Discriminator(gan.image_size, gan.d_width))
    opt_g = torch.optim.Adam(G.parameters(), lr=gan.lr, betas=(gan.beta1, gan.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=gan.lr, betas=(gan.beta1, gan.beta2))
    return maybe_compile(G, b.compile), maybe_compile(D, b.compile), opt_g, opt_d, gan.latent_dim


class PlainGan:
    """Bare D-then-G DCGAN step (non-saturating G loss), no per-step syncs; optionally bf16 / channels_last."""

    def __init__(self, b: Bench, *, amp: bool = False, channels_last: bool = False) -> None:
        self.b, self.device, self.amp = b, torch.device(b.device), amp
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.G, self.D, self.opt_g, self.opt_d, self.latent = _gan_setup(
            b, lambda m: m.to(self.device, memory_format=self.fmt))

    def epoch(self, steps: int, epoch: int) -> tuple[int, float]:
        with cudnn_benchmark(self.b.cuda):
            return timed(lambda: self._epoch(steps, epoch), self.device)

    def _epoch(self, steps: int, epoch: int) -> int:
        G, D, bce, n = self.G, self.D, F.binary_cross_entropy_with_logits, 0
        for batch in epoch_data(self.b, "gan", steps, epoch):
            real = gan_images(batch["img"], self.device).contiguous(memory_format=self.fmt)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                fake = G(torch.rand(real.shape[0], self.latent, device=self.device) * 2 - 1)
                lr, lf = D(real).float(), D(fake.detach()).float()
                loss_d = bce(lr, torch.ones_like(lr)) + bce(lf, torch.zeros_like(lf))
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                lg = D(fake).float()
                loss_g = bce(lg, torch.ones_like(lg))
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.opt_g.step()
            n += real.shape[0]
        return n


def gan_worker(config: dict) -> dict:
    """Per-worker loop: the models/optimizers of ``gan_loop`` + ``gan.train.train_epoch``, timed as gan_loop does."""
    from trainables.gan.train import train_epoch

    b, ctx = Bench(**config["bench"]), runtime.context()
    G, D, opt_g, opt_d, latent = _gan_setup(b, runtime.wrap_model)
    local = b.gan_batch // ctx.world_size

    def epoch(steps: int, e: int) -> tuple[int, float]:
        data = epoch_data(b, "gan", steps, e, ctx.rank, ctx.world_size)
        t0 = time.perf_counter()
        sums, n = train_epoch(G, D, opt_g, opt_d, data, latent, ctx.device, e)
        secs = time.perf_counter() - t0
        runtime.report({"epoch": e, "loss_d": float(sums[0]) / max(n, 1), "epoch_time_s": secs})
        return n * local, secs

    with cudnn_benchmark(ctx.device.type == "cuda"):  # gan.train._loader turns it on (here undone afterwards)
        return asdict(run_epochs(b, epoch, ctx.world_size, config.get("before")))


# ------------------------------------------------------------------------------------------ driver

class Paired:
    """Plain runners whose epochs run right before each epoch of ours in the same process (A B A B ...)."""

    def __init__(self, runners: dict[str, Any], setup_s: float) -> None:
        self.runners, self.setup_s = runners, setup_s
        self.results: dict[str, list[tuple[int, int, float]]] = {name: [] for name in runners}

    def __call__(self, steps: int, epoch: int) -> tuple[int, float]:
        for name, runner in self.runners.items():
            self.results[name].append((epoch, *runner.epoch(steps, epoch)))
        return 0, 0.0

    @property
    def spent(self) -> float:
        """Seconds inside the plain epochs so far (to take out of the interleaved run's wall time)."""
        return sum(s for done in self.results.values() for _, _, s in done)

    def measured(self, name: str) -> Measured:
        done = self.results[name]
        m = Measured([n / s for e, n, s in done if e > 0], [s for _, _, s in done], torch.get_num_threads())
        m.wall = self.setup_s + sum(m.seconds)
        return m


def plain_runners(b: Bench, what: str) -> Paired:
    t0 = time.perf_counter()
    if b.plain_in_memory:  # ours through the data path vs plain on in-memory tensors (the same classes)
        b = replace(b, data="synthetic", classes=num_classes(b))
    runners: dict[str, Any] = {"plain": PlainReid(b) if what == "reid" else PlainGan(b)}
    if what == "gan" and b.cuda and (b.amp or b.channels_last):  # headroom: gan_loop has no AMP / channels_last
        runners["plain+amp/cl"] = PlainGan(b, amp=b.amp, channels_last=b.channels_last)
    return Paired(runners, time.perf_counter() - t0)


def ours(b: Bench, what: str, workers: int, storage: str, before: Paired | None = None) -> Measured:
    """Our loop through ``runtime.fit``: in this process (0 workers) or on a Ray Train worker group."""
    loop = reid_worker if what == "reid" else gan_worker
    spec = runtime.RunSpec(name=f"bench-{what}-w{workers}", storage_path=storage, num_workers=workers,
                           use_gpu=b.cuda)
    config = {"bench": asdict(b), "cfg": to_dict(bench_config(b))}
    if before is not None:
        config["before"] = before  # in-process only: interleave the plain loop's epochs
    t0 = time.perf_counter()
    m = Measured(**runtime.fit(loop, config, spec))
    m.wall = time.perf_counter() - t0 - (before.spent if before else 0.0)
    return m


def start_ray() -> float:
    """Start a local Ray (enough CPUs for 2 workers); returns the seconds it took."""
    import ray

    from orchestrator.cluster import start_local_ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        start_local_ray(max(2, os.cpu_count() or 1))
    return time.perf_counter() - t0


def measure(b: Bench, whats: list[str], ray_workers: tuple[int, ...]) -> tuple[list[list], dict[str, float]]:
    """Every variant of every loop: table rows, and the in-process ours/plain ratio per loop.

    Interleaved rows (plain*, ours in-process) compare epoch by epoch: their ratio is the median of the ratios
    of adjacent epochs; the Ray rows are compared with the plain median.
    """
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="mprl-bench-train-") as storage:
        for what in whats:
            paired = plain_runners(b, what)
            results = {"ours in-process": ours(b, what, 0, storage, before=paired)}
            results = {**{name: paired.measured(name) for name in paired.runners}, **results}
            interleaved = {*paired.runners, "ours in-process"}
            del paired  # free this process's GPU memory before the Ray workers take the GPU
            if b.cuda:
                torch.cuda.empty_cache()
            results.update({f"ours ray {w}w": ours(b, what, w, storage) for w in ray_workers})
            plain = results["plain"].rates
            for name, m in results.items():
                rate, lo_hi = spread(m.rates)
                paired_run = name != "plain" and name in interleaved
                ratio = spread([o / p for o, p in zip(m.rates, plain)])[0] if paired_run else rate / spread(plain)[0]
                rows.append([what, name, f"{m.world}x{m.threads}", rate, lo_hi, ratio, m.wall - sum(m.seconds),
                             m.wall])
                if name == "ours in-process":
                    ratios[what] = ratio
    return rows, ratios


def describe(b: Bench, whats: list[str]) -> list[str]:
    lines = [machine(b.device)]
    data = f"data {b.data}" + (f" ({b.data_root}, {b.loader_workers} loader workers)" if b.data != "synthetic" else "")
    if "reid" in whats:
        lines.append(f"reid: {b.backbone} {b.size[0]}x{b.size[1]}, batch {b.batch}, {b.method}, {data}")
    if "gan" in whats:
        lines.append(f"dcgan: {b.gan_size[0]}x{b.gan_size[1]}, width {b.gan_width}, batch {b.gan_batch}, {data}")
    flags = [f for f, on in (("amp", b.amp), ("channels_last", b.channels_last), ("compile", b.compile)) if on]
    ignored = " (amp/channels_last: CUDA only, as in reid_loop)" if not b.cuda and (b.amp or b.channels_last) else ""
    lines.append(f"device {b.device}, flags {','.join(flags) or 'none'}{ignored}; warm-up {b.warmup} steps, then "
                 f"{b.repeats} x {b.steps} timed steps (img/s: median, min-max; plain and ours in-process "
                 f"interleaved, their ratio = median of epoch-pair ratios)")
    return lines


def verdicts(b: Bench, rows: list[list], ratios: dict[str, float]) -> list[str]:
    out = [f"ours/plain in-process, {what}: {r:.3f} ({'ok' if r >= TARGET_RATIO else 'BELOW'} target >= "
           f"{TARGET_RATIO})" for what, r in ratios.items()]
    if b.cuda and b.backbone == "resnet50" and tuple(b.size) == (256, 128) and "reid" in ratios:
        best = max(r[3] for r in rows if r[0] == "reid" and r[1].startswith("ours"))
        out.append(f"ResNet-50 256x128, ours: {best:.0f} img/s ({'ok' if best >= H100_TARGET else 'BELOW'} "
                   f"H100 target >= {H100_TARGET:.0f})")
    return out


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Bench]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", nargs="+", choices=("reid", "gan"), default=["reid", "gan"])
    p.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50"), default="resnet50")
    p.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=64, help="global re-ID batch (split over workers)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--warmup", type=int, default=3, help="steps of the untimed first epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per variant")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (plain and ours)")
    p.add_argument("--data", choices=("synthetic", "images", "cache"), default="synthetic")
    p.add_argument("--plain-in-memory", action="store_true",
                   help="the plain loop reads in-memory tensors: ours/plain is end to end vs in memory")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes (--data images)")
    p.add_argument("--root", help="Market-format dataset for --data images (default: a cached synthetic one)")
    p.add_argument("--ids", type=int, default=64, help="training ids of that synthetic dataset (16 images each)")
    p.add_argument("--method", default=BASELINE, help="label method (synthetic data)",
                   choices=[m for m in LABEL_METHODS if not (method(m).static_ranks or method(m).real_repeats)])
    p.add_argument("--gen-share", type=float, default=0.25, help="generated share of a synthetic batch")
    p.add_argument("--gan-size", type=int, nargs=2, default=(64, 32), metavar=("H", "W"))
    p.add_argument("--gan-width", type=int, default=64)
    p.add_argument("--gan-batch", type=int, default=64)
    p.add_argument("--ray", action="store_true", help="also run on Ray Train worker groups of 1 and 2 workers")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if min(a.steps, a.repeats, a.batch, a.gan_batch) < 1 or a.warmup < 0:
        p.error("--steps, --repeats, --batch and --gan-batch must be >= 1, --warmup >= 0")
    if a.ray and (a.batch % 2 or a.gan_batch % 2):
        p.error("--ray runs 2 workers: --batch and --gan-batch must be even")
    root = None
    if a.data in ("images", "cache"):
        root = str(a.root or synthetic_dataset(None, ids=a.ids, images_per_id=16))
    return a, Bench(a.backbone, tuple(a.size), a.batch, a.steps, a.warmup, a.repeats, a.device, a.amp,
                    a.channels_last, a.compile, a.data, a.loader_workers, a.method, a.gen_share, data_root=root,
                    gan_size=tuple(a.gan_size), gan_width=a.gan_width, gan_batch=a.gan_batch,
                    plain_in_memory=a.plain_in_memory)


def main(argv: list[str] | None = None) -> int:
    args, b = parse_args(argv)
    ray_workers: tuple[int, ...] = ()
    notes = []
    if args.ray:
        ray_workers = tuple(w for w in (1, 2) if not b.cuda or w <= torch.cuda.device_count())
        if len(ray_workers) < 2:
            notes.append(f"ours ray 2w skipped: it needs 2 GPUs, {torch.cuda.device_count()} visible")
        notes.append(f"ray.init: {start_ray():.1f} s (in no row)")
    rows, ratios = measure(b, args.what, ray_workers)
    print("\n".join(describe(b, args.what)))
    print(format_table(("loop", "variant", "procs x thr", "img/s", "min-max", "ours/plain", "setup_s", "wall_s"), rows))
    print("\n".join(verdicts(b, rows, ratios) + notes))
    print(reproduce("bench.train", argv))
    return 0


if __name__ == "__main__":
    # Run the imported module's main: Ray then pickles the worker loops by reference.
    from bench.train import main as _main

    raise SystemExit(_main())
