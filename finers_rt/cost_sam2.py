"""FLOPs and bytes of the SAM2 stage (image encoder at 1024x1024 + one prompt decoder call).

No published per-variant FLOPs figure for SAM2's encoders is used here: the numbers are computed
from the Hiera configs shipped in the sam2 package (`configs/sam2/sam2_hiera_*.yaml`, sam2 1.1.0)
with the conventions of `finers_rt.cost` (2 FLOPs per multiply-add; norms, GELU, softmax, pooling
and positional embeddings not counted). The parameter counts these formulas give match the sam2
package's modules exactly (encoder incl. conv_s0/s1: hiera-t 27,243,808, hiera-l 212,727,952;
decoder + prompt embeddings 4,191,973); the FLOPs are an estimate:
window padding at stage edges is ignored (hiera-t/s/b+ stage 3: 64 tokens per side, windows of 14).

Encoder graph = Hiera trunk + FPN neck + the mask decoder's conv_s0/conv_s1 (as our ONNX export);
decoder = prompt encoder + two-way transformer + upscaling + heads (SAM2 MaskDecoder defaults:
transformer_dim 256, depth 2, mlp 2048, attention downsample 2, 4 mask + IoU + object tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .cost import Cost, Precision

IMAGE = 1024  # SAM2 input side, pixels
D = 256  # neck / decoder channels
SAM2_SOURCE = "sam2 1.1.0 package configs/sam2/sam2_hiera_{t,s,b+,l}.yaml (Hiera trunk arguments)"


@dataclass(frozen=True)
class HieraConfig:
    name: str
    embed_dim: int
    heads: int
    stages: tuple[int, ...]  # blocks per stage
    global_att: tuple[int, ...]  # block indices with global attention
    window_spec: tuple[int, ...] = (8, 4, 14, 7)  # window side (tokens) per stage
    pos_bkg: int = 14  # side of the background positional embedding (window_pos_embed_bkg_spatial_size)
    source: str = SAM2_SOURCE


SAM2_MODELS = {
    "t": HieraConfig("hiera-t", 96, 1, (1, 2, 7, 2), (5, 7, 9), pos_bkg=7),
    "s": HieraConfig("hiera-s", 96, 1, (1, 2, 11, 2), (7, 10, 13), pos_bkg=7),
    "b+": HieraConfig("hiera-b+", 112, 2, (2, 3, 16, 3), (12, 16, 20)),
    "l": HieraConfig("hiera-l", 144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), pos_bkg=7),
}


def hiera_blocks(cfg: HieraConfig):
    """(dim_in, dim_out, q_pool, window) per block, as sam2's `Hiera.__init__` builds them.
    window 0 = global attention; the first block of a stage keeps the previous stage's window."""
    ends = [sum(cfg.stages[: i + 1]) - 1 for i in range(len(cfg.stages))]
    pool_blocks = {e + 1 for e in ends[:-1]}
    dim, stage = cfg.embed_dim, 0
    for i in range(sum(cfg.stages)):
        window = 0 if i in cfg.global_att else cfg.window_spec[stage]
        dim_out = dim
        if i - 1 in ends:
            dim_out, stage = dim * 2, stage + 1
        yield dim, dim_out, i in pool_blocks, window
        dim = dim_out


def _block(d_in: int, d_out: int, n_in: int, n_out: int, window: int) -> tuple[float, int]:
    """(FLOPs, params) of one MultiScaleBlock on n_in tokens (n_out after q pooling)."""
    proj = d_in * d_out + d_out if d_in != d_out else 0  # shortcut projection at a stage change
    params = 2 * d_in + proj + (3 * d_in * d_out + 3 * d_out) + (d_out * d_out + d_out) + 2 * d_out
    params += 8 * d_out * d_out + 5 * d_out  # MLP d -> 4d -> d with biases
    keys = window * window if window else n_in
    flops = 2 * n_in * ((d_in * d_out if proj else 0) + 3 * d_in * d_out)
    flops += 4 * n_out * keys * d_out + 2 * n_out * 9 * d_out * d_out  # attention, proj + MLP
    return flops, params


def encoder_cost(cfg: HieraConfig, p: Precision) -> Cost:
    side = IMAGE // 4  # tokens per side after the stride-4 7x7 patch embed
    flops = 2 * side * side * 3 * 49 * cfg.embed_dim
    params = 3 * 49 * cfg.embed_dim + cfg.embed_dim + cfg.embed_dim * (cfg.pos_bkg**2 + cfg.window_spec[0] ** 2)
    levels = []  # (tokens, channels) at each stage end, for the neck
    dim = cfg.embed_dim
    for i, (d_in, d_out, pool, window) in enumerate(hiera_blocks(cfg)):
        n_in = side * side
        side = side // 2 if pool else side
        f, n = _block(d_in, d_out, n_in, side * side, window)
        flops, params, dim = flops + f, params + n, d_out
        if i + 1 in _stage_ends(cfg):
            levels.append((side * side, dim))
    flops += sum(2 * n * c * D for n, c in levels)  # FPN 1x1 convs to 256 channels
    params += sum(c * D + D for _, c in levels)
    s0, s1 = levels[0][0], levels[1][0]  # 256^2 and 128^2 tokens
    flops += 2 * D * (s0 * 32 + s1 * 64)  # conv_s0 (256 -> 32), conv_s1 (256 -> 64)
    params += D * 32 + 32 + D * 64 + 64
    io = 3 * IMAGE * IMAGE + D * levels[2][0] + 32 * s0 + 64 * s1  # image in; embed + high-res out
    return Cost(flops, params * p.weight_bytes + io * p.act_bytes)


