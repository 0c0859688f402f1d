"""`finers-rt build --target trt`: TensorRT engines from the ONNX graphs of an engine folder.

Builds DIR/gse/vision.engine, DIR/lpr/vision.engine, DIR/sam2/sam2_encoder.engine and
DIR/sam2/sam2_decoder.engine from the verified graphs `finers-rt export` wrote beside them, with the
optimisation profiles of `finers_rt.trt_engines.graph_profile` (the specs' min/max, the stage's real
input as opt), and records a `trt` section in DIR/manifest.json (TensorRT version, GPU, SM,
precision, per-engine file + profile). Engines only run on the TensorRT release and GPU
architecture that built them: build on the deployment machine (Jetson: on the Jetson itself).

Precision, per TensorRT major:
- 10.x: a weakly typed network; fp16 / bf16 / int8 / fp8 are builder flags (TensorRT may run any
  layer in that precision, falling back to fp32). fp32 clears TF32 so it matches the specs' atol.
- 11.x: strongly typed networks only (the precision flags were removed): precision is the ONNX
  graph's own types. fp16 builds from an fp16 graph: the folder's own when it was exported with
  `--precision fp16`, else a temporary copy converted by `finers_rt.export.quantize.to_fp16` (the
  same converter `export --precision fp16` uses: fp16 weights/compute, fp32 IO kept, so the IO
  spec holds). bf16 needs a bf16 graph, which this project has no converter for (ModelOpt AutoCast).
- int8 / fp8 on both: explicit quantization only (Q/DQ nodes in the graph): TensorRT 10.1
  deprecated and 11 removed calibration-based int8 (the calibrator APIs and BuilderFlag.INT8/FP8;
  docs.nvidia.com/deeplearning/tensorrt "Removed Python APIs and Replacements"). int8 builds from
  the Q/DQ copies `finers-rt export --qdq int8` records in the manifest's `qdq` section
  (`finers_rt.export.qdq`; gse/vision.int8.onnx, ...), refused when they are missing or made from
  another fp32 graph. On 10.x the weak-typing flags INT8 + FP16 are set (the Q/DQ pairs fix where
  int8 runs, FP16 lets the unquantized layers run in fp16); on 11.x no flag: the Q/DQ graph's own
  types (int8 around the weight-bearing ops, fp32 elsewhere). fp8 likewise, from the E4M3 Q/DQ
  copies of `export --qdq fp8` (`finers_rt.export.qdq_fp8`), flags FP8 + FP16 on 10.x, SM >= 8.9;
  the fp8 recipe quantizes the vision towers only, SAM2's engines build as fp16
  (`trt_engines.QDQ_GRAPHS`; `engine_precision`), which the manifest records per engine.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from ..backends.ort import expected_digests
from ..backends.trt_runtime import device_info, import_tensorrt
from ..manifest import load_manifest, write_manifest
from ..trt_engines import (
    BUILD_DEFAULTS,
    TENSORRT_PINS,
    QDQ_GRAPHS,
    TRT_GRAPHS,
    engine_file,
    graph_profile,
    graph_spec,
    tensorrt_major,
    trt_section,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
MIN_SM = {"bf16": (8, 0), "fp8": (8, 9)}  # bf16 tensor cores from Ampere, fp8 from Ada/Hopper
QDQ_PRECISIONS = ("int8", "fp8")
# TensorRT 10 weak-typing flags per precision (fp16 beside int8/fp8 for the layers left unquantized).
TRT10_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16"), "fp8": ("FP8", "FP16")}


def network_flags(trt, major: int) -> int:
    """create_network flags: 0 (weakly typed; EXPLICIT_BATCH is implied since 10.0) on TensorRT 10,
    STRONGLY_TYPED on 11 (the only mode there; the flag is kept for clarity and is harmless)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major >= 11 else 0


def build_engine(trt, onnx_path: Path, profile: dict, *, precision: str, workspace_bytes: int) -> bytes:
    """Serialized engine of one ONNX graph. profile: {input: (min, opt, max)} (empty if static)."""
    major = tensorrt_major(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, major))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file: external weights resolve beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if major < 11:
        for flag in TRT10_FLAGS[precision]:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would miss the specs' fp32 atol
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    return bytes(plan)


