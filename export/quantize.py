"""Weight-only quantisation of exported decoders: a model-to-model transform applied from outside.

INT8 / INT4 use ONNX Runtime's MatMulNBits (block-wise symmetric weights, int8 compute):
decode is memory-bound, so shrinking the weights it streams every token is what pays. The
embedding table stays on the host in fp32; only the decoder's MatMuls (incl. lm_head) change.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # weights per scale; 32 keeps the tiny test models' small K dims divisible
# MatMulNBits compute precision: 4 = int8 dot products on quantised activations. Measured on this
# CPU (tiny decoder, 64 tokens): int8 weights 34.5 ms/token at the default level (a dequantising
# fallback) vs 0.59 at level 4; int4 1.51 vs 0.71; fp32 2.12. The drift it adds is what
# `compare_with_fp32` records.
ACCURACY_LEVEL = 4


def quantize_weights(src: Path, dst: Path, precision: str, *, block_size: int = BLOCK_SIZE) -> int:
    """Rewrite every MatMul with a constant weight in `src` as MatMulNBits; returns how many."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if precision not in BITS:
        raise ValueError(f"weight-only precision must be one of {sorted(BITS)}, got {precision!r}")
    model = onnx.load(str(src))
    gemms = _gemm_to_matmul(model)
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    quantizer = MatMulNBitsQuantizer(model, bits=BITS[precision], block_size=block_size, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    out = quantizer.model.model
    n = sum(node.op_type == "MatMulNBits" for node in out.graph.node)
    if n == 0:
        raise RuntimeError(f"{src}: no MatMul could be quantised to {precision} (had {before} MatMuls)")
    onnx.save_model(out, str(dst))
    log.info("%s: %d of %d MatMuls (%d from Gemm) -> MatMulNBits (%s, block %d)",
             dst, n, before, gemms, precision, block_size)
    return n


def _gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, B, transB=1) with a constant B (the exporter's lm_head) as MatMul(A, B^T).

    MatMulNBits only replaces MatMul; the lm_head is ~7 % of a 7B model's weights and is read
    every decoded token, so it must be quantised too. Returns how many Gemms were rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    count = 0
    for i, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or len(node.input) > 2):
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w = w.T if attrs.get("transB", 0) else w  # MatMul wants [K, N]
        name = node.input[1] + "_kn"
        model.graph.initializer.append(numpy_helper.from_array(w.copy(), name))
        model.graph.node[i].CopyFrom(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
        count += 1
    used = {x for n in model.graph.node for x in n.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return count


def compare_with_fp32(fp32_path: Path, quant_path: Path, embed_path: Path, *, new_tokens: int = 32,
                      prompt_len: int = 64, seed: int = 0) -> dict:
    """How far the quantised decoder drifts from fp32: greedy tokens on the same random prompt.

    Weight-only quantisation changes logits by design, so this records the deviation instead of
    failing on it; `greedy_agreement` = fraction of fp32's tokens reproduced before they diverge.
    """
    import numpy as np

    from ..backends.ort_decode import OrtDecoder
    from ..qwen_rope import rope_index

    ref, got = OrtDecoder(fp32_path, embed_path), OrtDecoder(quant_path, embed_path)
    ids = np.random.default_rng(seed).integers(0, 150000, prompt_len).astype(np.int64)
    pos, delta = rope_index(ids, None)
    a, _ = ref.greedy(ref.embed(ids), pos, delta, max_new_tokens=new_tokens)
    b, _ = got.greedy(got.embed(ids), pos, delta, max_new_tokens=new_tokens)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"greedy_agreement": same / len(a), "new_tokens": len(a)}


def to_fp16(path: Path, dst: Path | None = None) -> None:
    """Convert a graph's weights and compute to fp16 in place (or into `dst`), keeping fp32
    inputs/outputs.

    For the CUDA / TensorRT execution providers only (ONNX Runtime's CPU provider lacks fp16
    kernels for most ops); the runtime refuses to load an fp16 engine folder on the CPU. `dst`
    lets TensorRT 11 builds convert a copy (external weights are read beside `path`).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    onnx.save_model(convert_float_to_float16(model, keep_io_types=True), str(dst or path))
