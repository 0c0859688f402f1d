"""Result outputs for people: the mask PNG and a downscaled overlay with boxes and points."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .result import Result


def save_mask(mask: np.ndarray, path: str | Path) -> None:
    """(H, W) bool -> full-resolution 8-bit PNG with 0/255."""
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def save_overlay(image: np.ndarray, res: Result, path: str | Path, max_side: int = 1920) -> None:
    """Mask in red over the image, GSE box yellow, crop box cyan, LPR box green, points magenta."""
    h, w = image.shape[:2]
    s = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    base = Image.fromarray(image).resize(size, Image.BILINEAR).convert("RGBA")
    if res.mask is not None and res.mask.any():
        m = Image.fromarray(res.mask.astype(np.uint8) * 140).resize(size, Image.NEAREST)
        red = Image.new("RGBA", size, (255, 0, 0, 0))
        red.putalpha(m)
        base = Image.alpha_composite(base, red)
    draw = ImageDraw.Draw(base)
    for box, colour in ((res.gse_box, "yellow"), (res.crop_box, "cyan"), (res.lpr_box, "lime")):
        if box is not None:
            x0, y0, x1, y1 = (v * s for v in box)  # a model may emit x1 < x0: draw the same rectangle
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=3)
    for x, y in res.points:
        r = 6
        draw.ellipse([x * s - r, y * s - r, x * s + r, y * s + r], outline="magenta", width=3)
    base.convert("RGB").save(path)
