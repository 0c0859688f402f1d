"""HF Qwen2.5-VL folder -> TensorRT-LLM checkpoint + `trtllm-build` command (the engine route).

Pure python: torch + safetensors on the CPU, never `import tensorrt_llm`. Only `build_engine`
runs TensorRT-LLM, as a subprocess, and only where it is installed.

Why this works for Qwen2.5-VL although TensorRT-LLM's engine route knows only Qwen2-VL: the
language model of both is the Qwen2 decoder with M-RoPE (7B: 28 layers, hidden 3584, 28 heads,
4 KV heads, mrope_section [16, 24, 24]); only the vision tower differs, and it stays on our own
vision engine (its image embeddings become the engine's prompt table). What the pinned converter
(tensorrt-llm 1.2.1: `tensorrt_llm/models/qwen/{config,convert,utils}.py`) does and we reproduce:
  - `QWenConfig.from_hugging_face` reads a *flat* 4.x config (`rope_scaling.mrope_section`,
    `rope_theta`, `rms_norm_eps`, `tie_word_embeddings`) and asserts model_type in (..., 'qwen2_vl'):
    'qwen2_5_vl' and the 5.x nesting under `text_config` / `rope_parameters` are rejected, so we
    write the checkpoint config ourselves with qwen_type 'qwen2_vl';
  - `convert_hf_qwen`: q/k/v concatenated on the output axis (HF [out, in] layout kept), their
    biases likewise; o_proj -> attention.dense; up_proj -> mlp.gate; gate_proj -> mlp.fc (the
    activated branch: proj(silu(fc(x)) * gate(x))); down_proj -> mlp.proj; lm_head = embedding
    copy when tied; 'language_model.' stripped from names; vision weights ignored.
  - int8 weight-only: `preprocess_weights` (models/modeling_utils.py) quantizes every non-int8
    qkv/dense/fc/proj/gate weight of a W8A16 checkpoint at build time with
    `torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix`, whose output layout is
    interleaved for the GPU's SM. So the checkpoint carries fp16 weights + quant_algo W8A16 and the
    int8 bytes are made on the build machine; `int8_weight_only` is that op's arithmetic
    (per-output-channel absmax / 127) for verifying the expected error.
  - int8 SmoothQuant needs activation ranges from a calibration run: TensorRT-LLM's own
    `examples/models/core/qwen/convert_checkpoint.py --smoothquant` on a Qwen2-VL-shaped copy
    of the language model (`trtllm_quant.write_qwen2vl_shim` / `smoothquant_command`).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..qwen_vision_host import need_key as _need

log = logging.getLogger(__name__)

TRTLLM_VERSION = "1.2.1"  # the pinned tensorrt-llm (pyproject extra [trtllm]); sources read at this release
ARCHITECTURE = "Qwen2VLForConditionalGeneration"  # MODEL_MAP entry -> QWenForCausalLM
# checkpoint quant_algo per engine precision (tensorrt_llm.quantization.QuantAlgo names)
ENGINE_PRECISIONS = {"fp16": None, "bf16": None, "int8-wo": "W8A16", "int8-sq": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"}
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# weights `weight_only_quantize_dict` quantizes (substring match); lm_head / embeddings stay fp16
WOQ_SUFFIXES = ("qkv.weight", "dense.weight", "fc.weight", "proj.weight", "gate.weight")
_LAYER_MAP = {  # HF name inside model.layers.N. -> TRT-LLM name inside transformer.layers.N.
    "self_attn.o_proj.weight": "attention.dense.weight",
    "mlp.up_proj.weight": "mlp.gate.weight",
    "mlp.gate_proj.weight": "mlp.fc.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_layernorm.weight",
}


@dataclass(frozen=True)
class TextArch:
    """The language model's shape, read from a 4.x (flat) or 5.x (`text_config`) config.json."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float
    mrope_section: tuple[int, ...]  # rotary pairs per (t, h, w) axis; sums to head_dim / 2
    rms_eps: float
    tie_embeddings: bool
    max_positions: int
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config: dict) -> TextArch:
        text = config.get("text_config") or config  # 5.x nests the decoder, 4.x is flat
        rope = text.get("rope_parameters") or {}  # 5.x
        scaling = text.get("rope_scaling") or config.get("rope_scaling") or {}  # 4.x
        theta = rope.get("rope_theta", text.get("rope_theta", config.get("rope_theta")))
        section = rope.get("mrope_section") or scaling.get("mrope_section")
        if theta is None or section is None:
            raise KeyError("config.json has no rope theta / mrope_section (rope_parameters or rope_scaling)")
        where = "config.json text config"
        arch = cls(
            layers=int(_need(text, "num_hidden_layers", where)), hidden=int(_need(text, "hidden_size", where)),
            heads=int(_need(text, "num_attention_heads", where)),
            kv_heads=int(_need(text, "num_key_value_heads", where)),
            intermediate=int(_need(text, "intermediate_size", where)), vocab=int(_need(text, "vocab_size", where)),
            rope_theta=float(theta), mrope_section=tuple(int(s) for s in section),
            rms_eps=float(_need(text, "rms_norm_eps", where)),
            tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_positions=int(_need(text, "max_position_embeddings", where)),
            hidden_act=str(text.get("hidden_act", "silu")),
        )
        if 2 * sum(arch.mrope_section) != arch.head_dim:
            raise ValueError(f"mrope_section {arch.mrope_section} does not cover head_dim {arch.head_dim}")
        return arch


