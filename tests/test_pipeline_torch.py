"""End-to-end `torch` pipeline on tiny random-weight checkpoints, in forced-output mode.

Expected coordinates are computed by hand in the comments; expected masks come from calling the
`sam2` package's predictor directly; expected stage inputs from PIL directly.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="needs the [export] extra")
pytest.importorskip("sam2", reason="needs the [export] extra")

from finers_rt.config import IM_END_ID, PipelineConfig  # noqa: E402
from finers_rt.pipeline import Pipeline  # noqa: E402
from finers_rt.prompts import build_question, render_chat  # noqa: E402

W, H = 3840, 2160


class Recorder:
    """Wraps a Generator / SegmentPredictor and records every call's arguments."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)

        return call


class BoxFillSAM:
    """A SegmentPredictor whose mask is exactly the prompted box (to check the paste geometry)."""

    def set_image(self, image):
        self.hw = image.shape[:2]

    def predict(self, box, points, labels, multimask_output=True):
        m = np.zeros(self.hw, dtype=bool)
        x0, y0, x1, y1 = (int(v) for v in box)
        m[y0:y1, x0:x1] = True
        return m[None], np.array([1.0], dtype=np.float32)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    p = Pipeline.from_checkpoints(tiny_ckpt, backend="torch")
    yield p
    p.close()


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (H // 16, W // 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((W, H), Image.BILINEAR))


def _with(pipe, **parts):
    """A Pipeline sharing `pipe`'s models with some parts replaced."""
    cfg = parts.pop("config", pipe.config)
    args = {"gse": pipe.gse.generator, "lpr": pipe.lpr.generator, "sam2": pipe.sam2, **parts}
    return Pipeline(args["gse"], args["lpr"], args["sam2"], config=cfg, backend="torch", precision="fp32")


def _texts(gse_box, lpr_box, p1, p2, response="The object is found."):
    return {
        "gse": f"<think>t</think><answer>{{'bbox': {gse_box}, 'response': '{response}'}}</answer>",
        "lpr": f"<think>t</think><answer>{{'bbox': {lpr_box}, 'points_1': {p1}, 'points_2': {p2}}}</answer>",
    }


def _sam2_reference(tiny_ckpt, crop, box, points):
    """The best mask straight from the sam2 package predictor, as the authors call it."""
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    pred = SAM2ImagePredictor(build_sam2("configs/sam2/sam2_hiera_t.yaml",
                                         str(tiny_ckpt / "sam2" / "sam2_hiera_tiny.pt"), device="cpu"))
    with torch.inference_mode():
        pred.set_image(crop)
        masks, scores, _ = pred.predict(point_coords=np.array(points), point_labels=[1, 1],
                                        box=np.array(box), multimask_output=True)
    return masks[np.argsort(scores)[::-1][0]].astype(bool)


CASES = {
    # GSE [500,300,756,556] x (3840/1920, 2160/1080) = (1000,600,1512,1112); centre (1256,856),
    # side 512 -> crop (1000,600,1512,1112), 512x512, LPR factor 1: LPR box/points + crop origin.
    "interior": dict(
        texts=_texts([500, 300, 756, 556], [100, 120, 200, 220], [150, 170], [160, 180]),
        gse_box=(1000, 600, 1512, 1112), crop=(1000, 600, 1512, 1112),
        sam_box=(100, 120, 200, 220), sam_points=[(150, 170), (160, 180)],
        lpr_box=(1100, 720, 1200, 820), points=[(1150, 770), (1160, 780)],
    ),
    # GSE [1800,1000,1920,1080] x 2 = (3600,2000,3840,2160); centre (3720,2080), side 512 ->
    # x 3464..3976 -> 3839, y 1824..2336 -> 2159: crop 375x335. LPR factors 375/512, 335/512:
    # 256 -> 187.5 -> 188 (half to even), 167.5 -> 168; 400 -> 292.97 -> 293, 261.72 -> 262;
    # (300,300) -> (219.73, 196.29) -> (220,196); (320,310) -> (234.38, 202.83) -> (234,203).
    "border": dict(
        texts=_texts([1800, 1000, 1920, 1080], [256, 256, 400, 400], [300, 300], [320, 310]),
        gse_box=(3600, 2000, 3840, 2160), crop=(3464, 1824, 3839, 2159),
        sam_box=(188, 168, 293, 262), sam_points=[(220, 196), (234, 203)],
        lpr_box=(3652, 1992, 3757, 2086), points=[(3684, 2020), (3698, 2027)],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forced_chain_hand_computed(pipe, frame, tiny_ckpt, name):
    case = CASES[name]
    sam = Recorder(pipe.sam2)
    res = _with(pipe, sam2=sam).run(frame, "the red car", task="referring", force_output=case["texts"])
    assert res.forced and res.parse == {"gse": "ok", "lpr": "ok"}
    assert res.gse_box == case["gse_box"]
    assert res.crop_box == case["crop"]
    assert res.lpr_box == case["lpr_box"]
    assert res.points == case["points"]
    # SAM2 saw the native-resolution crop and the prompt in crop pixels.
    (_, (img,), _), (_, (box, pts, labels, multi), _) = sam.calls
    x0, y0, x1, y1 = case["crop"]
    np.testing.assert_array_equal(img, frame[y0:y1, x0:x1])
    np.testing.assert_array_equal(box, case["sam_box"])
    np.testing.assert_array_equal(pts, case["sam_points"])
    np.testing.assert_array_equal(labels, [1, 1])
    assert multi is True
    # The pasted mask is the sam2 package's best mask at the crop position, nothing outside.
    expected = _sam2_reference(tiny_ckpt, frame[y0:y1, x0:x1], case["sam_box"], case["sam_points"])
    np.testing.assert_array_equal(res.mask[y0:y1, x0:x1], expected)
    assert res.mask.sum() == expected.sum()
    assert res.mask.shape == (H, W)


@pytest.mark.parametrize("task,options,response", [
    ("referring", None, "The object is found."),
    ("reasoning", None, "white"),
    ("option", ["A. red", "B. white"], "B"),
])
def test_three_tasks_mask_inside_forced_lpr_box(pipe, frame, task, options, response):
    case = CASES["interior"]
    texts = _texts([500, 300, 756, 556], [100, 120, 200, 220], [150, 170], [160, 180], response)
    gse = Recorder(pipe.gse.generator)
    res = _with(pipe, gse=gse, sam2=BoxFillSAM()).run(frame, "q?", task=task, options=options, force_output=texts)
    assert res.answer == response and res.task == task
    assert res.parse == {"gse": "ok", "lpr": "ok"}
    x0, y0, x1, y1 = case["lpr_box"]
    expected = np.zeros((H, W), dtype=bool)
    expected[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(res.mask, expected)
    # The prompt HF renders is our chat rendering of the reference template.
    assert res.prompts["gse"] == render_chat(build_question("gse", task, "q?", options))
    assert res.prompts["lpr"] == render_chat(build_question("lpr", task, "q?", options))
    assert gse.calls[0][1][1] == build_question("gse", task, "q?", options)


def test_stage_inputs_are_the_reference_resizes_and_channel_swap(pipe, frame):
    texts = CASES["interior"]["texts"]
    x0, y0, x1, y1 = CASES["interior"]["crop"]
    crop = frame[y0:y1, x0:x1]
    for swap in (True, False):
        gse, lpr = Recorder(pipe.gse.generator), Recorder(pipe.lpr.generator)
        cfg = PipelineConfig(lpr_channel_swap=swap)
        _with(pipe, gse=gse, lpr=lpr, sam2=BoxFillSAM(), config=cfg).run(frame, "q", force_output=texts)
        gse_in, lpr_in = gse.calls[0][1][0], lpr.calls[0][1][0]
        np.testing.assert_array_equal(gse_in, np.asarray(Image.fromarray(frame).resize((1920, 1080), Image.BILINEAR)))
        src = crop[..., ::-1] if swap else crop
        np.testing.assert_array_equal(lpr_in, np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((512, 512), Image.BILINEAR)))


def test_forced_tokens_are_the_script_then_eos(pipe, frame):
    tok = pipe.gse.generator.tokenizer
    text = "<think>x</think><answer>{'bbox': [1,2,3,4], 'response': 'ok'}</answer>"
    gen = pipe.gse.generator.generate(frame[:1080, :1920], "q", max_new_tokens=1024, forced_text=text)
    assert gen.token_ids == tok.encode(text, add_special_tokens=False) + [IM_END_ID]
    assert gen.text == text
    assert set(gen.timings_ms) == {"preprocess", "vision", "prefill", "decode"}
    assert all(v > 0 for v in gen.timings_ms.values())


def test_unforced_generation_and_gse_failure_give_empty_mask(pipe, frame):
    short = dataclasses.replace(pipe.config.gse, max_new_tokens=6)
    cfg = dataclasses.replace(pipe.config, gse=short)
    res = _with(pipe, config=cfg).run(frame, "q", task="reasoning")
    assert not res.forced and res.tokens["gse"] <= 6
    if res.gse_box is None:
        assert res.mask.sum() == 0 and res.crop_box is None and "lpr" not in res.parse


def test_gse_processor_gives_the_papers_token_count(pipe):
    proc = pipe.gse.generator.processor
    img = Image.new("RGB", (1920, 1080))
    inputs = proc(text=[render_chat("q")], images=[img], return_tensors="np")
    assert inputs["image_grid_thw"].tolist() == [[1, 78, 138]]  # 1092/14, 1932/14
    assert int((inputs["input_ids"] == 151655).sum()) == 2691
    crop = Image.new("RGB", (512, 512))
    inputs = proc(text=[render_chat("q")], images=[crop], return_tensors="np")
    assert inputs["image_grid_thw"].tolist() == [[1, 36, 36]] and int((inputs["input_ids"] == 151655).sum()) == 324
