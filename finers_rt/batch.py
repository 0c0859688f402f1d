"""`run_batch`: several requests through the pipeline with each VLM stage run as one batch.

Order: validate every request -> decode every image -> GSE for all (one `generate_batch` on the
ort backend) -> parse -> region -> LPR for the requests that got a GSE box (one batch) -> SAM2
per crop -> one Result per request, in request order. A bad request raises before any model runs.

Each Result is assembled as `Pipeline.run` assembles it (same fields, same timing keys, built
with the Pipeline's own `_record` / `_segment` / `_finish`), so batch and single runs are equal
but for timings. Timings: preprocess/vision are the request's own; *_prefill/*_decode are its
stage batch's (shared by every request in it, see `Generation.batch_size`); total runs from the
start of the batch to this request's last stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .image import ImageLoadError
from .parsing import Parsed
from .pipeline import Pipeline
from .prompts import build_question
from .result import Result

FORCE_KEYS = ("gse", "lpr")
IMAGE_TYPES = (str, Path, bytes, bytearray, Image.Image, np.ndarray)


@dataclass(frozen=True)
class Request:
    """The arguments of one `Pipeline.run` call.

    image: path, bytes, PIL image or (H, W, 3) uint8 RGB. force_output: {"gse", "lpr"} texts.
    """

    image: object
    question: str
    task: str = "referring"
    options: object = None
    force_output: dict[str, str] | None = None

    def validate(self) -> None:
        """Raise ValueError naming what is wrong; checks everything but decoding the image."""
        if not isinstance(self.image, IMAGE_TYPES):
            raise ValueError(f"image must be a path, bytes, PIL image or uint8 array, not {type(self.image).__name__}")
        if not isinstance(self.question, str):
            raise ValueError(f"question must be a str, not {type(self.question).__name__}")
        build_question("gse", self.task, self.question, self.options)  # task / options rules
        force = self.force_output or {}
        if not isinstance(force, dict) or set(force) - set(FORCE_KEYS):
            raise ValueError(f"force_output must be a dict with keys from {FORCE_KEYS}, got {force!r}")
        if not all(isinstance(v, str) for v in force.values()):
            raise ValueError("force_output texts must be str")


@dataclass
class _Run:
    """One request's state between stages (what `Pipeline.run` keeps in locals)."""

    req: Request
    img: object  # decoded image: PIL (files/bytes) or (H, W, 3) uint8 array
    res: Result
    ms: dict = field(default_factory=dict)
    region: np.ndarray | None = None  # (h, w, 3) uint8 crop of the original image
    lpr: Parsed | None = None  # LPR output, coordinates in crop pixels
    gse_input: np.ndarray | None = None  # the image resized for GSE while it decoded, if it was

    @property
    def gse_image(self):
        return self.img if self.gse_input is None else self.gse_input

    @property
    def force(self) -> dict:
        return self.req.force_output or {}


def run_batch(pipeline: Pipeline, requests: list[Request]) -> list[Result]:
    """Results of `pipeline.run(...)` for every request, computed stage by stage.

    Every request is checked and every image decoded before any model runs; a bad one raises
    ValueError (ImageLoadError for images) starting "request <index>: ".
    """
    requests = _validated(requests)
    t_start = time.perf_counter()
    runs = [_start(pipeline, req, i) for i, req in enumerate(requests)]
    if not runs:
        return []
    results: list[Result | None] = [None] * len(runs)
    boxed = _gse(pipeline, runs, results, t_start)
    if boxed:
        _lpr(pipeline, [runs[i] for i in boxed])
    for i in boxed:
        results[i] = _segment(pipeline, runs[i], t_start)
    return results


def _validated(requests) -> list[Request]:
    requests = list(requests)
    for i, req in enumerate(requests):
        if not isinstance(req, Request):
            raise ValueError(f"request {i}: expected a finers_rt.batch.Request, got {type(req).__name__}")
        try:
            req.validate()
        except ValueError as e:
            raise ValueError(f"request {i}: {e}") from e
    return requests


def _start(pipeline: Pipeline, req: Request, index: int) -> _Run:
    """Decode the image and open the Result, as the head of `Pipeline.run`."""
    try:
        img, gse_input, res, ms = pipeline._open(req.image, req.question, req.task, req.options, req.force_output)
    except ImageLoadError as e:
        raise ImageLoadError(f"request {index}: {e}") from e
    return _Run(req, img, res, ms, gse_input=gse_input)


def _gse(pipeline: Pipeline, runs: list[_Run], results: list, t_start: float) -> list[int]:
    """GSE for every request; finishes those without a box. Returns the indices with a box."""
    outs = pipeline.gse.run_batch([r.gse_image for r in runs], [r.req.question for r in runs],
                                  [r.req.task for r in runs], [r.req.options for r in runs],
                                  [r.force.get("gse") for r in runs])
    boxed = []
    for i, (run, (gen, resize_ms)) in enumerate(zip(runs, outs, strict=True)):
        if pipeline._after_gse(run.res, gen, resize_ms, run.ms) is None:  # the reference scores an empty mask
            results[i] = pipeline._finish(run.res, pipeline._empty_mask(run.res), run.ms, t_start)
        else:
            boxed.append(i)
    return boxed


def _lpr(pipeline: Pipeline, runs: list[_Run]) -> None:
    """Region crop + LPR for the requests that got a GSE box; LPR outputs into each Result."""
    lpr_inputs = []
    for run in runs:
        run.region, lpr_input = pipeline._cut_region(run.img, run.res, run.ms)
        lpr_inputs.append(lpr_input)
    outs = pipeline.lpr.run_batch(lpr_inputs, [r.req.question for r in runs], [r.req.task for r in runs],
                                  [r.req.options for r in runs], [r.force.get("lpr") for r in runs])
    for run, (gen, resize_ms) in zip(runs, outs, strict=True):
        run.lpr = pipeline._after_lpr(run.res, run.region, gen, resize_ms, run.ms)


def _segment(pipeline: Pipeline, run: _Run, t_start: float) -> Result:
    """SAM2 on the crop (when LPR gave a box or points), mask pasted back, Result finished."""
    return pipeline._finish(run.res, pipeline._mask(run.res, run.region, run.lpr, run.ms), run.ms, t_start)
