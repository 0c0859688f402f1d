"""The trtllm-engine runtime (`finers_rt.backends.trtllm_engine_vlm`) and `--backend trtllm`, on the CPU.

Expected values come from independent references: HF transformers' `get_rope_index`, its text
rotary embedding and its vision tower on the tiny checkpoint; fake ids by hand. A recording fake
runner checks the exact `ModelRunnerCpp.generate` call. GPU tests (`-m gpu`) skip with the reason.
"""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [export] extra")
transformers = pytest.importorskip("transformers", reason="needs the [export] extra")

from tokenizers import Tokenizer

from finers_rt.backends import BackendUnavailable
from finers_rt.backends import trtllm_engine_vlm as tev
from finers_rt.config import ENDOFTEXT_ID, IM_END_ID, IMAGE_PAD_ID
from finers_rt.prompts import build_question, render_chat
from finers_rt.qwen_vision_host import VisionPreprocessConfig, pixel_values

GPU_REASON = "needs tensorrt_llm (pip install 'finers-rt[trtllm]', tensorrt-llm==1.2.1) and an NVIDIA GPU"
IMAGE_HW = (112, 168)  # small stage image: 4 x 6 merged tokens at factor 28


def _image(seed=1):
    return np.random.default_rng(seed).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)


def _arch(ckpt):
    return tev.RopeArch.from_config(json.loads((ckpt / "config.json").read_text()))


def test_fake_prompt_ids_hand_checked():
    p = IMAGE_PAD_ID
    got = tev.fake_prompt_ids(np.array([5, 6, p, p, p, 7, 8]), p, vocab_size=1000)
    assert got.dtype == np.int32 and got.tolist() == [5, 6, 1000, 1001, 1002, 7, 8]
    assert tev.expand_image_pad(np.array([5, p, 7]), 3).tolist() == [5, p, p, p, 7]
    with pytest.raises(ValueError, match="exactly one"):
        tev.expand_image_pad(np.array([5, 7]), 3)


def test_rotary_table_layout():
    table = tev.rotary_table(8, 16, 10000.0)  # (positions, pairs, (cos, sin))
    assert table.shape == (8, 8, 2) and table.dtype == np.float32
    angle = 3 * 10000.0 ** (-2 * 5 / 16)  # position 3, pair 5
    assert table[3, 5, 0] == pytest.approx(np.cos(angle), abs=1e-6)
    assert table[3, 5, 1] == pytest.approx(np.sin(angle), abs=1e-6)


@pytest.fixture(scope="module")
def hf_inputs(hf, tiny_ckpt):
    """HF's own ids, grid, M-RoPE positions/delta and rotary cos/sin for one small GSE request."""
    from PIL import Image

    model, processor = hf
    prompt = render_chat(build_question("gse", "referring", "the small red car"))
    enc = processor(text=[prompt], images=[Image.fromarray(_image())], return_tensors="pt")
    with torch.no_grad():
        pos, delta = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                                image_grid_thw=enc["image_grid_thw"],
                                                attention_mask=enc["attention_mask"])
        dummy = torch.zeros(1, dtype=torch.float32)
        cos, sin = model.model.language_model.rotary_emb(dummy, pos)  # (1, S, head_dim), sections applied
    return {"prompt": prompt, "ids": enc["input_ids"][0].numpy(), "grid": enc["image_grid_thw"][0].tolist(),
            "pos": pos.numpy(), "delta": int(delta), "cos": cos[0].numpy(), "sin": sin[0].numpy()}


def test_engine_inputs_match_hf(tiny_ckpt, hf_inputs):
    ck = tiny_ckpt / "gse"
    arch, ref = _arch(ck), hf_inputs
    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    n_image = int(np.prod(ref["grid"])) // 4
    ids = tev.expand_image_pad(np.asarray(tok.encode(ref["prompt"], add_special_tokens=False).ids), n_image)
    assert np.array_equal(ids, ref["ids"])  # our expanded prompt == HF processor's
    vocab = 1234567
    embeds = np.random.default_rng(0).standard_normal((n_image, 8)).astype(np.float32)
    x = tev.engine_inputs(ids, embeds, ref["grid"], arch, vocab)
    # fake ids: image tokens -> vocab + k in order, text untouched
    image = ref["ids"] == IMAGE_PAD_ID
    assert np.array_equal(x.input_ids[image], vocab + np.arange(n_image))
    assert np.array_equal(x.input_ids[~image], ref["ids"][~image])
    assert x.prompt_table.shape == (1, n_image, 8) and np.array_equal(x.prompt_table[0], embeds)
    assert x.mrope_deltas.tolist() == [[ref["delta"]]] and x.mrope_deltas.dtype == np.int32
    # cos/sin at HF's positions == HF's rotary embedding (first half = one value per rotary pair)
    seq, half = len(ids), arch.head_dim // 2
    cs = x.mrope_cos_sin.reshape(arch.max_positions, half, 2)
    # float32 angles; HF takes the power in float32, 1.2.1 in float64: ~1 ulp of angle * position
    np.testing.assert_allclose(cs[:seq, :, 0], ref["cos"][:, :half], atol=2e-5)
    np.testing.assert_allclose(cs[:seq, :, 1], ref["sin"][:, :half], atol=2e-5)
    assert np.all(cs[seq:, :, 0] == 1) and np.all(cs[seq:, :, 1] == 0)  # zero-padded positions
    assert x.mrope_cos_sin.shape == (1, arch.max_positions * arch.head_dim)


