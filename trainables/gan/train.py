"""DCGAN training: data-parallel on the re-ID training images, with checkpoints, sample grids and the export.

``gan_loop`` is the per-worker loop run by :func:`trainables.runtime.fit` (a Ray Train worker group, or
in this process for a run spec with 0 workers). Every global batch is the same whatever the number of workers: the
epoch's permutation depends on ``(seed, epoch)`` only and each global batch is cut into ``world_size`` equal
parts. Per-epoch random state (latents, flips) is reseeded from ``(seed, rank, epoch)``, so a resumed run
continues exactly as an uninterrupted one. :func:`train_gan` runs it and exports ``generator.pt``;
:func:`trainables.gan.sample.generate` samples the generated-image store from that file. It reads the ``gan``
config section only; the command line lives with the presets: ``python -m orchestrator.train gan --help``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler
from torchvision.utils import save_image

from datasets.decoded_cache import DecodedDataset, as_batch, image_rows
from datasets.market1501 import load as load_split
from trainables import runtime
from trainables.config import GanConfig, build, to_dict
from trainables.gan.nets import Discriminator, build_generator, d_loss, g_loss, sample_latent
from trainables.gan.sample import GENERATOR_FILE, export_generator, read_export
from trainables.modes import eval_mode
from trainables.seeding import STREAMS, Stream, check_streams, seed_everything, torch_generator, validation_split

ARCH_FIELDS = ("image_size", "latent_dim", "g_width", "d_width", "arch")  # a checkpoint must match these to resume
RESULT_FIELDS = ("image_size", "latent_dim", "g_width", "d_width", "arch", "epochs", "batch_size", "lr", "beta1",
                 "beta2", "g_steps", "max_steps", "seed")  # what the generator depends on (not workers, GPU, rendering)
SAMPLES_FILE = "samples.png"
GRID = 8  # the fixed-noise sample grid is GRID x GRID
GPU_LOADER_WORKERS = 4  # DataLoader processes per worker on GPU; CPU workers decode in-process


class GlobalBatchSampler(Sampler[int]):
    """This rank's indices for one epoch (call ``set_epoch``): the epoch's permutation (``Stream.GAN_ORDER``), cut
    into full global batches of ``batch_size``, of which this rank takes part ``rank`` of ``world_size``."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.local = batch_size // world_size
        self.steps = n // batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.local

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch_generator(Stream.GAN_ORDER, self.seed, self.epoch))
        order = order[: self.steps * self.batch_size].view(self.steps, self.world_size, self.local)
        return iter(order[:, self.rank].reshape(-1).tolist())


# ------------------------------------------------------------------------------------- one step / epoch

def train_step(G: torch.nn.Module, D: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
               real: torch.Tensor, latent_dim: int, g_steps: int = 1) -> torch.Tensor:
    """One DCGAN update: D, then ``g_steps`` G updates with the non-saturating loss on the same latents (the
    reference runs ``g_optim`` twice per batch, each on a fresh G(z)). Returns [loss_d, loss_g (the last G
    update's), D(x), D(G(z))]."""
    z = sample_latent(real.shape[0], latent_dim, device=real.device)
    fake = G(z)  # [B, 3, H, W]
    opt_d.zero_grad(set_to_none=True)
    loss_d, logit_real, logit_fake = d_loss(D, real, fake)  # logits [B] each
    loss_d.backward()
    opt_d.step()
    for k in range(g_steps):
        if k:
            fake = G(z)  # the updated G on the same latents
        opt_g.zero_grad(set_to_none=True)
        with _no_sync(D):  # D's gradients from the G step are discarded: skip their all-reduce
            loss_g = g_loss(D, fake)
            loss_g.backward()
        opt_g.step()
    return torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(logit_real.detach()).mean(),
                        torch.sigmoid(logit_fake.detach()).mean()])


def _no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def train_epoch(G: torch.nn.Module, D: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                loader: DataLoader, latent_dim: int, device: torch.device, epoch: int,
                max_steps: int | None = None, g_steps: int = 1) -> tuple[torch.Tensor, int]:
    """Sums of [loss_d, loss_g, D(x), D(G(z))] over the epoch's steps (at most ``max_steps``), and their number."""
    sums, steps = torch.zeros(4, dtype=torch.float64), 0
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:  # every rank stops at the same step (equal shards)
            break
        vals = train_step(G, D, opt_g, opt_d, gan_images(batch["img"], device), latent_dim, g_steps).cpu()
        if not torch.isfinite(vals).all():
            raise FloatingPointError(f"DCGAN loss is not finite at epoch {epoch}, step {step}: "
                                     f"loss_d={vals[0].item()}, loss_g={vals[1].item()}")
        sums += vals.double()
        steps += 1
    return sums, steps


