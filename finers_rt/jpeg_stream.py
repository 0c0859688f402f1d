"""Decode a JPEG and resize it for GSE at the same time, byte-identical to decode-then-resize.

The host path for a 3840x2160 frame is JPEG decode (~28 ms, one thread: libjpeg decodes rows in
order) then PIL's BILINEAR resize to 1920x1080 (~50 ms of work). Run one after the other, one core
idles during the decode. Here the decode runs on a host thread and feeds rows as they come out,
while the caller's thread resizes the rows already decoded; so the resize's horizontal pass
(2/3 of its work) hides behind the decode.

Why the result is byte-identical to `open_rgb(src).resize(size, BILINEAR)`:
  - decode: the same Pillow JPEG decoder, fed the same bytes in chunks, as `ImageFile.load`
    feeds it (libjpeg's suspending source: the chunking never changes the pixels);
  - horizontal pass on row bands == the full pass's rows (`host_parallel`'s argument);
  - vertical pass, when the height ratio k = H_in / H_out is an integer (FineRS: 2160 / 1080):
    output rows [r0, r1) are `resize(..., box=(0, k*r0, w, k*r1))`, whose filter centres
    k*r0 + (i + 0.5)*k and scale k are exact in double precision and equal the full call's
    (i + r0 + 0.5)*k; the taps are clipped to the whole image, not the box (Pillow Resample.c
    `precompute_coeffs`). Any other ratio runs the vertical pass after the decode, in column bands.
Which rows are decoded: Pillow stores an RGB pixel in 4 bytes; a new image has the 4th (padding)
byte 0 and the JPEG decoder's RGB unpacker writes 255 there, so after each decoder call returns,
the decoded rows are those whose last pixel reads 255 (`tobytes("raw", "RGBX")` exposes the
byte). The decode thread probes after its own call returns and hands the count over under a lock,
so the rows' bytes are visible to the resizing thread on any memory model.

Only RGB baseline/progressive JPEGs without EXIF rotation take this path (`open_resized` returns
None for anything else, and the caller decodes as before); tests/test_jpeg_stream.py checks
byte equality on odd sizes, both subsamplings, progressive, restart markers and truncated files.
"""
from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from .host_parallel import HOST_THREADS, _executor, map_bands, resize, scratch_image

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # bytes per decoder call (Pillow's ImageFile.MAXBLOCK)
BAND_ROWS = 64  # smallest band the resizing thread takes while the decode runs (input rows)
# Largest band it takes in one step (input rows, ~3 ms of horizontal pass at 4K). It checks for the
# decode's end between steps: once the decode is done, the rest is split over every host thread,
# instead of one thread finishing a backlog alone while the decode's core idles (a 4K frame: the
# decode ends at ~34 ms; with the whole backlog as one band, the resize ran alone until ~50 ms).
STEP_ROWS = 128
ORIENTATION = 0x0112


