"""Qwen2.5-VL vision tower -> `vision.onnx` (IO: `finers_rt.specs.VISION`), verified against HF.

The stock `model.model.visual` derives its window index, cu_seqlens and rotary table from
`grid_thw` with Python loops, so it exports only for one fixed grid. `VisionForOnnx` takes that
index work as inputs instead (computed on the host by `finers_rt.qwen_vision_host.vision_inputs`)
and runs window attention as a padded [W, L] batch of windows, so one graph serves every image
size and no N x N mask exists anywhere (N = 10,764 patches at 1920x1080).
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..qwen_vision_host import VisionPreprocessConfig, pixel_values, vision_inputs
from ..specs import VISION
from .onnx_mha import ATTENTION_KINDS, full_attention, masked_attention, mha_translation, rotary  # "ort"

log = logging.getLogger(__name__)

# Verification inputs: the two stage sizes (GSE 1920x1080 -> 1932x1092, grid 78x138; LPR 512x512
# -> 504x504, grid 36x36) and an odd one with partial windows on both edges (336x504, grid 24x36).
VERIFY_SIZES = {"gse_1920x1080": (1080, 1920), "lpr_512x512": (512, 512), "odd_333x517": (333, 517)}
EXAMPLE_SIZE = (504, 504)  # trace input: N=1296, W=25, L=64 (distinct, > 1: no 0/1 specialisation)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF Qwen2_5_VLRMSNorm written as x / sqrt(...): ORT fuses this form into one
    SimplifiedLayerNormalization kernel (x * rsqrt(...) exports as Sqrt + Reciprocal and is not fused)."""
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionForOnnx(nn.Module):
    """Export-only wrapper around HF `Qwen2_5_VisionTransformerPretrainedModel`; not for direct use.

    Reuses the tower's weights (patch_embed, blocks, merger, rotary inv_freq). Inputs are the
    host-computed, window-ordered tensors of `vision_inputs`; output `image_embeds` (N/4, out_hidden)
    stays in window (merge-unit) order: the host restores raster order with `reverse`.
    """

    def __init__(self, visual: nn.Module, attention: str = "onnx"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.attention_kind = attention
        cfg = visual.config
        self.num_heads = cfg.num_heads
        self.fullatt = frozenset(visual.fullatt_block_indexes)
        # Conv3d with kernel == stride on (N, 3, 2, 14, 14) patches is one matmul: (N, 1176) @ (1176, D).
        conv = visual.patch_embed.proj.weight  # (D, 3, T, P, P)
        weight = conv.detach().reshape(conv.shape[0], -1).t().contiguous()  # (1176, D)
        self.register_buffer("patch_weight", weight, persistent=False)
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().float(), persistent=False)
        self.blocks = visual.blocks
        self.merger = visual.merger

    def rotary(self, pos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos_ids (N, 2) int64 (h, w) -> cos, sin (N, head_dim): `rotary_pairs` twice (HF's layout,
        cos(cat(f, f)) == cat(cos f, cos f) exactly)."""
        cos, sin = self.rotary_pairs(pos_ids)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def attention(self, attn: nn.Module, x, cos, sin, bias=None):
        """Batched non-causal attention. x (B, S, D); cos/sin (B, 1, S, hd); bias (B, 1, 1, S) or None."""
        b, s, d = x.shape
        qkv = attn.qkv(x).reshape(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        qk = qkv[:2]  # (2, B, H, S, hd): rotary on q and k in one pass
        q, k = (qk * cos + _rotate_half(qk) * sin).unbind(0)
        scores = (q * attn.scaling) @ k.transpose(-1, -2)  # (B, H, S, S); ORT folds the scale into the MatMul
        if bias is not None:
            scores = scores + bias
        out = scores.softmax(dim=-1) @ qkv[2]  # (B, H, S, hd)
        return attn.proj(out.transpose(1, 2).reshape(b, s, d))

    def rotary_pairs(self, pos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos_ids (N, 2) int64 -> cos, sin (N, head_dim/2): one angle per rotated pair ([h freqs,
        w freqs]), the tables `onnx_mha.rotary` (ORT's RotaryEmbedding) takes."""
        freqs = pos_ids.to(torch.float32)[:, :, None] * self.inv_freq  # (N, 2, head_dim/4)
        freqs = freqs.reshape(freqs.shape[0], -1)  # (N, head_dim/2): h then w
        return freqs.cos(), freqs.sin()

    def attention_ort(self, attn: nn.Module, x, positions, cos, sin, key_mask=None):
        """Attention as ORT contrib ops: x (B, S, D); positions (B, S) int64 rows of cos/sin
        (N, head_dim/2); key_mask (B, S) int32 (0 = padding slot) or None. q, k and v stay in
        (B, S, H*hd) layout throughout: no head transposes, rotary in one pass each."""
        b, s, d = x.shape
        rows = x.reshape(b * s, d)  # 2-D: Gemms with their bias; one per third of the qkv weight
        q, k, v = (nn.functional.linear(rows, w, bias).reshape(b, s, d)  # (no Split copy of a (B*S, 3D) output)
                   for w, bias in zip(attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3)))
        q, k = (rotary(t, positions, cos, sin, self.num_heads) for t in (q, k))
        if key_mask is None:
            out = full_attention(q, k, v, self.num_heads, attn.scaling)
        else:
            out = masked_attention(q, k, v, key_mask, self.num_heads, attn.scaling)
        return attn.proj(out.reshape(b * s, d)).reshape(b, s, d)

    def forward(self, pixel_values, pos_ids, win_gather, win_mask, win_scatter):
        """pixel_values (N, 1176) f32, pos_ids (N, 2) i64, win_gather (W, L) i64, win_mask (W, L) bool,
        win_scatter (N,) i64 -> image_embeds (N/4, out_hidden) f32, window order."""
        x = pixel_values @ self.patch_weight  # (N, D)
        n, d = x.shape
        if self.attention_kind == "ort":  # contrib ops; (N, hd/2) tables indexed by patch
            cos, sin = self.rotary_pairs(pos_ids)
            everyone = torch.arange(n)[None]  # (1, N): a full block reads rows 0..N-1
            key_mask = win_mask.to(torch.int32)  # (W, L), 1 = real patch

            def full(attn, h):
                return self.attention_ort(attn, h[None], everyone, cos, sin)[0]

            def windows(attn, h):
                return self.attention_ort(attn, h[win_gather], win_gather, cos, sin, key_mask)
        else:  # standard ops; (N, hd) tables, gathered per window
            cos, sin = self.rotary(pos_ids)
            win_cos, win_sin = cos[win_gather][:, None], sin[win_gather][:, None]  # (W, 1, L, hd)
            # (W, 1, 1, L) additive key mask, 0 = real patch; every window holds a real patch, so no row is all -inf
            key_bias = torch.zeros(win_mask.shape, dtype=x.dtype).masked_fill(~win_mask, float("-inf"))[:, None, None]

            def full(attn, h):
                return self.attention(attn, h[None], cos[None, None], sin[None, None])[0]

            def windows(attn, h):
                return self.attention(attn, h[win_gather], win_cos, win_sin, key_bias)
        for i, blk in enumerate(self.blocks):
            h = _rms_norm(blk.norm1, x)
            if i in self.fullatt:  # one image: every patch attends to all N
                a = full(blk.attn, h)
            else:  # padded windows (W, L, D); padding slots are dropped again by the scatter
                a = windows(blk.attn, h).reshape(-1, d)[win_scatter]
            x = x + a
            x = x + blk.mlp(_rms_norm(blk.norm2, x))
        merged = _rms_norm(self.merger.ln_q, x).reshape(n // 4, -1)  # (N/4, 4D): one row per 2x2 unit
        return self.merger.mlp(merged)


def load_visual(checkpoint: Path) -> nn.Module:
    """HF vision tower of a Qwen2.5-VL checkpoint (fp32, eval, CPU), without loading the decoder.

    The full 7B model is ~33 GB in fp32; the tower alone ~2.7 GB. Its weights are read from the
    safetensors files under either key layout (`visual.*` as saved by 5.x and the original
    checkpoints, `model.visual.*` otherwise) and loaded strictly.
    """
    import transformers
    from safetensors import safe_open

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    visual = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel._from_config(
        config.vision_config, attn_implementation="sdpa", dtype=torch.float32)
    state = {}
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key).to(torch.float32)
    visual.load_state_dict(state, strict=True)
    return visual.eval()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients + noise, so resizing and every patch see real variation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def _export(wrapper: VisionForOnnx, feeds: dict, out_path: Path, opset: int) -> str:
    """torch.onnx.export with dynamic N, W, L; returns the exporter used."""
    w, l_ = torch.export.Dim("num_windows", min=1), torch.export.Dim("window_len", min=1)
    n = 4 * torch.export.Dim("num_tokens", min=1)  # N = 4 * units: the merger views (N, D) as (N/4, 4D)
    dynamic = {
        "pixel_values": {0: n}, "pos_ids": {0: n}, "win_gather": {0: w, 1: l_}, "win_mask": {0: w, 1: l_},
        "win_scatter": {0: n},
    }
    args = tuple(torch.from_numpy(feeds[name]) for name in VISION.input_names)
    table = mha_translation() if wrapper.attention_kind == "ort" else None
    # protobuf caps a file at 2 GB: the 7B tower (~2.7 GB fp32) needs its weights in vision.onnx.data
    external = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > 1.5 * 2**30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, args, str(out_path), dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
            input_names=VISION.input_names, output_names=VISION.output_names, external_data=external,
            optimize=True, verbose=False, custom_translation_table=table,
        )
    return "dynamo"


