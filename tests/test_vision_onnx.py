"""Vision tower: numpy preprocessing and index math vs HF, exported graph vs torch, provider check."""
from __future__ import annotations

import json

import numpy as np
import pytest

from finers_rt.qwen_vision_host import (
    VisionPreprocessConfig,
    padded_windows,
    pixel_values,
    rotary_positions,
    smart_resize,
    vision_inputs,
    window_index,
)
from finers_rt.specs import VISION

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install -e '.[export]'")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

# (H, W) of the stage inputs and odd sizes: partial windows, a size under 512 px, a portrait one.
SIZES = [(1080, 1920), (512, 512), (333, 517), (1000, 750), (100, 300)]
# Patch grids (t, gh, gw) for the index math: stage sizes, window-aligned, one unit, thin strips.
GRIDS = [(1, 78, 138), (1, 36, 36), (1, 24, 36), (1, 16, 16), (1, 2, 2), (1, 4, 60), (1, 58, 6), (1, 8, 22)]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def cfg(tiny_ckpt):
    return VisionPreprocessConfig.from_checkpoint(tiny_ckpt / "gse")


@pytest.fixture(scope="module")
def hf_visual(tiny_ckpt):
    """The reference: HF's own tower inside the full model, loaded the standard way."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt / "gse", dtype=torch.float32)
    return model.model.visual.eval()


# --- (a) preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixel_values_match_hf_processor(tiny_ckpt, cfg, size):
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(tiny_ckpt / "gse", backend="pil")
    image = _image(*size)
    ref = processor(images=[Image.fromarray(image)], return_tensors="np")
    patches, grid = pixel_values(image, cfg)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert patches.dtype == np.float32 and patches.shape == ref["pixel_values"].shape
    assert patches.tobytes() == ref["pixel_values"].tobytes()  # bit-identical: the LUT holds HF's arithmetic


def test_smart_resize_stage_sizes():
    assert smart_resize(1080, 1920, 28, 3136, 12845056) == (1092, 1932)  # GSE: grid 78 x 138
    assert smart_resize(512, 512, 28, 3136, 12845056) == (504, 504)  # LPR: grid 36 x 36
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)


def test_config_keys(tmp_path, tiny_ckpt):
    doc = json.loads((tiny_ckpt / "gse" / "preprocessor_config.json").read_text())
    legacy = {k: v for k, v in doc.items() if k != "size"}  # only min_pixels / max_pixels
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    cfg = VisionPreprocessConfig.from_json(tmp_path / "legacy.json")
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)
    del legacy["image_std"]
    (tmp_path / "broken.json").write_text(json.dumps(legacy))
    with pytest.raises(KeyError, match="image_std"):
        VisionPreprocessConfig.from_json(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="window_size unknown"):
        cfg.window_units


# --- (b) index math ------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[1]}x{g[2]}")
def test_index_math_matches_hf(cfg, grid):
    from transformers.vision_utils import (
        get_vision_position_ids,
        get_vision_window_index,
    )

    thw = torch.tensor([grid])
    ref_index, ref_cu = get_vision_window_index(thw, cfg.merge_size, cfg.window_size, cfg.patch_size)
    index, counts = window_index(grid, cfg.merge_size, cfg.window_units)
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(counts * 4)]), ref_cu.numpy())
    ref_pos = get_vision_position_ids(thw, cfg.merge_size).numpy()
    np.testing.assert_array_equal(rotary_positions(grid, cfg.merge_size), ref_pos)

    layout = padded_windows(counts, cfg.merge_size**2)
    n = int(counts.sum()) * 4
    flat_gather, flat_mask = layout["win_gather"].reshape(-1), layout["win_mask"].reshape(-1)
    np.testing.assert_array_equal(flat_gather[layout["win_scatter"]], np.arange(n))  # scatter inverts gather
    assert flat_mask.sum() == n and flat_mask[layout["win_scatter"]].all()
    cu = np.asarray(ref_cu)  # every window's slots hold exactly its own patches
    for w, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        np.testing.assert_array_equal(layout["win_gather"][w][layout["win_mask"][w]], np.arange(lo, hi))


def test_vision_inputs_window_order(cfg):
    image = _image(333, 517, seed=3)
    feeds, reverse, grid = vision_inputs(image, cfg)
    raster, _ = pixel_values(image, cfg)
    units = feeds["pixel_values"].reshape(-1, 4, raster.shape[1])
    np.testing.assert_array_equal(units[reverse].reshape(raster.shape), raster)
    np.testing.assert_array_equal(feeds["pos_ids"].reshape(-1, 4, 2)[reverse].reshape(-1, 2), rotary_positions(grid, 2))
    assert {k: v.dtype.name for k, v in feeds.items()} == {t.name: t.dtype for t in VISION.inputs}


# --- (c) exported graph vs torch -----------------------------------------------------------------


def _export(tiny_ckpt, tmp_path_factory, attention: str):
    pytest.importorskip("onnxscript", reason="export needs onnxscript: pip install -e '.[export]'")
    from finers_rt.export.onnx_vision import export_vision

    path = tmp_path_factory.mktemp(f"vision_{attention}") / "vision.onnx"
    report = export_vision(tiny_ckpt / "gse", path, attention=attention)  # verifies; raises above atol
    assert report["exporter"] == "dynamo" and set(report["sizes"]) >= {"gse_1920x1080", "lpr_512x512"}
    return path


@pytest.fixture(scope="module")
def vision_onnx(tiny_engines):
    """The portable graph (standard ops only) from the session's `finers-rt export`."""
    graphs = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]
    report = graphs["gse/vision.onnx"]["verification"]
    assert report["exporter"] == "dynamo" and set(report["sizes"]) >= {"gse_1920x1080", "lpr_512x512"}
    return tiny_engines / "gse" / "vision.onnx"


