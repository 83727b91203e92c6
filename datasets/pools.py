"""Pools of "generated" images that do not come from the DCGAN, stored exactly like a DCGAN pool.

Every pool is a :class:`datasets.generated.GeneratedStore` (uint8 shards [B, H, W, 3] at the size the DCGAN pool is
stored at, ``gan.image_size``), so the decode stage, training, the pool-quality measure and the sMpRL labels read
it unchanged. ``labels.pool`` picks one of :data:`POOLS`:

- ``gan``: the DCGAN's renders (:mod:`trainables.gan.sample`; not written here).
- ``synthetic_ids``: real images, drawn by the synthetic renderer (:mod:`datasets.pedestrians`), of identities that
  are in neither the training nor the test set (nor among the distractors) of the synthetic dataset: LSRO's own
  control, an upper bound on what a perfect generator gives. :func:`write_synthetic_ids_pool`;
  :func:`synthetic_ids_args` turns a ``trainables.config.DatasetConfig`` into its arguments. Each image is what
  the DCGAN is trained to imitate: rendered at the dataset's size, saved and decoded as JPEG (quality 92, as
  :mod:`datasets.synthetic` writes its files), resized bicubic (PIL, as :mod:`datasets.decoded_cache` resizes the
  GAN's training images).
- ``folder``: any folder of images (another generator's output, real images of unseen people), in any subfolders;
  :func:`check_folder_pool` (cheap, before any cluster time) and :func:`write_folder_pool`.

No torch here (numpy, PIL, the stdlib and ``datasets.*``): the driver imports this module cheaply. A store that
fails half-way is never finalized, so it is never taken as complete (``GeneratedStore.complete``); the next call
with the same arguments completes it (only ``missing_chunks()`` are written).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from datasets import synthetic
from datasets.generated import GeneratedStore
from datasets.pedestrians import NUM_CAMERAS, Camera, Person, look_alike, random_camera, random_person, render

POOLS = ("gan", "synthetic_ids", "folder")

CHUNK_SIZE = 100  # images per shard: trainables.gan.sample.generate's default
JPEG_QUALITY = 92  # what datasets.synthetic._draw_chunk saves its images with
RESIZE = Image.BICUBIC  # torchvision's T.Resize(BICUBIC) on a PIL image (datasets.decoded_cache.decode) is this
LOOK_ALIKES = 0.3  # datasets.synthetic.plan: the share of identities that copy an earlier one and change 1-2 things
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# The synthetic_ids pool's random streams are numpy SeedSequences of (seed, _SALT, stream, ...). The dataset's are
# (seed,) for its plan and (seed, frame) for an image, frame < its image count: none of them starts (seed, _SALT).
_SALT = 1_000_000_007
_PERSONS, _CAMERAS, _RENDER = 1, 2, 3
_VERSION = 1  # bump when a synthetic_ids pool's images change for the same arguments


# -------------------------------------------------------------------------------------------- synthetic_ids

def synthetic_ids_args(dataset_cfg: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`write_synthetic_ids_pool` for a ``trainables.config.DatasetConfig``.

    ``source_size`` = the dataset's image size, ``seed`` = its seed (the pool is seen by the dataset's cameras),
    ``first_pid`` = one above its largest pid, ``dataset`` = its :func:`datasets.synthetic.plan` arguments (whose
    persons the pool's identities must differ from). A given synthetic ``dataset.root`` is described by its marker
    file (the arguments it was drawn with). ValueError for a dataset that is not synthetic.
    """
    if dataset_cfg.name != "synthetic":
        raise ValueError(f"labels.pool=synthetic_ids needs dataset.name=synthetic (the identities are drawn by the "
                         f"synthetic generator), not dataset.name={dataset_cfg.name!r}; use labels.pool=folder with "
                         f"labels.pool_root=<a folder of images of unseen people>")
    if dataset_cfg.root:
        marker = Path(dataset_cfg.root).expanduser() / synthetic.MARKER
        try:
            params = json.loads(marker.read_text())["params"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"dataset.root={dataset_cfg.root}: cannot read the synthetic dataset's arguments from "
                             f"{marker} ({err})") from err
        size, seed = params["size"], params["seed"]
        if "counts" in params:
            plan_args: dict[str, Any] = {"counts": params["counts"]}
        else:
            plan_args = {k: params[k] for k in ("ids", "test_ids", "images_per_id", "distractors", "junk")}
    else:
        size, seed = dataset_cfg.synthetic_size, dataset_cfg.synthetic_seed
        if dataset_cfg.synthetic_counts is not None:
            plan_args = {"counts": dataset_cfg.synthetic_counts}
        else:
            ids = dataset_cfg.synthetic_ids
            test_ids = ids if dataset_cfg.synthetic_test_ids is None else dataset_cfg.synthetic_test_ids
            plan_args = {"ids": ids, "test_ids": test_ids, "images_per_id": dataset_cfg.synthetic_images_per_id,
                         "distractors": dataset_cfg.synthetic_distractors, "junk": dataset_cfg.synthetic_junk}
    return {"source_size": (int(size[0]), int(size[1])), "seed": int(seed),
            "first_pid": _dataset_pid_count(plan_args) + 1, "dataset": plan_args}


