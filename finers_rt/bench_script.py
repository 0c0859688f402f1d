"""What `finers-rt bench` feeds the pipeline: a synthetic 4K frame and forced stage texts of an
exact token length.

Token counting: N requested tokens per stage = N generated tokens INCLUDING the <|im_end|> step
(as `max_new_tokens` and `Result.tokens` count them). The scripted text is N - 1 tokens; the
generator emits <|im_end|> after it. The prefill produces the first token, so decode runs N - 1 steps.

The text is `<think>` + filler words + `</think><answer>{...}</answer>`, with the answer in the
format of `finers_rt.forced` and a valid box (and LPR points), so region, crop, LPR scaling and
SAM2 do their real work. The filler is padded or trimmed word by word (each filler word is one
token) until the whole text tokenises to exactly N - 1 tokens.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from .forced import FOUND, gse_text, lpr_text

FRAME_SIZE = (3840, 2160)  # (w, h) synthetic 4K frame
QUESTION = "the small red car near the road"
# GSE box in 1920x1080 space: 256x256 around the centre. LPR box/points in 512x512 crop space.
GSE_BOX = [832, 412, 1088, 668]
LPR_BOX, LPR_P1, LPR_P2 = [192, 192, 320, 320], [240, 256], [272, 256]
FILLER = ("the", "small", "object", "is", "near", "the", "road", "and")  # one token each with a leading space


def synthetic_frame(size: tuple[int, int] = FRAME_SIZE, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 RGB: smooth random colour blobs (noise at 1/16 scale, bilinear up)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR))


def frame_jpeg(size: tuple[int, int] = FRAME_SIZE, seed: int = 0, quality: int = 95) -> bytes:
    """`synthetic_frame` encoded as a JPEG: what a camera or ground station hands the pipeline."""
    buf = io.BytesIO()
    Image.fromarray(synthetic_frame(size, seed)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def answer_text(stage: str) -> str:
    """The `<answer>...</answer>` tail of the stage's scripted text, as `finers_rt.forced` writes it."""
    full = gse_text(GSE_BOX, FOUND) if stage == "gse" else lpr_text(LPR_BOX, LPR_P1, LPR_P2, FOUND)
    return full.split("</think>", 1)[1]


def compose(words: int, answer: str) -> str:
    filler = " ".join(FILLER[i % len(FILLER)] for i in range(words))
    return f"<think>{filler}</think>{answer}"


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Tokens the generators force for `text` (they encode it with add_special_tokens=False)."""
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def min_tokens(tokenizer: Tokenizer, stage: str) -> int:
    """Smallest N for `stage`: a one-word think, the answer and the <|im_end|> step. (One word, not
    none: an empty think lets BPE merge `></` across the tags, so counts would jump by 2 there.)"""
    return count_tokens(tokenizer, compose(1, answer_text(stage))) + 1


def scripted_text(tokenizer: Tokenizer, stage: str, n_tokens: int) -> str:
    """A text that tokenises to exactly n_tokens - 1 tokens (the generator adds <|im_end|>)."""
    answer, target = answer_text(stage), n_tokens - 1
    floor = count_tokens(tokenizer, compose(1, answer))
    if target < floor:
        raise ValueError(f"--decode-tokens for {stage} must be >= {floor + 1}: its answer with a one-word "
                         f"think takes {floor} tokens + <|im_end|> (asked for {n_tokens})")
    words = 1 + target - floor
    for _ in range(8):  # each word is ~1 token: converge in a step or two
        got = count_tokens(tokenizer, compose(words, answer))
        if got == target:
            return compose(words, answer)
        words = max(words + target - got, 1)
    raise RuntimeError(f"could not script exactly {target} tokens for {stage} (last try {got})")


def stage_scripts(stage_dirs: dict[str, Path], decode_tokens: dict[str, int]) -> dict[str, str]:
    """{"gse", "lpr"} scripted texts, each counted with that stage's own tokenizer.json."""
    out = {}
    for stage, folder in stage_dirs.items():
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        out[stage] = scripted_text(tok, stage, decode_tokens[stage])
    return out
