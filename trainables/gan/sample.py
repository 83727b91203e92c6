"""The trained generator as one file, and sampling N images from it into the generated-image store.

``generator.pt`` holds ``{"G": state_dict, "latent_dim", "image_size", "g_width", "epochs"}``: everything needed
to rebuild :class:`trainables.gan.nets.Generator` without the training run. :func:`generate` fills a
:class:`datasets.generated.GeneratedStore` shard by shard. Shard ``c`` draws its latents from a CPU
``torch.Generator`` of ``Stream.GENERATION`` at ``(seed, c)`` and runs G in eval mode (BatchNorm running
statistics, so an image does not depend on its batch), so the pool is the same whoever renders a shard, and an
interrupted generation is completed by the next call (only ``missing_chunks()`` are rendered). The store's meta
records the generator file's sha256: a store made by another generator is refused, never reused.

Rendering is done by long-lived workers that load G once: the calling process itself, plus optional Ray actors
(``helpers``, e.g. one per further GPU) that take shards from the same pending list as soon as each is placed
and ready. A busy cluster only means fewer helpers: the caller never waits for an actor that is not running.
Helpers write to ``store_root`` themselves, so on several nodes it must be shared storage.
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from datasets.files import atomic_write_bytes, file_sha256
from datasets.generated import GeneratedStore
from trainables.gan.nets import Generator, sample_latent
from trainables.placement import process_label
from trainables.seeding import Stream, derive_seed

GENERATOR_FILE = "generator.pt"
EXPORT_KEYS = ("G", "latent_dim", "image_size", "g_width", "epochs")
SUB_BATCH = 250  # images per G forward inside a shard (fixed: results must not depend on the device)
HELPER_QUEUE = 2  # shards handed to one helper at a time: it renders the next while the caller is busy


# ------------------------------------------------------------------------------------- the exported file

def export_generator(state: dict[str, Any], path: str | Path) -> Path:
    """Write the generator of a training checkpoint ``state`` to ``path`` atomically (temp file + rename)."""
    gan = state["gan_config"]
    payload = {"G": state["G"], "latent_dim": int(gan["latent_dim"]), "image_size": [int(s) for s in gan["image_size"]],
               "g_width": int(gan["g_width"]), "epochs": int(state["epoch"]) + 1}
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


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> Generator:
    """Rebuild the exported generator in eval mode on ``device``."""
    data = read_export(path)
    G = Generator(data["latent_dim"], tuple(data["image_size"]), data["g_width"])
    G.load_state_dict(data["G"])
    return G.to(device).eval()


# ------------------------------------------------------------------------------------- sampling

def chunk_seed(seed: int, chunk: int) -> int:
    """The latent seed of one chunk: a function of (seed, chunk) only."""
    return derive_seed(Stream.GENERATION, seed, chunk)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def render_chunk(G: Generator, store: GeneratedStore, chunk: int, seed: int) -> np.ndarray:
    """The images of ``chunk`` (uint8 [B, H, W, 3]); G must be in eval mode."""
    start, stop = store.chunk_range(chunk)
    device = next(G.parameters()).device
    z = sample_latent(stop - start, G.latent_dim, generator=torch.Generator().manual_seed(chunk_seed(seed, chunk)))
    with torch.inference_mode():
        out = [G(zb.to(device)) for zb in z.split(SUB_BATCH)]  # [b, 3, H, W] each
    return to_uint8(torch.cat(out)) if out else np.zeros((0, *store.info["image_size"], 3), np.uint8)


class ShardRenderer:
    """One long-lived rendering worker: loads G once, then renders and writes shards on request.

    The calling process uses one directly; :func:`generate`'s helpers are this class as Ray actors.
    """

    def __init__(self, generator_path: str | Path, store_root: str | Path, seed: int,
                 device: torch.device | str) -> None:
        self.G = load_generator(generator_path, device)
        self.store = GeneratedStore(store_root)
        self.seed = seed
        self.label = process_label()

    def ready(self) -> str:
        return self.label

    def render(self, chunks: Sequence[int]) -> str:
        """Render and write the shards ``chunks``; returns this worker's label."""
        for c in chunks:
            self.store.write_chunk(c, render_chunk(self.G, self.store, c, self.seed))
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
             helper_resources: dict[str, Any] | None = None) -> Generated:
    """Fill (or complete) the store at ``store_root`` with ``n`` images of the exported generator.

    The caller renders shards on ``device`` (``trainables.runtime.device_for(gan.use_gpu)``). ``helpers > 0``
    with Ray initialised also starts that many Ray actors with ``ray.remote(**helper_resources)`` (default
    ``{"num_cpus": 1}``; e.g. ``{"num_gpus": 1}``), which share the pending shards; without Ray the caller renders
    everything. Helpers render on the caller's device type (CPU and GPU round differently: the pool must not depend
    on who renders).
    """
    if helpers < 0:
        raise ValueError(f"generate(helpers={helpers}) must be >= 0")
    path = Path(generator_path).resolve()
    info = read_export(path)
    meta = {"generator_sha256": file_sha256(path), "seed": seed, "latent": "uniform[-1,1]", "bn": "eval"}
    store = GeneratedStore.create(store_root, n=n, image_size=tuple(info["image_size"]), meta=meta,
                                  chunk_size=chunk_size)
    if store.complete:
        return Generated(store, {})
    device = torch.device(device)
    pending = deque(store.missing_chunks())
    workers: dict[str, int] = {}
    pool = None
    try:
        if helpers and len(pending) > 1 and _ray_initialized():
            pool = _HelperPool(path, store.root, seed, device.type, helpers, helper_resources or {"num_cpus": 1})
        _render_all(ShardRenderer(path, store.root, seed, device), pending, pool, workers)
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

    def __init__(self, path: Path, root: Path, seed: int, device: str, count: int, resources: dict[str, Any]) -> None:
        import ray

        actor_cls = ray.remote(**resources)(ShardRenderer)
        self.actors = [actor_cls.remote(str(path), str(root), seed, device) for _ in range(count)]
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