def _decoded(view: Image.Image, lo: int, hi: int) -> int:
    """Rows [0, r) decoded, found by bisection in [lo, hi] (rows complete in order)."""
    last = view.width - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if view.crop((last, mid, last + 1, mid + 1)).tobytes("raw", "RGBX")[3] == 255:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _padding_clear(view: Image.Image) -> bool:
    """The progress probe's precondition: the padding byte of a sample of rows is 0."""
    return all(_decoded(view, y, y + 1) == y for y in range(0, view.height, max(1, view.height // 32)))


class _Progress:
    """Rows decoded so far, handed from the decode thread to the resizing thread."""

    def __init__(self):
        self.rows, self.finished, self.error = 0, False, None
        self.cond = threading.Condition()

    def publish(self, rows: int, finished: bool = False, error: BaseException | None = None) -> None:
        with self.cond:
            self.rows, self.finished, self.error = rows, finished, error
            self.cond.notify()

    def wait(self, at_least: int) -> tuple[int, bool]:
        with self.cond:
            while self.rows < at_least and not self.finished:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            return self.rows, self.finished


def _decode(decoder, data: memoryview, view: Image.Image, progress: _Progress) -> None:
    """Pillow's `ImageFile.load` loop for one JPEG tile, publishing decoded rows per call."""
    rows, pending, pos, err = 0, b"", 0, 0
    try:
        while True:
            chunk = data[pos:pos + CHUNK]
            pos += len(chunk)
            if not chunk:
                raise OSError(f"image file is truncated ({len(pending)} bytes not processed)")
            pending = pending + chunk
            n, err = decoder.decode(pending)
            if n < 0:
                break
            pending = pending[n:]
            rows = _decoded(view, rows, view.height)
            progress.publish(rows)
        if err < 0:
            raise OSError(f"decoder error {err}")
        progress.publish(view.height, finished=True)
    except BaseException as e:  # handed to the resizing thread, which raises it
        progress.publish(rows, finished=True, error=e)
    finally:
        decoder.cleanup()


def _eligible(im: Image.Image) -> bool:
    return (im.format == "JPEG" and im.mode == "RGB" and len(im.tile) == 1 and im.tile[0][0] == "jpeg"
            and im.getexif().get(ORIENTATION, 1) == 1 and not ImageFile.LOAD_TRUNCATED_IMAGES
            and im.width * im.height <= Image.MAX_IMAGE_PIXELS)


def open_resized(source, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray] | None:
    """JPEG path or bytes -> (decoded RGB image, (size[1], size[0], 3) uint8 BILINEAR resize),
    equal byte for byte to `image.open_rgb(source)` and its `resize(size, BILINEAR)`.

    None when the source is not an RGB JPEG this path handles, or is not shrunk horizontally
    (then there is nothing to overlap): the caller decodes it the usual way. Decode errors raise
    OSError (the caller's ImageLoadError wraps them as for any image).
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif Path(source).is_file():
        data = Path(source).read_bytes()
    else:
        return None  # the usual path reports it
    try:  # (an oversized frame's DecompressionBombWarning shows once: same source line both ways)
        with Image.open(io.BytesIO(data)) as im:
            (W, H), (w, h) = im.size, tuple(size)
            if not _eligible(im) or w >= W or h > H:
                return None
            tile, config = im.tile[0], im.decoderconfig
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # not an image Pillow opens: the usual path reports it
    core = Image.core.new("RGB", (W, H))
    view = Image.Image()._new(core)  # shares `core`: the decoder's writes show through
    if not _padding_clear(view):
        log.debug("new image padding is not zero in this Pillow: decoding the usual way")
        return None
    decoder = Image._getdecoder("RGB", tile[0], tile[3], config)
    decoder.setimage(core, tile[1])
    progress = _Progress()
    decoding = _executor().submit(_decode, decoder, memoryview(data)[tile[2]:], view, progress)
    try:
        out = _resize_rows(view, (w, h), progress)
    finally:
        decoding.result()  # the decode thread always finishes (errors are published, not raised)
    return view, out


def _resize_rows(view: Image.Image, size: tuple[int, int], progress: _Progress) -> np.ndarray:
    """BILINEAR resize of `view` to size, reading only rows the decoder has published."""
    (W, H), (w, h) = view.size, size
    # horizontal pass output and result: every row is written; reused (host_parallel.scratch_image)
    mid = scratch_image("stream_mid", "RGB", (w, H))
    k = H // h if H % h == 0 else 0  # integer height ratio: the vertical pass streams too
    out = scratch_image("stream_out", "RGB", (w, h)) if k else None  # returned as a copy

    def horizontal(span):
        y0, y1 = span
        mid.paste(view.crop((0, y0, W, y1)).resize((w, y1 - y0), Image.BILINEAR), (0, y0))

    def vertical(span):  # output rows [r0, r1): mid rows [k*r0 - k, k*r1 + k] feed them
        r0, r1 = span
        out.paste(mid.resize((w, r1 - r0), Image.BILINEAR, box=(0, k * r0, w, k * r1)), (0, r0))

    h_done = v_done = 0
    finished = False
    while not finished:
        rows, finished = progress.wait(h_done + BAND_ROWS)
        if finished:
            break
        rows = min(rows, h_done + STEP_ROWS)
        horizontal((h_done, rows))
        h_done = rows
        if k:
            ready = max(0, (h_done - k - 1) // k)  # output rows whose taps are all in mid
            if ready - v_done >= BAND_ROWS // k:
                vertical((v_done, ready))
                v_done = ready
    # decode done: the rest of each pass in bands on every host thread
    if h_done < H:
        map_bands(lambda s: horizontal((h_done + s[0], h_done + s[1])), H - h_done, HOST_THREADS)
    if not k:
        return np.asarray(resize(mid, (w, h), Image.BILINEAR, scratch=True))
    if v_done < h:
        map_bands(lambda s: vertical((v_done + s[0], v_done + s[1])), h - v_done, HOST_THREADS)
    return np.asarray(out)
