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
    """

    text: str
    token_ids: list[int]
    prompt: str  # the rendered chat text (one <|image_pad|> placeholder)
    timings_ms: dict[str, float] = field(default_factory=dict)


class Generator(Protocol):
    """Greedy generation for one Qwen2.5-VL checkpoint on one backend.

    image: (H, W, 3) uint8 RGB already at the stage's input size. forced_text: if given, each
    step still runs the model, but the emitted token comes from this text's tokens (then EOS).
    """

    def generate(
        self, image: np.ndarray, user_text: str, *, max_new_tokens: int, forced_text: str | None = None
    ) -> Generation: ...

    def close(self) -> None: ...


class VLMStage:
    """GSE or LPR: resize -> prompt -> generate. Coordinates come back in `cfg.coord_space`."""

    def __init__(self, cfg: StageConfig, generator: Generator):
        self.cfg = cfg
        self.generator = generator

    def run(self, image: np.ndarray, question: str, task: str, options=None, forced_text=None):
        """(H, W, 3) uint8 RGB at any size -> (Generation, resize ms)."""
        t0 = time.perf_counter()
        stage_input = resize_bilinear(image, self.cfg.input_size)
        user_text = build_question(self.cfg.name, task, question, options)
        resize_ms = (time.perf_counter() - t0) * 1e3
        gen = self.generator.generate(
            stage_input, user_text, max_new_tokens=self.cfg.max_new_tokens, forced_text=forced_text
        )
        return gen, resize_ms
