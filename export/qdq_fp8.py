"""fp8 (E4M3) Q/DQ copies for TensorRT on Ada / Hopper, converted from the calibrated int8 ones.

TensorRT builds fp8 only from explicitly quantized graphs: QuantizeLinear / DequantizeLinear with
float8e4m3fn zero points (ONNX opset 19). ORT's quantizer writes those only with histogram
("Distribution") calibration and a scale rule of its own; finers-rt instead converts the int8 Q/DQ
graph `qdq.quantize_graph` wrote, so both precisions share one calibration and one placement
(the inputs of weight-bearing MatMul / Gemm / Conv only):

- activations, per tensor: the int8 graph represents [-127 s, 127 s] (MinMax, symmetric); the fp8
  scale is 127 s / 448, so E4M3's largest finite value (448) lands on that same calibrated absmax;
- weights, per output channel (the int8 graph's axis): scale = absmax_c / 448 from the fp32 weight
  itself, not from its int8 codes (no double rounding); values round to nearest even and saturate
  at +-448, as ONNX QuantizeLinear does for float8 (saturate=1).
Every other node, initializer and attribute is the int8 graph's. The caller checks parity against
fp32 (`qdq.check_parity`), as for int8.
"""
from __future__ import annotations

import numpy as np

FP8_MAX = 448.0  # largest finite float8e4m3fn
INT8_MAX = 127  # symmetric int8 range of the source graph: [-127 s, 127 s]
FP8_OPSET = 19  # float8 Q/DQ types arrived in opset 19


def to_e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> float8e4m3fn (ml_dtypes), round to nearest even, saturated at +-448 (ml_dtypes
    would turn an overflow into NaN; QuantizeLinear's saturate=1 clips it)."""
    import ml_dtypes  # installed with onnx (its float8 tensors are ml_dtypes arrays)

    return np.clip(values, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def weight_scale(weight: np.ndarray, axis: int) -> np.ndarray:
    """(C,) float32 per-channel scale absmax_c / 448 along `axis` of `weight` (an all-zero channel: 1)."""
    others = tuple(a for a in range(weight.ndim) if a != axis % weight.ndim)
    scale = (np.abs(weight).max(axis=others) / np.float32(FP8_MAX)).astype(np.float32)
    scale[scale == 0] = 1.0
    return scale


def to_fp8(int8_model, fp32_model) -> int:
    """Rewrite `int8_model` (an int8 Q/DQ ModelProto from `qdq.quantize_graph`) in place as fp8;
    `fp32_model` is the graph it was quantized from (weights by consuming node name). Returns the
    number of weights converted."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in int8_model.graph.initializer}
    fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    consumers = {}
    for node in int8_model.graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    new, done, weights = {}, set(), 0
    for dq in (n for n in int8_model.graph.node if n.op_type == "DequantizeLinear"):
        x, s, zp = dq.input
        if x in inits:  # a weight: int8 codes -> e4m3 codes of the fp32 weight
            (node, k), = consumers[dq.output[0]]  # DedicatedQDQPair: one consumer, a weight-bearing op
            weight = numpy_helper.to_array(fp32_inits[fp32_nodes[node.name].input[k]])
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            scale = weight_scale(weight, axis)
            shape = [1] * weight.ndim
            shape[axis] = -1
            new[x] = to_e4m3(weight / scale.reshape(shape))
            new[s], new[zp] = scale, to_e4m3(np.zeros(scale.shape, np.float32))
            weights += 1
        elif s not in done:  # an activation: the Q and DQ of its pair share these initializers
            scale = numpy_helper.to_array(inits[s])
            new[s] = (scale * np.float32(INT8_MAX / FP8_MAX)).astype(np.float32)
            new[zp] = to_e4m3(np.zeros(numpy_helper.to_array(inits[zp]).shape, np.float32))
        done.update((s, zp))
    for i, init in enumerate(int8_model.graph.initializer):
        if init.name in new:
            int8_model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    for opset in int8_model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < FP8_OPSET:
            opset.version = FP8_OPSET
    left = [i.name for i in int8_model.graph.initializer if i.data_type == TensorProto.INT8]
    if left:
        raise RuntimeError(f"int8 initializers left after the fp8 conversion: {left[:5]}")
    return weights
