"""SAM2 ONNX export + `OrtSAM2` against the sam2 package (tiny random-weight hiera-t).

Expected values come from the sam2 package (`SAM2ImagePredictor` via the `torch` backend's
`TorchSAM2`, and torch's F.interpolate), never from the ONNX path. The encoder costs ~2 s per call
on 2 CPU cores on each side, so every crop is encoded once per side in a module fixture.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

for _mod in ("torch", "sam2", "onnx", "onnxscript"):
    pytest.importorskip(_mod, reason=f"SAM2 export needs {_mod}: pip install -e '.[export]'")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from finers_rt import sam2_host  # noqa: E402
from finers_rt.backends.ort_sam2 import OrtSAM2  # noqa: E402
from finers_rt.backends.torch_sam2 import TorchSAM2  # noqa: E402
from finers_rt.specs import SAM2_DECODER, SAM2_ENCODER  # noqa: E402

# (h, w) of the test crops: up- and down-scaled to 1024 (antialias path), tiny, exact, odd sizes.
CROP_SIZES = [(512, 512), (375, 335), (200, 640), (600, 600), (1300, 900),
              (64, 48), (333, 777), (1024, 1024), (97, 513), (450, 250)]
PROMPT_KINDS = ("box+points", "box", "points")
MIN_IOU = 0.999


def _crop(seed: int, h: int, w: int) -> np.ndarray:
    """Random smooth texture + a bright disc + noise, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 5) ** 2] = rng.integers(0, 256, 3)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _prompt(kind: str, h: int, w: int):
    """(box (4,) | None, points (2, 2) | None, labels (2,) | None) in crop pixels, around the disc."""
    box = np.array([0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h], dtype=np.float32)
    points = np.array([[0.5 * w, 0.5 * h], [0.55 * w, 0.45 * h]], dtype=np.float32)
    labels = np.ones(2, dtype=np.int32)
    if kind == "box":
        return box, None, None
    if kind == "points":
        return None, points, labels
    return box, points, labels


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def exported(tiny_engines):
    """(engine dir, export report) of the session's `finers-rt export` (export_sam2 verified itself)."""
    graphs = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]
    report = {"encoder": graphs["sam2/sam2_encoder.onnx"]["verification"],
              "decoder": graphs["sam2/sam2_decoder.onnx"]["verification"]}
    return tiny_engines / "sam2", report


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> TorchSAM2:
    return TorchSAM2(tiny_ckpt / "sam2")


@pytest.fixture(scope="module")
def ort_sam2(exported) -> OrtSAM2:
    return OrtSAM2(exported[0])


@pytest.fixture(scope="module")
def runs(reference, ort_sam2):
    """Per crop: both sides' encoder features and, per prompt kind, (masks, scores) of each side."""
    out = []
    for seed, (h, w) in enumerate(CROP_SIZES):
        crop = _crop(seed, h, w)
        reference.set_image(crop)
        ort_sam2.set_image(crop)
        f = reference.predictor._features
        run = {"crop": crop,
               "torch_feats": [t.numpy().copy() for t in (f["image_embed"], *f["high_res_feats"])],
               "ort_feats": [ort_sam2.features[n] for n in SAM2_ENCODER.output_names]}
        for kind in PROMPT_KINDS:
            prompt = _prompt(kind, h, w)
            run[kind] = {"torch": reference.predict(*prompt), "ort": ort_sam2.predict(*prompt)}
        out.append(run)
    return out


# ---- (a) per-graph parity ----------------------------------------------------------------------

