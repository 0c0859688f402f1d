"""Batched runs on the `ort` backend (CPU) equal single runs: graph, greedy loop, generator, pipeline.

Expected values come from the batch-1 path (`OrtDecoder.greedy`, `OrtGenerator.generate`,
`Pipeline.run`), itself checked against torch in test_decoder_onnx.py / test_pipeline_ort.py.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from finers_rt.backends import ort_batch as ob
from finers_rt.backends.ort_batch import (
    BUCKETS,
    Prompt,
    _shrink_to,
    bucket_rows,
    greedy_batch,
    left_pad,
)
from finers_rt.backends.ort_decode import OrtDecoder
from finers_rt.batch import Request, run_batch
from finers_rt.config import GSE, IM_END_ID, IMAGE_PAD_ID, LPR, PipelineConfig
from finers_rt.image import ImageLoadError
from finers_rt.pipeline import Pipeline
from finers_rt.qwen_rope import rope_index
from finers_rt.vlm import Generation

VISION_START, VISION_END = 151652, 151653
# (text before, image grid (T, H, W) in patches, text after): 4 prompts of 4 different lengths.
PROMPT_SHAPES = [(5, (1, 4, 6), 7), (15, (1, 8, 4), 3), (2, (1, 2, 2), 1), (30, (1, 6, 6), 20)]
# Logits of a left-padded row vs batch 1: fp32 reassociation only (longer masked softmax rows,
# other GEMM blocking); measured <= 2e-7 on the tiny checkpoints (logits ~1).
LOGITS_ATOL = 1e-5


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def decoder(tiny_engines):
    stage = tiny_engines / "gse"
    return OrtDecoder(stage / "decoder.onnx", stage / "embed_tokens.npy")


def _prompt(decoder, rng, before, grid, after, forced=None) -> Prompt:
    """Random text ids around an image block; image rows get random features (as vision would)."""
    n_image = grid[0] * grid[1] * grid[2] // 4
    ids = np.concatenate([rng.integers(0, 151643, before), [VISION_START], np.full(n_image, IMAGE_PAD_ID),
                          [VISION_END], rng.integers(0, 151643, after)]).astype(np.int64)
    positions, delta = rope_index(ids, np.asarray([grid]))
    embeds = decoder.embed(ids)
    embeds[ids == IMAGE_PAD_ID] = rng.normal(0, 0.02, (n_image, embeds.shape[1]))
    return Prompt(embeds, positions, delta, forced)


@pytest.fixture(scope="module")
def prompts(decoder):
    rng = np.random.default_rng(0)
    return [_prompt(decoder, rng, *shape) for shape in PROMPT_SHAPES]


# ------------------------------------------------- (a) the decoder graph: left-padded batch == batch 1


def _feeds(decoder, embeds, positions, mask, past):
    names = dict(zip(decoder.past_names, past))
    return {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask, **names}


def _single_steps(decoder, p: Prompt, steps: int):
    """Batch-1 logits [V] of the prefill and `steps` greedy steps; also the tokens fed."""
    kv = [np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), np.float32) for _ in decoder.past_names]
    x, pos, seq = p.embeds[None], p.position_ids, p.embeds.shape[0]
    logits, tokens = [], []
    for t in range(steps + 1):
        out = decoder.session.run(None, _feeds(decoder, x, pos, np.ones((1, seq + t), np.int64), kv))
        logits.append(out[0][0])
        kv, tokens = out[1:], tokens + [int(out[0].argmax())]
        x = decoder.embed([tokens[-1]])[None]
        pos = np.full((3, 1, 1), seq + t + p.rope_delta, np.int64)
    return logits, tokens


def _batched_steps(decoder, prompts: list[Prompt], tokens: list[list[int]], steps: int, rows: int):
    """Left-padded batch (+ all-padding dummy rows up to `rows`): logits [rows, V] per step, each
    row fed the tokens its batch-1 run chose. Built by hand here, independent of ort_batch."""
    L, H = max(p.embeds.shape[0] for p in prompts), prompts[0].embeds.shape[1]
    embeds, pos = np.zeros((rows, L, H), np.float32), np.ones((3, rows, L), np.int64)
    mask, pads = np.zeros((rows, L), np.int64), np.zeros(rows, np.int64)
    for r, p in enumerate(prompts):
        pads[r] = L - p.embeds.shape[0]
        embeds[r, pads[r]:], pos[:, r, pads[r]:], mask[r, pads[r]:] = p.embeds, p.position_ids[:, 0], 1
    kv = [np.zeros((rows, decoder.kv_heads, 0, decoder.head_dim), np.float32) for _ in decoder.past_names]
    deltas = np.array([p.rope_delta for p in prompts] + [0] * (rows - len(prompts)))
    logits = []
    for t in range(steps + 1):
        out = decoder.session.run(None, _feeds(decoder, embeds, pos, mask, kv))
        logits.append(out[0])
        kv = out[1:]
        fed = [tokens[r][t] if r < len(prompts) else IM_END_ID for r in range(rows)]
        embeds = decoder.embed(fed)[:, None]
        pos = np.broadcast_to((L + t - pads + deltas)[None, :, None], (3, rows, 1)).copy()
        mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
    return logits


@pytest.mark.parametrize("rows", [4, 8], ids=["B4", "B4+4dummy"])
def test_graph_left_padded_batch_equals_batch1(decoder, prompts, rows):
    """Prefill + 3 decode steps: every real row's logits == its batch-1 logits (dummy rows too)."""
    steps = 3
    single = [_single_steps(decoder, p, steps) for p in prompts]
    batched = _batched_steps(decoder, prompts, [tok for _, tok in single], steps, rows)
    for r, (logits, _) in enumerate(single):
        for t in range(steps + 1):
            diff = np.abs(batched[t][r] - logits[t]).max()
            assert diff <= LOGITS_ATOL, f"row {r} step {t}: max abs diff {diff:.3g}"
            assert batched[t][r].argmax() == logits[t].argmax(), f"row {r} step {t}: argmax differs"
    assert all(np.isfinite(b).all() for b in batched), "dummy rows must stay finite (no NaN from a fully masked row)"


