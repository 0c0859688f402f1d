"""`Generator` on a TensorRT-LLM *engine* (tensorrt-llm==1.2.1 C++ runtime, `ModelRunnerCpp`).

The engine is the Qwen2.5-VL language model built by `finers-rt export --target trtllm-engine`
(`export.trtllm_engine.export_trtllm_engine`: ENGINES/{gse,lpr}/engine, qwen_type qwen2_vl). The
vision tower is not in it: it runs on our own vision graph (`OrtVision`, `vision.onnx` of an ort
engine folder from `finers-rt export`), preprocessed by `qwen_vision_host`, so coordinates mean
what they mean on every backend. Its embeddings enter the engine as the prompt table.

Inputs reproduce what 1.2.1's own Qwen2-VL runner feeds the engine
(`tensorrt_llm/runtime/multimodal_model_runner.py`: `setup_fake_prompts_qwen2vl`, `ptuning_setup`,
`generate`; it always runs the LLM on `ModelRunnerCpp`, session "cpp_llm_only"):
  - input_ids: every <|image_pad|> replaced by a fake prompt-table id, the k-th by vocab_size + k;
  - prompt_table (1, n_image, hidden) in the engine dtype, prompt_tasks "0";
  - MropeParams(mrope_rotary_cos_sin (B, max_positions * head_dim) float32,
    mrope_position_deltas (B, 1) int32), cos/sin from
    `RopeEmbeddingUtils.create_sinusoidal_positions_for_attention_plugin` gathered at HF's
    `get_rope_index` positions (ours: `qwen_rope.rope_index`), zero-padded to max_positions;
  - end_id <|im_end|>, pad_id <|endoftext|>, greedy (top_k 1, temperature 1, penalty 1).
The builders below are pure numpy (tests/test_trtllm_engine_runtime.py); only
`TrtllmEngineGenerator` imports tensorrt_llm and torch.
Forced outputs: a logits post-processor registered with `ModelRunnerCpp.from_dir(
logits_processor_map=...)` and selected per request by `generate(logits_processor_names=...)`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..config import ENDOFTEXT_ID, IM_END_ID, IMAGE_PAD_ID
from ..prompts import render_chat
from ..qwen_rope import rope_index
from ..vlm import Generation
from .ort_vlm import expand_image_pad  # the one <|image_pad|> -> n image tokens, as ort does
from .trtllm_vlm import STOP_IDS, require_trtllm

FORCE_PROCESSOR = "finers_force"  # name of the forced-output logits post-processor


@dataclass(frozen=True)
class RopeArch:
    """What the M-RoPE inputs need from the stage's HF config.json (4.x flat or 5.x nested)."""

    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, ...]  # rotary pairs per (t, h, w) axis; sums to head_dim / 2
    max_positions: int  # the engine's max_position_embeddings: length of the cos/sin table
    image_token_id: int = IMAGE_PAD_ID
    spatial_merge_size: int = 2

    @classmethod
    def from_config(cls, config: dict) -> RopeArch:
        # the converter's config reader (pure python, numpy only)
        from ..export.trtllm_engine import TextArch

        arch = TextArch.from_config(config)
        vision = config.get("vision_config", {})
        return cls(arch.head_dim, arch.rope_theta, tuple(arch.mrope_section), arch.max_positions,
                   config.get("image_token_id", IMAGE_PAD_ID), vision.get("spatial_merge_size", 2))


def fake_prompt_ids(input_ids: np.ndarray, image_token_id: int, vocab_size: int) -> np.ndarray:
    """(S,) int32: the k-th image token (k = 0, 1, ...) becomes vocab_size + k, i.e. row k of the
    prompt table (1.2.1: `values = vocab_size - 1 + cumsum(mask)`); text ids unchanged."""
    ids = np.asarray(input_ids, dtype=np.int64).copy()
    mask = ids == image_token_id
    ids[mask] = vocab_size - 1 + np.cumsum(mask)[mask]
    return ids.astype(np.int32)