def _counts(plan_args: dict[str, Any]) -> synthetic.Counts | None:
    counts = plan_args.get("counts")
    return synthetic.Counts(**counts) if isinstance(counts, dict) else synthetic.resolve_counts(counts)


def _dataset_pid_count(plan_args: dict[str, Any]) -> int:
    """The dataset's identities: pids 1..this (``plan`` permutes them over train and test; 0 and -1 are no one)."""
    fixed = _counts(plan_args)
    if fixed is not None:
        return fixed.train_ids + fixed.test_ids
    return int(plan_args["ids"]) + int(plan_args.get("test_ids") or plan_args["ids"])


def dataset_persons(seed: int, dataset: dict[str, Any]) -> tuple[list[Person], list[Camera]]:
    """The synthetic dataset's persons (train, test, distractors) and its cameras: ``plan``'s own draw (cheap)."""
    fixed = _counts(dataset)
    kwargs = {k: v for k, v in dataset.items() if k != "counts"}
    persons, cameras, _ = synthetic.plan(**kwargs, seed=seed, counts=fixed)
    return persons, cameras


def person_key(p: Person) -> tuple:
    """What can be seen of a person's attributes: a colour that is not drawn (the pattern colour of a solid top,
    the bag colour without a bag) is left out; height and build (continuous) too."""
    return (p.top, p.top_pattern, None if p.top_pattern == "solid" else p.pattern_color, p.bottom, p.bottom_kind,
            p.shoes, p.hair, p.long_hair, p.skin, p.bag, None if p.bag == "none" else p.bag_color)


def draw_identities(count: int, seed: int, exclude: Sequence[Person] = ()) -> list[Person]:
    """``count`` new persons from the dataset's distribution (``plan``: fresh ones, and a share of look-alikes of
    earlier new ones), each differing from every person of ``exclude`` in a visible attribute (:func:`person_key`)
    and from every earlier new one. Drawn from the stream (seed, _SALT, _PERSONS), never the dataset's (seed,):
    a draw that would repeat an excluded person is redrawn (rarely needed: ~1e9 attribute combinations)."""
    rng = np.random.default_rng([seed, _SALT, _PERSONS])
    taken = {person_key(p) for p in exclude}
    out: list[Person] = []
    seen: set[tuple] = set()
    for k in range(count):
        alike = k > 0 and rng.random() < LOOK_ALIKES
        person = look_alike(out[int(rng.integers(k))], rng) if alike else random_person(rng)
        while person_key(person) in taken or astuple(person) in seen:
            person = random_person(rng)
        out.append(person)
        seen.add(astuple(person))
    return out


def identity_cameras(seed: int, identity: int, images: int) -> list[int]:
    """The cameras (0-based) of one new identity's images, like ``plan``'s training ids: 2..6 cameras, at least one
    image in each (as far as ``images`` allows), the rest spread at random; in random order (a cut identity keeps
    a camera mix)."""
    rng = np.random.default_rng([seed, _SALT, _CAMERAS, identity])
    ncams = min(int(rng.integers(2, NUM_CAMERAS + 1)), images)
    cams = rng.choice(NUM_CAMERAS, size=ncams, replace=False)
    per_cam = 1 + np.bincount(rng.choice(ncams, size=images - ncams), minlength=ncams)
    return [int(c) for c in rng.permutation(np.repeat(cams, per_cam))]


