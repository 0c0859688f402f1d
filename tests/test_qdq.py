"""Q/DQ (explicit int8) copies of the TensorRT graphs: `finers_rt.export.qdq`.

1. A hand-built MatMul graph: the Q/DQ graph ORT writes and runs must equal symmetric int8 computed
   by hand in numpy (scale = absmax / 127, zero point 0, round half to even, saturate).
2. The real tiny-checkpoint graphs through `python -m finers_rt.export.qdq`: Q/DQ pairs only on the
   inputs of weight-bearing MatMul/Gemm/Conv, per-channel symmetric weights, fp32 graphs untouched,
   held-out deviations within THRESHOLDS and recorded in the manifest; then `finers-rt build
   --precision int8` (fake TensorRT) parses the Q/DQ files.
3. `finers-rt export --qdq int8` wiring (export itself mocked).
4. fp8 (E4M3) copies converted from the int8 ones (`qdq_fp8`): scales and codes against E4M3 rounding
   computed by hand from the format's definition, the ORT result against that arithmetic, and the
   tiny graphs' fp8 copies beside the int8 ones with their own manifest section and parity.
"""
from __future__ import annotations

import collections
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="Q/DQ export needs onnx: pip install -e '.[export]'")
from finers_rt.export import qdq
from onnx import TensorProto, helper, numpy_helper

from finers_rt.manifest import MANIFEST
from finers_rt.trt_engines import QDQ_GRAPHS, TRT_GRAPHS


def _int8(x: np.ndarray, scale, lo: int) -> np.ndarray:
    """ONNX QuantizeLinear, int8, zero point 0: round half to even, saturate to [lo, 127]."""
    return np.clip(np.rint(x / scale), lo, 127)


def _matmul_model(path: Path, w: np.ndarray) -> None:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))


def test_matmul_qdq_is_symmetric_int8_computed_by_hand(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 8)) * np.linspace(0.1, 3.0, 8)).astype(np.float32)  # (K, N), per-column scale
    calib = [{"x": rng.standard_normal((5, 16)).astype(np.float32)} for _ in range(3)]
    src, dst = tmp_path / "mm.onnx", tmp_path / "mm.int8.onnx"
    _matmul_model(src, w)
    assert qdq.quantize_graph(src, dst, calib) == 1

    # by hand: activation scale from the calibration absmax (MinMax, symmetric), weight scale per
    # output column (axis 1 of the (K, N) MatMul weight), zero points 0
    sx = max(np.abs(f["x"]).max() for f in calib) / np.float32(127)
    sw = np.abs(w).max(0) / np.float32(127)  # (N,)
    model = onnx.load(str(dst))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in model.graph.node
              if n.op_type == "DequantizeLinear"}
    (wq_name, (w_scale, w_zp)), = [(k, v) for k, v in scales.items() if k in inits]
    (x_scale, x_zp), = [v for k, v in scales.items() if k not in inits]
    np.testing.assert_allclose(w_scale, sw, rtol=1e-6)
    np.testing.assert_allclose(x_scale, sx, rtol=1e-6)
    assert not w_zp.any() and not x_zp.any() and w_zp.dtype == x_zp.dtype == np.int8
    np.testing.assert_array_equal(inits[wq_name], _int8(w, sw, -127))

    x = rng.standard_normal((7, 16)).astype(np.float32) * 1.5  # held out, partly past the calibrated range
    expected = (_int8(x, sx, -128) * sx) @ (_int8(w, sw, -127) * sw)
    got = qdq.simulation_session(dst).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(got - x @ w).max() > 0  # it is quantized, not the float graph


