"""Image loading and the reference's PIL resizes (pure PIL/numpy; shared by every backend)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .host_parallel import resize, resize_array
from .jpeg_stream import open_resized

# Refuse decompression bombs loudly rather than allocate: 4x the largest FineRS frame (8.3 Mpx).
Image.MAX_IMAGE_PIXELS = 4 * 3840 * 2160
ORIENTATION = 0x0112  # EXIF tag id


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
    return np.asarray(open_rgb(image), dtype=np.uint8)


def decode(image) -> np.ndarray | Image.Image:
    """`load_image`'s checks, but files and bytes stay a PIL image: the stage resizes read it
    directly and `region.crop` copies only the crop, skipping the (H, W, 3) conversion."""
    if isinstance(image, np.ndarray):
        return load_image(image)
    return open_rgb(image)


def decode_for_stage(image, size: tuple[int, int], threads: int) -> tuple[np.ndarray | Image.Image, np.ndarray | None]:
    """`decode(image)` and, for JPEG files or bytes when threads > 1, its BILINEAR resize to
    size = (width, height) made while the JPEG decodes (`jpeg_stream`, byte-identical to
    `resize_bilinear(decode(image), size)`); the resize is None where it was not made."""
    if threads > 1 and isinstance(image, (bytes, bytearray, str, Path)):
        try:
            made = open_resized(image, size)
        except OSError as e:
            name = "<bytes>" if isinstance(image, (bytes, bytearray)) else str(image)
            raise ImageLoadError(f"{name}: cannot decode image ({e})") from None
        if made is not None:
            return made
    return decode(image), None


def image_size(image: np.ndarray | Image.Image) -> tuple[int, int]:
    """(width, height) in pixels of an array or a PIL image."""
    if isinstance(image, Image.Image):
        return image.size
    return image.shape[1], image.shape[0]


def open_rgb(image) -> Image.Image:
    """Path, bytes or PIL image -> decoded RGB PIL image (EXIF applied), as `load_image` checks it.

    The fast host path resizes this image directly: a 4K PIL -> numpy conversion costs ~20 ms.
    """
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


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even when nothing turns
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):  # 16-bit gray: keep the top 8 bits (PIL's convert clips at 255)
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    else:
        im.load()  # decode now, inside the error handling, not lazily after the file is closed
    if im.width < 1 or im.height < 1:
        raise ImageLoadError(f"empty image {im.height}x{im.width}")
    return im


def resize_bilinear(image: np.ndarray | Image.Image, size: tuple[int, int], threads: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 or RGB PIL image -> (size[1], size[0], 3) uint8 with PIL BILINEAR, as the
    reference resizes. threads > 1: PIL's passes split into bands, byte-identical
    (`host_parallel.resize`)."""
    if isinstance(image, Image.Image):
        return np.asarray(resize(image, tuple(size), Image.BILINEAR, threads, scratch=True))
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return resize_array(image, size, Image.BILINEAR, threads)


def swap_rb(image: np.ndarray) -> np.ndarray:
    """R and B swapped: the reference's BGR->RGB conversion applied to an RGB crop (LPR input)."""
    return np.ascontiguousarray(image[..., ::-1])