def rotary_table(max_positions: int, head_dim: int, theta: float) -> np.ndarray:
    """(max_positions, head_dim / 2, 2) float32 (cos, sin), computed as 1.2.1's
    `create_sinusoidal_positions_for_attention_plugin` (scale 1; mrope applies no scaling):
    inv_freq in float32 from a float64 power, angles = float32 einsum."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    angles = np.einsum("i,j->ij", np.arange(max_positions, dtype=np.float32), inv_freq, dtype=np.float32)
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def mrope_cos_sin(position_ids: np.ndarray, table: np.ndarray, mrope_section) -> np.ndarray:
    """(B, max_positions * head_dim) float32, the runner's `concat_cos_sin`.

    position_ids: (3, B, S) int (t, h, w); positions past S are 0, as the runner zero-pads to
    max_positions. Pair j of head_dim / 2 takes its angle from the axis owning its mrope_section
    slice; the last axis interleaves (cos, sin) per pair.
    """
    three, batch, seq = position_ids.shape
    max_positions, half, _ = table.shape
    if sum(mrope_section) != half:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {half}")
    padded = np.zeros((batch, three, max_positions), np.int64)
    padded[:, :, :seq] = np.transpose(position_ids, (1, 0, 2))
    axis = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)  # (half,) axis of each pair
    gathered = table[padded[:, axis, :], np.arange(half)[None, :, None]]  # (B, half, P, 2)
    return np.ascontiguousarray(gathered.transpose(0, 2, 1, 3)).reshape(batch, -1)


@dataclass(frozen=True)
class EngineInputs:
    """Everything `ModelRunnerCpp.generate` gets for one request (numpy, batch of 1)."""

    input_ids: np.ndarray  # (S,) int32 with fake prompt-table ids
    prompt_table: np.ndarray  # (1, n_image, hidden) float32, vision embeddings in raster order
    mrope_cos_sin: np.ndarray  # (1, max_positions * head_dim) float32
    mrope_deltas: np.ndarray  # (1, 1) int32: max position + 1 - S


def engine_inputs(ids: np.ndarray, image_embeds: np.ndarray, grid, arch: RopeArch, vocab_size: int,
                  table: np.ndarray | None = None) -> EngineInputs:
    """ids: (S,) expanded prompt; image_embeds: (n_image, hidden); grid (1, gh, gw) in patches."""
    positions, delta = rope_index(ids, np.asarray([grid]), image_token_id=arch.image_token_id,
                                  spatial_merge_size=arch.spatial_merge_size)
    if table is None:
        table = rotary_table(arch.max_positions, arch.head_dim, arch.rope_theta)
    return EngineInputs(
        input_ids=fake_prompt_ids(ids, arch.image_token_id, vocab_size),
        prompt_table=np.ascontiguousarray(image_embeds[None], dtype=np.float32),
        mrope_cos_sin=mrope_cos_sin(positions, table, arch.mrope_section),
        mrope_deltas=np.array([[delta]], np.int32))


def generate_kwargs(max_new_tokens: int, forced: bool) -> dict:
    """The non-tensor `ModelRunnerCpp.generate` keywords: the reference's greedy decode."""
    kwargs = {"max_new_tokens": max_new_tokens, "end_id": IM_END_ID, "pad_id": ENDOFTEXT_ID,
              "stop_words_list": [[[ENDOFTEXT_ID]]], "top_k": 1, "top_p": 0.0, "temperature": 1.0,
              "repetition_penalty": 1.0, "num_beams": 1, "prompt_tasks": "0",
              "return_dict": True, "output_sequence_lengths": True}
    if forced:
        kwargs["logits_processor_names"] = [FORCE_PROCESSOR]
    return kwargs


