"""Procedural pedestrians and cameras for the synthetic dataset (:mod:`datasets.synthetic` lays them out).

An identity is a combination of attributes (top/bottom colours and patterns, hair, body proportions, shoes, bag);
:func:`look_alike` copies another identity and changes one or two of them. Each camera has its own background,
colour cast, brightness, blur and viewpoint mix (front/back/side: a backpack is only seen from behind, a chest
logo only from the front); :func:`render` adds pose, scale and crop jitter and, sometimes, an occluding pole or car.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NUM_CAMERAS = 6
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