def test_only_weight_bearing_nodes_are_selected():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="linear"),
             helper.make_node("MatMul", ["a", "a"], ["s"], name="scores"),  # activation x activation
             helper.make_node("Softmax", ["s"], ["p"], name="softmax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [4, 4])], [w])
    assert qdq.weight_nodes(helper.make_model(graph)) == ["linear"]


def test_deviation_metrics_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    dev = qdq.deviation("vision", {"image_embeds": a}, {"image_embeds": np.array([[1.0, 1.0], [0.0, 2.0]], np.float32)})
    assert dev["min_token_cosine"] == pytest.approx(1 / np.sqrt(2))
    m = np.full((1, 3, 4, 4), -1.0, np.float32)
    m[0, :, :2, :2] = 1.0  # 4 px
    g = m.copy()
    g[0, 0, :2, :3] = 1.0  # 6 px: IoU 4/6 in mask 0
    dev = qdq.deviation("sam2_decoder", {"masks": m, "iou_predictions": np.zeros((1, 3))},
                        {"masks": g, "iou_predictions": np.zeros((1, 3))})
    assert dev["min_mask_iou"] == pytest.approx(4 / 6)


def test_parity_past_the_threshold_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    w = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    _matmul_model(tmp_path / "a.onnx", w)
    _matmul_model(tmp_path / "b.onnx", -w)  # opposite embeddings: cosine -1
    monkeypatch.setitem(qdq.THRESHOLDS, "vision", {"min_token_cosine": 0.99})
    rename = {"y": "image_embeds"}
    for name in ("a", "b"):
        m = onnx.load(str(tmp_path / f"{name}.onnx"))
        m.graph.node[0].output[0] = m.graph.output[0].name = rename["y"]
        onnx.save_model(m, str(tmp_path / f"{name}.onnx"))
    feeds = [{"x": np.ones((2, 8), np.float32)}]
    with pytest.raises(qdq.QdqParityError, match=r"min_token_cosine -1 .* past the limit 0.99"):
        qdq.check_parity("vision", tmp_path / "a.onnx", tmp_path / "b.onnx", feeds)


# ---- the real tiny graphs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdq_engines(tiny_engines, tmp_path_factory):
    """A copy of the tiny fp32 engine folder with int8 Q/DQ graphs, written by the module's CLI."""
    out = tmp_path_factory.mktemp("qdq") / "engines"
    shutil.copytree(tiny_engines, out)
    qdq.main(["--engines", str(out), "--calib-count", "2"])
    return out


def test_cli_writes_qdq_graphs_beside_the_fp32_ones(qdq_engines, tiny_engines):
    section = qdq.qdq_sections(json.loads((qdq_engines / MANIFEST).read_text()))["int8"]
    assert section["precision"] == "int8" and section["method"] == "MinMax" and section["calib_data"] == "synthetic"
    for rel in TRT_GRAPHS:
        entry = section["graphs"][rel]
        assert entry["file"] == rel.replace(".onnx", ".int8.onnx") and (qdq_engines / entry["file"]).is_file()
        assert (qdq_engines / rel).read_bytes() == (tiny_engines / rel).read_bytes()  # fp32 graph kept as is
        assert entry["source_sha256"] == qdq.file_sha256(qdq_engines / rel)


@pytest.mark.parametrize("rel", TRT_GRAPHS)
def test_qdq_only_around_weight_bearing_ops_with_symmetric_per_channel_weights(qdq_engines, rel):
    model = onnx.load(str(qdq_engines / qdq.qdq_file(rel)))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            consumers[name].append(n)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq
    for n in dq:
        assert {c.op_type for c in consumers[n.output[0]]} <= set(qdq.QUANT_OPS), n.name  # dedicated pairs
        assert not inits[n.input[2]].any()  # zero point 0: symmetric
        if n.input[0] in inits:  # a weight: int8, one scale per output channel
            q, scale = inits[n.input[0]], inits[n.input[1]]
            assert q.dtype == np.int8 and scale.ndim == 1 and scale.size > 1
            axis = {a.name: a.i for a in n.attribute}.get("axis", 1)
            assert scale.size == q.shape[axis] and np.abs(q).max() <= 127
        else:  # an activation: per tensor, fed by its own QuantizeLinear
            assert inits[n.input[1]].ndim == 0
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == sum(n.input[0] not in inits for n in dq)
    for kept in ("Softmax", "LayerNormalization", "Erf"):  # float ops are not quantized
        for n in model.graph.node:
            if n.op_type == kept:
                assert all(i not in {d.output[0] for d in dq} for i in n.input)


@pytest.mark.parametrize("rel", TRT_GRAPHS)
def test_held_out_deviation_within_threshold_is_recorded(qdq_engines, rel):
    parity = qdq.qdq_sections(json.loads((qdq_engines / MANIFEST).read_text()))["int8"]["graphs"][rel]["parity"]
    kind = qdq.graph_kind(rel)
    assert parity["threshold"] == qdq.THRESHOLDS[kind] and parity["held_out"] == qdq.DEFAULT_HOLDOUT
    for key, limit in qdq.THRESHOLDS[kind].items():
        assert (parity[key] >= limit) if key.startswith("min_") else (parity[key] <= limit)
        print(f"{rel} {key} {parity[key]:.4f} (limit {limit})")


def test_int8_build_parses_the_qdq_graphs(qdq_engines, monkeypatch, tmp_path):
    from finers_rt.export import trt_build
    from test_trt import H100, _fake_builder_trt, _per_graph

    folder = tmp_path / "eng"
    shutil.copytree(qdq_engines, folder)
    monkeypatch.setattr(trt_build, "device_info", lambda: dict(H100))
    trt = _fake_builder_trt("10.16.1.11")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    section = trt_build.build_engines(folder, precision="int8")
    assert [c[1] for c in trt.calls if c[0] == "parse_from_file"] == [str(folder / qdq.qdq_file(r)) for r in TRT_GRAPHS]
    assert all([c[1] for c in b if c[0] == "set_flag"] == ["INT8", "FP16"] for b in _per_graph(trt.calls))
    assert section["engines"]["gse/vision.onnx"]["onnx"] == "gse/vision.int8.onnx"


# ---- `finers-rt export --qdq int8` -----------------------------------------------------------------


def test_export_qdq_flag_exports_standard_op_graphs_then_quantizes(monkeypatch, tmp_path, capsys):
    from finers_rt.export import engine

    from finers_rt import cli

    calls = {}
    monkeypatch.setattr(engine, "export_engines", lambda ckpt, out, **kw: calls.setdefault("export", kw) and {
        "graphs": {}, "precision": "fp32"})
    section = {"precision": "int8", "method": "MinMax", "calib_images": 8, "calib_data": "synthetic",
               "held_out_images": 2, "graphs": {}}
    monkeypatch.setattr(qdq, "export_qdq", lambda out, **kw: calls.setdefault("qdq", kw) and section)
    assert cli.main(["export", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "o"), "--qdq", "int8"]) == 0
    assert (calls["export"]["vision_attention"], calls["export"]["sam2_attention"]) == ("onnx", "onnx")
    assert calls["qdq"] == {"precision": "int8", "calib_data": None, "calib_count": 8}
    assert "wrote int8 Q/DQ graphs" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "o"), "--qdq", "int8",
                     "--vision-attention", "ort"]) == 2
    assert "--qdq quantizes fp32 standard-op graphs" in capsys.readouterr().err


