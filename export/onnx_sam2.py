"""SAM2 -> two ONNX graphs, `sam2_encoder.onnx` and `sam2_decoder.onnx`, verified against sam2.

The split follows `SAM2ImagePredictor` (sam2 1.1.0): the encoder is everything `set_image` computes
from the normalised 1024x1024 image (trunk + FPN neck, conv_s0/conv_s1 on the two high-res levels,
`no_mem_embed` on the lowest-res one); the decoder is `_predict` (prompt encoder + mask decoder)
with the multimask head only, since the pipeline always asks for three masks. Host work (resize,
normalise, prompt arrays, mask upsampling) lives in `finers_rt.sam2_host` and is shared by the
verification below and the ONNX Runtime predictor (`finers_rt.backends.ort_sam2.OrtSAM2`).

Both graphs are checked in ONNX Runtime against the torch model before `export_sam2` returns.

attention="ort" exports the Hiera trunk's attention (windowed, q-pooled and global blocks) as ORT's
com.microsoft.MultiHeadAttention (`onnx_mha`) instead of MatMul/Softmax/MatMul: the CPU export's
choice (`engine.EXPORT_DEVICES`); TensorRT parses only the standard-op ("onnx") graph.
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..backends.ort_session import open_session
from ..sam2_host import IMAGE_SIZE, preprocess_image, prompt_inputs
from ..segment import resolve_sam2
from ..specs import SAM2_DECODER, SAM2_ENCODER, GraphSpec
from .onnx_gelu import reorder_erf_gelu
from .onnx_mha import ATTENTION_KINDS, full_attention, mha_translation

log = logging.getLogger(__name__)


class SAM2ImageEncoder(nn.Module):
    """Export-only wrapper, not for direct use: normalised image -> the features `set_image` stores.

    image (1, 3, 1024, 1024) float32 -> image_embed (1, 256, 64, 64) with no_mem_embed added,
    high_res_feats_0 (1, 32, 256, 256) = conv_s0(fpn[0]), high_res_feats_1 (1, 64, 128, 128) = conv_s1(fpn[1]).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not model.use_high_res_features_in_sam:
            raise ValueError("the SAM2 ONNX split needs a model with use_high_res_features_in_sam=True")
        self.model = model

    def forward(self, image: torch.Tensor):
        fpn = self.model.forward_image(image)["backbone_fpn"]  # conv_s0/conv_s1 already applied
        feats = fpn[-self.model.num_feature_levels:]  # 256, 128, 64 px levels
        embed = feats[-1]
        if self.model.directly_add_no_mem_embed:  # set_image adds it on the (HW, B, C) view: same sum
            embed = embed + self.model.no_mem_embed.reshape(1, -1, 1, 1)
        return embed, feats[0], feats[1]


