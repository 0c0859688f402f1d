"""Reference `Generator`: Hugging Face Qwen2.5-VL with `generate`, as the authors' script runs it.

This is the parity oracle. It uses HF's own processor (PIL backend: PIL BICUBIC smart_resize, the
slow processor the reference ran with) and HF `generate` (greedy). Stage timings come from a
forward hook on the vision tower and a pass-through logits processor that timestamps each step.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..config import ENDOFTEXT_ID, IM_END_ID
from ..vlm import Generation
from . import require

log = logging.getLogger(__name__)

torch = require("torch", "export")
transformers = require("transformers", "export")
transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars per stage load

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Qwen2.5-VL's generation_config lists both; <|im_end|> is the one a chat model emits.
STOP_IDS = [IM_END_ID, ENDOFTEXT_ID]


class _StepClock(transformers.LogitsProcessor):
    """Pass-through processor that timestamps every decoding step (called once per forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class _ForceTokens(transformers.LogitsProcessor):
    """Teacher forcing: the model runs every step, the chosen token is the script's next one."""

    def __init__(self, token_ids: list[int], prompt_len: int):
        self.token_ids = token_ids
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        token = self.token_ids[step] if step < len(self.token_ids) else IM_END_ID
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced


class TorchGenerator:
    """HF `Qwen2_5_VLForConditionalGeneration` + `generate` on one checkpoint folder."""

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu", precision: str = "fp32"):
        if precision not in DTYPES:
            raise ValueError(f"torch precision must be one of {sorted(DTYPES)}, got {precision!r}")
        checkpoint = Path(checkpoint)
        # The image processor's PIL backend (PIL BICUBIC smart_resize) is what the reference ran;
        # 5.x defaults to the torchvision one, which resizes differently.
        self.processor = transformers.AutoProcessor.from_pretrained(checkpoint)
        self.processor.image_processor = transformers.AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
        self.tokenizer = self.processor.tokenizer
        self.model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            checkpoint, dtype=DTYPES[precision]
        ).to(device).eval()
        self.device = device
        gc = self.model.generation_config
        if getattr(gc, "repetition_penalty", 1.0) not in (None, 1.0):
            log.info("%s: generation_config repetition_penalty=%s ignored; the reference uses 1.0",
                     checkpoint, gc.repetition_penalty)
        self._vision_ms = 0.0
        visual = self.model.model.visual
        visual.register_forward_pre_hook(lambda *_: setattr(self, "_vision_t0", time.perf_counter()))
        visual.register_forward_hook(lambda *_: self._add_vision_time())

    def _add_vision_time(self):
        self._vision_ms += (time.perf_counter() - self._vision_t0) * 1e3

    def render(self, user_text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, image: np.ndarray, user_text: str, *, max_new_tokens: int, forced_text=None):
        from PIL import Image

        t0 = time.perf_counter()
        prompt = self.render(user_text)
        inputs = self.processor(text=[prompt], images=[Image.fromarray(image)], return_tensors="pt")
        inputs = inputs.to(self.device)  # includes mm_token_type_ids: without it 5.x uses 1-D positions
        prompt_len = inputs["input_ids"].shape[1]
        clock = _StepClock()
        processors = [clock]
        if forced_text is not None:
            forced = self.tokenizer.encode(forced_text, add_special_tokens=False) + [IM_END_ID]
            processors.insert(0, _ForceTokens(forced, prompt_len))
        self._vision_ms = 0.0
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                repetition_penalty=1.0,
                eos_token_id=STOP_IDS,
                pad_token_id=ENDOFTEXT_ID,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=transformers.LogitsProcessorList(processors),
            )
        t2 = time.perf_counter()
        ids = out[0, prompt_len:].tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        first = clock.times[0] if clock.times else t2
        timings = {
            "preprocess": (t1 - t0) * 1e3,
            "vision": self._vision_ms,
            "prefill": (first - t1) * 1e3 - self._vision_ms,
            "decode": (t2 - first) * 1e3,
        }
        return Generation(text=text, token_ids=ids, prompt=prompt, timings_ms=timings)

    def close(self) -> None:
        self.model = None
