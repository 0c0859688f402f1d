"""Reference `SegmentPredictor`: the `sam2` package's SAM2ImagePredictor, loaded as the authors do."""
from __future__ import annotations

import warnings
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
        # Hydra imports the model modules here; sam2 1.1.0 calls the deprecated torch.jit.script.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script")
            model = build_sam2(cfg, str(ckpt), device=device)
        self.predictor = SAM2ImagePredictor(model)

    def set_image(self, image: np.ndarray) -> None:
        with torch.inference_mode():
            # torchvision's to_tensor wants a writable array (crops of decoded images may be views).
            self.predictor.set_image(np.require(image, requirements=["C", "W"]))

    def predict(self, box, points, labels, multimask_output: bool = True):
        with torch.inference_mode():
            masks, scores, _ = self.predictor.predict(
                point_coords=points, point_labels=labels, box=box, multimask_output=multimask_output
            )
        return masks > 0.5, np.asarray(scores, dtype=np.float32)
