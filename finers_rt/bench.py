"""`finers-rt bench`: per-stage latency of the real pipeline in forced-output mode, one JSON row
per configuration.

Every run is `Pipeline.run` on a synthetic 3840x2160 frame, passed as JPEG bytes (quality 95) so
`preprocess` includes the decode a deployment pays, with scripted stage texts of exactly
the requested generated-token counts (`finers_rt.bench_script`; counts include the <|im_end|>
step), so random-weight checkpoints do the full work: both VLM stages decode N tokens, the
region is cut, LPR's box and points prompt SAM2. Nothing here re-implements a stage.

With --compare, two configurations are loaded in one process and alternated run by run (ABBA:
A B, B A, A B, ...), so drift of a shared machine hits both alike; ratios are A/B of p50s.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .bench_report import (
    format_compare,
    format_paper,
    format_stages,
    git_state,
    hardware,
    peak_rss_mib,
    summarise,
    timestamp,
    versions,
)
from .bench_script import (
    FRAME_SIZE,
    QUESTION,
    count_tokens,
    frame_jpeg,
    stage_scripts,
)
from .config import PRESETS
from .cost import GSE_SIZE, LPR_SIZE, PRECISIONS, StageWork, VLMConfig
from .cost_sam2 import SAM2_MODELS, sam2_model_in
from .devices import DEVICES, get_device
from .manifest import lm_head
from .plan import Models, parse_pair, plan_floors
from .result import TIMING_KEYS

log = logging.getLogger(__name__)
SCHEMA = "finers-rt.bench/1"


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: a backend on a folder (engines for ort, checkpoints for torch)."""

    label: str
    backend: str  # "ort" | "torch" | "trtllm"
    path: Path
    device: str
    precision: str = "fp32"  # torch dtype; ort engines carry their own
    ort_engines: Path | None = None  # trtllm: the ort folder supplying SAM2 (+ vision graphs)

    def load(self, pipeline_config):
        from .pipeline import Pipeline

        if self.backend == "ort":
            return Pipeline.from_engines(self.path, device=self.device, config=pipeline_config)
        if self.backend == "trtllm":
            return Pipeline.from_trtllm(self.path, ort_engines=self.ort_engines, device=self.device,
                                        config=pipeline_config)
        return Pipeline.from_checkpoints(self.path, backend="torch", device=self.device,
                                         precision=self.precision, config=pipeline_config)


def configurations(args) -> list[BenchConfig]:
    """The configurations to run: one, or with --compare two (A, B)."""
    def ort(path, tag: str) -> BenchConfig:
        return BenchConfig(f"{tag}:ort", "ort", Path(path), args.device)

    def torch(tag: str) -> BenchConfig:
        return BenchConfig(f"{tag}:torch", "torch", Path(args.checkpoints), args.device, args.precision)

    if args.compare:
        if args.engines and args.engines_b:
            return [ort(args.engines, "A"), ort(args.engines_b, "B")]
        if args.engines and args.checkpoints:
            return [ort(args.engines, "A"), torch("B")]
        raise ValueError("--compare needs --engines E --checkpoints C (ort vs torch) or --engines E --engines-b E2")
    backend = args.backend or ("ort" if args.engines else "torch")
    if backend == "ort" and not args.engines:
        raise ValueError("--backend ort needs --engines DIR (build one with `finers-rt export`)")
    if backend == "torch" and not args.checkpoints:
        raise ValueError("--backend torch needs --checkpoints DIR")
    if backend == "trtllm":
        if not (args.engines and args.ort_engines):
            raise ValueError("--backend trtllm needs --engines DIR (`finers-rt export --target trtllm|trtllm-engine`) "
                             "and --ort-engines DIR (`finers-rt export`)")
        return [BenchConfig("A:trtllm", "trtllm", Path(args.engines), args.device, ort_engines=Path(args.ort_engines))]
    return [ort(args.engines, "A") if backend == "ort" else torch("A")]


def pipeline_config(decode_tokens: tuple[int, int]):
    """The reference preset with max_new_tokens = the scripted length of each stage."""
    ref = PRESETS["reference"]
    return ref.replace(gse=replace(ref.gse, max_new_tokens=decode_tokens[0]),
                       lpr=replace(ref.lpr, max_new_tokens=decode_tokens[1]))