def test_export_verifies_itself(exported):
    out, report = exported
    for graph, spec in (("encoder", report["encoder"]), ("decoder", report["decoder"])):
        print(f"\nsam2_{graph}: {spec['size_mb']} MB, exported in {spec['export_s']} s")
        for name, s in spec["outputs"].items():
            print(f"  {name}: max abs diff {s['max_abs_diff']:.3g}, mismatch {s['mismatch_pct']:.4f}%")
    assert set(report["encoder"]["outputs"]) == set(SAM2_ENCODER.output_names)
    assert set(report["decoder"]["outputs"]) == set(SAM2_DECODER.output_names)
    assert all(s["max_abs_diff"] <= SAM2_ENCODER.atol for s in report["encoder"]["outputs"].values())
    assert all(s["max_abs_diff"] <= SAM2_DECODER.atol for s in report["decoder"]["outputs"].values())
    assert (out / "sam2_encoder.onnx").is_file() and (out / "sam2_decoder.onnx").is_file()


@pytest.mark.slow
def test_encoder_matches_set_image(runs):
    """OrtSAM2.set_image (numpy preprocessing + ORT) vs SAM2ImagePredictor.set_image features."""
    worst = {}
    for run in runs:
        for name, got, ref in zip(SAM2_ENCODER.output_names, run["ort_feats"], run["torch_feats"]):
            assert got.shape == ref.shape, name
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got - ref).max()))
    print("\nencoder max abs diff over crops:", {k: f"{v:.3g}" for k, v in worst.items()})
    assert max(worst.values()) <= SAM2_ENCODER.atol


@pytest.mark.parametrize("n_points", [1, 4, 9])
def test_decoder_matches_predictor(runs, reference, ort_sam2, n_points):
    """ORT decoder on the predictor's own features vs SAM2ImagePredictor._predict, P = 2..12."""
    pred, rng = reference.predictor, np.random.default_rng(n_points)
    run = runs[-1]  # the crop the predictor was left on by `runs`
    h, w = run["crop"].shape[:2]
    if not np.array_equal(pred._features["image_embed"].numpy(), run["torch_feats"][0]):
        reference.set_image(run["crop"])
    points = rng.uniform(0, 1, (n_points, 2)).astype(np.float32) * np.array([w, h], np.float32)
    labels = rng.integers(0, 2, n_points).astype(np.int32)
    for box in (None, np.array([10, 20, 200, 300], np.float32)):
        with torch.inference_mode():
            _, coords_t, labels_t, box_t = pred._prep_prompts(points, labels, box, None, True)
            _, iou, low_res = pred._predict(coords_t, labels_t, box_t, None, multimask_output=True)
        coords, labs = sam2_host.prompt_inputs(box, points, labels, (h, w))
        feeds = dict(zip(SAM2_DECODER.input_names, [*run["torch_feats"], coords, labs]))
        masks, scores = ort_sam2.decoder.run(SAM2_DECODER.output_names, feeds)
        d_masks = np.abs(np.clip(masks, -32, 32) - low_res.numpy()).max()  # predictor clamps to +-32
        d_iou = np.abs(scores - iou.numpy()).max()
        print(f"\nP={coords.shape[1]}: masks max abs diff {d_masks:.3g}, iou {d_iou:.3g}")
        assert d_masks <= SAM2_DECODER.atol and d_iou <= SAM2_DECODER.atol


# ---- (b) end to end vs SAM2ImagePredictor -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_masks_match_predictor(runs, kind):
    ious = []
    for run in runs:
        (t_masks, t_scores), (o_masks, o_scores) = run[kind]["torch"], run[kind]["ort"]
        assert o_masks.shape == t_masks.shape == (3, *run["crop"].shape[:2]) and o_masks.dtype == bool
        assert o_scores.dtype == np.float32 and o_scores.shape == (3,)
        best = int(np.argmax(t_scores))
        assert int(np.argmax(o_scores)) == best, (run["crop"].shape, t_scores, o_scores)
        ious.append(_iou(o_masks[best], t_masks[best]))
        np.testing.assert_allclose(o_scores, t_scores, atol=1e-4)
    print(f"\n{kind}: best-mask IoU min {min(ious):.6f} over {len(ious)} crops")
    assert min(ious) >= MIN_IOU