# ---- fp8 (E4M3) -----------------------------------------------------------------------------------


def _e4m3_grid() -> np.ndarray:
    """Every finite non-negative float8e4m3fn value, from the format: 4 exponent bits (bias 7),
    3 mantissa bits, subnormals at exponent 0, no infinities, 0x7F is NaN (so the top is 448)."""
    codes = np.arange(0x7F)  # 0x00 .. 0x7E
    e, m = codes >> 3, codes & 7
    return np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))


def _e4m3(x: np.ndarray) -> np.ndarray:
    """Round to the nearest E4M3 value, ties to the even code, saturating at +-448 (QuantizeLinear's
    float8 rounding with saturate=1), by search in the grid: independent of ml_dtypes."""
    grid = _e4m3_grid()
    a = np.minimum(np.abs(x.astype(np.float64)), grid[-1])
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.sign(x) * grid[pick]


def test_e4m3_rounding_by_hand_matches_the_converter():
    from finers_rt.export.qdq_fp8 import to_e4m3

    assert _e4m3_grid()[-1] == 448 and _e4m3_grid()[1] == 2.0 ** -9
    x = np.concatenate([np.linspace(-500, 500, 20001), np.linspace(-0.02, 0.02, 4001),
                        _e4m3_grid()[:-1] + np.diff(_e4m3_grid()) / 2]).astype(np.float32)  # all midpoints: ties
    np.testing.assert_array_equal(to_e4m3(x).astype(np.float64), _e4m3(x))


