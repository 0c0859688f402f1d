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


def _decoder_export(tiny_ckpt, tiny_engines, out, **kinds):
    """`export_engines(tiny_ckpt, out, **kinds)`: both decoders are exported and verified for real.
    The vision and SAM2 graphs do not depend on the decoder kinds, so their exporters are replaced
    by copies of `tiny_engines`' verified graphs and reports (saves ~1 min of identical exports)."""
    from finers_rt.export import engine

    graphs = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]

    def vision(src, out_path, **_):
        rel = f"{out_path.parent.name}/{out_path.name}"
        shutil.copy2(tiny_engines / rel, out_path)
        return graphs[rel]["verification"]

    def sam2(src, out_dir, **_):
        shutil.copytree(tiny_engines / "sam2", out_dir, dirs_exist_ok=True)
        return {part: graphs[f"sam2/sam2_{part}.onnx"]["verification"] for part in ("encoder", "decoder")}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "export_vision", vision)
        mp.setattr(engine, "export_sam2", sam2)
        engine.export_engines(tiny_ckpt, out, overwrite=True, progress=False, **kinds)
    return out


@pytest.fixture(scope="module")
def gqa_engines(tiny_ckpt, tiny_engines, tmp_path_factory):
    """`export_engines(..., decoder_attention="gqa")` of the tiny checkpoints (float32 logits)."""
    return _decoder_export(tiny_ckpt, tiny_engines, tmp_path_factory.mktemp("gqa_engines"), decoder_attention="gqa")


@pytest.fixture(scope="module")
def screened_engines(tiny_ckpt, tiny_engines, tmp_path_factory):
    """The GQA decoders with the screened lm_head (int8 bounds + float32 rescoring on the host)."""
    return _decoder_export(tiny_ckpt, tiny_engines, tmp_path_factory.mktemp("screened_engines"),
                           decoder_attention="gqa", lm_head="screened")


@pytest.fixture(scope="module")
def decoders(tiny_engines, gqa_engines, screened_engines):
    """{"onnx": standard graph, "gqa": GQA graph, "screened": GQA graph + screened lm_head}: OrtDecoders
    of the GSE stage."""
    return {kind: OrtDecoder(d / "gse" / "decoder.onnx", d / "gse" / "embed_tokens.npy")
            for kind, d in (("onnx", tiny_engines), ("gqa", gqa_engines), ("screened", screened_engines))}


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


@pytest.mark.parametrize("kind", ["gqa", "screened"])
@pytest.mark.parametrize("buckets", [None, (1, 2, 4, 8)], ids=["exact", "buckets"])
def test_greedy_batch_equals_single_runs(decoders, prompts, buckets, kind):
    """3 right-padded prompts of different lengths (+ the same first prompt forced): per-row ids
    equal each batch-1 run, which equal HF generate (unforced rows)."""
    decoder = decoders[kind]
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


@pytest.mark.parametrize("kind", ["gqa", "screened"])
def test_pipeline_equals_standard_folder(tiny_engines, gqa_engines, screened_engines, kind):
    """A forced run (boxes, points, mask exist) and a free one (random weights: 64 tokens per stage)."""
    from test_pipeline_ort import H, W, _forced, _image

    config = PipelineConfig(gse=replace(GSE, max_new_tokens=64), lpr=replace(LPR, max_new_tokens=64))
    folder = {"gqa": gqa_engines, "screened": screened_engines}[kind]
    std, fast = (Pipeline.from_engines(d, config=config) for d in (tiny_engines, folder))
    img = _image(7, W, H)
    for kw in ({"force_output": _forced("referring", "The object is found.")}, {}):
        ref, got = std.run(img, "the red car", **kw), fast.run(img, "the red car", **kw)
        for field in ("answer", "gse_box", "crop_box", "lpr_box", "points", "parse", "prompts", "texts", "tokens"):
            assert getattr(got, field) == getattr(ref, field), field
        assert (got.mask is None) == (ref.mask is None)
        if ref.mask is not None:
            np.testing.assert_array_equal(got.mask, ref.mask)


def test_cli_flag():
    from finers_rt.cli import build_parser

    args = build_parser().parse_args(["export", "--checkpoints", "c", "--out", "o", "--decoder-attention", "gqa"])
    assert args.decoder_attention == "gqa"
    assert build_parser().parse_args(["export", "--checkpoints", "c", "--out", "o"]).decoder_attention is None


