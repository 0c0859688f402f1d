"""Assemble the `ort` backend from an engine folder: manifest check, providers, stage runners.

Imports numpy, tokenizers and onnxruntime only (never torch): this is the embedded default.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..manifest import load_manifest
from ..specs import SAM2_DECODER, SAM2_ENCODER, VISION, decoder_spec_from_config

# device -> ONNX Runtime providers, in priority order. The first one must load: a requested
# accelerator that is not there is an error, never a quiet CPU run.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def providers_for(device: str) -> list[str]:
    try:
        return PROVIDERS[device]
    except KeyError:
        raise ValueError(f"ort device must be one of {sorted(PROVIDERS)}, got {device!r}") from None


def expected_digests(engine_dir: Path) -> dict[str, str]:
    """{graph path: spec digest} this runtime expects, derived from the stage configs."""
    digests = {"sam2/sam2_encoder.onnx": SAM2_ENCODER.digest(), "sam2/sam2_decoder.onnx": SAM2_DECODER.digest()}
    for stage in ("gse", "lpr"):
        cfg_path = Path(engine_dir) / stage / "config.json"
        digests[f"{stage}/vision.onnx"] = VISION.digest()
        if cfg_path.is_file():
            digests[f"{stage}/decoder.onnx"] = decoder_spec_from_config(json.loads(cfg_path.read_text())).digest()
        else:
            digests[f"{stage}/decoder.onnx"] = "missing config.json"
    return digests


def load_ort(engine_dir: str | Path, device: str = "cpu"):
    """(gse Generator, lpr Generator, SAM2 predictor, manifest) from an exported engine folder."""
    from .ort_sam2 import OrtSAM2
    from .ort_vlm import OrtGenerator

    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir, expected_digests(engine_dir))
    providers = providers_for(device)
    if manifest["precision"] == "fp16" and device == "cpu":
        raise ValueError(f"{engine_dir} holds fp16 graphs, which need --device cuda or tensorrt; "
                         "export fp32, int8 or int4 for the CPU")
    gse = OrtGenerator(engine_dir / "gse", providers=providers)
    lpr = OrtGenerator(engine_dir / "lpr", providers=providers)
    sam2 = OrtSAM2(engine_dir / "sam2", providers=providers)
    return gse, lpr, sam2, manifest
