"""The trained generator as one file, and sampling N images from it into the generated-image store.

``generator.pt`` holds ``{"G": state_dict, "latent_dim", "image_size", "g_width", "epochs", "arch"}``: everything
needed to rebuild the generator (:func:`trainables.gan.nets.build_generator`) without the training run.
:func:`generate` fills a :class:`datasets.generated.GeneratedStore` shard by shard. Shard ``c`` draws its latents
from a CPU ``torch.Generator`` of ``Stream.GENERATION`` at ``(seed, c)``, so the pool is the same whoever renders a
shard, and an interrupted generation is completed by the next call (only ``missing_chunks()`` are rendered). The
store's meta records the generator file's sha256 and the :class:`Rendering`: a store made by another generator or
rendered otherwise is refused, never reused.

How a pool is rendered (``gan.sample_bn``, ``gan.save_stretch``; docs/protocol.md "DCGAN"):

- ``running``: G in eval mode, BatchNorm with its running statistics: an image does not depend on its batch
  (the later standalone DCGAN-tensorflow's ``sampler(train=False)``).
- ``batch``: BatchNorm with the statistics of fixed batches of ``gan.batch_size`` latents (the sampler of
  layumi/Person-reID_GAN@6621e2c, which rendered LSRO's pool, calls its batch norms with ``train=True``); the
  running statistics are neither used nor updated. A shard holds whole batches (its size is a multiple of the
  batch) and a short last batch is filled up with extra latents that are rendered and dropped, so every image is
  normalised with a batch of exactly ``gan.batch_size``: an image depends on its seed, shard and batch only.
- ``save_stretch``: each image byte-scaled to its own min..max (``scipy.misc.imsave`` / ``imresize`` on a float
  array, the reference's ``save_images``) instead of the fixed map [-1, 1] -> [0, 255].

Rendering is done by long-lived workers that load G once: the calling process itself, plus optional Ray actors
(``helpers``, e.g. one per further GPU) that take shards from the same pending list as soon as each is placed
and ready. A busy cluster only means fewer helpers: the caller never waits for an actor that is not running.
Helpers write to ``store_root`` themselves, so on several nodes it must be shared storage.
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from datasets.files import atomic_write_bytes, file_sha256
from datasets.generated import GeneratedStore
from trainables.gan.nets import build_generator, sample_latent
from trainables.placement import process_label
from trainables.seeding import Stream, derive_seed

GENERATOR_FILE = "generator.pt"
EXPORT_KEYS = ("G", "latent_dim", "image_size", "g_width", "epochs")  # + "arch" (absent in older files: ours)
SUB_BATCH = 250  # images per G forward inside a shard in running mode (fixed: results must not depend on the device)


@dataclass(frozen=True)
class Rendering:
    """How a pool is rendered from a generator (see the module docstring); ``batch_size`` matters in batch mode."""

    sample_bn: str = "running"  # running | batch
    batch_size: int = 64
    stretch: bool = False

    @classmethod
    def of(cls, gan: Any) -> "Rendering":
        """The rendering a :class:`trainables.config.GanConfig` asks for."""
        return cls(gan.sample_bn, gan.batch_size, gan.save_stretch)

    def meta(self) -> dict[str, Any]:
        """What the store records (a store rendered otherwise is refused)."""
        bn = {"bn": "batch", "bn_batch": self.batch_size} if self.sample_bn == "batch" else {"bn": "running"}
        return {**bn, "stretch": self.stretch}

    def chunk_size(self, requested: int) -> int:
        """Shards of whole batches in batch mode."""
        if self.sample_bn != "batch":
            return requested
        return self.batch_size * max(1, requested // self.batch_size)
HELPER_QUEUE = 2  # shards handed to one helper at a time: it renders the next while the caller is busy


# ------------------------------------------------------------------------------------- the exported file

def export_generator(state: dict[str, Any], path: str | Path) -> Path:
    """Write the generator of a training checkpoint ``state`` to ``path`` atomically (temp file + rename)."""
    gan = state["gan_config"]
    payload = {"G": state["G"], "latent_dim": int(gan["latent_dim"]), "image_size": [int(s) for s in gan["image_size"]],
               "g_width": int(gan["g_width"]), "epochs": int(state["epoch"]) + 1, "arch": gan.get("arch", "ours")}
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_export(path: str | Path) -> dict[str, Any]:
    """The contents of a ``generator.pt`` (tensors on CPU); FileNotFoundError / ValueError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"generator file {path} cannot be read ({err}); delete it to re-export") from err
    missing = [k for k in EXPORT_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"generator file {path} lacks {missing}; expected keys {list(EXPORT_KEYS)}")
    return data


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the exported generator in eval mode on ``device``."""
    data = read_export(path)
    G = build_generator(data.get("arch", "ours"), data["latent_dim"], tuple(data["image_size"]), data["g_width"])
    G.load_state_dict(data["G"])
    return G.to(device).eval()


# ------------------------------------------------------------------------------------- sampling

def chunk_seed(seed: int, chunk: int) -> int:
    """The latent seed of one chunk: a function of (seed, chunk) only."""
    return derive_seed(Stream.GENERATION, seed, chunk)


def to_uint8(images: torch.Tensor, stretch: bool = False) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]: the fixed map [-1, 1] -> [0, 255], or with ``stretch`` each
    image's own min..max -> 0..255 (scipy's ``bytescale``, which ``imsave`` / ``imresize`` apply to a float image:
    ``(x - min) * 255 / (max - min) + 0.5``, truncated)."""
    if not stretch:
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()
    flat = images.float().flatten(1)  # [B, 3HW]
    lo, hi = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
    scale = 255.0 / (hi - lo).clamp_min(1e-12)  # a constant image maps to 0 (scipy: cscale 0 -> 1)
    x = ((images.float() - lo) * scale + 0.5).clamp(0, 255).floor().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@contextlib.contextmanager
