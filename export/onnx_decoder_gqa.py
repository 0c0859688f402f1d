"""Qwen2.5-VL text decoder -> ONNX with ORT's GroupQueryAttention and a fixed-size in-place KV cache.

Graph IO: `finers_rt.specs.decoder_gqa_spec` (`decoder.onnx` + `embed_tokens.npy`, like
`onnx_decoder.export_decoder`). Built node by node with `onnx.helper` from the checkpoint's weights
(torch only loads them and runs the HF reference in the verification). ONNX Runtime only: the
attention is the `com.microsoft.GroupQueryAttention` contrib op, which TensorRT cannot parse.

Per layer: SimplifiedLayerNormalization (= HF RMSNorm) -> q/k/v MatMul + bias -> M-RoPE on q and k
(standard ops, HF's rotate_half convention, cos/sin built once per run from position_ids) ->
GroupQueryAttention(do_rotary=0) -> o_proj -> residual -> RMSNorm -> SwiGLU MLP -> residual. Then
each row's `last_index` hidden state -> final norm -> lm_head: float32 logits, or (lm_head
"screened", `lm_head_screen`) an int8 pass giving bounds on every logit plus the normed hidden state,
from which the host takes the exact argmax (`finers_rt.backends.lm_head`).

dtype "float16" (the GPU graph: ORT's CUDA GroupQueryAttention is float16/bfloat16 only) writes the
same graph with float16 weights, activations and past_*/present_* KV IO, so the cache OrtValue binds
straight to the op, in place (no Cast between them; `quantize.to_fp16` would keep float32 IO and put
one there). The float32 edges stay: inputs_embeds is Cast to float16 on entry and the logits to
float32 on exit (the host's embedding table, image features and argmax stay float32). Kept float32
inside, as HF's fp16 model keeps them: the M-RoPE angles/cos/sin (positions up to ~9k rad: float16's
spacing there is 4-8) and the RMSNorm statistics (SimplifiedLayerNormalization's stash_type, 1 by
default).
Verified against HF in float32 at the spec's float16 tolerance. ORT 1.31.1's CPU provider has
float16 kernels for every op used (GroupQueryAttention included, in place), so it verifies here.

GroupQueryAttention semantics relied on (ORT 1.31.1 CPU kernel; checked against numpy attention
with a 3-row ragged batch before this exporter was written, and by `verify_decoder` on every export):
- q [B, S, N*D], k/v [B, S, KV*D] (BSNH, post-RoPE); query head h reads KV head h // (N / KV), as
  HF's repeat_kv. past/present [B, KV, C, D] (BNSH). scale = 1/sqrt(D) (HF's `scaling`), causal.
- The op's present has dim 2 = max(total_sequence_length, C). When present_* is bound to the same
  buffer as past_* (same data pointer), the kernel writes only the new slots, in place.
- First prompt: detected by S == total_sequence_length. Row b's S new keys go to slots [0, S) (its
  padding too) and query s attends keys [0, s]; seqlens_k[b] + 1 = row b's real length, so with
  RIGHT padding every real query sees exactly its own prompt.
- Decode (S = 1, total_sequence_length = max_b seqlens_k[b] + 1 > 1): row b's new key goes to slot
  seqlens_k[b] and its query attends slots [0, seqlens_k[b]]; rows step at their own lengths, the
  right padding of a shorter row is overwritten as it grows. Slots beyond are never read.
- A later prompt chunk (1 < S != total_sequence_length) exists but needs B = 1; unused here.
- CPU kernel paths (measured): a prompt (S > 1) runs a tiled online-softmax ("flash") kernel on
  every core: no [N, S, T] score matrix (peak +40 MB at S = 8,192, N = 8, where one would be
  2 GB) and masked causal blocks skipped; a decode step (S = 1) runs the plain path.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..backends.lm_head import FORMAT_KEY, ROWS_KEY, SCREEN_FORMAT, screened_argmax
from ..specs import decoder_gqa_spec
from .lm_head_screen import add_screened_head, screen_tables
from .onnx_decoder import (
    PROTOBUF_LIMIT,
    check_report,
    load_model,
    save_embed_table,
    verify_decoder,
)

log = logging.getLogger(__name__)

IR_VERSION = 10  # ONNX Runtime 1.31 reads IR <= 13; onnx 1.23's helper would write 14


class _Graph:
    """A growing ONNX graph: nodes and initializers, with a fresh name for every node output."""

    def __init__(self):
        self.nodes, self.inits, self._names, self._n = [], [], set(), 0

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer; a name already added is reused (shape constants shared by the layers)."""
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Add a node; returns its output name (or the list of names when it has several)."""
        if isinstance(outputs, int):
            self._n += 1
            outputs = [f"{op_type.lower()}_{self._n}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


class _Builder:
    """Writes the decoder graph of one HF Qwen2.5-VL model into a `_Graph`."""

    def __init__(self, model, dtype: str = "float32"):
        text = model.model.language_model
        self.dtype = np.dtype(dtype)  # weights, activations and KV cache: float32 or float16
        cfg = text.config
        self.text, self.lm_head, self.g = text, model.lm_head, _Graph()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = float(cfg.rms_norm_eps)
        self.scale = float(text.layers[0].self_attn.scaling)
        rotary = text.rotary_emb
        if rotary.attention_scaling != 1.0:
            raise ValueError(f"rope attention_scaling {rotary.attention_scaling} != 1 is not supported")
        self.inv_freq = rotary.inv_freq.detach().float().numpy()  # [D/2]: HF's own buffer, bit-exact
        self.mrope_section = list(rotary.mrope_section)  # rotary pairs per (t, h, w) axis, sums to D/2

    def _weight(self, name: str, value: np.ndarray) -> str:
        """An initializer in the graph's dtype (float16: rounded from the float32 checkpoint, as
        HF's `.half()` does)."""
        return self.g.const(name, value.astype(self.dtype, copy=False))

    def _linear(self, name: str, x: str, linear: torch.nn.Linear) -> str:
        """x [..., in] @ W^T (+ b): the weight is stored transposed, [in, out], as MatMul wants it."""
        y = self.g.op("MatMul", x, self._weight(f"{name}.weight", linear.weight.detach().float().numpy().T))
        if linear.bias is None:
            return y
        return self.g.op("Add", y, self._weight(f"{name}.bias", linear.bias.detach().float().numpy()))

    def _norm(self, name: str, x: str, norm) -> str:
        """HF RMSNorm. The op's stash_type defaults to 1: the mean of squares and its rsqrt are
        float32 for a float16 x too (ORT 1.31 CPU, checked: a float16 x with sum of squares 5.8e6
        normalises with no overflow), as HF's Qwen2RMSNorm upcasts; a float16 sum of squares
        would overflow (65504) once activations reach ~4 over H = 3584 channels."""
        weight = self._weight(f"{name}.weight", norm.weight.detach().float().numpy())
        return self.g.op("SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=self.eps)

    def from_fp32(self, x: str) -> str:
        """A float32 tensor in the graph's dtype (a Cast node for a float16 graph only)."""
        if self.dtype == np.float32:
            return x
        return self.g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(self.dtype))

    def rope_tables(self, position_ids: str) -> tuple[str, str]:
        """(cos, signed sin), each [B, S, 1, D], from position_ids [3, B, S] (HF M-RoPE, merged sections).

        Frequency j in [0, D/2) takes its position from axis t, h or w by mrope_section (HF's
        `recomposition_frequencies`); both halves of D repeat the D/2 angles. The sin table carries
        rotate_half's sign (-sin on the first half), so rotation is x*cos + swap_halves(x)*sin.
        Computed in float32 and cast to the graph's dtype (HF's rotary_emb does the same).
        """
        g, half = self.g, self.head_dim // 2
        axis_of_freq = np.repeat(np.arange(len(self.mrope_section)) % 3, self.mrope_section).astype(np.int64)
        pos = g.op("Transpose", g.op("Cast", position_ids, to=1), perm=[1, 2, 0])  # [B, S, 3] float
        angles = g.op("Mul", g.op("Gather", pos, g.const("rope.axis_of_freq", axis_of_freq), axis=2),
                      g.const("rope.inv_freq", self.inv_freq))  # [B, S, D/2]
        angles = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1), g.const("rope.axes", np.array([2])))
        sign = np.concatenate([-np.ones(half), np.ones(half)]).astype(np.float32)
        cos, sin = g.op("Cos", angles), g.op("Mul", g.op("Sin", angles), g.const("rope.sign", sign))
        return self.from_fp32(cos), self.from_fp32(sin)

    def _rotate(self, x: str, heads: int, cos: str, sin: str) -> str:
        """x [B, S, heads*D] -> the same with HF's rotate_half RoPE applied per head."""
        g, d = self.g, self.head_dim
        x4 = g.op("Reshape", x, g.const(f"shape.heads{heads}", np.array([0, 0, heads, d])))  # [B, S, heads, D]
        lo, hi = g.op("Split", x4, axis=-1, num_outputs=2, outputs=2)
        swapped = g.op("Concat", hi, lo, axis=-1)
        rotated = g.op("Add", g.op("Mul", x4, cos), g.op("Mul", swapped, sin))
        return g.op("Reshape", rotated, g.const(f"shape.flat{heads}", np.array([0, 0, heads * d])))

    def layer(self, i: int, hidden: str, cos: str, sin: str) -> str:
        """One decoder layer on hidden [B, S, H]; its GQA writes present_key_i / present_value_i."""
        g, layer = self.g, self.text.layers[i]
        attn, p = layer.self_attn, f"layers.{i}"
        x = self._norm(f"{p}.input_layernorm", hidden, layer.input_layernorm)
        q = self._rotate(self._linear(f"{p}.q_proj", x, attn.q_proj), self.heads, cos, sin)
        k = self._rotate(self._linear(f"{p}.k_proj", x, attn.k_proj), self.kv_heads, cos, sin)
        v = self._linear(f"{p}.v_proj", x, attn.v_proj)
        out = g.op("GroupQueryAttention", q, k, v, f"past_key_{i}", f"past_value_{i}", "seqlens_k",
                   "total_sequence_length", domain="com.microsoft",
                   outputs=[f"{p}.attn", f"present_key_{i}", f"present_value_{i}"],
                   num_heads=self.heads, kv_num_heads=self.kv_heads, scale=self.scale)[0]
        hidden = g.op("Add", hidden, self._linear(f"{p}.o_proj", out, attn.o_proj))
        x = self._norm(f"{p}.post_attention_layernorm", hidden, layer.post_attention_layernorm)
        mlp = layer.mlp
        gate = self._linear(f"{p}.gate_proj", x, mlp.gate_proj)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), self._linear(f"{p}.up_proj", x, mlp.up_proj))
        return g.op("Add", hidden, self._linear(f"{p}.down_proj", act, mlp.down_proj))

    def logits(self, hidden: str, lm_head: str = "fp32") -> None:
        """Row b's hidden state at last_index[b] -> final norm -> lm_head: the spec's head outputs
        (fp32: logits [B, V] float32, computed in the graph's dtype, as HF's lm_head; screened:
        logits_lo, logits_hi [B, V] and hidden [B, H], float32 graphs only)."""
        g, size = self.g, self.text.config.hidden_size
        index = g.op("Unsqueeze", "last_index", g.const("axes.12", np.array([1, 2])))  # [B, 1, 1]
        index = g.op("Expand", index, g.const("shape.1_1_h", np.array([1, 1, size])))  # [B, 1, H]
        last = g.op("GatherElements", hidden, index, axis=1)  # [B, 1, H]
        normed = g.op("Squeeze", self._norm("norm", last, self.text.norm), g.const("axes.1", np.array([1])))  # [B, H]
        if lm_head == "fp32":
            weight = self._weight("lm_head.weight", self.head_weight().T)
            if self.dtype == np.float32:
                g.op("MatMul", normed, weight, outputs=["logits"])
            else:  # float16 logits [B, V] -> the float32 output the host's argmax reads
                g.op("Cast", g.op("MatMul", normed, weight), to=onnx.TensorProto.FLOAT, outputs=["logits"])
            return
        lo, hi = add_screened_head(g, normed, screen_tables(self.head_weight()))
        for name, value in (("logits_lo", lo), ("logits_hi", hi), ("hidden", normed)):
            g.op("Identity", value, outputs=[name])

    def head_weight(self) -> np.ndarray:
        """lm_head weight [V, H] float32 (Qwen2.5-VL's lm_head has no bias)."""
        if self.lm_head.bias is not None:
            raise ValueError("an lm_head with a bias is not a Qwen2.5-VL head")
        return self.lm_head.weight.detach().float().numpy()


