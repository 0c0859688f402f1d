"""FineRS-4k evaluation: run the pipeline over annotations and score masks and answers."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .dataset import Sample, load_annotations
from .forced import FOUND, from_ground_truth
from .image import load_image
from .metrics import (
    SampleScore,
    intersection_union,
    polygon_mask,
    qa_correct,
    summarize,
)
from .pipeline import Pipeline
from .viz import save_mask

log = logging.getLogger(__name__)


def answer_correct(sample: Sample, response: str, gse_ok: bool) -> bool | None:
    """VQA correctness; None for referring. A sample whose GSE found no box counts as wrong."""
    verdict = qa_correct(sample.task, response, sample.answer)
    return verdict if verdict is None else (gse_ok and verdict)


def evaluate(pipeline: Pipeline, annotations: Path, images: Path, out: Path, *, limit: int | None = None,
             save_masks: bool = False, force_from_gt: bool = False, progress: bool = True) -> dict:
    """Writes out/results.json, out/per_sample.jsonl (and out/masks/*.png); returns the summary."""
    samples = load_annotations(annotations, images)[:limit]
    out.mkdir(parents=True, exist_ok=True)
    if save_masks:
        (out / "masks").mkdir(exist_ok=True)
    scores = []
    with open(out / "per_sample.jsonl", "w") as f:
        for s in tqdm(samples, desc="eval", unit="sample", disable=not progress):
            score = _score_one(pipeline, s, force_from_gt, out if save_masks else None)
            scores.append(score)
            f.write(json.dumps(asdict(score)) + "\n")
    summary = summarize(scores)
    summary["forced_from_gt"] = force_from_gt
    summary["backend"] = pipeline.backend
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def _score_one(pipeline: Pipeline, s: Sample, force_from_gt: bool, mask_dir: Path | None) -> SampleScore:
    img = load_image(s.image_path)
    h, w = img.shape[:2]
    options = s.options if s.task == "option" else None
    force = None
    if force_from_gt:
        response = FOUND if s.task == "referring" else s.answer
        force = from_ground_truth(s.polygon, w, h, response, pipeline.config)
    res = pipeline.run(img, s.question, task=s.task, options=options, force_output=force)
    inter, union = intersection_union(res.mask, polygon_mask(s.polygon, h, w))
    if mask_dir is not None:
        save_mask(res.mask, mask_dir / "masks" / f"{s.sample_id}.png")
    return SampleScore(
        sample_id=s.sample_id, task=s.task, attribute=s.attribute, area_percent=s.area_percent,
        intersection=inter, union=union, response=res.answer,
        correct=answer_correct(s, res.answer, res.parse.get("gse") == "ok"),
        parse_status_gse=res.parse.get("gse", ""), parse_status_lpr=res.parse.get("lpr", "not_run"),
    )
