"""`finers-rt export --qdq int8|fp8`: explicitly quantized (Q/DQ) copies of the graphs TensorRT builds.

A model-to-model transform applied to an exported engine folder (the fp32 graphs stay): for each of
the recipe's graphs (`trt_engines.QDQ_GRAPHS`) it writes `<graph>.int8.onnx` (or `.fp8.onnx`) beside it, made by ONNX
Runtime's `quantize_static` in QDQ format, in the form TensorRT's explicit quantization takes
(TensorRT 10 and 11 build int8 / fp8 only from Q/DQ graphs; `trt_build` picks these files). fp8
(E4M3, Ada / Hopper) converts the int8 graph: same calibration, same placement (`qdq_fp8`), for
the vision towers only (`trt_engines.QDQ_GRAPHS`: SAM2 failed the fp8 gates and builds in fp16).

- int8 weights, per output channel, symmetric (zero point 0); int8 activations, per tensor,
  symmetric (`ActivationSymmetric`): TensorRT supports only symmetric int8 Q/DQ.
- only the weight-bearing MatMul / Gemm / Conv nodes get Q/DQ on their inputs (activation x weight).
  Softmax, LayerNorm, GELU (Erf), the attention score MatMuls (activation x activation) and the
  index work stay float: TensorRT fuses DQ -> MatMul/Conv into int8 kernels and runs the rest in
  fp16/fp32, which is also what ModelOpt's default int8 recipe quantizes.
- calibration: MinMax over the calibration images. Chosen over Entropy / Percentile because it
  is deterministic, needs no histograms (ORT's histogram collectors hold every activation of a
  10,764-patch GSE image in memory), and never clips a calibration value; the parity check below
  is what decides whether the resulting ranges are good enough.
- inputs come from the project's own host processing (`qdq_inputs`: `qwen_vision_host`, `sam2_host`)
  on `--calib-data` images (FineRS-4k format) or, without it, synthetic frames.

Parity first: before it returns, every Q/DQ graph runs beside its fp32 graph in ORT on the CPU on
held-out images (not used for calibration) and must stay within `THRESHOLDS`; the numbers go into
the manifest's `qdq` section. Run on an existing folder: `python -m finers_rt.export.qdq --engines DIR`.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..manifest import MANIFEST, write_manifest
from ..trt_engines import QDQ_GRAPHS
from .qdq_inputs import calibration_samples, graph_feeds

log = logging.getLogger(__name__)

QDQ_PRECISIONS = ("int8", "fp8")
QUANT_OPS = ("MatMul", "Gemm", "Conv")  # weight-bearing ops only (a constant second input)
CALIB_METHOD = "MinMax"
# Held-out deviation limits, Q/DQ vs fp32 in ORT on the CPU. Vision: worst per-token cosine of the
# image embeddings (what the LLM reads; 0.99 keeps the merged prompt embeddings close);
# SAM2 encoder: relative L2 error of each feature map (5 %: the decoder's masks are the real
# criterion); SAM2 decoder (fed fp32 encoder features): IoU of the thresholded masks vs fp32.
THRESHOLDS = {"vision": {"min_token_cosine": 0.99},
              "sam2_encoder": {"max_rel_l2": 0.05},
              "sam2_decoder": {"min_mask_iou": 0.9}}
DEFAULT_CALIB, DEFAULT_HOLDOUT = 8, 2  # images


class QdqParityError(RuntimeError):
    """A Q/DQ graph deviates from its fp32 graph beyond `THRESHOLDS`."""


def qdq_file(rel: str, precision: str = "int8") -> str:
    """gse/vision.onnx -> gse/vision.int8.onnx (beside the fp32 graph)."""
    return rel[: -len(".onnx")] + f".{precision}.onnx"


def qdq_sections(manifest: dict) -> dict[str, dict]:
    """The manifest's `qdq` sections by precision: {"int8": {...}, "fp8": {...}} (a folder written
    before fp8 existed holds one section at the top level, {"precision": "int8", ...})."""
    sections = manifest.get("qdq") or {}
    return {sections["precision"]: sections} if "precision" in sections else dict(sections)


def graph_kind(rel: str) -> str:
    """THRESHOLDS key of a graph: vision, sam2_encoder or sam2_decoder."""
    return "vision" if rel.endswith("/vision.onnx") else Path(rel).stem


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_nodes(model) -> list[str]:
    """Names of the QUANT_OPS nodes whose weight (input 1) is an initializer: the ones to quantize."""
    inits = {i.name for i in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node
            if n.op_type in QUANT_OPS and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts)]


def quantize_graph(src: Path, dst: Path, feeds: list[dict], *, progress: bool = False) -> int:
    """Write the TensorRT-form int8 Q/DQ copy of `src` to `dst`, calibrated on `feeds`; returns the
    number of quantized nodes. Unnamed nodes are named first (nodes_to_quantize selects by name)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(tqdm(feeds, desc=f"calibrate {src.parent.name}/{src.name}", unit="input",
                                disable=not progress))

        def get_next(self):
            return next(self.it, None)

    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    nodes = weight_nodes(model)
    with tempfile.TemporaryDirectory(prefix="qdq-") as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save_model(model, str(named))
        del model
        quantize_static(
            str(named), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANT_OPS),
            nodes_to_quantize=nodes, per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, CALIB_METHOD),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,  # zero points 0
                           "CalibTensorRangeSymmetric": True,
                           "QuantizeBias": False,  # float bias: TensorRT dequantizes int8/fp8, not int32
                           "DedicatedQDQPair": True,  # a tensor's other consumers (residual Add, ...) stay float
                           "QDQKeepRemovableActivations": True,
                           # no Q/DQ on MatMul/Gemm/Conv outputs: the next op (Add, Softmax, GELU, ...)
                           # reads float, as TensorRT's / ModelOpt's placement (inputs of weighted ops only)
                           "OpTypesToExcludeOutputQuantization": list(QUANT_OPS)})  # keep Relu/Clip: TensorRT fuses them itself
    model = onnx.load(str(dst))
    rewired = keep_float_consumers(model)
    onnx.save_model(model, str(dst))
    log.info("%s: %d %s nodes quantized (int8 Q/DQ, per-channel weights; %d float consumers rewired)",
             dst, len(nodes), "/".join(QUANT_OPS), rewired)
    return len(nodes)


