"""Quantisation recipes for the TensorRT-LLM routes: model-to-model transforms applied offline.

LLM API route (`finers-rt export --target trtllm`, the `trtllm` backend): a Hugging Face folder
that the pinned TensorRT-LLM's PyTorch backend loads directly --
  - fp16 / bf16: the checkpoint with its config.json rewritten in the flat transformers-4.x layout
    (`legacy_config`): tensorrt-llm 1.2.1 pins transformers 4.57.1 and sets
    `pretrained_config.rope_scaling['type'] = 'mrope'`, which a 5.x `rope_parameters` config lacks;
  - fp8 (Ada/Hopper) and int4-awq (Ampere+): NVIDIA ModelOpt post-training quantisation
    (`mtq.quantize` + `export_hf_checkpoint`, the unified HF checkpoint with hf_quant_config.json
    that `LLM(model=...)` detects), vision tower and lm_head left unquantised.
  INT8 recipes are refused here: the PyTorch backend's quantisation recipes (docs
  features/quantization, 1.x) are FP4 / FP8 / W4A16 / W4A8 only; INT8 lives on the engine route.
Engine route int8 SmoothQuant: TensorRT-LLM's calibrating converter on a Qwen2-VL-shaped copy of
the language model (`write_qwen2vl_shim`, `smoothquant_command`).

Runs in the TensorRT-LLM environment (NGC container or `pip install 'finers-rt[trtllm]'`), which
has its own torch / transformers / modelopt; nothing here imports them at module level.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .trtllm_engine import (
    ARCHITECTURE,
    TRTLLM_VERSION,
    TensorSource,
    TextArch,
    is_vision,
    prepare_out,
    trtllm_available,
)

log = logging.getLogger(__name__)

MODELOPT_PIN = "nvidia-modelopt[torch]~=0.37.0"  # what tensorrt-llm 1.2.1's requirements.txt pins
VISION_PAD_ID = 151654  # <|vision_pad|>: 4.x configs carry it as vision_token_id


@dataclass(frozen=True)
class Recipe:
    name: str
    modelopt_cfg: str  # attribute of modelopt.torch.quantization
    min_sm: int  # lowest compute capability with kernels in the PyTorch backend's hardware matrix
    gpus: str


RECIPES = {
    "fp8": Recipe("fp8", "FP8_DEFAULT_CFG", 89, "Ada / Hopper (H100, L40S); not A100"),
    "int4-awq": Recipe("int4-awq", "INT4_AWQ_CFG", 80, "Ampere and newer (A100, H100)"),
}
_INT8 = ("INT8 is not a recipe of TensorRT-LLM {v}'s PyTorch backend (the only one that runs Qwen2.5-VL); "
         "use the engine route: finers-rt export --target trtllm-engine --precision {p}")
REFUSED = {
    "int8": _INT8.format(v=TRTLLM_VERSION, p="int8-wo|int8-sq"),
    "int8-wo": _INT8.format(v=TRTLLM_VERSION, p="int8-wo"),
    "int8-sq": _INT8.format(v=TRTLLM_VERSION, p="int8-sq"),
    "nvfp4": "nvfp4 runs on Blackwell only (no FineRS target GPU); use fp8 (H100) or int4-awq (A100)",
    "w4a8-awq": "w4a8-awq is not offered: fp8 (H100) or int4-awq (A100) cover the target GPUs",
}
UNQUANTISED = ("fp16", "bf16")


def check_recipe(recipe: str) -> Recipe:
    """The Recipe for `recipe`, or ValueError saying why the pinned version cannot run it."""
    if recipe in RECIPES:
        return RECIPES[recipe]
    if recipe in REFUSED:
        raise ValueError(f"recipe {recipe!r} refused: {REFUSED[recipe]}")
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")


# ---------------------------------------------------------------------------------------------
# checkpoint layout for the LLM API


def legacy_config(config: dict) -> dict:
    """A 5.x Qwen2.5-VL config.json (decoder under `text_config`, `rope_parameters`) -> the flat
    4.x layout of the official Qwen2.5-VL-7B-Instruct file. A flat config comes back unchanged."""
    text = config.get("text_config")
    if text is None:
        return dict(config)
    out = {k: v for k, v in config.items() if k not in ("text_config", "dtype")}
    rope = text.get("rope_parameters") or {}
    out.update({k: v for k, v in text.items() if k not in ("rope_parameters", "model_type", "layer_types", "dtype")})
    out["rope_theta"] = rope["rope_theta"]
    out["rope_scaling"] = {"type": "mrope", "rope_type": "default", "mrope_section": list(rope["mrope_section"])}
    out["torch_dtype"] = config.get("dtype", text.get("dtype", "bfloat16"))
    out.setdefault("vision_token_id", VISION_PAD_ID)
    out["tie_word_embeddings"] = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    out["vision_config"] = {k: v for k, v in config["vision_config"].items() if k != "rope_parameters"}
    return out


def prepare_llmapi_checkpoint(checkpoint: Path, out: Path, precision: str | None = None) -> Path:
    """Copy a stage checkpoint for `LLM(model=out)`: weights and processor files as they are
    (transformers writes the 4.x tensor names `model.layers.*` / `visual.*`), config.json flat,
    its torch_dtype set to `precision` (fp16 | bf16: what `LLM(dtype="auto")` runs) if given."""
    checkpoint, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    config = legacy_config(json.loads((checkpoint / "config.json").read_text()))
    if precision is not None:
        config["torch_dtype"] = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def calibration_samples(stage: str, calib_data: Path | None = None, n: int = 32):
    """[(image (H, W, 3) uint8 at the stage input size, user text)] for calibration: a FineRS-format
    folder (annotations.json + images/) or, by default, synthetic frames (a stand-in: real
    FineRS-4k images calibrate better). LPR sees resized full frames instead of region crops."""
    from finers_rt.config import GSE, LPR
    from finers_rt.dataset import load_annotations
    from finers_rt.image import load_image, resize_bilinear
    from finers_rt.prompts import build_question
    from finers_rt.synth import make_synth

    cfg = {"gse": GSE, "lpr": LPR}[stage]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(calib_data) if calib_data else Path(tmp)
        if calib_data is None:
            make_synth(root, n=n, seed=0)
        samples = load_annotations(root / "annotations.json", root / "images")[:n]
        return [(resize_bilinear(load_image(s.image_path), cfg.input_size),
                 build_question(stage, s.task, s.question, s.options if s.task == "option" else None))
                for s in samples]


def quantize_for_trtllm(checkpoint: Path, out: Path, recipe: str, *, calib_data: Path | None = None,
                        stage: str = "gse", calib_size: int = 32) -> Path:
    """ModelOpt PTQ of one stage checkpoint -> unified HF checkpoint for the LLM API (needs a GPU)."""
    rec = check_recipe(recipe)
    try:
        import modelopt.torch.quantization as mtq
        import torch
        import transformers
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        raise RuntimeError(f"quantize_for_trtllm needs ModelOpt ({e}): pip install 'finers-rt[trtllm]' "
                           f"({MODELOPT_PIN}) or use nvcr.io/nvidia/tensorrt-llm/release:{TRTLLM_VERSION}") from e
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < divmod(rec.min_sm, 10):
        raise RuntimeError(f"{recipe} calibration needs a CUDA GPU with SM >= {rec.min_sm} ({rec.gpus})")
    with tempfile.TemporaryDirectory() as tmp:
        src = prepare_llmapi_checkpoint(checkpoint, Path(tmp) / "src")  # loadable by the env's transformers
        processor = transformers.AutoProcessor.from_pretrained(src)
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            src, dtype=torch.bfloat16).cuda().eval()
        cfg = copy.deepcopy(getattr(mtq, rec.modelopt_cfg))  # the preset, vision tower + lm_head excluded
        cfg["quant_cfg"].update({"*visual*": {"enable": False}, "*lm_head*": {"enable": False}})
        samples = calibration_samples(stage, calib_data, calib_size)

        def forward_loop(m):
            from PIL import Image

            from finers_rt.prompts import render_chat

            for image, text in samples:
                inputs = processor(text=[render_chat(text)], images=[Image.fromarray(image)], return_tensors="pt")
                with torch.no_grad():
                    m(**inputs.to("cuda"))

        mtq.quantize(model, cfg, forward_loop)
        out = Path(out)
        export_hf_checkpoint(model, export_dir=out)
        for f in src.iterdir():  # processor / tokenizer files the export does not write
            if f.suffix in (".json", ".jinja", ".txt") and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    log.info("%s: %s checkpoint for TensorRT-LLM %s (%s)", out, recipe, TRTLLM_VERSION, rec.gpus)
    return out


def export_llmapi(checkpoints: Path, out: Path, *, precision: str = "bf16", calib_data: Path | None = None,
                  overwrite: bool = False) -> dict:
    """`finers-rt export --target trtllm`: checkpoints/{gse,lpr} -> out/{gse,lpr} + manifest."""
    from finers_rt import __version__
    from finers_rt.manifest import hash_tree

    if precision not in UNQUANTISED:
        check_recipe(precision)
    checkpoints, out = Path(checkpoints), Path(out)
    prepare_out(out, overwrite)
    manifest = {"format": 1, "kind": "trtllm-llmapi", "finers_rt": __version__, "tensorrt_llm": TRTLLM_VERSION,
                "precision": precision, "checkpoints": str(checkpoints), "stages": {}}
    for stage in ("gse", "lpr"):
        if precision in UNQUANTISED:
            prepare_llmapi_checkpoint(checkpoints / stage, out / stage, precision)
        else:
            quantize_for_trtllm(checkpoints / stage, out / stage, precision, calib_data=calib_data, stage=stage)
        manifest["stages"][stage] = {"source_hash": hash_tree(checkpoints / stage)}
    (out / "trtllm_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------
# int8 SmoothQuant: TensorRT-LLM's calibrating converter on a Qwen2-VL-shaped copy

_SHIM_VISION = {"depth": 1, "embed_dim": 32, "num_heads": 1, "mlp_ratio": 2, "in_channels": 3, "patch_size": 14,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}


def write_qwen2vl_shim(checkpoint: Path, out: Path) -> dict:
    """A Qwen2-VL-shaped HF folder holding only this checkpoint's language model, for the pinned
    converter (it loads `Qwen2VLForConditionalGeneration` and asserts model_type 'qwen2_vl').

    The vision tower differs between Qwen2-VL and 2.5-VL; calibration feeds text only, so the shim
    declares a 1-block placeholder tower (randomly initialised on load, never run) and stores none.
    """
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out)
    config = json.loads((checkpoint / "config.json").read_text())
    arch = TextArch.from_config(config)
    shim = {
        "architectures": [ARCHITECTURE], "model_type": "qwen2_vl", "torch_dtype": "float16",
        "vocab_size": arch.vocab, "hidden_size": arch.hidden, "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads, "num_key_value_heads": arch.kv_heads,
        "intermediate_size": arch.intermediate, "hidden_act": arch.hidden_act, "rms_norm_eps": arch.rms_eps,
        "max_position_embeddings": arch.max_positions, "rope_theta": arch.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(arch.mrope_section)},
        "tie_word_embeddings": arch.tie_embeddings, "use_sliding_window": False,
        "vision_config": {**_SHIM_VISION, "hidden_size": arch.hidden},
        **{k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id", "bos_token_id", "eos_token_id") if k in config},
    }
    source = TensorSource(checkpoint)
    weights = {n: source.get(n).half().contiguous() for n in source.names() if not is_vision(n)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shim, indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"))
    for f in checkpoint.iterdir():  # tokenizer (the converter's slow tokenizer wants vocab.json/merges.txt)
        if f.suffix in (".json", ".txt", ".jinja") and f.name.startswith(("tokenizer", "vocab", "merges",
                                                                           "generation", "chat_template")):
            shutil.copy2(f, out / f.name)
    return shim


def smoothquant_command(shim_dir: Path, out: Path, examples_dir: Path, *, alpha: float = 0.5,
                        calib_dataset: str | None = None) -> list[str]:
    """TensorRT-LLM's calibrating converter for int8 SmoothQuant (per-channel weights, per-token
    activations) on the shim; `examples_dir` is the TensorRT-LLM repo's examples/ folder (in the
    NGC container: /app/tensorrt_llm/examples)."""
    script = Path(examples_dir) / "models" / "core" / "qwen" / "convert_checkpoint.py"
    cmd = [sys.executable, str(script), "--model_dir", str(shim_dir), "--output_dir", str(out),
           "--dtype", "float16", "--smoothquant", str(alpha), "--per_channel", "--per_token"]
    return cmd + (["--calib_dataset", calib_dataset] if calib_dataset else [])


def run_smoothquant(command: list[str]) -> None:
    if not trtllm_available() or not Path(command[1]).is_file():
        raise RuntimeError(
            "int8-sq needs TensorRT-LLM's calibrating converter and a GPU: install 'finers-rt[trtllm]' "
            f"(tensorrt-llm=={TRTLLM_VERSION}) with the repo's examples/ (NGC container "
            f"nvcr.io/nvidia/tensorrt-llm/release:{TRTLLM_VERSION}), then run:\n  {' '.join(command)}")
    subprocess.run(command, check=True)