def test_fp16_gqa_folder_has_a_float16_decoder_the_runtime_accepts(tiny_ckpt, tiny_engines, tmp_path):
    """`--precision fp16 --decoder-attention gqa`: the decoders are exported in float16 (float16 KV
    IO, verified against HF float32), not passed through to_fp16; the manifest matches the specs."""
    import onnx

    from finers_rt.backends.ort import expected_digests
    from finers_rt.manifest import load_manifest

    out = _decoder_export(tiny_ckpt, tiny_engines, tmp_path / "fp16", decoder_attention="gqa", precision="fp16")
    manifest = load_manifest(out, expected_digests(out))  # raises if a digest does not match
    assert manifest["decoder_kv_dtype"] == "float16"
    entry = manifest["graphs"]["gse/decoder.onnx"]
    assert entry["verification"]["argmax_equal"] and "exported in float16" in entry["fp16"]
    graph = onnx.load(str(out / "gse" / "decoder.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["past_key_0"] == types["present_key_0"] == onnx.TensorProto.FLOAT16
    assert types["inputs_embeds"] == types["logits"] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("flags,kinds", [
    ([], ("ort", "gqa", "screened")),  # the embedded default: ORT CPU's fused ops, screened lm_head
    (["--device", "cuda"], ("onnx", "onnx", "fp32")),  # standard ops: ORT CUDA, TensorRT
    (["--precision", "fp16"], ("onnx", "onnx", "fp32")),  # fp16 runs on GPU providers only
    (["--precision", "int8"], ("ort", "gqa", "fp32")),  # the screened head is float32 GQA's
    (["--device", "cpu", "--decoder-attention", "onnx"], ("ort", "onnx", "fp32")),  # explicit kinds win
    (["--device", "cuda", "--vision-attention", "ort"], ("ort", "onnx", "fp32")),
    (["--lm-head", "fp32"], ("ort", "gqa", "fp32")),
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
    assert (seen["vision_attention"], seen["decoder_attention"], seen["lm_head"]) == kinds


def test_demo_reexports_a_folder_of_other_graph_kinds(monkeypatch, tiny_ckpt, tmp_path):
    from finers_rt.export import engine

    from finers_rt import cli
    from finers_rt.manifest import hash_tree

    calls = []
    monkeypatch.setattr(engine, "export_engines", lambda c, o, **kw: calls.append(kw) or {"graphs": {}})
    sources = {s: hash_tree(tiny_ckpt / s) for s in ("gse", "lpr", "sam2")}
    out = tmp_path / "engines"
    out.mkdir()
    cpu, cuda = ("ort", "gqa", "screened"), ("onnx", "onnx", "fp32")
    for kinds, device, exported in [(cuda, "cpu", True), (("ort", "gqa", "fp32"), "cpu", True), (cpu, "cpu", False),
                                    (cpu, "cuda", True), (cuda, "cuda", False)]:
        (out / "manifest.json").write_text(json.dumps({"precision": "fp32", "sources": sources, "lm_head": kinds[2],
                                                       "vision_attention": kinds[0], "decoder_attention": kinds[1]}))
        calls.clear()
        assert cli._ensure_engines(tiny_ckpt, out, device) == out
        assert bool(calls) == exported, (kinds, device)


def test_graph_kinds_rejects_an_unknown_device():
    from finers_rt.export.engine import graph_kinds

    with pytest.raises(ValueError, match="--device must be one of"):
        graph_kinds("orin", "fp32")


def test_screened_export_verified_and_recorded(screened_engines, decoders):
    """The screened folder: bounds checked at every verification step (the exporter raises
    otherwise), the spec's head outputs, the rescoring rows named in the graph (tied: the table)."""
    manifest = json.loads((screened_engines / "manifest.json").read_text())
    assert (manifest["decoder_attention"], manifest["lm_head"]) == ("gqa", "screened")
    for stage in ("gse", "lpr"):
        entry = manifest["graphs"][f"{stage}/decoder.onnx"]
        report = entry["verification"]
        assert report["lm_head"] == "screened" and report["argmax_equal"]
        assert 1 <= report["screened_candidates_max"] < 1000  # of 151,936 vocab rows
        config = json.loads((screened_engines / stage / "config.json").read_text())
        assert entry["spec_digest"] == decoder_gqa_spec_from_config(config, lm_head="screened").digest()
    decoder = decoders["screened"]
    assert [o.name for o in decoder.session.get_outputs()][:3] == ["logits_lo", "logits_hi", "hidden"]
    assert decoder.lm_head_rows is decoder.table  # tied lm_head: rescored from embed_tokens.npy
    assert not (screened_engines / "gse" / "lm_head.npy").exists()


def test_screened_head_with_an_untied_lm_head(prompts, tiny_ckpt, tmp_path):
    """An untied lm_head (Qwen2.5-VL 7B's case) is saved as lm_head.npy and rescored from it:
    greedy ids still equal HF generate's."""
    from finers_rt.export.onnx_decoder_gqa import export_decoder_gqa
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    untied = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt / "gse", dtype=torch.float32,
                                                                tie_word_embeddings=False).eval()
    with torch.no_grad():
        untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone() * 1.5)
        untied.lm_head.weight[:, :8] = 0.1 * torch.randn(untied.lm_head.weight.shape[0], 8,
                                                          generator=torch.Generator().manual_seed(0))
    ckpt = tmp_path / "untied"
    untied.save_pretrained(ckpt)
    AutoProcessor.from_pretrained(tiny_ckpt / "gse").save_pretrained(ckpt)
    out = tmp_path / "engine" / "decoder.onnx"
    report = export_decoder_gqa(ckpt, out, lm_head="screened")
    assert report["argmax_equal"] and (out.parent / "lm_head.npy").is_file()
    decoder = OrtDecoder(out, out.parent / "embed_tokens.npy")
    assert decoder.lm_head_rows is not decoder.table
    np.testing.assert_array_equal(decoder.lm_head_rows, untied.lm_head.weight.detach().numpy())
    prompt, _ = prompts[1]
    with torch.no_grad():
        embeds = torch.from_numpy(prompt.embeds)[None]
        hidden = untied.model.language_model(inputs_embeds=embeds, position_ids=torch.from_numpy(prompt.position_ids))
        expected = int(untied.lm_head(hidden.last_hidden_state[0, -1]).argmax())
    ids, _ = decoder.greedy(prompt.embeds, prompt.position_ids, prompt.rope_delta, max_new_tokens=1)
    assert ids == [expected]
