"""The `ort` backend against the `torch` reference on tiny checkpoints (real image sizes).

Expected values come from the torch backend (HF `generate`, the sam2 package), never from ort.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="the torch reference needs the [export] extra")

from finers_rt.manifest import MANIFEST, StaleEngineError  # noqa: E402
from finers_rt.pipeline import Pipeline  # noqa: E402

W, H = 3840, 2160
QUESTIONS = ["the red car", "What colour is the boat near the pier?", "Which option fits: the tower?",
             "small white truck", "person on the roof"]


@pytest.fixture(scope="module")
def torch_pipe(tiny_ckpt):
    return Pipeline.from_checkpoints(tiny_ckpt, backend="torch")


@pytest.fixture(scope="module")
def ort_pipe(tiny_engines):
    return Pipeline.from_engines(tiny_engines, device="cpu")


def _image(seed, w, h):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.mark.parametrize("stage,size", [("gse", (1920, 1080)), ("lpr", (512, 512))])
def test_greedy_tokens_identical_to_hf_generate(torch_pipe, ort_pipe, stage, size):
    """5 image/question pairs per stage, 64 new tokens each, unforced (random weights)."""
    ref_gen = getattr(torch_pipe, stage).generator
    ort_gen = getattr(ort_pipe, stage).generator
    for i, q in enumerate(QUESTIONS):
        img = _image(100 + i, *size)
        text = f"Please find '{q}'."
        ref = ref_gen.generate(img, text, max_new_tokens=64)
        got = ort_gen.generate(img, text, max_new_tokens=64)
        assert got.prompt == ref.prompt
        assert got.token_ids == ref.token_ids, f"{stage} pair {i}: tokens differ"
        assert got.text == ref.text
        assert len(ref.token_ids) == 64 or ref.token_ids[-1] in (151645, 151643)


def test_prompt_embeddings_equal_table_lookup_then_image_merge(ort_pipe):
    """`_embeds` skips the table rows the image overwrites: same bytes as looking every id up and
    assigning the image rows over the <|image_pad|> ones."""
    from finers_rt.config import IMAGE_PAD_ID

    gen = ort_pipe.lpr.generator
    image_embeds = np.random.default_rng(0).standard_normal((324, gen.decoder.table.shape[1])).astype(np.float32)
    ids = gen._prompt_ids("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>the red car<|im_end|>", 324)
    expected = gen.decoder.embed(ids)
    expected[ids == IMAGE_PAD_ID] = image_embeds
    assert gen._embeds(ids, image_embeds).tobytes() == expected.tobytes()


def test_sessions_stop_spinning_and_once_per_stage_graphs_skip_the_memory_pattern(ort_pipe):
    """Every ORT thread pool stops spinning when a run returns (ORT's default keeps a core busy
    ~60 ms, while the host work or the next session wants it). Vision and SAM2 run once per stage:
    no memory pattern is planned for them (it makes the second run allocate, and fault in, a fresh
    block); the decoders keep ORT's default."""
    once = [ort_pipe.gse.generator.vision.session, ort_pipe.lpr.generator.vision.session,
            ort_pipe.sam2.encoder, ort_pipe.sam2.decoder]
    decoders = [ort_pipe.gse.generator.decoder.session, ort_pipe.lpr.generator.decoder.session]
    for session in once + decoders:
        options = session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert options.enable_mem_pattern is (session not in once)


def _forced(task, response):
    return {
        "gse": f"<think>t</think><answer>{{'bbox': [1700,900,1956,1156], 'response': '{response}'}}</answer>",
        "lpr": "<answer>{'bbox': [100,120,300,260], 'points_1': [150,170], 'points_2': [220,200]}</answer>",
    }


@pytest.mark.parametrize("task,options,response", [
    ("referring", None, "The object is found."),
    ("reasoning", None, "white"),
    ("option", ["A. red", "B. white"], "B"),
])
def test_forced_results_equal_torch(torch_pipe, ort_pipe, task, options, response):
    img = _image(7, W, H)  # a border case: the GSE box runs past the right/bottom edge
    kw = dict(task=task, options=options, force_output=_forced(task, response))
    ref = torch_pipe.run(img, "q", **kw)
    got = ort_pipe.run(img, "q", **kw)
    assert got.backend == "ort" and got.forced
    for field in ("answer", "gse_box", "crop_box", "lpr_box", "points", "parse", "prompts", "texts", "tokens"):
        assert getattr(got, field) == getattr(ref, field), field
    inter = np.logical_and(got.mask, ref.mask).sum()
    union = np.logical_or(got.mask, ref.mask).sum()
    assert union > 0 and inter / union >= 0.999
    assert got.sam2_score == pytest.approx(ref.sam2_score, abs=1e-3)


def test_ort_pipeline_imports_no_torch(tiny_engines, tmp_path):
    """A full ort run in a fresh interpreter leaves torch and transformers unimported."""
    img = tmp_path / "f.png"
    Image.fromarray(_image(3, 1280, 720)).save(img)
    code = f"""
import json, sys
from finers_rt import Pipeline
p = Pipeline.from_engines({str(tiny_engines)!r}, device="cpu")
f = {json.dumps(_forced("referring", "The object is found."))}
r = p.run({str(img)!r}, "the car", force_output=f)
assert r.parse == {{"gse": "ok", "lpr": "ok"}}, r.parse
heavy = sorted(m for m in ("torch", "transformers", "sam2", "cv2") if m in sys.modules)
print(json.dumps(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_missing_provider_is_an_error(tiny_engines):
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        Pipeline.from_engines(tiny_engines, device="cuda")


def test_stale_manifest_refused_with_rebuild_command(tiny_engines, tmp_path):
    import shutil

    copy = tmp_path / "eng"
    shutil.copytree(tiny_engines, copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["graphs"]["gse/vision.onnx"]["spec_digest"] = "0" * 16
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StaleEngineError, match="finers-rt export --checkpoints .* --overwrite"):
        Pipeline.from_engines(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(StaleEngineError, match="not a finers-rt engine folder"):
        Pipeline.from_engines(copy)
