"""Parse a stage's generated text into a box, points and a response, as the reference does.

Reference behaviour (finers-pipeline.md §4, checked against the authors' script): replace `]"` by
`]`, take the FIRST `{...}` without nested braces anywhere in the text, try JSON then a Python
literal; bbox = the value of the first key whose lower-cased name contains "bbox", used only if it
has 4 entries; points = the values of the first two keys containing "points", used only if there
are two such keys; response = key "response"; each coordinate becomes `round(int(v) * factor)`;
think = the first `<think>...</think>` without a "<" inside. Where the reference would crash (a
value `int()` rejects, a set literal, a coordinate past MAX_COORD) this parser returns a failure
status instead.

`parse_output` never raises: every failure is a status string plus a human-readable reason.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field

_OBJECT = re.compile(r"{[^}]+}")
_THINK = re.compile(r"<think>([^<]+)</think>")
# An unquoted key after "{" or ",", as in the LPR prompt's own example `response: 'A'`.
_BARE_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)\s*:")

OK = "ok"
NO_JSON = "no_json"  # no {...} in the text
BAD_JSON = "bad_json"  # a {...} that is neither JSON nor a Python dict literal
NO_BBOX = "no_bbox"  # the first "bbox" key is missing or not 4 numbers
NO_POINTS = "no_points"  # LPR: fewer than two "points" keys, or one that is not 2 numbers
# Largest |coordinate| kept, in pixels after scaling (int32: no image is that large). Past it the
# region's float arithmetic (centre + half side) can overflow to inf and crash the pipeline, as
# the reference does; SAM2's float32 prompts and clients' JSON numbers also stay exact.
MAX_COORD = 2**31 - 1


@dataclass
class Parsed:
    """One stage's parsed answer. Coordinates are ints already scaled by the stage's factors.

    bbox: (x_min, y_min, x_max, y_max) or None; points: up to two (x, y) tuples.
    """

    status: str
    bbox: tuple[int, int, int, int] | None = None
    points: list[tuple[int, int]] = field(default_factory=list)
    response: str = ""
    think: str | None = None
    reason: str = ""


def _as_int(v) -> int | None:
    """`int(v)` as the reference applies it (floats truncate, numeric strings parse); None if invalid."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return None


def _numbers(value, n: int) -> list[int] | None:
    # A string of length n passes the reference's len() check and int()s per character: kept.
    if not isinstance(value, (list, tuple, str)) or len(value) != n:
        return None
    ints = [_as_int(v) for v in value]
    return None if any(i is None for i in ints) else ints


def _load_dict(snippet: str, tolerant: bool):
    """JSON, then a Python literal (then, if tolerant, with bare keys quoted). None on failure."""
    attempts = [json.loads, ast.literal_eval]
    if tolerant:
        attempts.append(lambda s: ast.literal_eval(_BARE_KEY.sub(r'\1"\2":', s)))
    for load in attempts:
        try:
            data = load(snippet)
        except Exception:  # hostile text can raise anything from the parsers, incl. RecursionError
            continue
        if isinstance(data, dict):
            return data
    return None


def _scale(xy: list[int] | None, fx: float, fy: float) -> list[int] | None:
    """None when a scaled coordinate is beyond MAX_COORD or not a finite float (1e308 * 2, a
    400-digit int: the reference's `round(int(v) * factor)` raises OverflowError there)."""
    if xy is None:
        return None
    try:
        out = [round(v * (fx if i % 2 == 0 else fy)) for i, v in enumerate(xy)]
    except OverflowError:
        return None
    return out if all(abs(v) <= MAX_COORD for v in out) else None


def parse_output(text: str, fx: float, fy: float, *, want_points: bool, tolerant: bool = False) -> Parsed:
    """Parse `text`; x coordinates are multiplied by `fx`, y by `fy` (model space -> pixels)."""
    if not isinstance(text, str):
        return Parsed(NO_JSON, reason=f"model output is {type(text).__name__}, not text")
    m = _THINK.search(text)
    think = m.group(1) if m else None
    m = _OBJECT.search(text.replace(']"', "]"))
    if m is None:
        return Parsed(NO_JSON, think=think, reason="no {...} object in the output")
    data = _load_dict(m.group(0), tolerant)
    if data is None:
        return Parsed(BAD_JSON, think=think, reason=f"not JSON or a Python dict: {m.group(0)[:200]!r}")

    keys = [k for k in data if isinstance(k, str)]
    bbox_key = next((k for k in keys if "bbox" in k.lower()), None)
    bbox = _scale(_numbers(data[bbox_key], 4), fx, fy) if bbox_key is not None else None
    point_keys = [k for k in keys if "points" in k.lower()][:2]
    pts = [_scale(_numbers(data[k], 2), fx, fy) for k in point_keys]
    pts = pts if len(pts) == 2 and all(pts) else []
    response = data.get("response", "")
    out = Parsed(
        OK,
        bbox=tuple(bbox) if bbox else None,
        points=[tuple(p) for p in pts] if want_points else [],
        response=response if isinstance(response, str) else str(response),
        think=think,
    )
    if bbox is None:
        why = "no key containing 'bbox'" if bbox_key is None else f"{bbox_key!r} is not 4 numbers in range"
        out.status, out.reason = NO_BBOX, why
    elif want_points and not pts:
        why = (f"{len(point_keys)} 'points' keys" if len(point_keys) < 2
               else "a 'points' value is not 2 numbers in range")
        out.status, out.reason = NO_POINTS, why
    return out
