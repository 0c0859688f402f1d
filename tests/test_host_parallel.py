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


def test_scratch_results_are_copied_and_per_thread():
    """resize_array reuses this thread's scratch images between calls; what it returns is a copy,
    so a second call of the same size leaves the first result as it was (and both equal PIL), and
    another thread gets its own scratch image."""
    a, b = (Image.fromarray(_textured(1920, 1080, seed)) for seed in (3, 4))
    first = host_parallel.resize_array(np.asarray(a), (1932, 1092), Image.BICUBIC, 2)
    kept = first.copy()
    second = host_parallel.resize_array(np.asarray(b), (1932, 1092), Image.BICUBIC, 2)
    assert np.array_equal(first, kept) and np.array_equal(first, np.asarray(a.resize((1932, 1092), Image.BICUBIC)))
    assert np.array_equal(second, np.asarray(b.resize((1932, 1092), Image.BICUBIC)))
    here = host_parallel.scratch_image("out", "RGB", (64, 32))
    assert host_parallel.scratch_image("out", "RGB", (64, 32)) is here  # reused on this thread
    other = host_parallel._executor().submit(host_parallel.scratch_image, "out", "RGB", (64, 32)).result()
    assert other is not here


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


# --- normalise + patchify (qwen_vision_host._normalise_units) against HF's formula -------------


def _hf_patches(resized: np.ndarray, cfg: VisionPreprocessConfig) -> np.ndarray:
    """Independent reference: HF Qwen2VLImageProcessor's arithmetic, written out per pixel (rescale
    in float64 then cast, normalise in float32, tile T frames, reshape + transpose into patches)."""
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    x = np.tile(x.transpose(2, 0, 1)[None], (t, 1, 1, 1))  # (T, C, H, W)
    gh, gw = resized.shape[0] // p, resized.shape[1] // p
    x = x.reshape(1, t, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * t * p * p)


# (patch, merge, temporal): Qwen2.5-VL's (14, 2, 2), then odd patches (single-pixel lookups),
# a merge of 3 and other frame counts
PATCH_CONFIGS = [(14, 2, 2), (7, 2, 2), (5, 3, 3), (14, 1, 1), (6, 2, 2)]


@pytest.mark.parametrize("patch,merge,frames", PATCH_CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("units", [(1, 1), (3, 7), (39, 69), (2, 130)], ids=lambda u: f"{u[0]}x{u[1]}")
def test_patchify_equals_hf_formula_in_any_order(vision_cfg, patch, merge, frames, units):
    """Raster and window order, 1-3 threads, fresh or reused output: bit-identical to HF's math.
    39x69 units is GSE's 1932x1092; the others are odd grids (one unit, partial windows)."""
    from dataclasses import replace

    from finers_rt.qwen_vision_host import PixelBuffer, _normalise_units, window_index

    cfg = replace(vision_cfg, patch_size=patch, merge_size=merge, temporal_patch_size=frames,
                  window_size=patch * merge * 4)
    f = patch * merge
    resized = _textured(units[1] * f, units[0] * f, seed=patch + units[1])
    expected = _hf_patches(resized, cfg).reshape(-1, merge * merge, 3 * frames * patch * patch)
    raster = np.arange(units[0] * units[1])
    window, _ = window_index((1, units[0] * merge, units[1] * merge), merge, 4)
    buffer = PixelBuffer()
    for order in (raster, window):
        rows, cols = np.divmod(order, units[1])
        want = expected[order].reshape(-1, expected.shape[2])
        for threads in (1, 2, 3):
            got = _normalise_units(resized, rows, cols, cfg, None, threads)
            assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
            reused = _normalise_units(resized, rows, cols, cfg, buffer.get(want.shape), threads)
            assert reused.tobytes() == want.tobytes()


def test_vision_inputs_into_a_reused_buffer(vision_cfg):
    """A PixelBuffer gives the same feeds as fresh arrays, writes into the same memory on the next
    call of the same shape, and is per thread."""
    from concurrent.futures import ThreadPoolExecutor

    from finers_rt.qwen_vision_host import PixelBuffer

    buffer = PixelBuffer()
    for seed, (w, h) in enumerate([(517, 333), (517, 333), (512, 512)]):
        image = _textured(w, h, seed)
        fresh, rev1, grid1 = vision_inputs(image, vision_cfg, threads=2)
        first = buffer.get(fresh["pixel_values"].shape) if seed == 1 else None
        reused, rev2, grid2 = vision_inputs(image, vision_cfg, threads=2, out=buffer)
        assert grid1 == grid2 and np.array_equal(rev1, rev2)
        for name in fresh:
            assert fresh[name].tobytes() == reused[name].tobytes(), name
        if first is not None:
            assert np.shares_memory(first, reused["pixel_values"])
    mine = buffer.get((4, 8))
    other = ThreadPoolExecutor(1).submit(buffer.get, (4, 8)).result()
    assert buffer.get((4, 8)) is mine and not np.shares_memory(mine, other)
