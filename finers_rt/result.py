"""The Result of one pipeline run, as a Python object and as `result.json`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

# Per-stage timing keys, in pipeline order (milliseconds).
TIMING_KEYS = (
    # decode the image + GSE host work: BILINEAR 1920x1080, smart_resize, patchify, tokenise
    # (ort/trt also: vision window indices, M-RoPE ids, embedding lookup + image merge)
    "preprocess",
    "gse_vision",
    "gse_prefill",
    "gse_decode",
    "region",  # GSE box -> crop (+ R/B swap) + the same host work for LPR at 512x512
    "lpr_vision",
    "lpr_prefill",
    "lpr_decode",
    "sam2_encoder",
    "sam2_decoder",
    "postprocess",  # parsing, mask paste
    "total",
)


@dataclass
class Result:
    """Everything one request produced. Boxes and points are ints in original-image pixels.

    mask: (H, W) bool at the original resolution. gse_box is the GSE box scaled from 1920x1080
    space; crop_box the region cut for LPR/SAM2; lpr_box/points the LPR outputs moved into the
    original image.
    """

    task: str
    question: str
    options: object = None
    answer: str = ""
    image_size: tuple[int, int] = (0, 0)  # (width, height)
    prompts: dict[str, str] = field(default_factory=dict)  # rendered chat text per stage
    texts: dict[str, str] = field(default_factory=dict)  # raw generated text per stage
    think: dict[str, str | None] = field(default_factory=dict)
    parse: dict[str, str] = field(default_factory=dict)  # status per stage: ok / no_json / ...
    parse_reason: dict[str, str] = field(default_factory=dict)
    gse_box: tuple[int, int, int, int] | None = None
    crop_box: tuple[int, int, int, int] | None = None
    lpr_box: tuple[int, int, int, int] | None = None
    points: list[tuple[int, int]] = field(default_factory=list)
    sam2_score: float | None = None
    mask: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # generated tokens per stage
    backend: str = ""
    precision: str = ""
    forced: bool = False
    config: dict = field(default_factory=dict)
    version: str = ""

    @property
    def mask_area(self) -> int:
        return int(self.mask.sum()) if self.mask is not None else 0

    def to_dict(self) -> dict:
        """JSON-ready dict; the mask is summarised (area, shape), saved separately as a PNG."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mask"}
        d["mask_area"] = self.mask_area
        d["mask_shape"] = list(self.mask.shape) if self.mask is not None else None
        d["tokens_per_s"] = {
            s: n / (self.timings_ms[f"{s}_decode"] / 1e3)
            for s, n in self.tokens.items()
            if self.timings_ms.get(f"{s}_decode")
        }
        return d
