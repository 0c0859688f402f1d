"""CUDA-graph decode for the GQA decoder: fixed device buffers refilled in place, one captured graph
per batch-size bucket (numpy + ONNX Runtime only).

Drives the float16 `decoder.onnx` of `finers_rt.export.onnx_decoder_gqa.export_decoder_gqa(dtype="float16")`
(`finers-rt export --precision fp16 --decoder-attention gqa`; IO `finers_rt.specs.decoder_gqa_spec`).
`FixedGqaSteps` is `ort_decode_gqa.GqaSteps` with every decode-step input and output an OrtValue on
the session's device ('cuda', or 'cpu' where nothing is captured), allocated once per (rows,
KV allocation), bound once and refilled with `OrtValue.update_inplace` each step.

ONNX Runtime facts relied on (ORT pinned 1.31.1). Sources: onnxruntime-genai at commit
a0c04eb1313b886c963e415bbd974748cb89a4eb (git); the installed onnxruntime 1.31.1 Python package;
ONNX Runtime C++ files through a code index whose stored versions are not pinned to the v1.31.1
tag (the repository was too large to fetch), so the C++ details below are "recent sources":
- CUDA EP provider option "enable_cuda_graph" = "1" turns capture on for the whole session
  (onnxruntime/core/providers/cuda/cuda_execution_provider_info.cc; genai src/config.cpp
  `IsGraphCaptureEnabled` checks exactly enable_cuda_graph == "1").
- RunOptions config "gpu_graph_id" picks the graph: each id >= 1 is captured once and replayed
  after; "-1" runs without capture or replay (prefill here); 0 is reserved by ORT
  (include/onnxruntime/core/session/onnxruntime_run_options_config_keys.h
  `kOrtRunOptionsConfigCudaGraphAnnotation`; the installed 1.31.1
  onnxruntime/capi/onnxruntime_inference_collection.py `_GRAPH_ANNOTATION_SKIP = -1`). genai
  does the same: one random id per captured length, "-1" for runs not captured
  (src/models/model.cpp `State::Run`, `GraphIdForLength`).
- A graph is captured after the EP's warm-up runs of that id (`min_num_runs_before_cuda_graph_capture_`
  regular runs, so the arena allocates before capture: 1 in older cuda_execution_provider.h, 2 in
  recent tests, "captures the graph on Run 3"), per calling thread (PerThreadContext). Every run
  returns correct outputs (a capture run is replayed at once), so nothing here counts runs.
- Replay re-issues the kernels with the addresses and host-side values seen at capture: every
  input and output must be an OrtValue bound through IOBinding whose address never changes
  (`bind_ortvalue_input/output`, `OrtValue.ortvalue_from_shape_and_type(shape, dtype, 'cuda', 0)`,
  refilled with `update_inplace`); the KV cache stays bound in place (genai refuses capture
  without past/present buffer sharing: src/models/kv_cache.cpp).
- Node placement: the session refuses capture unless every compute node is on the CUDA EP (CPU
  nodes only for shape computation, no Memcpy nodes): InferenceSession::Initialize, policy
  ALLOW_CPU_FOR_SHAPES for CUDA. A float32 GQA graph fails this (its attention has no CUDA kernel:
  `ort_decode_gqa.check_gqa_device`).
- GroupQueryAttention (contrib_ops/cuda/bert/group_query_attention.cc): input 6
  total_sequence_length is `InputMemoryType(OrtMemTypeCPUInput, 6)`, read on the host when the
  kernel launches, so a replay keeps the captured value; seqlens_k (input 5) is a device input
  read by the kernels (genai refills it on the device between replays), so refilling it in place
  works. genai therefore holds total_sequence_length
  at the static maximum: under capture its attention mask is a static [batch, max_length] buffer
  (src/models/position_inputs.cpp `InitializeStaticMask`) and the builder computes
  total_seq_len = Shape(attention_mask)[1] (src/python/py/models/builders/base.py, "attn_mask_reformat").
  Here it is the KV capacity: the op's present length is max(total_sequence_length, capacity) = capacity,
  and a decode step (S = 1 != total) attends slots [0, seqlens_k[b]] per row, so a larger total
  changes nothing (checked on the CPU: tests/test_cuda_graph_decode.py).
- Python 1.31.1 has `InferenceSession.release_captured_graph(id)`: graphs of a freed KV
  allocation are released when new buffers replace them.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort

from .lm_head import SCREENED_OUTPUTS, ScreenedScores
from .ort_decode_gqa import GqaSteps

CUDA_EP = "CUDAExecutionProvider"
GRAPH_OPTION = "enable_cuda_graph"  # CUDA EP provider option
GRAPH_ID_KEY = "gpu_graph_id"  # RunOptions config entry
SKIP_GRAPH = "-1"  # run without capture or replay
STEP_INPUTS = ("inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length", "last_index")


def graph_providers(providers: list) -> list:
    """`providers` with enable_cuda_graph=1 added to the CUDA EP entry (names or (name, options))."""
    names = [p if isinstance(p, str) else p[0] for p in providers]
    if CUDA_EP not in names:
        raise ValueError(f"CUDA graphs need {CUDA_EP} in the providers, got {names}")
    return [(CUDA_EP, {**({} if isinstance(p, str) else p[1]), GRAPH_OPTION: "1"}) if n == CUDA_EP else p
            for p, n in zip(providers, names)]


def graph_enabled(session: ort.InferenceSession) -> bool:
    """True when `session` was opened with the CUDA EP's enable_cuda_graph option on."""
    return session.get_provider_options().get(CUDA_EP, {}).get(GRAPH_OPTION) in ("1", "True", "true")