def batch_statistics(G: torch.nn.Module) -> Iterator[None]:
    """G's BatchNorm layers normalise with the statistics of the batch and leave their running statistics alone
    (``track_running_stats`` off in training mode); every other layer and the flags are restored afterwards."""
    norms = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            m.train()
            m.track_running_stats = False
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.train(training)
            m.track_running_stats = tracking


def render_chunk(G: torch.nn.Module, store: GeneratedStore, chunk: int, seed: int,
                 render: Rendering = Rendering()) -> np.ndarray:
    """The images of ``chunk`` (uint8 [B, H, W, 3]); G must be in eval mode."""
    start, stop = store.chunk_range(chunk)
    n = stop - start
    if n == 0:
        return np.zeros((0, *store.info["image_size"], 3), np.uint8)
    device = next(G.parameters()).device
    batch = render.batch_size if render.sample_bn == "batch" else SUB_BATCH
    drawn = -(-n // batch) * batch if render.sample_bn == "batch" else n  # a short last batch is filled up
    z = sample_latent(drawn, G.latent_dim, generator=torch.Generator().manual_seed(chunk_seed(seed, chunk)))
    mode = batch_statistics(G) if render.sample_bn == "batch" else contextlib.nullcontext()
    with torch.inference_mode(), mode:
        out = torch.cat([G(zb.to(device)) for zb in z.split(batch)])[:n]  # [n, 3, H, W]
    return to_uint8(out, render.stretch)


class ShardRenderer:
    """One long-lived rendering worker: loads G once, then renders and writes shards on request.

    The calling process uses one directly; :func:`generate`'s helpers are this class as Ray actors.
    """

    def __init__(self, generator_path: str | Path, store_root: str | Path, seed: int,
                 device: torch.device | str, render: Rendering = Rendering()) -> None:
        self.G = load_generator(generator_path, device)
        self.store = GeneratedStore(store_root)
        self.seed, self.render_as = seed, render
        self.label = process_label()

    def ready(self) -> str:
        return self.label

    def render(self, chunks: Sequence[int]) -> str:
        """Render and write the shards ``chunks``; returns this worker's label."""
        for c in chunks:
            self.store.write_chunk(c, render_chunk(self.G, self.store, c, self.seed, self.render_as))
        return self.label


@dataclass(frozen=True)
class Generated:
    """What :func:`generate` returns: the complete store, and how many shards each worker rendered in this call
    (``"node <ip> (<id>) pid <pid>"`` -> shards; empty when the store was already complete)."""

    store: GeneratedStore
    workers: dict[str, int]

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def n(self) -> int:
        return self.store.n


def generate(generator_path: str | Path, store_root: str | Path, n: int, *, device: torch.device | str,
             seed: int = 0, chunk_size: int = 100, helpers: int = 0,
             helper_resources: dict[str, Any] | None = None, render: Rendering = Rendering()) -> Generated:
    """Fill (or complete) the store at ``store_root`` with ``n`` images of the exported generator.

    The caller renders shards on ``device`` (``trainables.runtime.device_for(gan.use_gpu)``). ``helpers > 0``
    with Ray initialised also starts that many Ray actors with ``ray.remote(**helper_resources)`` (default
    ``{"num_cpus": 1}``; e.g. ``{"num_gpus": 1}``), which share the pending shards; without Ray the caller renders
    everything. Helpers render on the caller's device type (CPU and GPU round differently: the pool must not depend
    on who renders). ``render``: how (:class:`Rendering`; in batch mode the shards hold whole batches).
    """
    if helpers < 0:
        raise ValueError(f"generate(helpers={helpers}) must be >= 0")
    path = Path(generator_path).resolve()
    info = read_export(path)
    meta = {"generator_sha256": file_sha256(path), "seed": seed, "latent": "uniform[-1,1]", **render.meta()}
    store = GeneratedStore.create(store_root, n=n, image_size=tuple(info["image_size"]), meta=meta,
                                  chunk_size=render.chunk_size(chunk_size))
    if store.complete:
        return Generated(store, {})
    device = torch.device(device)
    pending = deque(store.missing_chunks())
    workers: dict[str, int] = {}
    pool = None
    try:
        if helpers and len(pending) > 1 and _ray_initialized():
            pool = _HelperPool(path, store.root, seed, device.type, helpers, helper_resources or {"num_cpus": 1},
                               render)
        _render_all(ShardRenderer(path, store.root, seed, device, render), pending, pool, workers)
    finally:
        if pool is not None:
            pool.close()
    store.finalize()
    return Generated(store, workers)


def _render_all(local: ShardRenderer, pending: deque[int], pool: "_HelperPool | None",
                workers: dict[str, int]) -> None:
    """Render shards in this process until none is pending, handing shards to ready helpers between them."""
    while pending or (pool is not None and pool.busy):
        if pool is not None:
            pool.poll(pending, workers, block=not pending)
        if pending:
            label = local.render([pending.popleft()])
            workers[label] = workers.get(label, 0) + 1


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class _HelperPool:
    """Ray actors rendering shards beside the caller. Only running actors are ever waited on; an actor that
    dies gives its handed-out shards back to the pending list."""

    def __init__(self, path: Path, root: Path, seed: int, device: str, count: int, resources: dict[str, Any],
                 render: Rendering) -> None:
        import ray

        actor_cls = ray.remote(**resources)(ShardRenderer)
        self.actors = [actor_cls.remote(str(path), str(root), seed, device, render) for _ in range(count)]
        self.starting = {a.ready.remote(): a for a in self.actors}  # ready() ref -> actor not yet seen running
        self.queued: dict[Any, int] = {}  # running actor -> shards handed to it and not yet returned
        self.running: dict[Any, tuple[Any, int]] = {}  # render() ref -> (actor, shard)

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def poll(self, pending: deque[int], workers: dict[str, int], *, block: bool) -> None:
        """Collect finished shards and started actors, then hand pending shards to running actors.

        ``block``: wait until a handed-out shard returns (never for an actor still starting).
        """
        import ray

        if block and self.running:
            ray.wait(list(self.running), num_returns=1)
        refs = [*self.starting, *self.running]
        done = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        for ref in done:
            if ref in self.starting:
                self._started(ref)
            else:
                self._returned(ref, pending, workers)
        for actor in self.queued:
            while pending and self.queued[actor] < HELPER_QUEUE:
                chunk = pending.popleft()
                self.running[actor.render.remote([chunk])] = (actor, chunk)
                self.queued[actor] += 1

    def _started(self, ref: Any) -> None:
        import ray

        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as err:
            print(f"[generate] a helper could not start; continuing without it: {err}", flush=True)
            return
        self.queued[actor] = 0

    def _returned(self, ref: Any, pending: deque[int], workers: dict[str, int]) -> None:
        import ray

        actor, chunk = self.running.pop(ref)
        try:
            label = ray.get(ref)  # a Python error in the helper is raised here, as it would be in the caller
        except ray.exceptions.RayActorError as err:
            pending.appendleft(chunk)
            if self.queued.pop(actor, None) is not None:
                print(f"[generate] a helper died; its shards go back to the pending list: {err}", flush=True)
            return
        workers[label] = workers.get(label, 0) + 1
        if actor in self.queued:  # else it was given up for dead (unreachable) and its shard went back
            self.queued[actor] -= 1

    def close(self) -> None:
        """Kill every actor, started or not (their shards are all written or back in the pending list)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
