"""Decoder graph parity: numpy M-RoPE ids vs HF, exported logits vs torch, ORT greedy vs HF generate.

The key check is `test_ort_greedy_matches_hf_generate`: the same prompt embeddings (HF's own token
embedding + image-feature merge) fed to our ORT loop with our numpy position ids must give the
token ids HF `generate` gives from input_ids + pixel_values, token for token.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [export] extra")
pytest.importorskip("onnxscript", reason="needs the [export] extra")

from finers_rt.backends.ort_decode import OrtDecoder  # noqa: E402
from finers_rt.config import ENDOFTEXT_ID, IM_END_ID, IMAGE_PAD_ID  # noqa: E402
from finers_rt.qwen_rope import decode_position_ids, rope_index  # noqa: E402

log = logging.getLogger(__name__)

VISION_START, VISION_END = 151652, 151653
STOP_IDS = [IM_END_ID, ENDOFTEXT_ID]
# (H, W) of random test images -> grids after smart_resize: (1,6,8), (1,10,4), (1,16,12).
IMAGE_PROMPTS = [
    ((84, 112), "Where is the small red car? Answer with a box."),
    ((140, 56), "Describe the image."),
    ((224, 168), "Find the person near the tree and give points."),
]


@pytest.fixture(scope="module")
def exported(tiny_engines):
    """(decoder.onnx, embed_tokens.npy, export report) of the GSE decoder from the session's
    `finers-rt export` (export_decoder verified itself there)."""
    graphs = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]
    stage = tiny_engines / "gse"
    return stage / "decoder.onnx", stage / "embed_tokens.npy", graphs["gse/decoder.onnx"]["verification"]


@pytest.fixture(scope="module")
def decoder(exported):
    onnx_path, embed_path, _ = exported
    return OrtDecoder(onnx_path, embed_path)


def _prompt_ids(grid) -> np.ndarray:
    """Text, then <|vision_start|> + the grid's image tokens + <|vision_end|> (if any), then text."""
    rng = np.random.default_rng(0)
    before, after = rng.integers(0, 151643, 15), rng.integers(0, 151643, 23)
    if grid is None:
        return np.concatenate([before, after]).astype(np.int64)
    n_image = grid[0] * grid[1] * grid[2] // 4
    image = np.concatenate([[VISION_START], np.full(n_image, IMAGE_PAD_ID), [VISION_END]])
    return np.concatenate([before, image, after]).astype(np.int64)


# ------------------------------------------------------------------------------- (a) rope index


@pytest.mark.parametrize("grid", [(1, 78, 138), (1, 36, 36), None], ids=["1080p", "lpr-512", "text-only"])
def test_rope_index_matches_hf(hf, grid):
    model, _ = hf
    ids = _prompt_ids(grid)
    ours, delta = rope_index(ids, None if grid is None else np.asarray([grid]))
    ids_t = torch.from_numpy(ids)[None]
    expected, expected_delta = model.model.get_rope_index(
        ids_t, mm_token_type_ids=(ids_t == IMAGE_PAD_ID).int(),
        image_grid_thw=None if grid is None else torch.tensor([grid]),
    )
    assert ours.dtype == np.int64 and ours.shape == (3, 1, len(ids))
    np.testing.assert_array_equal(ours, expected.numpy())
    assert delta == int(expected_delta)
    np.testing.assert_array_equal(decode_position_ids(len(ids), delta), np.full((3, 1, 1), len(ids) + delta))


def test_rope_index_rejects_wrong_token_count():
    ids = _prompt_ids((1, 4, 4))
    with pytest.raises(ValueError, match="image tokens"):
        rope_index(ids, np.asarray([[1, 4, 8]]))


# ------------------------------------------------------------------------- (b) logits vs torch


def test_export_verified_against_torch(exported):
    _, _, report = exported
    log.info("decoder export report: %s", report)
    assert report["prefill_len"] == 300 and report["decode_steps"] == 5
    assert report["max_abs_diff"] <= report["atol"] and report["argmax_equal"]


