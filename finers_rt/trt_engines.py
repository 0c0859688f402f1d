"""TensorRT engines of an engine folder: which graphs get one, their optimisation profiles, and the
manifest `trt` section that refuses engines built for another GPU architecture or TensorRT.

Pure Python + numpy (never tensorrt): read by the builder (`finers_rt.export.trt_build`), the
`trt` backend (`backends/trt.py`) and ONNX Runtime's TensorRT execution provider options
(`backends/ort.py`). Every profile comes from the graph's spec (`finers_rt.specs`); the only
value derived here is the vision opt, which is the shape the stage really feeds.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import GSE, LPR
from .manifest import StaleEngineError, decoder_attention, decoder_kv_dtype, lm_head
from .qwen_vision_host import VisionPreprocessConfig, vision_dims
from .specs import (
    DECODER_SPECS,
    SAM2_DECODER,
    SAM2_ENCODER,
    VISION,
    GraphSpec,
    profile_shapes,
)

# The TensorRT releases this code is written against (docs and Python bindings read for both);
# `build` accepts any 10.x / 11.x and records the exact version it ran in the manifest.
TENSORRT_PINS = {10: "10.16.1.11", 11: "11.4.0.106"}
# Graphs that get a TensorRT engine (ONNX path in the folder); decoders stay on ONNX Runtime
# (or TensorRT-LLM), where the KV cache and the greedy loop live.
TRT_GRAPHS = ("gse/vision.onnx", "lpr/vision.onnx", "sam2/sam2_encoder.onnx", "sam2/sam2_decoder.onnx")
# The graphs each explicit-quantization recipe quantizes (`finers_rt.export.qdq`); under fp8 the
# others build in fp16. fp8 (E4M3: 3 mantissa bits, half an ulp is 3-6 % of a value near the top
# of its range) keeps SAM2 out: on the tiny checkpoints its Q/DQ copies failed the parity gates that
# int8 passes (encoder relative L2 9.4 % vs 3.0 % int8, limit 5 %; decoder mask IoU 0.16 vs 0.96,
# limit 0.9, the ReLU outputs of its MLPs the worst), while the vision towers pass (token cosine
# 0.994 GSE, 0.996 LPR; limit 0.99) and are where the GPU time goes.
QDQ_GRAPHS = {"int8": TRT_GRAPHS, "fp8": TRT_GRAPHS[:2]}
STAGES = {"gse": GSE, "lpr": LPR}
BUILD_DEFAULTS = {"precision": "fp16", "max_batch": 1, "workspace_gb": 4.0}


def tensorrt_major(version: str) -> int:
    return int(str(version).split(".")[0])


def engine_file(rel: str) -> str:
    """`gse/vision.onnx` -> `gse/vision.engine` (the serialized engine beside its graph)."""
    return str(Path(rel).with_suffix(".engine"))


def graph_spec(engine_dir: Path, rel: str) -> GraphSpec:
    """The IO spec of the graph at `rel` inside an engine folder (decoders read their config.json)."""
    name = Path(rel).stem
    if name == "vision":
        return VISION
    if name == "decoder":  # ORT-only graphs (decoders run on ORT CUDA); the TensorRT EP reads their profile
        config = json.loads((Path(engine_dir) / Path(rel).parent / "config.json").read_text())
        return DECODER_SPECS[decoder_attention(engine_dir)](config, lm_head=lm_head(engine_dir),
                                                            kv_dtype=decoder_kv_dtype(engine_dir))
    specs = {"sam2_encoder": SAM2_ENCODER, "sam2_decoder": SAM2_DECODER}
    if name not in specs:
        raise ValueError(f"no graph spec for {rel}")
    return specs[name]


def graph_profile(engine_dir: Path, rel: str, *, max_batch: int | None = None) -> dict:
    """{input: (min, opt, max)} for the graph at `rel`: the spec's profile, with the vision opt set
    to the stage's real input (GSE 1920x1080, LPR 512x512 through the stage's processor config)."""
    spec = graph_spec(engine_dir, rel)
    opt = None
    if spec is VISION:
        stage = Path(rel).parent.name
        cfg = VisionPreprocessConfig.from_checkpoint(Path(engine_dir) / stage)
        opt = vision_dims(cfg, *STAGES[stage].input_size)
    batch = max_batch if "batch" in spec.profiles else None
    return profile_shapes(spec, opt, max_batch=batch)


def build_command(engine_dir: Path, precision: str, max_batch: int, workspace_gb: float) -> str:
    return (f"finers-rt build --engines {engine_dir} --target trt --precision {precision} "
            f"--max-batch {max_batch} --workspace-gb {workspace_gb:g}")


def trt_section(*, version: str, gpu: str, sm: str, precision: str, max_batch: int, workspace_gb: float,
                engines: dict, strongly_typed: bool) -> dict:
    """The manifest's `trt` entry. engines: {onnx rel: {"file", "profile", "spec_digest"}}."""
    return {"tensorrt": version, "gpu": gpu, "sm": sm, "precision": precision, "max_batch": max_batch,
            "workspace_gb": workspace_gb, "strongly_typed": strongly_typed, "engines": engines}


def check_trt_section(manifest: dict, engine_dir: Path, *, tensorrt_version: str, sm: str) -> dict:
    """The manifest's `trt` section if its engines run here; else StaleEngineError with the command.

    Serialized engines are tied to the exact TensorRT release and the GPU architecture (SM) they
    were built on: another SM (A100 8.0, H100 9.0, Orin 8.7) or another TensorRT needs a rebuild.
    """
    engine_dir = Path(engine_dir)
    section = manifest.get("trt")
    if not section:
        cmd = build_command(engine_dir, **BUILD_DEFAULTS)
        raise StaleEngineError(f"{engine_dir} has no TensorRT engines. Build them on this machine: {cmd}")
    cmd = build_command(engine_dir, section["precision"], section["max_batch"], section["workspace_gb"])
    if section["tensorrt"] != tensorrt_version:
        raise StaleEngineError(f"{engine_dir}: engines were built with TensorRT {section['tensorrt']}, this "
                               f"machine has {tensorrt_version}. Rebuild: {cmd}")
    if section["sm"] != sm:
        raise StaleEngineError(f"{engine_dir}: engines were built for SM {section['sm']} ({section['gpu']}), "
                               f"this GPU is SM {sm}. Rebuild on this machine: {cmd}")
    for rel in TRT_GRAPHS:
        entry = section["engines"].get(rel)
        if entry is None or not (engine_dir / entry["file"]).is_file():
            raise StaleEngineError(f"{engine_dir}: the TensorRT engine for {rel} is missing. Rebuild: {cmd}")
        if entry["spec_digest"] != graph_spec(engine_dir, rel).digest():
            raise StaleEngineError(f"{engine_dir}/{entry['file']} was built for another IO spec. Rebuild: {cmd}")
    return section
