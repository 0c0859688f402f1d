"""`finers-rt plan`: the lower bound on per-stage latency of a model on a device.

floor(stage) = max(FLOPs / dense peak, bytes moved / memory bandwidth): a stage can run no faster
than its math at the device's peak rate, nor than moving its bytes once at full bandwidth. Work
comes from `finers_rt.cost` / `cost_sam2` (from model configs), peaks and bandwidths from
`finers_rt.devices` (datasheets; `cpu` is this machine, measured). Host work (image decode,
resizes, patchify, parsing) is not in the floor. Stages run one after another: the end-to-end
floor is their sum.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .cost import (
    GSE_SIZE,
    GSE_TEXT_TOKENS,
    LPR_SIZE,
    LPR_TEXT_TOKENS,
    MODELS,
    PRECISIONS,
    Cost,
    StageWork,
    VLMConfig,
    vision_precision,
    vlm_costs,
)
from .cost_sam2 import SAM2_MODELS, HieraConfig, sam2_costs, sam2_model_in
from .devices import DEVICES, Device, get_device

STAGES = ("gse_vision", "gse_prefill", "gse_decode", "lpr_vision", "lpr_prefill", "lpr_decode",
          "sam2_encoder", "sam2_decoder")
GROUPS = {"GSE": STAGES[:3], "LPR + SAM2": STAGES[3:]}
# FineRS paper Table A4 (finers-pipeline.md §8): 7B, one A100, seconds per 4K image.
PAPER_A100_S = {"GSE": 7.31, "LPR + SAM2": 5.57, "end to end": 12.88}
PAPER_SOURCE = "FineRS paper Table A4: 7B on one A100"


@dataclass(frozen=True)
class Models:
    name: str
    gse: VLMConfig
    lpr: VLMConfig
    sam2: HieraConfig


@dataclass(frozen=True)
class Floor:
    stage: str
    flops: float  # FLOPs
    bytes: float  # bytes moved
    compute_ms: float  # flops / peak
    memory_ms: float  # bytes / bandwidth

    @property
    def floor_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def floor(stage: str, cost: Cost, peak_tflops: float, bandwidth_gbs: float) -> Floor:
    """The roofline rule: the stage takes at least max(compute time, memory time)."""
    return Floor(stage, cost.flops, cost.bytes, cost.flops / (peak_tflops * 1e12) * 1e3,
                 cost.bytes / (bandwidth_gbs * 1e9) * 1e3)


def resolve_models(model: str) -> Models:
    """`7b` / `3b` (published configs, SAM2 hiera-l as the paper), a Qwen2.5-VL checkpoint folder
    (its config.json for both stages), or a FineRS folder with gse/, lpr/ (and sam2/sam2.json)."""
    if model in MODELS:
        return Models(model, MODELS[model], MODELS[model], SAM2_MODELS["l"])
    root = Path(model)
    if (root / "config.json").is_file():
        cfg = VLMConfig.from_dir(root)
        return Models(str(root), cfg, cfg, SAM2_MODELS["l"])
    if (root / "gse" / "config.json").is_file():
        sam2 = sam2_model_in(root) or SAM2_MODELS["l"]
        return Models(str(root), VLMConfig.from_dir(root / "gse"), VLMConfig.from_dir(root / "lpr"), sam2)
    raise ValueError(f"--model must be one of {sorted(MODELS)} or a folder with config.json "
                     f"(or gse/config.json); got {model!r}")


def default_works(decode_tokens: tuple[int, int]) -> dict[str, StageWork]:
    return {"gse": StageWork(GSE_SIZE, GSE_TEXT_TOKENS, decode_tokens[0]),
            "lpr": StageWork(LPR_SIZE, LPR_TEXT_TOKENS, decode_tokens[1])}


def stage_costs(models: Models, works: dict[str, StageWork], precision: str, lm_head: str = "fp32") -> dict[str, Cost]:
    p = PRECISIONS[precision]
    costs = {}
    for stage, cfg in (("gse", models.gse), ("lpr", models.lpr)):
        costs.update({f"{stage}_{k}": c for k, c in vlm_costs(cfg, works[stage], p, lm_head).items()})
    costs.update({f"sam2_{k}": c for k, c in sam2_costs(models.sam2, vision_precision(p)).items()})
    return costs


def plan_floors(models: Models, device: Device, precision: str, works: dict[str, StageWork],
                lm_head: str = "fp32") -> list[Floor]:
    """One Floor per stage in STAGES order; LLM stages at `precision`, vision/SAM2 16-bit;
    lm_head: the decoder's output head (`cost.LM_HEAD_BYTES`)."""
    costs = stage_costs(models, works, precision, lm_head)
    llm, vis = PRECISIONS[precision], vision_precision(PRECISIONS[precision])
    bw = device.bandwidth_gbs.value
    return [floor(s, costs[s], device.peak((llm if "prefill" in s or "decode" in s else vis).math), bw)
            for s in STAGES]


def group_floors_ms(floors: list[Floor]) -> dict[str, float]:
    by = {f.stage: f.floor_ms for f in floors}
    out = {g: sum(by[s] for s in stages) for g, stages in GROUPS.items()}
    out["end to end"] = sum(by.values())
    return out


