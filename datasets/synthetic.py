"""A synthetic Market-format re-ID dataset: the embedded default, since real datasets cannot be downloaded here.

Pedestrians are drawn procedurally. An identity is a combination of attributes (top/bottom colours and
patterns, hair, body proportions, shoes, bag); ~30% of identities are look-alikes that copy another identity
and change one or two attributes, so colour histograms alone do not solve the task. Each of the 6 cameras has
its own background, colour cast, brightness, blur and viewpoint mix (front/back/side: a backpack is only seen
from behind, a chest logo only from the front); every image adds pose, scale and crop jitter and, sometimes, an
occluding pole or car. Train and test identities are disjoint; every test id gets one query per camera it
appears in; the gallery adds distractors (pid 0, people who are nobody's match) and junk (pid -1: background
crops and body fragments), as in Market-1501.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.market1501 import SPLIT_DIRS, load
from datasets.records import Split

NUM_CAMERAS = 6
MARKER = "synthetic.json"
PALETTE = {
    "black": (25, 25, 28), "white": (225, 225, 220), "grey": (120, 120, 125), "red": (180, 30, 35),
    "blue": (35, 60, 170), "navy": (25, 30, 80), "green": (40, 130, 60), "yellow": (215, 190, 40),
    "orange": (220, 120, 30), "purple": (110, 45, 140), "pink": (220, 130, 170), "brown": (110, 70, 40),
    "beige": (200, 175, 130), "teal": (30, 130, 130), "denim": (70, 95, 140), "khaki": (150, 140, 90),
}
COLORS = tuple(PALETTE)
PATTERNS = ("solid", "solid", "hstripes", "vstripes", "checks", "logo")
BOTTOMS = ("trousers", "trousers", "shorts", "skirt")
BAGS = ("none", "none", "backpack", "handbag", "shoulder")
HAIR = ("black", "brown", "beige", "grey", "yellow")
SKIN = ((235, 200, 170), (200, 150, 110), (150, 100, 70), (95, 65, 45))


@dataclass(frozen=True)
class Person:
    top: str
    top_pattern: str
    pattern_color: str
    bottom: str
    bottom_kind: str
    shoes: str
    hair: str
    long_hair: bool
    skin: int
    bag: str
    bag_color: str
    height: float  # fraction of the image height
    build: float  # shoulder width as a fraction of the height


@dataclass(frozen=True)
class Camera:
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    horizon: float
    cast: tuple[float, float, float]
    brightness: float
    blur: float
    views: tuple[float, float, float]  # P(front), P(back), P(side)
    clutter: tuple[tuple[float, float, float, float, int], ...]  # background boxes (x0, y0, x1, y1, grey)


# ------------------------------------------------------------------------------------------- sampling

def random_person(rng: np.random.Generator) -> Person:
    def pick(options):
        return options[int(rng.integers(len(options)))]

    return Person(top=pick(COLORS), top_pattern=pick(PATTERNS), pattern_color=pick(COLORS),
                  bottom=pick(COLORS), bottom_kind=pick(BOTTOMS), shoes=pick(("black", "white", "brown", "grey")),
                  hair=pick(HAIR), long_hair=bool(rng.random() < 0.35), skin=int(rng.integers(len(SKIN))),
                  bag=pick(BAGS), bag_color=pick(COLORS), height=float(rng.uniform(0.80, 0.92)),
                  build=float(rng.uniform(0.22, 0.32)))


def look_alike(base: Person, rng: np.random.Generator) -> Person:
    """Copy ``base`` and change one or two attributes: a hard negative for the re-ID model."""
    fresh = random_person(rng)
    fields = ["top", "top_pattern", "bottom", "bottom_kind", "hair", "bag", "shoes", "build"]
    changed = rng.choice(fields, size=int(rng.integers(1, 3)), replace=False)
    return replace(base, **{f: getattr(fresh, f) for f in changed})


def random_camera(rng: np.random.Generator) -> Camera:
    def colour(lo, hi):
        return tuple(int(v) for v in rng.integers(lo, hi, size=3))

    views = rng.dirichlet((2.0, 2.0, 1.5))
    clutter = tuple((float(x), float(y), float(x + w), float(y + h), int(g)) for x, y, w, h, g in zip(
        rng.uniform(-0.2, 1.0, 4), rng.uniform(0.0, 0.6, 4), rng.uniform(0.1, 0.5, 4),
        rng.uniform(0.1, 0.4, 4), rng.integers(40, 220, 4)))
    return Camera(sky=colour(60, 230), ground=colour(40, 180), horizon=float(rng.uniform(0.45, 0.8)),
                  cast=tuple(float(c) for c in rng.uniform(0.82, 1.18, 3)),
                  brightness=float(rng.uniform(0.75, 1.2)), blur=float(rng.uniform(0.0, 1.3)),
                  views=tuple(float(v) for v in views), clutter=clutter)


# ------------------------------------------------------------------------------------------- drawing

def render(person: Person | None, cam: Camera, size: tuple[int, int], seed: tuple[int, ...],
           *, fragment: bool = False) -> Image.Image:
    """One image of ``person`` seen by ``cam`` (None + fragment=True: a junk crop). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    h, w = size[0] * 2, size[1] * 2  # draw at 2x and downsample: cheap anti-aliasing
    img = Image.new("RGB", (w, h), cam.sky)
    draw = ImageDraw.Draw(img)
    _background(draw, cam, w, h, rng)
    if person is not None:
        view = ("front", "back", "side")[int(rng.choice(3, p=cam.views))]
        scale = rng.uniform(0.92, 1.06) * person.height * (1.8 if fragment else 1.0)
        cx = w * (0.5 + rng.uniform(-0.08, 0.08)) + (w * rng.uniform(-0.4, 0.4) if fragment else 0)
        top = h * (1 - scale) * rng.uniform(0.2, 0.9)
        _person(draw, person, view, cx, top, scale * h, rng)
    if rng.random() < 0.18:
        _occluder(draw, w, h, rng)
    img = img.resize((size[1], size[0]), Image.LANCZOS)
    return _camera_effects(img, cam, rng)


