"""`SegmentPredictor` on ONNX Runtime: SAM2ImagePredictor semantics over two exported graphs.

Reads DIR/sam2_encoder.onnx and DIR/sam2_decoder.onnx, written by
`finers_rt.export.onnx_sam2.export_sam2` (IO: `specs.SAM2_ENCODER`, `specs.SAM2_DECODER`).
Host work (resize + normalise, prompt arrays, mask upsampling) is `finers_rt.sam2_host`.
Imports numpy, PIL and onnxruntime only (never torch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..sam2_host import masks_from_logits, preprocess_image, prompt_inputs
from ..specs import SAM2_DECODER, SAM2_ENCODER
from .ort_session import open_session


class OrtSAM2:
    """`set_image(crop)` runs the encoder once; `predict(box, points, labels)` runs the decoder.

    Only multimask output exists in the exported decoder (the pipeline always asks for 3 masks).
    """

    def __init__(self, engine_dir: str | Path, *, providers: list[str] | None = None):
        engine_dir = Path(engine_dir)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.encoder = open_session(engine_dir / "sam2_encoder.onnx", self.providers, SAM2_ENCODER, once_per_stage=True)
        self.decoder = open_session(engine_dir / "sam2_decoder.onnx", self.providers, SAM2_DECODER, once_per_stage=True)
        self.features: dict[str, np.ndarray] | None = None  # encoder outputs by name
        self.hw: tuple[int, int] | None = None  # (h, w) of the image set, pixels

    def set_image(self, image: np.ndarray) -> None:
        """image: (h, w, 3) uint8 RGB, any size (squashed to 1024x1024 as SAM2 does)."""
        x = preprocess_image(image)  # (1, 3, 1024, 1024) float32
        outputs = self.encoder.run(SAM2_ENCODER.output_names, {"image": x})
        self.features = dict(zip(SAM2_ENCODER.output_names, outputs))
        self.hw = tuple(np.shape(image)[:2])

    def predict_logits(self, box, points, labels) -> tuple[np.ndarray, np.ndarray]:
        """Low-res mask logits (3, 256, 256) float32 and predicted IoUs (3,) float32.

        box: (4,) xyxy | None; points: (N, 2) xy | None; labels: (N,) | None; pixels of the image set.
        """
        if self.features is None:
            raise RuntimeError("an image must be set with set_image(...) before predict")
        coords, labs = prompt_inputs(box, points, labels, self.hw)  # (1, P, 2), (1, P)
        feeds = {**self.features, "point_coords": coords, "point_labels": labs}
        masks, iou = self.decoder.run(SAM2_DECODER.output_names, feeds)
        return masks[0], iou[0].astype(np.float32)

    def predict(self, box, points, labels, multimask_output: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """masks (3, h, w) bool at the image size and scores (3,) float32, as SAM2ImagePredictor."""
        if not multimask_output:
            raise NotImplementedError("the exported SAM2 decoder has the multimask head only "
                                      "(the pipeline always uses multimask_output=True)")
        low_res, scores = self.predict_logits(box, points, labels)
        return masks_from_logits(low_res, self.hw), scores

    def close(self) -> None:
        self.encoder = self.decoder = self.features = None
