"""pytest-benchmark micro-benchmarks of host-side work (not in the default tier).

    .venv/bin/python -m pytest -m microbench tests/test_microbench.py [--benchmark-json F.json]

Each benchmark first checks its fast path against the plain call it replaces, so a number is
never reported for a wrong result. End-to-end and per-stage timing live in `finers-rt bench`.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finers_rt.bench_script import FRAME_SIZE, frame_jpeg, synthetic_frame
from finers_rt.config import GSE, LPR
from finers_rt.host_parallel import HOST_THREADS, resize
from finers_rt.image import decode, load_image, resize_bilinear
from finers_rt.parsing import parse_output
from finers_rt.qwen_vision_host import VisionPreprocessConfig, pixel_values, vision_inputs
from finers_rt.serve_request import rle_encode

pytestmark = pytest.mark.microbench
pytest.importorskip("pytest_benchmark", reason="micro-benchmarks need pytest-benchmark (the [dev] extra)")


@pytest.fixture(scope="module")
def jpeg_4k() -> bytes:
    return frame_jpeg(FRAME_SIZE)


@pytest.fixture(scope="module")
def vision_cfg(tiny_ckpt) -> VisionPreprocessConfig:
    return VisionPreprocessConfig.from_checkpoint(tiny_ckpt / "gse")


def test_decode_jpeg_4k_to_pil(benchmark, jpeg_4k):
    im = benchmark(decode, jpeg_4k)
    assert im.size == FRAME_SIZE


def test_decode_jpeg_4k_to_array(benchmark, jpeg_4k):
    assert benchmark(load_image, jpeg_4k).shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3)


@pytest.mark.parametrize("threads", [1, HOST_THREADS], ids=lambda t: f"threads{t}")
def test_gse_resize_4k(benchmark, jpeg_4k, threads):
    im = decode(jpeg_4k)
    expected = np.asarray(im.resize(GSE.input_size, Image.BILINEAR))
    assert np.array_equal(np.asarray(resize(im, GSE.input_size, Image.BILINEAR, threads)), expected)
    benchmark(resize, im, GSE.input_size, Image.BILINEAR, threads)


@pytest.mark.parametrize("threads", [1, HOST_THREADS], ids=lambda t: f"threads{t}")
def test_gse_vision_inputs(benchmark, jpeg_4k, vision_cfg, threads):
    stage_input = resize_bilinear(decode(jpeg_4k), GSE.input_size)
    feeds, _, _ = benchmark(vision_inputs, stage_input, vision_cfg, threads)
    assert feeds["pixel_values"].shape[0] == 1092 * 1932 // 14**2


def test_lpr_pixel_values(benchmark, vision_cfg):
    crop = synthetic_frame((733, 411), seed=1)
    stage_input = resize_bilinear(crop, LPR.input_size)
    patches, grid = benchmark(pixel_values, stage_input, vision_cfg, HOST_THREADS)
    assert grid == (1, 36, 36) and patches.shape[0] == 36 * 36


def test_parse_output(benchmark):
    text = '<think>the car by the gate</think><answer>{"bbox_2d": [812, 402, 860, 441], "label": "car"}</answer>'
    parsed = benchmark(parse_output, text, 2.0, 2.0, want_points=False)
    assert tuple(parsed.bbox) == (1624, 804, 1720, 882)  # round(int(v) * 2.0), by hand


def test_rle_encode_4k_mask(benchmark):
    mask = np.zeros((FRAME_SIZE[1], FRAME_SIZE[0]), bool)
    mask[1000:1040, 2000:2100] = True
    rle = benchmark(rle_encode, mask)
    # column-major: 2000 empty columns, then 100 columns of (1000 off, 40 on, 1120 off) runs
    assert rle["counts"][:2] == [2000 * 2160 + 1000, 40] and sum(rle["counts"]) == mask.size
