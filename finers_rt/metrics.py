"""FineRS-4k metrics: GT masks, per-sample IoU, gIoU/cIoU per size bucket and VQA accuracy.

Reproduces the authors' evaluation script (reference doc section 6). numpy, plus OpenCV for
the GT polygon rasteriser (imported only when a mask is drawn).

Scale: gIoU, cIoU and accuracies are FRACTIONS in [0, 1]; the paper prints them x100
(gIoU 55.1 in the paper is 0.551 here).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Size buckets on `area_percent` (percent of image area, e.g. 0.03 means 0.03 %).
S_THRESHOLD = 0.055  # strictly above -> "S"
XXS_THRESHOLD = 0.017  # strictly below -> "XXS"; [0.017, 0.055] -> "XS"
BUCKETS = ("S", "XS", "XXS")
QA_TASKS = ("option", "reasoning")

GIOU_EPS = 1e-5  # reference: I / (U + 1e-5) per sample
CIOU_EPS = 1e-10  # reference: sum(I) / (sum(U) + 1e-10)
REASONING_MIN_RATIO = 0.8  # difflib ratio a response word needs to count as the answer


def polygon_mask(points: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise an annotation polygon into a (height, width) bool mask, outline included.

    points: list of [x, y] in original image pixels. Exactly as the reference script: vertices
    cast to int32 (truncation toward zero), `cv2.polylines(closed, thickness=1)` then
    `cv2.fillPoly`. OpenCV's rasteriser differs from PIL's on edge pixels, which is ~10 % of the
    area of an XXS object, so the reference's own rasteriser is used (extra `eval`).
    No points give an all-False mask.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    if len(points) == 0:
        return mask.astype(bool)
    cv2 = _cv2()
    pts = np.array([points], dtype=np.float64).astype(np.int32)  # (1, N, 2) x, y
    cv2.polylines(mask, pts, True, 1, 1)
    cv2.fillPoly(mask, pts, 1)
    return mask.astype(bool)


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "GT masks are rasterised with OpenCV as the reference does: "
            "pip install 'finers-rt[eval]' (opencv-python-headless)"
        ) from e
    return cv2


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts (|pred & gt|, |pred | gt|) of two (H, W) bool masks of equal shape."""
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape} vs gt {gt.shape}")
    pred_b = pred.astype(bool, copy=False)
    gt_b = gt.astype(bool, copy=False)
    inter = int(np.count_nonzero(pred_b & gt_b))
    union = int(np.count_nonzero(pred_b | gt_b))
    return inter, union


def size_bucket(area_percent: float) -> str:
    """Bucket name for an object covering `area_percent` % of the image: S, XS or XXS."""
    if area_percent > S_THRESHOLD:
        return "S"
    if area_percent < XXS_THRESHOLD:
        return "XXS"
    return "XS"


def option_correct(response: str, gt: str) -> bool:
    """Multiple-choice (MVQA) check: does the lower-cased response name option `gt`?

    Same regex as the reference; `gt` (a letter in FineRS-4k) is passed through `re.escape`,
    which leaves a letter unchanged and keeps any other gt (e.g. "a." or "(") from being read
    as regex syntax.
    """
    gt_re = re.escape(gt.lower())
    pattern = r"(?:\b|[\(\[\{'\" ])" + gt_re + r"(?:\b|[\)\]\}'\" ,.!?])"
    return re.search(pattern, response.lower()) is not None


def reasoning_correct(response: str, gt: str) -> bool:
    """Open-ended (OVQA) check: some whitespace-separated response word is >= 0.8 similar to gt."""
    gt_l = gt.lower()
    return any(
        difflib.SequenceMatcher(None, word, gt_l).ratio() >= REASONING_MIN_RATIO
        for word in response.lower().split()
    )


def qa_correct(task: str, response: str, gt: str) -> bool | None:
    """Dispatch on the annotation's Q-type; None for `referring` (no VQA answer is scored)."""
    if task == "option":
        return option_correct(response, gt)
    if task == "reasoning":
        return reasoning_correct(response, gt)
    return None


