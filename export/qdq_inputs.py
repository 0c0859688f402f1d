"""Calibration and held-out inputs for `finers_rt.export.qdq`, made by the project's own host processing.

Images come from a FineRS-4k folder (`--calib-data`: annotations.json + images/) or, without one,
`synth.make_synth` frames (a stand-in: real images calibrate better). Each graph is fed what the
pipeline feeds it: GSE vision the frame resized to 1920x1080, LPR vision a >= 512 px crop around the
annotated object resized to 512x512 (`qwen_vision_host.vision_inputs`), the SAM2 encoder that crop
(`sam2_host.preprocess_image`), the SAM2 decoder the fp32 encoder's features of it plus the
object's box and two points on its centre (`sam2_host.prompt_inputs`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..config import GSE, LPR
from ..image import resize_bilinear  # the pipeline's stage resize (PIL BILINEAR)
from ..qwen_vision_host import VisionPreprocessConfig, vision_inputs
from ..sam2_host import preprocess_image, prompt_inputs


def calibration_samples(calib_data: Path | None, n: int, tmp: Path) -> list[tuple[np.ndarray, tuple]]:
    """n (image (H, W, 3) uint8, box xyxy in pixels) pairs, one per distinct image: `calib_data` (a
    FineRS-4k folder: annotations.json + images/) or synthetic frames written to `tmp`."""
    from ..dataset import load_annotations

    if calib_data is None:
        from ..synth import QUESTIONS_PER_IMAGE, make_synth

        calib_data = tmp / "synth"
        make_synth(calib_data, n=n * QUESTIONS_PER_IMAGE, seed=0)
    samples, seen = [], set()
    for s in load_annotations(Path(calib_data) / "annotations.json", Path(calib_data) / "images"):
        if s.image_path not in seen:
            seen.add(s.image_path)
            samples.append(s)
    if len(samples) < n:
        raise ValueError(f"{calib_data} has {len(samples)} distinct images; the Q/DQ export needs {n}")
    out = []
    for s in samples[:n]:
        poly = np.asarray(s.polygon, np.float32)
        box = (*poly.min(0), *poly.max(0))
        out.append((np.asarray(Image.open(s.image_path).convert("RGB")), box))
    return out


def region_crop(image: np.ndarray, box, side: int = 512) -> tuple[np.ndarray, tuple]:
    """A square crop of >= `side` px centred on box (the LPR/SAM2 region); returns it and the box in it."""
    h, w = image.shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(side, box[2] - box[0], box[3] - box[1]) / 2
    x0, y0 = int(np.clip(cx - half, 0, max(w - 2 * half, 0))), int(np.clip(cy - half, 0, max(h - 2 * half, 0)))
    crop = image[y0: y0 + int(2 * half), x0: x0 + int(2 * half)]
    return crop, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)


def graph_feeds(engine_dir: Path, rel: str, samples: list, encoder=None) -> list[dict]:
    """The feeds of graph `rel` for each sample, as the pipeline makes them. encoder: an ORT session of
    the fp32 SAM2 encoder (the decoder's image inputs are its outputs)."""
    kind = "vision" if rel.endswith("/vision.onnx") else Path(rel).stem  # qdq.graph_kind
    if kind == "vision":
        stage = GSE if rel.startswith("gse/") else LPR
        cfg = VisionPreprocessConfig.from_checkpoint(engine_dir / rel.split("/")[0])
        pick = (lambda im, box: im) if stage is GSE else (lambda im, box: region_crop(im, box)[0])
        return [vision_inputs(resize_bilinear(pick(im, box), stage.input_size), cfg)[0] for im, box in samples]
    feeds = []
    for im, box in samples:
        crop, cbox = region_crop(im, box)
        image = {"image": preprocess_image(crop)}
        if kind == "sam2_encoder":
            feeds.append(image)
            continue
        names = [o.name for o in encoder.get_outputs()]
        feats = dict(zip(names, encoder.run(None, image)))
        centre = [[(cbox[0] + cbox[2]) / 2, (cbox[1] + cbox[3]) / 2]] * 2
        coords, labels = prompt_inputs(np.asarray(cbox), np.asarray(centre), np.ones(2), crop.shape[:2])
        feeds.append({**feats, "point_coords": coords, "point_labels": labels})
    return feeds