def check_precision(precision: str, major: int, sm: str, manifest_precision: str) -> None:
    """Refuse combinations that cannot work, before minutes of building."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if major not in TENSORRT_PINS:
        raise RuntimeError(f"TensorRT {major}.x is not supported; use {' or '.join(TENSORRT_PINS.values())}")
    need = MIN_SM.get(precision)
    if need and tuple(int(v) for v in sm.split(".")) < need:
        raise ValueError(f"{precision} needs a GPU of SM >= {need[0]}.{need[1]}; this one is SM {sm}")
    if manifest_precision == "fp16" and precision != "fp16":
        raise ValueError("this folder holds fp16 graphs (export --precision fp16): build with --precision fp16")
    if major >= 11 and precision == "bf16":
        raise ValueError("TensorRT 11 builds only strongly typed networks, so bf16 needs bf16 ONNX graphs; "
                         "finers-rt has no bf16 converter (NVIDIA ModelOpt AutoCast writes them): use fp16")


def engine_precision(precision: str, rel: str) -> str:
    """The precision graph `rel` builds in under `--precision precision`: fp16 for the graphs an
    explicit-quantization recipe leaves out (fp8: SAM2), else `precision`."""
    if precision in QDQ_PRECISIONS and rel not in QDQ_GRAPHS[precision]:
        return "fp16"
    return precision


def has_qdq(onnx_path: Path) -> bool:
    """Whether a graph is explicitly quantized (QuantizeLinear/DequantizeLinear nodes)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def qdq_graph(engine_dir: Path, manifest: dict, rel: str, precision: str) -> Path:
    """The explicitly quantized copy of graph `rel` recorded by `finers_rt.export.qdq.export_qdq`."""
    from .qdq import file_sha256, qdq_sections

    fix = (f"run `finers-rt export --checkpoints {manifest.get('checkpoints', 'CKPT')} --out {engine_dir} --device cuda "
           f"--qdq {precision} --overwrite` (or `python -m finers_rt.export.qdq --engines {engine_dir} "
           f"--precision {precision}`)")
    entry = qdq_sections(manifest).get(precision, {}).get("graphs", {}).get(rel)
    if entry is None:
        raise ValueError(f"{precision} engines need explicitly quantized graphs (Q/DQ nodes; TensorRT 10 deprecated "
                         f"and 11 removed implicit int8 calibration); {engine_dir} records none for {rel}: {fix}")
    path = engine_dir / entry["file"]
    if not path.is_file() or not has_qdq(path):
        raise ValueError(f"{path} is missing or has no Q/DQ node: {fix}")
    if entry.get("source_sha256") != file_sha256(engine_dir / rel):
        raise ValueError(f"{path} was quantized from another {rel} (the fp32 graph changed since): {fix}")
    return path


def typed_onnx(onnx_path: Path, precision: str, major: int, manifest_precision: str, tmp: Path) -> Path:
    """The ONNX file to build from: the folder's own, or (TensorRT 11, fp16) an fp16 copy in `tmp`.
    For int8 / fp8 `onnx_path` is already the Q/DQ copy (`qdq_graph`): it is built as it is."""
    if precision in QDQ_PRECISIONS and not has_qdq(onnx_path):
        raise ValueError(f"{precision} engines need explicitly quantized graphs (Q/DQ nodes); {onnx_path} has none: "
                         f"run `finers-rt export --qdq {precision}`")
    if major < 11 or precision != "fp16" or manifest_precision == "fp16":
        return onnx_path
    from .quantize import to_fp16

    copy = tmp / f"{onnx_path.parent.name}_{onnx_path.name}"
    to_fp16(onnx_path, copy)
    log.info("%s: fp16 copy for a strongly typed build: %s", onnx_path, copy)
    return copy