# ------------------------------------------------------------ (b) batched greedy == single greedy


def test_bucket_rows_and_shrink_targets():
    assert [bucket_rows(n, None) for n in (1, 3, 9)] == [1, 3, 9]
    assert [bucket_rows(n, BUCKETS) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="exceed the largest batch bucket 8"):
        bucket_rows(9, BUCKETS)
    finished = np.array([True, False, True, True, False, True, True, True])
    assert _shrink_to(finished, None).tolist() == [1, 4]
    assert _shrink_to(finished, BUCKETS).tolist() == [1, 4]
    assert _shrink_to(np.array([False, False, True, False]), BUCKETS) is None  # 3 live still need 4
    assert _shrink_to(np.array([True, False, True, True]), BUCKETS).tolist() == [1]


def test_dummy_rows_do_not_change_real_rows_prefill(decoder, prompts):
    """left_pad with dummy rows up to a bucket: the real rows' prefill logits stay the same."""
    out = {}
    for rows in (3, 4, 8):
        batch = left_pad(prompts[:3], rows, max_new_tokens=1)
        kv = [np.zeros((rows, decoder.kv_heads, 0, decoder.head_dim), np.float32) for _ in decoder.past_names]
        out[rows] = decoder.session.run(["logits"], _feeds(decoder, batch.embeds, batch.position_ids,
                                                           np.ascontiguousarray(batch.mask[:, :batch.length]), kv))[0]
    for rows in (4, 8):
        assert np.abs(out[rows][:3] - out[3]).max() <= LOGITS_ATOL
        assert (out[rows][:3].argmax(1) == out[3].argmax(1)).all()


FORCED = {"none": [None] * 4, "all": [[11, 12, 13], list(range(100, 110)), list(range(200, 225)), []],
          "mixed": [list(range(300, 306)), None, [7] * 17, None]}


