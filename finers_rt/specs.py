"""IO specs of the exported graphs, declared once and read by export, runtime, engine build and bench.

Each spec names its tensors, dtypes and dynamic dims, the TensorRT min/opt/max profile of every
dynamic dim, and the parity tolerance its export must meet (with the reason for that number).
Pure data: importing this module needs nothing beyond the standard library.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32, bool
    shape: tuple  # ints for static dims, strings for dynamic ones (the names key `profiles`)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # dynamic dim name -> (min, opt, max), for TensorRT optimisation profiles
    profiles: dict = field(default_factory=dict)
    atol: float = 1e-4  # max abs diff vs torch the export must meet
    tolerance_reason: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def digest(self) -> str:
        """Stable hash of the spec, stored in the engine manifest to refuse stale artifacts."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# ---- SAM2 (written by finers_rt.export.onnx_sam2.export_sam2; read by backends/ort_sam2.py) ----
# Shapes are those of hiera-t/s/b+/l alike: the prompt/mask decoder is 256 wide at every size.
# P = num_points: box corners (0 or 2) + user points + the padding point the predictor always adds.

SAM2_ENCODER = GraphSpec(
    name="sam2_encoder",
    inputs=(TensorSpec("image", "float32", (1, 3, 1024, 1024)),),  # resized + ImageNet-normalised
    outputs=(
        TensorSpec("image_embed", "float32", (1, 256, 64, 64)),  # + no_mem_embed, as set_image
        TensorSpec("high_res_feats_0", "float32", (1, 32, 256, 256)),  # conv_s0(fpn level 0)
        TensorSpec("high_res_feats_1", "float32", (1, 64, 128, 128)),  # conv_s1(fpn level 1)
    ),
    atol=1e-3,
    tolerance_reason=(
        "fp32 reassociation in ORT's fused attention/LayerNorm/GELU kernels over the Hiera blocks "
        "+ FPN: measured <= 4e-6 on random hiera-t weights; real checkpoints (untested here) can have "
        "larger activations, so keep ~250x headroom; a wrong graph (no no_mem_embed, no conv_s0) is off by >1e-2"
    ),
)

SAM2_DECODER = GraphSpec(
    name="sam2_decoder",
    inputs=(
        TensorSpec("image_embed", "float32", (1, 256, 64, 64)),
        TensorSpec("high_res_feats_0", "float32", (1, 32, 256, 256)),
        TensorSpec("high_res_feats_1", "float32", (1, 64, 128, 128)),
        TensorSpec("point_coords", "float32", (1, "num_points", 2)),  # xy in the 1024 input frame
        TensorSpec("point_labels", "float32", (1, "num_points")),  # 1 fg, 0 bg, 2/3 box, -1 pad
    ),
    outputs=(
        TensorSpec("masks", "float32", (1, 3, 256, 256)),  # low-res logits, multimask head only
        TensorSpec("iou_predictions", "float32", (1, 3)),
    ),
    profiles={"num_points": (1, 4, 16)},  # box + 2 points + pad = 5 in the pipeline
    atol=1e-3,
    tolerance_reason=(
        "fp32 reassociation in the two-way transformer and the hypernetwork matmul: measured <= 7e-7 "
        "on random weights; mask logits are thresholded at 0 so 1e-3 can only flip pixels whose "
        "logit is within 1e-3 of 0 (the end-to-end tests check mask IoU)"
    ),
)


# ---- Qwen2.5-VL text decoder (written by finers_rt.export.onnx_decoder.export_decoder; read by
# backends/ort_decode.py). Dims: batch B, seq S (new tokens), past P (cached), total = P + S.