def new_ids(output_ids: np.ndarray, sequence_length: int, input_length: int, max_new_tokens: int) -> list[int]:
    """Generated ids of sequence 0: output_ids (max_seq_len,) holds input + output, padded with
    end_id; the stop token kept as HF/ort return it (appended when the runtime dropped it)."""
    ids = [int(t) for t in output_ids[input_length:sequence_length]]
    if len(ids) < max_new_tokens and (not ids or ids[-1] not in STOP_IDS):
        ids.append(IM_END_ID)
    return ids


class ForcedScript:
    """Logits post-processor (executor signature): step k keeps only the script's k-th logit.
    One instance is registered at load; `start(ids)` arms it for the next request."""

    def __init__(self):
        self.token_ids, self.step = [IM_END_ID], 0

    def start(self, token_ids: list[int]) -> None:
        self.token_ids, self.step = list(token_ids) + [IM_END_ID], 0

    def __call__(self, req_id, logits, token_ids, stream_ptr, client_id=None) -> None:
        import torch

        token = self.token_ids[min(self.step, len(self.token_ids) - 1)]
        self.step += 1
        with torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr)):
            keep = logits[..., token].clone()
            logits.fill_(float("-inf"))
            logits[..., token] = keep


class TrtllmEngineGenerator:
    """Greedy Qwen2.5-VL: vision on `vision` (OrtVision-like: prepare/run_prepared), language model
    on the TensorRT-LLM engine in `engine_dir`; `stage_dir`: the ort stage folder (tokenizer.json,
    config.json) the vision graph came from."""

    device = "cuda"  # where the prompt table is handed over (the runner's own examples pass CUDA tensors)

    def __init__(self, engine_dir: str | Path, stage_dir: str | Path, vision, *,
                 kv_cache_free_gpu_memory_fraction: float = 0.85):
        require_trtllm()
        from tensorrt_llm.runtime import ModelRunnerCpp

        stage_dir = Path(stage_dir)
        self.vision = vision
        self.tokenizer = Tokenizer.from_file(str(stage_dir / "tokenizer.json"))
        self.arch = RopeArch.from_config(json.loads((stage_dir / "config.json").read_text()))
        self.table = rotary_table(self.arch.max_positions, self.arch.head_dim, self.arch.rope_theta)
        self.force = ForcedScript()
        self.runner = ModelRunnerCpp.from_dir(
            str(engine_dir), kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            logits_processor_map={FORCE_PROCESSOR: self.force})

    def inputs(self, image: np.ndarray, user_text: str) -> tuple[str, EngineInputs, float]:
        """(prompt, engine inputs, vision ms) for one stage image and question."""
        prompt = render_chat(user_text)
        feeds, reverse, grid = self.vision.prepare(image)
        t0 = time.perf_counter()
        embeds = self.vision.run_prepared(feeds, reverse)
        vision_ms = (time.perf_counter() - t0) * 1e3
        ids = expand_image_pad(np.asarray(self.tokenizer.encode(prompt, add_special_tokens=False).ids), len(embeds))
        vocab = self.runner.model_config.vocab_size  # the engine's: the runner's fake ids start there
        return prompt, engine_inputs(ids, embeds, grid, self.arch, vocab, self.table), vision_ms

    def generate(self, image: np.ndarray, user_text: str, *, max_new_tokens: int, forced_text=None):
        import torch
        from tensorrt_llm.layers import MropeParams

        t0 = time.perf_counter()
        prompt, x, vision_ms = self.inputs(image, user_text)
        if forced_text is not None:
            self.force.start(self.tokenizer.encode(forced_text, add_special_tokens=False).ids)
        dtype = getattr(torch, str(self.runner.model_config.dtype))  # "float16" | "bfloat16": the engine dtype
        mrope = MropeParams(mrope_rotary_cos_sin=torch.from_numpy(x.mrope_cos_sin),
                            mrope_position_deltas=torch.from_numpy(x.mrope_deltas))
        t1 = time.perf_counter()
        out = self.runner.generate(
            [torch.from_numpy(x.input_ids)], prompt_table=torch.from_numpy(x.prompt_table).to(self.device, dtype),
            mrope_params=mrope, **generate_kwargs(max_new_tokens, forced_text is not None))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        seq_len = int(out["sequence_lengths"][0, 0])
        ids = new_ids(out["output_ids"][0, 0].cpu().numpy(), seq_len, len(x.input_ids), max_new_tokens)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        timings = {"preprocess": (t1 - t0) * 1e3 - vision_ms, "vision": vision_ms,
                   "prefill": float("nan"), "decode": (t2 - t1) * 1e3}  # prefill inside the C++ call
        return Generation(text=text, token_ids=ids, prompt=prompt, timings_ms=timings)

    def close(self) -> None:
        self.runner, self.vision = None, None


