"""The region between the stages: GSE box -> square crop of the original image, and mask paste.

All boxes are (x_min, y_min, x_max, y_max) ints in original-image pixels, max exclusive when used
as a slice.
"""
from __future__ import annotations

import numpy as np

from .config import REGION_MODES


def dynamic_box(bbox, width: int, height: int, mode: str = "clamp", min_side: int = 512):
    """Square region around the GSE box: side = max(min_side, box w, box h), centred on the box.

    "clamp" (reference): each edge is clamped independently into [0, W-1] / [0, H-1], so the box
    shrinks at borders and never includes the last row/column; an empty result falls back to the
    whole image. "shift": the square keeps its side (capped at the image size) and is moved inside.
    """
    if mode not in REGION_MODES:
        raise ValueError(f"region mode must be one of {REGION_MODES}, got {mode!r}")
    x1, y1, x2, y2 = bbox
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(min_side, max(x2 - x1, y2 - y1))
    if mode == "clamp":
        x0, x1_ = _clamp_span(cx, side, width)
        y0, y1_ = _clamp_span(cy, side, height)
        if x1_ <= x0 or y1_ <= y0:
            return (0, 0, width, height)
        return (x0, y0, x1_, y1_)
    x0, x1_ = _shift_span(cx, side, width)
    y0, y1_ = _shift_span(cy, side, height)
    return (x0, y0, x1_, y1_)


def _clamp_span(c: float, side: float, size: int) -> tuple[int, int]:
    lo, hi = int(round(c - side / 2)), int(round(c + side / 2))
    return min(max(lo, 0), size - 1), min(max(hi, 0), size - 1)


def _shift_span(c: float, side: float, size: int) -> tuple[int, int]:
    side = min(int(side), size)
    lo = min(max(int(round(c - side / 2)), 0), size - side)
    return lo, lo + side


def crop(image, box) -> np.ndarray:
    """(h, w, 3) uint8 of `image` ((H, W, 3) array: a view; PIL image: a copy) inside `box`."""
    x0, y0, x1, y1 = box
    if not isinstance(image, np.ndarray):  # PIL.Image (see image.decode); box lies inside it
        return np.asarray(image.crop((x0, y0, x1, y1)))
    return image[y0:y1, x0:x1]


def paste_mask(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Full-size (H, W) bool mask with the crop's (h, w) `mask` placed at `box`."""
    full = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = box
    full[y0:y1, x0:x1] = mask
    return full


def to_original(xy, box):
    """Crop-pixel coordinates (x, y, x, y, ...) -> original-image pixels by adding the crop origin."""
    return tuple(int(v) + (box[0] if i % 2 == 0 else box[1]) for i, v in enumerate(xy))
