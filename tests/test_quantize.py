"""Weight-only INT8/INT4 decoders (MatMulNBits) from the exported fp32 decoder."""
from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx", reason="needs the [export] extra")

from finers_rt.export.quantize import compare_with_fp32, quantize_weights  # noqa: E402


@pytest.mark.parametrize("precision,bits", [("int8", 8), ("int4", 4)])
def test_every_constant_weight_matmul_and_lm_head_quantised(tiny_engines, tmp_path, precision, bits):
    src = tiny_engines / "gse" / "decoder.onnx"
    dst = tmp_path / f"decoder.{precision}.onnx"
    n = quantize_weights(src, dst, precision)
    # tiny text model: 2 layers x (q, k, v, o, gate, up, down) = 14 MatMuls, + the lm_head Gemm.
    assert n == 15
    q = onnx.load(str(dst))
    ops = [node.op_type for node in q.graph.node]
    assert ops.count("MatMulNBits") == 15 and "Gemm" not in ops
    assert all(a.i == bits for node in q.graph.node if node.op_type == "MatMulNBits"
               for a in node.attribute if a.name == "bits")
    # fp32 weights are ~39 MB (lm_head 151936 x 64); int8 ~1/4 of that, int4 ~1/8 (+ scales).
    assert dst.stat().st_size < src.stat().st_size * (0.3 if bits == 8 else 0.2)
    drift = compare_with_fp32(src, dst, tiny_engines / "gse" / "embed_tokens.npy")
    assert 0.0 <= drift["greedy_agreement"] <= 1.0 and drift["new_tokens"] == 32


def test_unknown_precision_is_an_error(tiny_engines, tmp_path):
    with pytest.raises(ValueError, match="int8"):
        quantize_weights(tiny_engines / "gse" / "decoder.onnx", tmp_path / "x.onnx", "int3")


def test_fp16_conversion_keeps_fp32_io(tiny_engines, tmp_path):
    import shutil

    import numpy as np
    from finers_rt.export.quantize import to_fp16
    from onnx import numpy_helper

    path = tmp_path / "sam2_decoder.onnx"
    shutil.copy(tiny_engines / "sam2" / "sam2_decoder.onnx", path)
    to_fp16(path)
    m = onnx.load(str(path))
    dtypes = {numpy_helper.to_array(i).dtype for i in m.graph.initializer if numpy_helper.to_array(i).dtype.kind == "f"}
    assert dtypes == {np.dtype(np.float16)}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in m.graph.input)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in m.graph.output)


def test_fp16_engine_refused_on_cpu(tiny_engines, tmp_path):
    import json
    import shutil

    from finers_rt.pipeline import Pipeline

    copy = tmp_path / "eng"
    shutil.copytree(tiny_engines, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["precision"] = "fp16"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="fp16 .* cuda or tensorrt"):
        Pipeline.from_engines(copy, device="cpu")
