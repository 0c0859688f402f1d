"""Batched greedy decoding over the exported decoder graph: B prompts of different lengths at once.

Runs the same `decoder.onnx` as `OrtDecoder.greedy`: the standard graph (written by
`finers_rt.export.onnx_decoder.export_decoder`, IO `finers_rt.specs.decoder_spec`) takes any batch
and a 0/1 attention mask; the GQA graph (`finers_rt.export.onnx_decoder_gqa.export_decoder_gqa`, IO
`finers_rt.specs.decoder_gqa_spec`) takes per-row lengths instead (see "GQA graph" below).

Layout (standard graph). Prompts are LEFT-padded to the longest one, L tokens: row r holds pad[r] padding slots, then
its S_r prompt tokens, so every row's last prompt token sits at cache index L-1 and the graph's
last-position logits are every row's next-token logits. Padding slots get zero embeddings, mask 0
and position 1 (any valid id: masked keys never reach a real row's softmax). Real rows see exactly
the keys and M-RoPE positions of a batch-1 run; logits differ from batch 1 only by fp32
reassociation (measured <= 2e-7 on the tiny checkpoints, argmax identical).

Decode. One token per row per step. The token at cache index c of row r has position
c - pad[r] + rope_delta[r] on all three M-RoPE axes (batch 1: c + rope_delta). A row that has
emitted a stop id (or max_new_tokens) is finished: its output is frozen and, by default
(`shrink=True`), it is dropped from the batch with its KV rows. Chosen by measurement (tiny
engines, CPU, 4 rows forced to stop after 8/30/60/200 tokens, process CPU time, median of 5-7):
    prompt 376 tokens (LPR):   keep stepping 1.55 s, drop 1.41 s, 4 single runs 1.91 s
    prompt 2,743 tokens (GSE): keep stepping 2.47 s, drop 2.10 s, 4 single runs 2.82 s
A drop copies the KV cache through host memory once (ORT's Python API cannot slice a device
tensor); each graph step already copies the whole cache (concat), so this is one extra step's
worth per finished row. `shrink=False` keeps finished rows stepping (fed the pad id) instead.

Buckets. With `buckets=(1, 2, 4, 8)` the batch is filled with dummy rows (all padding, finished
from the start) up to the next bucket size, so a GPU run sees only those batch sizes (one captured
CUDA graph per bucket); shrinking then goes down bucket by bucket (8 -> 4 -> 2 -> 1), finished rows
filling a bucket. Off by default: on the CPU a dummy row is pure waste.

GQA graph. Prompts are RIGHT-padded to the longest, L tokens: row r holds its S_r tokens at cache
slots [0, S_r), then padding (zero embeddings, position PAD_POSITION) that GroupQueryAttention never
lets a real query see (seqlens_k[r] = S_r - 1, causal). Decode step t writes row r's token at slot
S_r + t - 1 (over the padding), position S_r + t - 1 + rope_delta[r]: every row steps at its own
length, exactly as its batch-1 run. The KV cache is fixed-size ([rows, KV, L + max_new_tokens, D])
and written in place (`ort_decode_gqa.GqaSteps`), so the batch keeps its shape to the end: finished
rows keep stepping (fed the pad id, their output frozen) and `shrink` does not apply; dropping rows
would mean copying the cache into a smaller buffer, which is the per-step cost this graph avoids.
Bucket dummy rows are one padding slot long.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..config import ENDOFTEXT_ID
from .ort_decode import STOP_IDS, OrtDecoder

BUCKETS = (1, 2, 4, 8)  # the decoder spec's TensorRT profile allows batch 1..8
PAD_POSITION = 1  # M-RoPE id of a padding slot; masked, so any valid id does


@dataclass
class Prompt:
    """One prompt as `OrtDecoder.greedy` takes it (embeds (S, H) float32, positions [3, 1, S])."""

    embeds: np.ndarray
    position_ids: np.ndarray
    rope_delta: int
    forced_ids: list[int] | None = None  # teacher forcing for this row, then <|im_end|>


@dataclass
class LeftPadded:
    """Prefill inputs of a left-padded batch of `rows` rows (real prompts first, then dummies).

    embeds [rows, L, H] float32; position_ids [3, rows, L] int64; mask [rows, L + max_new_tokens]
    int64 (prefill columns 0 on padding, decode columns all 1); offsets (rows,) int64: the
    decode position of cache index c in row r is c + offsets[r] (= rope_delta[r] - pad[r]).
    """

    embeds: np.ndarray
    position_ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


def bucket_rows(n: int, buckets: tuple[int, ...] | None) -> int:
    """Rows to run for n prompts: n itself, or the smallest bucket that holds n."""
    if n < 1:
        raise ValueError("a batch needs at least one prompt")
    if not buckets:
        return n
    fitting = [b for b in sorted(buckets) if b >= n]
    if not fitting:
        raise ValueError(f"{n} prompts exceed the largest batch bucket {max(buckets)}; split the batch")
    return fitting[0]


def left_pad(prompts: list[Prompt], rows: int, max_new_tokens: int) -> LeftPadded:
    """Stack `prompts` left-padded to the longest; rows beyond len(prompts) are all padding."""
    length = max(p.embeds.shape[0] for p in prompts)
    hidden = prompts[0].embeds.shape[1]
    embeds = np.zeros((rows, length, hidden), np.float32)
    positions = np.full((3, rows, length), PAD_POSITION, np.int64)
    mask = np.ones((rows, length + max_new_tokens), np.int64)
    offsets = np.zeros(rows, np.int64)
    mask[len(prompts):, :length] = 0  # dummy rows: nothing real to attend to in the prompt
    for r, p in enumerate(prompts):
        pad = length - p.embeds.shape[0]
        embeds[r, pad:] = p.embeds
        positions[:, r, pad:] = p.position_ids[:, 0]
        mask[r, :pad] = 0
        offsets[r] = p.rope_delta - pad
    return LeftPadded(embeds, positions, mask, offsets)


@dataclass
class RightPadded:
    """Prefill inputs of a right-padded batch for the GQA graph (real prompts first, then dummies).

    embeds [rows, L, H] float32; position_ids [3, rows, L] int64; lengths (rows,) int32 real tokens
    per row (a dummy row: 1 padding slot); rope_deltas (rows,) int64.
    """

    embeds: np.ndarray
    position_ids: np.ndarray
    lengths: np.ndarray
    rope_deltas: np.ndarray

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


def right_pad(prompts: list[Prompt], rows: int) -> RightPadded:
    """Stack `prompts` right-padded to the longest; rows beyond len(prompts) are one padding slot."""
    length = max(p.embeds.shape[0] for p in prompts)
    embeds = np.zeros((rows, length, prompts[0].embeds.shape[1]), np.float32)
    positions = np.full((3, rows, length), PAD_POSITION, np.int64)
    lengths = np.ones(rows, np.int32)
    deltas = np.zeros(rows, np.int64)
    for r, p in enumerate(prompts):
        n = p.embeds.shape[0]
        embeds[r, :n] = p.embeds
        positions[:, r, :n] = p.position_ids[:, 0]
        lengths[r], deltas[r] = n, p.rope_delta
    return RightPadded(embeds, positions, lengths, deltas)


class _Rows:
    """Per-prompt greedy state: emitted ids, finished flags, and the id each row feeds next."""

    def __init__(self, prompts: list[Prompt], rows: int, max_new_tokens: int, stop_ids):
        self.forced = [p.forced_ids for p in prompts]
        self.ids: list[list[int]] = [[] for _ in prompts]
        self.finished = np.arange(rows) >= len(prompts)  # dummy rows are finished from the start
        self.next_ids = np.full(rows, ENDOFTEXT_ID, np.int64)  # finished rows are fed the pad id
        self.max_new_tokens, self.stop_ids = max_new_tokens, set(stop_ids)

    def pick(self, logits: np.ndarray, step: int, live: np.ndarray) -> None:
        """Append step `step`'s token to every unfinished row; logits [len(live), V], row i is
        prompt live[i]."""
        for i, r in enumerate(live):
            if self.finished[r]:
                continue
            token = OrtDecoder._pick(logits[i:i + 1], self.forced[r], step)
            self.ids[r].append(token)
            if token in self.stop_ids or len(self.ids[r]) >= self.max_new_tokens:
                self.finished[r] = True
                token = ENDOFTEXT_ID
            self.next_ids[r] = token

    @property
    def done(self) -> bool:
        return bool(self.finished.all())


def _take_rows(value: ort.OrtValue, keep: np.ndarray, device: str) -> ort.OrtValue:
    """Rows `keep` of a [B, ...] OrtValue. Through host memory: ORT's Python API cannot slice on
    a device (on the CPU `numpy()` is a view, so this is one copy)."""
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[keep]), device, 0)


class _Running:
    """The rows now in the graph's batch (`live`: prompt index per row) and their step inputs."""

    def __init__(self, decoder: OrtDecoder, io: ort.IOBinding, batch: LeftPadded):
        self.decoder, self.io, self.length = decoder, io, batch.length
        self.mask, self.offsets = batch.mask, batch.offsets
        self.live = np.arange(len(batch.offsets))
        self.past = _empty_past(decoder, len(self.live))
        self._buffers()

    def _buffers(self) -> None:
        rows = len(self.live)
        self.logits = np.empty((rows, self.decoder.vocab), np.float32)  # bound output, reused
        self.embed = np.empty((rows, 1, self.decoder.table.shape[1]), np.float32)  # written per step
        self.pos = np.empty((3, rows, 1), np.int64)
        # [rows, c+1] must be contiguous for the graph, so each step copies the mask's first c+1
        # columns here (rows * (c+1) int64: microseconds, next to a step that copies the KV cache).
        self.mask_buf = np.empty(self.mask.size, np.int64)
        self.io.bind_cpu_input("inputs_embeds", self.embed)  # ORT reads these buffers every run
        self.io.bind_cpu_input("position_ids", self.pos)

    def prefill(self, batch: LeftPadded) -> np.ndarray:
        """Run the left-padded prompts; returns logits [rows, V]."""
        self.io.bind_cpu_input("inputs_embeds", batch.embeds)
        self.io.bind_cpu_input("position_ids", batch.position_ids)
        self.io.bind_cpu_input("attention_mask", np.ascontiguousarray(batch.mask[:, :self.length]))
        logits = self.logits
        self.past = self.decoder._run(self.io, self.past, logits)
        self._buffers()  # fresh step buffers, bound as the one-token inputs
        return logits

    def step(self, cache_pos: int, next_ids: np.ndarray) -> np.ndarray:
        """Feed next_ids[live] at cache index `cache_pos`; returns logits [len(live), V]."""
        np.copyto(self.embed[:, 0], self.decoder.table[next_ids[self.live]])
        self.pos[:] = (cache_pos + self.offsets)[None, :, None]
        mask = self.mask_buf[: self.mask.shape[0] * (cache_pos + 1)].reshape(-1, cache_pos + 1)
        np.copyto(mask, self.mask[:, : cache_pos + 1])
        self.io.bind_input("attention_mask", "cpu", 0, np.int64, list(mask.shape), mask.ctypes.data)
        self.past = self.decoder._run(self.io, self.past, self.logits)
        return self.logits

    def keep(self, rows: np.ndarray) -> None:
        """Shrink the batch to `rows` (indices into the current batch), KV cache included."""
        self.live, self.mask, self.offsets = self.live[rows], self.mask[rows], self.offsets[rows]
        self.past = [_take_rows(v, rows, self.decoder.device) for v in self.past]
        self._buffers()


