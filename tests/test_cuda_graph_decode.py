"""CUDA-graph decode (`backends.ort_cuda_graph`): the fixed-buffer GQA step checked on the CPU, the
CUDA session/run options checked as data, the refusals; the captured run itself is marked `gpu`.

Expected values come from the existing GQA path (`ort_decode_gqa.GqaSteps`, itself checked against
HF in test_decoder_gqa*.py) on the same exported tiny decoders: the fixed-buffer path must give the
same ids and bit-identical logits (same graph, same kernels; only where the step inputs live and
total_sequence_length = capacity instead of max(seqlens_k) + 1 differ).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from finers_rt.backends import ort_cuda_graph as cg
from finers_rt.backends.ort import CudaGraphEP, cuda_graph_choice, providers_for
from finers_rt.backends.ort_batch import Prompt, greedy_batch
from finers_rt.backends.ort_decode import OrtDecoder

NEW_TOKENS = 12
LENGTHS = (37, 5, 60)  # text prompts of different lengths (a batch of 3 pads to bucket 4)


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """{(dtype, lm_head): decoder.onnx}: the tiny GSE decoder as GQA graphs (export verifies each)."""
    pytest.importorskip("onnxscript", reason="needs the [export] extra")
    from finers_rt.export.onnx_decoder_gqa import export_decoder_gqa

    out = {}
    for dtype, head in (("float32", "fp32"), ("float16", "fp32"), ("float32", "screened")):
        path = tmp_path_factory.mktemp(f"cg_{dtype}_{head}") / "decoder.onnx"
        export_decoder_gqa(tiny_ckpt / "gse", path, dtype=dtype, lm_head=head)
        out[dtype, head] = path
    return out


def _pair(path):
    """(existing-path decoder, fixed-buffer decoder) on the same graph."""
    embed = path.parent / "embed_tokens.npy"
    return OrtDecoder(path, embed), OrtDecoder(path, embed, fixed_steps=True)


def _prompts(decoder) -> list[Prompt]:
    """Text prompts: embeddings of random ids, M-RoPE positions 0..S-1 on all axes, delta 0."""
    rng = np.random.default_rng(0)
    out = []
    for n in LENGTHS:
        ids = rng.integers(0, 150000, n)
        pos = np.broadcast_to(np.arange(n, dtype=np.int64), (3, 1, n)).copy()
        out.append(Prompt(decoder.embed(ids), pos, 0))
    return out


def _step_logits(decoder, prompt: Prompt, steps: int) -> list[np.ndarray]:
    """Logits [1, V] of the prefill and `steps` forced decode steps (fixed token 42)."""
    s = decoder.gqa_steps(1, prompt.embeds.shape[0] + steps + 1)
    out = [np.array(s.prefill(prompt.embeds[None], prompt.position_ids, np.array([prompt.embeds.shape[0]]),
                              np.array([prompt.rope_delta])))]
    for t in range(1, steps + 1):
        out.append(np.array(s.step(np.array([42]), t)))
    return out


@pytest.mark.parametrize("kind", [("float32", "fp32"), ("float16", "fp32"), ("float32", "screened")])
def test_single_greedy_ids_equal_existing_path(exported, kind):
    old, new = _pair(exported[kind])
    assert new.fixed_steps and not new.cuda_graph and not old.fixed_steps
    for p in _prompts(old):
        args = (p.embeds, p.position_ids, p.rope_delta)
        assert new.greedy(*args, max_new_tokens=NEW_TOKENS)[0] == old.greedy(*args, max_new_tokens=NEW_TOKENS)[0]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_step_logits_bit_identical(exported, dtype):
    old, new = _pair(exported[dtype, "fp32"])
    p = _prompts(old)[0]
    for a, b in zip(_step_logits(old, p, 6), _step_logits(new, p, 6)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", [("float32", "fp32"), ("float16", "fp32"), ("float32", "screened")])
@pytest.mark.parametrize("buckets", [None, (1, 2, 4, 8)])
def test_batched_greedy_equals_existing_path(exported, kind, buckets):
    old, new = _pair(exported[kind])
    prompts = _prompts(old)
    ids_old, _ = greedy_batch(old, prompts, max_new_tokens=NEW_TOKENS, buckets=buckets)
    ids_new, info = greedy_batch(new, prompts, max_new_tokens=NEW_TOKENS, buckets=buckets)
    assert ids_new == ids_old and info["rows"] == (4 if buckets else 3)


def test_buffers_allocated_once(exported, monkeypatch):
    """Same data_ptr() of every bound step buffer across steps and across generates of one shape;
    no OrtValue is created per step; new buffers (and a new graph id) only when the KV is reallocated."""
    _, new = _pair(exported["float16", "fp32"])
    p = _prompts(new)[0]
    steps = new.gqa_steps(1, 80)
    steps.prefill(p.embeds[None], p.position_ids, np.array([p.embeds.shape[0]]), np.array([0]))
    values = {**steps.buffers.inputs, **steps.buffers.outputs}
    ptrs = {n: v.data_ptr() for n, v in values.items()}
    kv_ptrs = [v.data_ptr() for v in steps.kv]
    created = []
    real = ort.OrtValue.ortvalue_from_shape_and_type
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", lambda *a, **k: created.append(a) or real(*a, **k))
    for t in range(1, 6):
        steps.step(np.array([7 + t]), t)
        assert {n: v.data_ptr() for n, v in values.items()} == ptrs
        assert [v.data_ptr() for v in steps.kv] == kv_ptrs
    assert created == []
    again = new.gqa_steps(1, 80)  # same rows, capacity within the KV block: same buffers, same graph
    assert again.buffers is steps.buffers and again.step_options is None
    bigger = new.gqa_steps(2, 80)  # another row count: the KV is reallocated, so are the buffers
    assert bigger.buffers is not steps.buffers and bigger.buffers.graph_id != steps.buffers.graph_id
    assert int(bigger.buffers.inputs["total_sequence_length"].numpy()) == new.kv_cache.capacity


def test_cuda_provider_and_run_options_as_data(tmp_path):
    assert cg.graph_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert cg.graph_providers([("CUDAExecutionProvider", {"device_id": "1"})]) == [
        ("CUDAExecutionProvider", {"device_id": "1", "enable_cuda_graph": "1"})]
    ep = providers_for("cuda", "fp16", cuda_graphs=True)
    assert isinstance(ep[0], CudaGraphEP) and ep[1:] == ["CPUExecutionProvider"]
    assert ep[0].for_graph(tmp_path / "gse" / "decoder.onnx") == ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
    assert ep[0].for_graph(tmp_path / "gse" / "vision.onnx") == "CUDAExecutionProvider"
    assert providers_for("cuda", "fp16")[0] == "CUDAExecutionProvider"
    assert cg.run_options(4).get_run_config_entry("gpu_graph_id") == "4"
    assert cg.run_options(None).get_run_config_entry("gpu_graph_id") == "-1"
    with pytest.raises(ValueError, match="0 is ORT's"):
        cg.run_options(0)


def test_graph_ids_one_per_bucket_allocation(exported):
    """Each StepBuffers gets its own gpu_graph_id >= 1; a decoder's step options carry it."""
    _, new = _pair(exported["float16", "fp32"])
    new.cuda_graph = True  # as a CUDA-graph session would set it: only the run options are looked at
    ids = []
    for rows in (1, 2, 4, 8):
        steps = new.gqa_steps(rows, 40)
        assert steps.step_options.get_run_config_entry("gpu_graph_id") == str(steps.buffers.graph_id)
        assert steps.prefill_options.get_run_config_entry("gpu_graph_id") == "-1"
        ids.append(steps.buffers.graph_id)
    assert len(set(ids)) == 4 and min(ids) >= 1