def decoder_spec(num_layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int) -> GraphSpec:
    """The decoder graph of one text config: embeddings + M-RoPE ids + KV cache in, last logits out."""
    past, present = [], []
    for i in range(num_layers):
        for kind in ("key", "value"):
            past.append(TensorSpec(f"past_{kind}_{i}", "float32", ("batch", kv_heads, "past", head_dim)))
            present.append(TensorSpec(f"present_{kind}_{i}", "float32", ("batch", kv_heads, "total", head_dim)))
    return GraphSpec(
        name="decoder",
        inputs=(
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", hidden)),  # image features merged on host
            TensorSpec("position_ids", "int64", (3, "batch", "seq")),  # (t, h, w) M-RoPE, qwen_rope.py
            TensorSpec("attention_mask", "int64", ("batch", "total")),  # 1 = token, 0 = padding
            *past,  # post-RoPE keys / values, [B, KV, P, D]
        ),
        outputs=(TensorSpec("logits", "float32", ("batch", vocab)), *present),  # last position only
        # GSE prefill is ~2,700 tokens (1080p image) and thinks up to 1,024 tokens; opt = one decode step.
        profiles={"batch": (1, 1, 8), "seq": (1, 1, 4096), "past": (0, 3072, 5120), "total": (1, 3073, 9216)},
        atol=1e-3,
        tolerance_reason=(
            "fp32 reassociation (ORT MatMul/Softmax kernels vs torch SDPA) over every layer and the "
            "vocab-wide lm_head; measured ~1e-6 on the tiny random checkpoints, real checkpoints "
            "have logits ~30x larger; a wrong RoPE section, mask or cache order is off by >1e-2"
        ),
    )


def _text_dims(config: dict) -> tuple[int, int, int, int, int]:
    """(layers, kv_heads, head_dim, hidden, vocab) of a Qwen2.5-VL config.json (5.x nests the text
    fields in `text_config`)."""
    text = {**config, **config.get("text_config", {})}
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return text["num_hidden_layers"], text["num_key_value_heads"], head_dim, text["hidden_size"], text["vocab_size"]


def decoder_spec_from_config(config: dict, lm_head: str = "fp32", kv_dtype: str = "float32") -> GraphSpec:
    """`decoder_spec` of a Qwen2.5-VL config.json (its lm_head is always float32 logits, and its
    IO, KV cache included, stays float32 even in an fp16 folder: `to_fp16` keeps fp32 IO)."""
    if lm_head != "fp32":
        raise ValueError(f"lm_head {lm_head!r} exists only for the GQA decoder (--decoder-attention gqa)")
    if kv_dtype != "float32":
        raise ValueError(f"kv_dtype {kv_dtype!r} exists only for the GQA decoder (--decoder-attention gqa)")
    return decoder_spec(*_text_dims(config))


LM_HEADS = ("fp32", "screened")  # `finers-rt export --lm-head`; the engine manifest's "lm_head"
# The GQA decoder's weight / activation / KV-cache dtype: the engine manifest's "decoder_kv_dtype"
# (`manifest.decoder_kv_dtype`). float16 is the GPU graph (ORT's CUDA GroupQueryAttention kernel
# is float16/bfloat16 only); its embeddings in and logits out stay float32.
KV_DTYPES = ("float32", "float16")


