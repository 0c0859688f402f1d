"""The SAM2 stage: two-phase predictor seam (`set_image`, then `predict`) + the prompt logic.

Prompt rules (finers-pipeline.md §5): box + the two LPR points (labels 1, 1); box only when LPR
gave no points; points only when it gave no box; neither -> empty mask. Multimask output, keep the
mask with the highest predicted IoU.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import numpy as np


class SegmentPredictor(Protocol):
    """SAM2ImagePredictor semantics, numpy in/out, coordinates in pixels of the image given.

    predict returns masks (K, h, w) bool at the image's size and scores (K,) float32.
    """

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(self, box: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None,
                multimask_output: bool = True) -> tuple[np.ndarray, np.ndarray]: ...


def best_mask(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, float]:
    """The mask with the highest predicted IoU (first one on ties, as np.argmax)."""
    i = int(np.argmax(scores))
    return masks[i], float(scores[i])


def prompt_arrays(box, points):
    """LPR outputs (crop pixels) -> (box (4,) | None, points (N, 2) | None, labels (N,) | None)."""
    b = np.asarray(box, dtype=np.float32) if box is not None else None
    if not points:
        return b, None, None
    p = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    return b, p, np.ones(len(p), dtype=np.int32)


# ---- locating a SAM2 checkpoint and its config ------------------------------------------------

_SIZE_CODES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
_CKPT_NAME = re.compile(r"^(sam2(?:\.1)?)_hiera_(tiny|small|base_plus|large)\.pt$")


def config_for_checkpoint(ckpt: Path) -> str:
    """The sam2 package config for an official checkpoint file name (sam2_hiera_large.pt -> l)."""
    m = _CKPT_NAME.match(ckpt.name)
    if m is None:
        raise ValueError(
            f"cannot infer the SAM2 config from {ckpt.name!r}; pass --sam2-config "
            "(e.g. configs/sam2/sam2_hiera_l.yaml) or write sam2.json beside it"
        )
    version, size = m.groups()
    return f"configs/{version}/{version}_hiera_{_SIZE_CODES[size]}.yaml"


def resolve_sam2(sam2_dir: Path, config: str | None = None) -> tuple[Path, str]:
    """(checkpoint, config name) for DIR/sam2: sam2.json if present, else the single *.pt file."""
    sam2_dir = Path(sam2_dir)
    meta = sam2_dir / "sam2.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return sam2_dir / info["checkpoint"], config or info["config"]
    ckpts = sorted(sam2_dir.glob("*.pt"))
    if len(ckpts) != 1:
        raise FileNotFoundError(
            f"{sam2_dir} must hold exactly one SAM2 *.pt checkpoint (found {len(ckpts)}) or a sam2.json"
        )
    return ckpts[0], config or config_for_checkpoint(ckpts[0])