def run_options(graph_id: int | None) -> ort.RunOptions:
    """RunOptions selecting captured graph `graph_id` (>= 1), or none (None: "-1", no capture)."""
    if graph_id is not None and graph_id < 1:
        raise ValueError(f"gpu_graph_id must be >= 1 (0 is ORT's, -1 skips), got {graph_id}")
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID_KEY, SKIP_GRAPH if graph_id is None else str(graph_id))
    return options


def check_graph_decoder(gqa: bool, kv_dtype, device: str, path) -> None:
    """Refuse CUDA graphs for a decoder they cannot run: only the float16 GQA graph on CUDA has a
    fixed-shape decode step with every node on the CUDA EP."""
    hint = "export the folder with `finers-rt export --precision fp16 --decoder-attention gqa`, or load with cuda_graphs=False"
    if device != "cuda":
        raise ValueError(f"{path}: CUDA graphs were requested on device {device!r}; they need device='cuda' (or load with cuda_graphs=False)")
    if not gqa:
        raise ValueError(f"{path}: CUDA graphs need the GQA decoder (fixed-size in-place KV cache); this is the standard one: {hint}")
    if np.dtype(kv_dtype) != np.float16:
        raise ValueError(f"{path}: CUDA graphs need the float16 GQA decoder (ORT's CUDA GroupQueryAttention is float16 only), got {np.dtype(kv_dtype)}: {hint}")


class StepBuffers:
    """The decode step's OrtValues for `rows` rows on `device`, allocated once: embeds [rows, 1, H]
    float32, position_ids [3, rows, 1] int64, seqlens_k [rows] int32, last_index [rows] int64 (all
    zeros: one new token per row), total_sequence_length [] int32 on the host (a CPU input of the
    CUDA kernel) fixed at the KV capacity; outputs: logits [rows, V] float32 or a screened head's
    lo/hi [rows, V], hidden [rows, H] float32. `graph_id`: the captured graph that reads them."""

    _ids = itertools.count(1)

    def __init__(self, decoder, rows: int, capacity: int, device: str):
        hidden = decoder.table.shape[1]
        self.rows, self.capacity, self.kv = rows, capacity, None  # kv: the KV OrtValues these pair with
        self.graph_id = next(StepBuffers._ids)
        new = lambda shape, dtype, dev=device: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, dev, 0)
        self.inputs = {"inputs_embeds": new([rows, 1, hidden], np.float32), "position_ids": new([3, rows, 1], np.int64),
                       "seqlens_k": new([rows], np.int32), "total_sequence_length": new([], np.int32, "cpu"),
                       "last_index": new([rows], np.int64)}
        self.inputs["last_index"].update_inplace(np.zeros(rows, np.int64))
        self.inputs["total_sequence_length"].update_inplace(np.array(capacity, np.int32))
        names = ("logits",) if decoder.lm_head_rows is None else SCREENED_OUTPUTS
        widths = {"logits": decoder.vocab, "logits_lo": decoder.vocab, "logits_hi": decoder.vocab, "hidden": hidden}
        self.outputs = {n: new([rows, widths[n]], np.float32) for n in names}
        # host staging of the refilled inputs: written by numpy, copied in by update_inplace
        self.embed = np.empty((rows, 1, hidden), np.float32)
        self.pos = np.empty((3, rows, 1), np.int64)
        self.seqlens = np.empty(rows, np.int32)