def run_once(pipe, frame, scripts: dict[str, str], want: dict[str, int]):
    """One forced-output run; checks that every stage ran and generated exactly `want` tokens."""
    res = pipe.run(frame, QUESTION, task="referring", force_output=scripts)
    missing = [k for k in TIMING_KEYS if k not in res.timings_ms]
    if missing:
        raise RuntimeError(f"stages {missing} did not run (parse: {res.parse}, {res.parse_reason})")
    if res.tokens != want:
        raise RuntimeError(f"generated tokens {res.tokens} != requested {want} (<|im_end|> included)")
    return res


def run_all(pipes: dict[str, object], frame, scripts: dict, want: dict, runs: int, warmup: int) -> dict[str, list]:
    """Warm-up rounds, then `runs` timed rounds alternating the configurations ABBA."""
    labels = list(pipes)
    for _ in range(warmup):
        for label in labels:
            run_once(pipes[label], frame, scripts[label], want)
    results = {label: [] for label in labels}
    for i in range(runs):
        for label in labels if i % 2 == 0 else labels[::-1]:
            results[label].append(run_once(pipes[label], frame, scripts[label], want))
            log.info("%s run %d: %.0f ms", label, i, results[label][-1].timings_ms["total"])
    return results


# ---- floors for the checkpoint that ran -------------------------------------------------------


def models_of(cfg: BenchConfig) -> Models:
    """Model configs of a configuration's folder (config.json per stage; SAM2 variant)."""
    root = cfg.ort_engines or cfg.path  # trtllm: the ort folder of the same checkpoints has config.json per stage
    return Models(str(cfg.path), VLMConfig.from_dir(root / "gse"), VLMConfig.from_dir(root / "lpr"),
                  sam2_model_in(root) or SAM2_MODELS["l"])


def floors_ms(cfg: BenchConfig, precision: str, result, floor_device: str) -> dict[str, float]:
    """Per-stage floor (ms) of this checkpoint's work on `floor_device`, with this run's tokens."""
    models, text = models_of(cfg), _text_tokens(cfg, result)
    works = {"gse": StageWork(GSE_SIZE, text["gse"], result.tokens["gse"]),
             "lpr": StageWork(LPR_SIZE, text["lpr"], result.tokens["lpr"])}
    prec = precision if precision in PRECISIONS else "fp32"
    head = lm_head(cfg.path) if cfg.backend == "ort" else "fp32"  # a screened head reads int8 weights
    return {f.stage: f.floor_ms for f in plan_floors(models, get_device(floor_device), prec, works, head)}


def _text_tokens(cfg: BenchConfig, result) -> dict[str, int]:
    """Prompt tokens besides the image: the rendered prompt's tokens minus its one <|image_pad|>."""
    from tokenizers import Tokenizer

    return {s: count_tokens(Tokenizer.from_file(str(cfg.path / s / "tokenizer.json")), result.prompts[s]) - 1
            for s in ("gse", "lpr")}


# ---- rows and CLI ---------------------------------------------------------------------------


