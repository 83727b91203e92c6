"""The trained generator as one file, and sampling N images from it into the generated-image store.

``generator.pt`` holds ``{"G": state_dict, "latent_dim", "image_size", "g_width", "epochs"}``: everything needed
to rebuild :class:`trainables.gan_models.Generator` without the training run. :func:`generate` fills a
:class:`datasets.generated.GeneratedStore` chunk by chunk. Chunk ``c`` draws its latents from a CPU
``torch.Generator`` seeded from ``(seed, c)`` and runs G in eval mode (BatchNorm running statistics, so an
image does not depend on its batch), so the pool is the same whatever the parallelism, and an interrupted
generation is completed by the next call (only ``missing_chunks()`` are produced). The store's meta records the
generator file's sha256: a store made by another generator is refused, never reused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from datasets.files import atomic_write_bytes, file_sha256
from datasets.generated import GeneratedStore
from trainables.gan_models import Generator, sample_latent
from trainables.seeding import derive_seed

GENERATOR_FILE = "generator.pt"
EXPORT_KEYS = ("G", "latent_dim", "image_size", "g_width", "epochs")
SUB_BATCH = 250  # images per G forward inside a chunk (fixed: results must not depend on the device)
MAX_IN_FLIGHT = 4  # Ray tasks at a time


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
    return derive_seed(seed, chunk)


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


def write_chunks(generator_path: str | Path, store_root: str | Path, chunks: Sequence[int], seed: int) -> int:
    """Render and write the given chunks of the store (on the GPU when one is visible); returns images written.

    The lower-level step of :func:`generate` (also the body of its Ray tasks).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    G = load_generator(generator_path, device)
    store = GeneratedStore(store_root)
    written = 0
    for c in chunks:
        images = render_chunk(G, store, c, seed)
        store.write_chunk(c, images)
        written += len(images)
    return written


def generate(generator_path: str | Path, store_root: str | Path, n: int, *, seed: int = 0,
             chunk_size: int = 500, parallel: bool | None = None) -> GeneratedStore:
    """Fill (or complete) the store at ``store_root`` with ``n`` images of the exported generator.

    ``parallel``: None = Ray tasks when Ray is initialised, else in-process; True requires Ray to be initialised.
    """
    path = Path(generator_path).resolve()
    info = read_export(path)
    meta = {"generator_sha256": file_sha256(path), "seed": seed, "latent": "uniform[-1,1]", "bn": "eval"}
    store = GeneratedStore.create(store_root, n=n, image_size=tuple(info["image_size"]), meta=meta,
                                  chunk_size=chunk_size)
    if store.complete:
        return store
    missing = store.missing_chunks()
    if parallel is None:
        parallel = _ray_initialized()
    if parallel and not _ray_initialized():
        raise ValueError("generate(parallel=True) needs ray.init() first (or pass parallel=None/False)")
    if parallel and len(missing) > 1:
        _write_chunks_ray(path, store.root, missing, seed)
    else:
        write_chunks(path, store.root, missing, seed)
    store.finalize()
    return store


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _write_chunks_ray(path: Path, root: Path, chunks: Sequence[int], seed: int) -> None:
    """One Ray task per chunk, at most a handful in flight; GPU tasks when the cluster has GPUs."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(write_chunks)
    limit = max(1, min(MAX_IN_FLIGHT, gpus or int(resources.get("CPU", 1))))
    pending: list = []
    for c in chunks:
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # re-raises a task's error here
        pending.append(task.remote(str(path), str(root), [c], seed))
    ray.get(pending)