def decoder_gqa_spec(num_layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int,
                     lm_head: str = "fp32", kv_dtype: str = "float32") -> GraphSpec:
    """The decoder graph with ORT's GroupQueryAttention and a fixed-size, in-place KV cache.

    Written by `finers_rt.export.onnx_decoder_gqa.export_decoder_gqa`; read by backends/ort_decode.py.
    Dims: batch B, seq S (new tokens this run), capacity C (KV slots per row, fixed for a generate).
        inputs_embeds          float32 [B, S, H]   token embeddings, image features merged (host)
        position_ids           int64   [3, B, S]   (t, h, w) M-RoPE positions (`qwen_rope`)
        seqlens_k              int32   [B]         per row: tokens in the cache after this run - 1
                                                   (prompt: its length - 1; decode: the cache index
                                                   of the token fed now)
        total_sequence_length  int32   []          max over rows of seqlens_k + 1; equal to S only on
                                                   the first (prompt) run, which is how GQA tells a
                                                   prompt from a decode step
        last_index             int64   [B]         position in [0, S) whose logits each row returns
                                                   (prompt: its length - 1; decode: 0)
        past_key_i / past_value_i  KV   [B, KV, C, D]  post-RoPE keys / values; row b holds its
                                                   tokens at slots 0..seqlens_k[b] (right padding)
     -> logits                 float32 [B, V]      at last_index (lm_head "fp32"), or with lm_head
                                                   "screened" (`export.lm_head_screen`, read by
                                                   `backends.lm_head`):
        logits_lo / logits_hi  float32 [B, V]      bounds holding every exact float32 logit
        hidden                 float32 [B, H]      final-normed hidden state at last_index
        present_key_i / present_value_i  KV [B, KV, C, D]  bind the SAME OrtValue as the
                                                   matching past_*: GQA then writes the new slots in
                                                   place (slot seqlens_k[b] when decoding)
    KV = kv_dtype (`KV_DTYPES`): float32, or float16 for the fp16 graph (float16 weights and
    activations too; the KV IO is float16 so the cache binds to the op with no Cast between).
    """
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if lm_head == "screened" and kv_dtype != "float32":  # the int8-bounds head is the CPU graph's
        raise ValueError(f"lm_head 'screened' is for the float32 GQA decoder, got kv_dtype {kv_dtype!r}")
    past, present = [], []
    for i in range(num_layers):
        for kind in ("key", "value"):
            past.append(TensorSpec(f"past_{kind}_{i}", kv_dtype, ("batch", kv_heads, "capacity", head_dim)))
            present.append(TensorSpec(f"present_{kind}_{i}", kv_dtype, ("batch", kv_heads, "capacity", head_dim)))
    return GraphSpec(
        name="decoder_gqa",
        inputs=(
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", hidden)),
            TensorSpec("position_ids", "int64", (3, "batch", "seq")),
            TensorSpec("seqlens_k", "int32", ("batch",)),
            TensorSpec("total_sequence_length", "int32", ()),
            TensorSpec("last_index", "int64", ("batch",)),
            *past,
        ),
        outputs=(*_head_outputs(lm_head, vocab, hidden), *present),
        # capacity = prompt + max new tokens: GSE ~2,700 + 1,024 (the same range as decoder_spec's total).
        profiles={"batch": (1, 1, 8), "seq": (1, 1, 4096), "capacity": (1, 3073, 9216)},
        **_GQA_TOLERANCE[kv_dtype],
    )


# decoder_gqa_spec's parity tolerance per kv_dtype: logits vs the HF text model in float32.
_GQA_TOLERANCE = {
    "float32": {"atol": 1e-3, "tolerance_reason": (
        "fp32 reassociation (ORT's GQA kernel, SimplifiedLayerNormalization and MatMuls vs torch "
        "SDPA) over every layer and the vocab-wide lm_head; measured 3e-7 (tiny) and 2.3e-6 (bench "
        "size) on random checkpoints, real ones have logits ~30x larger; a wrong RoPE section, cache "
        "slot or seqlens_k is off by >1e-2"
    )},
    # float16 graph vs HF float32 (the IO and every logit are float32, the compute float16).
    "float16": {"atol": 0.25, "tolerance_reason": (
        "float16 weights/activations/KV (unit roundoff 4.9e-4) vs HF float32: measured 4.0e-4 (tiny, "
        "logits <= 1.2) and 2.8e-3 (bench size, logits <= 2.9) on random checkpoints, below HF's own "
        ".half() model (5.9e-4, 3.6e-3): ~1-2 roundoffs of the logit scale, growing with depth; real "
        "checkpoints have ~10-30x larger logits and 28-36 layers (estimated 0.03-0.1, not measured), "
        "so ~2.5x over that. Graph structure (RoPE sections, cache slots) is the float32 graph's check "
        "(same builder): random weights barely react to it under float16 noise. Caught here: overflow "
        "(NaN/inf fails), a missing or misplaced Cast, float16 saturation: errors of the logits' order"
    )},
}


def _head_outputs(lm_head: str, vocab: int, hidden: int) -> tuple[TensorSpec, ...]:
    if lm_head == "fp32":
        return (TensorSpec("logits", "float32", ("batch", vocab)),)
    if lm_head == "screened":
        return (TensorSpec("logits_lo", "float32", ("batch", vocab)), TensorSpec("logits_hi", "float32", ("batch", vocab)),
                TensorSpec("hidden", "float32", ("batch", hidden)))
    raise ValueError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")


def decoder_gqa_spec_from_config(config: dict, lm_head: str = "fp32", kv_dtype: str = "float32") -> GraphSpec:
    """`decoder_gqa_spec` of a Qwen2.5-VL config.json."""
    return decoder_gqa_spec(*_text_dims(config), lm_head=lm_head, kv_dtype=kv_dtype)


