"""Host work for one 3840x2160 JPEG, the reference's way against finers-rt's, alternated in one run.

reference: PIL open + decode -> BILINEAR resize to 1920x1080 -> HF `Qwen2VLImageProcessorPil`
           (BICUBIC smart_resize, rescale, normalise, patchify), what the authors' pipeline ran;
finers-rt: JPEG decode on one host thread while the BILINEAR resize to 1920x1080 runs on the rows
           already decoded (`finers_rt.image.decode_for_stage`, `jpeg_stream`) -> banded BICUBIC
           resize on `--threads` threads -> LUT normalise + patchify into a reused buffer, as
           `OrtVision` does -> window/rotary indices for the graph (`qwen_vision_host.vision_inputs`).

Checks that both give the same pixel_values (max abs diff must be 0.0) before timing, then runs
them ABAB... and prints p50/p90 and the ratio, with versions, hardware and git SHA. Needs the
[export] extra (transformers) for the reference side.

    python bench/host_preprocess.py --checkpoint CKPT/gse [--image FRAME.jpg] [--runs 30] [--out F.json]
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finers_rt.bench_report import git_state, hardware, timestamp, versions
from finers_rt.bench_script import FRAME_SIZE, frame_jpeg
from finers_rt.config import GSE
from finers_rt.host_parallel import HOST_THREADS
from finers_rt.image import decode_for_stage, resize_bilinear
from finers_rt.qwen_vision_host import PixelBuffer, VisionPreprocessConfig, vision_inputs


def jpeg_bytes(path: Path | None) -> bytes:
    """The JPEG bytes to decode: --image, else the bench's synthetic 3840x2160 frame at quality 95."""
    return path.read_bytes() if path is not None else frame_jpeg(FRAME_SIZE)


def reference_host(data: bytes, processor) -> np.ndarray:
    """(N, 1176) float32 pixel_values in raster order, as the reference computes them."""
    im = Image.open(io.BytesIO(data)).convert("RGB").resize(GSE.input_size, Image.BILINEAR)
    return processor(images=[im], return_tensors="np")["pixel_values"]


def finers_host(data: bytes, cfg: VisionPreprocessConfig, threads: int, pixels: PixelBuffer):
    """(feeds, reverse, grid) for the vision graph: pixel_values in window order + indices."""
    img, stage_input = decode_for_stage(data, GSE.input_size, threads)  # JPEG: resized while it decodes
    if stage_input is None:
        stage_input = resize_bilinear(img, GSE.input_size, threads)
    return vision_inputs(stage_input, cfg, threads, out=pixels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path, help="a GSE folder (preprocessor_config.json)")
    ap.add_argument("--image", type=Path, default=None, help="a 3840x2160 JPEG (default: synthetic)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=HOST_THREADS)
    ap.add_argument("--out", type=Path, default=None, help="append the JSON row here")
    args = ap.parse_args(argv)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil.from_pretrained(args.checkpoint)
    cfg = VisionPreprocessConfig.from_checkpoint(args.checkpoint)
    data = jpeg_bytes(args.image)

    ref = reference_host(data, processor)
    pixels = PixelBuffer()
    feeds, reverse, grid = finers_host(data, cfg, args.threads, pixels)
    # window order -> raster order: merge units (4 patch rows each) permuted by `reverse`
    ours = feeds["pixel_values"].reshape(-1, cfg.merge_size**2, ref.shape[1])[reverse].reshape(ref.shape)
    diff = float(np.abs(ours - ref).max())
    if diff != 0.0:
        raise SystemExit(f"pixel_values differ from the reference by {diff}: not timing a wrong path")

    sides = {"reference": lambda: reference_host(data, processor),
             "finers-rt": lambda: finers_host(data, cfg, args.threads, pixels)}
    times = {k: [] for k in sides}
    for i in range(args.warmup + args.runs):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for k in order:
            t0 = time.perf_counter()
            sides[k]()
            if i >= args.warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)

    stats = {k: {"p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90))} for k, v in times.items()}
    ratio = stats["reference"]["p50_ms"] / stats["finers-rt"]["p50_ms"]
    row = {"bench": "host_preprocess", "time": timestamp(), "jpeg_bytes": len(data), "frame": list(FRAME_SIZE),
           "grid": list(grid), "threads": args.threads, "runs": args.runs, "pixel_values_max_abs_diff": diff,
           "stats": stats, "ratio_p50": ratio, "versions": versions(), "hardware": hardware(), "git": git_state()}
    print(f"host work, 3840x2160 JPEG ({len(data) / 1e6:.2f} MB) -> {grid} patches; pixel_values max abs diff {diff}")
    for k, s in stats.items():
        print(f"  {k:10s} p50 {s['p50_ms']:7.1f} ms   p90 {s['p90_ms']:7.1f} ms")
    print(f"  ratio reference/finers-rt (p50): {ratio:.2f}x   threads={args.threads}   git {row['git']}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
