"""A synthetic Market-format re-ID dataset: the embedded default, since real datasets cannot be downloaded here.

Pedestrians are drawn procedurally (:mod:`datasets.pedestrians`); ~30% of identities are look-alikes that copy
another identity and change one or two attributes, so colour histograms alone do not solve the task; each of the
6 cameras has its own background, colour cast and viewpoint mix. Train and test identities are disjoint; every
test id gets one query per camera it appears in; the gallery adds distractors (pid 0, people who are nobody's
match) and junk (pid -1: background crops and body fragments), as in Market-1501.

With ``counts`` (a name in :data:`COUNTS` or a :class:`Counts`) the split sizes are exact instead of
Poisson-drawn: ``--counts market1501`` has Market-1501's numbers, for scale rehearsals at a small resolution.

    python -m datasets.synthetic --out DIR [--ids N] [--seed S]
    python -m datasets.synthetic --out DIR --counts market1501 --size 32 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.market1501 import SPLIT_DIRS, load
from datasets.pedestrians import NUM_CAMERAS, Camera, Person, look_alike, random_camera, random_person, render
from datasets.records import Split

MARKER = "synthetic.json"


# -------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Job:
    split: str  # key of SPLIT_DIRS
    name: str  # Market-format file name
    person: int  # index into the person table; -1 = junk background crop
    camera: int  # 0-based
    fragment: bool


def _name(pid: int, cam: int, frame: int) -> str:
    pid_txt = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_txt}_c{cam + 1}s{1 + frame % 6}_{frame:06d}_{1 + frame % 3:02d}.jpg"


@dataclass(frozen=True)
class Counts:
    """Exact split sizes of a counted synthetic set (``generate(counts=...)``); per-identity numbers still vary.

    ``train_ids`` identities with ``train_images`` images in bounding_box_train (>= 1 each); ``test_ids``
    identities with ``query`` query images (1..NUM_CAMERAS each, at most one per camera) and
    ``gallery_ids_images`` gallery images (>= 2 each, in >= 2 cameras, so every query has a match in another
    camera); the gallery also holds ``distractors`` (pid 0) and ``junk`` (pid -1) images.
    """

    train_ids: int
    train_images: int
    test_ids: int
    query: int
    gallery_ids_images: int
    distractors: int
    junk: int

    def __post_init__(self) -> None:
        limits = {"train_ids": (2, None), "train_images": (self.train_ids, None), "test_ids": (2, None),
                  "query": (self.test_ids, NUM_CAMERAS * self.test_ids),
                  "gallery_ids_images": (2 * self.test_ids, None), "distractors": (0, None), "junk": (0, None)}
        for field, (lo, hi) in limits.items():
            value = getattr(self, field)
            if not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                raise ValueError(f"Counts.{field}={value!r} must be an int in [{lo}, {hi or 'inf'}] "
                                 f"(given the other counts {asdict(self)})")

    @property
    def gallery(self) -> int:
        """All gallery images: test identities + distractors + junk."""
        return self.gallery_ids_images + self.distractors + self.junk


# Market-1501 (Zheng et al. 2015): 751 train ids / 12,936 images; 750 test ids, 3,368 queries; the gallery's
# 15,913 images = 13,120 of the test ids + 2,793 distractors (the 3,819 junk images are left out of this layout).
MARKET1501 = Counts(train_ids=751, train_images=12_936, test_ids=750, query=3_368, gallery_ids_images=13_120,
                    distractors=2_793, junk=0)
COUNTS = {"market1501": MARKET1501}


def resolve_counts(counts: str | Counts | None) -> Counts | None:
    """``"market1501"`` -> :data:`MARKET1501`; a :class:`Counts` or None passes through; else ValueError."""
    if counts is None or isinstance(counts, Counts):
        return counts
    if isinstance(counts, str) and counts in COUNTS:
        return COUNTS[counts]
    raise ValueError(f"counts={counts!r} is not a known layout; valid names: {', '.join(sorted(COUNTS))}")


def plan(ids: int = 24, images_per_id: int = 10, distractors: int = 40, junk: int = 30, seed: int = 0,
         test_ids: int | None = None, counts: str | Counts | None = None,
         ) -> tuple[list[Person], list[Camera], list[Job]]:
    """Decide every identity, camera and file name. Cheap; the drawing happens in :func:`generate`.

    With ``counts`` the sizes come from that :class:`Counts` (``ids``, ``test_ids``, ``images_per_id``,
    ``distractors`` and ``junk`` are ignored).
    """
    fixed = resolve_counts(counts)
    if fixed is not None:
        ids, test_ids, distractors, junk = fixed.train_ids, fixed.test_ids, fixed.distractors, fixed.junk
    rng = np.random.default_rng(seed)
    test_ids = ids if test_ids is None else test_ids
    cameras = [random_camera(rng) for _ in range(NUM_CAMERAS)]
    persons: list[Person] = []
    for i in range(ids + test_ids + distractors):
        alike = i > 0 and i < ids + test_ids and rng.random() < 0.3
        persons.append(look_alike(persons[int(rng.integers(len(persons)))], rng) if alike else random_person(rng))
    pids = rng.permutation(np.arange(1, ids + test_ids + 1))  # Market interleaves train and test pids
    shots = _poisson_shots(rng, pids, ids, images_per_id) if fixed is None else _counted_shots(rng, pids, fixed)
    jobs = [Job(split, _name(pid, cam, frame), who, cam, False) for frame, (split, pid, who, cam) in enumerate(shots)]
    frame = len(jobs)
    for d in range(distractors):
        cam = int(rng.integers(NUM_CAMERAS))
        jobs.append(Job("gallery", _name(0, cam, frame), ids + test_ids + d, cam, False))
        frame += 1
    for _ in range(junk):
        cam = int(rng.integers(NUM_CAMERAS))
        who = int(rng.integers(len(persons))) if rng.random() < 0.6 else -1
        jobs.append(Job("gallery", _name(-1, cam, frame), who, cam, True))
        frame += 1
    return persons, cameras, jobs


Shot = tuple[str, int, int, int]  # (split, pid, person index, camera) of one identity image


def _poisson_shots(rng: np.random.Generator, pids: np.ndarray, ids: int, images_per_id: int) -> list[Shot]:
    """Poisson(images_per_id) images per identity over 2..6 cameras; a test id gets one query per camera."""
    shots: list[Shot] = []
    for i, pid in enumerate(pids):
        is_test = i >= ids
        ncams = int(rng.integers(2, NUM_CAMERAS + 1))
        cams = sorted(rng.choice(NUM_CAMERAS, size=ncams, replace=False).tolist())
        total = max(int(rng.poisson(images_per_id)), ncams * (2 if is_test else 1))
        per_cam = np.bincount(rng.choice(ncams, size=total - ncams * (2 if is_test else 1)), minlength=ncams)
        for c, extra in zip(cams, per_cam):
            for k in range(int(extra) + (2 if is_test else 1)):
                split = "train" if not is_test else ("query" if k == 0 else "gallery")
                shots.append((split, int(pid), i, c))
    return shots


def _spread(rng: np.random.Generator, n: int, total: int, low: int, high: int | None = None) -> np.ndarray:
    """``n`` integers in [low, high] summing exactly to ``total``: a multinomial (Poisson-like) share on top of
    ``low``; what overflows ``high`` is dealt again among those with room. The caller checks feasibility."""
    out = np.full(n, low, dtype=np.int64)
    left = total - low * n
    while left > 0:
        room = np.ones(n, dtype=bool) if high is None else out < high
        add = rng.multinomial(left, room / room.sum())
        if high is not None:
            add = np.minimum(add, high - out)
        out += add
        left -= int(add.sum())
    return out


def _counted_shots(rng: np.random.Generator, pids: np.ndarray, c: Counts) -> list[Shot]:
    """Exactly ``c``'s numbers: per-identity image counts spread around the mean, each split's total exact."""
    train = _spread(rng, c.train_ids, c.train_images, 1)
    queries = _spread(rng, c.test_ids, c.query, 1, NUM_CAMERAS)
    gallery = _spread(rng, c.test_ids, c.gallery_ids_images, 2)
    shots: list[Shot] = []
    for i, pid in enumerate(pids.tolist()):
        if i < c.train_ids:  # 1..6 cameras, at least one image in each
            n = int(train[i])
            ncams = min(int(rng.integers(2, NUM_CAMERAS + 1)), n)
            cams = rng.choice(NUM_CAMERAS, size=ncams, replace=False)
            per_cam = 1 + np.bincount(rng.choice(ncams, size=n - ncams), minlength=ncams)
            shots += [("train", pid, i, int(cam)) for cam, k in zip(cams, per_cam) for _ in range(k)]
            continue
        q, g = int(queries[i - c.train_ids]), int(gallery[i - c.train_ids])
        cams = rng.permutation(NUM_CAMERAS)[:int(rng.integers(max(q, 2), NUM_CAMERAS + 1))]
        shots += [("query", pid, i, int(cam)) for cam in sorted(cams[:q])]  # one per camera
        # two gallery images in two different cameras: every query camera then has a match in another one
        g_cams = np.concatenate([rng.permutation(cams)[:2], rng.choice(cams, size=g - 2)])
        shots += [("gallery", pid, i, int(cam)) for cam in np.sort(g_cams)]
    return shots


def _draw_chunk(args: tuple) -> int:
    out, persons, cameras, jobs, size, seed = args
    for job in jobs:
        person = persons[job.person] if job.person >= 0 else None
        frame = int(job.name.split("_")[2])
        img = render(person, cameras[job.camera], size, (seed, frame), fragment=job.fragment)
        img.save(Path(out) / SPLIT_DIRS[job.split] / job.name, quality=92)
    return len(jobs)


def generate(out_dir: str | Path, *, ids: int = 24, images_per_id: int = 10, distractors: int = 40,
             junk: int = 30, size: tuple[int, int] = (128, 64), seed: int = 0, test_ids: int | None = None,
             workers: int = 0, progress: bool = False, counts: str | Counts | None = None) -> Split:
    """Write a Market-format dataset to ``out_dir`` and return its parsed :class:`Split`.

    ``counts`` (a name in :data:`COUNTS`, e.g. ``"market1501"``, or a :class:`Counts`) fixes every split size
    exactly; ``ids``, ``test_ids``, ``images_per_id``, ``distractors`` and ``junk`` are then ignored.
    Deterministic in its arguments (``workers`` only changes the speed). Written to a temporary sibling folder
    and renamed, so an interrupted run never leaves a half dataset; an existing folder written with the same
    arguments is reused, one with other arguments or of unknown origin raises ``FileExistsError``.
    """
    out = Path(out_dir).expanduser().resolve()
    fixed = resolve_counts(counts)
    if fixed is None:
        params = {"ids": ids, "test_ids": ids if test_ids is None else test_ids, "images_per_id": images_per_id,
                  "distractors": distractors, "junk": junk, "size": list(size), "seed": seed, "version": 1}
    else:  # the ignored arguments stay out, so they cannot make an identical set look different
        params = {"counts": asdict(fixed), "size": list(size), "seed": seed, "version": 1}
    if out.exists():
        marker = out / MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
            return load(out)
        raise FileExistsError(f"{out} exists and was not written by this generator with the same arguments; "
                              f"choose another --out or delete it")
    if fixed is None and (ids < 2 or params["test_ids"] < 2 or images_per_id < 2 or distractors < 0 or junk < 0):
        raise ValueError(f"impossible synthetic dataset size: {params}")
    start = time.perf_counter()
    persons, cameras, jobs = plan(ids, images_per_id, distractors, junk, seed, test_ids, fixed)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in SPLIT_DIRS.values():
        (tmp / d).mkdir(parents=True)
    _draw_all(tmp, persons, cameras, jobs, tuple(size), seed, workers, progress)
    (tmp / MARKER).write_text(json.dumps({"params": params, "images": len(jobs)}, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first with the same arguments
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"synthetic dataset: {len(jobs)} images in {time.perf_counter() - start:.1f} s -> {out}")
    return load(out)


def _draw_all(out: Path, persons, cameras, jobs, size, seed, workers: int, progress: bool) -> None:
    workers = workers or min(4, os.cpu_count() or 1)
    chunk = 250
    tasks = [(str(out), persons, cameras, jobs[i:i + chunk], size, seed) for i in range(0, len(jobs), chunk)]
    done = 0
    if workers <= 1 or len(tasks) == 1:
        results = map(_draw_chunk, tasks)
        for n in results:
            done += n
            _progress(progress, done, len(jobs))
        return
    with ProcessPoolExecutor(workers) as pool:
        for n in pool.map(_draw_chunk, tasks):
            done += n
            _progress(progress, done, len(jobs))


def _progress(enabled: bool, done: int, total: int) -> None:
    if enabled:
        print(f"\r  drawing {done}/{total} images", end="\n" if done == total else "", flush=True)


def contact_sheet(root: str | Path, path: str | Path, *, ids: int = 8, per_id: int = 8) -> Path:
    """A PNG grid: one row per training identity, its images across cameras (for the README / MLflow)."""
    split = load(root)
    by_pid: dict[int, list] = {}
    for r in split.train:
        by_pid.setdefault(r.pid, []).append(r)
    rows = [sorted(rs, key=lambda r: (r.camid, r.path))[:per_id] for _, rs in sorted(by_pid.items())[:ids]]
    h, w = Image.open(rows[0][0].path).size[::-1]
    sheet = Image.new("RGB", (per_id * (w + 4), len(rows) * (h + 4)), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, rec in enumerate(row):
            sheet.paste(Image.open(rec.path), (j * (w + 4) + 2, i * (h + 4) + 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic",
                                     description="Write a synthetic Market-format re-ID dataset.")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--ids", type=int, default=24, help="identities per split (train and test each) (default: 24)")
    parser.add_argument("--images-per-id", type=int, default=10, help="images of each identity (default: 10)")
    parser.add_argument("--distractors", type=int, default=40,
                        help="gallery images of people in no query (Market's 0000) (default: 40)")
    parser.add_argument("--junk", type=int, default=30, help="junk gallery images (Market's -1) (default: 30)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"),
                        help="image height and width (default: 128 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the draw: another seed, other people and cameras (default: 0)")
    parser.add_argument("--workers", type=int, default=0, help="drawing processes (0 = up to 4) (default: 0)")
    parser.add_argument("--counts", choices=sorted(COUNTS),
                        help="exact split sizes of this dataset (then --ids/--images-per-id/--distractors/--junk "
                             "are ignored)")
    parser.add_argument("--contact-sheet", help="also write a PNG of sample identities here")
    args = parser.parse_args(argv)
    try:
        split = generate(args.out, ids=args.ids, images_per_id=args.images_per_id, distractors=args.distractors,
                         junk=args.junk, size=tuple(args.size), seed=args.seed, workers=args.workers,
                         progress=True, counts=args.counts)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(split.summary())
    if args.contact_sheet:
        print(f"contact sheet: {contact_sheet(args.out, args.contact_sheet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