def _stage_ends(cfg: HieraConfig) -> set[int]:
    return {sum(cfg.stages[: i + 1]) for i in range(len(cfg.stages))}


def _attention(n_q: int, n_kv: int, dim: int, inner: int) -> tuple[float, int]:
    """(FLOPs, params) of SAM's Attention: q from n_q tokens, k/v from n_kv, inner width `inner`."""
    flops = 2 * inner * dim * (2 * n_q + 2 * n_kv) + 4 * n_q * n_kv * inner
    return flops, 4 * (dim * inner + inner) - inner + dim


def decoder_cost(p: Precision, prompt_tokens: int = 4) -> Cost:
    """Prompt decoder for one prompt: `prompt_tokens` sparse tokens (box corners + 2 points) plus
    6 output tokens attend with 64x64 image tokens; 4 masks upscaled to 256x256 logits."""
    t, n = prompt_tokens + 6, (IMAGE // 16) ** 2
    parts = [_attention(t, t, D, D)] + [_attention(t, n, D, D // 2), _attention(n, t, D, D // 2)]
    layer_f = sum(f for f, _ in parts) + 2 * t * 2 * D * 2048
    layer_p = sum(q for _, q in parts) + 2 * D * 2048 + 2048 + D + 4 * 2 * D
    final_f, final_p = _attention(t, n, D, D // 2)
    up_f = 2 * (128 * 128 * D * 64 + 256 * 256 * 64 * 32)  # two stride-2 2x2 transposed convs
    up_p = 4 * D * 64 + 64 + 2 * 64 + 4 * 64 * 32 + 32
    heads_p = 4 * (2 * (D * D + D) + D * 32 + 32) + 2 * (D * D + D) + D * 4 + 4 + 2 * (D * D + D) + D + 1
    masks_f = 2 * 4 * 32 * 256 * 256 + 2 * heads_p  # hypernetwork product + the small MLP heads
    params = 2 * layer_p + final_p + 2 * D + up_p + heads_p + 6 * D + 6 * D  # + output tokens, prompt embeds
    flops = 2 * layer_f + final_f + up_f + masks_f
    io = D * n + 32 * 256 * 256 + 64 * 128 * 128 + 4 * 256 * 256  # features in, mask logits out
    return Cost(flops, params * p.weight_bytes + io * p.act_bytes)


def sam2_costs(cfg: HieraConfig, p: Precision) -> dict[str, Cost]:
    return {"encoder": encoder_cost(cfg, p), "decoder": decoder_cost(p)}


def sam2_model_for(folder: Path) -> HieraConfig:
    """The Hiera variant of a SAM2 checkpoint folder, from its sam2.json config name
    (configs/sam2/sam2_hiera_t.yaml -> "t")."""
    meta = Path(folder) / "sam2.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} is missing: cannot tell the SAM2 variant")
    name = json.loads(meta.read_text())["config"]
    code = Path(name).stem.rsplit("_", 1)[-1]
    if code not in SAM2_MODELS:
        raise ValueError(f"unknown SAM2 variant in {meta}: {name!r}")
    return SAM2_MODELS[code]


def sam2_model_in(root: Path) -> HieraConfig | None:
    """The SAM2 variant of a checkpoints or engine folder: ROOT/sam2/sam2.json, else the source
    checkpoints an engine manifest names, else (engines) the variant whose fp32 encoder size is
    nearest to sam2/sam2_encoder.onnx. None when ROOT has no sam2/ at all."""
    root = Path(root)
    for folder in (root / "sam2", _manifest_source(root)):
        if folder is not None and (folder / "sam2.json").is_file():
            return sam2_model_for(folder)
    onnx = root / "sam2" / "sam2_encoder.onnx"
    if not onnx.is_file():
        return None
    fp32 = Precision("fp32", 4, 4, "fp32")
    return min(SAM2_MODELS.values(), key=lambda h: abs(encoder_cost(h, fp32).bytes - onnx.stat().st_size))


def _manifest_source(root: Path) -> Path | None:
    meta = root / "manifest.json"
    src = json.loads(meta.read_text()).get("checkpoints") if meta.is_file() else None
    return Path(src) / "sam2" if src else None
