"""TensorRT-LLM routes, everything up to the device call, on the CPU.

Engine route: the converted checkpoint config equals the HF config; every language-model tensor is
consumed exactly once (the vision tower is left over for our vision engine); a float64 numpy
decoder running on the *converted* tensors (fused qkv split back as TensorRT-LLM's attention splits
it) reproduces HF's hidden states and logits; int8 weight-only error bounds; build limits.
LLM API route: the flat config loads into the same model; the trtllm generator's inputs (prompt
ids, pixel_values, image_grid_thw, M-RoPE positions) equal what the torch backend feeds HF.
GPU tests (`-m gpu`) skip here with the reason.
"""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [export] extra")
transformers = pytest.importorskip("transformers", reason="needs the [export] extra")

from finers_rt.export import trtllm_engine as te
from finers_rt.export import trtllm_quant as tq

from finers_rt.backends import BackendUnavailable
from finers_rt.backends import trtllm_vlm as tv
from finers_rt.backends.ort_vlm import OrtGenerator
from finers_rt.config import ENDOFTEXT_ID, IM_END_ID
from finers_rt.prompts import build_question
from finers_rt.qwen_rope import rope_index
from finers_rt.qwen_vision_host import VisionPreprocessConfig, pixel_values

GPU_REASON = "needs tensorrt_llm (pip install 'finers-rt[trtllm]', tensorrt-llm==1.2.1) and an NVIDIA GPU"
# Qwen2.5-VL-7B-Instruct's config.json as published (transformers 4.4x, flat), decoder keys only
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
    "vocab_size": 152064, "torch_dtype": "bfloat16",
}


def _hf_text_config(stage_dir):
    return transformers.AutoConfig.from_pretrained(stage_dir)


@pytest.fixture(scope="module")
def fp16_ckpt(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("trtllm_ckpt")
    return {s: (out / s, te.convert_checkpoint(tiny_ckpt / s, out / s, "fp16")) for s in ("gse", "lpr")}


# ---------------------------------------------------------------------------------------------
# engine route: config and names


@pytest.mark.parametrize("stage", ["gse", "lpr"])
def test_converted_config_matches_hf_config(tiny_ckpt, fp16_ckpt, stage):
    hf = _hf_text_config(tiny_ckpt / stage)
    text, cfg = hf.text_config, json.loads((fp16_ckpt[stage][0] / "config.json").read_text())
    assert (cfg["architecture"], cfg["qwen_type"], cfg["position_embedding_type"]) == (
        "Qwen2VLForConditionalGeneration", "qwen2_vl", "mrope")
    assert cfg["num_hidden_layers"] == text.num_hidden_layers
    assert cfg["num_attention_heads"] == text.num_attention_heads
    assert cfg["num_key_value_heads"] == text.num_key_value_heads
    assert cfg["hidden_size"] == text.hidden_size and cfg["intermediate_size"] == text.intermediate_size
    assert cfg["vocab_size"] == text.vocab_size
    assert cfg["head_size"] == cfg["rotary_embedding_dim"] == text.hidden_size // text.num_attention_heads
    assert cfg["rotary_base"] == text.rope_parameters["rope_theta"]
    assert cfg["rotary_scaling"] == {"type": "mrope", "mrope_section": list(text.rope_parameters["mrope_section"])}
    assert cfg["norm_epsilon"] == text.rms_norm_eps
    assert cfg["tie_word_embeddings"] == hf.tie_word_embeddings is True
    assert cfg["quantization"]["quant_algo"] is None and cfg["dtype"] == "float16"


def test_flat_4x_config_reads_like_the_5x_one(tiny_ckpt):
    """The 7B as published (flat, rope_scaling) and our 5.x tiny folders read through one path."""
    arch = te.TextArch.from_config(QWEN25_VL_7B)
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim) == (28, 3584, 28, 4, 128)
    assert arch.mrope_section == (16, 24, 24) and arch.vocab == 152064 and not arch.tie_embeddings
    cfg = te.trtllm_config(arch, "int8-wo")
    assert cfg["rotary_embedding_dim"] == 128 and cfg["quantization"]["quant_algo"] == "W8A16"
    tiny = json.loads((tiny_ckpt / "gse" / "config.json").read_text())
    assert te.TextArch.from_config(tq.legacy_config(tiny)) == te.TextArch.from_config(tiny)


