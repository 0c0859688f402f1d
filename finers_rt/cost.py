"""FLOPs and bytes moved per pipeline stage, computed from model configs (the work model of `plan`).

Conventions (per image, batch 1):
- A matmul (m x k) @ (k x n) costs 2*m*k*n FLOPs. Norms, activations, softmax, rotary and
  residual adds are not counted (a few % of the matmuls).
- Attention of Sq queries over Skv keys with n_heads * head_dim = D costs 4*Sq*Skv*D FLOPs (QK^T
  and AV). Causal prefill over S tokens sums keys 1..S: 2*S*(S+1)*D per layer.
- Bytes are a lower bound: weights read once per pass (a decode step is a pass), the KV cache
  written by prefill and read by every decode step, the stage's inputs and outputs once. All other
  activations are assumed to stay on chip (fused kernels, flash attention: no score matrix in memory).
- Decode of N generated tokens (the <|im_end|> step included) is N - 1 steps: the prefill pass
  already produces the first token.

Model configs are data (`MODELS`, `SAM2_MODELS`) with the source of their numbers; a checkpoint's
own config.json goes through `VLMConfig.from_hf`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .qwen_vision_host import smart_resize

GSE_SIZE, LPR_SIZE = (1920, 1080), (512, 512)  # (w, h) stage inputs before smart_resize
QWEN_MAX_PIXELS = 12_845_056  # Qwen2.5-VL-7B-Instruct preprocessor_config.json max_pixels
# Prompt text tokens around the image (system + template + question), finers-pipeline.md §9.
GSE_TEXT_TOKENS, LPR_TEXT_TOKENS = 180, 200


@dataclass(frozen=True)
class Precision:
    """How one precision stores and computes. int8/int4 are weight-only (W8A16 / W4A16 as ONNX
    MatMulNBits and TensorRT-LLM INT4-AWQ): weights shrink, the math runs at the 16-bit rate."""

    name: str
    weight_bytes: float  # bytes per weight, incl. quantisation scales
    act_bytes: float  # bytes per activation / KV cache value
    math: str  # key of the device peak the matmuls run at


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, "fp32"),
    "bf16": Precision("bf16", 2, 2, "bf16"),
    "fp16": Precision("fp16", 2, 2, "fp16"),
    "fp8": Precision("fp8", 1, 2, "fp8"),  # FP8 weights and activations; KV cache kept 16-bit
    "int8": Precision("int8", 1, 2, "bf16"),  # per-channel scales: negligible bytes
    "int4": Precision("int4", 0.5 + 2 / 128, 2, "bf16"),  # + one fp16 scale per group of 128
}


def vision_precision(p: Precision) -> Precision:
    """Vision towers and SAM2 stay 16-bit (fp32 stays fp32): quantisation applies to the LLM only."""
    return p if p.name in ("fp32", "fp16") else PRECISIONS["bf16"]


@dataclass(frozen=True)
class Cost:
    flops: float  # FLOPs
    bytes: float  # bytes moved to/from device memory

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class TextConfig:
    """Qwen2.5 decoder: GQA attention (q/k/v with bias, o without), SwiGLU MLP, RMSNorm."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix (stored once)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_matmul(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o and gate/up/down."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate

    @property
    def layer_params(self) -> int:
        return self.layer_matmul + (self.hidden + 2 * self.kv_heads * self.head_dim) + 2 * self.hidden  # + q/k/v biases, 2 norms

    @property
    def streamed_params(self) -> int:
        """Weights one pass reads: all layers, the final norm and lm_head (not the embedding
        table: a pass looks up only its own rows)."""
        return self.layers * self.layer_params + self.hidden + self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.streamed_params + (0 if self.tied else self.vocab * self.hidden)


@dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower: Conv3d patch embed, blocks (qkv/proj/SwiGLU with biases), merger."""

    depth: int
    hidden: int
    heads: int
    intermediate: int
    out_hidden: int
    fullatt_blocks: tuple[int, ...]
    window: int = 112  # pixels per attention-window side
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    in_channels: int = 3

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal * self.patch**2  # 1176 values per patch

    @property
    def block_matmul(self) -> int:
        """Weights of one block's matmuls: qkv, proj, gate/up/down."""
        return 4 * self.hidden**2 + 3 * self.hidden * self.intermediate

    @property
    def block_params(self) -> int:
        return self.block_matmul + 5 * self.hidden + 2 * self.intermediate + 2 * self.hidden  # + biases, 2 norms

    @property
    def merger_params(self) -> int:
        m = self.hidden * self.merge**2  # 4 patches concatenated
        return self.hidden + (m * m + m) + (m * self.out_hidden + self.out_hidden)

    @property
    def params(self) -> int:
        return self.patch_dim * self.hidden + self.depth * self.block_params + self.merger_params


@dataclass(frozen=True)
class VLMConfig:
    text: TextConfig
    vision: VisionConfig
    source: str
    unsure: str = ""  # values not re-checked against the published file, if any

    @classmethod
    def from_hf(cls, doc: dict, source: str) -> VLMConfig:
        """A Qwen2.5-VL config.json: transformers 5.x (`text_config`) or 4.x (text keys at top level)."""
        t, v = doc.get("text_config") or doc, doc["vision_config"]
        tied = doc.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        text = TextConfig(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                          t["num_key_value_heads"], t["intermediate_size"], t["vocab_size"], bool(tied))
        vision = VisionConfig(v["depth"], v["hidden_size"], v["num_heads"], v["intermediate_size"],
                              v["out_hidden_size"], tuple(v["fullatt_block_indexes"]), v["window_size"],
                              v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"],
                              v.get("in_channels", v.get("in_chans", 3)))
        return cls(text, vision, source)

    @classmethod
    def from_dir(cls, path: str | Path) -> VLMConfig:
        path = Path(path) / "config.json"
        return cls.from_hf(json.loads(path.read_text()), source=str(path))


_QWEN_VISION = {"depth": 32, "hidden": 1280, "heads": 16, "intermediate": 3420, "fullatt_blocks": (7, 15, 23, 31)}
MODELS = {
    # Qwen/Qwen2.5-VL-7B-Instruct config.json as published (FineRS fine-tunes it, same shapes).
    "7b": VLMConfig(
        TextConfig(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, tied=False),
        VisionConfig(out_hidden=3584, **_QWEN_VISION),
        source="Qwen/Qwen2.5-VL-7B-Instruct config.json (published values)",
    ),
    # Qwen/Qwen2.5-VL-3B-Instruct config.json as published.
    "3b": VLMConfig(
        TextConfig(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936, tied=True),
        VisionConfig(out_hidden=2048, **_QWEN_VISION),
        source="Qwen/Qwen2.5-VL-3B-Instruct config.json (published values)",
        unsure="vision depth/hidden/heads/intermediate/fullatt taken equal to 7B's; tie_word_embeddings=true",
    ),
}


# ---- one VLM stage --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageWork:
    """Token counts of one VLM stage for one image."""

    image_size: tuple[int, int]  # (w, h) fed to smart_resize
    text_tokens: int  # prompt tokens besides the image tokens
    decode_tokens: int  # generated tokens, the <|im_end|> step included

    def grid(self, v: VisionConfig) -> tuple[int, int]:
        """(rows, cols) of patches after smart_resize (1920x1080 -> 78 x 138 = 10,764 patches)."""
        factor = v.patch * v.merge
        h, w = smart_resize(self.image_size[1], self.image_size[0], factor, factor * factor, QWEN_MAX_PIXELS)
        return h // v.patch, w // v.patch

    def image_tokens(self, v: VisionConfig) -> int:
        rows, cols = self.grid(v)
        return rows * cols // v.merge**2  # 2,691 at 1920x1080, 324 at 512x512

    def prompt_tokens(self, v: VisionConfig) -> int:
        return self.image_tokens(v) + self.text_tokens


