"""`Generator` on the TensorRT-LLM LLM API (PyTorch backend, tensorrt-llm==1.2.1) for GSE and LPR.

Loads a folder written by `finers-rt export --target trtllm` (`export.trtllm_quant.export_llmapi`:
the HF checkpoint with a flat 4.x config.json, optionally FP8 / INT4-AWQ via ModelOpt).

Fed with finers-rt's own preprocessing, so coordinates mean what they mean on every backend:
  - prompt: `render_chat(user_text)` with its one <|image_pad|>, the chat text ort and torch use;
  - image: `qwen_vision_host.resize_for_vision` (PIL BICUBIC to the smart_resize size) rescaled by
    our table, handed over as a float (3, h, w) tensor with `do_resize=False`. TensorRT-LLM's
    Qwen2-VL input processor always runs HF's processor (`_preprocess`: `processor(text=[prompt],
    images=..., do_rescale=False` for tensors, `**mm_processor_kwargs)`); with resize and rescale
    off it only normalises and patchifies: bit-identical to `qwen_vision_host.pixel_values` and to
    the torch backend's HF processor. It expands the placeholder to `OrtGenerator._prompt_ids`'s
    ids and computes HF's M-RoPE positions, i.e. `qwen_rope.rope_index` (tests/test_trtllm.py).
Not `prompt_token_ids` + `multi_modal_data`: for VLMs `LLM.generate_async` decodes such ids back
to text and re-processes it, so an already expanded prompt would be expanded twice.
Forced outputs: a per-request logits processor (`SamplingParams.logits_processor`, supported by
the PyTorch backend) masks every logit but the scripted token; the model still runs every step.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..config import ENDOFTEXT_ID, IM_END_ID
from ..prompts import render_chat
from ..qwen_vision_host import VisionPreprocessConfig, resize_for_vision
from ..vlm import Generation
from . import BackendUnavailable

log = logging.getLogger(__name__)

TRTLLM_PIN = "tensorrt-llm==1.2.1"
STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)


def require_trtllm():
    """Import tensorrt_llm or raise BackendUnavailable with the install command."""
    try:
        import tensorrt_llm
    except ImportError as e:
        raise BackendUnavailable(
            f"the trtllm backend needs TensorRT-LLM ({e}). On an NVIDIA GPU machine: pip install "
            f"'finers-rt[trtllm]' ({TRTLLM_PIN}, wheels from https://pypi.nvidia.com), or run inside "
            "nvcr.io/nvidia/tensorrt-llm/release:1.2.1 with `pip install --no-deps -e .`") from e
    return tensorrt_llm


@dataclass(frozen=True)
class TrtllmConfig:
    """LLM API knobs (tensorrt_llm.LLM / llmapi.KvCacheConfig / llmapi.CudaGraphConfig)."""

    max_batch_size: int = 4
    max_seq_len: int = 4608  # GSE at 1920x1080: ~2,900 prompt tokens + 1,024 new
    max_num_tokens: int = 16384  # one step's token budget; a GSE image is 10,764 vision patches
    free_gpu_memory_fraction: float = 0.85  # KV cache share of the memory left after weights
    enable_block_reuse: bool = True  # several questions on one frame reuse the image's KV prefix
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4)  # decode steps replayed as CUDA graphs
    dtype: str = "auto"


def rescaled_image(image: np.ndarray, cfg: VisionPreprocessConfig) -> np.ndarray:
    """(H, W, 3) uint8 stage image -> (3, h, w) float32 in [0, 1] at the smart_resize size, each
    value HF's `float32(level * rescale_factor)` (rescale in float64, then cast)."""
    resized = resize_for_vision(image, cfg)
    table = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    return np.ascontiguousarray(table[resized].transpose(2, 0, 1))


def llm_request(image: np.ndarray, user_text: str, cfg: VisionPreprocessConfig) -> dict:
    """The `tensorrt_llm.inputs.TextPrompt` for one stage image and question."""
    import torch

    return {
        "prompt": render_chat(user_text),
        "multi_modal_data": {"image": [torch.from_numpy(rescaled_image(image, cfg))]},
        "mm_processor_kwargs": {"do_resize": False},  # already at the smart_resize size
    }


