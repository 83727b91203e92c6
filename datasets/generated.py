"""The generated-image store: images written once by the generation stage and reused by every trial.

Layout under ``root``::

    store.json            {"n", "chunk_size", "image_size", "meta", "complete"}
    images/000123.jpg     image i (the first N of one pool serve every #GAN setting, as in the paper)
    chunks/00001.done     written after every image of chunk 1 is on disk (resume granularity)
    table.parquet         image_id, path: written last, then store.json gets "complete": true
    labels/<name>.npz     static targets (sMpRL ranks, uint16 [N, K]) with their metadata

Chunks are written image-by-image to temporary names and renamed, and a chunk counts only once its marker
exists, so an interrupted generation is detected and completed, never taken as complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datasets.files import atomic_write_bytes
from datasets.records import Record

STORE_FILE = "store.json"


class GeneratedStore:
    """A folder of generated images plus their table; see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info_path = self.root / STORE_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"no generated-image store at {self.root} ({STORE_FILE} missing)")
        try:
            self.info: dict[str, Any] = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{info_path} is corrupt: {err}") from None

    # ------------------------------------------------------------------ creation and writing
    @classmethod
    def create(cls, root: str | Path, *, n: int, image_size: tuple[int, int], meta: dict[str, Any],
               chunk_size: int = 500) -> "GeneratedStore":
        """Open the store at ``root`` if it was created with the same arguments, else start a new one."""
        if n < 0 or chunk_size < 1:
            raise ValueError(f"generated store: n={n} must be >= 0 and chunk_size={chunk_size} >= 1")
        root = Path(root)
        want = {"n": n, "chunk_size": chunk_size, "image_size": list(image_size), "meta": meta}
        if (root / STORE_FILE).is_file():
            store = cls(root)
            have = {k: store.info.get(k) for k in want}
            if have == json.loads(json.dumps(want)):
                return store
            raise ValueError(f"generated store {root} was created with other settings {have}; "
                             f"refusing to overwrite it (delete it or use another storage path)")
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "chunks").mkdir(exist_ok=True)
        atomic_write_bytes(root / STORE_FILE, json.dumps({**want, "complete": False}, indent=1).encode())
        return cls(root)

    @property
    def n(self) -> int:
        return int(self.info["n"])

    @property
    def num_chunks(self) -> int:
        return -(-self.n // int(self.info["chunk_size"]))

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        size = int(self.info["chunk_size"])
        return chunk * size, min(self.n, (chunk + 1) * size)

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not (self.root / "chunks" / f"{c:05d}.done").is_file()]

    def image_path(self, i: int) -> Path:
        return self.root / "images" / f"{i:06d}.jpg"

    def write_chunk(self, chunk: int, images: np.ndarray) -> None:
        """``images``: uint8 [B, H, W, 3] for exactly the ids of ``chunk``."""
        start, stop = self.chunk_range(chunk)
        if images.shape[0] != stop - start or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"chunk {chunk} needs uint8 [{stop - start}, H, W, 3], got {images.dtype} {images.shape}")
        for i, arr in zip(range(start, stop), images):
            path = self.image_path(i)
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(arr).save(tmp, format="JPEG", quality=95)
            os.replace(tmp, path)
        atomic_write_bytes(self.root / "chunks" / f"{chunk:05d}.done", b"")

    def finalize(self) -> None:
        """Write the table and mark the store complete; refuses while chunks are missing."""
        missing = self.missing_chunks()
        if missing:
            raise RuntimeError(f"generated store {self.root}: chunks {missing[:10]} are not written yet")
        ids = np.arange(self.n, dtype=np.int64)
        table = pa.table({"image_id": ids, "path": [self.image_path(i).name for i in ids]})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic_write_bytes(self.root / "table.parquet", buf.getvalue().to_pybytes())
        self.info["complete"] = True
        atomic_write_bytes(self.root / STORE_FILE, json.dumps(self.info, indent=1).encode())

    # ------------------------------------------------------------------ reading
    @property
    def complete(self) -> bool:
        return bool(self.info.get("complete")) and (self.root / "table.parquet").is_file()

    def verify(self) -> list[str]:
        """Problems that make a 'complete' store unusable (missing table rows or image files)."""
        problems = []
        table = pq.read_table(self.root / "table.parquet")
        if table.num_rows != self.n:
            problems.append(f"table.parquet has {table.num_rows} rows, expected {self.n}")
        present = set(os.listdir(self.root / "images"))
        missing = [p for p in table.column("path").to_pylist() if p not in present]
        if missing:
            problems.append(f"{len(missing)} image files missing (first: {missing[0]})")
        return problems

    def records(self, n: int | None = None) -> tuple[Record, ...]:
        """The first ``n`` generated images (all when None) as records with ``generated=True``."""
        if not self.complete:
            raise RuntimeError(f"generated store {self.root} is incomplete; run the generation stage")
        n = self.n if n is None else n
        if not 0 <= n <= self.n:
            raise ValueError(f"labels.num_gan={n} but the store at {self.root} holds {self.n} images")
        paths = pq.read_table(self.root / "table.parquet").column("path").to_pylist()[:n]
        return tuple(Record(path=str(self.root / "images" / p), pid=-1, camid=-1, generated=True, gen_row=i)
                     for i, p in enumerate(paths))

    # ------------------------------------------------------------------ static labels
    def write_labels(self, name: str, ranks: np.ndarray, meta: dict[str, Any]) -> Path:
        """Store static targets (ascending class ranks, uint16 [N, K]) atomically under ``labels/name.npz``."""
        if ranks.ndim != 2 or ranks.shape[0] != self.n:
            raise ValueError(f"labels {name!r}: expected [{self.n}, K] ranks, got {ranks.shape}")
        path = self.root / "labels" / f"{name}.npz"
        with tempfile.TemporaryFile() as f:
            np.savez(f, ranks=ranks.astype(np.uint16), meta=np.array(json.dumps(meta)))
            f.seek(0)
            atomic_write_bytes(path, f.read())
        return path

    def read_labels(self, name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """``(ranks, meta)`` or None when absent; a damaged file raises ValueError naming it."""
        path = self.root / "labels" / f"{name}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                ranks, meta = data["ranks"], json.loads(str(data["meta"]))
        except Exception as err:
            raise ValueError(f"static label file {path} is damaged ({err}); delete it to rebuild") from err
        if ranks.shape[0] != self.n:
            raise ValueError(f"static label file {path} has {ranks.shape[0]} rows, expected {self.n}")
        return ranks, meta
