"""Qwen2.5-VL vision tower on ONNX Runtime. Imports numpy, PIL and onnxruntime only (never torch).

Runs `vision.onnx` as written by `finers_rt.export.onnx_vision.export_vision` (IO: specs.VISION);
the host index work comes from `finers_rt.qwen_vision_host.vision_inputs`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..host_parallel import HOST_THREADS
from ..qwen_vision_host import PixelBuffer, VisionPreprocessConfig, vision_inputs
from ..specs import VISION
from .ort_session import open_session


class OrtVision:
    """`run(image)` -> image_embeds (N/4, out_hidden) float32 in raster (LLM token) order.

    image: (H, W, 3) uint8 RGB at the stage input size (GSE 1920x1080, LPR 512x512); it is
    smart-resized here. `config` defaults to the stage folder beside the graph
    (preprocessor_config.json + config.json). `host_threads`: threads for the resize and
    normalise (byte-identical at any count, see `finers_rt.host_parallel`).

    `prepare` writes pixel_values into memory this OrtVision reuses (one buffer per thread), so
    run the feeds (`run_prepared`) before preparing the next image on the same thread.
    """

    spec = VISION

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None,
                 config: VisionPreprocessConfig | None = None, host_threads: int = HOST_THREADS):
        onnx_path = Path(onnx_path)
        self.config = config or VisionPreprocessConfig.from_checkpoint(onnx_path.parent)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.host_threads = host_threads
        self.pixels = PixelBuffer()
        self.session = open_session(onnx_path, self.providers, VISION, once_per_stage=True)

    def prepare(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int, int]]:
        """Host side only: (feeds, reverse, grid), see `vision_inputs`."""
        return vision_inputs(image, self.config, self.host_threads, out=self.pixels)

    def run_prepared(self, feeds: dict[str, np.ndarray], reverse: np.ndarray) -> np.ndarray:
        (embeds,) = self.session.run(VISION.output_names, feeds)  # (N/4, out_hidden), window order
        return embeds[reverse]

    def run(self, image: np.ndarray) -> np.ndarray:
        feeds, reverse, _ = self.prepare(image)
        return self.run_prepared(feeds, reverse)

    def close(self) -> None:
        self.session = None
