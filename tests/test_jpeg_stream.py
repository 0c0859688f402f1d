"""Decode-while-resizing (finers_rt.jpeg_stream) against Pillow's plain decode, then resize."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from finers_rt import image as image_mod
from finers_rt.image import ImageLoadError, decode_for_stage
from finers_rt.jpeg_stream import open_resized


def _textured(w: int, h: int, seed: int) -> np.ndarray:
    """Noise on gradients: every filter tap and JPEG block differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x ^ y) & 255], -1)
    return np.clip(base + rng.integers(-60, 61, base.shape), 0, 255).astype(np.uint8)


def _jpeg(w: int, h: int, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    im = Image.fromarray(_textured(w, h, seed))
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=save.pop("quality", 95), **save)
    return buf.getvalue()


def _reference(data: bytes, size):
    """What the pipeline did before: Pillow decode, then one BILINEAR resize."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im), np.asarray(im.resize(size, Image.BILINEAR))


# (input w, h) -> output (w, h): FineRS 4K -> GSE (height ratio 2: the vertical pass streams),
# ratio 3, non-integer ratios (vertical pass after the decode), no vertical pass, odd sizes.
CASES = [
    ((3840, 2160), (1920, 1080)),
    ((3000, 1500), (1000, 500)),
    ((1001, 777), (640, 360)),
    ((1000, 500), (800, 500)),
    ((733, 1411), (17, 1399)),
]
ENCODINGS = {
    "420": {},
    "444": {"subsampling": 0},
    "progressive": {"progressive": True},
    "restart_markers": {"restart_marker_rows": 1},
    "q60": {"quality": 60},
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1][0]}x{c[1][1]}")
def test_streamed_resize_is_byte_identical_to_decode_then_resize(case, encoding):
    (w, h), size = case
    data = _jpeg(w, h, seed=w + h, **ENCODINGS[encoding])
    full_ref, resized_ref = _reference(data, size)
    made = open_resized(data, size)
    assert made is not None
    full, resized = made
    assert full.mode == "RGB" and full.size == (w, h)
    assert np.array_equal(np.asarray(full), full_ref)
    assert resized.shape == resized_ref.shape and resized.dtype == np.uint8
    assert np.array_equal(resized, resized_ref)


def test_file_path_input_and_repeat_runs(tmp_path):
    data = _jpeg(1600, 900, seed=3)
    path = tmp_path / "frame.jpg"
    path.write_bytes(data)
    _, expected = _reference(data, (800, 450))
    for _ in range(3):  # fresh decode target each time: no state carried between frames
        full, resized = open_resized(path, (800, 450))
        assert np.array_equal(resized, expected)


@pytest.mark.parametrize("kind", ["png", "gray_jpeg", "cmyk_jpeg", "exif_rotated", "upscale", "garbage", "missing"])
def test_other_inputs_take_the_usual_path(kind, tmp_path):
    size = (400, 300)
    if kind == "png":
        buf = io.BytesIO()
        Image.fromarray(_textured(800, 600, 1)).save(buf, "PNG")
        source = buf.getvalue()
    elif kind == "gray_jpeg":
        source = _jpeg(800, 600, mode="L")
    elif kind == "cmyk_jpeg":
        source = _jpeg(800, 600, mode="CMYK")
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90: the usual path applies it
        source = _jpeg(800, 600, exif=exif.tobytes())
    elif kind == "upscale":
        source, size = _jpeg(300, 200), (400, 300)
    elif kind == "garbage":
        source = b"\xff\xd8 not a jpeg at all"
    else:
        source = tmp_path / "nope.jpg"
    assert open_resized(source, size) is None


def test_truncated_jpeg_is_a_load_error():
    data = _jpeg(1200, 800, seed=5)
    with pytest.raises(OSError, match="truncated"):
        open_resized(data[: len(data) // 2], (600, 400))
    with pytest.raises(ImageLoadError, match="<bytes>: cannot decode image"):
        decode_for_stage(data[: len(data) // 2], (600, 400), threads=2)
    with pytest.raises(ImageLoadError):  # the usual path refuses it too
        decode_for_stage(data[: len(data) // 2], (600, 400), threads=1)


def test_decode_for_stage_streams_only_with_host_threads():
    data = _jpeg(1200, 800, seed=6)
    img, resized = decode_for_stage(data, (600, 400), threads=1)
    assert resized is None and img.size == (1200, 800)
    img, resized = decode_for_stage(data, (600, 400), threads=2)
    assert np.array_equal(resized, _reference(data, (600, 400))[1])
    array = _textured(1200, 800, 0)
    img, resized = decode_for_stage(array, (600, 400), threads=2)  # arrays are already decoded
    assert resized is None and img is not None


@pytest.fixture(scope="module")
def ort_pipe(tiny_engines):
    from finers_rt.pipeline import Pipeline

    return Pipeline.from_engines(tiny_engines, device="cpu")


def test_pipeline_results_equal_with_and_without_streaming(ort_pipe, monkeypatch):
    """Greedy (unforced) runs: every generated token depends on GSE's pixels."""
    if ort_pipe.host_threads < 2:
        pytest.skip("one host thread: the pipeline decodes, then resizes")
    data = _jpeg(3840, 2160, seed=7)
    streamed = ort_pipe.run(data, "Where is the red car?")
    monkeypatch.setattr(image_mod, "open_resized", lambda *a: None)
    plain = ort_pipe.run(data, "Where is the red car?")
    assert streamed.texts == plain.texts and streamed.tokens == plain.tokens
    assert streamed.crop_box == plain.crop_box
    assert np.array_equal(streamed.mask, plain.mask)