def test_prompt_table_is_hf_vision_tower_output(tiny_ckpt, tiny_engines, hf):
    """Our vision graph's embeddings (what the engine gets as prompt table) == HF's vision tower on
    the same pixel_values (fp32 graph vs torch: window-attention reshapes, ~1e-6)."""
    from finers_rt.backends.ort_vision import OrtVision

    model, _ = hf
    image = _image(2)
    pv, grid = pixel_values(image, VisionPreprocessConfig.from_checkpoint(tiny_ckpt / "gse"))
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(pv), torch.tensor([list(grid)]))
    ref = out.pooler_output if hasattr(out, "pooler_output") else out
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    ours = OrtVision(tiny_engines / "gse" / "vision.onnx").run(image)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)


class _FakeVision:
    def __init__(self, embeds, grid):
        self.embeds, self.grid = embeds, grid

    def prepare(self, image):
        return {}, None, self.grid

    def run_prepared(self, feeds, reverse):
        return self.embeds


class _RecordingRunner:
    """Stands in for ModelRunnerCpp: records generate's call, answers with a scripted output."""

    model_config = types.SimpleNamespace(vocab_size=152064, dtype="float16")  # Qwen2.5-VL-7B's vocab

    def __init__(self, new_tokens):
        self.new_tokens, self.calls = new_tokens, []

    def generate(self, batch_input_ids, **kwargs):
        self.calls.append((batch_input_ids, kwargs))
        ids = batch_input_ids[0].tolist() + self.new_tokens
        padded = ids + [IM_END_ID] * 7  # the runner pads output_ids with end_id to max_seq_len
        return {"output_ids": torch.tensor([[padded]], dtype=torch.int32),
                "sequence_lengths": torch.tensor([[len(ids)]], dtype=torch.int32)}


@pytest.fixture
def fake_trtllm(monkeypatch):
    """A fake `tensorrt_llm.layers.MropeParams` (a plain record) so generate runs without the library."""
    layers = types.ModuleType("tensorrt_llm.layers")
    layers.MropeParams = lambda **kw: types.SimpleNamespace(**kw)
    root = types.ModuleType("tensorrt_llm")
    root.layers = layers
    monkeypatch.setitem(sys.modules, "tensorrt_llm", root)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.layers", layers)


def _generator(ck, runner, n_image=24, hidden=8):
    gen = object.__new__(tev.TrtllmEngineGenerator)  # __init__ needs TensorRT-LLM; set its state
    gen.device = "cpu"
    gen.vision = _FakeVision(np.ones((n_image, hidden), np.float32), (1, 8, 12))
    gen.tokenizer = Tokenizer.from_file(str(ck / "tokenizer.json"))
    gen.arch = _arch(ck)
    gen.table = tev.rotary_table(gen.arch.max_positions, gen.arch.head_dim, gen.arch.rope_theta)
    gen.force, gen.runner = tev.ForcedScript(), runner
    return gen


def test_runner_gets_the_reference_call(tiny_ckpt, fake_trtllm):
    ck = tiny_ckpt / "gse"
    text = build_question("gse", "referring", "the small red car")
    hello = Tokenizer.from_file(str(ck / "tokenizer.json")).encode("hi", add_special_tokens=False).ids
    runner = _RecordingRunner(hello + [IM_END_ID])
    gen = _generator(ck, runner)
    out = gen.generate(_image(), text, max_new_tokens=16)
    (batch, kw), = runner.calls
    _, x, _ = gen.inputs(_image(), text)
    assert len(batch) == 1 and batch[0].dtype == torch.int32 and np.array_equal(batch[0].numpy(), x.input_ids)
    assert int(batch[0].max()) == 152064 + 23 and int((batch[0] >= 152064).sum()) == 24
    assert kw["prompt_table"].dtype == torch.float16 and tuple(kw["prompt_table"].shape) == (1, 24, 8)
    assert torch.equal(kw["mrope_params"].mrope_rotary_cos_sin, torch.from_numpy(x.mrope_cos_sin))
    assert kw["mrope_params"].mrope_position_deltas.tolist() == x.mrope_deltas.tolist()
    rest = {k: v for k, v in kw.items() if k not in ("prompt_table", "mrope_params")}
    assert rest == {"max_new_tokens": 16, "end_id": IM_END_ID, "pad_id": ENDOFTEXT_ID,
                    "stop_words_list": [[[ENDOFTEXT_ID]]], "top_k": 1, "top_p": 0.0, "temperature": 1.0,
                    "repetition_penalty": 1.0, "num_beams": 1, "prompt_tasks": "0",
                    "return_dict": True, "output_sequence_lengths": True}
    assert out.token_ids == hello + [IM_END_ID] and out.text == "hi" and out.prompt == render_chat(text)
    assert set(out.timings_ms) >= {"preprocess", "vision", "prefill", "decode"}