def test_matmul_fp8_is_e4m3_computed_by_hand(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 8)) * np.linspace(0.1, 3.0, 8)).astype(np.float32)
    calib = [{"x": rng.standard_normal((5, 16)).astype(np.float32)} for _ in range(3)]
    src, dst = tmp_path / "mm.onnx", tmp_path / "mm.fp8.onnx"
    _matmul_model(src, w)
    qdq.quantize_graph(src, dst, calib)
    qdq.fp8_from_int8(dst, src)

    # by hand: activation scale = calibrated absmax / 448, weight scale per output column = absmax / 448
    sx = max(np.abs(f["x"]).max() for f in calib) / 448
    sw = np.abs(w).max(0) / 448  # (N,)
    model = onnx.load(str(dst))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {k: numpy_helper.to_array(v) for k, v in inits.items()}
    dq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    (wq_name, w_dq), = [(k, n) for k, n in dq.items() if k in inits]
    (x_dq,) = [n for k, n in dq.items() if k not in inits]
    fp8 = TensorProto.FLOAT8E4M3FN
    assert inits[wq_name].data_type == fp8 and all(inits[n.input[2]].data_type == fp8 for n in (w_dq, x_dq))
    assert not any(arrays[n.input[2]].astype(np.float32).any() for n in (w_dq, x_dq))  # zero points 0
    np.testing.assert_allclose(arrays[w_dq.input[1]], sw, rtol=1e-6)
    np.testing.assert_allclose(arrays[x_dq.input[1]], sx, rtol=1e-6)
    np.testing.assert_array_equal(arrays[wq_name].astype(np.float64), _e4m3(w / arrays[w_dq.input[1]]))

    x = rng.standard_normal((7, 16)).astype(np.float32) * 1.5  # held out, partly past the calibrated range
    s_x = arrays[x_dq.input[1]].astype(np.float64)
    expected = (_e4m3(x / s_x) * s_x) @ (_e4m3(w / arrays[w_dq.input[1]]) * arrays[w_dq.input[1]])
    got = qdq.simulation_session(dst).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(got - x @ w).max() > 0


@pytest.fixture(scope="module")
def fp8_engines(qdq_engines, tmp_path_factory):
    """The int8 folder plus fp8 Q/DQ graphs, written by the module's CLI."""
    out = tmp_path_factory.mktemp("fp8") / "engines"
    shutil.copytree(qdq_engines, out)
    qdq.main(["--engines", str(out), "--precision", "fp8", "--calib-count", "2"])
    return out


@pytest.mark.parametrize("rel", QDQ_GRAPHS["fp8"])
def test_fp8_copies_sit_beside_the_int8_ones_with_their_own_section(fp8_engines, qdq_engines, rel):
    sections = qdq.qdq_sections(json.loads((fp8_engines / MANIFEST).read_text()))
    assert set(sections) == {"int8", "fp8"} and set(sections["fp8"]["graphs"]) == {"gse/vision.onnx", "lpr/vision.onnx"}
    assert not list(fp8_engines.glob("sam2/*.fp8.onnx"))  # SAM2 stays out of the fp8 recipe (trt_engines)
    assert sections["int8"] == qdq.qdq_sections(json.loads((qdq_engines / MANIFEST).read_text()))["int8"]
    entry = sections["fp8"]["graphs"][rel]
    assert entry["file"] == qdq.qdq_file(rel, "fp8") and entry["source_sha256"] == qdq.file_sha256(fp8_engines / rel)
    assert (fp8_engines / qdq.qdq_file(rel)).read_bytes() == (qdq_engines / qdq.qdq_file(rel)).read_bytes()
    model = onnx.load(str(fp8_engines / entry["file"]))
    onnx.checker.check_model(model, full_check=True)  # valid at opset 19 (schemas + shape inference)
    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(inits[n.input[2]].data_type == TensorProto.FLOAT8E4M3FN for n in dq)
    assert not any(i.data_type == TensorProto.INT8 for i in model.graph.initializer)
    for key, limit in qdq.THRESHOLDS[qdq.graph_kind(rel)].items():
        value = entry["parity"][key]
        assert (value >= limit) if key.startswith("min_") else (value <= limit)
        print(f"fp8 {rel} {key} {value:.4f} (limit {limit})")