TRTLLM_MANIFEST = "trtllm_manifest.json"  # written by export_llmapi and export_trtllm_engine


def check_trtllm_folders(engine_dir: str | Path, ort_engines: str | Path) -> tuple[dict, dict]:
    """(trtllm manifest, ort manifest) after the checks that need no GPU: both manifests present,
    a known kind, engines built (trtllm-engine), and both folders made from the same gse/lpr
    checkpoints (`source_hash` vs the ort manifest's `sources`)."""
    from ..manifest import MANIFEST

    engine_dir, ort_engines = Path(engine_dir), Path(ort_engines)
    path, ort_path = engine_dir / TRTLLM_MANIFEST, ort_engines / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: make --engines with `finers-rt export --target trtllm` "
                                "or `--target trtllm-engine`")
    if not ort_path.is_file():
        raise FileNotFoundError(f"{ort_path} is missing: --ort-engines is the folder of `finers-rt export` "
                                "(SAM2 and, for trtllm-engine, the vision graphs)")
    manifest, ort = json.loads(path.read_text()), json.loads(ort_path.read_text())
    if manifest.get("kind") not in ("trtllm-llmapi", "trtllm-engine"):
        raise ValueError(f"{path}: unknown kind {manifest.get('kind')!r}")
    for stage, entry in manifest["stages"].items():
        if manifest["kind"] == "trtllm-engine" and not entry.get("built"):
            raise RuntimeError(f"{engine_dir / stage}: engine not built; on the GPU machine run:\n  "
                               + "\n  ".join(entry["commands"]))
        if ort.get("sources", {}).get(stage) != entry["source_hash"]:
            raise ValueError(f"{engine_dir} and {ort_engines} come from different {stage} checkpoints: "
                             f"re-export one of them from the same --checkpoints")
    return manifest, ort


def load_trtllm(engine_dir: str | Path, ort_engines: str | Path, device: str = "cuda"):
    """(gse Generator, lpr Generator, SAM2 predictor, trtllm manifest) for the trtllm backend.

    engine_dir: `finers-rt export --target trtllm` (LLM API folders, `TrtllmGenerator`) or
    `--target trtllm-engine` (engines, `TrtllmEngineGenerator` with the ort vision graph);
    ort_engines: an ort engine folder from `finers-rt export` of the same checkpoints, whose sam2/
    (and vision.onnx) run on ONNX Runtime with `device`'s providers.
    """
    require_trtllm()  # first: without TensorRT-LLM nothing else matters
    from .ort import checked_providers
    from .ort_sam2 import OrtSAM2
    from .ort_vision import OrtVision
    from .trtllm_vlm import TrtllmGenerator

    engine_dir, ort_engines = Path(engine_dir), Path(ort_engines)
    manifest, _ = check_trtllm_folders(engine_dir, ort_engines)
    providers, _ = checked_providers(ort_engines, device)
    stages = []
    for stage in ("gse", "lpr"):
        if manifest["kind"] == "trtllm-llmapi":
            stages.append(TrtllmGenerator(engine_dir / stage))
        else:
            vision = OrtVision(ort_engines / stage / "vision.onnx", providers=providers)
            stages.append(TrtllmEngineGenerator(engine_dir / stage / "engine", ort_engines / stage, vision))
    return stages[0], stages[1], OrtSAM2(ort_engines / "sam2", providers=providers), manifest