@dataclass(frozen=True)
class SampleScore:
    """Everything `summarize` needs about one evaluated annotation.

    intersection / union: pixel counts over the full-resolution masks (a failed parse is
    scored as an empty prediction: I = 0, U = |GT|). correct: VQA verdict, None for referring;
    a QA sample with correct=None counts as wrong (the reference counts a missing GSE box as a
    wrong answer). parse_status_*: "ok", a failure reason, or None when the stage did not run.
    """

    sample_id: str
    task: str
    attribute: str
    area_percent: float
    intersection: int
    union: int
    response: str
    correct: bool | None
    parse_status_gse: str | None
    parse_status_lpr: str | None


def _sample_giou(s: SampleScore) -> float:
    """Per-sample IoU as the reference accumulates it; an empty GT and empty prediction give 1."""
    if s.union == 0:
        return 1.0
    return s.intersection / (s.union + GIOU_EPS)


def _seg_metrics(scores: Sequence[SampleScore]) -> dict:
    """{"giou", "ciou", "n"} over `scores`; metrics are None (JSON null) when there are none."""
    if not scores:
        return {"giou": None, "ciou": None, "n": 0}
    giou = sum(_sample_giou(s) for s in scores) / len(scores)
    ciou = sum(s.intersection for s in scores) / (sum(s.union for s in scores) + CIOU_EPS)
    return {"giou": float(giou), "ciou": float(ciou), "n": len(scores)}


def _accuracy(scores: Sequence[SampleScore]) -> float | None:
    """Fraction of samples with correct is True; None when there are no samples."""
    if not scores:
        return None
    return sum(1 for s in scores if s.correct is True) / len(scores)


def _per_attribute(qa: Sequence[SampleScore]) -> dict:
    """{attribute: {"acc", "n"}} over QA samples (option and reasoning pooled), sorted by name."""
    groups: dict[str, list[SampleScore]] = {}
    for s in qa:
        groups.setdefault(s.attribute, []).append(s)
    return {attr: {"acc": _accuracy(g), "n": len(g)} for attr, g in sorted(groups.items())}


def _parse_failures(scores: Sequence[SampleScore]) -> dict:
    """{"gse": {status: count}, "lpr": {...}} counting statuses other than "ok" and None."""
    out = {}
    for stage in ("gse", "lpr"):
        statuses = (getattr(s, f"parse_status_{stage}") for s in scores)
        counts = Counter(st for st in statuses if st is not None and st != "ok")
        out[stage] = dict(sorted(counts.items()))
    return out


def summarize(scores: Sequence[SampleScore]) -> dict:
    """The content of an evaluation's results.json (JSON-serialisable, fractions in [0, 1]).

    Keys: giou, ciou (all samples; None if there are none), buckets (always all three of
    S/XS/XXS; an empty bucket has n=0 and null metrics so the schema never changes),
    option_acc / reasoning_acc (None without such samples), per_attribute, counts,
    parse_failures.
    """
    overall = _seg_metrics(scores)
    by_task = {t: [s for s in scores if s.task == t] for t in ("referring", *QA_TASKS)}
    qa = [s for s in scores if s.task in QA_TASKS]
    return {
        "giou": overall["giou"],
        "ciou": overall["ciou"],
        "buckets": {
            b: _seg_metrics([s for s in scores if size_bucket(s.area_percent) == b])
            for b in BUCKETS
        },
        "option_acc": _accuracy(by_task["option"]),
        "reasoning_acc": _accuracy(by_task["reasoning"]),
        "per_attribute": _per_attribute(qa),
        # The reference's results_all.json table: accuracy per task and attribute.
        "per_task_attribute": {t: _per_attribute(by_task[t]) for t in QA_TASKS},
        "counts": {"total": len(scores), **{t: len(v) for t, v in by_task.items()}},
        "parse_failures": _parse_failures(scores),
    }
