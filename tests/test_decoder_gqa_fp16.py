"""The float16 GQA decoder (`export_decoder_gqa(dtype="float16")`): float16 weights, activations and
KV-cache IO (the GPU graph), float32 embeddings in and logits out.

Expected values come from HF transformers in float32 (generate, or the text model on the whole
sequence), never from the code under test. ORT 1.31.1's CPU provider has float16 kernels for every
op of the graph (GroupQueryAttention included), so all of this runs on the CPU; the CUDA decision is
tested on its function, not a session.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [export] extra")
pytest.importorskip("onnxscript", reason="needs the [export] extra")

from test_decoder_onnx import IMAGE_PROMPTS, STOP_IDS, _hf_inputs, _merged_embeds

from finers_rt.backends.ort_batch import Prompt, greedy_batch
from finers_rt.backends.ort_decode import OrtDecoder
from finers_rt.backends.ort_decode_gqa import GqaSteps, check_gqa_device
from finers_rt.config import ENDOFTEXT_ID, IM_END_ID
from finers_rt.qwen_rope import rope_index
from finers_rt.specs import decoder_gqa_spec_from_config, decoder_spec_from_config

NEW_TOKENS = 16  # per prompt: a short generation (the tiny model's steps take ~ms)
FORCED = [9707, 1879, 0, 11, 151652, 42]  # fed tokens that are not the argmax (as test_decoder_gqa)


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """{dtype: (decoder.onnx path, verification report)}: the tiny GSE decoder exported as the GQA
    graph in float16 and float32 (each verified against HF float32 by the exporter)."""
    from finers_rt.export.onnx_decoder_gqa import export_decoder_gqa

    out = {}
    for dtype in ("float16", "float32"):
        path = tmp_path_factory.mktemp(f"gqa_{dtype}") / "decoder.onnx"
        out[dtype] = path, export_decoder_gqa(tiny_ckpt / "gse", path, dtype=dtype)
    return out


@pytest.fixture(scope="module")
def decoder(exported):
    path, _ = exported["float16"]
    return OrtDecoder(path, path.parent / "embed_tokens.npy")


@pytest.fixture(scope="module")
def prompts(hf):
    """(Prompt, HF float32 generate ids, smallest top-1 minus top-2 logit along HF's path) per
    IMAGE_PROMPTS entry."""
    model, processor = hf
    out = []
    for size, question in IMAGE_PROMPTS:
        inputs = _hf_inputs(processor, size, question)
        with torch.no_grad():
            gen = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=STOP_IDS,
                                 repetition_penalty=1.0, pad_token_id=ENDOFTEXT_ID, temperature=None, top_p=None,
                                 top_k=None, output_logits=True, return_dict_in_generate=True)
        top2 = torch.stack(gen.logits)[:, 0].topk(2, dim=-1).values  # [steps, 2]
        ids = inputs["input_ids"][0].numpy()
        positions, delta = rope_index(ids, inputs["image_grid_thw"].numpy())
        prompt = Prompt(_merged_embeds(model, inputs), positions, delta)
        out.append((prompt, gen.sequences[0, len(ids):].tolist(), float((top2[:, 0] - top2[:, 1]).min())))
    return out


def test_export_verified_against_hf_float32(exported, tiny_ckpt):
    """The exporter's own check (prefill S = 300 + 5 decode steps vs HF float32) passes at the spec's
    float16 tolerance; the float32 graph keeps its own (unchanged) one."""
    config = json.loads((tiny_ckpt / "gse" / "config.json").read_text())
    for dtype, atol in (("float16", 0.25), ("float32", 1e-3)):
        _, report = exported[dtype]
        spec = decoder_gqa_spec_from_config(config, kv_dtype=dtype)
        assert spec.atol == report["atol"] == atol and report["dtype"] == dtype
        assert report["max_abs_diff"] <= atol and report["argmax_equal"] and report["argmax_steps_equal"] == "6/6"
    # measured 4.0e-4 on these weights (float32: 3e-7): far inside the atol, which is sized for real checkpoints
    assert exported["float16"][1]["max_abs_diff"] < 2e-3


def test_fp16_error_is_float16_rounding(hf, decoder, prompts):
    """Scale-free check of the float16 graph: feeding a script through the in-place cache, its logits
    are no further from HF float32 than HF's own float16 model (`.half()`) is (measured 0.5-0.7x)."""
    model, _ = hf
    prompt, _, _ = prompts[2]
    seq = prompt.embeds.shape[0]
    steps = GqaSteps(decoder, 1, seq + len(FORCED))
    got = [steps.prefill(prompt.embeds[None], prompt.position_ids, np.array([seq]),
                         np.array([prompt.rope_delta])).copy()]
    got += [steps.step([token], t).copy() for t, token in enumerate(FORCED, start=1)]

    embeds = np.concatenate([prompt.embeds, decoder.embed(FORCED)])[None]
    decode_pos = np.arange(seq, seq + len(FORCED)) + prompt.rope_delta
    positions = torch.from_numpy(np.concatenate([prompt.position_ids, np.broadcast_to(decode_pos, (3, 1, len(FORCED)))], 2))
    expected = {}
    for dtype, m in ((torch.float32, model), (torch.float16, copy.deepcopy(model).half())):  # fixture left float32
        with torch.no_grad():
            hidden = m.model.language_model(inputs_embeds=torch.from_numpy(embeds).to(dtype),
                                            position_ids=positions).last_hidden_state
            expected[dtype] = m.lm_head(hidden[0, seq - 1:]).float().numpy()  # [1 + len(FORCED), V]
    ours = np.abs(np.concatenate(got) - expected[torch.float32]).max()
    hf_half = np.abs(expected[torch.float16] - expected[torch.float32]).max()
    assert 0 < ours <= 1.5 * hf_half, (ours, hf_half)
    assert (np.concatenate(got).argmax(1) == expected[torch.float32].argmax(1)).all()


def test_kv_io_is_float16_and_bound_to_the_op(exported, tiny_ckpt):
    """past_*/present_* are float16 graph IO wired straight into/out of GroupQueryAttention (no Cast
    between the bound cache and the op); inputs_embeds and logits stay float32; IO = the spec."""
    import onnx

    path, _ = exported["float16"]
    graph = onnx.load(str(path)).graph
    io = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    spec = decoder_gqa_spec_from_config(json.loads((tiny_ckpt / "gse" / "config.json").read_text()), kv_dtype="float16")
    assert [v.name for v in graph.input] == spec.input_names and [v.name for v in graph.output] == spec.output_names
    for t in (*spec.inputs, *spec.outputs):
        assert io[t.name] == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), t.name
    kv = [n for n in io if n.startswith(("past_", "present_"))]
    assert len(kv) == 8 and all(io[n] == onnx.TensorProto.FLOAT16 for n in kv)
    assert io["inputs_embeds"] == io["logits"] == onnx.TensorProto.FLOAT
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert [(n.input[3], n.input[4], n.output[1], n.output[2]) for n in gqa] == [
        (f"past_key_{i}", f"past_value_{i}", f"present_key_{i}", f"present_value_{i}") for i in range(2)]
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert not any(set(kv) & {*n.input, *n.output} for n in casts)
    weights = {t.data_type for t in graph.initializer if "weight" in t.name or "bias" in t.name}
    assert weights == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize("index", range(len(IMAGE_PROMPTS)), ids=["6x8", "10x4", "16x12"])