def as_stored(img: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
    """A rendered image as the DCGAN sees a dataset image: JPEG (quality 92) round trip, bicubic to ``image_size``
    [H, W]; uint8 [H, W, 3]."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    with Image.open(io.BytesIO(buf.getvalue()), formats=["JPEG"]) as decoded:
        return resize_rgb(decoded, image_size)


def resize_rgb(img: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
    """RGB, resized to ``image_size`` [H, W] (bicubic, PIL's antialiasing: torchvision's T.Resize on a PIL image);
    uint8 [H, W, 3]."""
    img = img.convert("RGB")
    h, w = image_size
    if img.size != (w, h):
        img = img.resize((w, h), RESIZE)
    return np.asarray(img, dtype=np.uint8)


def _synthetic_chunk(job: tuple) -> tuple[int, np.ndarray]:
    """Render one shard: ``job`` = (chunk, [(image index, person, camera), ...], cameras, sizes, seed)."""
    chunk, images, cameras, source_size, image_size, seed = job
    rows = [as_stored(render(person, cameras[cam], source_size, (seed, _SALT, _RENDER, i)), image_size)
            for i, person, cam in images]
    return chunk, np.stack(rows) if rows else np.zeros((0, *image_size, 3), np.uint8)


def write_synthetic_ids_pool(store_root: str | Path, n: int, image_size: tuple[int, int], *,
                             source_size: tuple[int, int], seed: int, first_pid: int, images_per_id: int = 6,
                             dataset: dict[str, Any] | None = None, workers: int = 0) -> GeneratedStore:
    """Fill (or complete) the store at ``store_root`` with ``n`` images of ceil(n / images_per_id) new identities.

    Image i shows pid ``first_pid + i // images_per_id`` (:func:`synthetic_ids_pids`), seen by one of the dataset's
    cameras (``plan``'s first draws from ``seed``), rendered at ``source_size`` [H, W] and stored at ``image_size``
    (:func:`as_stored`). ``dataset``: the synthetic dataset's ``plan`` arguments (:func:`synthetic_ids_args`):
    ``first_pid`` must then lie above its pids, and every new identity differs from each of its persons (train,
    test, distractors) in a visible attribute. Disjoint by construction, not by luck: the dataset's persons come
    from the stream (seed,), the pool's from (seed, _SALT, ...), and a draw that would still repeat a dataset
    person is redrawn (:func:`draw_identities`). Deterministic in the arguments (``workers`` only changes the
    speed: 0 = up to 4 processes): byte-identical stores. The first m images of a pool of n are the pool of m.
    """
    if n < 0 or images_per_id < 1 or first_pid < 1:
        raise ValueError(f"synthetic_ids pool: n={n} must be >= 0, images_per_id={images_per_id} >= 1 and "
                         f"first_pid={first_pid} >= 1")
    source_size, image_size = _size("source_size", source_size), _size("image_size", image_size)
    exclude: list[Person] = []
    if dataset is not None:
        exclude, cameras = dataset_persons(seed, dataset)
        if first_pid <= _dataset_pid_count(dataset):
            raise ValueError(f"synthetic_ids pool: first_pid={first_pid} is a pid of the dataset (1.."
                             f"{_dataset_pid_count(dataset)}); use first_pid={_dataset_pid_count(dataset) + 1}")
    else:
        rng = np.random.default_rng(seed)  # plan() draws the cameras first: the dataset's cameras
        cameras = [random_camera(rng) for _ in range(NUM_CAMERAS)]
    ids = math.ceil(n / images_per_id)
    meta = {"pool": "synthetic_ids", "seed": seed, "first_pid": first_pid, "ids": ids,
            "images_per_id": images_per_id, "source_size": list(source_size), "dataset": dataset,
            "jpeg_quality": JPEG_QUALITY, "resize": "bicubic", "version": _VERSION}
    store = GeneratedStore.create(store_root, n=n, image_size=image_size, meta=meta, chunk_size=CHUNK_SIZE)
    if store.complete:
        return store
    missing = store.missing_chunks()
    if missing:
        persons = draw_identities(ids, seed, exclude)
        shots = [(p, cam) for k, p in enumerate(persons) for cam in identity_cameras(seed, k, images_per_id)][:n]
        jobs = []
        for c in missing:
            start, stop = store.chunk_range(c)
            images = [(i, *shots[i]) for i in range(start, stop)]
            jobs.append((c, images, cameras, source_size, image_size, seed))
        workers = workers or min(4, os.cpu_count() or 1)
        if workers <= 1 or len(jobs) == 1:
            for chunk, rows in map(_synthetic_chunk, jobs):
                store.write_chunk(chunk, rows)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for chunk, rows in pool.map(_synthetic_chunk, jobs, chunksize=4):
                    store.write_chunk(chunk, rows)
    store.finalize()
    return store


def synthetic_ids_pids(store: GeneratedStore) -> np.ndarray:
    """int64 [n]: the pid each image of a synthetic_ids store shows."""
    meta = store.info["meta"]
    if meta.get("pool") != "synthetic_ids":
        raise ValueError(f"generated store {store.root} is not a synthetic_ids pool (meta pool={meta.get('pool')!r})")
    return meta["first_pid"] + np.arange(store.n, dtype=np.int64) // meta["images_per_id"]


def _size(key: str, size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"{key}={list(size)!r} must be [height, width] with both >= 1")
    return int(size[0]), int(size[1])


# -------------------------------------------------------------------------------------------- folder

def _image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (any depth), sorted by their relative POSIX path; hidden files and folders
    (a name starting with '.', e.g. ``.ipynb_checkpoints`` or macOS ``._x.jpg``) are skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(Path(folder, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_folder_pool(root: str | Path, n: int) -> list[Path]:
    """Cheap check before any cluster time (nothing is decoded): ``root`` is a folder holding at least ``n`` image
    files (``.jpg .jpeg .png .bmp``, any case, in any subfolder). Returns the first ``n`` in the pool's order
    (sorted by relative path); ValueError naming the folder otherwise."""
    if root is None or str(root) == "":
        raise ValueError("labels.pool=folder needs labels.pool_root=PATH (a folder of images)")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"labels.pool_root={root} {what} (labels.pool=folder reads its images)")
    files = _image_files(folder)
    if len(files) < n:
        raise ValueError(f"labels.pool_root={root}: the folder {folder.resolve()} holds {len(files)} image files "
                         f"({' '.join(IMAGE_SUFFIXES)}, in any subfolder), fewer than the {n} the pool needs")
    return files[:n]


def folder_listing(root: str | Path, n: int) -> str:
    """A cheap fingerprint of the folder pool's first ``n`` files (relative name, size, modification time; nothing
    is read): part of the pool stage's key, so that a changed folder is a new pool, never a refused or stale one."""
    folder = Path(root).expanduser()
    h = hashlib.sha256()
    for path in check_folder_pool(root, n):
        st = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _digest_update(h: Any, rel: str, data: bytes) -> None:
    h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big"))
    h.update(data)


def folder_digest(root: Path, files: Sequence[Path]) -> str:
    """sha256 over each file's relative POSIX name, a NUL, its size (8 bytes, big-endian) and its bytes."""
    h = hashlib.sha256()
    for path in files:
        _digest_update(h, path.relative_to(root).as_posix(), path.read_bytes())
    return h.hexdigest()


def _read_checked(path: Path) -> tuple[bytes, str | None]:
    """The file's bytes and None, or (b"" when unreadable,) why it does not decode (a full decode)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return b"", f"{type(err).__name__}: {err}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated files that Image.verify() lets through
    except Exception as err:  # PIL raises many types for corrupt data
        return data, f"{type(err).__name__}: {err}"
    return data, None


def _bad_files_error(bad: list[tuple[Path, str]]) -> ValueError:
    shown = "; ".join(f"{p} ({why})" for p, why in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return ValueError(f"labels.pool_root: {len(bad)} image file(s) cannot be decoded: {shown}{more}; "
                      f"remove or replace them")


def _decode_file(job: tuple[Path, tuple[int, int]]) -> np.ndarray:
    path, image_size = job
    try:
        with Image.open(path) as im:
            return resize_rgb(im, image_size)
    except Exception as err:  # changed since the check: name it all the same
        raise _bad_files_error([(path, f"{type(err).__name__}: {err}")]) from err


def write_folder_pool(store_root: str | Path, n: int, image_size: tuple[int, int], root: str | Path, *,
                      threads: int = 4) -> GeneratedStore:
    """Fill (or complete) the store at ``store_root`` with the first ``n`` images of the folder ``root``
    (:func:`check_folder_pool`'s order), each decoded with PIL, converted to RGB and resized (bicubic) to
    ``image_size`` [H, W].

    First every file is read once, hashed and fully decoded: files that do not decode raise ValueError naming
    them before the store is created, so fixing them and running again is a clean start. (One that goes bad
    between that check and its shard raises the same error and leaves the store unfinalized: never complete.)
    Meta: ``pool``, the resolved ``root``, ``files`` = n, ``sha256`` = :func:`folder_digest` of those files,
    ``resize``: a store of other files is refused by ``GeneratedStore.create``, never reused.
    """
    image_size = _size("image_size", image_size)
    files = check_folder_pool(root, n)
    given, folder = Path(root).expanduser(), Path(root).expanduser().resolve()
    files = [folder / p.relative_to(given) for p in files]
    h = hashlib.sha256()
    bad: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for path, (data, why) in zip(files, pool.map(_read_checked, files)):
            _digest_update(h, path.relative_to(folder).as_posix(), data)
            if why is not None:
                bad.append((path, why))
        if bad:
            raise _bad_files_error(bad)
        meta = {"pool": "folder", "root": str(folder), "files": n, "sha256": h.hexdigest(), "resize": "bicubic"}
        store = GeneratedStore.create(store_root, n=n, image_size=image_size, meta=meta, chunk_size=CHUNK_SIZE)
        if store.complete:
            return store
        for c in store.missing_chunks():
            start, stop = store.chunk_range(c)
            store.write_chunk(c, np.stack(list(pool.map(_decode_file, [(p, image_size) for p in files[start:stop]]))))
    store.finalize()
    return store


__all__ = ["POOLS", "check_folder_pool", "dataset_persons", "draw_identities", "folder_digest", "identity_cameras",
           "person_key", "synthetic_ids_args", "synthetic_ids_pids", "write_folder_pool", "write_synthetic_ids_pool"]