def _window_pairs(rows: int, cols: int, v: VisionConfig) -> int:
    """Sum over attention windows of (patches in window)^2: query-key pairs of a windowed block.
    Windows tile the merge-unit grid by window/(patch*merge) units; edge windows are smaller."""
    units, win = (rows // v.merge, cols // v.merge), v.window // (v.patch * v.merge)

    def squares(n: int) -> int:  # sum of squared window extents along one axis, in patches
        sizes = [min(win, n - s) * v.merge for s in range(0, n, win)]
        return sum(s * s for s in sizes)

    return squares(units[0]) * squares(units[1])


def vision_cost(v: VisionConfig, rows: int, cols: int, p: Precision) -> Cost:
    n = rows * cols  # patches
    lin = 2 * n * (v.patch_dim * v.hidden + v.depth * v.block_matmul)
    full = len(v.fullatt_blocks)
    attn = 4 * v.hidden * (full * n * n + (v.depth - full) * _window_pairs(rows, cols, v))
    merge_in = v.hidden * v.merge**2
    merger = 2 * (n // v.merge**2) * (merge_in * merge_in + merge_in * v.out_hidden)
    io = (n * v.patch_dim + (n // v.merge**2) * v.out_hidden) * p.act_bytes
    return Cost(lin + attn + merger, v.params * p.weight_bytes + io)


def _kv_bytes(t: TextConfig, tokens: float, p: Precision) -> float:
    return 2 * t.layers * t.kv_heads * t.head_dim * tokens * p.act_bytes  # K and V


def prefill_cost(t: TextConfig, s: int, p: Precision) -> Cost:
    """Prefill of s prompt tokens; logits for the last position only (as the exported graph)."""
    flops = 2 * s * t.layers * t.layer_matmul + 2 * t.layers * s * (s + 1) * t.hidden + 2 * t.vocab * t.hidden
    moved = t.streamed_params * p.weight_bytes + _kv_bytes(t, s, p) + s * t.hidden * p.act_bytes
    return Cost(flops, moved)


# Bytes per lm_head weight a decode step reads, by head (`finers-rt export --lm-head`); None: the
# precision's. screened: int8 weights + three float32 per vocab row (scale, two bound terms).
LM_HEAD_BYTES = {"fp32": None, "screened": 1.0}
SCREENED_ROW_BYTES = 12


def decode_cost(t: TextConfig, prompt: int, new_tokens: int, p: Precision, lm_head: str = "fp32") -> Cost:
    """new_tokens - 1 steps after a prompt of `prompt` tokens; step j attends over prompt + j keys.
    lm_head "screened": the head is read in int8 (`LM_HEAD_BYTES`); its few rescored rows are not counted."""
    steps = max(new_tokens - 1, 0)
    keys = steps * prompt + steps * (steps + 1) / 2  # sum over steps j = 1..steps of (prompt + j)
    flops = steps * 2 * (t.layers * t.layer_matmul + t.vocab * t.hidden) + 4 * t.layers * t.hidden * keys
    head = t.vocab * t.hidden
    head_bytes = head * p.weight_bytes
    if LM_HEAD_BYTES[lm_head] is not None:
        head_bytes = head * LM_HEAD_BYTES[lm_head] + t.vocab * SCREENED_ROW_BYTES
    weights = (t.streamed_params - head) * p.weight_bytes + head_bytes
    moved = steps * weights + _kv_bytes(t, keys + steps, p)  # read + write
    return Cost(flops, moved)


def vlm_costs(cfg: VLMConfig, work: StageWork, p: Precision, lm_head: str = "fp32") -> dict[str, Cost]:
    """{"vision", "prefill", "decode"} for one stage; the vision tower at `vision_precision(p)`."""
    rows, cols = work.grid(cfg.vision)
    prompt = work.prompt_tokens(cfg.vision)
    return {
        "vision": vision_cost(cfg.vision, rows, cols, vision_precision(p)),
        "prefill": prefill_cost(cfg.text, prompt, p),
        "decode": decode_cost(cfg.text, prompt, work.decode_tokens, p, lm_head),
    }


def with_decode(work: StageWork, decode_tokens: int) -> StageWork:
    return replace(work, decode_tokens=decode_tokens)
