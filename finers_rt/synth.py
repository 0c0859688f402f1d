"""Synthetic FineRS-4k-format dataset: textured 4K frames with small coloured shapes.

For tests, smoke runs and benchmarks without the 18 GB benchmark download. Every annotation is
one object; objects are sized so that `area_percent` spans the S / XS / XXS buckets, some sit
within 100 px of an image edge (exercising region clamping), and the three Q-types and four
attributes (colors, shape, position, others) all occur. Output is byte-identical for a seed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

logger = logging.getLogger(__name__)

WIDTH, HEIGHT = 3840, 2160  # UAV 4K frame, pixels
JPEG_QUALITY = 90
QUESTIONS_PER_IMAGE = 3

COLOURS = {  # RGB, saturated so objects stand out from the muted background
    "red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40),
    "yellow": (235, 220, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "orange": (245, 130, 20), "purple": (140, 40, 180),
}
SHAPES = {  # name -> (vertex count, angle of the first vertex in degrees); all regular polygons
    "triangle": (3, -90.0), "square": (4, 45.0), "diamond": (4, 0.0),
    "hexagon": (6, 0.0), "circle": (32, 0.0),
}
CORNERS = {
    "triangle": "three", "square": "four", "diamond": "four", "hexagon": "six", "circle": "zero",
}
HORIZONTAL = ("left", "middle", "right")
VERTICAL = ("top", "middle", "bottom")
# Target area_percent ranges, kept well inside the bucket limits (0.017 / 0.055).
BUCKET_RANGES = {"S": (0.07, 0.16), "XS": (0.024, 0.045), "XXS": (0.006, 0.012)}
BUCKET_CYCLE = ("S", "XS", "XXS")
TASK_CYCLE = ("referring", "reasoning", "option")
ATTRIBUTE_CYCLE = ("colors", "shape", "position", "others")
BORDER_GAP = (2.0, 60.0)  # px between a border object's bbox and its image edge
LUM_BIAS = 64  # uint8 bias for the signed background luminance term


@dataclass(frozen=True)
class _Object:
    colour: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    radius: float  # circumradius, pixels
    polygon: list[list[float]]  # (K, 2) xy, original pixels, rounded to 0.01


def _background(rng: np.random.Generator) -> Image.Image:
    """(H, W) RGB texture: smooth colour blobs + mid-frequency mottling + grain (~0.2 s).

    The signed luminance term (mottle + grain, within +-35) is stored with a +64 bias in uint8
    and added by ImageChops with offset -64, which clips to 0..255 without an int16 RGB copy.
    """
    # Muted terrain tones: a grey level per blob plus a small per-channel tint.
    grey = rng.uniform(80, 140, size=(9, 16, 1))
    coarse = (grey + rng.uniform(-20, 20, size=(9, 16, 3))).astype(np.uint8)
    blobs = Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC)
    mid = rng.uniform(103, 153, size=(68, 120)).astype(np.uint8)  # 128 +- 25
    mottle = np.asarray(Image.fromarray(mid).resize((WIDTH, HEIGHT), Image.BICUBIC), np.int16)
    grain = rng.integers(-10, 11, size=(HEIGHT, WIDTH), dtype=np.int16)
    lum = Image.fromarray((mottle - 128 + grain + LUM_BIAS).astype(np.uint8))  # (H, W)
    return ImageChops.add(blobs, Image.merge("RGB", [lum] * 3), scale=1.0, offset=-LUM_BIAS)


def _regular_polygon(cx: float, cy: float, radius: float, shape: str) -> list[list[float]]:
    """Vertices [x, y] of `shape` centred at (cx, cy), rounded to 0.01 px."""
    k, angle0 = SHAPES[shape]
    angles = np.deg2rad(angle0) + 2 * np.pi * np.arange(k) / k
    return [
        [round(cx + radius * math.cos(a), 2), round(cy + radius * math.sin(a), 2)] for a in angles
    ]


def _polygon_area(points: list[list[float]]) -> float:
    """Shoelace area of a simple polygon, px^2."""
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def _radius_for(shape: str, area_percent: float) -> float:
    """Circumradius giving a regular `shape` of `area_percent` % of the frame."""
    k, _ = SHAPES[shape]
    area_px = area_percent / 100 * WIDTH * HEIGHT
    return math.sqrt(area_px / (0.5 * k * math.sin(2 * math.pi / k)))


def _border_centre(rng: np.random.Generator, r: float) -> tuple[float, float]:
    """Centre putting the object 2-60 px from a random edge, fully inside the frame."""
    gap = rng.uniform(*BORDER_GAP)
    along_x = rng.uniform(r + 2, WIDTH - 1 - r - 2)
    along_y = rng.uniform(r + 2, HEIGHT - 1 - r - 2)
    edge = int(rng.integers(4))
    return [(r + gap, along_y), (WIDTH - 1 - r - gap, along_y),
            (along_x, r + gap), (along_x, HEIGHT - 1 - r - gap)][edge]


def _place(
    rng: np.random.Generator, r: float, near_border: bool, taken: list[_Object]
) -> tuple[float, float]:
    """Centre for an object of circumradius r that keeps 50 px clear of the objects in `taken`."""
    for _ in range(1000):
        if near_border:
            cx, cy = _border_centre(rng, r)
        else:
            cx, cy = rng.uniform(r + 150, WIDTH - r - 150), rng.uniform(r + 150, HEIGHT - r - 150)
        if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.radius + 50 for o in taken):
            return float(cx), float(cy)
    raise RuntimeError("could not place a synthetic object without overlap")


def _position(obj: _Object) -> tuple[str, str]:
    """(descriptor like "top-left", horizontal word) from the object's centre in frame thirds."""
    h = HORIZONTAL[min(int(3 * obj.cx / WIDTH), 2)]
    v = VERTICAL[min(int(3 * obj.cy / HEIGHT), 2)]
    parts = [w for w in (v, h) if w != "middle"]  # "top-left", "top", "left" ...
    return "-".join(parts) or "center", h