# decoder_attention (the engine manifest's key, `finers-rt export --decoder-attention`) -> spec of a config.json
DECODER_SPECS = {"onnx": decoder_spec_from_config, "gqa": decoder_gqa_spec_from_config}


# Qwen2.5-VL vision tower with host-computed indices (export: finers_rt.export.onnx_vision,
# host side: finers_rt.qwen_vision_host.vision_inputs). All tensors in window order; N patches,
# W windows of at most L patches. 1176 = 3 channels * 2 frames * 14 * 14 pixels per patch row.
VISION = GraphSpec(
    name="vision",
    inputs=(
        TensorSpec("pixel_values", "float32", ("num_patches", 1176)),  # normalised, window order
        TensorSpec("pos_ids", "int64", ("num_patches", 2)),  # rotary (h, w) patch coordinates
        TensorSpec("win_gather", "int64", ("num_windows", "window_len")),  # patch index per window slot
        TensorSpec("win_mask", "bool", ("num_windows", "window_len")),  # True = real patch, False = padding
        TensorSpec("win_scatter", "int64", ("num_patches",)),  # slot of each patch in the W*L layout
    ),
    # num_tokens = num_patches / 4 (one per 2x2 merge unit), merge-unit window order: the host
    # restores raster order with `reverse`; out_hidden is the checkpoint's vision out_hidden_size.
    outputs=(TensorSpec("image_embeds", "float32", ("num_tokens", "out_hidden")),),
    # The two stage inputs: LPR 512x512 -> 504x504 (1296 patches, 25 windows) and GSE 1920x1080 ->
    # 1932x1092 (10,764 patches, 180 windows); every window of either holds up to 4x4 units = 64 patches.
    profiles={"num_patches": (1296, 10764, 10764), "num_windows": (25, 180, 180), "window_len": (64, 64, 64)},
    atol=1e-4,
    tolerance_reason=(
        "fp32 reassociation only (ORT MatMul/Softmax over padded windows vs torch SDPA per window, "
        "the patch Conv3d as one MatMul, RMSNorm as x/sqrt); measured ~3e-7 on the tiny random "
        "checkpoints (outputs ~0.2) at 1080p, 504x504 and 336x504; real towers have larger "
        "activations, hence the margin; a wrong window order, rotary layout or mask is off by >1e-2"
    ),
)


def profile_shapes(spec: GraphSpec, opt: dict | None = None, *, max_batch: int | None = None) -> dict:
    """TensorRT optimisation profile of a graph: {input name: (min shape, opt shape, max shape)}.

    Every dynamic dim takes min/opt/max from `spec.profiles`; `opt` overrides the opt value of
    the dims it names (the real shape a stage feeds, e.g. `qwen_vision_host.vision_dims`) and must
    lie inside the spec's [min, max]. max_batch caps a dim named "batch" (also inside the spec's
    range). Static inputs need no profile and are left out.
    """
    dims = {name: list(v) for name, v in spec.profiles.items()}
    for name, value in (opt or {}).items():
        lo, _, hi = _profile_dim(spec, name)
        if not lo <= value <= hi:
            raise ValueError(f"{spec.name}: {name}={value} is outside the profile [{lo}, {hi}] of specs.{spec.name}")
        dims[name][1] = int(value)
    if max_batch is not None:
        lo, _, hi = _profile_dim(spec, "batch")
        if not lo <= max_batch <= hi:
            raise ValueError(f"{spec.name}: max batch {max_batch} is outside the profile [{lo}, {hi}]")
        dims["batch"][1], dims["batch"][2] = min(dims["batch"][1], max_batch), max_batch
    out = {}
    for t in spec.inputs:
        if all(isinstance(d, int) for d in t.shape):
            continue
        out[t.name] = tuple(tuple(d if isinstance(d, int) else dims[d][i] for d in t.shape) for i in range(3))
    return out


def _profile_dim(spec: GraphSpec, name: str) -> tuple[int, int, int]:
    if name not in spec.profiles:
        raise ValueError(f"{spec.name} has no dynamic dim {name!r} (profiles: {sorted(spec.profiles)})")
    return spec.profiles[name]
