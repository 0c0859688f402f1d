"""Screened lm_head: an int8 pass that bounds every logit, for an exact greedy argmax on the host.

Greedy decoding needs only the argmax of the float32 logits x @ W^T (x [B, H] the final-normed
hidden state, W [V, H]). Reading W in float32 is the whole cost of a decode step on a CPU (bench
shape: 311 MB of the 356 MB a step reads; 152k x 3584 x 4 B = 2.2 GB for 7B). This head reads it
in int8 instead and returns, for every vocab row i, an interval [lo_i, hi_i] that provably holds
the exact logit l_i = x . w_i. The host then rescores in float32 only the rows whose interval
reaches the best lower bound (`finers_rt.backends.lm_head_screen`): tens to hundreds of rows.

The bound, per row i (q_i = the dequantized int8 row; xq = the dequantized activations, d = x - xq):
    l_i - a_i = x . (w_i - q_i) + d . q_i,  where a_i = xq . q_i is what the graph computes
    |x . (w_i - q_i)| <= ||x||_2 ||w_i - q_i||_2     (Cauchy-Schwarz; the row term is precomputed)
    |d . q_i|         <= ||d||_2 ||q_i||_2           (d is computed in the graph from xq, per step)
plus float32 rounding of the graph's and the host's dot products, covered by (3H + 32) 2^-24
||x||_2 ||w_i||_2 (the worst case of the host's length-H float32 dot, twice that again for the
graph's own roundings of d, its norms and the scaling).
Standard ONNX ops only (DynamicQuantizeLinear, MatMulInteger, DequantizeLinear): their results are
defined by the ONNX spec, so the bound holds wherever the graph runs, provided the int32 products
are exact. With full-range int8 weights they are not on every kernel: ONNX Runtime's x86 u8s8 GEMM
without VNNI (seen on AVX2) sums pairs of u8 x s8 products in saturating int16 (vpmaddubsw),
wrong once a pair passes 32767 (255 * 127 * 2 = 64770; measured on an AVX2-only EPYC, ORT 1.32:
every output of a full-range MatMulInteger wrong). So the weight rows are quantized to 7 bits,
codes -63..63 (a pair is at most 255 * 63 * 2 = 32130: exact on every kernel), while the
activations keep 8 bits: their per-tensor step is what sets the interval width (a hidden state
with outliers gets a coarse step; more rows are rescored, the argmax stays exact), the weight
rows' own error is a few times smaller.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS32 = 2.0 ** -24  # unit roundoff of float32
WEIGHT_LEVELS = 63  # weight codes per sign: 7-bit, so no int16 pair sum saturates (module docstring)


@dataclass(frozen=True)
class ScreenTables:
    """Per-vocab-row constants of the screened head for a weight W [V, H]."""

    weight_q: np.ndarray  # int8 [H, V] in -63..63: round(W / scale) transposed, as MatMulInteger's B wants it
    scale: np.ndarray  # float32 [V]: per-row absmax / WEIGHT_LEVELS
    err_weight: np.ndarray  # float32 [V]: ||w_i - q_i||_2 + (3H + 32) 2^-24 ||w_i||_2, rounded up
    q_norm: np.ndarray  # float32 [V]: ||q_i||_2, rounded up


def _up(values: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded towards +inf (a bound must not shrink when stored)."""
    out = values.astype(np.float32)
    low = out.astype(np.float64) < values
    out[low] = np.nextafter(out[low], np.float32(np.inf))
    return out


def screen_tables(weight: np.ndarray) -> ScreenTables:
    """Quantize W [V, H] float32 per row (symmetric, 7-bit codes in int8) and precompute the bound's row terms."""
    w = np.asarray(weight, dtype=np.float64)
    h = w.shape[1]
    absmax = np.abs(w).max(axis=1)
    scale = (absmax / WEIGHT_LEVELS).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero row: q = 0 exactly, any scale works
    q_int = np.clip(np.rint(w / scale[:, None]), -WEIGHT_LEVELS, WEIGHT_LEVELS)
    q = q_int * scale.astype(np.float64)[:, None]  # exactly what the graph multiplies by (float32 scale)
    rounding = (3 * h + 32) * EPS32 * np.linalg.norm(w, axis=1)
    return ScreenTables(
        weight_q=np.ascontiguousarray(q_int.astype(np.int8).T),
        scale=scale,
        err_weight=_up(np.linalg.norm(w - q, axis=1) + rounding),
        q_norm=_up(np.linalg.norm(q, axis=1)),
    )


def add_screened_head(g, x: str, tables: ScreenTables, prefix: str = "lm_head") -> tuple[str, str]:
    """Nodes of the screened head in graph builder `g` (`onnx_decoder_gqa._Graph`).

    x: [B, H] float32 (final-normed hidden state). Returns the names of lo and hi, [B, V] float32.
    The activation scale is one for the whole batch (per-tensor quantization); d is per row.
    """
    xq, s, zp = g.op("DynamicQuantizeLinear", x, outputs=3)  # uint8 [B, H], float32 [], uint8 []
    acc = g.op("MatMulInteger", xq, g.const(f"{prefix}.weight_q", tables.weight_q), zp)  # int32 [B, V]
    col_scale = g.op("Mul", s, g.const(f"{prefix}.scale", tables.scale))  # [V]
    approx = g.op("Mul", g.op("Cast", acc, to=1), col_scale)  # [B, V] = xq . q_i (to=1: FLOAT)
    axes = g.const(f"{prefix}.axes", np.array([1], np.int64))
    d = g.op("Sub", x, g.op("DequantizeLinear", xq, s, zp))  # [B, H]: what quantizing x lost
    norm_x = g.op("ReduceL2", x, axes, keepdims=1)  # [B, 1]
    norm_d = g.op("ReduceL2", d, axes, keepdims=1)  # [B, 1]
    bound = g.op("Add", g.op("Mul", norm_x, g.const(f"{prefix}.err_weight", tables.err_weight)),
                 g.op("Mul", norm_d, g.const(f"{prefix}.q_norm", tables.q_norm)))  # [B, V]
    return g.op("Sub", approx, bound), g.op("Add", approx, bound)
