"""The two-stage FineRS pipeline: GSE -> region -> LPR -> SAM2, on any backend.

Stages never branch on the backend; the backend only decides which `Generator` and
`SegmentPredictor` implementations are constructed (`Pipeline.from_checkpoints`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from . import __version__
from .config import PipelineConfig
from .image import load_image, swap_rb
from .parsing import OK, parse_output
from .region import crop, dynamic_box, paste_mask, to_original
from .result import TIMING_KEYS, Result
from .segment import SegmentPredictor, best_mask, prompt_arrays
from .vlm import Generator, VLMStage

log = logging.getLogger(__name__)

BACKENDS = ("torch", "ort")


class Pipeline:
    """`run(image, question, task=..., options=...) -> Result`; same API on every backend."""

    def __init__(self, gse: Generator, lpr: Generator, sam2: SegmentPredictor, *,
                 config: PipelineConfig | None = None, backend: str = "", precision: str = ""):
        self.config = config or PipelineConfig()
        self.gse = VLMStage(self.config.gse, gse)
        self.lpr = VLMStage(self.config.lpr, lpr)
        self.sam2 = sam2
        self.backend, self.precision = backend, precision

    @classmethod
    def from_checkpoints(cls, checkpoints: str | Path, *, backend: str = "torch", device: str = "cpu",
                         precision: str = "fp32", config: PipelineConfig | None = None,
                         sam2_config: str | None = None) -> "Pipeline":
        """Load DIR/gse, DIR/lpr (HF Qwen2.5-VL folders) and DIR/sam2 (a SAM2 .pt) on `backend`."""
        root = Path(checkpoints)
        for sub in ("gse", "lpr", "sam2"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"{root / sub} is missing: --checkpoints must contain gse/, lpr/ and sam2/ "
                    "(make test ones with `finers-rt make-tiny DIR`)"
                )
        if backend != "torch":
            raise ValueError(
                f"from_checkpoints runs the torch backend; for ort export first "
                f"(`finers-rt export --checkpoints {root} --out ENGINES`) then use from_engines"
            )
        from .backends.torch_sam2 import TorchSAM2
        from .backends.torch_vlm import TorchGenerator

        gse = TorchGenerator(root / "gse", device=device, precision=precision)
        lpr = TorchGenerator(root / "lpr", device=device, precision=precision)
        sam2 = TorchSAM2(root / "sam2", config=sam2_config, device=device)
        return cls(gse, lpr, sam2, config=config, backend=backend, precision=precision)

    @classmethod
    def from_engines(cls, engine_dir: str | Path, *, device: str = "cpu",
                     config: PipelineConfig | None = None) -> "Pipeline":
        """The `ort` backend on an engine folder written by `finers-rt export`.

        device: "cpu" | "cuda" | "tensorrt" (ONNX Runtime execution providers; a requested one that
        does not load raises). Imports no torch.
        """
        from .backends.ort import load_ort

        gse, lpr, sam2, manifest = load_ort(engine_dir, device)
        return cls(gse, lpr, sam2, config=config, backend="ort", precision=manifest["precision"])

    def run(self, image, question: str, *, task: str = "referring", options=None,
            force_output: dict[str, str] | None = None) -> Result:
        """image: path, bytes, PIL image or (H, W, 3) uint8 RGB. force_output: {"gse", "lpr"} texts."""
        force_output = force_output or {}
        cfg, ms = self.config, {}
        t_start = time.perf_counter()
        img = load_image(image)
        h, w = img.shape[:2]
        res = Result(task=task, question=question, options=options, image_size=(w, h),
                     backend=self.backend, precision=self.precision, forced=bool(force_output),
                     config=_config_dict(cfg), version=__version__)
        ms["preprocess"] = _ms(t_start)

        gen, resize_ms = self.gse.run(img, question, task, options, force_output.get("gse"))
        gse = self._record(res, "gse", gen, ms, resize_ms, fx=w / cfg.gse.input_size[0],
                           fy=h / cfg.gse.input_size[1], want_points=False)
        res.answer = gse.response
        res.gse_box = gse.bbox
        mask = np.zeros((h, w), dtype=bool)
        if gse.bbox is None:  # no region: the reference scores an empty mask
            return self._finish(res, mask, ms, t_start)

        t = time.perf_counter()
        res.crop_box = dynamic_box(gse.bbox, w, h, cfg.region_mode, cfg.min_region)
        region = crop(img, res.crop_box)
        lpr_input = swap_rb(region) if cfg.lpr_channel_swap else region
        ms["region"] = _ms(t)
        gen, resize_ms = self.lpr.run(lpr_input, question, task, options, force_output.get("lpr"))
        ch, cw = region.shape[:2]
        lpr = self._record(res, "lpr", gen, ms, resize_ms, fx=cw / cfg.lpr.input_size[0],
                           fy=ch / cfg.lpr.input_size[1], want_points=True)
        ms["region"] += ms.pop("lpr_preprocess")
        if lpr.bbox is not None:
            res.lpr_box = to_original(lpr.bbox, res.crop_box)
        res.points = [to_original(p, res.crop_box) for p in lpr.points]
        if lpr.bbox is not None or lpr.points:
            crop_mask = self._segment(region, lpr.bbox, lpr.points, res, ms)
            t = time.perf_counter()
            mask = paste_mask(crop_mask, res.crop_box, h, w)
            ms["postprocess"] = ms.get("postprocess", 0.0) + _ms(t)
        return self._finish(res, mask, ms, t_start)

    def _record(self, res: Result, stage: str, gen, ms: dict, resize_ms: float, *, fx, fy, want_points):
        """Store a stage's generation in `res` and parse it into pixels of the stage's image."""
        res.prompts[stage], res.texts[stage] = gen.prompt, gen.text
        res.tokens[stage] = len(gen.token_ids)
        t = gen.timings_ms
        ms[f"{stage}_preprocess"] = resize_ms + t["preprocess"]
        for k in ("vision", "prefill", "decode"):
            ms[f"{stage}_{k}"] = t[k]
        t0 = time.perf_counter()
        parsed = parse_output(gen.text, fx, fy, want_points=want_points,
                              tolerant=self.config.parse_mode == "tolerant")
        ms["postprocess"] = ms.get("postprocess", 0.0) + _ms(t0)
        res.parse[stage], res.think[stage] = parsed.status, parsed.think
        if parsed.status != OK:
            res.parse_reason[stage] = parsed.reason
            log.info("%s parse: %s (%s)", stage, parsed.status, parsed.reason)
        return parsed

    def _segment(self, region: np.ndarray, box, points, res: Result, ms: dict) -> np.ndarray:
        t = time.perf_counter()
        self.sam2.set_image(region)
        ms["sam2_encoder"] = _ms(t)
        t = time.perf_counter()
        masks, scores = self.sam2.predict(*prompt_arrays(box, points), self.config.multimask_output)
        mask, res.sam2_score = best_mask(masks, scores)
        ms["sam2_decoder"] = _ms(t)
        return mask

    def _finish(self, res: Result, mask: np.ndarray, ms: dict, t_start: float) -> Result:
        res.mask = mask
        if "gse_preprocess" in ms:
            ms["preprocess"] += ms.pop("gse_preprocess")
        ms["total"] = _ms(t_start)
        res.timings_ms = {k: ms[k] for k in TIMING_KEYS if k in ms}
        return res

    def close(self) -> None:
        for g in (self.gse.generator, self.lpr.generator):
            g.close()


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _config_dict(cfg: PipelineConfig) -> dict:
    return {"region_mode": cfg.region_mode, "lpr_channel_swap": cfg.lpr_channel_swap,
            "parse_mode": cfg.parse_mode, "max_new_tokens": cfg.gse.max_new_tokens}