@pytest.fixture(scope="module")
def vision_onnx_mha(tiny_ckpt, tmp_path_factory):
    """The ORT-only variant: attention and rotary as com.microsoft contrib ops."""
    return _export(tiny_ckpt, tmp_path_factory, "ort")


@pytest.mark.parametrize("attention", ["onnx", "ort"])
@pytest.mark.parametrize("size", [(1080, 1920), (512, 512), (1000, 750)], ids=["gse", "lpr", "odd"])
def test_graph_matches_torch(request, hf_visual, cfg, size, attention):
    from finers_rt.backends.ort_vision import OrtVision

    vision_onnx = request.getfixturevalue("vision_onnx" if attention == "onnx" else "vision_onnx_mha")
    image = _image(*size, seed=1)
    patches, grid = pixel_values(image, cfg)
    with torch.inference_mode():
        ref = hf_visual(torch.from_numpy(patches), torch.tensor([grid])).pooler_output.numpy()
    got = OrtVision(vision_onnx, config=cfg).run(image)
    assert got.shape == ref.shape == (grid[1] * grid[2] // 4, 64)
    assert np.abs(got - ref).max() <= VISION.atol


def test_graph_ops(vision_onnx, vision_onnx_mha):
    """The portable graph holds only standard-domain ops; the ORT variant has one MHA per block
    (the window blocks' with a key padding mask) and a RotaryEmbedding for each of q and k."""
    import onnx

    ops = {(n.domain, n.op_type) for n in onnx.load(vision_onnx).graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    nodes = onnx.load(vision_onnx_mha).graph.node
    mha = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    rope = [n for n in nodes if n.op_type == "RotaryEmbedding"]
    assert all(n.domain == "com.microsoft" for n in mha + rope)
    # tiny: 4 blocks, full attention in [1, 3]; the window blocks' MHA has a 5th input, the mask
    assert sorted(len([i for i in n.input if i]) for n in mha) == [3, 3, 4, 4]
    assert len(rope) == 8
    assert not [n for n in nodes if n.op_type in ("Softmax", "Transpose", "Neg")]  # no unfused attention left


# --- (d) providers -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Specified provider")  # ORT's own warning before it falls back
def test_missing_provider_raises(vision_onnx, cfg):
    import onnxruntime as ort

    from finers_rt.backends.ort_vision import OrtVision

    candidates = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "OpenVINOExecutionProvider")
    missing = [p for p in candidates if p not in ort.get_available_providers()]
    if not missing:
        pytest.skip("every candidate provider is installed here")
    with pytest.raises(RuntimeError, match=missing[0]):
        OrtVision(vision_onnx, providers=[missing[0], "CPUExecutionProvider"], config=cfg)
