"""Weight-only INT8/INT4 decoders vs fp32: greedy token agreement and decode speed, side by side.

Usage: python bench/quant_agreement.py --checkpoints CKPT --work DIR [--pairs 5] [--tokens 64]
Exports fp32/int8/int4 engine folders from CKPT (reused if present), then runs the same
image/question pairs through each GSE (1920x1080) and LPR (512x512) generator unforced.
Prints one JSON row per precision: agreement = fraction of fp32's tokens reproduced before the
first divergence, averaged over pairs; exact = pairs with identical token ids; decode ms/token.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from finers_rt.manifest import MANIFEST
from finers_rt.pipeline import Pipeline

QUESTIONS = ["the red car", "What colour is the boat near the pier?", "the tower on the left",
             "small white truck", "person on the roof", "the blue tent", "a dog near the fence"]


def _image(seed: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _engines(ckpt: Path, out: Path, precision: str) -> Path:
    if not (out / MANIFEST).is_file():
        from finers_rt.export.engine import export_engines

        export_engines(ckpt, out, precision=precision, overwrite=True)
    return out


def _run(pipes: dict[str, Pipeline], pairs: int, tokens: int) -> dict:
    """{precision: {stage: [(token ids, decode ms/token)]}}; precisions alternate pair by pair so
    that machine load hits them alike."""
    out = {p: {"gse": [], "lpr": []} for p in pipes}
    for stage, size in (("gse", (1920, 1080)), ("lpr", (512, 512))):
        for i in range(pairs):
            img, q = _image(100 + i, *size), f"Please find '{QUESTIONS[i % len(QUESTIONS)]}'."
            for prec, pipe in pipes.items():
                g = getattr(pipe, stage).generator.generate(img, q, max_new_tokens=tokens)
                out[prec][stage].append((g.token_ids, g.timings_ms["decode"] / max(len(g.token_ids) - 1, 1)))
    return out


def _agreement(ref: list[int], got: list[int]) -> float:
    n = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return n / len(ref)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    pipes = {p: Pipeline.from_engines(_engines(args.checkpoints, args.work / p, p)) for p in ("fp32", "int8", "int4")}
    _run(pipes, 1, 4)  # warm-up
    results = _run(pipes, args.pairs, args.tokens)
    for prec, stages in results.items():
        row = {"precision": prec, "pairs_per_stage": args.pairs, "new_tokens": args.tokens, "git": sha,
               "onnxruntime": metadata.version("onnxruntime"), "cpu": platform.processor() or platform.machine()}
        for stage, runs in stages.items():
            ref = results["fp32"][stage]
            row[f"{stage}_agreement"] = float(np.mean([_agreement(r[0], g[0]) for r, g in zip(ref, runs)]))
            row[f"{stage}_exact_pairs"] = sum(r[0] == g[0] for r, g in zip(ref, runs))
            row[f"{stage}_decode_ms_per_token"] = float(np.median([g[1] for g in runs]))
        print(json.dumps(row))


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - t:.0f} s")
