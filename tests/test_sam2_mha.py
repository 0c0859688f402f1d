"""SAM2 encoder with `attention="ort"`: Hiera attention as ORT's MultiHeadAttention (`onnx_sam2.hiera_mha`).

Expected values come from the sam2 package (its own `MultiScaleAttention` forward, and
`export_sam2`'s verification against `SAM2ImagePredictor`), never from our ONNX path; the
pipeline test compares the "ort" SAM2 folder with the standard-op one of the same checkpoints.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

for _mod in ("torch", "sam2", "onnx", "onnxscript"):
    pytest.importorskip(_mod, reason=f"SAM2 export needs {_mod}: pip install -e '.[export]'")

import torch  # noqa: E402

from finers_rt.export.onnx_sam2 import HieraAttentionMHA, export_sam2, hiera_mha, load_sam2  # noqa: E402
from finers_rt.specs import SAM2_DECODER, SAM2_ENCODER  # noqa: E402

HIERA_T_BLOCKS = 12  # sam2_hiera_t: stages (1, 2, 7, 2)


@pytest.fixture(scope="module")
def ort_engines(tiny_ckpt, tiny_engines, tmp_path_factory):
    """(folder, report): the session's export with sam2/ re-exported as attention="ort" (gse/ and
    lpr/ linked, manifest's sam2_attention set). export_sam2 raises if it misses the spec's atol."""
    out = tmp_path_factory.mktemp("ort_sam2_engines")
    for stage in ("gse", "lpr"):
        (out / stage).symlink_to(tiny_engines / stage, target_is_directory=True)
    manifest = json.loads((tiny_engines / "manifest.json").read_text())
    report = export_sam2(tiny_ckpt / "sam2", out / "sam2", attention="ort")
    (out / "manifest.json").write_text(json.dumps({**manifest, "sam2_attention": "ort"}))
    return out, report


def test_hiera_mha_wrapper_equals_sam2_attention(tiny_ckpt):
    """Every Hiera block kind (windowed, q-pooled with 4x fewer queries than keys, global) through
    `HieraAttentionMHA` (the op's torch side is SDPA) equals sam2's own trunk; restored on exit."""
    model = load_sam2(tiny_ckpt / "sam2")
    trunk = model.image_encoder.trunk
    assert len(trunk.blocks) == HIERA_T_BLOCKS
    assert any(b.attn.q_pool is not None for b in trunk.blocks) and any(b.window_size == 0 for b in trunk.blocks)
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = trunk(x)
        with hiera_mha(model):
            assert all(isinstance(b.attn, HieraAttentionMHA) for b in trunk.blocks)
            got = trunk(x)
    assert not any(isinstance(b.attn, HieraAttentionMHA) for b in trunk.blocks)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        # same SDPA on the same values, only the head split/merge reshapes differ: float32 rounding
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


def test_ort_export_verifies_against_torch(ort_engines):
    _, report = ort_engines
    assert report["encoder"]["attention"] == "ort"
    for graph, spec in (("encoder", SAM2_ENCODER), ("decoder", SAM2_DECODER)):
        outs = report[graph]["outputs"]
        print(f"\nsam2_{graph} (attention ort):",
              {n: f"{s['max_abs_diff']:.3g}" for n, s in outs.items()})
        assert set(outs) == set(spec.output_names)
        assert all(s["max_abs_diff"] <= spec.atol for s in outs.values())


def test_ort_encoder_runs_multihead_attention(ort_engines, tmp_path):
    """Every Hiera block is one com.microsoft.MultiHeadAttention in the file, and after ORT's CPU
    optimisations no attention Softmax or score MatMul is left in the encoder."""
    import onnx
    import onnxruntime as ort

    path = ort_engines[0] / "sam2" / "sam2_encoder.onnx"
    mha = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == HIERA_T_BLOCKS and {n.domain for n in mha} == {"com.microsoft"}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("MultiHeadAttention") == HIERA_T_BLOCKS
    assert not {"Softmax", "MatMul", "FusedMatMul"} & set(ops)  # the encoder's linears are Gemm


@pytest.mark.parametrize("flags,sam2", [([], "ort"), (["--device", "cpu"], "ort"), (["--device", "cuda"], "onnx"),
                                        (["--precision", "fp16"], "onnx"),
                                        (["--device", "cuda", "--sam2-attention", "ort"], "ort"),
                                        (["--sam2-attention", "onnx"], "onnx")])
def test_export_device_writes_sam2_attention(monkeypatch, tiny_ckpt, tmp_path, flags, sam2):
    """`finers-rt export`: --device picks the SAM2 kind, passed to export_sam2 and written to the
    manifest (the graph exporters are stubbed: the real ones are tested above and in test_sam2_onnx)."""
    from finers_rt.export import engine

    from finers_rt import cli

    seen = {}

    def fake_sam2(src, out, *, config, opset, attention):
        seen["attention"] = attention
        return {"encoder": {}, "decoder": {}}

    monkeypatch.setattr(engine, "export_sam2", fake_sam2)
    monkeypatch.setattr(engine, "export_vision", lambda *a, **kw: {})
    monkeypatch.setattr(engine, "to_fp16", lambda *a, **kw: None)
    for kind in engine.DECODER_EXPORTERS:
        monkeypatch.setitem(engine.DECODER_EXPORTERS, kind, lambda *a, **kw: {})
    out = tmp_path / "o"
    args = cli.build_parser().parse_args(["export", "--checkpoints", str(tiny_ckpt), "--out", str(out), *flags])
    cli.cmd_export(args=args)
    assert seen["attention"] == sam2
    assert json.loads((out / "manifest.json").read_text())["sam2_attention"] == sam2


def test_pipeline_with_ort_sam2_equals_standard_ops(tiny_engines, ort_engines):
    """One forced tiny run per folder: everything before SAM2 is the same graphs, so equal; the
    masks come from encoders that differ by float32 rounding (export verification: both within
    ~4e-6 of torch), so decoder logits differ by ~1e-5 and only pixels whose logit is that close
    to 0 can flip: IoU >= 0.999 (test_sam2_onnx's bar vs the predictor), score within 1e-4."""
    from PIL import Image

    from finers_rt.pipeline import Pipeline

    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (270, 480, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((3840, 2160), Image.BILINEAR))
    force = {
        "gse": "<think>t</think><answer>{'bbox': [700,300,1100,700], 'response': 'The object is found.'}</answer>",
        "lpr": "<answer>{'bbox': [100,120,300,260], 'points_1': [150,170], 'points_2': [220,200]}</answer>",
    }
    ref = Pipeline.from_engines(tiny_engines, device="cpu").run(img, "the car", force_output=force)
    got = Pipeline.from_engines(ort_engines[0], device="cpu").run(img, "the car", force_output=force)
    for field in ("answer", "gse_box", "crop_box", "lpr_box", "points", "parse", "texts"):
        assert getattr(got, field) == getattr(ref, field), field
    inter, union = np.logical_and(got.mask, ref.mask).sum(), np.logical_or(got.mask, ref.mask).sum()
    print(f"\nmask IoU {inter / union:.6f}, differing pixels {int(np.sum(got.mask != ref.mask))}, "
          f"scores {got.sam2_score} vs {ref.sam2_score}")
    assert union > 0 and inter / union >= 0.999
    assert got.sam2_score == pytest.approx(ref.sam2_score, abs=1e-4)
