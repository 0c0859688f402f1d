"""FineRS-4k annotation loading (reference doc section 7).

Layout: `{"annotations": [{"image_path", "Q", "A", "Q-type", "options", "points",
"attribute", "area_percent", ...}, ...]}` (a bare list is accepted too), images in a separate
folder. Each record is validated up front so a bad file fails before any model is loaded.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASKS = ("referring", "reasoning", "option")
DEFAULT_ATTRIBUTE = "others"


class DatasetError(ValueError):
    """An annotation file or record that does not follow the FineRS-4k format."""


@dataclass(frozen=True)
class Sample:
    """One text-mask pair.

    polygon: list of [x, y] in original image pixels. area_percent: object area in percent of
    the image area (0.03 means 0.03 %). options: the annotation's "options" as stored
    (a list of strings or a string) or None.
    """

    sample_id: str
    image_path: Path
    question: str
    answer: str
    task: str
    options: list[str] | str | None
    polygon: list[list[float]]
    attribute: str
    area_percent: float


def _fail(index: int, field: str, problem: str) -> DatasetError:
    return DatasetError(f"annotation record {index}: field {field!r} {problem}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require_str(rec: dict, index: int, field: str) -> str:
    if field not in rec:
        raise _fail(index, field, "is missing")
    value = rec[field]
    if not isinstance(value, str):
        raise _fail(index, field, f"must be a string, got {type(value).__name__}")
    return value


def _check_polygon(rec: dict, index: int) -> list[list[float]]:
    """points: a list of [x, y] number pairs (original pixels)."""
    if "points" not in rec:
        raise _fail(index, "points", "is missing")
    pts = rec["points"]
    if not isinstance(pts, list):
        raise _fail(index, "points", f"must be a list of [x, y], got {type(pts).__name__}")
    for k, p in enumerate(pts):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_number, p))):
            raise _fail(index, "points", f"entry {k} is not an [x, y] pair of numbers: {p!r}")
    return [[p[0], p[1]] for p in pts]


def _check_options(rec: dict, index: int) -> list[str] | str | None:
    """options: list of strings, a string, or absent (None)."""
    opts = rec.get("options")
    if opts is None or isinstance(opts, str):
        return opts
    if isinstance(opts, list) and all(isinstance(o, str) for o in opts):
        return list(opts)
    raise _fail(index, "options", f"must be a list of strings or a string, got {opts!r}")


def _parse_record(rec: Any, index: int, images_dir: Path) -> Sample:
    """Validate one annotation dict and build its Sample; unknown fields are ignored."""
    if not isinstance(rec, dict):
        kind = type(rec).__name__
        raise DatasetError(f"annotation record {index}: must be an object, got {kind}")
    task = _require_str(rec, index, "Q-type")
    if task not in TASKS:
        raise _fail(index, "Q-type", f"must be one of {', '.join(TASKS)}, got {task!r}")
    area = rec.get("area_percent")
    if not _is_number(area) or area < 0:
        raise _fail(index, "area_percent", f"must be a finite number >= 0, got {area!r}")
    options = _check_options(rec, index)
    if task == "option" and options is None:
        logger.warning("annotation record %d: option question without 'options'", index)
    attribute = rec.get("attribute", DEFAULT_ATTRIBUTE)
    if not isinstance(attribute, str):
        raise _fail(index, "attribute", f"must be a string, got {attribute!r}")
    return Sample(
        sample_id=str(rec["id"]) if rec.get("id") is not None else str(index),
        image_path=images_dir / _require_str(rec, index, "image_path"),
        question=_require_str(rec, index, "Q"),
        answer=_require_str(rec, index, "A"),
        task=task,
        options=options,
        polygon=_check_polygon(rec, index),
        attribute=attribute,
        area_percent=float(area),
    )


def _read_records(json_path: Path) -> list:
    """The annotation list of a FineRS-4k json file (`{"annotations": [...]}` or a bare list)."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_path}: not valid JSON ({e})") from e
    if isinstance(data, dict):
        if "annotations" not in data:
            raise DatasetError(f"{json_path}: top-level object has no 'annotations' list")
        data = data["annotations"]
    if not isinstance(data, list):
        kind = type(data).__name__
        raise DatasetError(f"{json_path}: expected a list of annotations, got {kind}")
    return data


def load_annotations(json_path: str | Path, images_dir: str | Path) -> list[Sample]:
    """Load and validate every record of a FineRS-4k annotation file.

    image_path of each Sample is absolute: `images_dir / record["image_path"]` (existence is not
    checked here; the image is opened when the sample is run). Raises DatasetError naming the
    record index and field on the first bad record, or on a duplicated sample id.
    """
    json_path = Path(json_path)
    images_dir = Path(images_dir).absolute()
    samples = [_parse_record(r, i, images_dir) for i, r in enumerate(_read_records(json_path))]
    seen: set[str] = set()
    for i, s in enumerate(samples):
        if s.sample_id in seen:
            raise _fail(i, "id", f"duplicates an earlier sample id {s.sample_id!r}")
        seen.add(s.sample_id)
    logger.info("loaded %d annotations from %s", len(samples), json_path)
    return samples