def build_engines(engine_dir: Path, *, precision: str = BUILD_DEFAULTS["precision"],
                  max_batch: int = BUILD_DEFAULTS["max_batch"],
                  workspace_gb: float = BUILD_DEFAULTS["workspace_gb"]) -> dict:
    """Build every engine of TRT_GRAPHS in `engine_dir` on this GPU; returns the manifest's `trt` section."""
    trt = import_tensorrt()
    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir, expected_digests(engine_dir))
    for key in ("vision_attention", "sam2_attention"):  # com.microsoft ops: TensorRT cannot parse them
        if manifest.get(key, "onnx") != "onnx":
            raise ValueError(f"{engine_dir} was exported with --{key.replace('_', '-')} {manifest[key]} "
                             f"(ONNX Runtime contrib ops); TensorRT needs standard ops: re-export with "
                             f"`finers-rt export --checkpoints {manifest.get('checkpoints', 'CKPT')} --out DIR "
                             "--device cuda`")
    major, gpu = tensorrt_major(trt.__version__), device_info()
    check_precision(precision, major, gpu["sm"], manifest["precision"])
    if max_batch != 1 and not any("batch" in graph_spec(engine_dir, rel).profiles for rel in TRT_GRAPHS):
        raise ValueError(f"--max-batch {max_batch}: none of {', '.join(TRT_GRAPHS)} has a dynamic batch dim (vision "
                         "runs one image per call, the SAM2 specs are batch 1), so only --max-batch 1 is meaningful")
    profiles = {rel: graph_profile(engine_dir, rel, max_batch=max_batch) for rel in TRT_GRAPHS}
    engines = {}
    with tempfile.TemporaryDirectory(dir=engine_dir, prefix=".trt-build-") as tmp:
        for rel in TRT_GRAPHS:
            t0 = time.perf_counter()
            graph_precision = engine_precision(precision, rel)
            quantized = graph_precision in QDQ_PRECISIONS
            src = qdq_graph(engine_dir, manifest, rel, graph_precision) if quantized else engine_dir / rel
            onnx_path = typed_onnx(src, graph_precision, major, manifest["precision"], Path(tmp))
            plan = build_engine(trt, onnx_path, profiles[rel], precision=graph_precision,
                                workspace_bytes=int(workspace_gb * (1 << 30)))
            (engine_dir / engine_file(rel)).write_bytes(plan)
            engines[rel] = {"file": engine_file(rel), "onnx": str(src.relative_to(engine_dir)),
                            "precision": graph_precision, "profile": profiles[rel],
                            "spec_digest": graph_spec(engine_dir, rel).digest(), "bytes": len(plan),
                            "build_s": round(time.perf_counter() - t0, 1)}
            log.info("%s -> %s (%d bytes)", rel, engine_file(rel), len(plan))
    manifest["trt"] = trt_section(version=trt.__version__, gpu=gpu["gpu"], sm=gpu["sm"], precision=precision,
                                  max_batch=max_batch, workspace_gb=workspace_gb, engines=engines,
                                  strongly_typed=major >= 11)
    write_manifest(engine_dir, manifest)
    return manifest["trt"]


def cmd_build(args) -> None:
    section = build_engines(args.engines, precision=args.precision, max_batch=args.max_batch,
                            workspace_gb=args.workspace_gb)
    print(f"built {len(section['engines'])} TensorRT {section['tensorrt']} engines ({section['precision']}) "
          f"for {section['gpu']} (SM {section['sm']}) in {args.engines}:")
    for e in section["engines"].values():
        print(f"  {e['file']:<28} {e.get('precision', section['precision']):<5} {e['bytes'] / 2**20:8.1f} MiB  "
              f"{e['build_s']:6.1f} s")
    print("run them with Pipeline.from_engines(DIR, device='trt'); they are valid only on this "
          "TensorRT release and GPU architecture")


def add_build_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("build", help="build TensorRT engines from an engine folder's ONNX graphs (on the target GPU)")
    p.add_argument("--engines", required=True, type=Path, help="engine folder written by `finers-rt export`")
    p.add_argument("--target", required=True, choices=["trt"], help="trt: TensorRT engines for vision + SAM2")
    p.add_argument("--precision", default=BUILD_DEFAULTS["precision"], choices=PRECISIONS,
                   help="fp16 (default), bf16 (TensorRT 10, SM >= 8.0), fp32, int8 (from the Q/DQ graphs of "
                        "`finers-rt export --qdq int8`), fp8 (vision from the graphs of `--qdq fp8`, SAM2 in fp16; SM >= 8.9)")
    p.add_argument("--max-batch", type=int, default=BUILD_DEFAULTS["max_batch"],
                   help="profile max of dynamic batch dims (the current graphs have none: 1)")
    p.add_argument("--workspace-gb", type=float, default=BUILD_DEFAULTS["workspace_gb"],
                   help="TensorRT builder workspace memory pool, GiB")
    p.set_defaults(func=cmd_build)
    return p