class SAM2PromptDecoder(nn.Module):
    """Export-only wrapper, not for direct use: encoder features + prompt points -> 3 masks + scores.

    point_coords (1, P, 2) xy in the 1024 frame and point_labels (1, P) float (1 fg, 0 bg, 2/3 box
    corners, -1 padding) as built by `sam2_host.prompt_inputs`, padding point included (the graph
    adds none). Returns masks (1, 3, 256, 256) low-res logits and iou_predictions (1, 3).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        # (1, 256, 64, 64): a constant of the model, what the predictor passes as image_pe.
        self.register_buffer("image_pe", self.prompt_encoder.get_dense_pe().detach().clone())

    def forward(self, image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels):
        # pad=False: the host already appended the padding point the predictor's encoder would add.
        sparse = self.prompt_encoder._embed_points(point_coords, point_labels, pad=False)  # (1, P, 256)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(image_embed)
        masks, iou, _, _ = self.mask_decoder(
            image_embeddings=image_embed, image_pe=self.image_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        return masks, iou


class HieraAttentionMHA(nn.Module):
    """Export-only stand-in for a Hiera `MultiScaleAttention`, not for direct use: the same weights
    and math, with SDPA replaced by `full_attention` (-> MultiHeadAttention) in (B, S, heads*hd) layout.

    x (B, H, W, C): B = windows x images (one image: B = windows; global blocks B = 1). q_pool
    blocks pool q to (H/2, W/2), so q has a quarter of the keys' length; kv keep H*W.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.scale = (attn.dim_out // attn.num_heads) ** -0.5  # SDPA's default 1/sqrt(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, h, w, _ = x.shape
        # q, k, v as three Gemms on the qkv weight's thirds, (B, HW, heads*hd) head-major each: the
        # same products as one Gemm + Split, without the Split's copy of the (B*HW, 3*dim) output
        # (hiera-t at 1024 px: stage-1 qkv 105 -> 78 ms on a 2-core AVX2 EPYC, bit-identical)
        rows = x.reshape(b * h * w, -1)
        q, k, v = (nn.functional.linear(rows, wt, bs).reshape(b, h * w, a.dim_out)
                   for wt, bs in zip(a.qkv.weight.chunk(3), a.qkv.bias.chunk(3)))
        if a.q_pool is not None:  # as MultiScaleAttention: max-pool q on the (B, H, W, C) grid
            q = a.q_pool(q.reshape(b, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, -1)
        out = full_attention(q, k, v, a.num_heads, self.scale)  # (B, h*w, dim_out)
        return a.proj(out.reshape(b, h, w, -1))


@contextmanager
def hiera_mha(model: nn.Module):
    """During the block, every Hiera block's `attn` is a `HieraAttentionMHA` around the original;
    restored on exit (the model verifies against itself unpatched)."""
    blocks = model.image_encoder.trunk.blocks
    originals = [blk.attn for blk in blocks]
    try:
        for blk, attn in zip(blocks, originals):
            blk.attn = HieraAttentionMHA(attn)
        yield
    finally:
        for blk, attn in zip(blocks, originals):
            blk.attn = attn


def load_sam2(sam2_dir: Path, config: str | None = None) -> nn.Module:
    """The sam2 package model (eval, CPU, fp32) for DIR/sam2, built as the reference backend does."""
    from sam2.build_sam import build_sam2

    ckpt, cfg = resolve_sam2(Path(sam2_dir), config)
    with warnings.catch_warnings():  # sam2 1.1.0 calls the deprecated torch.jit.script on import
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script")
        return build_sam2(cfg, str(ckpt), device="cpu").eval()


def export_sam2(sam2_dir: Path, out_dir: Path, *, config: str | None = None, opset: int = 18,
                attention: str = "onnx") -> dict:
    """Write out_dir/sam2_encoder.onnx and out_dir/sam2_decoder.onnx, verify them, return the report.

    attention: the encoder's Hiera attention, "onnx" (standard ops: ORT, TensorRT) or "ort" (ORT's
    MultiHeadAttention contrib op: faster on ORT's CPU provider, not parseable by TensorRT).

    Report: {"encoder": G, "decoder": G, "preprocess_max_abs_diff": float}, where G holds
    "outputs" {name: {"max_abs_diff", "mismatch_pct"}} (worst case over the verification inputs;
    mismatch = elements over the spec's atol), "export_s" and "size_mb". Raises RuntimeError if
    an output misses its spec's atol.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_sam2(sam2_dir, config)
    encoder, decoder = SAM2ImageEncoder(model).eval(), SAM2PromptDecoder(model).eval()
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    if attention == "ort":
        with hiera_mha(model):
            info = {"encoder": _export(encoder, (image,), out_dir / "sam2_encoder.onnx", SAM2_ENCODER, opset,
                                       mha_translation())}
    else:
        info = {"encoder": _export(encoder, (image,), out_dir / "sam2_encoder.onnx", SAM2_ENCODER, opset)}
    info["encoder"]["attention"] = attention
    with torch.inference_mode():
        feats = encoder(image)
    coords, labels = torch.zeros(1, 4, 2), torch.tensor([[2.0, 3.0, 1.0, -1.0]])  # box + point + pad
    info["decoder"] = _export(decoder, (*feats, coords, labels), out_dir / "sam2_decoder.onnx", SAM2_DECODER, opset)
    report = verify_sam2(model, out_dir)
    for graph, extra in info.items():
        report[graph] = {"outputs": report[graph], **extra}
    return report


def _export(module: nn.Module, args: tuple, path: Path, spec: GraphSpec, opset: int,
            translation: dict | None = None) -> dict:
    """torch.onnx (dynamo) export of `module` with the spec's IO names and dynamic dims, one file;
    translation: custom ops -> onnxscript functions (`onnx_mha.mha_translation`)."""
    dims = {name: torch.export.Dim(name, min=lo) for name, (lo, _, _) in spec.profiles.items()}
    dynamic = {t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None
               for t in spec.inputs}
    t0 = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/trace chatter
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                    input_names=spec.input_names, output_names=spec.output_names,
                                    dynamic_shapes=dynamic if dims else None, optimize=True,
                                    verbose=False, custom_translation_table=translation)
    program.save(str(path), external_data=False)  # < 2 GB for every SAM2 size: keep one file
    proto = onnx.load(str(path))
    gelus = reorder_erf_gelu(proto)  # so ORT fuses the Hiera MLPs' GELUs (verified after, with the rest)
    if gelus:
        onnx.save(proto, str(path))
    info = {"export_s": round(time.perf_counter() - t0, 1), "size_mb": round(path.stat().st_size / 1e6, 1),
            "gelu_reordered": gelus}
    log.info("wrote %s (%.1f MB, %.1f s)", path, info["size_mb"], info["export_s"])
    return info


# ---- verification: ONNX Runtime vs the torch model --------------------------------------------

def compare(name: str, got: np.ndarray, ref: np.ndarray, atol: float) -> dict:
    """Max abs diff and % of elements over atol between an ORT output and its torch reference."""
    if got.shape != ref.shape:
        raise RuntimeError(f"{name}: ORT shape {got.shape} != torch shape {ref.shape}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs_diff": float(diff.max()), "mismatch_pct": float(100.0 * np.mean(diff > atol))}


def _merge(acc: dict, name: str, stats: dict) -> None:
    """Keep the worst max diff and mismatch % of an output over all verification cases."""
    old = acc.setdefault(name, {"max_abs_diff": 0.0, "mismatch_pct": 0.0})
    for k in old:
        old[k] = max(old[k], stats[k])


def verification_crop(seed: int = 0) -> np.ndarray:
    """A 'real' crop (375x335 uint8 RGB): smooth gradients, a red disc to segment, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:335].astype(np.float32)
    crop = np.stack([128 + 100 * np.sin(xx / 17.0), 128 + 100 * np.cos(yy / 23.0), (xx + yy) % 256], -1)
    crop[(yy - 190) ** 2 + (xx - 160) ** 2 < 60 ** 2] = (220, 30, 30)
    return np.clip(crop + rng.normal(0, 8, crop.shape), 0, 255).astype(np.uint8)


def verify_sam2(model: nn.Module, out_dir: Path, seed: int = 0) -> dict:
    """Run both graphs in ORT and compare with torch; the worst diff per output goes in the report.

    Two encoder cases, each with three decoder prompts (box + 2 points, 3 fg/bg points, box only):
    - an N(0, 1) image: ORT vs the torch wrappers above (unclamped logits);
    - the verification crop: ORT vs `SAM2ImagePredictor` itself. The encoder gets the package's
      own `_transforms(crop)`, the decoder the predictor's features, and the reference is
      `_predict` on `_prep_prompts` (its low-res logits are clamped to +-32: so are ours here).
    Also reports `preprocess`: max abs diff of `sam2_host.preprocess_image` vs SAM2Transforms.
    """
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    with warnings.catch_warnings():  # SAM2Transforms calls the deprecated torch.jit.script
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script")
        predictor = SAM2ImagePredictor(model)
    cpu = ["CPUExecutionProvider"]
    enc = open_session(out_dir / "sam2_encoder.onnx", cpu, SAM2_ENCODER)  # also checks IO names
    dec = open_session(out_dir / "sam2_decoder.onnx", cpu, SAM2_DECODER)
    rng = np.random.default_rng(seed)
    report = {"encoder": {}, "decoder": {}, "preprocess_max_abs_diff": 0.0}
    torch_enc, torch_dec = SAM2ImageEncoder(model).eval(), SAM2PromptDecoder(model).eval()
    image = rng.standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    with torch.inference_mode():
        feats = [t.numpy() for t in torch_enc(torch.from_numpy(image))]
    _merge_all(report["encoder"], SAM2_ENCODER, enc.run(None, {"image": image}), feats)
    for coords, labels in _verification_prompts(rng, (IMAGE_SIZE, IMAGE_SIZE)):
        with torch.inference_mode():
            ref = [t.numpy() for t in torch_dec(*map(torch.from_numpy, (*feats, coords, labels)))]
        _merge_all(report["decoder"], SAM2_DECODER, _run_decoder(dec, feats, coords, labels), ref)
    _verify_on_crop(predictor, verification_crop(seed), enc, dec, rng, report)
    _check(report["encoder"], SAM2_ENCODER)
    _check(report["decoder"], SAM2_DECODER)
    return report


def _verify_on_crop(predictor, crop: np.ndarray, enc, dec, rng: np.random.Generator, report: dict) -> None:
    """ORT vs SAM2ImagePredictor on one uint8 crop (see verify_sam2); updates `report`."""
    with torch.inference_mode():
        x = predictor._transforms(crop)[None].numpy()  # the package's preprocessing
        predictor.set_image(crop)
    host_x = preprocess_image(crop)
    report["preprocess_max_abs_diff"] = max(report["preprocess_max_abs_diff"], float(np.abs(host_x - x).max()))
    f = predictor._features
    feats = [t.numpy() for t in (f["image_embed"], *f["high_res_feats"])]
    _merge_all(report["encoder"], SAM2_ENCODER, enc.run(None, {"image": x}), feats)
    hw = crop.shape[:2]
    for box, pts, labs in _verification_raw_prompts(rng, hw):
        with torch.inference_mode():
            _, coords_t, labels_t, box_t = predictor._prep_prompts(pts, labs, box, None, True)
            _, iou, low_res = predictor._predict(coords_t, labels_t, box_t, None, multimask_output=True)
        masks, scores = _run_decoder(dec, feats, *prompt_inputs(box, pts, labs, hw))
        got = [np.clip(masks, -32.0, 32.0), scores]  # the predictor clamps its low-res logits
        _merge_all(report["decoder"], SAM2_DECODER, got, [low_res.numpy(), iou.numpy()])


def _run_decoder(dec, feats: list, coords: np.ndarray, labels: np.ndarray) -> list:
    return dec.run(None, dict(zip(SAM2_DECODER.input_names, [*feats, coords, labels])))


def _merge_all(acc: dict, spec: GraphSpec, got: list, ref: list) -> None:
    for out, g, r in zip(spec.outputs, got, ref):
        _merge(acc, out.name, compare(out.name, g, r, spec.atol))


def _verification_raw_prompts(rng: np.random.Generator, hw: tuple[int, int]):
    """(box (4,) | None, points (N, 2) | None, labels (N,) | None) in pixels of an (h, w) image:
    box + 2 fg points, 3 fg/bg points, box only."""
    h, w = hw
    x0, y0 = rng.uniform(0, 0.5) * w, rng.uniform(0, 0.5) * h
    box = np.array([x0, y0, x0 + 0.4 * w, y0 + 0.4 * h], dtype=np.float32)
    pts = rng.uniform(0, 1, (3, 2)).astype(np.float32) * np.array([w, h], dtype=np.float32)
    yield box, pts[:2], np.ones(2, dtype=np.int32)
    yield None, pts, np.array([1, 0, 1], dtype=np.int32)
    yield box, None, None


def _verification_prompts(rng: np.random.Generator, hw: tuple[int, int]):
    """Decoder inputs (coords (1, P, 2), labels (1, P)) for `_verification_raw_prompts`."""
    for box, pts, labs in _verification_raw_prompts(rng, hw):
        yield prompt_inputs(box, pts, labs, hw)


def _check(stats: dict, spec: GraphSpec) -> None:
    """Log each output's worst diff; raise if one is over the spec's atol."""
    for name, s in stats.items():
        log.info("%s %s: max abs diff %.3g, mismatch %.4f%% (atol %g)", spec.name, name,
                 s["max_abs_diff"], s["mismatch_pct"], spec.atol)
    bad = {n: s for n, s in stats.items() if s["max_abs_diff"] > spec.atol}
    if bad:
        raise RuntimeError(f"{spec.name} ONNX export does not match torch within atol {spec.atol}: {bad}")
