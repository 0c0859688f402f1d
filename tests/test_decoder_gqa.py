"""The GroupQueryAttention decoder graph (`export/onnx_decoder_gqa.py`) and its fixed-buffer runtime.

Expected values come from HF transformers (generate, or the text model on the whole sequence),
never from the code under test; the standard-graph folder (`tiny_engines`) is the second witness.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [export] extra")
pytest.importorskip("onnxscript", reason="needs the [export] extra")

from test_decoder_onnx import IMAGE_PROMPTS, STOP_IDS, _hf_inputs, _merged_embeds

from finers_rt.backends.ort_batch import Prompt, greedy_batch
from finers_rt.backends.ort_decode import OrtDecoder
from finers_rt.backends.ort_decode_gqa import GqaSteps
from finers_rt.config import ENDOFTEXT_ID, GSE, IM_END_ID, LPR, PipelineConfig
from finers_rt.pipeline import Pipeline
from finers_rt.qwen_rope import rope_index
from finers_rt.specs import decoder_gqa_spec_from_config

FORCED = [9707, 1879, 0, 11, 151652, 42]  # an arbitrary script: the fed tokens are not the argmax


@pytest.fixture(scope="module")
def gqa_engines(tiny_ckpt, tiny_engines, tmp_path_factory):
    """`export_engines(..., decoder_attention="gqa")` of the tiny checkpoints.

    Both decoders are exported and verified for real. The vision and SAM2 graphs do not depend on
    decoder_attention, so their exporters are replaced by copies of `tiny_engines`' verified graphs
    and reports (saves ~1 min of identical exports).
    """
    from finers_rt.export import engine

    graphs = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]

    def vision(src, out_path, **_):
        rel = f"{out_path.parent.name}/{out_path.name}"
        shutil.copy2(tiny_engines / rel, out_path)
        return graphs[rel]["verification"]

    def sam2(src, out_dir, **_):
        shutil.copytree(tiny_engines / "sam2", out_dir, dirs_exist_ok=True)
        return {part: graphs[f"sam2/sam2_{part}.onnx"]["verification"] for part in ("encoder", "decoder")}

    out = tmp_path_factory.mktemp("gqa_engines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "export_vision", vision)
        mp.setattr(engine, "export_sam2", sam2)
        engine.export_engines(tiny_ckpt, out, overwrite=True, progress=False, decoder_attention="gqa")
    return out


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    ckpt = tiny_ckpt / "gse"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def decoders(tiny_engines, gqa_engines):
    """{"onnx": standard-graph OrtDecoder, "gqa": GQA-graph OrtDecoder} of the GSE stage."""
    return {kind: OrtDecoder(d / "gse" / "decoder.onnx", d / "gse" / "embed_tokens.npy")
            for kind, d in (("onnx", tiny_engines), ("gqa", gqa_engines))}


@pytest.fixture(scope="module")
def prompts(hf):
    """(Prompt, HF generate ids for 32 new tokens) per IMAGE_PROMPTS entry: 3 lengths with image blocks."""
    model, processor = hf
    out = []
    for size, question in IMAGE_PROMPTS:
        inputs = _hf_inputs(processor, size, question)
        with torch.no_grad():
            gen = model.generate(**inputs, do_sample=False, max_new_tokens=32, eos_token_id=STOP_IDS,
                                 repetition_penalty=1.0, pad_token_id=ENDOFTEXT_ID, temperature=None,
                                 top_p=None, top_k=None)
        ids = inputs["input_ids"][0].numpy()
        positions, delta = rope_index(ids, inputs["image_grid_thw"].numpy())
        out.append((Prompt(_merged_embeds(model, inputs), positions, delta), gen[0, len(ids):].tolist()))
    return out


def test_export_verified_and_recorded(gqa_engines, decoders):
    import onnx

    manifest = json.loads((gqa_engines / "manifest.json").read_text())
    assert manifest["decoder_attention"] == "gqa"
    for stage in ("gse", "lpr"):
        entry = manifest["graphs"][f"{stage}/decoder.onnx"]
        report = entry["verification"]
        assert report["prefill_len"] == 300 and report["decode_steps"] == 5
        assert report["max_abs_diff"] <= report["atol"] and report["argmax_equal"]
        spec = decoder_gqa_spec_from_config(json.loads((gqa_engines / stage / "config.json").read_text()))
        assert entry["spec_digest"] == spec.digest()
    graph = onnx.load(str(gqa_engines / "gse" / "decoder.onnx")).graph
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 2  # one per layer
    session = decoders["gqa"].session
    assert [i.name for i in session.get_inputs()] == spec.input_names and decoders["gqa"].gqa


@pytest.mark.parametrize("index", range(len(IMAGE_PROMPTS)), ids=["6x8", "10x4", "16x12"])
def test_greedy_matches_hf_and_standard_graph(decoders, prompts, index):
    prompt, expected = prompts[index]
    for kind, decoder in decoders.items():
        ids, timings = decoder.greedy(prompt.embeds, prompt.position_ids, prompt.rope_delta, max_new_tokens=32)
        assert ids == expected, kind
        assert set(timings) == {"prefill", "decode"}


def test_forced_mode_emits_script_then_im_end(decoders, prompts):
    prompt, _ = prompts[0]
    for kind, decoder in decoders.items():
        ids, _ = decoder.greedy(prompt.embeds, prompt.position_ids, prompt.rope_delta, max_new_tokens=16,
                                forced_ids=FORCED)
        assert ids == FORCED + [IM_END_ID], kind
        ids, _ = decoder.greedy(prompt.embeds, prompt.position_ids, prompt.rope_delta, max_new_tokens=2,
                                forced_ids=FORCED)
        assert ids == FORCED[:2], kind


def test_forced_steps_logits_match_hf(hf, decoders, prompts):
    """Feeding a script (not the argmax) through the in-place cache: each step's logits equal HF's
    text model run on prompt + script in one pass."""
    model, _ = hf
    prompt, _ = prompts[2]
    seq = prompt.embeds.shape[0]
    decoder = decoders["gqa"]
    steps = GqaSteps(decoder, 1, seq + len(FORCED))
    got = [steps.prefill(prompt.embeds[None], prompt.position_ids, np.array([seq]),
                         np.array([prompt.rope_delta])).copy()]
    for t, token in enumerate(FORCED, start=1):
        got.append(steps.step([token], t).copy())

    embeds = np.concatenate([prompt.embeds, decoder.embed(FORCED)])[None]
    decode_pos = np.arange(seq, seq + len(FORCED)) + prompt.rope_delta
    positions = np.concatenate([prompt.position_ids, np.broadcast_to(decode_pos, (3, 1, len(FORCED)))], axis=2)
    text = model.model.language_model
    with torch.no_grad():
        hidden = text(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(positions)).last_hidden_state
        expected = model.lm_head(hidden[0, seq - 1:]).numpy()  # logits after the prompt and after each script token
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-3, rtol=0)


def test_kv_cache_bound_in_place(decoders, prompts):
    """present_* come back in the very buffers bound as past_*; no new OrtValue per step or generate."""
    decoder = decoders["gqa"]
    prompt, _ = prompts[1]
    seq = prompt.embeds.shape[0]
    steps = GqaSteps(decoder, 1, seq + 8)
    kv_ptrs = [v.data_ptr() for v in steps.kv]
    steps.prefill(prompt.embeds[None], prompt.position_ids, np.array([seq]), np.array([prompt.rope_delta]))
    for t in range(1, 6):
        steps.step([IM_END_ID], t)
        logits, *presents = steps.io.get_outputs()
        assert [p.data_ptr() for p in presents] == kv_ptrs
        assert logits.data_ptr() == steps.logits.ctypes.data
        assert presents[0].shape() == [1, decoder.kv_heads, decoder.kv_cache.capacity, decoder.head_dim]
    values = list(decoder.kv_cache.values)
    decoder.greedy(prompt.embeds, prompt.position_ids, prompt.rope_delta, max_new_tokens=8)
    assert all(a is b for a, b in zip(values, decoder.kv_cache.values))  # reused, not reallocated


@pytest.mark.parametrize("buckets", [None, (1, 2, 4, 8)], ids=["exact", "buckets"])
def test_greedy_batch_equals_single_runs(decoders, prompts, buckets):
    """3 right-padded prompts of different lengths (+ the same first prompt forced): per-row ids
    equal each batch-1 run, which equal HF generate (unforced rows)."""
    decoder = decoders["gqa"]
    batch = [p for p, _ in prompts]
    first = batch[0]
    batch.append(Prompt(first.embeds, first.position_ids, first.rope_delta, forced_ids=FORCED))
    if buckets:
        batch = batch[1:]  # 3 prompts -> a 4-row bucket with one dummy row
    ids, timings = greedy_batch(decoder, batch, max_new_tokens=32, buckets=buckets)
    assert timings["rows"] == 4 and timings["shrinks"] == 0
    for p, got in zip(batch, ids):
        single, _ = decoder.greedy(p.embeds, p.position_ids, p.rope_delta, max_new_tokens=32,
                                   forced_ids=p.forced_ids)
        assert got == single
    expected = [e for _, e in prompts] + [FORCED + [IM_END_ID]]
    assert ids == (expected[1:] if buckets else expected)


def test_pipeline_equals_standard_folder(tiny_engines, gqa_engines):
    """A forced run (boxes, points, mask exist) and a free one (random weights: 64 tokens per stage)."""
    from test_pipeline_ort import H, W, _forced, _image

    config = PipelineConfig(gse=replace(GSE, max_new_tokens=64), lpr=replace(LPR, max_new_tokens=64))
    std, gqa = (Pipeline.from_engines(d, config=config) for d in (tiny_engines, gqa_engines))
    img = _image(7, W, H)
    for kw in ({"force_output": _forced("referring", "The object is found.")}, {}):
        ref, got = std.run(img, "the red car", **kw), gqa.run(img, "the red car", **kw)
        for field in ("answer", "gse_box", "crop_box", "lpr_box", "points", "parse", "prompts", "texts", "tokens"):
            assert getattr(got, field) == getattr(ref, field), field
        assert (got.mask is None) == (ref.mask is None)
        if ref.mask is not None:
            np.testing.assert_array_equal(got.mask, ref.mask)


def test_cli_flag_and_fp16_refusal(tmp_path):
    from finers_rt.export.engine import export_engines

    from finers_rt.cli import build_parser

    args = build_parser().parse_args(["export", "--checkpoints", "c", "--out", "o", "--decoder-attention", "gqa"])
    assert args.decoder_attention == "gqa"
    assert build_parser().parse_args(["export", "--checkpoints", "c", "--out", "o"]).decoder_attention is None
    with pytest.raises(ValueError, match="fp16"):
        export_engines(tmp_path, tmp_path / "out", precision="fp16", decoder_attention="gqa")



@pytest.mark.parametrize("flags,kinds", [
    ([], ("ort", "gqa")),  # the embedded default: ORT CPU's fused attention ops
    (["--device", "cuda"], ("onnx", "onnx")),  # standard ops: ORT CUDA, TensorRT
    (["--precision", "fp16"], ("onnx", "onnx")),  # fp16 runs on GPU providers only
    (["--device", "cpu", "--decoder-attention", "onnx"], ("ort", "onnx")),  # explicit kinds win
    (["--device", "cuda", "--vision-attention", "ort"], ("ort", "onnx")),
])
def test_export_device_picks_the_graph_kinds(monkeypatch, tmp_path, flags, kinds):
    from finers_rt.export import engine

    from finers_rt import cli

    seen = {}

    def fake_export(checkpoints, out, **kw):
        seen.update(kw)
        return {"precision": kw["precision"], "graphs": {}}

    monkeypatch.setattr(engine, "export_engines", fake_export)
    args = cli.build_parser().parse_args(["export", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "o"), *flags])
    cli.cmd_export(args=args)
    assert (seen["vision_attention"], seen["decoder_attention"]) == kinds


def test_demo_reexports_a_folder_of_other_graph_kinds(monkeypatch, tiny_ckpt, tmp_path):
    from finers_rt.export import engine

    from finers_rt import cli
    from finers_rt.manifest import hash_tree

    calls = []
    monkeypatch.setattr(engine, "export_engines", lambda c, o, **kw: calls.append(kw) or {"graphs": {}})
    sources = {s: hash_tree(tiny_ckpt / s) for s in ("gse", "lpr", "sam2")}
    out = tmp_path / "engines"
    out.mkdir()
    for kinds, device, exported in [(("onnx", "onnx"), "cpu", True), (("ort", "gqa"), "cpu", False),
                                    (("ort", "gqa"), "cuda", True), (("onnx", "onnx"), "cuda", False)]:
        (out / "manifest.json").write_text(json.dumps({"precision": "fp32", "sources": sources,
                                                       "vision_attention": kinds[0], "decoder_attention": kinds[1]}))
        calls.clear()
        assert cli._ensure_engines(tiny_ckpt, out, device) == out
        assert bool(calls) == exported, (kinds, device)


def test_graph_kinds_rejects_an_unknown_device():
    from finers_rt.export.engine import graph_kinds

    with pytest.raises(ValueError, match="--device must be one of"):
        graph_kinds("orin", "fp32")