def trtllm_config(arch: TextArch, precision: str) -> dict:
    """config.json of the TensorRT-LLM checkpoint: `QWenConfig.to_dict()` as the pinned converter
    writes it for qwen2_vl (keys it does not set left to their constructor defaults)."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision must be one of {sorted(ENGINE_PRECISIONS)}, got {precision!r}")
    return {
        "architecture": ARCHITECTURE, "dtype": DTYPES.get(precision, "float16"), "logits_dtype": "float32",
        "vocab_size": arch.vocab, "hidden_size": arch.hidden, "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads, "num_key_value_heads": arch.kv_heads, "head_size": arch.head_dim,
        "intermediate_size": arch.intermediate, "hidden_act": arch.hidden_act, "norm_epsilon": arch.rms_eps,
        "position_embedding_type": "mrope", "max_position_embeddings": arch.max_positions,
        "rotary_embedding_dim": arch.head_dim, "rotary_base": arch.rope_theta,
        "rotary_scaling": {"type": "mrope", "mrope_section": list(arch.mrope_section)},
        "qwen_type": "qwen2_vl", "attn_bias": True, "mlp_bias": False, "use_logn_attn": False,
        "disable_weight_only_quant_plugin": False, "seq_length": 8192, "num_labels": 1,
        "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0,
        "tie_word_embeddings": arch.tie_embeddings, "qk_layernorm": False,
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": ENGINE_PRECISIONS[precision], "kv_cache_quant_algo": None},
    }


# ---------------------------------------------------------------------------------------------
# weights


def canonical_name(name: str) -> str:
    """HF tensor name -> the 4.x layout (`model.layers.N...`, `model.embed_tokens`, `lm_head`,
    `visual.*`), whichever of the 4.x / 5.x layouts the file uses."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def is_vision(name: str) -> bool:
    return canonical_name(name).startswith("visual.")


class TensorSource:
    """Lazy access to a checkpoint's tensors by canonical name (single or sharded safetensors)."""

    def __init__(self, checkpoint: Path):
        from safetensors import safe_open

        checkpoint = Path(checkpoint)
        index = checkpoint / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
        self._handles = [safe_open(str(checkpoint / f), framework="pt") for f in files]
        self.where = {canonical_name(k): (h, k) for h in self._handles for k in h.keys()}  # noqa: SIM118 (safe_open handles do not iterate)

    def names(self) -> list[str]:
        return sorted(self.where)

    def get(self, name: str):
        handle, key = self.where[name]
        return handle.get_tensor(key)


def convert_weights(source: TensorSource, arch: TextArch, dtype) -> tuple[dict, set[str]]:
    """HF language-model tensors -> TRT-LLM names (tp=1). Returns (weights, HF names consumed)."""
    import torch

    used: set[str] = set()

    def take(name):
        used.add(name)
        return source.get(name).to(dtype)

    out = {"transformer.vocab_embedding.weight": take("model.embed_tokens.weight")}
    for i in range(arch.layers):
        hf, trt = f"model.layers.{i}.", f"transformer.layers.{i}."
        qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        out[trt + "attention.qkv.weight"] = torch.cat([take(n + ".weight") for n in qkv], dim=0)
        out[trt + "attention.qkv.bias"] = torch.cat([take(n + ".bias") for n in qkv], dim=0)
        for src, dst in _LAYER_MAP.items():
            out[trt + dst] = take(hf + src)
    out["transformer.ln_f.weight"] = take("model.norm.weight")
    if arch.tie_embeddings:  # the converter writes lm_head as a copy of the embedding
        out["lm_head.weight"] = out["transformer.vocab_embedding.weight"].clone()
        if "lm_head.weight" in source.where:
            used.add("lm_head.weight")
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}, used


