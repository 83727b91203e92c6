"""The generated-image store: images written once by the generation stage and reused by every trial.

Layout under ``root`` (format 2)::

    store.json            {"n", "chunk_size", "image_size", "meta", "complete", "format": 2}
    shards/00012.npy      uint8 [B, H, W, 3]: images 12 * chunk_size ... (one shard per chunk; a few hundred files)
    table.parquet         image_id, shard (file name), row (inside the shard): written last by finalize()
    labels/<name>.npz     static targets (sMpRL ranks, uint16 [N, K]) with their metadata

The first N images of one pool serve every #GAN setting, as in the paper. A shard is written to a temporary
name in ``shards/`` and renamed, so a shard file that exists is complete: it is the resume marker, and an
interrupted generation is detected and completed, never taken as complete. Shards are plain ``.npy`` files
(lossless, no decoding); readers memory-map them (``datasets.images.read_record``). Format 1 (one JPEG per
image under ``images/``) is refused with a message: tens of thousands of small files were slow on shared storage.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasets.files import atomic_write_bytes
from datasets.records import Record

STORE_FILE = "store.json"
FORMAT = 2
SHARD_DIR = "shards"
TABLE_FILE = "table.parquet"


class GeneratedStore:
    """A folder of generated-image shards plus their table; see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info_path = self.root / STORE_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"no generated-image store at {self.root} ({STORE_FILE} missing)")
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{info_path} is corrupt: {err}") from None
        if not isinstance(info, dict):
            raise ValueError(f"{info_path} is corrupt: expected a JSON object, got {type(info).__name__}")
        if info.get("format") != FORMAT:
            old = "the old one-JPEG-per-image layout" if "format" not in info else f"format {info['format']!r}"
            raise ValueError(f"generated store {self.root} uses {old} ({info_path} lacks \"format\": {FORMAT}); "
                             f"this code reads format {FORMAT} (shard files): delete {self.root} to regenerate it")
        self.info: dict[str, Any] = info

    # ------------------------------------------------------------------ creation and writing
    @classmethod
    def create(cls, root: str | Path, *, n: int, image_size: tuple[int, int], meta: dict[str, Any],
               chunk_size: int = 100) -> "GeneratedStore":
        """Open the store at ``root`` if it was created with the same arguments, else start a new one.

        An existing store with other settings, or in the old layout, raises ValueError: never overwritten.
        """
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
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        info = {**want, "complete": False, "format": FORMAT}
        atomic_write_bytes(root / STORE_FILE, json.dumps(info, indent=1).encode())
        return cls(root)

    @property
    def n(self) -> int:
        return int(self.info["n"])

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.info["image_size"]
        return int(h), int(w)

    @property
    def num_chunks(self) -> int:
        return -(-self.n // int(self.info["chunk_size"]))

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Image ids [start, stop) of ``chunk``."""
        size = int(self.info["chunk_size"])
        return chunk * size, min(self.n, (chunk + 1) * size)

    def shard_path(self, chunk: int) -> Path:
        return self.root / SHARD_DIR / f"{chunk:05d}.npy"

    def missing_chunks(self) -> list[int]:
        """Chunks whose shard file does not exist yet (temporary files never count)."""
        folder = self.root / SHARD_DIR
        present = set(os.listdir(folder)) if folder.is_dir() else set()
        return [c for c in range(self.num_chunks) if self.shard_path(c).name not in present]

    def write_chunk(self, chunk: int, images: np.ndarray) -> None:
        """Write shard ``chunk`` atomically; ``images``: uint8 [B, H, W, 3] for exactly the ids of ``chunk``."""
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"chunk {chunk} is out of range: the store at {self.root} has {self.num_chunks} chunks")
        start, stop = self.chunk_range(chunk)
        want = (stop - start, *self.image_size, 3)
        if images.dtype != np.uint8 or images.shape != want:
            raise ValueError(f"chunk {chunk} needs uint8 {list(want)} (image_size {list(self.image_size)}), "
                             f"got {images.dtype} {list(images.shape)}")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
        atomic_write_bytes(self.shard_path(chunk), buf.getvalue())

    def finalize(self) -> None:
        """Write the table and mark the store complete; refuses while chunks are missing."""
        missing = self.missing_chunks()
        if missing:
            raise RuntimeError(f"generated store {self.root}: chunks {missing[:10]} are not written yet")
        for stray in (self.root / SHARD_DIR).glob(".*"):  # temp files of interrupted writers
            stray.unlink(missing_ok=True)
        shard, row = self._layout()
        table = pa.table({"image_id": np.arange(self.n, dtype=np.int64), "shard": shard, "row": row})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic_write_bytes(self.root / TABLE_FILE, buf.getvalue().to_pybytes())
        self.info["complete"] = True
        atomic_write_bytes(self.root / STORE_FILE, json.dumps(self.info, indent=1).encode())

    def _layout(self) -> tuple[list[str], np.ndarray]:
        """Per image id: its shard file name and its row inside the shard."""
        ids = np.arange(self.n, dtype=np.int64)
        size = int(self.info["chunk_size"])
        return [self.shard_path(c).name for c in ids // size], ids % size

    # ------------------------------------------------------------------ reading
    @property
    def complete(self) -> bool:
        return bool(self.info.get("complete")) and (self.root / TABLE_FILE).is_file()

    def verify(self) -> list[str]:
        """Problems that make a 'complete' store unusable: a wrong table, missing or damaged shards.

        Shards are memory-mapped (header and file size only), so this stays cheap for a full pool.
        """
        table = pq.read_table(self.root / TABLE_FILE)
        if not {"image_id", "shard", "row"} <= set(table.column_names):
            return [f"{TABLE_FILE} has columns {table.column_names}, expected image_id, shard, row"]
        if table.num_rows != self.n:
            return [f"{TABLE_FILE} has {table.num_rows} rows, expected {self.n}"]
        shard, row = self._layout()
        if table.column("shard").to_pylist() != shard or not np.array_equal(table.column("row").to_numpy(), row):
            return [f"{TABLE_FILE} does not match the shard layout of chunk_size {self.info['chunk_size']}"]
        bad = [p for p in (self._shard_problem(c) for c in range(self.num_chunks)) if p]
        return [f"{len(bad)} of {self.num_chunks} shards missing or damaged (first: {bad[0]})"] if bad else []

    def _shard_problem(self, chunk: int) -> str:
        path = self.shard_path(chunk)
        start, stop = self.chunk_range(chunk)
        want = (stop - start, *self.image_size, 3)
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return f"{path} is missing"
        except Exception as err:  # truncated or not an .npy file
            return f"{path} cannot be read ({err})"
        if array.dtype != np.uint8 or array.shape != want:
            return f"{path} holds {array.dtype} {list(array.shape)}, expected uint8 {list(want)}"
        return ""

    def records(self, n: int | None = None) -> tuple[Record, ...]:
        """The first ``n`` generated images (all when None) as records with ``generated=True``.

        ``path`` is the shard file and ``shard_row`` the image's row in it (read with ``read_record``).
        """
        if not self.complete:
            raise RuntimeError(f"generated store {self.root} is incomplete; run the generation stage")
        n = self.n if n is None else n
        if not 0 <= n <= self.n:
            raise ValueError(f"labels.num_gan={n} but the store at {self.root} holds {self.n} images")
        table = pq.read_table(self.root / TABLE_FILE, columns=["shard", "row"]).slice(0, n)
        shards, rows = table.column("shard").to_pylist(), table.column("row").to_pylist()
        paths = {name: str(self.root / SHARD_DIR / name) for name in set(shards)}
        return tuple(Record(path=paths[s], pid=-1, camid=-1, generated=True, gen_row=i, shard_row=row)
                     for i, (s, row) in enumerate(zip(shards, rows)))

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
        if ranks.ndim != 2 or ranks.shape[0] != self.n:
            raise ValueError(f"static label file {path} has shape {ranks.shape}, expected [{self.n}, K]")
        # checked once here: training reads the ranks every step without checking them (trainables.labels)
        if not np.array_equal(np.sort(ranks, axis=1), np.broadcast_to(np.arange(1, ranks.shape[1] + 1), ranks.shape)):
            raise ValueError(f"static label file {path}: a row of ranks is not a permutation of 1..{ranks.shape[1]}; "
                             f"delete it to rebuild")
        return ranks, meta