class ForceTokens:
    """Teacher forcing as a TensorRT-LLM per-request logits processor (picklable, no state shared
    with the caller): call k sets every logit to -inf except the script's k-th token."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = list(token_ids) + [IM_END_ID]
        self.step = 0

    def __call__(self, req_id, logits, token_ids, stream_ptr, client_id) -> None:
        token = self.token_ids[min(self.step, len(self.token_ids) - 1)]
        self.step += 1
        keep = logits[..., token].clone()
        logits.fill_(float("-inf"))
        logits[..., token] = keep


def sampling_kwargs(max_new_tokens: int, forced_ids: list[int] | None = None) -> dict:
    """SamplingParams fields for the reference's greedy decode. Everything is explicit so nothing
    is inherited from generation_config.json (Qwen2.5-VL-Instruct's says repetition_penalty 1.05):
    top_k=1 is greedy (`SamplingParams._greedy_decoding`), temperature/penalty neutral."""
    kwargs = {
        "max_tokens": max_new_tokens, "end_id": IM_END_ID, "pad_id": ENDOFTEXT_ID,
        "stop_token_ids": [ENDOFTEXT_ID], "top_k": 1, "temperature": 1.0, "repetition_penalty": 1.0,
        "detokenize": False, "return_perf_metrics": True,
    }
    if forced_ids is not None:
        kwargs["logits_processor"] = ForceTokens(forced_ids)
    return kwargs


def output_ids(completion) -> list[int]:
    """A CompletionOutput's new ids with the stop token kept, as HF generate and ort return them
    (TensorRT-LLM drops end_id / stop ids from `token_ids`)."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and (not ids or ids[-1] not in STOP_IDS):
        reason = completion.stop_reason
        ids.append(reason if isinstance(reason, int) else IM_END_ID)
    return ids


def _split_ms(completion, total_ms: float) -> dict[str, float]:
    """prefill / decode from the request's perf metrics (timedeltas); vision runs inside the
    context step and is not separable (NaN)."""
    t = getattr(getattr(completion, "request_perf_metrics", None), "timing_metrics", None)
    try:
        first = (t.first_token_time - t.arrival_time).total_seconds() * 1e3
        last = (t.last_token_time - t.first_token_time).total_seconds() * 1e3
    except AttributeError:
        log.debug("no request_perf_metrics: decode holds the whole generate call")
        first, last = math.nan, total_ms
    return {"vision": math.nan, "prefill": first, "decode": last}


class TrtllmGenerator:
    """Greedy Qwen2.5-VL generation on `tensorrt_llm.LLM` for one stage folder."""

    def __init__(self, stage_dir: str | Path, *, config: TrtllmConfig = TrtllmConfig()):
        tllm = require_trtllm()
        from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

        stage_dir = Path(stage_dir)
        self.vision_cfg = VisionPreprocessConfig.from_checkpoint(stage_dir)
        self.tokenizer = Tokenizer.from_file(str(stage_dir / "tokenizer.json"))
        self._sampling_params = tllm.SamplingParams
        self.llm = tllm.LLM(
            model=str(stage_dir), dtype=config.dtype, max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens,
            kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=config.free_gpu_memory_fraction,
                                          enable_block_reuse=config.enable_block_reuse),
            cuda_graph_config=CudaGraphConfig(batch_sizes=list(config.cuda_graph_batch_sizes), enable_padding=True),
        )

    def generate(self, image: np.ndarray, user_text: str, *, max_new_tokens: int, forced_text=None):
        t0 = time.perf_counter()
        request = llm_request(image, user_text, self.vision_cfg)
        forced = None if forced_text is None else self.tokenizer.encode(forced_text, add_special_tokens=False).ids
        params = self._sampling_params(**sampling_kwargs(max_new_tokens, forced))
        t1 = time.perf_counter()
        completion = self.llm.generate(request, sampling_params=params, use_tqdm=False).outputs[0]
        t2 = time.perf_counter()
        ids = output_ids(completion)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        timings = {"preprocess": (t1 - t0) * 1e3, **_split_ms(completion, (t2 - t1) * 1e3)}
        return Generation(text=text, token_ids=ids, prompt=request["prompt"], timings_ms=timings)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
        self.llm = None
