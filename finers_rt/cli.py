"""finers-rt: FineRS deployment runtime (GSE -> region -> LPR -> SAM2). Subcommands below.

Each subcommand is a keyword-only function; `main(argv=None)` parses and dispatches. Library code
logs; only this module prints.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import PRESETS, REGION_MODES, TASKS, PipelineConfig

ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")  # `finers-rt export --target onnx`

log = logging.getLogger("finers_rt")


def _pipeline_config(args) -> PipelineConfig:
    cfg = PRESETS[args.preset]
    changes = {}
    if args.region_mode is not None:
        changes["region_mode"] = args.region_mode
    if args.lpr_channel_swap is not None:
        changes["lpr_channel_swap"] = args.lpr_channel_swap
    if args.parse_mode is not None:
        changes["parse_mode"] = args.parse_mode
    return cfg.replace(**changes)


def _backend(args) -> str:
    """--backend, else inferred: --engines means ort, --checkpoints means torch."""
    backend = args.backend or ("ort" if args.engines else "torch")
    if backend == "ort" and not args.engines:
        raise ValueError("--backend ort needs --engines DIR (build one with `finers-rt export`)")
    if backend == "torch" and not args.checkpoints:
        raise ValueError("--backend torch needs --checkpoints DIR")
    if backend == "trtllm" and not (args.engines and getattr(args, "ort_engines", None)):
        raise ValueError("--backend trtllm needs --engines DIR (`finers-rt export --target trtllm` or "
                         "`--target trtllm-engine`) and --ort-engines DIR (`finers-rt export`: SAM2, vision)")
    return backend


def _load_pipeline(args):
    from .pipeline import Pipeline

    if _backend(args) == "trtllm":
        return Pipeline.from_trtllm(args.engines, ort_engines=args.ort_engines, device=args.device,
                                    config=_pipeline_config(args))
    if _backend(args) == "ort":
        return Pipeline.from_engines(args.engines, device=args.device, config=_pipeline_config(args))
    return Pipeline.from_checkpoints(args.checkpoints, backend="torch", device=args.device,
                                     precision=args.precision, config=_pipeline_config(args),
                                     sam2_config=args.sam2_config)


def cmd_export(*, args) -> None:
    if args.target != "onnx":
        from .export.trtllm_engine import run_export_target

        manifest = run_export_target(args)
        print(f"wrote {manifest['kind']} ({manifest['precision']}) to {args.out}/trtllm_manifest.json")
        for stage, info in manifest["stages"].items():
            for cmd in info.get("commands", []):
                print(f"  {stage} ({'built' if info.get('built') else 'run on the GPU machine'}): {cmd}")
        return
    precision = args.precision or "fp32"
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"--precision {precision} is for --target trtllm-engine|trtllm; "
                         f"--target onnx takes {'|'.join(ONNX_PRECISIONS)}")
    from .export.engine import export_engines, graph_kinds

    qdq = getattr(args, "qdq", None)  # Q/DQ copies for TensorRT: standard-op graphs, so --device cuda kinds
    vision, decoder, head, sam2 = graph_kinds(args.device or ("cuda" if qdq else None), precision,
                                              args.vision_attention, args.decoder_attention, args.lm_head,
                                              args.sam2_attention)
    if qdq and (precision != "fp32" or "ort" in (vision, sam2)):
        raise ValueError("--qdq quantizes fp32 standard-op graphs for TensorRT: use --precision fp32 and "
                         "--vision-attention onnx --sam2-attention onnx (the --device cuda defaults)")
    manifest = export_engines(Path(args.checkpoints), Path(args.out), precision=precision,
                              overwrite=args.overwrite, sam2_config=args.sam2_config,
                              vision_attention=vision, decoder_attention=decoder, lm_head=head,
                              sam2_attention=sam2)
    print(f"exported {len(manifest['graphs'])} graphs ({manifest['precision']}, vision attention {vision}, "
          f"decoder attention {decoder}, lm_head {head}, sam2 attention {sam2}) to {args.out}; verification:")
    for name, g in manifest["graphs"].items():
        print(f"  {name:<26} vs torch: max abs diff {g['max_abs_diff']:.3g}, mismatch {g['mismatch_pct']:.3g} %")
    if qdq:
        from .export.qdq import export_qdq, print_qdq

        print_qdq(export_qdq(Path(args.out), precision=qdq, calib_data=args.calib_data, calib_count=args.calib_count))


def cmd_make_tiny(*, out: Path, seed: int = 0, size: str = "tiny") -> None:
    from .export.tiny import make_tiny

    make_tiny(out, seed=seed, size=size)
    print(f"tiny {size} checkpoints (random weights, seed {seed}) written to {out}/{{gse,lpr,sam2}}")


def cmd_make_synth(*, out: Path, n: int = 20, seed: int = 0) -> None:
    from .synth import make_synth

    path = make_synth(out, n=n, seed=seed)
    print(f"synthetic FineRS-4k-format dataset: {path} (images in {out / 'images'})")


def cmd_run(*, args) -> None:
    from .forced import load_force_file
    from .image import load_image
    from .viz import save_mask, save_overlay

    force = load_force_file(args.force_output) if args.force_output else None
    pipeline = _load_pipeline(args)
    image = load_image(args.image)
    res = pipeline.run(image, args.question, task=args.task, options=args.options, force_output=force)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res.to_dict(), indent=2))
    save_mask(res.mask, out / "mask.png")
    save_overlay(image, res, out / "overlay.png")
    print_summary(res)
    print(f"wrote {out / 'result.json'}, {out / 'mask.png'}, {out / 'overlay.png'}")


def print_summary(res) -> None:
    forced = " (FORCED OUTPUT: stage texts scripted, not generated)" if res.forced else ""
    print(f"backend {res.backend} {res.precision}{forced}")
    print(f"answer: {res.answer!r}   parse: gse={res.parse.get('gse')} lpr={res.parse.get('lpr', '-')}")
    print(f"gse box {res.gse_box}  crop {res.crop_box}  lpr box {res.lpr_box}  points {res.points}")
    print(f"mask area {res.mask_area} px  sam2 score {res.sam2_score}")
    print(format_timings(res))


def format_timings(res) -> str:
    rows = [f"{'stage':<14}{'ms':>10}"]
    for k, v in res.timings_ms.items():
        extra = ""
        stage = k.split("_")[0]
        if k.endswith("_decode") and res.tokens.get(stage):
            n = res.tokens[stage]
            extra = f"   {n} tokens, {v / n:.1f} ms/token"
        rows.append(f"{k:<14}{v:>10.1f}{extra}")
    return "\n".join(rows)


def cmd_eval(*, args) -> None:
    from .evaluate import evaluate

    pipeline = _load_pipeline(args)
    summary = evaluate(pipeline, Path(args.annotations), Path(args.images), Path(args.out),
                       limit=args.limit, save_masks=args.save_masks, force_from_gt=args.force_output_from_gt)
    print(json.dumps({k: summary[k] for k in ("giou", "ciou", "option_acc", "reasoning_acc", "counts")}, indent=2))
    print(f"wrote {Path(args.out) / 'results.json'} and per_sample.jsonl")


def _ensure_tiny(path: Path, seed: int = 0, size: str = "tiny") -> Path:
    """Reuse tiny checkpoints from an earlier demo if they were made with the same seed and size."""
    meta = path / "tiny.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("seed") == seed and info.get("size") == size:
            return path
    from .export.tiny import make_tiny

    print(f"building tiny random-weight checkpoints in {path} ...")
    make_tiny(path, seed=seed, size=size)
    return path


def _ensure_engines(ckpts: Path, out: Path, device: str) -> Path:
    """Export `ckpts` to `out` for `device` unless such an fp32 export of exactly these checkpoints is there."""
    from .export.engine import export_engines, graph_kinds
    from .manifest import MANIFEST, hash_tree

    vision, decoder, head, sam2 = graph_kinds("cpu" if device == "cpu" else "cuda", "fp32")
    meta = out / MANIFEST
    if meta.is_file():
        m = json.loads(meta.read_text())
        kinds = (m.get("vision_attention"), m.get("decoder_attention"), m.get("lm_head", "fp32"))
        # folders from before the sam2_attention key (standard-op SAM2, runs everywhere) are reused
        if (m.get("precision") == "fp32" and kinds == (vision, decoder, head)
                and m.get("sam2_attention", sam2) == sam2
                and m.get("sources") == {s: hash_tree(ckpts / s) for s in ("gse", "lpr", "sam2")}):
            return out
    print(f"exporting the tiny checkpoints to ONNX in {out} (each graph is verified against torch) ...")
    manifest = export_engines(ckpts, out, overwrite=True, vision_attention=vision, decoder_attention=decoder,
                              lm_head=head, sam2_attention=sam2)
    for name, g in manifest["graphs"].items():
        print(f"  {name:<26} vs torch: max abs diff {g['max_abs_diff']:.3g}, mismatch {g['mismatch_pct']:.3g} %")
    return out


def cmd_demo(*, args) -> None:
    from .dataset import load_annotations
    from .forced import FOUND, from_ground_truth
    from .image import load_image
    from .synth import make_synth
    from .viz import save_mask, save_overlay

    work = Path(args.workdir)
    ckpts = _ensure_tiny(work / "checkpoints")
    ann = make_synth(work / "synth", n=3, seed=0)
    sample = load_annotations(ann, work / "synth" / "images")[0]
    args.checkpoints, args.engines = ckpts, None
    if (args.backend or "ort") == "ort":
        args.backend, args.engines = "ort", _ensure_engines(ckpts, work / "engines", args.device)
    pipeline = _load_pipeline(args)
    image = load_image(sample.image_path)
    h, w = image.shape[:2]
    response = FOUND if sample.task == "referring" else sample.answer
    force = from_ground_truth(sample.polygon, w, h, response, pipeline.config)
    options = sample.options if sample.task == "option" else None
    res = pipeline.run(image, sample.question, task=sample.task, options=options, force_output=force)
    out = work / "run"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res.to_dict(), indent=2))
    save_mask(res.mask, out / "mask.png")
    save_overlay(image, res, out / "overlay.png")
    print("finers-rt demo: the checkpoints are TINY RANDOM-WEIGHT models, not FineRS. Their stage")
    print("texts are forced from the synthetic ground truth so that every stage does its real work;")
    print("boxes, masks and answers therefore say nothing about model quality.\n")
    print(f"image {sample.image_path.name} ({w}x{h}), question [{sample.task}]: {sample.question}")
    print_summary(res)
    print(f"wrote {out}/result.json, mask.png, overlay.png")


def _add_pipeline_args(p: argparse.ArgumentParser, *, need_checkpoints: bool = True) -> None:
    if need_checkpoints:
        p.add_argument("--checkpoints", type=Path, default=None,
                       help="folder with gse/, lpr/ (HF Qwen2.5-VL) and sam2/ (a SAM2 .pt): torch backend")
        p.add_argument("--engines", type=Path, default=None,
                       help="engine folder from `finers-rt export`: ort backend (the embedded default); "
                            "trtllm: the folder of `finers-rt export --target trtllm|trtllm-engine`")
        p.add_argument("--ort-engines", type=Path, default=None,
                       help="trtllm backend: the `finers-rt export` folder of the same checkpoints "
                            "(its sam2/ and, for trtllm-engine, gse|lpr/vision.onnx run on ONNX Runtime --device)")
    p.add_argument("--backend", default=None, choices=["torch", "ort", "trtllm"],
                   help="default: ort with --engines, torch with --checkpoints; trtllm needs tensorrt-llm==1.2.1")
    p.add_argument("--device", default="cpu",
                   help="ort: cpu | cuda | tensorrt (ORT providers) | trt (TensorRT engines from `finers-rt build`); "
                        "torch: cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="torch backend dtype (ort engines carry their own precision)")
    p.add_argument("--sam2-config", default=None,
                   help="sam2 package config for the SAM2 checkpoint, e.g. configs/sam2/sam2_hiera_l.yaml "
                        "(default: sam2/sam2.json, else inferred from the .pt file name)")
    p.add_argument("--preset", default="reference", choices=sorted(PRESETS),
                   help="reference: reproduces the published pipeline, bugs included")
    p.add_argument("--region-mode", choices=REGION_MODES, default=None,
                   help="clamp (reference) or shift the region inside the image")
    p.add_argument("--lpr-channel-swap", action=argparse.BooleanOptionalAction, default=None,
                   help="feed LPR R/B-swapped crops as the reference does (default on)")
    p.add_argument("--parse-mode", choices=["reference", "tolerant"], default=None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finers-rt", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks of errors")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write tiny random-weight gse/lpr/sam2 checkpoints")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["tiny", "bench"], default="tiny")

    p = sub.add_parser("make-synth", help="write a synthetic FineRS-4k-format dataset")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=20, help="number of annotations")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("export", help="export checkpoints to a verified ONNX engine folder or TensorRT-LLM artifacts")
    p.add_argument("--checkpoints", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--precision", default=None,
                   choices=[*ONNX_PRECISIONS, "bf16", "int8-wo", "int8-sq", "fp8", "int4-awq"],
                   help="onnx: fp32 (default) | fp16 (GPU providers only) | int8 | int4 (weight-only decoders, "
                        "MatMulNBits); trtllm-engine: fp16 (default) | bf16 | int8-wo | int8-sq; "
                        "trtllm: bf16 (default) | fp16 | fp8 | int4-awq")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sam2-config", default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the folder will run; picks the graph kinds below when they are not given: "
                        "cpu (default; cuda for --precision fp16): --vision-attention ort --decoder-attention gqa "
                        "--lm-head screened --sam2-attention ort; cuda: onnx / onnx / fp32 / onnx (standard ops: "
                        "ORT CUDA and `finers-rt build` for TensorRT)")
    p.add_argument("--vision-attention", choices=["onnx", "ort"], default=None,
                   help="onnx: standard ops, TensorRT-buildable; ort: ORT's MultiHeadAttention (flash attention) "
                        "and RotaryEmbedding for every block (faster, 7x less memory on CPU; ONNX Runtime only)")
    p.add_argument("--sam2-attention", choices=["onnx", "ort"], default=None,
                   help="onnx: standard ops, TensorRT-buildable; ort: ORT's MultiHeadAttention (flash attention) "
                        "for the SAM2 encoder's Hiera blocks (faster on CPU; ONNX Runtime only)")
    p.add_argument("--decoder-attention", choices=["onnx", "gqa"], default=None,
                   help="onnx: standard ops, KV cache grown by Concat; gqa: ORT's GroupQueryAttention "
                        "contrib op (ONNX Runtime only) with a fixed-size KV cache written in place: faster "
                        "prefill, no per-step cache copies (float32: CPU only; with --precision fp16 the decoder "
                        "is built in float16 with a float16 cache, for ORT CUDA: unverified on a GPU)")
    p.add_argument("--lm-head", choices=["fp32", "screened"], default=None,
                   help="fp32: float32 logits; screened (float32 GQA decoder only): int8 bounds on every logit, "
                        "the host rescores in float32 the few rows that can be the argmax: the same greedy ids, "
                        "a quarter of the lm_head bytes per decode step")
    p.add_argument("--qdq", choices=["int8", "fp8"], default=None,
                   help="also write Q/DQ copies of the vision and SAM2 graphs (*.int8.onnx / *.fp8.onnx, for "
                        "`finers-rt build --precision int8|fp8`): symmetric int8 calibrated on --calib-data (default: "
                        "synthetic frames), or fp8 E4M3 converted from it (vision towers only: SAM2 builds in fp16); checked "
                        "against fp32 on held-out images; "
                        "implies --device cuda graph kinds")
    p.add_argument("--calib-count", type=int, default=8, help="--qdq: calibration images (2 more are held out)")
    from .export.trtllm_engine import add_trtllm_export_args  # numpy-only module

    add_trtllm_export_args(p)  # --target onnx|trtllm-engine|trtllm, --no-build, --trtllm-examples, --calib-data

    p = sub.add_parser("run", help="run the pipeline on one image")
    _add_pipeline_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--task", choices=TASKS, default="referring")
    p.add_argument("--options", default=None, help="options text for --task option, e.g. \"['A. red', 'B. blue']\"")
    p.add_argument("--force-output", default=None, metavar="FILE.json",
                   help='script the stage texts: {"gse": "...", "lpr": "..."} (testing only)')
    p.add_argument("--out", default="finers-out", help="folder for result.json, mask.png, overlay.png")

    p = sub.add_parser("eval", help="evaluate on FineRS-4k-format annotations")
    _add_pipeline_args(p)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default="finers-eval")
    p.add_argument("--save-masks", action="store_true")
    p.add_argument("--force-output-from-gt", action="store_true",
                   help="script each stage's text from the annotation (checks the chain with random weights)")

    from .bench import add_bench_parser
    from .client import add_query_parser
    from .export.trt_build import add_build_parser
    from .plan import add_plan_parser
    from .serve import add_serve_parser

    add_bench_parser(sub)
    add_build_parser(sub)
    add_plan_parser(sub)
    add_serve_parser(sub)
    add_query_parser(sub)

    p = sub.add_parser("demo", help="tiny checkpoints + synthetic data + one run (random weights)")
    _add_pipeline_args(p, need_checkpoints=False)
    p.add_argument("--workdir", default="demo-out")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "make-tiny":
            cmd_make_tiny(out=args.out, seed=args.seed, size=args.size)
        elif args.command == "make-synth":
            cmd_make_synth(out=args.out, n=args.n, seed=args.seed)
        elif args.command == "export":
            cmd_export(args=args)
        elif args.command == "run":
            cmd_run(args=args)
        elif args.command == "eval":
            cmd_eval(args=args)
        elif args.command == "demo":
            cmd_demo(args=args)
        else:  # subcommands registered by their own modules (bench, plan, serve, query)
            args.func(args)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        log.debug("traceback", exc_info=True)
        print(f"finers-rt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
