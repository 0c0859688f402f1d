"""Tiny random-weight FineRS checkpoints: GSE + LPR (Qwen2.5-VL) and SAM2 hiera-t, built offline.

No pretrained weights are reachable here, so tests and the demo run on checkpoints that have the
real architectures, file layouts and tokenizer but random weights:

    out/gse/   Qwen2_5_VLForConditionalGeneration folder (config, safetensors fp32, tokenizer,
               preprocessor_config.json, generation_config.json, chat_template.json)
    out/lpr/   same layout, different weights
    out/sam2/  sam2_hiera_tiny.pt ({"model": state_dict}, like the authors' files) + sam2.json
    out/tiny.json  seed, size preset, derived seeds and package versions

Same seed => same bytes in every file. Offline build step only (needs the `[export]` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from .tokenizer import NUM_RANKS, build_qwen_tokenizer

logger = logging.getLogger(__name__)

# Token ids of the real Qwen2.5-VL vocabulary (see tokenizer.ADDED_TOKENS).
ENDOFTEXT_ID = NUM_RANKS  # 151643 <|endoftext|>: bos / pad
IM_END_ID = 151645  # <|im_end|>: end of an assistant turn
VISION_START_ID, VISION_END_ID = 151652, 151653
IMAGE_PAD_ID, VIDEO_PAD_ID = 151655, 151656

VOCAB_SIZE = 151_936  # embedding rows of Qwen2.5-VL-3B/7B (> 151,665 tokens: padded)
SAM2_CONFIG = "configs/sam2/sam2_hiera_t.yaml"  # SAM 2.0 hiera-tiny, shipped in the sam2 package
SAM2_CKPT = "sam2_hiera_tiny.pt"
PERTURB_STD = 0.02  # noise added to constant-initialised tensors (biases, norm scales)

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json, with the library defaults written out so that
# loading never depends on a transformers version's defaults.
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,  # 56*56: legacy keys, still read by older transformers
    "max_pixels": 12845056,  # 28*28*16384
    "size": {"shortest_edge": 3136, "longest_edge": 12845056},  # the 5.x keys, same limits
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "do_resize": True,
    "resample": 3,  # PIL bicubic
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],  # CLIP mean / std
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# Greedy decoding as in the FineRS evaluation; no sampling knobs at all.
GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT_ID,
    "do_sample": False,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class TinyVLMConfig:
    """Size of a random Qwen2.5-VL. Text head_dim = hidden / heads; sum(mrope_section) = head_dim / 2."""

    hidden: int  # text hidden size (= vision out_hidden_size, so the merger feeds the decoder)
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    mrope_section: tuple[int, int, int]  # rotary pairs for the (t, h, w) position axes
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    fullatt_blocks: tuple[int, ...]  # vision blocks with full attention; the rest use windows

    @classmethod
    def from_name(cls, name: str) -> TinyVLMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown size {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, TinyVLMConfig] = {
    # ~10.5M params, nearly all in the 151936x64 tied embedding; builds in well under a second.
    "tiny": TinyVLMConfig(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, mrope_section=(2, 3, 3),
        vision_depth=4, vision_hidden=64, vision_heads=4, vision_intermediate=128, fullatt_blocks=(1, 3),
    ),
    # Big enough for timings to mean something on a CPU, still ~100M params.
    "bench": TinyVLMConfig(
        hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1408, mrope_section=(8, 12, 12),
        vision_depth=8, vision_hidden=256, vision_heads=4, vision_intermediate=512, fullatt_blocks=(3, 7),
    ),
}  # fmt: skip


def qwen25_vl_config(preset: TinyVLMConfig):
    """A transformers 5.x `Qwen2_5_VLConfig` (nested text_config / vision_config) for `preset`."""
    from transformers import Qwen2_5_VLConfig

    head_dim = preset.hidden // preset.heads
    if 2 * sum(preset.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {preset.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": preset.hidden,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "intermediate_size": preset.intermediate,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "max_window_layers": preset.layers,
        "rms_norm_eps": 1e-6,
        # 5.x name for the old `rope_scaling={"type": "mrope", ...}` + `rope_theta`
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(preset.mrope_section)},
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
    }
    vision = {
        "depth": preset.vision_depth,
        "hidden_size": preset.vision_hidden,
        "num_heads": preset.vision_heads,
        "intermediate_size": preset.vision_intermediate,
        "out_hidden_size": preset.hidden,
        "fullatt_block_indexes": list(preset.fullatt_blocks),
        "window_size": 112,  # pixels: 112 / 14 / 2 = 4x4 merged tokens per window
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "silu",
        "in_channels": 3,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=True,  # 5.x reads this on the outer config
    )


def derive_seed(seed: int, name: str) -> int:
    """A per-model seed from the user's seed: stable across processes (no Python `hash`)."""
    digest = hashlib.sha256(f"finers-rt/tiny/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def perturb_constant_params(model: torch.nn.Module, std: float = PERTURB_STD) -> int:
    """Add N(0, std) noise to every parameter whose default init is a constant.

    Default init sets biases to 0 and norm scales to 1; a parity test against such weights cannot
    see a dropped bias or a swapped norm. Uses the global torch RNG (seeded by the caller).
    Returns the number of tensors changed.
    """
    changed = 0
    for _, param in model.named_parameters():  # tied weights appear once
        if param.numel() > 1 and bool(param.min() == param.max()):
            param.add_(torch.randn(param.shape, dtype=param.dtype) * std)
            changed += 1
    return changed


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _no_progress_bars():
    """Silence transformers' tqdm bars (save_pretrained draws one per shard) for this block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_vlm(out_dir: Path, preset: TinyVLMConfig, seed: int) -> None:
    """Write one random Qwen2.5-VL checkpoint folder (weights, configs, tokenizer, processor)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen25_vl_config(preset)).to(torch.float32).eval()
    n_changed = perturb_constant_params(model)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise RuntimeError("non-finite weights after init")
    with _no_progress_bars():
        model.save_pretrained(out_dir)  # config.json + model.safetensors (fp32, tied lm_head not stored)
    # safetensors 0.8 creates its files with mode 0600; give the weights normal file permissions.
    for weights in out_dir.glob("*.safetensors"):
        weights.chmod(0o644)
    generation = {**GENERATION_CONFIG, "transformers_version": _version("transformers")}
    _write_json(out_dir / "generation_config.json", generation)
    _write_json(out_dir / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    build_qwen_tokenizer(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote %s: %.1fM params, %d constant tensors perturbed", out_dir, n_params / 1e6, n_changed)


def build_sam2_checkpoint(out_dir: Path, seed: int) -> None:
    """Write random SAM2 hiera-t weights as `{"model": state_dict}` (the authors' .pt layout)."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(SAM2_CONFIG, ckpt_path=None, device="cpu")
    n_changed = perturb_constant_params(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    # torch 2.14's zip writer is deterministic: its `.data/serialization_id` is derived from the
    # records' CRC32s (with `compute_crc32`, the default), and the archive folder is the file stem.
    torch.save({"model": model.state_dict()}, out_dir / SAM2_CKPT)
    _write_json(out_dir / "sam2.json", {"config": SAM2_CONFIG, "checkpoint": SAM2_CKPT})
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote %s: %.1fM params, %d constant tensors perturbed", out_dir, n_params / 1e6, n_changed)


def _version(dist: str) -> str:
    return metadata.version(dist)


def _prepare_out(out: Path, parts: tuple[str, ...]) -> None:
    """Clear the parts of a previous make_tiny build; refuse to touch folders it did not write."""
    stale = [out / part for part in parts if (out / part).exists()]
    if stale and not (out / "tiny.json").exists():
        raise FileExistsError(f"{stale[0]} exists and {out} holds no tiny.json: not overwriting it")
    for path in stale:
        shutil.rmtree(path)
    (out / "tiny.json").unlink(missing_ok=True)  # rewritten last: marks a complete build
    out.mkdir(parents=True, exist_ok=True)


def make_tiny(out: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Build `out/gse`, `out/lpr`, `out/sam2` and `out/tiny.json`; return the tiny.json record.

    Deterministic: the same (seed, size) with the same package versions gives the same bytes.
    The caller's torch RNG state is left untouched.
    """
    out, preset = Path(out), TinyVLMConfig.from_name(size)
    parts = ("gse", "lpr", "sam2")
    seeds = {part: derive_seed(seed, part) for part in parts}
    _prepare_out(out, parts)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        build_vlm(out / "gse", preset, seeds["gse"])
        build_vlm(out / "lpr", preset, seeds["lpr"])
        build_sam2_checkpoint(out / "sam2", seeds["sam2"])
    dists = ("torch", "transformers", "tokenizers", "safetensors", "sam2", "qwen-tokenizer")
    record = {
        "seed": seed,
        "size": size,
        "preset": dataclasses.asdict(preset),
        "seeds": seeds,
        "parts": {"gse": "gse", "lpr": "lpr", "sam2": "sam2/sam2.json"},
        "versions": {dist: _version(dist) for dist in dists},
    }
    _write_json(out / "tiny.json", record)
    logger.info("tiny checkpoints (size=%s, seed=%d) in %s after %.1f s", size, seed, out, time.perf_counter() - start)
    return record
