"""The decoder's output head on the host: exact float32 logits, or a screened head's bounds.

A screened decoder graph (`export.lm_head_screen`, `finers-rt export --lm-head screened`) returns,
per row b, bounds lo[b, i] <= logit_i <= hi[b, i] for every vocab row i and the final-normed
hidden state x[b], instead of the logits. The best lower bound is a logit some row reaches, so
only rows whose upper bound reaches it can be the argmax; those few are rescored in float32 from
the float32 lm_head weight and the best wins (ties: the lowest id, as np.argmax over all logits).
Numpy only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SCREENED_OUTPUTS = ("logits_lo", "logits_hi", "hidden")
ROWS_KEY = "lm_head_rows"  # graph metadata: the .npy beside it holding the float32 lm_head [V, H]
# graph metadata naming the head's code ranges. "w7": 7-bit weight codes, exact on every int8 GEMM
# kernel (export/lm_head_screen.py); graphs without it (8-bit codes) overflow ORT's AVX2 kernel.
FORMAT_KEY, SCREEN_FORMAT = "lm_head_screen", "w7"


def screened_argmax(lo: np.ndarray, hi: np.ndarray, hidden: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, int]:
    """lo, hi [B, V] float32; hidden [B, H] float32; weight [V, H] float32 (memory-mapped is fine:
    only candidate rows are read). Returns (ids [B] int64, most candidates rescored in a row)."""
    ids = np.empty(lo.shape[0], np.int64)
    widest = 0
    for b in range(lo.shape[0]):
        candidates = np.flatnonzero(hi[b] >= lo[b].max())  # ascending; never empty (the best row's own hi)
        exact = np.asarray(weight[candidates], np.float32) @ hidden[b]
        ids[b] = candidates[int(np.argmax(exact))]
        widest = max(widest, candidates.size)
    return ids, widest


def is_screened(session) -> bool:
    return "logits_lo" in {o.name for o in session.get_outputs()}


def lm_head_rows(session, onnx_path: Path, embed_table: np.ndarray) -> np.ndarray:
    """The float32 lm_head [V, H] a screened graph rescores from: the embedding table when the
    model ties them (Qwen2.5-VL 3B; the tiny and bench checkpoints), else the file its metadata names."""
    meta = session.get_modelmeta().custom_metadata_map
    name = meta.get(ROWS_KEY)
    if name is None:
        raise ValueError(f"{onnx_path} has screened outputs but no {ROWS_KEY!r} metadata: re-export it")
    if meta.get(FORMAT_KEY) != SCREEN_FORMAT:
        raise ValueError(f"{onnx_path}: screened lm_head of an older format ({FORMAT_KEY}={meta.get(FORMAT_KEY)!r}, "
                         f"want {SCREEN_FORMAT!r}): its 8-bit weight codes give wrong bounds on CPUs without VNNI; "
                         "re-export with `finers-rt export`")
    return embed_table if name == "embed_tokens.npy" else np.load(Path(onnx_path).parent / name, mmap_mode="r")


class LogitsHead:
    """Output buffer of an exact-logits graph, bound once: `scores` = logits [rows, V]."""

    def __init__(self, io, rows: int, vocab: int):
        self.logits = self.scores = np.empty((rows, vocab), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)


class ScreenedHead:
    """Output buffers of a screened graph, bound once: lo/hi [rows, V], hidden [rows, H];
    `scores` stands in for the logits wherever only their argmax is read."""

    def __init__(self, io, rows: int, vocab: int, weight: np.ndarray):
        self.weight = weight
        self.lo, self.hi = (np.empty((rows, vocab), np.float32) for _ in range(2))
        self.hidden = np.empty((rows, weight.shape[1]), np.float32)
        for name, buf in zip(SCREENED_OUTPUTS, (self.lo, self.hi, self.hidden)):
            io.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        self.scores = ScreenedScores(self, slice(None))


class ScreenedScores:
    """Rows of a `ScreenedHead`'s last run; `scores[i:i + 1].argmax()` is row i's greedy id, as
    `logits[i:i + 1].argmax()` is for float32 logits."""

    def __init__(self, head: ScreenedHead, rows: slice):
        self.head, self.rows = head, rows

    def __getitem__(self, rows: slice) -> ScreenedScores:
        return ScreenedScores(self.head, rows)

    def argmax(self) -> int:
        h = self.head
        lo, hi, hidden = h.lo[self.rows], h.hi[self.rows], h.hidden[self.rows]
        if lo.shape[0] != 1:
            raise ValueError(f"argmax of {lo.shape[0]} screened rows: take one row, scores[i:i + 1]")
        return int(screened_argmax(lo, hi, hidden, h.weight)[0][0])


def make_head(decoder, io, rows: int) -> LogitsHead | ScreenedHead:
    """The output head for `rows` rows of `decoder` (an `OrtDecoder`), bound into `io`."""
    if decoder.lm_head_rows is None:
        return LogitsHead(io, rows, decoder.vocab)
    return ScreenedHead(io, rows, decoder.vocab, decoder.lm_head_rows)
