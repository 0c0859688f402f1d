"""The `trt` backend: vision towers and SAM2 on TensorRT engines, decoders on ONNX Runtime CUDA.

Reads an engine folder after `finers-rt build --target trt` (engines from
`finers_rt.export.trt_build.build_engines`, manifest `trt` section from `finers_rt.trt_engines`).
Each runner subclasses its ONNX Runtime counterpart and replaces only the graph calls: host
processing (smart_resize, patchify, window indices, SAM2 resize and mask upsampling) is shared.
Never imports torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..manifest import load_manifest
from ..qwen_vision_host import PixelBuffer, VisionPreprocessConfig
from ..sam2_host import preprocess_image, prompt_inputs
from ..specs import SAM2_DECODER, SAM2_ENCODER, VISION
from ..trt_engines import build_command, check_trt_section
from .ort import expected_digests, providers_for
from .ort_decode import OrtDecoder
from .ort_sam2 import OrtSAM2
from .ort_vision import OrtVision
from .ort_vlm import OrtGenerator
from .trt_runtime import TrtGraph, device_info, import_tensorrt


class TrtVision(OrtVision):
    """OrtVision whose `vision` graph is a TensorRT engine (same prepare/run API).

    host_threads: threads of the host resize/normalise in `prepare` (as OrtVision's).
    """

    def __init__(self, engine_path: str | Path, config: VisionPreprocessConfig, *, rebuild: str = "",
                 host_threads: int = 1):
        self.config, self.host_threads = config, host_threads
        self.pixels = PixelBuffer()
        self.graph = TrtGraph(engine_path, VISION, rebuild=rebuild)

    def run_prepared(self, feeds: dict[str, np.ndarray], reverse: np.ndarray) -> np.ndarray:
        return self.graph.run(feeds)["image_embeds"][reverse]  # window order -> raster order

    def close(self) -> None:
        self.graph.close()


class TrtGenerator(OrtGenerator):
    """Greedy Qwen2.5-VL generation: vision tower on TensorRT, decoder + KV cache on ONNX Runtime."""

    def __init__(self, stage_dir: str | Path, engine_path: str | Path, *, providers: list, rebuild: str = "",
                 host_threads: int = 1):
        stage_dir = Path(stage_dir)
        self.tokenizer = Tokenizer.from_file(str(stage_dir / "tokenizer.json"))
        config = VisionPreprocessConfig.from_checkpoint(stage_dir)
        self.vision = TrtVision(engine_path, config, rebuild=rebuild, host_threads=host_threads)
        self.decoder = OrtDecoder(stage_dir / "decoder.onnx", stage_dir / "embed_tokens.npy", providers=providers)

    def close(self) -> None:
        self.vision.close()
        super().close()


class TrtSAM2(OrtSAM2):
    """OrtSAM2 (set_image, then predict) with both SAM2 graphs as TensorRT engines."""

    def __init__(self, encoder_path: str | Path, decoder_path: str | Path, *, rebuild: str = ""):
        self.encoder = TrtGraph(encoder_path, SAM2_ENCODER, rebuild=rebuild)
        self.decoder = TrtGraph(decoder_path, SAM2_DECODER, rebuild=rebuild)
        self.features: dict[str, np.ndarray] | None = None
        self.hw: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.features = self.encoder.run({"image": preprocess_image(image)})
        self.hw = tuple(np.shape(image)[:2])

    def predict_logits(self, box, points, labels) -> tuple[np.ndarray, np.ndarray]:
        if self.features is None:
            raise RuntimeError("an image must be set with set_image(...) before predict")
        coords, labs = prompt_inputs(box, points, labels, self.hw)  # (1, P, 2), (1, P)
        out = self.decoder.run({**self.features, "point_coords": coords, "point_labels": labs})
        return out["masks"][0], out["iou_predictions"][0].astype(np.float32)

    def close(self) -> None:
        self.encoder.close()
        self.decoder.close()
        self.features = None


def load_trt(engine_dir: str | Path, *, decoder_device: str = "cuda", host_threads: int = 1):
    """(gse Generator, lpr Generator, SAM2 predictor, manifest) from an engine folder with engines.

    Refuses (StaleEngineError + the build command) engines built with another TensorRT release or
    for another GPU architecture. decoder_device: the ONNX Runtime device of the two decoders;
    host_threads: threads of the vision host preprocessing.
    """
    trt = import_tensorrt()
    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir, expected_digests(engine_dir))
    section = check_trt_section(manifest, engine_dir, tensorrt_version=trt.__version__, sm=device_info()["sm"])
    rebuild = "rebuild: " + build_command(engine_dir, section["precision"], section["max_batch"], section["workspace_gb"])
    files = {rel: engine_dir / entry["file"] for rel, entry in section["engines"].items()}
    providers = providers_for(decoder_device)
    gse, lpr = (TrtGenerator(engine_dir / stage, files[f"{stage}/vision.onnx"], providers=providers,
                             rebuild=rebuild, host_threads=host_threads) for stage in ("gse", "lpr"))
    sam2 = TrtSAM2(files["sam2/sam2_encoder.onnx"], files["sam2/sam2_decoder.onnx"], rebuild=rebuild)
    return gse, lpr, sam2, manifest