def _shrink_to(finished: np.ndarray, buckets: tuple[int, ...] | None) -> np.ndarray | None:
    """Rows (indices into the current batch) to keep, or None to keep them all.

    finished: (rows,) bool of the current batch. All unfinished rows stay; with buckets, finished
    rows fill the batch up to the smallest bucket that holds the unfinished ones.
    """
    unfinished = np.flatnonzero(~finished)
    target = bucket_rows(max(len(unfinished), 1), buckets)
    if target >= len(finished):
        return None
    filler = np.flatnonzero(finished)[: target - len(unfinished)]
    return np.sort(np.concatenate([unfinished, filler]))


def _empty_past(decoder: OrtDecoder, rows: int) -> list[ort.OrtValue]:
    """[rows, KV, 0, D] past tensors for the prefill, on the session's device."""
    shape = [rows, decoder.kv_heads, 0, decoder.head_dim]
    return [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, decoder.device, 0)
            for _ in decoder.past_names]


def greedy_batch(
    decoder: OrtDecoder,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    stop_ids=STOP_IDS,
    buckets: tuple[int, ...] | None = None,
    shrink: bool = True,
) -> tuple[list[list[int]], dict[str, float]]:
    """Greedy generation for every prompt in one batch; per row, the ids `OrtDecoder.greedy` gives.

    buckets: run only these batch sizes (dummy rows fill up); None runs len(prompts) rows.
    shrink: drop finished rows from the batch (down to the next bucket when buckets are set);
    False keeps the batch shape fixed to the end. The GQA graph always keeps it (module docstring). Returns (new token ids per prompt,
    {"prefill": ms, "decode": ms, "rows": rows at prefill, "shrinks": batch shrinks}); the times
    are the whole batch's. Stop ids are included, like HF generate.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if decoder.gqa:
        return _greedy_batch_gqa(decoder, prompts, max_new_tokens, stop_ids, buckets)
    rows = bucket_rows(len(prompts), buckets)
    batch = left_pad(prompts, rows, max_new_tokens)
    state = _Rows(prompts, rows, max_new_tokens, stop_ids)
    run = _Running(decoder, decoder.session.io_binding(), batch)

    t0 = time.perf_counter()
    state.pick(run.prefill(batch), 0, run.live)
    t1 = time.perf_counter()
    step, shrinks = 1, 0
    while not state.done:  # every row stops by max_new_tokens at the latest
        keep = _shrink_to(state.finished[run.live], buckets) if shrink else None
        if keep is not None:
            run.keep(keep)
            shrinks += 1
        state.pick(run.step(batch.length + step - 1, state.next_ids), step, run.live)
        step += 1
    t2 = time.perf_counter()
    return state.ids, {"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3, "rows": rows, "shrinks": shrinks}


def _greedy_batch_gqa(decoder: OrtDecoder, prompts: list[Prompt], max_new_tokens: int, stop_ids,
                      buckets: tuple[int, ...] | None) -> tuple[list[list[int]], dict[str, float]]:
    """`greedy_batch` on the GQA graph: right padding, fixed buffers, finished rows keep stepping.
    The KV cache has the graph's dtype (float32 or float16: `OrtDecoder.kv_cache`, via `GqaSteps`)."""
    rows = bucket_rows(len(prompts), buckets)
    batch = right_pad(prompts, rows)
    state = _Rows(prompts, rows, max_new_tokens, stop_ids)
    steps = decoder.gqa_steps(rows, batch.length + max_new_tokens)  # GqaSteps or FixedGqaSteps
    live = np.arange(rows)

    t0 = time.perf_counter()
    state.pick(steps.prefill(batch.embeds, batch.position_ids, batch.lengths, batch.rope_deltas), 0, live)
    t1 = time.perf_counter()
    step = 1
    while not state.done:  # every row stops by max_new_tokens at the latest
        state.pick(steps.step(state.next_ids, step), step, live)
        step += 1
    t2 = time.perf_counter()
    return state.ids, {"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3, "rows": rows, "shrinks": 0}
