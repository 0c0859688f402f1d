"""The screened lm_head (export/lm_head_screen.py + backends/lm_head_screen.py) against float64.

The reference is the exact logit x . w_i in float64 numpy, independent of both the int8 graph and
the host rescoring: every logit must lie inside the graph's [lo, hi], and the screened argmax
must be the argmax of the exact logits, near-ties and batches included.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch", reason="needs the [export] extra")  # export.onnx_decoder_gqa imports torch

from finers_rt.export.lm_head_screen import WEIGHT_LEVELS, add_screened_head, screen_tables
from finers_rt.export.onnx_decoder_gqa import IR_VERSION, _Graph

from finers_rt.backends.lm_head import screened_argmax

V, H = 6000, 256


def head_session(weight: np.ndarray) -> ort.InferenceSession:
    g = _Graph()
    lo, hi = add_screened_head(g, "x", screen_tables(weight))
    g.op("Identity", lo, outputs=["lo"])
    g.op("Identity", hi, outputs=["hi"])
    graph = helper.make_graph(g.nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", H])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", weight.shape[0]])
                               for n in ("lo", "hi")], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def weights(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((V, H)) * 0.02).astype(np.float32)
    w[::97, rng.integers(0, H)] = 0.5  # outlier columns: coarse int8 steps on those rows
    w[5] = 0.0  # an all-zero row
    return w


@pytest.fixture(scope="module")
def head():
    w = weights()
    return w, head_session(w)


def hiddens(seed: int, rows: int = 1, rms: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, H)) * rms
    x[:, rng.integers(0, H, 3)] *= 20  # activation outliers (a real final norm has a few)
    return x.astype(np.float32)


@pytest.mark.parametrize("rms", [0.05, 1.0, 40.0])
def test_every_exact_logit_lies_inside_the_bounds(head, rms):
    w, sess = head
    for seed in range(5):
        x = hiddens(seed, rows=3, rms=rms)
        lo, hi = sess.run(None, {"x": x})
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        assert (lo <= exact).all() and (exact <= hi).all()
        assert (lo <= x @ w.T).all() and (x @ w.T <= hi).all()  # float32 logits too


def test_screened_argmax_is_the_exact_argmax_and_rescores_few_rows(head):
    w, sess = head
    for seed in range(20):
        x = hiddens(100 + seed, rows=2)
        lo, hi = sess.run(None, {"x": x})
        ids, widest = screened_argmax(lo, hi, x, w)
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        np.testing.assert_array_equal(ids, exact.argmax(axis=1))
        # the point of screening: a small fraction is rescored. 7-bit weight codes widen the intervals
        # by ~25% over 8-bit ones: 303 of 6000 rows at worst on these outlier-heavy hiddens
        assert widest < V // 10, widest


def test_near_ties_are_resolved_in_float32():
    """Rows 10 and 11 differ by far less than the int8 error: both are candidates, float32 decides."""
    w = weights(1)
    x = hiddens(7)[0]
    w[10] = x / np.linalg.norm(x) * 0.9
    for gap, winner in ((2e-4, 11), (-2e-4, 10)):
        w[11] = w[10] + gap * x / np.dot(x, x)  # logit_11 = logit_10 + gap
        lo, hi = head_session(w).run(None, {"x": x[None]})
        ids, widest = screened_argmax(lo, hi, x[None], w)
        assert ids[0] == winner and widest >= 2


def test_batch_rows_of_very_different_scale_share_one_activation_scale(head):
    w, sess = head
    x = np.concatenate([hiddens(1, rms=0.01), hiddens(2, rms=50.0)])  # row 0's quantization is coarse
    lo, hi = sess.run(None, {"x": x})
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert (lo <= exact).all() and (exact <= hi).all()
    np.testing.assert_array_equal(screened_argmax(lo, hi, x, w)[0], exact.argmax(axis=1))


def test_tables_round_bounds_up_and_keep_zero_rows_exact():
    t = screen_tables(weights())
    assert t.weight_q.dtype == np.int8 and t.weight_q.shape == (H, V)
    assert t.q_norm[5] == 0 and (t.weight_q[:, 5] == 0).all()
    assert t.err_weight[5] == 0 and (np.delete(t.err_weight, 5) > 0).all() and (t.scale > 0).all()


def test_the_int8_gemm_is_exact_for_the_heads_code_ranges():
    """MatMulInteger on this machine's kernel at the extremes the head feeds it: uint8 activations
    0..255 (DynamicQuantizeLinear), weight codes -63..63. ORT's AVX2 u8s8 kernel sums product pairs
    in saturating int16, so full-range (+-127) weight codes come out wrong there; these must not."""
    rng = np.random.default_rng(3)
    codes = screen_tables(weights()).weight_q
    assert np.abs(codes).max() == WEIGHT_LEVELS  # the rows' absmax maps to the top code
    b = rng.integers(-WEIGHT_LEVELS, WEIGHT_LEVELS + 1, (H, 512)).astype(np.int8)
    b[:16] = np.where(np.arange(512) % 2, WEIGHT_LEVELS, -WEIGHT_LEVELS)  # worst-case pairs
    for rows in (1, 3):
        a = rng.integers(0, 256, (rows, H)).astype(np.uint8)
        a[:, :16] = 255
        node = helper.make_node("MatMulInteger", ["a", "b", "zp"], ["y"])
        graph = helper.make_graph([node], "mmi", [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, H])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, 512])],
                                  initializer=[numpy_helper.from_array(b, "b"),
                                               numpy_helper.from_array(np.array(131, np.uint8), "zp")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expect = (a.astype(np.int64) - 131) @ b.astype(np.int64)
        np.testing.assert_array_equal(sess.run(None, {"a": a})[0], expect)


def test_a_screened_graph_without_the_7bit_format_tag_is_refused(tmp_path):
    from finers_rt.backends.lm_head import FORMAT_KEY, ROWS_KEY, SCREEN_FORMAT, lm_head_rows

    table = np.zeros((4, 2), np.float32)
    for props, ok in (({ROWS_KEY: "embed_tokens.npy"}, False),
                      ({ROWS_KEY: "embed_tokens.npy", FORMAT_KEY: SCREEN_FORMAT}, True)):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits_lo"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("logits_lo", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
        helper.set_model_props(model, props)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        if ok:
            assert lm_head_rows(sess, tmp_path / "decoder.onnx", table) is table
        else:
            with pytest.raises(ValueError, match="older format.*re-export"):
                lm_head_rows(sess, tmp_path / "decoder.onnx", table)