def test_greedy_matches_hf_float32_generate(decoder, prompts, index):
    """Greedy ids of the float16 graph on the CPU equal HF float32 generate's. Meaningful only while
    HF's top-1 beats its top-2 by far more than the float16 error (4e-4 here): the margin is checked
    first, so a near-tie in these random weights fails loudly here instead of as an id mismatch."""
    prompt, expected, margin = prompts[index]
    assert margin > 10 * 2e-3, f"near-tie on HF's path (top-1 - top-2 = {margin:.2g}): compare logits instead"
    ids, _ = decoder.greedy(prompt.embeds, prompt.position_ids, prompt.rope_delta, max_new_tokens=NEW_TOKENS)
    assert ids == expected


def test_greedy_batch_equals_hf(decoder, prompts):
    """3 right-padded prompts in one batch on the float16 cache: per-row ids equal HF generate's."""
    ids, timings = greedy_batch(decoder, [p for p, _, _ in prompts], max_new_tokens=NEW_TOKENS)
    assert timings["rows"] == 3 and ids == [e for _, e, _ in prompts]
    assert decoder.kv_cache.values[0].data_type() == "tensor(float16)"


def test_kv_cache_is_float16_and_bound_in_place(decoder, prompts):
    """The cache OrtValues are float16; present_* come back in the very buffers bound as past_*, every
    step; a later generate reuses them."""
    prompt, _, _ = prompts[1]
    seq = prompt.embeds.shape[0]
    steps = GqaSteps(decoder, 1, seq + 8)
    assert decoder.kv_cache.dtype == np.float16
    assert all(v.data_type() == "tensor(float16)" for v in steps.kv)
    kv_ptrs = [v.data_ptr() for v in steps.kv]
    steps.prefill(prompt.embeds[None], prompt.position_ids, np.array([seq]), np.array([prompt.rope_delta]))
    for t in range(1, 6):
        steps.step([IM_END_ID], t)
        logits, *presents = steps.io.get_outputs()
        assert [p.data_ptr() for p in presents] == kv_ptrs
        assert all(p.data_type() == "tensor(float16)" for p in presents)
        assert logits.data_type() == "tensor(float)" and logits.data_ptr() == steps.logits.ctypes.data
        assert presents[0].shape() == [1, decoder.kv_heads, decoder.kv_cache.capacity, decoder.head_dim]
    values = list(decoder.kv_cache.values)
    decoder.greedy(prompt.embeds, prompt.position_ids, prompt.rope_delta, max_new_tokens=8)
    assert all(a is b for a, b in zip(values, decoder.kv_cache.values))  # reused, not reallocated


