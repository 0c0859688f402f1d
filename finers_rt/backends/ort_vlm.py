"""`Generator` on ONNX Runtime: numpy preprocessing -> vision graph -> host embedding merge ->
decoder graph greedy loop. Imports numpy, tokenizers and onnxruntime only (never torch).

Reads an exported stage folder (written by `finers_rt.export.engine.export_engines`):
vision.onnx, decoder.onnx, embed_tokens.npy, tokenizer.json, preprocessor_config.json, config.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..config import ENDOFTEXT_ID, IM_END_ID, IMAGE_PAD_ID
from ..prompts import render_chat
from ..qwen_rope import rope_index
from ..vlm import Generation
from .ort_decode import OrtDecoder
from .ort_vision import OrtVision

STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)


class OrtGenerator:
    """Greedy Qwen2.5-VL generation from an exported stage folder."""

    def __init__(self, stage_dir: str | Path, *, providers: list[str] | None = None):
        stage_dir = Path(stage_dir)
        self.tokenizer = Tokenizer.from_file(str(stage_dir / "tokenizer.json"))
        self.vision = OrtVision(stage_dir / "vision.onnx", providers=providers)
        self.decoder = OrtDecoder(stage_dir / "decoder.onnx", stage_dir / "embed_tokens.npy", providers=providers)

    def _prompt_ids(self, prompt: str, n_image_tokens: int) -> np.ndarray:
        """Token ids of the chat text with its one <|image_pad|> expanded to the image's tokens.

        Added tokens are split out before BPE, so expanding at id level equals tokenising the
        expanded string (what the HF processor does) and is ~100x cheaper for 2,691 tokens.
        """
        ids = np.asarray(self.tokenizer.encode(prompt, add_special_tokens=False).ids, dtype=np.int64)
        (pos,) = np.nonzero(ids == IMAGE_PAD_ID)
        if len(pos) != 1:
            raise ValueError(f"the prompt must hold exactly one <|image_pad|>, found {len(pos)}")
        return np.concatenate([ids[: pos[0]], np.full(n_image_tokens, IMAGE_PAD_ID, np.int64), ids[pos[0] + 1:]])

    def generate(self, image: np.ndarray, user_text: str, *, max_new_tokens: int, forced_text=None):
        t0 = time.perf_counter()
        prompt = render_chat(user_text)
        feeds, reverse, grid = self.vision.prepare(image)
        t1 = time.perf_counter()
        image_embeds = self.vision.run_prepared(feeds, reverse)  # (n_tokens, H) raster order
        t2 = time.perf_counter()
        ids = self._prompt_ids(prompt, image_embeds.shape[0])
        position_ids, rope_delta = rope_index(ids, np.asarray([grid], dtype=np.int64))
        embeds = self.decoder.embed(ids)  # (S, H) float32, host lookup
        embeds[ids == IMAGE_PAD_ID] = image_embeds
        forced = None
        if forced_text is not None:
            forced = self.tokenizer.encode(forced_text, add_special_tokens=False).ids
        t3 = time.perf_counter()
        out_ids, t = self.decoder.greedy(embeds, position_ids, rope_delta, max_new_tokens=max_new_tokens,
                                         stop_ids=STOP_IDS, forced_ids=forced)
        text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        timings = {
            "preprocess": (t1 - t0 + t3 - t2) * 1e3,
            "vision": (t2 - t1) * 1e3,
            "prefill": t["prefill"],
            "decode": t["decode"],
        }
        return Generation(text=text, token_ids=list(out_ids), prompt=prompt, timings_ms=timings)

    def close(self) -> None:
        self.vision = self.decoder = None
