"""Host-side image work split across threads, bit-identical to the single-threaded PIL/numpy calls.

Why this is exact: PIL's resample is separable and runs as two 1-D passes with a uint8 image in
between (horizontal first, over the rows the vertical pass needs; Pillow's Resample.c). A
horizontal-only resize of a band of full rows computes the same output rows with the same
coefficients as the full call, because horizontal coefficients depend only on the x geometry;
likewise a vertical-only resize of a band of full-height columns. So: horizontal pass on row
bands -> stitch -> vertical pass on column bands -> stitch == `im.resize(size, resample)`, byte
for byte, at any size and for any filter. PIL's resample and paste release the GIL, so the bands
(each pasting its own rows or columns) run in parallel (tests/test_host_parallel.py checks
equality on odd sizes and both filters). The patchify that follows (`map_bands`) splits its merge
units the same way (GSE size, 2 cores: 12.2 ms on 2 threads vs 21.8 ms on 1, p50 of 25 alternated).

Threads: FINERS_RT_HOST_THREADS, else min(4, cores). 1 means the plain single calls.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def _threads_from_env() -> int:
    raw = os.environ.get("FINERS_RT_HOST_THREADS")
    if raw is None:
        return min(4, os.cpu_count() or 1)
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"FINERS_RT_HOST_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


HOST_THREADS = _threads_from_env()

_pool: ThreadPoolExecutor | None = None
# Bands thinner than this cost more in crop/paste overhead than they save (pixels per band).
_MIN_BAND_PIXELS = 256 * 256


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(HOST_THREADS, 1), thread_name_prefix="finers-host")
    return _pool


def bands(n: int, k: int) -> list[tuple[int, int]]:
    """[start, stop) spans splitting range(n) into k near-equal bands (k clipped to 1..n)."""
    k = max(1, min(k, n))
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def map_bands(fn, n: int, threads: int) -> None:
    """fn((start, stop)) for each of `bands(n, threads)`, on the host pool when there are several."""
    spans = bands(n, threads)
    if len(spans) == 1:
        fn(spans[0])
    else:
        list(_executor().map(fn, spans))


def _band_count(threads: int, pixels: int) -> int:
    return max(1, min(threads, pixels // _MIN_BAND_PIXELS))


_scratch = threading.local()
SCRATCH_IMAGES = 6  # per thread: the GSE and LPR sizes of each slot, with room to spare


def scratch_image(slot: str, mode: str, size: tuple[int, int]) -> Image.Image:
    """An uninitialised `mode` image of `size` (width, height), the same one each time this thread
    asks for this slot and size; its user overwrites every pixel and is done with it before asking
    again. Why: a fresh multi-megabyte image is page-faulted in on its first write, and glibc gives
    freed ones back to the kernel (the heap top passes its trim threshold), so every frame paid
    again: BICUBIC 1920x1080 -> 1932x1092 on 2 threads, p50 33 vs 22 ms, ~6,000 vs 0 page faults
    per call (2-core EPYC). Least recently used images beyond SCRATCH_IMAGES are dropped."""
    cache = getattr(_scratch, "images", None)
    if cache is None:
        cache = _scratch.images = {}
    key = (slot, mode, tuple(size))
    im = cache.pop(key, None)
    if im is None:
        im = Image.new(mode, tuple(size), None)
        while len(cache) >= SCRATCH_IMAGES:
            cache.pop(next(iter(cache)))  # the least recently used
    cache[key] = im
    return im


def resize(im: Image.Image, size: tuple[int, int], resample: int, threads: int = HOST_THREADS, *,
           scratch: bool = False) -> Image.Image:
    """`im.resize(size, resample)`, byte-identical, with each 1-D pass split into `threads` bands.

    size: (width, height) in pixels, as PIL takes it. scratch: the result is this thread's
    `scratch_image` (no page faults), overwritten by its next resize to the same size: copy it
    first (np.asarray does). The intermediate image between the passes is always a scratch one.
    """
    (w_in, h_in), (w, h) = im.size, tuple(size)
    if threads <= 1 or (w, h) == (w_in, h_in) or im.mode not in ("RGB", "L"):
        return im.resize((w, h), resample)
    pool = _executor()
    mid = im
    if w != w_in:  # horizontal pass: row bands of the input, (w, band) each
        if h == h_in and not scratch:  # the horizontal pass's output is the result
            mid = Image.new(im.mode, (w, h_in), None)  # not initialised: the bands cover every row
        else:
            mid = scratch_image("out" if h == h_in else "mid", im.mode, (w, h_in))

        def horizontal(span):
            y0, y1 = span
            mid.paste(im.crop((0, y0, w_in, y1)).resize((w, y1 - y0), resample), (0, y0))

        list(pool.map(horizontal, bands(h_in, _band_count(threads, w * h_in))))
    if h == h_in:
        return mid
    out = scratch_image("out", im.mode, (w, h)) if scratch else Image.new(im.mode, (w, h), None)

    def vertical(span):  # vertical pass: column bands of the horizontal result, (band, h) each
        x0, x1 = span
        out.paste(mid.crop((x0, 0, x1, h_in)).resize((x1 - x0, h), resample), (x0, 0))

    list(pool.map(vertical, bands(w, _band_count(threads, w * h))))
    return out


def resize_array(image: np.ndarray, size: tuple[int, int], resample: int, threads: int = HOST_THREADS) -> np.ndarray:
    """(H, W, C) uint8 -> (size[1], size[0], C) uint8: `resize` on an array."""
    return np.asarray(resize(Image.fromarray(image), size, resample, threads, scratch=True))