# ------------------------------------------------------------------------------------- the worker loop

def gan_loop(config: dict) -> dict[str, Any]:
    """Per-worker DCGAN training; ``config = {"gan": to_dict(gan), "data_root": str, "val_ids": int}``. Returns rank
    0's result."""
    gan, ctx = build(GanConfig, config["gan"], "gan."), runtime.context()
    seed_everything(Stream.GAN_INIT, gan.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    G = build_generator(gan.arch, gan.latent_dim, gan.image_size, gan.g_width)
    D = Discriminator(gan.image_size, gan.d_width)
    state = runtime.load_state()
    if state is not None:
        _check_resumable(state, gan)
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    G, D = runtime.wrap_model(G), runtime.wrap_model(D)
    opt_g = torch.optim.Adam(G.parameters(), lr=gan.lr, betas=(gan.beta1, gan.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=gan.lr, betas=(gan.beta1, gan.beta2))
    if state is not None:
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
    loader = _loader(config["data_root"], gan, ctx, config.get("cache_dir"), config.get("val_ids", 0))
    fixed_z = sample_latent(GRID * GRID, gan.latent_dim, torch_generator(Stream.GAN_FIXED_Z, gan.seed), ctx.device)
    start = 0 if state is None else state["epoch"] + 1
    previous = (state or {}).get("metrics", {})  # returned as is when there is nothing left to train
    result = {"epoch": start - 1, **{k: previous.get(k, float("nan")) for k in ("loss_d", "loss_g")}}
    for epoch in range(start, gan.epochs):
        seed_everything(Stream.GAN_EPOCH, gan.seed, ctx.rank, epoch)  # latents, flips: (seed, rank, epoch) only
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        sums, steps = train_epoch(G, D, opt_g, opt_d, loader, gan.latent_dim, ctx.device, epoch, gan.max_steps,
                                  gan.g_steps)
        metrics = _epoch_metrics(sums, steps, time.perf_counter() - t0, gan.batch_size, ctx)
        metrics["epoch"] = epoch
        _log_epoch(ctx.rank, gan.epochs, metrics)
        _report(metrics, G, D, opt_g, opt_d, gan, fixed_z, ctx.rank)
        result = {k: metrics[k] for k in ("epoch", "loss_d", "loss_g")}
    return result


def _check_resumable(state: dict, gan: GanConfig) -> None:
    check_streams(state, "DCGAN")
    saved, want = state["gan_config"], to_dict(gan)
    for key in ARCH_FIELDS:
        if saved[key] != want[key]:
            raise ValueError(f"the checkpoint to resume was trained with gan.{key}={saved[key]!r}, the config has "
                             f"{getattr(gan, key)!r}; use another run name (or storage path) for this config")


def training_images(data_root: str | Path, val_ids: int = 0) -> tuple:
    """The images the DCGAN trains on: the training split without the ``val_ids`` identities the re-ID runs hold out
    for validation (the same draw as ``trainables.reid.loop.load_run_data``), so the pool cannot carry them."""
    return validation_split(load_split(data_root), val_ids)[0].train


def _loader(data_root: str, gan: GanConfig, ctx: runtime.Context, cache_dir: str | None,
            val_ids: int = 0) -> DataLoader:
    """Batches of the training images (:func:`training_images`) as uint8 [B, H, W, 3] rows at ``gan.image_size``:
    from the decoded cache (``cache_dir``: each image decoded and resized once, no file opened per epoch), or decoded
    from their files on every read when ``cache_dir`` is None."""
    train = training_images(data_root, val_ids)
    if len(train) < gan.batch_size:
        raise ValueError(f"gan.batch_size={gan.batch_size} exceeds the {len(train)} training images of {data_root}")
    sampler = GlobalBatchSampler(len(train), gan.batch_size, ctx.rank, ctx.world_size, gan.seed)
    cuda = ctx.device.type == "cuda"
    workers = GPU_LOADER_WORKERS if cuda else 0
    torch.backends.cudnn.benchmark = cuda  # fixed input sizes
    dataset = DecodedDataset(train, image_rows(train, gan.image_size, cache_dir))
    return DataLoader(dataset, batch_size=sampler.local, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=cuda, persistent_workers=workers > 0, collate_fn=as_batch)


def gan_images(img: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as the DCGAN's input: uint8 rows [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] on ``device``, each
    image flipped with probability 1/2 (torch's global RNG, reseeded per epoch)."""
    img = img.to(device, non_blocking=True)
    x = img.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    flip = (torch.rand(len(x)) < 0.5).to(device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _epoch_metrics(sums: torch.Tensor, steps: int, seconds: float, batch_size: int,
                   ctx: runtime.Context) -> dict[str, float]:
    """Means over steps and ranks (one all-reduce when there are several workers)."""
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        t = sums.to(ctx.device)
        torch.distributed.all_reduce(t)
        sums = t.cpu() / ctx.world_size
    m = (sums / max(steps, 1)).tolist()
    return {"loss_d": m[0], "loss_g": m[1], "d_real": m[2], "d_fake": m[3],
            "images_per_s": steps * batch_size / max(seconds, 1e-9)}


def _report(metrics: dict, G: torch.nn.Module, D: torch.nn.Module, opt_g: torch.optim.Optimizer,
            opt_d: torch.optim.Optimizer, gan: GanConfig, fixed_z: torch.Tensor, rank: int) -> None:
    """Every rank reports; rank 0 adds the checkpoint state and the fixed-noise sample grid."""
    if rank != 0:
        runtime.report(metrics)
        return
    g, d = runtime.unwrap(G), runtime.unwrap(D)
    state = {"epoch": metrics["epoch"], "G": g.state_dict(), "D": d.state_dict(), "opt_g": opt_g.state_dict(),
             "opt_d": opt_d.state_dict(), "gan_config": to_dict(gan), "metrics": dict(metrics), "streams": STREAMS}
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / SAMPLES_FILE
        save_sample_grid(g, fixed_z, grid)
        runtime.report(metrics, state=state, files={SAMPLES_FILE: grid})


def save_sample_grid(G: torch.nn.Module, z: torch.Tensor, path: str | Path) -> Path:
    """An 8x8 PNG of G(z) in eval mode (as the generation stage samples); restores G's mode."""
    with eval_mode(G):
        images = G(z)  # [64, 3, H, W] in [-1, 1]
    save_image(images, str(path), nrow=GRID, normalize=True, value_range=(-1, 1), padding=2)
    return Path(path)


def _log_epoch(rank: int, epochs: int, m: dict) -> None:
    if rank == 0:
        print(f"[gan] epoch {m['epoch'] + 1}/{epochs}  loss_d {m['loss_d']:.4f}  loss_g {m['loss_g']:.4f}  "
              f"D(x) {m['d_real']:.3f}  D(G(z)) {m['d_fake']:.3f}  {m['images_per_s']:.1f} img/s", flush=True)


# ------------------------------------------------------------------------------------- driver

def train_gan(gan: GanConfig, data_root: str | Path, run_dir_parent: str | Path, name: str, *,
              num_workers: int | None = None, report_to_tune: bool = False, max_failures: int = 1,
              cache_dir: str | Path | None = None, val_ids: int = 0) -> Path:
    """Train (or resume) the DCGAN run ``<run_dir_parent>/<name>`` and export ``generator.pt`` there.

    ``num_workers``: Ray Train workers (0: in this process; default ``gan.num_workers``). The training images are
    read from the decoded-image cache ``cache_dir`` (default ``<run_dir_parent>/decoded``; images it lacks are
    decoded into it first). ``val_ids``: the re-ID runs' held-out identities (``reid.val_ids``), never trained on.
    An existing export that records ``gan.epochs`` epochs is returned without training.
    """
    parent = Path(run_dir_parent).expanduser().resolve()
    run_dir, out = parent / name, parent / name / GENERATOR_FILE
    if out.is_file() and read_export(out)["epochs"] == gan.epochs:
        return out
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    workers = gan.num_workers if num_workers is None else num_workers
    spec = runtime.RunSpec(name=name, storage_path=str(parent), num_workers=workers, use_gpu=gan.use_gpu,
                           max_failures=max_failures if workers else 0, report_to_tune=report_to_tune)
    cache = str(Path(cache_dir) if cache_dir else parent / "decoded")
    runtime.fit(gan_loop, {"gan": to_dict(gan), "data_root": str(root), "cache_dir": cache, "val_ids": val_ids}, spec)
    ckpt = runtime.latest_checkpoint(run_dir)
    if ckpt is None:
        raise RuntimeError(f"GAN run {run_dir} finished without a checkpoint")
    state = torch.load(ckpt / runtime.STATE_FILE, map_location="cpu", weights_only=True)
    if state["epoch"] + 1 != gan.epochs:
        raise ValueError(f"GAN run {run_dir} holds a checkpoint after {state['epoch'] + 1} epochs but gan.epochs="
                         f"{gan.epochs}; use another run name for fewer epochs")
    return export_generator(state, out)


def sample_grid_path(run_dir: str | Path) -> Path | None:
    """The latest checkpoint's sample grid of a GAN run, or None."""
    ckpt = runtime.latest_checkpoint(run_dir)
    grid = None if ckpt is None else ckpt / SAMPLES_FILE
    return grid if grid is not None and grid.is_file() else None
