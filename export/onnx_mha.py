"""One torch custom op for non-causal attention, exported as ORT's com.microsoft.MultiHeadAttention.

Shared by the vision tower (`onnx_vision`, full-attention blocks) and the SAM2 image encoder
(`onnx_sam2`, Hiera's windowed / q-pooled / global blocks). Export-time only: the op's torch
implementation is plain SDPA, and `mha_translation()` is the exporter's custom translation table.
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


def mha_translation() -> dict:
    """onnxscript translation of `full_attention` to com.microsoft.MultiHeadAttention."""
    import onnx
    import onnxscript

    # onnx ships no schemas for ORT's contrib ops and the exporter needs one: register the subset used.
    if not onnx.defs.has("MultiHeadAttention", "com.microsoft"):
        io = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "MultiHeadAttention", "com.microsoft", 1,
            inputs=[io("query", "T"), io("key", "T"), io("value", "T")], outputs=[io("output", "T")],
            type_constraints=[("T", ["tensor(float)"], "fp32 only")],
            attributes=[onnx.defs.OpSchema.Attribute("num_heads", onnx.defs.OpSchema.AttrType.INT),
                        onnx.defs.OpSchema.Attribute("scale", onnx.defs.OpSchema.AttrType.FLOAT)],
        ))
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def mha(q, k, v, num_heads: int, scale: float):
        return msft.MultiHeadAttention(q, k, v, num_heads=num_heads, scale=scale)

    return {torch.ops.finers_rt.full_attention.default: mha}