def test_forced_mode_selects_the_post_processor(tiny_ckpt, fake_trtllm):
    ck = tiny_ckpt / "gse"
    runner = _RecordingRunner([11, 12])  # runtime dropped the stop token: kept as HF returns it
    gen = _generator(ck, runner)
    out = gen.generate(_image(), "q", max_new_tokens=16, forced_text="ab")
    assert runner.calls[0][1]["logits_processor_names"] == [tev.FORCE_PROCESSOR]
    assert gen.force.token_ids == gen.tokenizer.encode("ab", add_special_tokens=False).ids + [IM_END_ID]
    assert out.token_ids == [11, 12, IM_END_ID]
    assert tev.new_ids(np.array([1, 2, 3, 4]), 4, 2, max_new_tokens=2) == [3, 4]  # length cap: nothing added


def _manifests(tmp_path, kind="trtllm-engine", built=True, ort_hash="h"):
    trt, ort = tmp_path / "trt", tmp_path / "ort"
    trt.mkdir(parents=True), ort.mkdir(parents=True)
    stages = {s: {"source_hash": "h", "built": built, "commands": ["trtllm-build --x"]} for s in ("gse", "lpr")}
    (trt / "trtllm_manifest.json").write_text(json.dumps({"kind": kind, "precision": "fp16", "stages": stages}))
    (ort / "manifest.json").write_text(json.dumps({"sources": {"gse": ort_hash, "lpr": ort_hash, "sam2": "s"}}))
    return trt, ort


def test_folder_checks(tmp_path):
    assert tev.check_trtllm_folders(*_manifests(tmp_path / "a"))[0]["kind"] == "trtllm-engine"
    with pytest.raises(RuntimeError, match="trtllm-build --x"):
        tev.check_trtllm_folders(*_manifests(tmp_path / "b", built=False))
    with pytest.raises(ValueError, match="different gse checkpoints"):
        tev.check_trtllm_folders(*_manifests(tmp_path / "c", ort_hash="other"))
    with pytest.raises(FileNotFoundError, match="--target trtllm"):
        tev.check_trtllm_folders(tmp_path / "nowhere", tmp_path / "nowhere")


def test_backend_trtllm_refused_without_tensorrt_llm(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from finers_rt.cli import main
    from finers_rt.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails, as on a machine without it
    trt, ort = _manifests(tmp_path)
    with pytest.raises(BackendUnavailable, match=r"pip install 'finers-rt\[trtllm\]'"):
        Pipeline.from_trtllm(trt, ort_engines=ort)
    Image.fromarray(_image()).save(tmp_path / "x.png")
    common = ["run", "--image", str(tmp_path / "x.png"), "--question", "q", "--out", str(tmp_path / "o")]
    assert main([*common, "--backend", "trtllm", "--engines", str(trt), "--ort-engines", str(ort)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT-LLM" in err and "pip install 'finers-rt[trtllm]'" in err
    assert main([*common, "--backend", "trtllm", "--engines", str(trt)]) == 2
    assert "--ort-engines" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing ran on another backend


@pytest.mark.gpu
def test_trtllm_engine_generator_matches_ort(tmp_path):
    """Greedy tokens of the engine route == the ort backend's (bench-size checkpoints, fp16 engine)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None or not torch.cuda.is_available():
        pytest.skip(GPU_REASON)
    from finers_rt.export.engine import export_engines
    from finers_rt.export.tiny import make_tiny
    from finers_rt.export.trtllm_engine import export_trtllm_engine

    from finers_rt.backends.ort_vlm import OrtGenerator
    from finers_rt.pipeline import Pipeline

    make_tiny(tmp_path / "ckpt", seed=0, size="bench")
    export_engines(tmp_path / "ckpt", tmp_path / "ort", overwrite=True, progress=False)
    export_trtllm_engine(tmp_path / "ckpt", tmp_path / "eng", precision="fp16", build=True)
    pipe = Pipeline.from_trtllm(tmp_path / "eng", ort_engines=tmp_path / "ort", device="cuda")
    image = np.random.default_rng(3).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    text = build_question("lpr", "referring", "the small red car")
    a = OrtGenerator(tmp_path / "ort" / "lpr").generate(image, text, max_new_tokens=24)
    b = pipe.lpr.generator.generate(image, text, max_new_tokens=24)
    assert b.token_ids[:8] == a.token_ids[:8]  # fp16 vs fp32: the first tokens must agree