def _background(draw: ImageDraw.ImageDraw, cam: Camera, w: int, h: int, rng: np.random.Generator) -> None:
    y0 = int(h * (cam.horizon + rng.uniform(-0.05, 0.05)))
    draw.rectangle((0, y0, w, h), fill=cam.ground)
    for x0, ya, x1, yb, grey in cam.clutter:
        dx = rng.uniform(-0.1, 0.1)
        tint = tuple(int(grey * c) for c in (0.9, 1.0, 1.1))
        draw.rectangle((int((x0 + dx) * w), int(ya * h), int((x1 + dx) * w), int(yb * h)), fill=tint)


def _person(draw: ImageDraw.ImageDraw, p: Person, view: str, cx: float, top: float, ph: float,
            rng: np.random.Generator) -> None:
    skin, hair = SKIN[p.skin], PALETTE[p.hair]
    half = p.build * ph / 2 * (0.62 if view == "side" else 1.0)
    head_r = 0.065 * ph
    neck, hip, foot = top + 0.16 * ph, top + 0.52 * ph, top + ph
    stride = rng.uniform(0.0, 0.12) * ph * (1.6 if view == "side" else 0.6)
    # legs (two polygons, apart by the walking stride) and shoes
    leg_w = half * 0.45
    knee = hip + (foot - hip) * (0.45 if p.bottom_kind == "shorts" else 1.0)
    for sign in (-1, 1):
        x_hip, x_foot = cx + sign * half * 0.45, cx + sign * (half * 0.45 + stride / 2)
        draw.polygon([(x_hip - leg_w, hip), (x_hip + leg_w, hip), (x_foot + leg_w * 0.8, foot),
                      (x_foot - leg_w * 0.8, foot)], fill=skin)
        draw.polygon([(x_hip - leg_w, hip), (x_hip + leg_w, hip),
                      (x_hip + (x_foot - x_hip) * (knee - hip) / (foot - hip) + leg_w * 0.9, knee),
                      (x_hip + (x_foot - x_hip) * (knee - hip) / (foot - hip) - leg_w * 0.9, knee)],
                     fill=PALETTE[p.bottom])
        draw.rectangle((x_foot - leg_w, foot - 0.035 * ph, x_foot + leg_w * 1.2, foot), fill=PALETTE[p.shoes])
    if p.bottom_kind == "skirt":
        draw.polygon([(cx - half, hip - 0.02 * ph), (cx + half, hip - 0.02 * ph), (cx + half * 1.35, hip + 0.2 * ph),
                      (cx - half * 1.35, hip + 0.2 * ph)], fill=PALETTE[p.bottom])
    # torso with its pattern, then arms
    torso = (cx - half, neck, cx + half, hip)
    draw.rounded_rectangle(torso, radius=int(half * 0.3), fill=PALETTE[p.top])
    _pattern(draw, p, view, torso)
    arm_w = half * 0.32
    for sign in (-1, 1):
        if view == "side" and sign < 0:
            continue
        ax = cx + sign * (half + arm_w * 0.4)
        swing = rng.uniform(-0.06, 0.06) * ph
        draw.polygon([(ax - arm_w / 2, neck + 0.01 * ph), (ax + arm_w / 2, neck + 0.01 * ph),
                      (ax + arm_w / 2 + swing, hip), (ax - arm_w / 2 + swing, hip)], fill=PALETTE[p.top])
        draw.ellipse((ax + swing - arm_w / 2, hip - arm_w / 2, ax + swing + arm_w / 2, hip + arm_w / 2), fill=skin)
    _bag(draw, p, view, cx, half, neck, hip, ph)
    # head: hair covers the whole head from behind
    hy = neck - head_r * 1.05
    draw.ellipse((cx - head_r, hy - head_r, cx + head_r, hy + head_r), fill=hair if view == "back" else skin)
    draw.chord((cx - head_r * 1.05, hy - head_r * 1.1, cx + head_r * 1.05, hy + head_r * 0.6), 180, 360, fill=hair)
    if p.long_hair:
        draw.rectangle((cx - head_r * 1.05, hy, cx + head_r * 1.05, neck + 0.06 * ph), fill=hair)
        if view != "back":
            draw.ellipse((cx - head_r * 0.7, hy - head_r * 0.6, cx + head_r * 0.7, hy + head_r * 0.9), fill=skin)