# ---- printing -----------------------------------------------------------------------------


def _header(models: Models, device: Device, precision: str, works: dict[str, StageWork]) -> list[str]:
    g, p = models.gse, PRECISIONS[precision]
    peaks = ", ".join(f"{k} {v.value:g}" for k, v in device.peak_tflops.items())
    unsure = f"; unsure: {g.unsure}" if g.unsure else ""
    cpu_note = " (this CPU: fp32)" if device.fp32_only else ""
    lines = [
        (f"model {models.name}: LLM {g.text.params / 1e9:.2f} B params, vision {g.vision.params / 1e6:.1f} M, "
         f"SAM2 {models.sam2.name}  [{g.source}{unsure}]"),
        f"device {device.key}: {device.name}, {device.bandwidth_gbs.value:g} GB/s, dense TFLOP/s: {peaks}",
        f"  sources: {device.bandwidth_gbs.source}; {_peak_source(device, p.math)}",
        (f"precision {precision}: LLM weights {p.weight_bytes:g} B, activations/KV {p.act_bytes:g} B, "
         f"math {p.math}{cpu_note}; vision towers and SAM2 {vision_precision(p).name}"),
    ]
    for stage, cfg in (("gse", models.gse), ("lpr", models.lpr)):
        w, v = works[stage], cfg.vision
        rows, cols = w.grid(v)
        lines.append(f"work {stage}: {rows * cols:,} patches -> {w.image_tokens(v):,} image + {w.text_tokens} "
                     f"text tokens; {w.decode_tokens} generated ({w.decode_tokens - 1} decode steps)")
    return lines


def _peak_source(device: Device, math: str) -> str:
    spec = device.peak_tflops.get("fp32" if device.fp32_only else math)
    return spec.source if spec else f"no {math} peak"


def format_floors(floors: list[Floor]) -> list[str]:
    rows = [f"{'stage':<14}{'GFLOP':>11}{'GB moved':>10}{'compute ms':>12}{'memory ms':>11}{'floor ms':>10}  bound"]
    for f in floors:
        rows.append(f"{f.stage:<14}{f.flops / 1e9:>11,.1f}{f.bytes / 1e9:>10,.2f}{f.compute_ms:>12,.2f}"
                    f"{f.memory_ms:>11,.2f}{f.floor_ms:>10,.2f}  {f.bound}")
    return rows


def format_plan(models: Models, device: Device, precision: str, works: dict[str, StageWork]) -> str:
    floors = plan_floors(models, device, precision, works)
    lines = _header(models, device, precision, works) + [""] + format_floors(floors) + [""]
    lines.append(f"{'':<14}{'floor s (' + device.key + ')':>20}{'paper s (A100)':>18}")
    for group, ms in group_floors_ms(floors).items():
        lines.append(f"{group:<14}{ms / 1e3:>20.3f}{PAPER_A100_S[group]:>18.2f}")
    lines.append(f"paper column: {PAPER_SOURCE}, host work and its own decode lengths included")
    return "\n".join(lines)


def parse_pair(text: str) -> tuple[int, int]:
    """'256,160' -> (256, 160): generated tokens for GSE and LPR."""
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GSE,LPR token counts like 256,160, got {text!r}") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return a, b


# ---- CLI ------------------------------------------------------------------------------------


def plan(*, model: str, device: str, precision: str = "bf16", decode_tokens=(256, 160), as_json: bool = False) -> str:
    """The plan table (or its JSON) for `model` on `device`."""
    models, dev, works = resolve_models(model), get_device(device), default_works(decode_tokens)
    if not as_json:
        return format_plan(models, dev, precision, works)
    floors = plan_floors(models, dev, precision, works)
    doc = {"model": models.name, "device": asdict(dev), "precision": precision,
           "stages": [{**asdict(f), "floor_ms": f.floor_ms, "bound": f.bound} for f in floors],
           "groups_ms": group_floors_ms(floors), "paper_a100_s": PAPER_A100_S}
    return json.dumps(doc, indent=2)


def cmd_plan(args) -> None:
    print(plan(model=args.model, device=args.device, precision=args.precision,
               decode_tokens=args.decode_tokens, as_json=args.json))


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="7b | 3b | a checkpoint folder (reads config.json)")
    p.add_argument("--device", required=True, choices=sorted(DEVICES) + ["cpu"],
                   help="cpu = this machine, measured once (numpy copy bandwidth, float32 GEMM)")
    p.add_argument("--precision", default="bf16", choices=[k for k in PRECISIONS if k != "fp32"] + ["fp32"],
                   help="LLM precision; int8/int4 are weight-only (16-bit math)")
    p.add_argument("--decode-tokens", type=parse_pair, default=(256, 160), metavar="GSE,LPR",
                   help="generated tokens per stage, <|im_end|> included (default 256,160)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def add_plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="per-stage FLOPs, bytes and latency floor of a model on a device")
    _add_plan_args(p)
    p.set_defaults(func=cmd_plan)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="finers-rt plan", description=__doc__.splitlines()[0])
    _add_plan_args(ap)
    args = ap.parse_args(argv)
    try:
        cmd_plan(args)
    except (ValueError, OSError) as e:
        print(f"finers-rt plan: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
