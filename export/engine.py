"""`finers-rt export`: checkpoints folder -> engine folder of verified ONNX graphs + manifest.

Layout written (see engines/README.md):
    OUT/gse/  vision.onnx  decoder.onnx  embed_tokens.npy  + tokenizer / processor / model configs
    OUT/lpr/  the same for LPR
    OUT/sam2/ sam2_encoder.onnx  sam2_decoder.onnx
    OUT/manifest.json
Every graph verifies itself against torch inside its exporter before this returns.
"""
from __future__ import annotations

import json
import logging
import shutil
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..manifest import FORMAT_VERSION, hash_tree, write_manifest
from ..specs import DECODER_SPECS, LM_HEADS, SAM2_DECODER, SAM2_ENCODER, VISION
from .onnx_decoder import export_decoder
from .onnx_decoder_gqa import export_decoder_gqa
from .onnx_sam2 import export_sam2
from .onnx_vision import export_vision
from .quantize import compare_with_fp32, quantize_weights, to_fp16

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")  # fp16: every graph, for GPU providers; int8/int4: decoders
DECODER_EXPORTERS = {"onnx": export_decoder, "gqa": export_decoder_gqa}  # --decoder-attention
OPSET = 18
# Graph kinds (vision_attention, decoder_attention, lm_head, sam2_attention) per device the folder is
# exported for, when `--vision-attention` / `--decoder-attention` / `--lm-head` / `--sam2-attention`
# are not given (`finers-rt export --device`).
# cpu (the embedded default): the fastest measured on the CPU provider, outputs unchanged:
#   flash-attention MultiHeadAttention in the vision tower's full-attention blocks (bench shape:
#   GSE vision 2.5 vs 3.1 s, no 1.9 GB score tensor), GroupQueryAttention with an in-place KV
#   cache (GSE prefill 0.66 vs 0.93 s) and the screened lm_head (int8 bounds + exact float32
#   rescoring of the few rows that can win: the same greedy ids, a quarter of the head's bytes),
#   and MultiHeadAttention in SAM2's Hiera blocks (bench shape: encoder ~6-9 % faster).
# cuda: standard ops and float32 logits, what ran on the H100: TensorRT parses only standard ops,
#   and ORT's CUDA GroupQueryAttention is float16/bfloat16 only (an fp32 GQA decoder is refused).
EXPORT_DEVICES = {"cpu": ("ort", "gqa", "screened", "ort"), "cuda": ("onnx", "onnx", "fp32", "onnx")}


def graph_kinds(device: str | None, precision: str, vision_attention: str | None = None,
                decoder_attention: str | None = None, lm_head: str | None = None,
                sam2_attention: str | None = None) -> tuple[str, str, str, str]:
    """(vision_attention, decoder_attention, lm_head, sam2_attention) for an export: the explicit
    choices, else the device's defaults. device None: cuda for fp16 (GPU providers only), else cpu.
    The screened head is a float32 GQA graph's: with another decoder or precision the default is
    fp32 logits."""
    device = device or ("cuda" if precision == "fp16" else "cpu")
    if device not in EXPORT_DEVICES:
        raise ValueError(f"--device must be one of {sorted(EXPORT_DEVICES)}, got {device!r}")
    vision, decoder, head, sam2 = EXPORT_DEVICES[device]
    decoder = decoder_attention or decoder
    if decoder != "gqa" or precision != "fp32":
        head = "fp32"
    return vision_attention or vision, decoder, lm_head or head, sam2_attention or sam2
# Files a stage folder needs at run time besides the graphs (those a checkpoint has are copied).
STAGE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
               "generation_config.json", "chat_template.json")


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _versions() -> dict:
    dists = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "sam2")
    return {d: metadata.version(d) for d in dists}


def _worst(report) -> dict:
    """Worst max_abs_diff / mismatch_pct anywhere in an exporter's (nested) verification report."""
    diffs, mism = [], []

    def walk(d):
        if isinstance(d, dict):
            for k, v in d.items():
                if k == "max_abs_diff":
                    diffs.append(float(v))
                elif k == "mismatch_pct":
                    mism.append(float(v))
                else:
                    walk(v)

    walk(report)
    return {"max_abs_diff": max(diffs, default=float("nan")), "mismatch_pct": max(mism, default=float("nan"))}


def _entry(spec_digest: str, report: dict) -> dict:
    return {"spec_digest": spec_digest, **_worst(report), "verification": report}