def int8_weight_only(weight) -> tuple[np.ndarray, np.ndarray]:
    """The symmetric per-channel int8 quantization trtllm-build applies to a W8A16 weight.

    weight: (out, in) HF / checkpoint layout. Returns (q: (in, out) int8 -- the transposed matrix
    the op quantizes along its last axis, before the SM-specific interleave; scale: (out,) float32)
    with weight.T ~= q * scale and |weight.T - q * scale| <= scale / 2.
    """
    v = np.asarray(weight, np.float32).T
    scale = np.abs(v).max(axis=0) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
    return q, scale


def convert_checkpoint(checkpoint: Path, out: Path, precision: str = "fp16") -> dict:
    """Write `out/config.json` + `out/rank0.safetensors`; return {config, unused: vision names}.

    int8-sq cannot be written here (it needs calibrated activation ranges): see
    trtllm_quant.smoothquant_command.
    """
    import torch
    from safetensors.torch import save_file

    if precision == "int8-sq":
        raise ValueError("int8-sq needs calibration by TensorRT-LLM's converter: trtllm_quant.smoothquant_command")
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    arch = TextArch.from_config(config)
    cfg = trtllm_config(arch, precision)
    source = TensorSource(checkpoint)
    weights, used = convert_weights(source, arch, getattr(torch, cfg["dtype"]))
    left = [n for n in source.names() if n not in used]
    if any(not is_vision(n) for n in left):
        raise ValueError(f"{checkpoint}: language-model tensors the converter does not map: "
                         f"{[n for n in left if not is_vision(n)][:5]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(weights, str(out / "rank0.safetensors"))
    log.info("%s: %d tensors (%s), %d vision tensors left for the vision engine", out, len(weights),
             precision, len(left))
    return {"config": cfg, "unused": left}


# ---------------------------------------------------------------------------------------------
# build


@dataclass(frozen=True)
class EngineLimits:
    """Shape limits of one stage's engine; the image embeddings enter through the prompt table."""

    image_tokens: int  # merged vision tokens per request (GSE 1920x1080 -> 2,691; LPR 512x512 -> 324)
    max_batch_size: int = 4
    max_text_tokens: int = 512  # chat template + question around the image
    max_new_tokens: int = 1024

    @property
    def max_input_len(self) -> int:
        return self.image_tokens + self.max_text_tokens

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_new_tokens

    @property
    def max_multimodal_len(self) -> int:  # = max_prompt_embedding_table_size
        return self.image_tokens * self.max_batch_size


def image_tokens(checkpoint: Path, input_size: tuple[int, int]) -> int:
    """LLM tokens of one stage image (width, height) under the checkpoint's processor settings."""
    from finers_rt.qwen_vision_host import VisionPreprocessConfig, smart_resize

    cfg = VisionPreprocessConfig.from_checkpoint(checkpoint)
    h, w = smart_resize(input_size[1], input_size[0], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return (h // cfg.factor) * (w // cfg.factor)


def build_command(ckpt_dir: Path, engine_dir: Path, limits: EngineLimits) -> list[str]:
    """The `trtllm-build` command line for one stage (plugins follow the checkpoint dtype)."""
    return [
        "trtllm-build", "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(engine_dir),
        "--max_batch_size", str(limits.max_batch_size), "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len), "--max_num_tokens", str(max(8192, limits.max_input_len)),
        "--max_multimodal_len", str(limits.max_multimodal_len),
        "--gemm_plugin", "auto", "--gpt_attention_plugin", "auto", "--kv_cache_type", "paged",
        "--remove_input_padding", "enable", "--use_paged_context_fmha", "enable",
    ]


def trtllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_llm") is not None and shutil.which("trtllm-build") is not None


def build_engine(command: list[str]) -> None:
    """Run `trtllm-build`; refuses with the command and the install line where it is absent."""
    if not trtllm_available():
        raise RuntimeError(
            f"tensorrt_llm / trtllm-build are not installed here. On a GPU machine: pip install "
            f"'finers-rt[trtllm]' (tensorrt-llm=={TRTLLM_VERSION}) or use the NGC container "
            f"nvcr.io/nvidia/tensorrt-llm/release:{TRTLLM_VERSION}, then run:\n  {' '.join(command)}")
    subprocess.run(command, check=True)


# ---------------------------------------------------------------------------------------------
# `finers-rt export --target trtllm-engine`


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless overwrite (then clear it), like the ONNX export."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def export_trtllm_engine(checkpoints: Path, out: Path, *, precision: str = "fp16", build: bool = True,
                         max_batch_size: int = 4, examples_dir: Path | None = None,
                         overwrite: bool = False) -> dict:
    """checkpoints/{gse,lpr} -> out/{gse,lpr}/{checkpoint,engine} + out/trtllm_manifest.json.

    Converts on any machine; builds (and calibrates int8-sq) only where TensorRT-LLM is installed,
    else the manifest records the exact commands and `built: false`.
    """
    from finers_rt import __version__
    from finers_rt.config import GSE, LPR
    from finers_rt.manifest import hash_tree

    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"--precision for trtllm-engine must be one of {sorted(ENGINE_PRECISIONS)}")
    checkpoints, out = Path(checkpoints), Path(out)
    prepare_out(out, overwrite)
    manifest = {"format": 1, "kind": "trtllm-engine", "finers_rt": __version__, "tensorrt_llm": TRTLLM_VERSION,
                "precision": precision, "checkpoints": str(checkpoints), "stages": {}}
    for stage in (GSE, LPR):
        src, dst = checkpoints / stage.name, out / stage.name
        ckpt_dir, engine_dir = dst / "checkpoint", dst / "engine"
        commands = []
        if precision == "int8-sq":
            from .trtllm_quant import smoothquant_command, write_qwen2vl_shim

            write_qwen2vl_shim(src, dst / "hf_shim")
            commands.append(smoothquant_command(dst / "hf_shim", ckpt_dir, examples_dir or Path("examples")))
        else:
            convert_checkpoint(src, ckpt_dir, precision)
        limits = EngineLimits(image_tokens(src, stage.input_size), max_batch_size=max_batch_size,
                              max_new_tokens=stage.max_new_tokens)
        commands.append(build_command(ckpt_dir, engine_dir, limits))
        built = build and trtllm_available()
        if build and not built:
            log.warning("TensorRT-LLM is not installed: %s converted, not built; run:\n  %s", stage.name,
                        "\n  ".join(" ".join(c) for c in commands))
        if built:
            if precision == "int8-sq":
                from .trtllm_quant import run_smoothquant

                run_smoothquant(commands[0])
            build_engine(commands[-1])
        manifest["stages"][stage.name] = {
            "source_hash": hash_tree(src), "image_tokens": limits.image_tokens,
            "max_input_len": limits.max_input_len, "max_seq_len": limits.max_seq_len,
            "max_multimodal_len": limits.max_multimodal_len, "commands": [" ".join(c) for c in commands],
            "built": built,
        }
    (out / "trtllm_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def add_trtllm_export_args(p) -> None:
    """Extra `finers-rt export` options for the TensorRT-LLM targets (cli.py registers them)."""
    p.add_argument("--target", default="onnx", choices=["onnx", "trtllm-engine", "trtllm"],
                   help="onnx (default): verified ONNX engine folder; trtllm-engine: TensorRT-LLM checkpoint + "
                        "trtllm-build (fp16 | bf16 | int8-wo | int8-sq); trtllm: LLM API checkpoint "
                        "(fp16 | bf16 | fp8 | int4-awq via ModelOpt)")
    p.add_argument("--no-build", action="store_true",
                   help="trtllm-engine: convert only; record the trtllm-build command in the manifest")
    p.add_argument("--trtllm-examples", type=Path, default=None,
                   help="TensorRT-LLM repo examples/ folder (int8-sq calibration; NGC: /app/tensorrt_llm/examples)")
    p.add_argument("--calib-data", type=Path, default=None,
                   help="trtllm fp8|int4-awq calibration: a FineRS-format folder (annotations.json + images/); "
                        "default: synthetic frames")


DEFAULT_PRECISION = {"trtllm-engine": "fp16", "trtllm": "bf16"}


def run_export_target(args) -> dict:
    """Dispatch `finers-rt export --target trtllm-engine|trtllm` (args from the export parser);
    `--precision` unset means fp16 for engines, bf16 (the checkpoint as is) for the LLM API."""
    precision = args.precision or DEFAULT_PRECISION.get(args.target)
    if args.target == "trtllm-engine":
        return export_trtllm_engine(args.checkpoints, args.out, precision=precision, build=not args.no_build,
                                    examples_dir=args.trtllm_examples, overwrite=args.overwrite)
    if args.target == "trtllm":
        from .trtllm_quant import export_llmapi

        return export_llmapi(args.checkpoints, args.out, precision=precision, calib_data=args.calib_data,
                             overwrite=args.overwrite)
    raise ValueError(f"run_export_target handles the trtllm targets, not {args.target!r}")
