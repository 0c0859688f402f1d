"""Assemble the `ort` backend from an engine folder: manifest check, providers, stage runners.

Imports numpy, tokenizers and onnxruntime only (never torch): this is the embedded default.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..manifest import decoder_attention, decoder_kv_dtype, lm_head, load_manifest
from ..specs import DECODER_SPECS, SAM2_DECODER, SAM2_ENCODER, VISION
from ..trt_engines import graph_profile

# device -> ONNX Runtime providers, in priority order. The first one must load: a requested
# accelerator that is not there is an error, never a quiet CPU run.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
TRT_WORKSPACE_GB = 4  # TensorRT builder scratch memory per engine ORT builds


@dataclass(frozen=True)
class TensorrtEP:
    """ONNX Runtime's TensorRT execution provider, configured per graph by `open_session`.

    Engines are cached in the engine folder (DIR/<stage>/trt_cache) and built once per GPU with
    the graph spec's optimisation profile (`finers_rt.trt_engines.graph_profile`).
    precision: the folder's manifest precision; fp16 folders let TensorRT 10 pick fp16 kernels.
    """

    precision: str = "fp32"
    name = "TensorrtExecutionProvider"

    def for_graph(self, path: Path) -> tuple[str, dict]:
        return self.name, tensorrt_options(Path(path), self.precision)


def tensorrt_options(path: Path, precision: str) -> dict[str, str]:
    """TensorRT EP provider options (ORT 1.31 names) for the graph at `path` = DIR/<stage>/<graph>.onnx.

    Profile shapes use ORT's format "input:d0xd1,input2:d0xd1x..." and list every dynamic input
    (ORT refuses a partial list). TensorRT 11 has no fp16 builder flag: use an fp16 export there
    (`finers-rt export --precision fp16`); the PyPI onnxruntime-gpu TensorRT EP links TensorRT 10.
    """
    path = Path(path)
    cache = path.parent / "trt_cache"
    opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_engine_cache_prefix": path.stem,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": str(precision == "fp16"),
        "trt_max_workspace_size": str(TRT_WORKSPACE_GB << 30),
    }
    profile = graph_profile(path.parent.parent, f"{path.parent.name}/{path.name}")
    if profile:  # static graphs (the SAM2 encoder) need none
        for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            opts[key] = ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in profile.items())
    return opts


@dataclass(frozen=True)
class CudaGraphEP:
    """ONNX Runtime's CUDA execution provider with CUDA-graph decode for the decoder graphs only:
    `open_session` gets ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) for DIR/<stage>/decoder.onnx
    (the float16 GQA graph: `cuda_graph_choice`), the plain provider for vision and SAM2 (their
    shapes change per image). The decoder then replays one captured graph per batch bucket
    (`ort_cuda_graph.FixedGqaSteps`)."""

    name = "CUDAExecutionProvider"

    def for_graph(self, path: Path):
        from .ort_cuda_graph import graph_providers

        return graph_providers([self.name])[0] if Path(path).name == "decoder.onnx" else self.name


def cuda_graph_choice(engine_dir: Path, device: str, cuda_graphs: bool | None) -> bool:
    """Whether the decoders run from captured CUDA graphs. None (the default): on exactly when
    device is "cuda" and the folder's decoder is the float16 GQA graph (`finers-rt export
    --precision fp16 --decoder-attention gqa`), else off. True where that does not hold is an error
    saying what to do (never a silent fallback); False is always off."""
    from .ort_cuda_graph import check_graph_decoder

    gqa, kv = decoder_attention(engine_dir) == "gqa", decoder_kv_dtype(engine_dir)
    if cuda_graphs is None:
        return device == "cuda" and gqa and kv == "float16"
    if cuda_graphs:
        check_graph_decoder(gqa, kv, device, engine_dir)
    return bool(cuda_graphs)


def providers_for(device: str, precision: str = "fp32", cuda_graphs: bool = False) -> list:
    """ORT providers for `device`; "tensorrt" is a `TensorrtEP` that `open_session` configures per graph.

    precision: the engine folder's manifest precision. cuda_graphs: device "cuda" only
    (`cuda_graph_choice`): the CUDA entry becomes a `CudaGraphEP`.
    """
    if cuda_graphs and device != "cuda":
        raise ValueError(f"CUDA graphs need device 'cuda', got {device!r}")
    try:
        providers = list(PROVIDERS[device])
    except KeyError:
        raise ValueError(f"ort device must be one of {sorted(PROVIDERS)}, got {device!r}") from None
    if device == "tensorrt":
        providers[0] = TensorrtEP(precision)
    if cuda_graphs:
        providers[0] = CudaGraphEP()
    return providers


def expected_digests(engine_dir: Path) -> dict[str, str]:
    """{graph path: spec digest} this runtime expects, derived from the stage configs and the
    manifest's decoder_attention, lm_head and decoder_kv_dtype (an unknown kind gets no spec, so the
    folder is refused as stale)."""
    digests = {"sam2/sam2_encoder.onnx": SAM2_ENCODER.digest(), "sam2/sam2_decoder.onnx": SAM2_DECODER.digest()}
    decoder_spec = DECODER_SPECS.get(decoder_attention(engine_dir))
    for stage in ("gse", "lpr"):
        cfg_path = Path(engine_dir) / stage / "config.json"
        digests[f"{stage}/vision.onnx"] = VISION.digest()
        if decoder_spec is None:
            digests[f"{stage}/decoder.onnx"] = "unknown decoder_attention"
        elif cfg_path.is_file():
            try:
                spec = decoder_spec(json.loads(cfg_path.read_text()), lm_head=lm_head(engine_dir),
                                    kv_dtype=decoder_kv_dtype(engine_dir))
                digests[f"{stage}/decoder.onnx"] = spec.digest()
            except ValueError as e:  # an lm_head or KV dtype this runtime does not know: refused as stale
                digests[f"{stage}/decoder.onnx"] = str(e)
        else:
            digests[f"{stage}/decoder.onnx"] = "missing config.json"
    return digests


def checked_providers(engine_dir: str | Path, device: str, cuda_graphs: bool | None = None) -> tuple[list, dict]:
    """(providers for `device`, manifest) after the manifest and precision checks every loader makes;
    cuda_graphs: None, True or False, as `cuda_graph_choice` decides it."""
    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir, expected_digests(engine_dir))
    if manifest["precision"] == "fp16" and device == "cpu":
        raise ValueError(f"{engine_dir} holds fp16 graphs, which need --device cuda or tensorrt; "
                         "export fp32, int8 or int4 for the CPU")
    graphs = cuda_graph_choice(engine_dir, device, cuda_graphs)
    return providers_for(device, manifest["precision"], graphs), manifest


def batch_buckets(device: str) -> tuple[int, ...] | None:
    """Batch sizes a batched decode may run: on a GPU only the buckets (one set of kernels / CUDA
    graph per size, dummy rows fill up); on the CPU a dummy row is pure waste, so any size."""
    from .ort_batch import BUCKETS

    return None if device == "cpu" else BUCKETS


def load_part(engine_dir: str | Path, part: str, device: str = "cpu", cuda_graphs: bool | None = None):
    """(OrtGenerator for gse|lpr or OrtSAM2 for sam2, manifest): one stage of an engine folder
    (what a Ray Serve stage replica loads), checked as the whole folder is. cuda_graphs:
    `cuda_graph_choice` (default: on for device "cuda" with the float16 GQA decoder)."""
    from .ort_sam2 import OrtSAM2
    from .ort_vlm import OrtGenerator

    providers, manifest = checked_providers(engine_dir, device, cuda_graphs)
    if part == "sam2":
        return OrtSAM2(Path(engine_dir) / part, providers=providers), manifest
    return OrtGenerator(Path(engine_dir) / part, providers=providers, batch_buckets=batch_buckets(device)), manifest


def load_ort(engine_dir: str | Path, device: str = "cpu", cuda_graphs: bool | None = None):
    """(gse Generator, lpr Generator, SAM2 predictor, manifest) from an exported engine folder.
    cuda_graphs: decode from captured CUDA graphs, `cuda_graph_choice` (default: on for device
    "cuda" with the float16 GQA decoder, off otherwise; True where impossible is an error)."""
    from .ort_sam2 import OrtSAM2
    from .ort_vlm import OrtGenerator

    engine_dir = Path(engine_dir)
    providers, manifest = checked_providers(engine_dir, device, cuda_graphs)
    buckets = batch_buckets(device)
    gse = OrtGenerator(engine_dir / "gse", providers=providers, batch_buckets=buckets)
    lpr = OrtGenerator(engine_dir / "lpr", providers=providers, batch_buckets=buckets)
    sam2 = OrtSAM2(engine_dir / "sam2", providers=providers)
    return gse, lpr, sam2, manifest