class CountingSource(te.TensorSource):
    def __init__(self, checkpoint):
        super().__init__(checkpoint)
        self.reads: dict[str, int] = {}

    def get(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().get(name)


@pytest.mark.parametrize("stage", ["gse", "lpr"])
def test_every_language_weight_mapped_exactly_once(tiny_ckpt, fp16_ckpt, stage):
    src = CountingSource(tiny_ckpt / stage)
    arch = te.TextArch.from_config(json.loads((tiny_ckpt / stage / "config.json").read_text()))
    weights, used = te.convert_weights(src, arch, torch.float32)
    language = {n for n in src.names() if not te.is_vision(n)}
    assert used == language and set(src.reads) == language
    assert all(count == 1 for count in src.reads.values()), src.reads
    assert fp16_ckpt[stage][1]["unused"] == sorted(n for n in src.names() if te.is_vision(n))
    per_layer = ["attention.qkv.weight", "attention.qkv.bias", "attention.dense.weight", "mlp.fc.weight",
                 "mlp.gate.weight", "mlp.proj.weight", "input_layernorm.weight", "post_layernorm.weight"]
    expected = {f"transformer.layers.{i}.{n}" for i in range(arch.layers) for n in per_layer}
    expected |= {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    assert set(weights) == expected
    # tied embeddings: lm_head is a copy of the embedding; no element is duplicated otherwise
    n_lm = sum(src.get(n).numel() for n in language)
    assert sum(w.numel() for w in weights.values()) == n_lm + weights["lm_head.weight"].numel()
    # the fp16 file holds the same tensors, cast
    from safetensors.torch import load_file

    saved = load_file(str(fp16_ckpt[stage][0] / "rank0.safetensors"))
    assert set(saved) == expected
    assert all(torch.equal(saved[k], weights[k].half()) for k in expected)


def test_5x_tensor_names_map_like_4x_names():
    assert te.canonical_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert te.canonical_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert te.is_vision("model.visual.blocks.0.attn.qkv.weight") and te.is_vision("visual.merger.mlp.0.bias")
    assert not te.is_vision("lm_head.weight")


# ---------------------------------------------------------------------------------------------
# engine route: a numpy decoder on the converted tensors reproduces HF


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _mrope(pos, head_dim, theta, section):
    """cos, sin (S, head_dim) for positions (3, S): rotary pair j takes the axis of its section."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = pos[:, :, None].astype(np.float64) * inv  # (3, S, head_dim/2)
    axis = np.repeat(np.arange(3) % 3, section)  # section i -> axis i
    f = freqs[axis, :, np.arange(head_dim // 2)].T  # (S, head_dim/2)
    emb = np.concatenate([f, f], axis=-1)
    return np.cos(emb), np.sin(emb)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _trt_layer(x, w, i, cfg, cos, sin):
    """One QWenDecoderLayer as TensorRT-LLM computes it, from checkpoint tensor names only."""
    p, hd = f"transformer.layers.{i}.", cfg["head_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = _rms(x, w[p + "input_layernorm.weight"], cfg["norm_epsilon"])
    qkv = h @ w[p + "attention.qkv.weight"].T + w[p + "attention.qkv.bias"]
    q, k, v = np.split(qkv, [nq * hd, (nq + nkv) * hd], axis=-1)  # the fused output's q | k | v
    q, k, v = (t.reshape(len(x), -1, hd).transpose(1, 0, 2) for t in (q, k, v))  # (heads, S, hd)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = np.repeat(k, nq // nkv, axis=0), np.repeat(v, nq // nkv, axis=0)  # GQA
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((len(x),) * 2, -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    attn = (probs / probs.sum(-1, keepdims=True)) @ v  # (heads, S, hd)
    x = x + attn.transpose(1, 0, 2).reshape(len(x), -1) @ w[p + "attention.dense.weight"].T
    h = _rms(x, w[p + "post_layernorm.weight"], cfg["norm_epsilon"])
    fc = h @ w[p + "mlp.fc.weight"].T  # GatedMLP: proj(silu(fc(x)) * gate(x))
    return x + (fc / (1 + np.exp(-fc)) * (h @ w[p + "mlp.gate.weight"].T)) @ w[p + "mlp.proj.weight"].T


# float32 HF vs float64 numpy: measured <= 5e-7. The same decoder with 1-D positions (M-RoPE
# sections ignored) is off by 6.5e-4, with k and v swapped by 0.65: the tolerance separates them.
TOL = 5e-6


class ModelSource:
    """A TensorSource over an in-memory HF model (5.x names: `model.language_model.*`)."""

    def __init__(self, model):
        self.state = model.state_dict()
        self.where = {te.canonical_name(k): k for k in self.state}

    def names(self):
        return sorted(self.where)

    def get(self, name):
        return self.state[self.where[name]]


@pytest.mark.parametrize("stage", ["gse", "lpr"])
def test_numpy_decoder_on_converted_weights_reproduces_hf(tiny_ckpt, stage):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt / stage, dtype=torch.float32)
    with torch.no_grad():  # random q/k give near-uniform attention that hides RoPE: sharpen it
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(15)
            layer.self_attn.k_proj.weight.mul_(15)
    arch = te.TextArch.from_config(model.config.to_dict())
    cfg = te.trtllm_config(arch, "fp16")
    source = ModelSource(model)  # 5.x in-memory names: model.language_model.*, model.visual.*
    weights, used = te.convert_weights(source, arch, torch.float64)
    assert used == {n for n in source.names() if not te.is_vision(n)}
    w = {k: v.numpy() for k, v in weights.items()}
    # a prompt with a 4x6-patch image block, so the three M-RoPE axes differ
    ids = np.array([151644, 872, 198, 151652] + [151655] * 6 + [151653, 9707, 1879, 151645, 198], np.int64)
    pos, _ = rope_index(ids, np.array([[1, 4, 6]]))
    x = np.random.default_rng(0).normal(0, 1, (len(ids), arch.hidden))
    with torch.no_grad():
        hf = model.model.language_model(inputs_embeds=torch.from_numpy(x).float()[None],
                                        position_ids=torch.from_numpy(pos), output_hidden_states=True)
        hf_logits = model.lm_head(hf.last_hidden_state)[0].numpy()
    attn = [m.self_attn for m in model.model.language_model.layers]
    assert all(a.q_proj.weight.abs().max() > 0.5 for a in attn)  # the sharpened weights were converted
    cos, sin = _mrope(pos[:, 0], cfg["head_size"], cfg["rotary_base"], cfg["rotary_scaling"]["mrope_section"])
    h = x
    for i in range(cfg["num_hidden_layers"]):
        h = _trt_layer(h, w, i, cfg, cos, sin)
        if i + 1 < cfg["num_hidden_layers"]:  # HF's hidden_states[i + 1] is layer i's output
            np.testing.assert_allclose(h, hf.hidden_states[i + 1][0].numpy(), atol=TOL, rtol=0)
    h = _rms(h, w["transformer.ln_f.weight"], cfg["norm_epsilon"])
    np.testing.assert_allclose(h, hf.last_hidden_state[0].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(h @ w["lm_head.weight"].T, hf_logits, atol=TOL, rtol=0)
    assert (np.argmax(h @ w["lm_head.weight"].T, -1) == hf_logits.argmax(-1)).all()


# ---------------------------------------------------------------------------------------------
# engine route: int8 weight-only and build limits


def test_int8_weight_only_within_quantisation_error(tiny_ckpt, fp16_ckpt, tmp_path):
    from safetensors.torch import load_file

    weights = load_file(str(fp16_ckpt["gse"][0] / "rank0.safetensors"))
    quantised = [k for k in weights if k.endswith(te.WOQ_SUFFIXES)]
    assert len(quantised) == 5 * 2 and "lm_head.weight" not in quantised  # qkv, dense, fc, gate, proj x 2 layers
    for name in quantised:
        w = weights[name].float().numpy()
        q, scale = te.int8_weight_only(w)
        assert q.shape == w.T.shape and scale.shape == (w.shape[0],)
        assert (np.abs(q).max(axis=0) == 127).all()  # each output channel's absmax maps to 127
        err = np.abs(q * scale - w.T)
        assert (err <= scale / 2 + 1e-7).all(), name  # round-to-nearest: at most half a step
        assert np.linalg.norm(err) / np.linalg.norm(w) < 0.01  # ~0.3 % for Gaussian weights
    # the W8A16 checkpoint is the fp16 one + quant_algo: trtllm-build quantises (SM-specific layout)
    out = te.convert_checkpoint(tiny_ckpt / "gse", tmp_path / "wo", "int8-wo")
    assert out["config"]["quantization"]["quant_algo"] == "W8A16"
    wo = load_file(str(tmp_path / "wo" / "rank0.safetensors"))
    assert all(torch.equal(wo[k], weights[k]) for k in weights)


def test_build_limits_and_command(tiny_ckpt, tmp_path):
    # Qwen2.5-VL-7B's processor settings: GSE 1920x1080 -> 1932x1092 -> 69 x 39 merged tokens
    assert te.image_tokens(tiny_ckpt / "gse", (1920, 1080)) == 2691
    assert te.image_tokens(tiny_ckpt / "lpr", (512, 512)) == 324
    limits = te.EngineLimits(2691, max_batch_size=4)
    cmd = te.build_command(tmp_path / "ckpt", tmp_path / "engine", limits)
    args = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "trtllm-build" and args["--checkpoint_dir"] == str(tmp_path / "ckpt")
    assert args["--max_multimodal_len"] == str(2691 * 4)  # = max_prompt_embedding_table_size
    assert args["--max_input_len"] == str(2691 + 512) and args["--max_seq_len"] == str(2691 + 512 + 1024)
    assert args["--gemm_plugin"] == args["--gpt_attention_plugin"] == "auto"


def test_export_trtllm_engine_without_tensorrt_llm(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(te, "trtllm_available", lambda: False)
    (tmp_path / "stale").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        te.export_trtllm_engine(tiny_ckpt, tmp_path, precision="fp16")
    args = SimpleNamespace(target="trtllm-engine", checkpoints=tiny_ckpt, out=tmp_path, precision=None, no_build=True,
                           trtllm_examples=None, overwrite=True)
    m = te.run_export_target(args)  # --precision unset: fp16 engines
    assert m["precision"] == "fp16" and not (tmp_path / "stale").exists()
    for stage in ("gse", "lpr"):
        assert (tmp_path / stage / "checkpoint" / "rank0.safetensors").is_file()
        assert not m["stages"][stage]["built"] and m["stages"][stage]["commands"][0].startswith("trtllm-build")
    assert json.loads((tmp_path / "trtllm_manifest.json").read_text())["tensorrt_llm"] == te.TRTLLM_VERSION
    with pytest.raises(RuntimeError, match="pip install 'finers-rt\\[trtllm\\]'"):
        te.build_engine(te.build_command(tmp_path / "c", tmp_path / "e", te.EngineLimits(324)))


def test_int8_smoothquant_shim_and_command(tiny_ckpt, tmp_path, monkeypatch):
    shim = tq.write_qwen2vl_shim(tiny_ckpt / "lpr", tmp_path / "shim")
    assert shim["model_type"] == "qwen2_vl" and shim["architectures"] == ["Qwen2VLForConditionalGeneration"]
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "shim")  # a Qwen2-VL config
    text = getattr(loaded, "text_config", loaded)
    assert text.hidden_size == 64 and text.num_hidden_layers == 2 and text.num_key_value_heads == 2
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "shim" / "model.safetensors"))
    src = te.TensorSource(tiny_ckpt / "lpr")
    assert set(weights) == {n for n in src.names() if not te.is_vision(n)}
    assert all(v.dtype == torch.float16 for v in weights.values())
    cmd = tq.smoothquant_command(tmp_path / "shim", tmp_path / "ckpt", tmp_path / "examples")
    assert cmd[1].endswith("models/core/qwen/convert_checkpoint.py")
    assert cmd[cmd.index("--smoothquant") + 1] == "0.5" and "--per_channel" in cmd and "--per_token" in cmd
    monkeypatch.setattr(tq, "trtllm_available", lambda: False)
    with pytest.raises(RuntimeError, match="int8-sq needs TensorRT-LLM"):
        tq.run_smoothquant(cmd)
    with pytest.raises(ValueError, match="calibration"):
        te.convert_checkpoint(tiny_ckpt / "lpr", tmp_path / "x", "int8-sq")


# ---------------------------------------------------------------------------------------------
# LLM API route


def test_recipes_refused_with_reason():
    assert tq.check_recipe("fp8").min_sm == 89 and tq.check_recipe("int4-awq").min_sm == 80
    for recipe in ("int8", "int8-wo", "int8-sq"):
        with pytest.raises(ValueError, match="--target trtllm-engine"):
            tq.check_recipe(recipe)
    with pytest.raises(ValueError, match="Blackwell"):
        tq.check_recipe("nvfp4")
    with pytest.raises(ValueError, match="unknown recipe"):
        tq.check_recipe("fp4")


def test_quantize_for_trtllm_needs_modelopt(tiny_ckpt, tmp_path):
    import importlib.util

    if importlib.util.find_spec("modelopt") is not None:
        pytest.skip("modelopt is installed; the refusal path is not reachable")
    with pytest.raises(RuntimeError, match="ModelOpt"):
        tq.quantize_for_trtllm(tiny_ckpt / "gse", tmp_path / "q", "int4-awq")
    with pytest.raises(ValueError, match="trtllm-engine"):
        tq.quantize_for_trtllm(tiny_ckpt / "gse", tmp_path / "q", "int8-wo")


def test_llmapi_checkpoint_is_flat_and_the_same_model(tiny_ckpt, tmp_path):
    out = tq.prepare_llmapi_checkpoint(tiny_ckpt / "gse", tmp_path / "gse")
    cfg = json.loads((out / "config.json").read_text())
    assert "text_config" not in cfg and cfg["rope_scaling"]["mrope_section"] == [2, 3, 3]
    assert cfg["rope_scaling"]["type"] == "mrope" and cfg["hidden_size"] == 64 and cfg["vision_token_id"] == 151654
    a = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt / "gse", dtype=torch.float32)
    b = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert b.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    ids = torch.tensor([[151644, 872, 198, 9707, 1879, 151645]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


STAGE_IMAGES = {"gse": (1080, 1920), "lpr": (512, 512)}


@pytest.mark.parametrize("stage", ["gse", "lpr"])
def test_trtllm_inputs_equal_torch_backend_inputs(tiny_ckpt, stage):
    """What TensorRT-LLM's Qwen2-VL input processor makes of our request == what torch_vlm feeds HF."""
    from PIL import Image
    from tokenizers import Tokenizer

    from finers_rt.backends.torch_vlm import TorchGenerator
    from finers_rt.prompts import render_chat

    ck = tiny_ckpt / stage
    image = np.random.default_rng(1).integers(0, 256, (*STAGE_IMAGES[stage], 3), dtype=np.uint8)
    user_text = build_question(stage, "referring", "the small red car")
    # torch backend, exactly as TorchGenerator.generate builds its inputs
    ref = TorchGenerator(ck)
    prompt = ref.render(user_text)
    hf = ref.processor(text=[prompt], images=[Image.fromarray(image)], return_tensors="pt")
    hf_pos, hf_delta = ref.model.model.get_rope_index(
        hf["input_ids"], hf["mm_token_type_ids"], image_grid_thw=hf["image_grid_thw"],
        attention_mask=hf["attention_mask"])
    # trtllm: our request through Qwen2VLInputProcessorBase._preprocess (processor loaded use_fast=True)
    vcfg = VisionPreprocessConfig.from_checkpoint(ck)
    request = tv.llm_request(image, user_text, vcfg)
    assert request["prompt"] == prompt == render_chat(user_text)
    images = request["multi_modal_data"]["image"]
    processor = transformers.AutoProcessor.from_pretrained(ck, use_fast=True)
    got = processor(text=[request["prompt"]], images=images, videos=None, padding=True,
                    do_rescale=not isinstance(images[0], torch.Tensor), return_tensors="pt",
                    **request["mm_processor_kwargs"])
    assert torch.equal(got["input_ids"], hf["input_ids"])
    assert torch.equal(got["image_grid_thw"], hf["image_grid_thw"])
    assert torch.equal(got["pixel_values"], hf["pixel_values"])  # bit-identical
    # ... and both equal finers-rt's own preprocessing (what the ort backend runs)
    ours_pv, grid = pixel_values(image, vcfg)
    assert np.array_equal(got["pixel_values"].numpy(), ours_pv) and list(grid) == got["image_grid_thw"][0].tolist()
    ort_like = SimpleNamespace(tokenizer=Tokenizer.from_file(str(ck / "tokenizer.json")))
    ids = OrtGenerator._prompt_ids(ort_like, prompt, int(np.prod(grid)) // 4)
    assert np.array_equal(ids, got["input_ids"][0].numpy())
    # M-RoPE positions: TensorRT-LLM's get_rope_index is HF's; ours must equal it
    pos, delta = rope_index(ids, np.asarray([grid]))
    assert np.array_equal(pos, hf_pos.numpy()) and delta == int(hf_delta)


def test_unresized_image_is_not_bit_identical(tiny_ckpt):
    """Why the request carries do_resize=False and a pre-rescaled float tensor: the processor's own
    rescale (x / 255 fused into the normalisation) differs from HF's slow path in the last bits."""
    from PIL import Image

    from finers_rt.qwen_vision_host import resize_for_vision

    ck = tiny_ckpt / "lpr"
    vcfg = VisionPreprocessConfig.from_checkpoint(ck)
    image = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    processor = transformers.AutoProcessor.from_pretrained(ck, use_fast=True)
    plain = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                      images=[Image.fromarray(resize_for_vision(image, vcfg))], return_tensors="pt")
    diff = np.abs(plain["pixel_values"].numpy() - pixel_values(image, vcfg)[0]).max()
    assert 0 < diff < 1e-6  # a few float32 ulps (measured 2.4e-7 at 1080p), but not bit-identical


# ---------------------------------------------------------------------------------------------
# generator pieces that run without TensorRT-LLM


def test_sampling_is_greedy_and_explicit():
    kw = tv.sampling_kwargs(64)
    assert kw["top_k"] == 1 and "top_p" not in kw and kw["repetition_penalty"] == 1.0
    assert kw["end_id"] == IM_END_ID and kw["stop_token_ids"] == [ENDOFTEXT_ID] and kw["max_tokens"] == 64
    assert "logits_processor" not in kw


def test_force_tokens_masks_all_but_the_script():
    proc = tv.sampling_kwargs(8, forced_ids=[5, 7])["logits_processor"]
    picked = []
    for _ in range(4):  # past the script: <|im_end|> again (generation stops there anyway)
        logits = torch.randn(1, 1, 151936) * 10
        proc(0, logits, [[1, 2, 3]], None, None)
        assert torch.isinf(logits).sum() == 151935
        picked.append(int(logits.argmax()))
    assert picked == [5, 7, IM_END_ID, IM_END_ID]


def test_output_ids_keep_the_stop_token():
    done = SimpleNamespace(token_ids=[1, 2], finish_reason="stop", stop_reason=None)
    assert tv.output_ids(done) == [1, 2, IM_END_ID]
    by_stop_id = SimpleNamespace(token_ids=[1], finish_reason="stop", stop_reason=ENDOFTEXT_ID)
    assert tv.output_ids(by_stop_id) == [1, ENDOFTEXT_ID]
    cut = SimpleNamespace(token_ids=[1, 2, 3], finish_reason="length", stop_reason=None)
    assert tv.output_ids(cut) == [1, 2, 3]


def test_missing_tensorrt_llm_names_the_install(monkeypatch, tiny_ckpt):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'finers-rt\[trtllm\]'"):
        tv.TrtllmGenerator(tiny_ckpt / "gse")


def test_cli_args_parse(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--checkpoints", type=str)
    p.add_argument("--out", type=str)
    p.add_argument("--precision", default="fp32")
    te.add_trtllm_export_args(p)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(["--checkpoints", "c", "--out", "o", "--target", "trtllm-engine", "--precision", "int8-wo",
                         "--no-build"])
    assert args.target == "trtllm-engine" and args.no_build and args.calib_data is None


# ---------------------------------------------------------------------------------------------
# GPU (skip here)


def _need_gpu():
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None or not torch.cuda.is_available():
        pytest.skip(GPU_REASON)


@pytest.mark.gpu
def test_trtllm_greedy_tokens_match_ort(tmp_path):
    """Greedy and forced tokens of the trtllm generator == the ort backend's, bench-size checkpoints
    (head_dim 64: the tiny preset's 16 is below TensorRT-LLM's attention kernels)."""
    _need_gpu()
    from finers_rt.export.engine import export_engines
    from finers_rt.export.tiny import make_tiny

    make_tiny(tmp_path / "ckpt", seed=0, size="bench")
    export_engines(tmp_path / "ckpt", tmp_path / "ort", overwrite=True, progress=False)
    tq.export_llmapi(tmp_path / "ckpt", tmp_path / "trtllm", precision="bf16")
    for stage, hw in STAGE_IMAGES.items():
        image = np.random.default_rng(3).integers(0, 256, (*hw, 3), dtype=np.uint8)
        text = build_question(stage, "referring", "the small red car")
        ort = OrtGenerator(tmp_path / "ort" / stage)
        trt = tv.TrtllmGenerator(tmp_path / "trtllm" / stage)
        try:
            a = ort.generate(image, text, max_new_tokens=24)
            b = trt.generate(image, text, max_new_tokens=24)
            assert b.token_ids[:8] == a.token_ids[:8]  # bf16 vs fp32: the first tokens must agree
            forced = "<think>x</think><answer>{'bbox': [1, 2, 3, 4]}</answer>"
            assert trt.generate(image, text, max_new_tokens=64, forced_text=forced).text == forced
        finally:
            trt.close()


@pytest.mark.gpu
def test_trtllm_engine_builds(tiny_ckpt, tmp_path):
    _need_gpu()
    m = te.export_trtllm_engine(tiny_ckpt, tmp_path, precision="fp16", build=True)
    assert all(s["built"] for s in m["stages"].values())