def test_preprocess_matches_sam2_transforms(reference):
    """numpy/PIL resize + normalise vs SAM2Transforms (torchvision Resize, antialias=True)."""
    worst = 0.0
    for seed, (h, w) in enumerate([(375, 335), (1300, 900), (2160, 3840), (64, 48), (1024, 1024)]):
        crop = _crop(100 + seed, h, w)
        with torch.inference_mode():
            ref = reference.predictor._transforms(crop)[None].numpy()
        worst = max(worst, float(np.abs(sam2_host.preprocess_image(crop) - ref).max()))
    print(f"\npreprocess max abs diff (normalised units): {worst:.3g}")
    assert worst <= 2e-6


# ---- (c) host helpers ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(375, 335), (601, 599), (97, 513), (255, 257), (64, 48), (1, 7), (256, 256)])
def test_upsample_matches_torch_interpolate(size):
    logits = np.random.default_rng(sum(size)).normal(0, 8, (3, 256, 256)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(logits)[None], size, mode="bilinear", align_corners=False)[0]
    got = sam2_host.upsample_bilinear(logits, size)
    assert got.shape == (3, *size) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_prompt_inputs_layout():
    """Box corners (2, 3) first, then the points, then the padding point; x / w * 1024, y / h * 1024."""
    coords, labels = sam2_host.prompt_inputs([10, 20, 30, 40], [[5, 50]], [0], hw=(100, 200))
    np.testing.assert_array_equal(labels, [[2, 3, 0, -1]])
    np.testing.assert_allclose(coords, [[[51.2, 204.8], [153.6, 409.6], [25.6, 512.0], [0, 0]]], rtol=1e-6)
    assert coords.dtype == labels.dtype == np.float32
    _, labels = sam2_host.prompt_inputs(None, [[1, 1], [2, 2]], [1, 1], hw=(10, 10))
    np.testing.assert_array_equal(labels, [[1, 1, -1]])
    with pytest.raises(ValueError, match="box or points"):
        sam2_host.prompt_inputs(None, None, None, hw=(10, 10))


# ---- (d) providers -------------------------------------------------------------------------------

def test_unavailable_provider_raises(exported):
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        OrtSAM2(exported[0], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_provider_that_fails_to_load_raises(exported, monkeypatch):
    """A provider the build lists but the session drops (onnxruntime-gpu without CUDA) is an error."""
    import onnxruntime as ort

    listed = ort.get_available_providers() + ["CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="CUDAExecutionProvider.*did not load"):
        OrtSAM2(exported[0], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_predict_needs_an_image(exported):
    fresh = OrtSAM2(exported[0])
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(np.array([0, 0, 5, 5], np.float32), None, None)
    with pytest.raises(NotImplementedError):
        fresh.predict(None, None, None, multimask_output=False)


def test_runtime_imports_no_torch():
    code = ("import sys, finers_rt.backends.ort_sam2, finers_rt.sam2_host; "
            "print(sorted(m for m in ('torch', 'torchvision', 'sam2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gelu_rewrite_keeps_values_and_lets_ort_fuse(exported, tmp_path):
    """The exporter's x * (0.5 * (1 + erf(x / sqrt 2))) is reordered so ORT fuses it: the optimized
    encoder has Gelu nodes and no Erf left; on a hand-built graph the rewrite's output equals the
    exact GELU computed with math.erf in float64 (to float32 rounding)."""
    import math

    import onnx
    import onnxruntime as ort
    from finers_rt.export.onnx_gelu import reorder_erf_gelu
    from onnx import TensorProto, helper, numpy_helper

    sam2_dir, report = exported
    assert report["encoder"]["gelu_reordered"] == 12  # hiera-t: one GELU per block MLP
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(sam2_dir / "sam2_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("Gelu") == 12 and "Erf" not in ops

    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", math.sqrt(2)), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert reorder_erf_gelu(model) == 1
    x = np.linspace(-6, 6, 64).astype(np.float32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(y, exact, rtol=0, atol=1e-6)