def _record_logits(monkeypatch, decoder):
    """Record every step's logits row: batch 1 via the decoder's `_pick`, batched via `_Rows.pick`
    (which knows the prompt index of each batch row). Returns {"single": [...], "batch": {}}."""
    seen = {"single": [], "batch": {}}
    single_pick, batch_pick = OrtDecoder._pick, ob._Rows.pick

    def pick_single(logits, forced_ids, step):
        seen["single"].append(logits[0].copy())
        return single_pick(logits, forced_ids, step)

    def pick_batch(rows, logits, step, live):
        for i, r in enumerate(live):
            if not rows.finished[r]:
                seen["batch"][(int(r), step)] = logits[i].copy()
        return batch_pick(rows, logits, step, live)

    monkeypatch.setattr(decoder, "_pick", pick_single)  # instance attribute: batch 1 only
    monkeypatch.setattr(ob._Rows, "pick", pick_batch)
    return seen


@pytest.mark.parametrize("mode", sorted(FORCED))
@pytest.mark.parametrize("n", [4, 3])
@pytest.mark.parametrize("buckets,shrink", [(None, True), (None, False), (BUCKETS, True), (BUCKETS, False)],
                         ids=["drop", "keep", "bucket-drop", "bucket-keep"])
def test_batched_greedy_equals_single(monkeypatch, decoder, prompts, mode, n, buckets, shrink):
    """Per row, the ids `OrtDecoder.greedy` gives and, at every step, its logits: 4 prompt lengths,
    per-row forced scripts of 0/3/6/10/17/25 tokens (different stop steps), 3 prompts padded to
    bucket 4 with a dummy row. Logits are compared too: on random tiny weights the argmax barely
    depends on positions, so ids alone would miss a wrong decode position."""
    seen = _record_logits(monkeypatch, decoder)
    batch = [dataclasses.replace(p, forced_ids=f) for p, f in zip(prompts[:n], FORCED[mode])]
    ids, t = greedy_batch(decoder, batch, max_new_tokens=30, buckets=buckets, shrink=shrink)
    for r, p in enumerate(batch):
        seen["single"].clear()
        ref, _ = decoder.greedy(p.embeds, p.position_ids, p.rope_delta, max_new_tokens=30, forced_ids=p.forced_ids)
        assert ids[r] == ref, f"row {r}: batched ids differ from batch 1"
        for step, logits in enumerate(seen["single"]):
            diff = np.abs(seen["batch"][(r, step)] - logits).max()
            assert diff <= LOGITS_ATOL, f"row {r} step {step}: logits differ by {diff:.3g}"
    assert t["rows"] == (4 if buckets else n)
    if mode == "all":
        assert [len(x) for x in ids] == [len(f) + 1 for f in FORCED[mode][:n]]  # script + <|im_end|>
        assert ids[0][-1] == IM_END_ID
        assert t["shrinks"] > 0 if shrink else t["shrinks"] == 0


# --------------------------------------------------------- OrtGenerator.generate_batch == generate


