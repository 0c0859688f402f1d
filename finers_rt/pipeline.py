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
from .host_parallel import HOST_THREADS
from .image import decode_for_stage, image_size, swap_rb
from .parsing import OK, parse_output
from .region import crop, dynamic_box, paste_mask, to_original
from .result import TIMING_KEYS, Result
from .segment import SegmentPredictor, best_mask, prompt_arrays
from .vlm import Generator, VLMStage

log = logging.getLogger(__name__)

BACKENDS = ("torch", "ort", "trt", "trtllm")


class Pipeline:
    """`run(image, question, task=..., options=...) -> Result`; same API on every backend."""

    def __init__(self, gse: Generator, lpr: Generator, sam2: SegmentPredictor, *,
                 config: PipelineConfig | None = None, backend: str = "", precision: str = "",
                 host_threads: int = 1):
        # host_threads: threads for the JPEG decode + stage resizes (byte-identical at any count;
        # the torch reference keeps 1, the plain PIL calls the reference made)
        self.host_threads = host_threads
        self.config = config or PipelineConfig()
        self.gse = VLMStage(self.config.gse, gse, host_threads)
        self.lpr = VLMStage(self.config.lpr, lpr, host_threads)
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
        does not load raises), or "trt": TensorRT engines built by `finers-rt build --target trt`
        for vision and SAM2, decoders on ONNX Runtime CUDA. Imports no torch.
        """
        if device == "trt":
            from .backends.trt import load_trt

            gse, lpr, sam2, manifest = load_trt(engine_dir, host_threads=HOST_THREADS)
            return cls(gse, lpr, sam2, config=config, backend="trt", precision=manifest["trt"]["precision"],
                       host_threads=HOST_THREADS)
        from .backends.ort import load_ort

        gse, lpr, sam2, manifest = load_ort(engine_dir, device)
        return cls(gse, lpr, sam2, config=config, backend="ort", precision=manifest["precision"],
                   host_threads=HOST_THREADS)

    @classmethod
    def from_trtllm(cls, engine_dir: str | Path, *, ort_engines: str | Path, device: str = "cuda",
                    config: PipelineConfig | None = None) -> "Pipeline":
        """The `trtllm` backend: GSE and LPR on TensorRT-LLM, SAM2 on ONNX Runtime.

        engine_dir: `finers-rt export --target trtllm` (LLM API) or `--target trtllm-engine`
        (engines; their vision towers run on the ort folder's vision.onnx), told apart by
        trtllm_manifest.json's kind. ort_engines: the `finers-rt export` folder of the same
        checkpoints (checked by source hash) supplying sam2/ and the vision graphs; device picks its
        ONNX Runtime providers. Raises BackendUnavailable without tensorrt_llm (no fallback).
        """
        from .backends.trtllm_engine_vlm import load_trtllm

        gse, lpr, sam2, manifest = load_trtllm(engine_dir, ort_engines, device)
        return cls(gse, lpr, sam2, config=config, backend="trtllm", precision=manifest["precision"],
                   host_threads=HOST_THREADS)

    def run(self, image, question: str, *, task: str = "referring", options=None,
            force_output: dict[str, str] | None = None) -> Result:
        """image: path, bytes, PIL image or (H, W, 3) uint8 RGB. force_output: {"gse", "lpr"} texts."""
        force_output = force_output or {}
        t_start = time.perf_counter()
        img, gse_input, res, ms = self._open(image, question, task, options, force_output)
        gen, resize_ms = self.gse.run(img if gse_input is None else gse_input, question, task, options,
                                      force_output.get("gse"))
        if self._after_gse(res, gen, resize_ms, ms) is None:  # no region: the reference scores an empty mask
            return self._finish(res, self._empty_mask(res), ms, t_start)
        region, lpr_input = self._cut_region(img, res, ms)
        gen, resize_ms = self.lpr.run(lpr_input, question, task, options, force_output.get("lpr"))
        lpr = self._after_lpr(res, region, gen, resize_ms, ms)
        return self._finish(res, self._mask(res, region, lpr, ms), ms, t_start)

    # ---- the stages of `run`, shared with `finers_rt.batch.run_batch` (same Result, field by field)

    def _open(self, image, question: str, task: str, options, force_output: dict):
        """Decode the image and open its Result -> (image, GSE's input or None, Result, ms timings).

        image: PIL for files/bytes (resized without a 4K numpy copy), else the array. With host
        threads, a JPEG's resize to GSE's input size is made while it decodes (byte-identical,
        `jpeg_stream`); the torch reference (one host thread) decodes, then resizes, as the
        reference does."""
        t0 = time.perf_counter()
        img, gse_input = decode_for_stage(image, self.config.gse.input_size, self.host_threads)
        w, h = image_size(img)
        res = Result(task=task, question=question, options=options, image_size=(w, h),
                     backend=self.backend, precision=self.precision, forced=bool(force_output),
                     config=_config_dict(self.config), version=__version__)
        return img, gse_input, res, {"preprocess": _ms(t0)}

    def _after_gse(self, res: Result, gen, resize_ms: float, ms: dict):
        """Record + parse GSE's generation; returns the box in original pixels, or None."""
        (w, h), size = res.image_size, self.config.gse.input_size
        gse = self._record(res, "gse", gen, ms, resize_ms, fx=w / size[0], fy=h / size[1], want_points=False)
        res.answer, res.gse_box = gse.response, gse.bbox
        return gse.bbox

    def _cut_region(self, img, res: Result, ms: dict):
        """The region around GSE's box -> (crop (h, w, 3) uint8, LPR's input: the crop, R/B swapped
        if the config reproduces the reference)."""
        cfg, t = self.config, time.perf_counter()
        w, h = res.image_size
        res.crop_box = dynamic_box(res.gse_box, w, h, cfg.region_mode, cfg.min_region)
        region = crop(img, res.crop_box)
        lpr_input = swap_rb(region) if cfg.lpr_channel_swap else region
        ms["region"] = _ms(t)
        return region, lpr_input

    def _after_lpr(self, res: Result, region: np.ndarray, gen, resize_ms: float, ms: dict):
        """Record + parse LPR's generation; box and points mapped back to original pixels."""
        (ch, cw), size = region.shape[:2], self.config.lpr.input_size
        lpr = self._record(res, "lpr", gen, ms, resize_ms, fx=cw / size[0], fy=ch / size[1], want_points=True)
        ms["region"] += ms.pop("lpr_preprocess")
        if lpr.bbox is not None:
            res.lpr_box = to_original(lpr.bbox, res.crop_box)
        res.points = [to_original(p, res.crop_box) for p in lpr.points]
        return lpr

    def _mask(self, res: Result, region: np.ndarray, lpr, ms: dict) -> np.ndarray:
        """SAM2 on the crop when LPR gave a box or points, pasted into a full-size (H, W) bool mask."""
        if lpr.bbox is None and not lpr.points:
            return self._empty_mask(res)
        crop_mask = self._segment(region, lpr.bbox, lpr.points, res, ms)
        t = time.perf_counter()
        w, h = res.image_size
        mask = paste_mask(crop_mask, res.crop_box, h, w)
        ms["postprocess"] = ms.get("postprocess", 0.0) + _ms(t)
        return mask

    @staticmethod
    def _empty_mask(res: Result) -> np.ndarray:
        w, h = res.image_size
        return np.zeros((h, w), dtype=bool)

    def run_batch(self, requests) -> list[Result]:
        """`run` for a list of `finers_rt.batch.Request`s, each VLM stage run as one batch (on the
        ort backend); Results equal `run`'s but for timings. See `finers_rt.batch.run_batch`."""
        from .batch import run_batch  # batch.py builds on this module

        return run_batch(self, requests)

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