def build_graph(model, spec, lm_head: str = "fp32", rows_file: str | None = None):
    """The onnx ModelProto of `model`'s text decoder with `spec`'s IO (weights as initializers).
    rows_file: for a screened head, the .npy beside the graph holding the float32 lm_head.
    The graph's dtype is the spec's KV dtype (float32 or float16)."""
    b = _Builder(model, _kv_dtype(spec))
    cos, sin = b.rope_tables("position_ids")
    hidden = b.from_fp32("inputs_embeds")  # float32 [B, S, H] in -> the graph's dtype
    for i in range(len(b.text.layers)):
        hidden = b.layer(i, hidden, cos, sin)
    b.logits(hidden, lm_head)
    def value(t):
        return helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape))

    graph = helper.make_graph(b.g.nodes, "decoder_gqa", [value(t) for t in spec.inputs],
                              [value(t) for t in spec.outputs], initializer=b.g.inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model_proto = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="finers-rt")
    if rows_file is not None:
        helper.set_model_props(model_proto, {ROWS_KEY: rows_file, FORMAT_KEY: SCREEN_FORMAT})
    return model_proto


def _kv_dtype(spec) -> str:
    """The spec's past_*/present_* dtype: the graph's weight/activation/KV dtype."""
    return next(t.dtype for t in spec.inputs if t.name.startswith("past_"))