def _manifest(tmp_path, attention, kv):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"decoder_attention": attention, "decoder_kv_dtype": kv}))
    return tmp_path


@pytest.mark.parametrize("attention,kv,device,expected", [
    ("gqa", "float16", "cuda", True), ("gqa", "float16", "cpu", False), ("gqa", "float32", "cuda", False),
    ("onnx", "float32", "cuda", False), ("gqa", "float16", "tensorrt", False)])
def test_default_choice(tmp_path, attention, kv, device, expected):
    assert cuda_graph_choice(_manifest(tmp_path, attention, kv), device, None) is expected
    assert cuda_graph_choice(tmp_path, device, False) is False


@pytest.mark.parametrize("attention,kv,device,message", [
    ("gqa", "float32", "cuda", "float16 GQA decoder"), ("onnx", "float32", "cuda", "need the GQA decoder"),
    ("gqa", "float16", "cpu", "need device='cuda'")])
def test_requested_graphs_that_cannot_run_are_refused(tmp_path, attention, kv, device, message):
    with pytest.raises(ValueError, match=message) as err:
        cuda_graph_choice(_manifest(tmp_path, attention, kv), device, True)
    assert "cuda_graphs=False" in str(err.value)
    with pytest.raises(ValueError, match="need device 'cuda'"):
        providers_for("cpu", cuda_graphs=True)


