"""Greedy decoding over the exported decoder graph with ONNX Runtime IO binding (numpy + ORT only).

Reads `decoder.onnx` + `embed_tokens.npy`, written by `finers_rt.export.onnx_decoder.export_decoder`
(IO: `finers_rt.specs.decoder_spec`) or by `finers_rt.export.onnx_decoder_gqa.export_decoder_gqa`
(IO: `finers_rt.specs.decoder_gqa_spec`); the graph kind is told by its inputs (`seqlens_k`).

Standard graph: the loop keeps the KV cache inside ONNX Runtime: the `present_*` OrtValues of step
t are bound as the `past_*` inputs of step t+1 (never copied through numpy; on a GPU provider they
stay on the device). Per decode step the host writes one embedding row and one position into
preallocated buffers, re-binds the attention mask (a growing view of one preallocated row of ones)
and reads the sampled id from a preallocated logits buffer.

GQA graph: a fixed-size KV cache written in place and every step buffer bound once
(`ort_decode_gqa.GqaSteps`): no binding and no allocation per decode step. Its KV dtype is the
graph's (float32, or float16 for the GPU export); a float32 one is refused on CUDA. A session
opened with the CUDA EP's enable_cuda_graph option (`ort.CudaGraphEP`) decodes from captured CUDA
graphs with device OrtValues refilled in place (`ort_cuda_graph.FixedGqaSteps`); `fixed_steps=True`
runs that same path without capture (device 'cpu' OrtValues on the CPU).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..config import ENDOFTEXT_ID, IM_END_ID
from ..qwen_rope import decode_position_ids
from .lm_head import is_screened, lm_head_rows
from .ort_cuda_graph import FixedGqaSteps, check_graph_decoder, graph_enabled
from .ort_decode_gqa import GqaSteps, KVCache, check_gqa_device, kv_dtype
from .ort_session import open_session

STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)
# Providers whose outputs should stay on the GPU between steps (the KV cache).
_DEVICE_OF = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


class OrtDecoder:
    """Prefill + one-token greedy steps on the decoder graph. Batch 1; numpy in, token ids out."""

    def __init__(self, onnx_path: str | Path, embed_path: str | Path, *, providers: list[str] | None = None,
                 fixed_steps: bool = False):
        """fixed_steps: GQA decode steps on `FixedGqaSteps` device OrtValues without capture (always
        on for a session with CUDA graphs enabled, which only the float16 GQA graph may have)."""
        self.session = open_session(onnx_path, providers)
        self.device = _DEVICE_OF.get(self.session.get_providers()[0], "cpu")
        # [V, H] float32; memory-mapped: the 7B table is 2.2 GB and a prompt touches ~100 rows.
        self.table = np.load(embed_path, mmap_mode="r")
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_")]
        self.present_names = [n.replace("past_", "present_", 1) for n in self.past_names]
        _, self.kv_heads, _, self.head_dim = inputs[self.past_names[0]].shape  # [B, KV, P or capacity, D]
        self.vocab = self.session.get_outputs()[0].shape[1]  # logits [B, V]
        self.gqa = "seqlens_k" in inputs  # GroupQueryAttention graph: fixed-size in-place KV cache
        # float32 lm_head [V, H] a screened graph rescores its candidates from (None: exact logits out)
        self.lm_head_rows = lm_head_rows(self.session, onnx_path, self.table) if is_screened(self.session) else None
        self.kv_cache = None
        if self.gqa:  # KV OrtValues of the graph's past_* dtype (float32 or float16), kept between generates
            dtype = kv_dtype(self.session, self.past_names[0])
            check_gqa_device(dtype, self.device, onnx_path)
            self.kv_cache = KVCache(self.past_names, self.kv_heads, self.head_dim, self.device, dtype)
        self.cuda_graph = graph_enabled(self.session)  # decode steps replay captured CUDA graphs
        if self.cuda_graph:
            check_graph_decoder(self.gqa, dtype if self.gqa else np.float32, self.device, onnx_path)
        self.fixed_steps = self.cuda_graph or fixed_steps
        if self.fixed_steps and not self.gqa:
            raise ValueError(f"{onnx_path}: fixed_steps needs the GQA decoder (export --decoder-attention gqa)")
        self.step_buffers = None  # `ort_cuda_graph.StepBuffers` of the last GQA generate, kept for its graph

    def gqa_steps(self, rows: int, capacity: int) -> GqaSteps:
        """Prefill + step driver for `rows` rows and `capacity` KV slots on the GQA graph."""
        return (FixedGqaSteps if self.fixed_steps else GqaSteps)(self, rows, capacity)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(S,) token ids -> (S, H) float32 embeddings (a writable copy: image rows go in after)."""
        return np.array(self.table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def _empty_past(self) -> list[ort.OrtValue]:
        """[1, KV, 0, D] past tensors for the prefill, on the session's device."""
        shape = [1, self.kv_heads, 0, self.head_dim]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0) for _ in self.past_names]

    def _run(self, io: ort.IOBinding, past: list[ort.OrtValue], logits: np.ndarray) -> list[ort.OrtValue]:
        """One graph run: bind `past` as inputs, logits into its buffer; returns the presents."""
        for name, value in zip(self.past_names, past):
            io.bind_ortvalue_input(name, value)
        io.clear_binding_outputs()  # else last step's presents (one shorter) count as preallocated
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for name in self.present_names:
            io.bind_output(name, self.device)  # ORT allocates [1, KV, P+S, D] on the device
        self.session.run_with_iobinding(io)
        return io.get_outputs()[1:]

    def greedy(
        self,
        inputs_embeds: np.ndarray,
        position_ids: np.ndarray,
        rope_delta: int,
        *,
        max_new_tokens: int,
        stop_ids=STOP_IDS,
        forced_ids: list[int] | None = None,
    ) -> tuple[list[int], dict[str, float]]:
        """Greedy generation after a prompt; returns (new token ids, {"prefill": ms, "decode": ms}).

        inputs_embeds: (S, H) float32 prompt embeddings (image features merged); position_ids:
        [3, 1, S] int64 from `qwen_rope.rope_index`, which also gives rope_delta. The emitted stop
        id is included, like HF generate. forced_ids: the model still runs every step, but the
        emitted tokens are forced_ids then <|im_end|> (teacher forcing for scripted outputs).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.gqa:
            return self._greedy_gqa(inputs_embeds, position_ids, rope_delta, max_new_tokens, set(stop_ids), forced_ids)
        seq = inputs_embeds.shape[0]
        io = self.session.io_binding()
        logits = np.empty((1, self.vocab), np.float32)  # bound output buffer, reused every step
        mask = np.ones((1, seq + max_new_tokens), np.int64)  # step t binds its first seq+t+1 columns
        stop_ids = set(stop_ids)

        t0 = time.perf_counter()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, np.float32)[None])
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        io.bind_cpu_input("attention_mask", mask[:, :seq])
        past = self._run(io, self._empty_past(), logits)
        ids = [self._pick(logits, forced_ids, 0)]
        t1 = time.perf_counter()

        step_embed = np.empty((1, 1, inputs_embeds.shape[1]), np.float32)  # written in place per step
        step_pos = decode_position_ids(seq, rope_delta)  # [3, 1, 1], written in place per step
        io.bind_cpu_input("inputs_embeds", step_embed)  # bound once: ORT reads the numpy buffer
        io.bind_cpu_input("position_ids", step_pos)
        while ids[-1] not in stop_ids and len(ids) < max_new_tokens:
            cache_pos = seq + len(ids) - 1  # index of the token fed now in the KV cache
            np.copyto(step_embed[0, 0], self.table[ids[-1]])
            step_pos.fill(cache_pos + rope_delta)
            io.bind_input("attention_mask", "cpu", 0, np.int64, [1, cache_pos + 1], mask.ctypes.data)
            past = self._run(io, past, logits)
            ids.append(self._pick(logits, forced_ids, len(ids)))
        t2 = time.perf_counter()
        return ids, {"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3}

    def _greedy_gqa(self, inputs_embeds, position_ids, rope_delta, max_new_tokens, stop_ids, forced_ids):
        """`greedy` on the GQA graph: KV capacity = prompt + max_new_tokens, buffers bound once."""
        seq = inputs_embeds.shape[0]
        steps = self.gqa_steps(1, seq + max_new_tokens)
        t0 = time.perf_counter()
        logits = steps.prefill(inputs_embeds[None], position_ids, np.array([seq]), np.array([rope_delta]))
        ids = [self._pick(logits, forced_ids, 0)]
        t1 = time.perf_counter()
        while ids[-1] not in stop_ids and len(ids) < max_new_tokens:
            logits = steps.step(ids[-1:], len(ids))  # the last id, at cache slot seq + len(ids) - 1
            ids.append(self._pick(logits, forced_ids, len(ids)))
        t2 = time.perf_counter()
        return ids, {"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3}

    @staticmethod
    def _pick(logits: np.ndarray, forced_ids: list[int] | None, step: int) -> int:
        """Greedy id from logits [1, V] (or a screened head's `ScreenedScores` row), or the script's
        token at `step` in forced mode (the greedy id is still computed: a forced run times the
        work a real one does, the screened head's rescoring included)."""
        greedy = int(logits.argmax())
        if forced_ids is None:
            return greedy
        return int(forced_ids[step]) if step < len(forced_ids) else IM_END_ID

    def close(self) -> None:
        self.session = None
