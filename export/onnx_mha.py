"""Torch custom ops exported as ORT's com.microsoft contrib ops: non-causal attention
(MultiHeadAttention, with or without a key padding mask) and rotary embedding (RotaryEmbedding).

Shared by the vision tower (`onnx_vision`: every block's attention and rotary) and the SAM2 image
encoder (`onnx_sam2`, Hiera's windowed / q-pooled / global blocks). Export-time only: the ops'
torch implementations are plain SDPA / HF's rotate-half arithmetic, and `mha_translation()` is the
exporter's custom translation table.
"""
from __future__ import annotations

import torch
from torch import nn

# Attention kinds: "onnx" = MatMul/Softmax/MatMul (standard ops, what TensorRT parses and fuses
# itself; materialises the (H, Sq, Skv) scores: 1.9 GB at 1080p for the Qwen tower's 4 heads, 7.4 GB
# for the 16-head 7B tower); "ort" = com.microsoft.MultiHeadAttention, ONNX Runtime's contrib op
# whose CPU kernel is flash attention (O(S) memory), for ORT-only artifacts.
ATTENTION_KINDS = ("onnx", "ort")


@torch.library.custom_op("finers_rt::full_attention", mutates_args=())
def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """q (B, Sq, H*hd), k and v (B, Skv, H*hd) -> (B, Sq, H*hd): non-causal attention, heads packed
    head-major in the last dim (MultiHeadAttention's 3-D layout); exported as MultiHeadAttention."""
    split = [t.reshape(t.shape[0], t.shape[1], num_heads, t.shape[2] // num_heads).transpose(1, 2)
             for t in (q, k, v)]
    out = nn.functional.scaled_dot_product_attention(*split, scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


@full_attention.register_fake
def _(q, k, v, num_heads, scale):
    return torch.empty_like(q)


@torch.library.custom_op("finers_rt::masked_attention", mutates_args=())
def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, num_heads: int,
                     scale: float) -> torch.Tensor:
    """`full_attention` with key_mask (B, Skv) int32 (1 = attend, 0 = padding); exported as
    MultiHeadAttention's key_padding_mask. Every row needs one key with mask 1."""
    split = [t.reshape(t.shape[0], t.shape[1], num_heads, t.shape[2] // num_heads).transpose(1, 2)
             for t in (q, k, v)]
    bias = torch.zeros(key_mask.shape, dtype=q.dtype).masked_fill(key_mask == 0, float("-inf"))[:, None, None]
    out = nn.functional.scaled_dot_product_attention(*split, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


@masked_attention.register_fake
def _(q, k, v, key_mask, num_heads, scale):
    return torch.empty_like(q)


@torch.library.custom_op("finers_rt::rotary", mutates_args=())
def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """Rotary embedding, rotate-half layout (HF `rotate_half`), exported as ORT's RotaryEmbedding.

    x (B, S, H*hd); positions (B, S) int64 rows of the tables; cos, sin (P, hd/2): the angle of
    each rotated pair (HF's (P, hd) tables are these twice). Per head: out[:hd/2] = x1*cos - x2*sin,
    out[hd/2:] = x2*cos + x1*sin, i.e. x*cat(cos, cos) + rotate_half(x)*cat(sin, sin)."""
    b, s, d = x.shape
    x1, x2 = x.reshape(b, s, num_heads, d // num_heads).chunk(2, dim=-1)
    c, sn = cos[positions][:, :, None], sin[positions][:, :, None]  # (B, S, 1, hd/2)
    return torch.cat((x1 * c - x2 * sn, x2 * c + x1 * sn), dim=-1).reshape(b, s, d)


@rotary.register_fake
def _(x, positions, cos, sin, num_heads):
    return torch.empty_like(x)


def _register_schemas() -> None:
    """onnx ships no schemas for ORT's contrib ops and the exporter needs one: register the subset
    used (MultiHeadAttention: query, key, value, bias, key_padding_mask; RotaryEmbedding)."""
    import onnx

    io, attr = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    INT, FLOAT = onnx.defs.OpSchema.AttrType.INT, onnx.defs.OpSchema.AttrType.FLOAT
    if not onnx.defs.has("MultiHeadAttention", "com.microsoft"):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "MultiHeadAttention", "com.microsoft", 1,
            inputs=[io("query", "T"), io("key", "T"), io("value", "T"), io("bias", "T", param_option=optional),
                    io("key_padding_mask", "M", param_option=optional)],
            outputs=[io("output", "T")],
            type_constraints=[("T", ["tensor(float)"], "fp32 only"), ("M", ["tensor(int32)"], "1 = attend")],
            attributes=[attr("num_heads", INT), attr("scale", FLOAT)],
        ))
    if not onnx.defs.has("RotaryEmbedding", "com.microsoft"):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "RotaryEmbedding", "com.microsoft", 1,
            inputs=[io("input", "T"), io("position_ids", "M"), io("cos_cache", "T"), io("sin_cache", "T")],
            outputs=[io("output", "T")],
            type_constraints=[("T", ["tensor(float)"], "fp32 only"), ("M", ["tensor(int64)"], "positions")],
            attributes=[attr("num_heads", INT), attr("interleaved", INT)],
        ))


def mha_translation() -> dict:
    """onnxscript translations of the custom ops above to ORT's com.microsoft contrib ops."""
    import onnxscript

    _register_schemas()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def mha(q, k, v, num_heads: int, scale: float):
        return msft.MultiHeadAttention(q, k, v, num_heads=num_heads, scale=scale)

    def masked_mha(q, k, v, key_mask, num_heads: int, scale: float):
        return msft.MultiHeadAttention(q, k, v, None, key_mask, num_heads=num_heads, scale=scale)

    def rope(x, positions, cos, sin, num_heads: int):
        return msft.RotaryEmbedding(x, positions, cos, sin, num_heads=num_heads, interleaved=0)

    return {torch.ops.finers_rt.full_attention.default: mha,
            torch.ops.finers_rt.masked_attention.default: masked_mha,
            torch.ops.finers_rt.rotary.default: rope}