def test_batched_left_padded_logits_match_torch(hf, exported):
    """B=2, row 0 left-padded by 3: prefill then one decode step, vs HF's text model + lm_head."""
    import onnxruntime as ort
    from transformers import DynamicCache

    model, _ = hf
    onnx_path, _, report = exported
    text, lm_head = model.model.language_model, model.lm_head
    gen = torch.Generator().manual_seed(1)
    batch, seq, hidden = 2, 11, text.config.hidden_size
    embeds = torch.randn(batch, seq, hidden, generator=gen) * 0.02
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0).expand(3, batch, seq).contiguous()  # [3, B, S]
    step_embeds = torch.randn(batch, 1, hidden, generator=gen) * 0.02
    step_mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
    step_pos = positions[:, :, -1:] + 1

    cache = DynamicCache(config=text.config)
    with torch.no_grad():
        ref = [lm_head(text(inputs_embeds=e, position_ids=p, attention_mask=m, past_key_values=cache,
                            use_cache=True).last_hidden_state[:, -1]).numpy()
               for e, p, m in [(embeds, positions, mask), (step_embeds, step_pos, step_mask)]]

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in session.get_inputs()[3:]]
    past = {n: np.zeros((batch, 2, 0, 16), np.float32) for n in past_names}
    outs = session.run(None, {"inputs_embeds": embeds.numpy(), "position_ids": positions.numpy(),
                              "attention_mask": mask.numpy(), **past})
    past = dict(zip(past_names, outs[1:]))
    outs2 = session.run(None, {"inputs_embeds": step_embeds.numpy(), "position_ids": step_pos.numpy(),
                               "attention_mask": step_mask.numpy(), **past})
    for expected, actual in zip(ref, [outs[0], outs2[0]]):
        assert actual.shape == (batch, text.config.vocab_size)
        np.testing.assert_allclose(actual, expected, atol=report["atol"], rtol=0)
    assert outs2[1].shape == (batch, 2, seq + 1, 16)


# ------------------------------------------------------------------ (c) ORT greedy vs HF generate


def _hf_inputs(processor, size, question):
    from PIL import Image

    rng = np.random.default_rng(size[0] * 1000 + size[1])
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], images=[image], return_tensors="pt")


def _merged_embeds(model, inputs) -> np.ndarray:
    """(S, H) prompt embeddings the HF way: token embeddings with image features scattered in."""
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])[0]
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        embeds[inputs["input_ids"][0] == IMAGE_PAD_ID] = torch.cat(feats, dim=0)
    return embeds.numpy()


@pytest.mark.parametrize("size,question", IMAGE_PROMPTS, ids=["6x8", "10x4", "16x12"])
def test_ort_greedy_matches_hf_generate(hf, decoder, size, question):
    model, processor = hf
    inputs = _hf_inputs(processor, size, question)
    prompt_len = inputs["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=64, eos_token_id=STOP_IDS,
                             repetition_penalty=1.0, pad_token_id=ENDOFTEXT_ID, temperature=None,
                             top_p=None, top_k=None)
    hf_ms = (time.perf_counter() - t0) * 1e3
    expected = out[0, prompt_len:].tolist()

    ids = inputs["input_ids"][0].numpy()
    positions, delta = rope_index(ids, inputs["image_grid_thw"].numpy())
    actual, timings = decoder.greedy(_merged_embeds(model, inputs), positions, delta, max_new_tokens=64)
    log.info("prompt %d tokens, %d new: ORT prefill %.1f ms, decode %.2f ms/token; HF generate %.1f ms total",
             prompt_len, len(actual), timings["prefill"], timings["decode"] / max(len(actual) - 1, 1), hf_ms)
    assert actual == expected


# ------------------------------------------------------------------ (d) forced mode, (e) providers


def test_forced_mode_emits_script_then_im_end(decoder):
    embeds = decoder.embed(_prompt_ids(None))
    positions, delta = rope_index(_prompt_ids(None), None)
    forced = [9707, 1879, 0, 11]
    ids, timings = decoder.greedy(embeds, positions, delta, max_new_tokens=16, forced_ids=forced)
    assert ids == forced + [IM_END_ID]
    assert set(timings) == {"prefill", "decode"}
    # The cap still applies to a longer script.
    ids, _ = decoder.greedy(embeds, positions, delta, max_new_tokens=2, forced_ids=forced)
    assert ids == forced[:2]


@pytest.mark.filterwarnings("ignore:Specified provider")  # ORT's own warning before it falls back
def test_missing_provider_raises(exported):
    import onnxruntime as ort

    onnx_path, embed_path, _ = exported
    absent = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")
              if p not in ort.get_available_providers()]
    if not absent:
        pytest.skip("every GPU provider this test knows is installed")
    missing = absent[0]
    with pytest.raises(RuntimeError, match=missing):
        OrtDecoder(onnx_path, embed_path, providers=[missing, "CPUExecutionProvider"])
