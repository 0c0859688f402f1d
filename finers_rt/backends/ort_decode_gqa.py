"""Stepping the GQA decoder graph with fixed buffers bound once (numpy + ONNX Runtime only).

Reads the `decoder.onnx` written by `finers_rt.export.onnx_decoder_gqa.export_decoder_gqa` (IO:
`finers_rt.specs.decoder_gqa_spec`); `OrtDecoder` and `ort_batch.greedy_batch` drive it.

The KV cache is one OrtValue per past/present pair, [rows, KV, capacity, D], bound as BOTH the
past_* input and the present_* output: GroupQueryAttention sees the same buffer and writes only the
new slots, in place. Row r keeps its tokens contiguous from slot 0 (prompts are RIGHT-padded): its
prompt fills slots [0, lengths[r]) and decode step t (1, 2, ...) writes slot lengths[r] + t - 1.
Every decode-step input (embeds [rows, 1, H], position_ids [3, rows, 1], seqlens_k [rows],
total_sequence_length [], last_index [rows]) and the outputs (logits [rows, V], or a screened head's
bounds, `lm_head`) are numpy buffers bound once
and rewritten in place, so a step allocates nothing and every address is fixed for a batch size
(what a captured CUDA graph needs); only a screened head's host rescoring makes small arrays of its
few candidate rows.

The cache dtype is the graph's past_* input type (`kv_dtype`): float32, or float16 for the fp16
export (`export_decoder_gqa(dtype="float16")`), whose KV IO is float16 so the cache binds straight
to the op. ONNX Runtime's CUDA GroupQueryAttention kernel is float16/bfloat16 only: a float32 graph
is CPU only (`check_gqa_device`), the float16 one is the GPU graph (it also runs on the CPU: ORT
1.31.1 has float16 CPU kernels for all its ops, which is how its export verifies and tests run).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .lm_head import make_head

KV_BLOCK = 256  # capacity is rounded up to this many slots so one buffer serves similar prompts
# ORT's type string of a past_* input -> the KV cache's numpy dtype
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def kv_dtype(session: ort.InferenceSession, past_name: str) -> np.dtype:
    """The numpy dtype of the GQA graph's KV cache: its `past_name` input's element type."""
    ort_type = next(i.type for i in session.get_inputs() if i.name == past_name)
    if ort_type not in KV_DTYPES:
        raise ValueError(f"{past_name} is {ort_type}: the GQA runtime reads float32 or float16 KV caches")
    return np.dtype(KV_DTYPES[ort_type])


def check_gqa_device(dtype: np.dtype, device: str, path) -> None:
    """Refuse a GQA graph whose attention would not run on `device` ("cpu" or "cuda"): ORT's CUDA
    GroupQueryAttention is float16/bfloat16 only, so a float32 graph on CUDA silently runs the op
    on the CPU with Memcpy nodes around it (measured 2.3x slower on an H100)."""
    if device != "cpu" and np.dtype(dtype) == np.float32:
        raise ValueError(f"{path}: a float32 GQA decoder cannot run on {device}: ONNX Runtime's CUDA "
                         "GroupQueryAttention is float16/bfloat16 only, so its attention would run on the CPU "
                         "(measured 2.3x slower on an H100); for GPUs export the folder with `finers-rt export "
                         "--device cuda` (standard decoder) or `--precision fp16 --decoder-attention gqa` (float16 "
                         "GQA, unverified on a GPU)")


class KVCache:
    """The KV OrtValues of one decoder, kept between generates and reallocated only when a batch
    has another row count or needs more slots (a 7B GSE batch-1 cache is ~0.5 GB)."""

    def __init__(self, names: list[str], kv_heads: int, head_dim: int, device: str, dtype=np.float32):
        self.names, self.kv_heads, self.head_dim, self.device = names, kv_heads, head_dim, device
        self.dtype = np.dtype(dtype)  # the graph's past_* type (`kv_dtype`): float32 or float16
        self.values: list[ort.OrtValue] = []
        self.rows = self.capacity = 0

    def get(self, rows: int, capacity: int) -> list[ort.OrtValue]:
        """[rows, KV, >= capacity, D] of `dtype` per name (contents undefined: the prompt overwrites)."""
        if rows != self.rows or capacity > self.capacity:
            self.values = []  # free the old buffers before allocating the new ones
            self.rows, self.capacity = rows, -(-capacity // KV_BLOCK) * KV_BLOCK
            shape = [rows, self.kv_heads, self.capacity, self.head_dim]
            self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
                           for _ in self.names]
        return self.values


class GqaSteps:
    """Prefill + one-token steps of `rows` right-padded rows on the GQA graph of `decoder` (an
    `OrtDecoder` whose `gqa` is True). capacity: KV slots every row may reach (prompt + new tokens).
    The cache is the decoder's `KVCache` (its graph's KV dtype); host-side buffers stay float32 /
    int: a float16 graph casts inputs_embeds in and its logits out itself."""

    def __init__(self, decoder, rows: int, capacity: int):
        self.session, self.table = decoder.session, decoder.table
        self.io = io = decoder.session.io_binding()
        self.head = make_head(decoder, io, rows)  # logits, or a screened head's bounds (`lm_head`)
        self.logits = getattr(self.head, "logits", None)
        self.kv = decoder.kv_cache.get(rows, capacity)
        for past, present, value in zip(decoder.past_names, decoder.present_names, self.kv):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)  # the same buffer: GQA writes it in place
        self.embed = np.empty((rows, 1, decoder.table.shape[1]), np.float32)  # step inputs, bound after prefill
        self.pos = np.empty((3, rows, 1), np.int64)
        self.seqlens = np.empty(rows, np.int32)  # cache slot of the token fed now
        self.total = np.empty((), np.int32)
        self.last = np.zeros(rows, np.int64)  # one new token per row: its logits are at index 0
        self.lengths = np.zeros(rows, np.int32)
        self.offsets = np.zeros(rows, np.int64)  # M-RoPE position of cache slot c in row r: c + offsets[r]

    def prefill(self, embeds: np.ndarray, position_ids: np.ndarray, lengths: np.ndarray,
                rope_deltas: np.ndarray) -> np.ndarray:
        """Right-padded prompts: embeds [rows, S, H] float32, position_ids [3, rows, S] int64, lengths
        (rows,) real tokens per row, rope_deltas (rows,). Returns the scores at each row's last token:
        logits [rows, V] (the bound buffer: read it before the next step) or `ScreenedScores`."""
        seq = embeds.shape[1]
        self.lengths[:], self.offsets[:] = lengths, rope_deltas
        io = self.io
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        io.bind_cpu_input("seqlens_k", self.lengths - 1)
        io.bind_cpu_input("total_sequence_length", np.array(seq, np.int32))  # == S: the first prompt
        io.bind_cpu_input("last_index", self.lengths.astype(np.int64) - 1)
        self.session.run_with_iobinding(io)
        for name, buf in (("inputs_embeds", self.embed), ("position_ids", self.pos), ("seqlens_k", self.seqlens),
                          ("total_sequence_length", self.total), ("last_index", self.last)):
            io.bind_cpu_input(name, buf)  # ORT reads these numpy buffers on every later run
        return self.head.scores

    def step(self, ids, t: int) -> np.ndarray:
        """Decode step t >= 1: row r feeds token ids[r] at cache slot lengths[r] + t - 1. Returns
        the scores, as `prefill`."""
        np.take(self.table, ids, axis=0, out=self.embed[:, 0])
        np.add(self.lengths, t - 1, out=self.seqlens)
        np.add(self.seqlens, self.offsets, out=self.pos[0, :, 0])
        self.pos[1:] = self.pos[0]  # text tokens: the same position on the t, h and w axes
        self.total[...] = self.seqlens.max() + 1
        self.session.run_with_iobinding(self.io)
        return self.head.scores
