"""Image loading and the reference's PIL resizes (pure PIL/numpy; shared by every backend)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Refuse decompression bombs loudly rather than allocate: 4x the largest FineRS frame (8.3 Mpx).
Image.MAX_IMAGE_PIXELS = 4 * 3840 * 2160


class ImageLoadError(ValueError):
    """An input that is not a decodable image; the message says what was wrong."""


def load_image(image) -> np.ndarray:
    """Path, bytes, PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 RGB, decoded once.

    EXIF orientation is applied (the reference does not; FineRS frames carry no orientation tag,
    so this changes nothing there and makes phone/drone photos come out upright).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageLoadError(f"array images must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        return np.ascontiguousarray(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(image), "<bytes>"
    else:
        source, name = Path(image), str(image)
        if not source.is_file():
            raise ImageLoadError(f"image file not found: {name}")
    try:
        with Image.open(source) as im:
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:  # PIL only warns below 2x its limit
                raise ImageLoadError(
                    f"{name}: image too large ({im.width}x{im.height} px, limit {Image.MAX_IMAGE_PIXELS} px)")
            return _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{name}: cannot decode image ({e})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):  # 16-bit gray: keep the top 8 bits (PIL's convert clips at 255)
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageLoadError(f"empty image {arr.shape}")
    return arr


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[1], size[0], 3) uint8 with PIL BILINEAR, as the reference resizes."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def swap_rb(image: np.ndarray) -> np.ndarray:
    """R and B swapped: the reference's BGR->RGB conversion applied to an RGB crop (LPR input)."""
    return np.ascontiguousarray(image[..., ::-1])