def test_cuda_accepts_float16_refuses_float32():
    """ORT's CUDA GroupQueryAttention is float16/bfloat16 only: the decision, without a GPU."""
    check_gqa_device(np.float16, "cuda", "decoder.onnx")
    for dtype in (np.float32, np.float16):
        check_gqa_device(dtype, "cpu", "decoder.onnx")
    with pytest.raises(ValueError, match="float16/bfloat16 only"):
        check_gqa_device(np.float32, "cuda", "decoder.onnx")


def test_decoder_applies_the_cuda_decision(exported, monkeypatch):
    """`OrtDecoder` reads the KV dtype from its session's inputs and applies `check_gqa_device` to it:
    a CPU session posing as CUDA (the KV cache is only allocated at the first generate)."""
    from finers_rt.backends import ort_decode

    monkeypatch.setitem(ort_decode._DEVICE_OF, "CPUExecutionProvider", "cuda")
    path, _ = exported["float16"]
    dec = OrtDecoder(path, path.parent / "embed_tokens.npy")
    assert dec.device == "cuda" and dec.kv_cache.dtype == np.float16
    path, _ = exported["float32"]
    with pytest.raises(ValueError, match="float16/bfloat16 only"):
        OrtDecoder(path, path.parent / "embed_tokens.npy")


def test_spec_and_manifest_carry_the_kv_dtype(tiny_ckpt, tmp_path):
    """decoder_gqa_spec's KV dtype is part of its digest; an engine folder says it with
    "decoder_kv_dtype" (float32 when absent), and the runtime expects that spec's digest."""
    from finers_rt.backends.ort import expected_digests

    config = json.loads((tiny_ckpt / "gse" / "config.json").read_text())
    f32, f16 = (decoder_gqa_spec_from_config(config, kv_dtype=d) for d in ("float32", "float16"))
    assert f32.digest() == decoder_gqa_spec_from_config(config).digest() != f16.digest()
    assert {t.dtype for t in f16.inputs if t.name.startswith("past_")} == {"float16"}
    assert {t.dtype for t in f16.outputs if t.name.startswith("present_")} == {"float16"}
    with pytest.raises(ValueError, match="screened"):
        decoder_gqa_spec_from_config(config, lm_head="screened", kv_dtype="float16")
    with pytest.raises(ValueError, match="kv_dtype"):
        decoder_spec_from_config(config, kv_dtype="float16")
    with pytest.raises(ValueError, match="kv_dtype"):
        decoder_gqa_spec_from_config(config, kv_dtype="bfloat16")
    for stage in ("gse", "lpr"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text(json.dumps(config))
    for manifest, spec in (({"decoder_attention": "gqa"}, f32),
                           ({"decoder_attention": "gqa", "decoder_kv_dtype": "float16"}, f16)):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        assert expected_digests(tmp_path)["gse/decoder.onnx"] == spec.digest()


def test_check_report_fails_on_nan():
    """A float16 overflow gives NaN logits: NaN > atol is False, so the check must not pass them."""
    from finers_rt.export.onnx_decoder import check_report

    from finers_rt.specs import decoder_gqa_spec

    spec = decoder_gqa_spec(1, 1, 8, 8, 16, kv_dtype="float16")
    report = {"exporter": "onnx.helper", "max_abs_diff": float("nan"), "mismatch_pct": 0.0, "argmax_steps_equal": "0/6"}
    with pytest.raises(RuntimeError, match="nan"):
        check_report("decoder.onnx", spec, report)
