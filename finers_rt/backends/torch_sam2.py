"""Reference `SegmentPredictor`: the `sam2` package's SAM2ImagePredictor, loaded as the authors do."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..segment import resolve_sam2
from . import require

torch = require("torch", "export")
require("sam2", "export")
from sam2.build_sam import build_sam2  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402


class TorchSAM2:
    """`build_sam2(config, ckpt)` + `SAM2ImagePredictor`; numpy in, numpy out."""

    def __init__(self, sam2_dir: str | Path, *, config: str | None = None, device: str = "cpu"):
        ckpt, cfg = resolve_sam2(Path(sam2_dir), config)
        self.checkpoint, self.config = ckpt, cfg
        self.predictor = SAM2ImagePredictor(build_sam2(cfg, str(ckpt), device=device))

    def set_image(self, image: np.ndarray) -> None:
        with torch.inference_mode():
            self.predictor.set_image(image)

    def predict(self, box, points, labels, multimask_output: bool = True):
        with torch.inference_mode():
            masks, scores, _ = self.predictor.predict(
                point_coords=points, point_labels=labels, box=box, multimask_output=multimask_output
            )
        return masks > 0.5, np.asarray(scores, dtype=np.float32)