def _qa(obj: _Object, attribute: str) -> tuple[str, str, tuple[str, ...]]:
    """(question, one-word answer, answer vocabulary) asking about `attribute` of `obj`."""
    desc, horiz = _position(obj)
    if attribute == "colors":
        return f"What colour is the {obj.shape} near the {desc}?", obj.colour, tuple(COLOURS)
    if attribute == "shape":
        return f"What shape is the {obj.colour} object?", obj.shape, tuple(SHAPES)
    if attribute == "position":
        q = f"Is the {obj.colour} {obj.shape} on the left, middle or right of the image?"
        return q, horiz, HORIZONTAL
    q = f"How many corners does the {obj.colour} object have?"
    return q, CORNERS[obj.shape], ("zero", "three", "four", "six")


def _options(
    rng: np.random.Generator, answer: str, vocab: tuple[str, ...]
) -> tuple[list[str], str]:
    """Up to four lettered options containing `answer`; returns (options, correct letter)."""
    others = [v for v in vocab if v != answer]
    picks = [others[i] for i in rng.permutation(len(others))[:3]] + [answer]
    order = [picks[i] for i in rng.permutation(len(picks))]
    letters = "ABCD"
    return [f"{letters[i]}. {v}" for i, v in enumerate(order)], letters[order.index(answer)]


def _annotation(rng: np.random.Generator, obj: _Object, index: int, image_name: str) -> dict:
    """FineRS-4k annotation record for annotation number `index` about `obj`."""
    task = TASK_CYCLE[index % 3]
    rec = {"id": f"synth-{index:05d}", "image_path": image_name}
    if task == "referring":
        rec.update({"Q": f"the {obj.colour} {obj.shape}", "A": f"{obj.colour} {obj.shape}",
                    "attribute": "colors"})
    else:
        attribute = ATTRIBUTE_CYCLE[(index // 3) % len(ATTRIBUTE_CYCLE)]
        q, a, vocab = _qa(obj, attribute)
        rec.update({"Q": q, "A": a, "attribute": attribute})
        if task == "option":
            rec["options"], rec["A"] = _options(rng, a, vocab)
    area = 100 * _polygon_area(obj.polygon) / (WIDTH * HEIGHT)
    rec.update({"Q-type": task, "points": obj.polygon, "area_percent": round(area, 6)})
    return rec


def _make_objects(rng: np.random.Generator, indices: range) -> list[_Object]:
    """One object per annotation index; distinct colour and shape within the image."""
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [list(SHAPES)[i] for i in rng.permutation(len(SHAPES))]
    objects: list[_Object] = []
    for j, index in enumerate(indices):
        bucket = BUCKET_CYCLE[(index + index // 3) % 3]  # decorrelated from the task cycle
        r = _radius_for(shapes[j], rng.uniform(*BUCKET_RANGES[bucket]))
        cx, cy = _place(rng, r, near_border=index % 4 == 0, taken=objects)
        poly = _regular_polygon(cx, cy, r, shapes[j])
        objects.append(_Object(colours[j], shapes[j], cx, cy, r, poly))
    return objects


def _render(rng: np.random.Generator, objects: list[_Object]) -> Image.Image:
    """Background plus the objects, rasterised like the GT masks (fill and 1 px outline)."""
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    for o in objects:
        rgb = COLOURS[o.colour]
        draw.polygon([tuple(p) for p in o.polygon], fill=rgb, outline=rgb)
    return img


def make_synth(outdir: Path, n: int = 20, seed: int = 0) -> Path:
    """Write n annotations over ceil(n/3) images to outdir; return outdir/annotations.json.

    Layout: outdir/images/synth_XXXX.jpg (3840x2160, JPEG q90) and outdir/annotations.json
    (`{"annotations": [...]}`, image_path relative to outdir/images). Existing files of the same
    name are overwritten; nothing else in outdir is touched.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    outdir = Path(outdir)
    images_dir = outdir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for img_idx, start in enumerate(range(0, n, QUESTIONS_PER_IMAGE)):
        indices = range(start, min(start + QUESTIONS_PER_IMAGE, n))
        objects = _make_objects(rng, indices)
        name = f"synth_{img_idx:04d}.jpg"
        _render(rng, objects).save(images_dir / name, "JPEG", quality=JPEG_QUALITY)
        records += [_annotation(rng, o, i, name) for o, i in zip(objects, indices)]
    ann_path = outdir / "annotations.json"
    ann_path.write_text(json.dumps({"annotations": records}, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote %d synthetic annotations over %d images to %s", n, img_idx + 1, outdir)
    return ann_path
