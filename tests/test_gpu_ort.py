"""The `ort` backend on ONNX Runtime's CUDA execution provider (marked `gpu`: skips without one).

Expected values come from the same engine folder on the CPU provider, itself checked against torch
in test_pipeline_ort.py, and from single runs for batches (test_run_batch.py does the same on CPU).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from finers_rt.config import GSE, LPR, PipelineConfig

pytestmark = pytest.mark.gpu

# Masks of the same crop on two providers: fp32 on both, but cuDNN/cuBLAS pick other reductions
# (and TF32 where ORT allows it), so a few pixels on the 0 logit can flip.
MIN_MASK_IOU = 0.99
# Batch 8 vs batch 1 on the GPU: other GEMM kernels, TF32 where the EP allows it; a wrong mask,
# position or cache row is off by > 1e-2 (logits ~1 on the tiny checkpoints).
GPU_BATCH_LOGITS_ATOL = 1e-3
SAME_FIELDS = ("task", "answer", "image_size", "prompts", "texts", "parse", "gse_box", "crop_box",
               "lpr_box", "points", "tokens")


def _need_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider: install onnxruntime-gpu (extra `gpu`) on a machine with a GPU")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def pipes(request):
    _need_cuda()  # before the tiny engines (minutes on a CPU) are built
    from finers_rt.pipeline import Pipeline

    tiny_engines = request.getfixturevalue("tiny_engines")
    cfg = PipelineConfig(gse=dataclasses.replace(GSE, max_new_tokens=128),
                         lpr=dataclasses.replace(LPR, max_new_tokens=128))
    return (Pipeline.from_engines(tiny_engines, device="cpu", config=cfg),
            Pipeline.from_engines(tiny_engines, device="cuda", config=cfg))


def test_cuda_runs_every_graph_on_the_gpu(pipes):
    _, gpu = pipes
    sessions = [gpu.gse.generator.vision.session, gpu.gse.generator.decoder.session,
                gpu.lpr.generator.decoder.session]
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions)
    assert gpu.lpr.generator.batch_buckets, "GPU generators run batch-size buckets"


def test_cuda_kv_cache_stays_on_the_device(pipes):
    _, gpu = pipes
    dec = gpu.lpr.generator.decoder
    rng = np.random.default_rng(0)
    embeds = rng.normal(0, 0.02, (12, dec.table.shape[1])).astype(np.float32)
    positions = np.broadcast_to(np.arange(12), (3, 1, 12)).copy()
    ids, _ = dec.greedy(embeds, positions, 0, max_new_tokens=6)
    assert 1 <= len(ids) <= 6 and dec.device == "cuda"


def test_cuda_pipeline_matches_cpu(pipes):
    from test_run_batch import REQUESTS

    cpu, gpu = pipes
    for i, r in enumerate(REQUESTS[:2]):  # fully forced: every stage runs, outputs are scripted
        a = cpu.run(r.image, r.question, task=r.task, options=r.options, force_output=r.force_output)
        b = gpu.run(r.image, r.question, task=r.task, options=r.options, force_output=r.force_output)
        for name in SAME_FIELDS:
            assert getattr(b, name) == getattr(a, name), f"request {i}: {name}"
        assert a.mask.any() and _iou(a.mask, b.mask) >= MIN_MASK_IOU, f"request {i}: mask IoU {_iou(a.mask, b.mask)}"


def test_cuda_left_padded_batch_logits_equal_batch1(pipes):
    """Prefill + 3 steps of 4 prompts in a bucket of 8 (4 dummy rows) == each batch-1 run."""
    from test_run_batch import PROMPT_SHAPES, _batched_steps, _prompt, _single_steps

    dec = pipes[1].gse.generator.decoder
    rng = np.random.default_rng(0)
    prompts = [_prompt(dec, rng, *shape) for shape in PROMPT_SHAPES]
    single = [_single_steps(dec, p, 3) for p in prompts]
    batched = _batched_steps(dec, prompts, [tok for _, tok in single], 3, rows=8)
    for r, (logits, _) in enumerate(single):
        for t in range(4):
            diff = np.abs(batched[t][r] - logits[t]).max()
            assert diff <= GPU_BATCH_LOGITS_ATOL, f"row {r} step {t}: max abs diff {diff:.3g}"


def test_cuda_run_batch_with_buckets_equals_single_runs(pipes):
    """4 requests in buckets on the GPU == 4 single GPU runs, for every scripted output.

    Request 2's LPR and request 3's GSE decode freely on random weights, whose logits are nearly
    flat: batch-4 and batch-1 GEMMs round differently on the GPU (test above), which can flip a
    near-tie argmax after a few tokens, so only request 2's scripted GSE part is compared exactly.
    """
    from test_run_batch import REQUESTS

    _, gpu = pipes
    singles = [gpu.run(r.image, r.question, task=r.task, options=r.options, force_output=r.force_output)
               for r in REQUESTS]
    batched = gpu.run_batch(REQUESTS)
    assert len(batched) == len(singles)
    for i, (a, b) in enumerate(zip(singles, batched)):
        if i == 2:
            assert (b.texts["gse"], b.gse_box, b.crop_box) == (a.texts["gse"], a.gse_box, a.crop_box)
        if i >= 2:
            continue
        for name in SAME_FIELDS:
            assert getattr(b, name) == getattr(a, name), f"request {i}: {name}"
        assert np.array_equal(a.mask, b.mask), f"request {i}: mask"


# --------------------------------------------------------------------- GQA decoder on CUDA


def test_cuda_refuses_a_float32_gqa_decoder(request, tmp_path):
    """ORT's CUDA GroupQueryAttention is fp16/bf16 only: a float32 GQA graph would run its attention
    on the CPU (measured on an H100: GSE decode 1.60 s vs 0.71 s for the standard graph)."""
    _need_cuda()
    from finers_rt.backends.ort_decode import OrtDecoder
    from finers_rt.export.engine import export_engines

    export_engines(request.getfixturevalue("tiny_ckpt"), tmp_path / "engines", overwrite=True, progress=False,
                   decoder_attention="gqa")
    stage = tmp_path / "engines" / "lpr"
    with pytest.raises(ValueError, match="float16/bfloat16 only"):
        OrtDecoder(stage / "decoder.onnx", stage / "embed_tokens.npy",
                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