def export_engines(checkpoints: Path, out: Path, *, precision: str = "fp32", overwrite: bool = False,
                   sam2_config: str | None = None, progress: bool = True, vision_attention: str = "onnx",
                   decoder_attention: str = "onnx", lm_head: str = "fp32", sam2_attention: str = "onnx") -> dict:
    """Export GSE, LPR and SAM2 from `checkpoints` (DIR/gse, DIR/lpr, DIR/sam2) into `out`.

    vision_attention: "onnx" (standard ops: every runtime, TensorRT included) or "ort" (every
    block's attention as ORT's MultiHeadAttention, its rotary as RotaryEmbedding: ~15 % faster GSE
    vision on the CPU at the bench shape, 7x less peak memory at 1080p; ONNX Runtime only,
    `finers-rt build` refuses it).
    decoder_attention: "onnx" (standard ops, KV cache grown by Concat) or "gqa" (ORT's
    GroupQueryAttention contrib op with a fixed-size KV cache written in place; ONNX Runtime only,
    which is where decoders always run; `onnx_decoder_gqa`).
    lm_head: "fp32" (logits) or "screened" (GQA fp32 only: int8 bounds on every logit, the host
    rescores the few rows that can be the argmax in float32; `lm_head_screen`).
    sam2_attention: "onnx" (standard ops) or "ort" (the SAM2 encoder's Hiera attention as ORT's
    MultiHeadAttention: faster on the CPU provider; ONNX Runtime only, TensorRT cannot parse it).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS} for ONNX export, got {precision!r}")
    if decoder_attention not in DECODER_EXPORTERS:
        raise ValueError(f"decoder_attention must be one of {sorted(DECODER_EXPORTERS)}, got {decoder_attention!r}")
    # fp16 GQA decoders are built in float16 with float16 KV IO (to_fp16 would keep fp32 IO and put
    # Casts between the bound cache and the op) and verified in float16 against HF float32.
    kv_dtype = "float16" if (decoder_attention == "gqa" and precision == "fp16") else "float32"
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")
    if lm_head == "screened" and (decoder_attention != "gqa" or precision != "fp32"):
        raise ValueError("--lm-head screened is for the float32 GQA decoder (--decoder-attention gqa "
                         f"--precision fp32), got {decoder_attention} / {precision}")
    checkpoints, out = Path(checkpoints).resolve(), Path(out)
    for sub in ("gse", "lpr", "sam2"):
        if not (checkpoints / sub).is_dir():
            raise FileNotFoundError(f"{checkpoints / sub} is missing: --checkpoints needs gse/, lpr/, sam2/")
    _prepare(out, overwrite)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one export bar here, not a "Loading weights" bar per graph
    graphs, steps = {}, [("gse", "vision"), ("gse", "decoder"), ("lpr", "vision"), ("lpr", "decoder"), ("sam2", "")]
    bar = tqdm(steps, desc="export", unit="graph", disable=not progress)
    for stage, graph in bar:
        bar.set_postfix_str(f"{stage} {graph}".strip())
        if stage == "sam2":
            report = export_sam2(checkpoints / "sam2", out / "sam2", config=sam2_config, opset=OPSET,
                                 attention=sam2_attention)
            graphs["sam2/sam2_encoder.onnx"] = _entry(SAM2_ENCODER.digest(), report["encoder"])
            graphs["sam2/sam2_decoder.onnx"] = _entry(SAM2_DECODER.digest(), report["decoder"])
            continue
        (out / stage).mkdir(exist_ok=True)
        src = checkpoints / stage
        if graph == "vision":
            report = export_vision(src, out / stage / "vision.onnx", opset=OPSET, attention=vision_attention)
            graphs[f"{stage}/vision.onnx"] = _entry(VISION.digest(), report)
        else:
            dec = out / stage / "decoder.onnx"
            head = {"lm_head": lm_head, "dtype": kv_dtype} if decoder_attention == "gqa" else {}
            report = DECODER_EXPORTERS[decoder_attention](src, dec, opset=OPSET, **head)
            if precision in ("int8", "int4"):
                fp32 = dec.with_name("decoder.fp32.onnx")
                dec.rename(fp32)
                n = quantize_weights(fp32, dec, precision)
                drift = compare_with_fp32(fp32, dec, out / stage / "embed_tokens.npy")
                fp32.unlink()
                report = {**report, "quantized_matmuls": n, "vs_fp32": drift}
            spec = DECODER_SPECS[decoder_attention](json.loads((src / "config.json").read_text()), lm_head=lm_head,
                                                    kv_dtype=kv_dtype)
            graphs[f"{stage}/decoder.onnx"] = _entry(spec.digest(), report)
            for name in STAGE_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, out / stage / name)
        log.info("%s %s verified: %s", stage, graph or "encoder+decoder", report)
    if precision == "fp16":  # after every graph verified in fp32; fp16 runs only on GPU providers
        for rel in graphs:
            if kv_dtype == "float16" and rel.endswith("/decoder.onnx"):
                graphs[rel]["fp16"] = "exported in float16 (float16 KV IO), verified vs HF float32 on the CPU"
                continue
            to_fp16(out / rel)
            graphs[rel]["fp16"] = "converted after fp32 verification; unverified on hardware here"
    manifest = {
        "format": FORMAT_VERSION,
        "finers_rt": __version__,
        "precision": precision,
        "vision_attention": vision_attention,
        "sam2_attention": sam2_attention,
        "decoder_attention": decoder_attention,
        "lm_head": lm_head,
        "decoder_kv_dtype": kv_dtype,
        "opset": OPSET,
        "checkpoints": str(checkpoints),
        "sources": {s: hash_tree(checkpoints / s) for s in ("gse", "lpr", "sam2")},
        "versions": _versions(),
        "graphs": graphs,
    }
    write_manifest(out, manifest)
    return manifest