def keep_float_consumers(model) -> int:
    """Feed the float tensor, not its Q/DQ copy, to every consumer outside QUANT_OPS, and drop the pairs
    left unused. ORT's DedicatedQDQPair gives each consumer of a quantized tensor its own pair, other ops
    included (a Reshape beside the MatMul in SAM2's Hiera blocks); those would then read rounded values
    that TensorRT's placement keeps float. Returns how many inputs were rewired."""
    producer = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if node.op_type not in QUANT_OPS and q is not None and q.op_type == "QuantizeLinear":
                node.input[i], rewired = q.input[0], rewired + 1
    for op in ("DequantizeLinear", "QuantizeLinear"):  # DQ first: its removal frees the Q
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type == op and n.output[0] not in used]
        for n in dead:
            model.graph.node.remove(n)
    return rewired


# ---- parity ---------------------------------------------------------------------------------------


def deviation(kind: str, ref: dict, got: dict) -> dict:
    """Q/DQ vs fp32 outputs of one input, in the units of THRESHOLDS[kind]."""
    if kind == "vision":
        a, b = ref["image_embeds"].astype(np.float64), got["image_embeds"].astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        return {"min_token_cosine": float(cos.min()), "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a))}
    if kind == "sam2_encoder":
        rel = {k: float(np.linalg.norm(got[k] - v) / np.linalg.norm(v)) for k, v in ref.items()}
        return {"max_rel_l2": max(rel.values()), "rel_l2": rel}
    a, b = ref["masks"][0] > 0, got["masks"][0] > 0  # (3, 256, 256) thresholded logits
    inter, union = (a & b).sum((1, 2)), (a | b).sum((1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"min_mask_iou": float(iou.min()),
            "iou_pred_max_abs_diff": float(np.abs(ref["iou_predictions"] - got["iou_predictions"]).max())}


def simulation_session(path: Path):
    """An ORT CPU session that runs a Q/DQ graph as written: QuantizeLinear -> DequantizeLinear ->
    the float op (`session.disable_quant_qdq`), the arithmetic TensorRT's int8 kernels reproduce
    (int32 accumulation of int8 products, exact). ORT's default fuses each pair into its own int8
    GEMM, whose x86 kernel without VNNI (AVX2) sums u8 x s8 product pairs in saturating int16:
    measured on an AVX2-only EPYC (ORT 1.32), a 16x8 MatMul's outputs off by up to 10 (of 27)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(kind: str, fp32: Path, qdq: Path, feeds: list[dict]) -> dict:
    """Run both graphs in ORT on the CPU on held-out feeds (the Q/DQ one as written,
    `simulation_session`); worst case over them; raise past THRESHOLDS."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]), simulation_session(qdq)]
    names = [o.name for o in sessions[0].get_outputs()]
    rows = [deviation(kind, *(dict(zip(names, s.run(None, f))) for s in sessions)) for f in feeds]
    worst = {}
    for key, limit in THRESHOLDS[kind].items():
        pick = min if key.startswith("min_") else max
        worst[key] = pick(r[key] for r in rows)
        if (worst[key] < limit) if key.startswith("min_") else (worst[key] > limit):
            raise QdqParityError(f"{qdq}: {key} {worst[key]:.4g} on held-out inputs is past the limit {limit} "
                                 f"(Q/DQ vs fp32 in ORT CPU); calibrate on more / real images (--calib-data)")
    return {**worst, "threshold": THRESHOLDS[kind], "held_out": len(feeds), "per_input": rows}


# ---- the folder transform -------------------------------------------------------------------------


def export_qdq(engine_dir: Path, *, precision: str = "int8", calib_data: Path | None = None,
               calib_count: int = DEFAULT_CALIB, holdout: int = DEFAULT_HOLDOUT, progress: bool = True) -> dict:
    """Write Q/DQ copies of QDQ_GRAPHS[precision] in `engine_dir`, verify them, record the manifest's
    `qdq` section for `precision`.

    calib_count images calibrate, the next `holdout` images check parity (THRESHOLDS); both come
    from `calib_data` (FineRS-4k folder) or synthetic frames. Returns the `qdq` section.
    """
    import json

    import onnxruntime as ort

    if precision not in QDQ_PRECISIONS:
        raise ValueError(f"--qdq must be one of {QDQ_PRECISIONS}, got {precision!r}")
    engine_dir = Path(engine_dir)
    manifest = json.loads((engine_dir / MANIFEST).read_text())
    if manifest.get("precision") != "fp32":
        raise ValueError(f"Q/DQ graphs are made from fp32 graphs; {engine_dir} is {manifest.get('precision')}")
    for key in ("vision_attention", "sam2_attention"):
        if manifest.get(key, "onnx") != "onnx":
            raise ValueError(f"{engine_dir} was exported with --{key.replace('_', '-')} {manifest[key]} (ORT contrib "
                             "ops): TensorRT cannot parse them; export with --device cuda for Q/DQ graphs")
    graphs = {}
    with tempfile.TemporaryDirectory(prefix="qdq-calib-") as tmp:
        samples = calibration_samples(calib_data, calib_count + holdout, Path(tmp))
        calib, held = samples[:calib_count], samples[calib_count:]
        # the SAM2 decoder's feeds are the fp32 encoder's outputs; recipes without it (fp8) skip the session
        encoder = (ort.InferenceSession(str(engine_dir / "sam2/sam2_encoder.onnx"), providers=["CPUExecutionProvider"])
                   if "sam2/sam2_decoder.onnx" in QDQ_GRAPHS[precision] else None)
        for rel in QDQ_GRAPHS[precision]:
            src, dst = engine_dir / rel, engine_dir / qdq_file(rel, precision)
            n = quantize_graph(src, dst, graph_feeds(engine_dir, rel, calib, encoder), progress=progress)
            if precision == "fp8":  # the int8 graph just written becomes fp8 (module docstring)
                fp8_from_int8(dst, src)
            parity = check_parity(graph_kind(rel), src, dst, graph_feeds(engine_dir, rel, held, encoder))
            graphs[rel] = {"file": qdq_file(rel, precision), "quantized_nodes": n, "source_sha256": file_sha256(src),
                           "parity": parity}
            log.info("%s -> %s: %s", rel, graphs[rel]["file"], {k: v for k, v in parity.items() if k != "per_input"})
    section = {"precision": precision, "method": CALIB_METHOD, "calib_images": calib_count,
               "held_out_images": holdout, "calib_data": str(calib_data) if calib_data else "synthetic",
               "graphs": graphs}
    manifest["qdq"] = {**qdq_sections(manifest), precision: section}
    write_manifest(engine_dir, manifest)
    return section


def fp8_from_int8(path: Path, fp32: Path) -> None:
    """Rewrite the int8 Q/DQ graph at `path` as fp8 in place (`qdq_fp8.to_fp8`; weights from `fp32`)."""
    import onnx

    from .qdq_fp8 import to_fp8

    model = onnx.load(str(path))
    n = to_fp8(model, onnx.load(str(fp32)))
    onnx.save_model(model, str(path))
    log.info("%s: fp8 (E4M3) Q/DQ, %d weights", path, n)


def print_qdq(section: dict) -> None:
    """The CLI summary of a `qdq` section: one line per graph with its measured deviation."""
    print(f"wrote {section['precision']} Q/DQ graphs (calibration {section['method']} on {section['calib_images']} "
          f"{section['calib_data']} images; parity vs fp32 on {section['held_out_images']} held-out):")
    for rel, g in section["graphs"].items():
        worst = {k: v for k, v in g["parity"].items() if k in THRESHOLDS[graph_kind(rel)]}
        print(f"  {g['file']:<28} {g['quantized_nodes']:4d} nodes  " + ", ".join(f"{k} {v:.4f}" for k, v in worst.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m finers_rt.export.qdq", description=__doc__.splitlines()[0])
    p.add_argument("--engines", required=True, type=Path, help="fp32 engine folder from `finers-rt export --device cuda`")
    p.add_argument("--precision", default="int8", choices=QDQ_PRECISIONS, help="int8, or fp8 (E4M3; TensorRT on SM >= 8.9)")
    p.add_argument("--calib-data", type=Path, default=None, help="FineRS-4k folder; default: synthetic frames")
    p.add_argument("--calib-count", type=int, default=DEFAULT_CALIB, help="calibration images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print_qdq(export_qdq(args.engines, precision=args.precision, calib_data=args.calib_data,
                         calib_count=args.calib_count))


if __name__ == "__main__":
    main()