def verify_vision(onnx_path: Path, visual: nn.Module, cfg: VisionPreprocessConfig, *, providers=None) -> dict:
    """ORT (after the host `reverse`) vs HF `visual(raster pixel_values, grid_thw)` at VERIFY_SIZES."""
    from ..backends.ort_vision import OrtVision

    runner = OrtVision(onnx_path, providers=providers, config=cfg)
    report = {}
    for i, (name, (h, w)) in enumerate(VERIFY_SIZES.items()):
        image = random_image(h, w, seed=i)
        patches, grid = pixel_values(image, cfg)
        with torch.inference_mode():
            ref = visual(torch.from_numpy(patches), torch.tensor([grid])).pooler_output.numpy()
        got = runner.run(image)
        diff = np.abs(got - ref)
        report[name] = {
            "grid": list(grid), "max_abs_diff": float(diff.max()),
            "mismatch_pct": float(100 * np.mean(diff > VISION.atol)), "ref_max_abs": float(np.abs(ref).max()),
        }
    return report


def export_vision(checkpoint: Path, out_path: Path, *, opset: int = 18, attention: str = "onnx") -> dict:
    """Export the vision tower of `checkpoint` to `out_path`, verify it, return the report.

    attention: "onnx" (standard ops: ORT, TensorRT) or "ort" (ORT's contrib ops: every block's
    attention as MultiHeadAttention, the windows' with a key padding mask, and q/k rotary as
    RotaryEmbedding, all in (B, S, H*hd) layout; less memory and time on ORT, not parseable by
    TensorRT).

    Raises RuntimeError when any verification size exceeds `VISION.atol`.
    """
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    cfg = VisionPreprocessConfig.from_checkpoint(checkpoint)
    visual = load_visual(checkpoint)
    wrapper = VisionForOnnx(visual, attention).eval()
    feeds, _, _ = vision_inputs(random_image(*EXAMPLE_SIZE), cfg)
    t0 = time.perf_counter()
    with torch.inference_mode():
        exporter = _export(wrapper, feeds, out_path, opset)
    report = {"exporter": exporter, "opset": opset, "attention": attention,
              "export_s": round(time.perf_counter() - t0, 2)}
    report["sizes"] = verify_vision(out_path, visual, cfg)
    worst = max(r["max_abs_diff"] for r in report["sizes"].values())
    report["max_abs_diff"] = worst
    log.info("vision.onnx %s: max abs diff %.3g (atol %g)", out_path, worst, VISION.atol)
    if not worst <= VISION.atol:  # also catches NaN
        raise RuntimeError(f"{out_path}: vision graph differs from torch by {worst:.3g} > atol {VISION.atol}: {report}")
    return report