class _HostHead:
    """A screened head's outputs read back to the host, as `lm_head.ScreenedHead` holds them."""

    def __init__(self, lo, hi, hidden, weight):
        self.lo, self.hi, self.hidden, self.weight = lo, hi, hidden, weight


class FixedGqaSteps(GqaSteps):
    """`GqaSteps` whose decode step reads and writes only `StepBuffers` OrtValues on the decoder's
    device, bound once; with `decoder.cuda_graph` each step runs captured graph
    `buffers.graph_id` (one per rows bucket and KV allocation), the prefill runs uncaptured."""

    def __init__(self, decoder, rows: int, capacity: int):
        self.decoder, self.session, self.table = decoder, decoder.session, decoder.table
        self.kv = decoder.kv_cache.get(rows, capacity)
        self.buffers = _buffers(decoder, rows, self.kv)
        self.io = io = decoder.session.io_binding()
        for past, present, value in zip(decoder.past_names, decoder.present_names, self.kv):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)  # the same buffer: GQA writes it in place
        for name, value in self.buffers.outputs.items():
            io.bind_ortvalue_output(name, value)
        self.lengths = np.zeros(rows, np.int32)
        self.offsets = np.zeros(rows, np.int64)  # M-RoPE position of cache slot c in row r: c + offsets[r]
        graph = decoder.cuda_graph
        self.prefill_options = run_options(None) if graph else None
        self.step_options = run_options(self.buffers.graph_id) if graph else None

    def prefill(self, embeds, position_ids, lengths, rope_deltas):
        """As `GqaSteps.prefill` (host inputs, uncaptured: its shapes change per prompt); then binds
        the step buffers."""
        self.lengths[:], self.offsets[:] = lengths, rope_deltas
        io = self.io
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        io.bind_cpu_input("seqlens_k", self.lengths - 1)
        io.bind_cpu_input("total_sequence_length", np.array(embeds.shape[1], np.int32))  # == S: the first prompt
        io.bind_cpu_input("last_index", self.lengths.astype(np.int64) - 1)
        self.session.run_with_iobinding(io, self.prefill_options)
        for name in STEP_INPUTS:
            io.bind_ortvalue_input(name, self.buffers.inputs[name])  # fixed addresses from here on
        return self.scores()

    def step(self, ids, t: int):
        """Decode step t >= 1 (as `GqaSteps.step`): refill the bound buffers in place, run."""
        b = self.buffers
        np.take(self.table, ids, axis=0, out=b.embed[:, 0])
        np.add(self.lengths, t - 1, out=b.seqlens)
        np.add(b.seqlens, self.offsets, out=b.pos[0, :, 0])
        b.pos[1:] = b.pos[0]  # text tokens: the same position on the t, h and w axes
        for name, host in (("inputs_embeds", b.embed), ("position_ids", b.pos), ("seqlens_k", b.seqlens)):
            b.inputs[name].update_inplace(host)
        self.session.run_with_iobinding(self.io, self.step_options)
        return self.scores()

    def scores(self):
        """logits [rows, V] float32 (a view of the CPU buffer, a copy from the GPU; read it before
        the next step) or a screened head's `ScreenedScores`."""
        out = self.buffers.outputs
        if "logits" in out:
            return out["logits"].numpy()
        lo, hi, hidden = (out[n].numpy() for n in SCREENED_OUTPUTS)
        return ScreenedScores(_HostHead(lo, hi, hidden, self.decoder.lm_head_rows), slice(None))


def _buffers(decoder, rows: int, kv: list[ort.OrtValue]) -> StepBuffers:
    """The decoder's `StepBuffers` paired with the KV allocation `kv` ([rows, KV, capacity, D]):
    kept between generates (a captured graph reads them); replaced, their graph released, only
    when `KVCache.get` reallocated the cache (another row count or more capacity)."""
    old = decoder.step_buffers
    if old is not None and old.kv is kv:
        return old
    if old is not None and decoder.cuda_graph:
        decoder.session.release_captured_graph(old.graph_id)
    decoder.step_buffers = new = StepBuffers(decoder, rows, decoder.kv_cache.capacity, decoder.device)
    new.kv = kv
    return new