def spec_for(model, lm_head: str = "fp32", dtype: str = "float32"):
    """The decoder_gqa GraphSpec of this model's text config (dtype: its KV dtype)."""
    cfg = model.model.language_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return decoder_gqa_spec(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, cfg.hidden_size,
                            cfg.vocab_size, lm_head=lm_head, kv_dtype=dtype)


def save(model_proto, out_path: Path) -> None:
    """One file unless protobuf cannot hold the weights; then `decoder.onnx.data` beside it."""
    external = sum(len(t.raw_data) for t in model_proto.graph.initializer) > PROTOBUF_LIMIT * 0.9
    onnx.save_model(model_proto, str(out_path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=out_path.name + ".data")


def _ort_steps(out_path: Path, spec, feeds, screened: dict | None = None) -> list[np.ndarray]:
    """Run the graph in ONNX Runtime (CPU) on the per-step inputs, the deployed way: one fixed-size
    KV buffer per past/present pair, bound as both (GQA writes it in place). Returns each step's
    logits [1, V]; for a screened head (`screened` = {"weight": lm_head [V, H]}), those of its hidden
    state, after checking that every one lies inside the graph's bounds and that the host's
    screened argmax equals their argmax (the candidate counts go into `screened`)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    capacity = sum(embeds.shape[1] for embeds, _ in feeds)
    kv_names = [t.name for t in spec.inputs if t.name.startswith("past_")]
    _, kv_heads, _, head_dim = spec.inputs[-1].shape
    kv_dtype = np.dtype(_kv_dtype(spec))  # float32, or float16 for the fp16 graph
    cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, capacity, head_dim), kv_dtype))
             for _ in kv_names]
    io, logits, total = session.io_binding(), [], 0
    heads = [t for t in spec.outputs if not t.name.startswith("present_")]
    out = {t.name: np.empty((1, t.shape[1]), np.float32) for t in heads}  # [1, V] or [1, H], bound once
    for name, buf in out.items():
        io.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    for name, value in zip(kv_names, cache):
        io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(name.replace("past_", "present_", 1), value)
    for embeds, positions in feeds:
        seq = embeds.shape[1]
        total += seq
        io.bind_cpu_input("inputs_embeds", embeds)
        io.bind_cpu_input("position_ids", positions)
        io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        io.bind_cpu_input("last_index", np.array([seq - 1], np.int64))
        session.run_with_iobinding(io)
        logits.append(out["logits"].copy() if screened is None else _check_screened(out, screened))
    return logits


def _check_screened(out: dict[str, np.ndarray], screened: dict) -> np.ndarray:
    """One step of a screened head: the float32 logits of its hidden state [1, V], after checking the
    bounds hold for all of them and the screened argmax is theirs."""
    weight = screened["weight"]
    full = out["hidden"] @ weight.T  # [1, V]: what the host would compute for every row
    outside = int(((full < out["logits_lo"]) | (full > out["logits_hi"])).sum())
    if outside:
        raise RuntimeError(f"screened lm_head: {outside} logits outside the graph's bounds")
    ids, widest = screened_argmax(out["logits_lo"], out["logits_hi"], out["hidden"], weight)
    if ids[0] != full.argmax():
        raise RuntimeError(f"screened lm_head: argmax {ids[0]} != {full.argmax()} of the float32 logits")
    screened["candidates"] = [*screened.get("candidates", []), widest]
    return full


def export_decoder_gqa(checkpoint: Path, out_path: Path, *, opset: int = 18, lm_head: str = "fp32",
                       dtype: str = "float32") -> dict:
    """Export `checkpoint`'s text decoder as the GQA graph to `out_path` (+ embed_tokens.npy), verified.

    lm_head: "fp32" (logits out) or "screened" (bounds + hidden out, `lm_head_screen`; an untied
    lm_head is saved as lm_head.npy beside the graph for the host's rescoring; float32 only).
    dtype: "float32" or "float16" (weights, activations and KV IO; the GPU graph, module docstring),
    verified against HF in float32 either way, at the spec's tolerance for that dtype. Returns the
    verification report (max_abs_diff, mismatch_pct, argmax_equal, ...); raises RuntimeError when
    the graph's logits differ from HF's by more than the spec's atol (screened: the logits of its
    hidden state, which must also lie inside its bounds at every step).
    """
    if opset != 18:
        raise ValueError(f"the GQA decoder is written for opset 18 (Split num_outputs), got {opset}")
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint)
    spec = spec_for(model, lm_head, dtype)
    save_embed_table(model, out_path.parent)
    rows_file, screened = None, None
    if lm_head == "screened":
        weight = _Builder(model).head_weight()
        embed = model.model.language_model.embed_tokens.weight.detach().float().numpy()
        rows_file = "embed_tokens.npy" if np.array_equal(weight, embed) else "lm_head.npy"  # tied: one table
        if rows_file == "lm_head.npy":
            np.save(out_path.parent / rows_file, weight)
        screened = {"weight": weight}
    t0 = time.perf_counter()
    save(build_graph(model, spec, lm_head, rows_file), out_path)
    export_s = time.perf_counter() - t0
    report = verify_decoder(model, out_path, spec, ort_steps=functools.partial(_ort_steps, screened=screened))
    report.update(exporter="onnx.helper", attention="GroupQueryAttention", opset=opset, export_s=round(export_s, 1),
                  lm_head=lm_head, dtype=dtype)
    if screened is not None:
        report["screened_candidates_max"] = max(screened["candidates"])
    return check_report(out_path, spec, report)