def _image(seed, w, h):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.mark.parametrize("buckets", [None, BUCKETS], ids=["plain", "buckets"])
def test_generate_batch_equals_generate(tiny_engines, buckets):
    from finers_rt.backends.ort_vlm import OrtGenerator

    gen = OrtGenerator(tiny_engines / "lpr", batch_buckets=buckets)
    images = [_image(1, 512, 512), _image(2, 336, 504), _image(3, 200, 120)]  # 3 patch grids
    texts = ["Please find 'the car'.", "Where is the small boat near the pier?", "Describe."]
    forced = ["<answer>{'bbox': [1,2,3,4]}</answer>", None, "ok"]
    got = gen.generate_batch(images, texts, max_new_tokens=24, forced_texts=forced)
    for i, g in enumerate(got):
        ref = gen.generate(images[i], texts[i], max_new_tokens=24, forced_text=forced[i])
        assert (g.prompt, g.token_ids, g.text) == (ref.prompt, ref.token_ids, ref.text), f"prompt {i}"
        assert g.batch_size == 3 and set(g.timings_ms) == set(ref.timings_ms)
    assert gen.generate_batch([], [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="equally many"):
        gen.generate_batch(images, texts[:2], max_new_tokens=4)


# ------------------------------------------------------ (c) Pipeline.run_batch == Pipeline.run


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class _Recorder:
    """A Generator wrapper keeping every Generation's token ids, in call order."""

    def __init__(self, inner):
        self.inner, self.token_ids = inner, []

    def generate(self, *args, **kw):
        gen = self.inner.generate(*args, **kw)
        self.token_ids.append(gen.token_ids)
        return gen

    def generate_batch(self, *args, **kw):
        gens = self.inner.generate_batch(*args, **kw)
        self.token_ids += [g.token_ids for g in gens]
        return gens

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def ort_pipe(tiny_engines):
    # 128 new tokens bound the unforced (random-weight) outputs; the forced ones are shorter.
    cfg = PipelineConfig(gse=dataclasses.replace(GSE, max_new_tokens=128),
                         lpr=dataclasses.replace(LPR, max_new_tokens=128))
    return Pipeline.from_engines(tiny_engines, device="cpu", config=cfg)


LPR_FULL = "<answer>{'bbox': [100,120,300,260], 'points_1': [150,170], 'points_2': [220,200]}</answer>"
REQUESTS = [
    # full path, GSE box over the right/bottom border of a 4K frame, long forced think
    Request(_image(7, 3840, 2160), "the red car", "referring", None, {
        "gse": "<think>the red car is parked on the right, next to the white van</think><answer>"
               "{'bbox': [1700,900,1956,1156], 'response': 'The object is found.'}</answer>",
        "lpr": LPR_FULL}),
    # option task, the image as PNG bytes (decoded to PIL: the crop comes from PIL); LPR gives a
    # box only (no_points), so SAM2 runs on the box
    Request(_png(_image(8, 1280, 720)), "Which option fits: the tower?", "option", ["A. red", "B. white"], {
        "gse": "<answer>{'bbox': [10,20,266,276], 'response': 'B'}</answer>",
        "lpr": "<answer>{'bbox': [10,12,400,500]}</answer>"}),
    # reasoning; GSE forced, LPR unforced (random weights: batched free-running decode in LPR)
    Request(_image(9, 640, 480), "What colour is the boat near the pier?", "reasoning", None, {
        "gse": "<think>boat</think><answer>{'bbox': [900,500,1156,756], 'response': 'white'}</answer>"}),
    # nothing forced: the random GSE gives no box, so this request stops after GSE
    Request(_image(10, 1000, 1500), "person on the roof", "referring"),
]
SAME_FIELDS = ("task", "question", "options", "answer", "image_size", "prompts", "texts", "think", "parse",
               "parse_reason", "gse_box", "crop_box", "lpr_box", "points", "sam2_score", "tokens",
               "backend", "precision", "forced", "config", "version")


def test_run_batch_equals_single_runs(ort_pipe):
    """4 different requests (image sizes, tasks, forced lengths, one stopping after GSE)."""
    stages = {s: getattr(ort_pipe, s) for s in ("gse", "lpr")}
    originals = {s: stage.generator for s, stage in stages.items()}
    try:
        single_rec = {s: _Recorder(g) for s, g in originals.items()}
        for s, stage in stages.items():
            stage.generator = single_rec[s]
        singles = [ort_pipe.run(r.image, r.question, task=r.task, options=r.options,
                                force_output=r.force_output) for r in REQUESTS]
        batch_rec = {s: _Recorder(g) for s, g in originals.items()}
        for s, stage in stages.items():
            stage.generator = batch_rec[s]
        batched = ort_pipe.run_batch(REQUESTS)
    finally:
        for s, stage in stages.items():
            stage.generator = originals[s]

    assert singles[3].gse_box is None and singles[3].crop_box is None, "premise: request 3 stops after GSE"
    assert all(singles[i].gse_box is not None for i in range(3)) and singles[0].parse["lpr"] == "ok"
    assert len(batched) == len(singles)
    for i, (ref, got) in enumerate(zip(singles, batched)):
        for name in SAME_FIELDS:
            assert getattr(got, name) == getattr(ref, name), f"request {i}: {name}"
        # SAM2 runs per crop on identical inputs, so masks are bitwise equal (no IoU tolerance needed)
        assert got.mask.dtype == bool and np.array_equal(got.mask, ref.mask), f"request {i}: mask"
        assert set(got.timings_ms) == set(ref.timings_ms), f"request {i}: timing keys"
    assert batched[0].mask.any() and batched[1].mask.any()
    for s in ("gse", "lpr"):  # token ids, request order (only requests that reach the stage)
        assert batch_rec[s].token_ids == single_rec[s].token_ids, s


# --------------------------------------------------- (d) empty batch, bad requests, torch fallback


class _Forbidden:
    """A generator / SAM2 stand-in that fails the test if any model runs."""

    def __getattr__(self, name):
        if name in ("generate", "generate_batch", "set_image", "predict"):
            raise AssertionError(f"{name} ran although a request was invalid")
        raise AttributeError(name)


def _forbidden_pipe():
    return Pipeline(_Forbidden(), _Forbidden(), _Forbidden())


def test_empty_batch_is_empty():
    assert _forbidden_pipe().run_batch([]) == []


@pytest.mark.parametrize("bad,match", [
    (Request(np.zeros((8, 8, 3), np.uint8), "q", "bogus"), "task must be one of"),
    (Request(np.zeros((8, 8, 3), np.uint8), "q", "option"), "task 'option' needs options"),
    (Request(np.zeros((8, 8, 3), np.uint8), "q", "referring", ["A"]), "options are only used"),
    (Request(np.zeros((8, 8, 3), np.uint8), 42), "question must be a str"),
    (Request(np.zeros((8, 8, 3), np.uint8), "q", force_output={"sam2": "x"}), "force_output must be a dict"),
    (Request(12345, "q"), "image must be a path"),
    (Request(np.zeros((8, 8), np.uint8), "q"), "array images must be"),
    (Request("/nonexistent/frame.png", "q"), "image file not found"),
    ("not a request", "expected a finers_rt.batch.Request"),
], ids=["task", "no-options", "stray-options", "question", "force-key", "image-type", "gray-array",
        "missing-file", "not-request"])
def test_bad_request_raises_before_any_model(bad, match):
    good = Request(np.zeros((16, 16, 3), np.uint8), "q")
    with pytest.raises(ValueError, match=f"request 2: .*{match}"):
        _forbidden_pipe().run_batch([good, good, bad, good])


def test_bad_image_is_an_image_load_error(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="request 1: .*cannot decode"):
        _forbidden_pipe().run_batch([Request(np.zeros((16, 16, 3), np.uint8), "q"), Request(broken, "q")])


class _ScriptedGenerator:
    """A Generator without generate_batch (like the torch reference): returns its forced text."""

    def __init__(self):
        self.calls = 0

    def generate(self, image, user_text, *, max_new_tokens, forced_text=None):
        self.calls += 1
        ids = list(range(len(forced_text or "")))
        t = {"preprocess": 0.0, "vision": 0.0, "prefill": 0.0, "decode": 0.0}
        return Generation(text=forced_text or "", token_ids=ids, prompt=user_text, timings_ms=t)

    def close(self):
        pass


def test_generator_without_generate_batch_runs_per_request():
    gse = _ScriptedGenerator()
    pipe = Pipeline(gse, _Forbidden(), _Forbidden())
    reqs = [Request(np.full((40, 60, 3), i, np.uint8), f"q{i}", force_output={"gse": f"no box {i}"})
            for i in range(3)]
    results = run_batch(pipe, reqs)
    assert gse.calls == 3
    assert [r.texts["gse"] for r in results] == ["no box 0", "no box 1", "no box 2"]
    assert all(r.parse["gse"] == "no_json" and not r.mask.any() for r in results)
