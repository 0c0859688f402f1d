"""Banded host work (finers_rt.host_parallel) against the plain single PIL / numpy calls."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finers_rt import host_parallel
from finers_rt.qwen_vision_host import VisionPreprocessConfig, pixel_values, vision_inputs

# (input w, h) -> (output w, h): the FineRS geometries (4K -> GSE 1920x1080 -> smart_resize
# 1932x1092; a crop -> LPR 512x512 -> 504x504) plus odd, thin and upscaling cases.
GEOMETRIES = [
    ((3840, 2160), (1920, 1080)),
    ((1920, 1080), (1932, 1092)),
    ((733, 411), (512, 512)),
    ((512, 512), (504, 504)),
    ((1001, 997), (333, 1517)),
    ((1, 900), (700, 3)),
    ((2000, 7), (1999, 700)),
]


def _textured(w: int, h: int, seed: int) -> np.ndarray:
    """Noise on gradients: every coefficient of the filters matters for some output pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x ^ y) & 255], -1)
    return np.clip(base + rng.integers(-60, 61, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resample", [Image.BILINEAR, Image.BICUBIC], ids=["bilinear", "bicubic"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0][0]}x{g[0][1]}-{g[1][0]}x{g[1][1]}")
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_banded_resize_is_byte_identical_to_pil(geometry, resample, threads):
    (w, h), size = geometry
    im = Image.fromarray(_textured(w, h, seed=w * 7 + h))
    expected = np.asarray(im.resize(size, resample))
    got = np.asarray(host_parallel.resize(im, size, resample, threads=threads))
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_banded_resize_grayscale_and_identity():
    im = Image.fromarray(_textured(640, 480, 1)[..., 0])
    assert np.array_equal(np.asarray(host_parallel.resize(im, (333, 222), Image.BILINEAR, 4)),
                          np.asarray(im.resize((333, 222), Image.BILINEAR)))
    rgb = Image.fromarray(_textured(640, 480, 2))
    assert np.array_equal(np.asarray(host_parallel.resize(rgb, (640, 480), Image.BICUBIC, 4)), np.asarray(rgb))


def test_bands_cover_the_range_once():
    for n, k in [(1, 4), (7, 3), (2160, 2), (10, 10), (5, 0)]:
        spans = host_parallel.bands(n, k)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a < b for a, b in spans) and all(s[1] == t[0] for s, t in zip(spans, spans[1:]))


@pytest.fixture(scope="module")
def vision_cfg(tiny_ckpt):
    return VisionPreprocessConfig.from_checkpoint(tiny_ckpt / "gse")


def test_threaded_pixel_values_and_vision_inputs_equal_single_threaded(vision_cfg):
    image = _textured(1920, 1080, 5)
    one, grid1 = pixel_values(image, vision_cfg, threads=1)
    many, grid4 = pixel_values(image, vision_cfg, threads=4)
    assert grid1 == grid4 and np.array_equal(one, many)
    feeds1, rev1, _ = vision_inputs(image, vision_cfg, threads=1)
    feeds4, rev4, _ = vision_inputs(image, vision_cfg, threads=4)
    assert np.array_equal(rev1, rev4)
    for name in feeds1:
        assert np.array_equal(feeds1[name], feeds4[name]), name
