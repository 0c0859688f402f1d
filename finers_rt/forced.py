"""Forced outputs: stage texts scripted from the ground truth, for random-weight checkpoints.

The models still run every decoding step; only the emitted tokens come from these texts (see
`Generator.generate(forced_text=...)`). The texts are written the way a trained FineRS model
answers, in each stage's coordinate space, so every downstream step (parsing, region, crop, LPR
scaling, SAM2 prompt, paste) does its real work on known coordinates.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import PipelineConfig
from .metrics import polygon_mask
from .parsing import parse_output
from .region import dynamic_box

FOUND = "The object is found."


def load_force_file(path: str | Path) -> dict[str, str]:
    """`{"gse": "<text>", "lpr": "<text>"}` from a JSON file; both keys optional, nothing else."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or set(data) - {"gse", "lpr"} or not all(
        isinstance(v, str) for v in data.values()
    ):
        raise ValueError(f'{path}: expected {{"gse": "<text>", "lpr": "<text>"}} with string values')
    return data


def gse_text(bbox_1080: list[int], response: str) -> str:
    return (f"<think>Scripted from the ground truth.</think><answer>{{'bbox': {list(bbox_1080)}, "
            f"'response': {response!r}}}</answer>")


def lpr_text(bbox_512: list[int], p1: list[int], p2: list[int], response: str) -> str:
    return (f"<think>Scripted from the ground truth.</think><answer>{{'bbox': {list(bbox_512)}, "
            f"'points_1': {list(p1)}, 'points_2': {list(p2)}, 'response': {response!r}}}</answer>")


def from_ground_truth(polygon, width: int, height: int, response: str,
                      config: PipelineConfig | None = None) -> dict[str, str]:
    """GSE: a 256x256 box (1920x1080 space) centred on the GT box; LPR: the GT box and two deep
    interior points of the GT polygon, in 512x512 space of the crop the pipeline will cut."""
    cfg = config or PipelineConfig()
    pts = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    gw, gh = cfg.gse.input_size
    sx, sy = gw / width, gh / height
    cx, cy = (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy
    box_g = [int(round(cx - 128)), int(round(cy - 128)), int(round(cx + 128)), int(round(cy + 128))]
    gse = gse_text(box_g, response)
    # The crop box exactly as the pipeline will derive it from that text.
    parsed = parse_output(gse, width / gw, height / gh, want_points=False)
    crop = dynamic_box(parsed.bbox, width, height, cfg.region_mode, cfg.min_region)
    lw, lh = cfg.lpr.input_size
    kx, ky = lw / (crop[2] - crop[0]), lh / (crop[3] - crop[1])
    local = lambda x, y: [int(round((x - crop[0]) * kx)), int(round((y - crop[1]) * ky))]  # noqa: E731
    p1, p2 = _interior_points(polygon, width, height)
    lpr = lpr_text(local(x0, y0) + local(x1, y1), local(*p1), local(*p2), response)
    return {"gse": gse, "lpr": lpr}


def _interior_points(polygon, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two points deep inside the polygon: the deepest pixel (by repeated 4-neighbour erosion),
    then the deepest pixel outside a disk of half that depth around it (or the same point)."""
    pts = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    ox, oy = int(max(pts[:, 0].min() - 2, 0)), int(max(pts[:, 1].min() - 2, 0))
    local = (pts - [ox, oy]).tolist()
    w = int(min(pts[:, 0].max() + 3, width)) - ox
    h = int(min(pts[:, 1].max() + 3, height)) - oy
    mask = polygon_mask(local, h, w)
    depth = _depth(mask)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    r = max(int(depth[y, x]) // 2, 1)
    yy, xx = np.mgrid[:h, :w]
    rest = np.where((yy - y) ** 2 + (xx - x) ** 2 > r * r, depth, 0)
    y2, x2 = np.unravel_index(int(np.argmax(rest)), rest.shape) if rest.max() > 0 else (y, x)
    return (int(x) + ox, int(y) + oy), (int(x2) + ox, int(y2) + oy)


def _depth(mask: np.ndarray) -> np.ndarray:
    """Erosion count of each pixel (a city-block distance to the background), (h, w) int32."""
    depth = np.zeros(mask.shape, dtype=np.int32)
    cur = mask.copy()
    while cur.any():
        depth += cur
        p = np.pad(cur, 1)
        cur = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return depth
