"""The VLM stage (GSE and LPR are two configs of it) and the Generator protocol backends implement.

A stage turns (image, user text) into generated text. Host work that every backend shares lives
here: the reference's BILINEAR resize to the stage's input size and prompt construction. What a
backend owns: tokenisation with image tokens, Qwen's smart_resize/patchify, vision, prefill and
the greedy decode loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .config import StageConfig
from .image import resize_bilinear
from .prompts import build_question


@dataclass
class Generation:
    """What a Generator returns for one prompt.

    timings_ms keys: preprocess (smart_resize + patchify + tokenise), vision, prefill, decode.
    From `generate_batch`, prefill and decode are the whole batch's, shared by `batch_size` prompts.
    """

    text: str
    token_ids: list[int]
    prompt: str  # the rendered chat text (one <|image_pad|> placeholder)
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1  # prompts that shared this generation's prefill + decode


class Generator(Protocol):
    """Greedy generation for one Qwen2.5-VL checkpoint on one backend.

    image: (H, W, 3) uint8 RGB already at the stage's input size. forced_text: if given, each
    step still runs the model, but the emitted token comes from this text's tokens (then EOS).
    """

    def generate(
        self, image: np.ndarray, user_text: str, *, max_new_tokens: int, forced_text: str | None = None
    ) -> Generation: ...

    def close(self) -> None: ...


class BatchGenerator(Generator, Protocol):
    """A Generator that can also run several prompts as one batch (same results as `generate`)."""

    def generate_batch(
        self, images: list[np.ndarray], user_texts: list[str], *, max_new_tokens: int,
        forced_texts: list[str | None] | None = None,
    ) -> list[Generation]: ...


class VLMStage:
    """GSE or LPR: resize -> prompt -> generate. Coordinates come back in `cfg.coord_space`."""

    def __init__(self, cfg: StageConfig, generator: Generator, host_threads: int = 1):
        self.cfg = cfg
        self.generator = generator
        self.host_threads = host_threads  # >1: banded PIL resize, byte-identical (host_parallel)

    def _prepare(self, image, question: str, task: str, options) -> tuple[np.ndarray, str, float]:
        """Image (array or PIL, any size) -> (stage input at cfg.input_size, user text, ms spent)."""
        t0 = time.perf_counter()
        stage_input = resize_bilinear(image, self.cfg.input_size, self.host_threads)
        user_text = build_question(self.cfg.name, task, question, options)
        return stage_input, user_text, (time.perf_counter() - t0) * 1e3

    def run(self, image: np.ndarray, question: str, task: str, options=None, forced_text=None):
        """(H, W, 3) uint8 RGB or a PIL image, at any size -> (Generation, resize ms)."""
        stage_input, user_text, resize_ms = self._prepare(image, question, task, options)
        gen = self.generator.generate(
            stage_input, user_text, max_new_tokens=self.cfg.max_new_tokens, forced_text=forced_text
        )
        return gen, resize_ms

    def run_batch(self, images: list[np.ndarray], questions: list[str], tasks: list[str],
                  options: list, forced_texts: list[str | None]) -> list[tuple[Generation, float]]:
        """`run` for several requests: one `generate_batch` call when the generator has it (the
        ort backend); a generator without it (the torch reference) runs `generate` per request."""
        requests = list(zip(images, questions, tasks, options, forced_texts, strict=True))
        if not requests:
            return []
        if not hasattr(self.generator, "generate_batch"):
            return [self.run(*r) for r in requests]
        inputs, texts, resize_ms = zip(*(self._prepare(*r[:4]) for r in requests), strict=True)
        gens = self.generator.generate_batch(list(inputs), list(texts), max_new_tokens=self.cfg.max_new_tokens,
                                             forced_texts=list(forced_texts))
        return list(zip(gens, resize_ms, strict=True))