def test_session_refusing_capture_says_what_to_do(monkeypatch, tmp_path):
    """ORT refuses enable_cuda_graph when a node is not on the CUDA EP (at session creation): the
    error names the fix; without CUDA graphs ORT's error passes through unchanged."""
    from finers_rt.backends import ort_session

    path = tmp_path / "decoder.onnx"
    path.write_bytes(b"")

    def refuse(*_, **__):
        raise RuntimeError("This session cannot use the graph capture feature as requested by the user as all "
                           "compute graph nodes have not been partitioned to the CUDA EP.")

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_session, "_preload_gpu_libraries", lambda: None)
    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(RuntimeError, match="cuda_graphs=False") as err:
        ort_session.open_session(path, [CudaGraphEP(), "CPUExecutionProvider"])
    assert "partitioned to the CUDA EP" in str(err.value) and "--precision fp16 --decoder-attention gqa" in str(err.value)
    with pytest.raises(RuntimeError, match="^This session") as err:
        ort_session.open_session(path, ["CUDAExecutionProvider"])


def test_fixed_steps_refused_on_the_standard_graph(tiny_engines):
    with pytest.raises(ValueError, match="GQA decoder"):
        OrtDecoder(tiny_engines / "gse" / "decoder.onnx", tiny_engines / "gse" / "embed_tokens.npy", fixed_steps=True)


@pytest.fixture(scope="module")
def need_cuda():
    """Skip before the decoders are exported (listed first: same-scope fixtures run in order)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider: install onnxruntime-gpu (extra `gpu`) on a machine with a GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("buckets", [None, (1, 2, 4, 8)])
def test_cuda_graph_decode_equals_uncaptured_cuda(need_cuda, exported, buckets):
    """On CUDA: the captured-graph decode gives the ids of the same graph run without capture,
    single and batched; decode runs replay (graphs captured after the EP's warm-up runs)."""
    path = exported["float16", "fp32"]
    embed = path.parent / "embed_tokens.npy"
    plain = OrtDecoder(path, embed, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    graph = OrtDecoder(path, embed, providers=cg.graph_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert graph.cuda_graph and graph.fixed_steps and not plain.cuda_graph
    prompts = _prompts(plain)
    for _ in range(2):  # the second generate replays the graphs captured in the first
        assert greedy_batch(graph, prompts, max_new_tokens=NEW_TOKENS, buckets=buckets)[0] == \
            greedy_batch(plain, prompts, max_new_tokens=NEW_TOKENS, buckets=buckets)[0]
    p = prompts[0]
    assert graph.greedy(p.embeds, p.position_ids, 0, max_new_tokens=NEW_TOKENS)[0] == \
        plain.greedy(p.embeds, p.position_ids, 0, max_new_tokens=NEW_TOKENS)[0]