def _pattern(draw: ImageDraw.ImageDraw, p: Person, view: str, box: tuple[float, ...]) -> None:
    x0, y0, x1, y1 = box
    colour = PALETTE[p.pattern_color]
    if p.top_pattern == "hstripes":
        for i in range(4):
            ya = y0 + (y1 - y0) * (0.12 + 0.22 * i)
            draw.rectangle((x0, ya, x1, ya + (y1 - y0) * 0.09), fill=colour)
    elif p.top_pattern == "vstripes":
        for i in range(3):
            xa = x0 + (x1 - x0) * (0.15 + 0.3 * i)
            draw.rectangle((xa, y0, xa + (x1 - x0) * 0.12, y1), fill=colour)
    elif p.top_pattern == "checks":
        cw, ch = (x1 - x0) / 4, (y1 - y0) / 5
        for i in range(4):
            for j in range(5):
                if (i + j) % 2:
                    draw.rectangle((x0 + i * cw, y0 + j * ch, x0 + (i + 1) * cw, y0 + (j + 1) * ch), fill=colour)
    elif p.top_pattern == "logo" and view == "front":
        mx, my = (x0 + x1) / 2, y0 + (y1 - y0) * 0.35
        r = (x1 - x0) * 0.22
        draw.ellipse((mx - r, my - r, mx + r, my + r), fill=colour)


def _bag(draw: ImageDraw.ImageDraw, p: Person, view: str, cx: float, half: float, neck: float, hip: float,
         ph: float) -> None:
    colour = PALETTE[p.bag_color]
    if p.bag == "backpack":
        if view == "back":
            draw.rounded_rectangle((cx - half * 0.8, neck + 0.03 * ph, cx + half * 0.8, hip - 0.04 * ph),
                                   radius=int(half * 0.2), fill=colour)
        elif view == "side":
            draw.rectangle((cx - half * 2.0, neck + 0.04 * ph, cx - half * 0.9, hip - 0.06 * ph), fill=colour)
        else:
            for sign in (-1, 1):
                draw.line((cx + sign * half * 0.6, neck, cx + sign * half * 0.6, hip - 0.1 * ph), fill=colour,
                          width=max(2, int(half * 0.15)))
    elif p.bag == "handbag":
        bx = cx + half * 1.3
        draw.rectangle((bx - 0.05 * ph, hip - 0.02 * ph, bx + 0.05 * ph, hip + 0.08 * ph), fill=colour)
    elif p.bag == "shoulder":
        draw.line((cx - half, neck, cx + half, hip), fill=colour, width=max(2, int(half * 0.12)))
        draw.rectangle((cx + half * 0.8, hip - 0.05 * ph, cx + half * 1.5, hip + 0.04 * ph), fill=colour)


def _occluder(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    grey = tuple(int(v) for v in rng.integers(30, 200, 3))
    if rng.random() < 0.5:  # a pole in front of the person
        x = rng.uniform(0.1, 0.9) * w
        draw.rectangle((x, 0, x + rng.uniform(0.08, 0.18) * w, h), fill=grey)
    else:  # a car or bench covering the legs
        draw.rectangle((0, rng.uniform(0.6, 0.8) * h, w, h), fill=grey)


def _camera_effects(img: Image.Image, cam: Camera, rng: np.random.Generator) -> Image.Image:
    if cam.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(cam.blur * rng.uniform(0.7, 1.3)))
    arr = np.asarray(img, dtype=np.float32)
    gain = np.asarray(cam.cast, dtype=np.float32) * cam.brightness * rng.uniform(0.9, 1.1)
    arr = arr * gain + rng.normal(0, 4.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


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
    parser = argparse.ArgumentParser(description="Write a synthetic Market-format re-ID dataset.")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--ids", type=int, default=24, help="identities per split (train and test each)")
    parser.add_argument("--images-per-id", type=int, default=10)
    parser.add_argument("--distractors", type=int, default=40)
    parser.add_argument("--junk", type=int, default=30)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="drawing processes (0 = up to 4)")
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