def bench(*, configs: list[BenchConfig], runs: int = 3, warmup: int = 1, decode_tokens=(256, 160),
          floor_device: str | None = None) -> list[dict]:
    """Run every configuration; one row (dict) per configuration, in `configs` order."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    want = {"gse": decode_tokens[0], "lpr": decode_tokens[1]}
    scripts = {c.label: stage_scripts({s: c.path / s for s in want}, want) for c in configs}  # fails fast
    pipes = {c.label: c.load(pipeline_config(decode_tokens)) for c in configs}
    results = run_all(pipes, frame_jpeg(FRAME_SIZE), scripts, want, runs, warmup)
    common = {"schema": SCHEMA, "runs": runs, "warmup": warmup, "decode_tokens": want,
              "token_count": "generated tokens incl. the <|im_end|> step; decode steps = tokens - 1",
              "forced_output": True, "frame": list(FRAME_SIZE), "frame_format": "jpeg q95", "question": QUESTION, "task": "referring",
              "order": "ABBA" if len(configs) > 1 else "single", "floor_device": floor_device,
              "peak_rss_mib": peak_rss_mib(), "peak_rss_scope": "process (all configurations loaded in it)",
              "versions": versions(), "hardware": hardware(), **git_state(), "timestamp": timestamp()}
    rows = [_row(c, pipes[c.label], results[c.label], common) for c in configs]
    if len(rows) == 2:
        for a, b in (rows, rows[::-1]):
            a["compare"] = {"with": b["label"], "p50_ratio": {k: a["timings_ms"][k]["p50"] / b["timings_ms"][k]["p50"]
                                                              for k in TIMING_KEYS}}
    for p in pipes.values():
        p.close()
    return rows


def _row(cfg: BenchConfig, pipe, results: list, common: dict) -> dict:
    models = models_of(cfg)
    row = {"label": cfg.label, "backend": cfg.backend, "device": cfg.device, "precision": pipe.precision,
           ("engines" if cfg.backend in ("ort", "trtllm") else "checkpoints"): str(cfg.path),
           **({"ort_engines": str(cfg.ort_engines)} if cfg.ort_engines else {}),
           "model_summary": f"LLM {models.gse.text.params / 1e9:.3g} B params, SAM2 {models.sam2.name}",
           "tokens": dict(results[0].tokens), **common, **summarise(results),
           "runs_ms": [r.timings_ms for r in results]}
    if common["floor_device"]:
        fl = floors_ms(cfg, pipe.precision, results[0], common["floor_device"])
        row["floor_ms"] = fl
        row["measured_over_floor"] = {k: row["timings_ms"][k]["p50"] / v for k, v in fl.items()}
        row["floor_device_spec"] = _device_doc(common["floor_device"])
    return row


def _device_doc(key: str) -> dict:
    d = get_device(key)
    return {"name": d.name, "bandwidth_gbs": d.bandwidth_gbs.value,
            "peak_tflops": {k: v.value for k, v in d.peak_tflops.items()}}


def cmd_bench(args) -> None:
    configs = configurations(args)
    floor_device = args.floor_device or ("cpu" if args.device == "cpu" else None)
    rows = bench(configs=configs, runs=args.runs, warmup=args.warmup, decode_tokens=args.decode_tokens,
                 floor_device=floor_device)
    n = args.decode_tokens
    print(f"finers-rt bench: FORCED OUTPUT (scripted texts, {n[0]}/{n[1]} generated tokens incl. <|im_end|>) "
          f"on a synthetic {FRAME_SIZE[0]}x{FRAME_SIZE[1]} frame; {args.runs} runs after {args.warmup} warm-up")
    for row in rows:
        where = row.get("engines") or row.get("checkpoints")
        print(f"\n[{row['label']}] {row['backend']} {row['precision']} on {row['device']}: {where}")
        if floor_device:
            print(f"floor: {row['floor_device_spec']['name']}")
        print(format_stages(row))
    print("\n" + format_paper(rows))
    if len(rows) == 2:
        print("\n" + format_compare(*rows))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"\nappended {len(rows)} row(s) to {args.out}")
    else:
        print("\n" + "\n".join(json.dumps(row) for row in rows))


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=Path, default=None, help="engine folder (ort backend)")
    p.add_argument("--checkpoints", type=Path, default=None, help="checkpoints folder (torch backend)")
    p.add_argument("--engines-b", type=Path, default=None, help="second engine folder: --compare ort A vs ort B")
    p.add_argument("--ort-engines", type=Path, default=None,
                   help="trtllm backend: `finers-rt export` folder of the same checkpoints (SAM2, vision graphs)")
    p.add_argument("--backend", choices=["torch", "ort", "trtllm"], default=None,
                   help="default: ort with --engines, torch with --checkpoints; trtllm: --engines from "
                        "`finers-rt export --target trtllm|trtllm-engine` + --ort-engines")
    p.add_argument("--device", default="cpu", help="ort: cpu | cuda | tensorrt | trt (TensorRT engines from `finers-rt build`); torch: cpu, cuda, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="torch backend dtype")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first")
    p.add_argument("--decode-tokens", type=parse_pair, default=(256, 160), metavar="GSE,LPR",
                   help="generated tokens per stage, <|im_end|> included (default 256,160)")
    p.add_argument("--compare", action="store_true",
                   help="alternate two configurations: --engines vs --checkpoints, or --engines vs --engines-b")
    p.add_argument("--floor-device", choices=sorted(DEVICES) + ["cpu"], default=None,
                   help="device of the per-stage floor (default: cpu, measured, when --device cpu)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="append the JSON rows here")


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="per-stage latency in forced-output mode; one JSON row per configuration")
    _add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="finers-rt bench", description=__doc__.splitlines()[0])
    _add_bench_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cmd_bench(args)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"finers-rt bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
