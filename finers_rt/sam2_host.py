"""SAM2 host processing in numpy/PIL: what `SAM2ImagePredictor` does around its two graphs.

Shared by the ONNX Runtime predictor (`backends/ort_sam2.py`), the export verification
(`finers_rt.export.onnx_sam2`) and the tests, so that all of them feed the graphs the same arrays.
Reproduces sam2 1.1.0 + torchvision 0.29:

- image: `SAM2Transforms` = ToTensor (uint8 / 255) -> Resize((1024, 1024)) -> Normalize(ImageNet).
  torchvision's tensor Resize is `F.interpolate(bilinear, align_corners=False, antialias=True)`:
  a triangle filter widened by the downscale factor, the algorithm torch ported from Pillow.
  Pillow's "F"-mode (float32) BILINEAR resize is that filter; measured <= 2.4e-7 from torch on
  [0, 1] pixels (~1e-6 after /std). Upscaling is unaffected by antialias; downscaling is not
  (plain bilinear differs by up to 0.6 on a 4K crop), so crops larger than 1024 px need it.
- prompts: box -> two corner points (labels 2, 3) placed before the user points; coordinates
  divided by the image width/height, then x1024. The predictor always passes boxes=None to the
  prompt encoder (the box already travels as points), so the encoder ALWAYS appends one padding
  point ((0, 0), label -1) after the points, box or no box. We append it here; the graph embeds it
  as `not_a_point_embed`, exactly as `PromptEncoder._embed_points` does.
- masks: 256x256 low-res logits -> bilinear (align_corners=False, no antialias) to the image size,
  as `F.interpolate` in `SAM2Transforms.postprocess_masks`; mask = logits > 0.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_SIZE = 1024  # SAM2 input side (square), pixels
MASK_SIZE = 256  # low-res mask logits side: IMAGE_SIZE / 4
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # ImageNet, RGB, on [0, 1] pixels
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MASK_THRESHOLD = 0.0  # SAM2ImagePredictor default
PAD_LABEL, BOX_LABELS = -1.0, (2.0, 3.0)


def preprocess_image(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (1, 3, 1024, 1024) float32: squashed (aspect not kept), normalised."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"SAM2 wants an (h, w, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    x = image.astype(np.float32) / np.float32(255.0)  # ToTensor
    planes = [_resize_plane(x[..., c]) for c in range(3)]  # Resize, per channel in float32
    x = np.stack(planes)  # (3, 1024, 1024)
    x = (x - MEAN[:, None, None]) / STD[:, None, None]  # Normalize, float32 like torchvision
    return x[None]


def _resize_plane(plane: np.ndarray) -> np.ndarray:
    """(h, w) float32 -> (1024, 1024) float32, antialiased bilinear (Pillow == torch antialias=True)."""
    if plane.shape == (IMAGE_SIZE, IMAGE_SIZE):  # torchvision returns the input unchanged
        return plane
    im = Image.fromarray(np.ascontiguousarray(plane))  # float32 2-D -> mode "F"
    return np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)


def prompt_inputs(box, points, labels, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts in image pixels -> decoder inputs in the 1024x1024 input frame.

    box: (4,) or (1, 4) xyxy | None; points: (N, 2) xy | None; labels: (N,) 1 fg / 0 bg | None.
    Returns point_coords (1, P, 2) float32 and point_labels (1, P) float32, P = 2*box + N + 1:
    [box corners (2, 3)] + [points] + [padding point (0, 0), label -1].
    """
    coords, labs = [], []
    if box is not None:
        corners = np.asarray(box, dtype=np.float32).reshape(-1, 2, 2)
        if corners.shape[0] != 1:
            raise ValueError(f"one box per image, got {corners.shape[0]}")
        coords.append(_to_input_frame(corners[0], hw))
        labs.append(np.asarray(BOX_LABELS, dtype=np.float32))
    if points is not None:
        if labels is None:
            raise ValueError("point labels must be given with the points")
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        coords.append(_to_input_frame(pts, hw))
        labs.append(np.asarray(labels, dtype=np.float32).reshape(-1))
    if not coords:
        raise ValueError("SAM2 needs a box or points to predict a mask")
    coords.append(np.zeros((1, 2), dtype=np.float32))  # padding point, ignored via its label
    labs.append(np.asarray([PAD_LABEL], dtype=np.float32))
    return np.concatenate(coords)[None], np.concatenate(labs)[None]


def _to_input_frame(xy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(N, 2) xy pixels -> xy in the 1024 frame: x / w * 1024, y / h * 1024 (float32, torch's order)."""
    h, w = hw
    out = xy.astype(np.float32, copy=True)
    out[:, 0] = out[:, 0] / np.float32(w)
    out[:, 1] = out[:, 1] / np.float32(h)
    return out * np.float32(IMAGE_SIZE)


def upsample_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, H, W) -> (K, h, w) float32, = torch F.interpolate(bilinear, align_corners=False).

    Separable, two taps per output pixel (no antialias when shrinking), columns first then rows,
    each tap pair blended with torch's fused rounding: bit-identical to torch 2.14's CPU kernel
    when enlarging (the usual case: crops > 256 px); ~1 ulp off when shrinking. Any other order or
    rounding is ~1 ulp off everywhere (<= 6e-6 on logits of magnitude ~30).
    """
    x = np.asarray(x, dtype=np.float32)
    y0, y1, wy = _linear_taps(x.shape[-2], size[0])
    x0, x1, wx = _linear_taps(x.shape[-1], size[1])
    cols = _blend(x[:, :, x0], x[:, :, x1], wx)  # (K, H, w)
    return _blend(cols[:, y0, :], cols[:, y1, :], wy[:, None])  # (K, h, w)


def _blend(a: np.ndarray, b: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """a * (1 - w1) + b * w1 in float32, with the a-product fused into the add (one rounding).

    The float64 product of two float32 values is exact, so float64 math then one cast to float32
    reproduces torch's compiled fma(a, w0, b * w1).
    """
    w0 = np.float32(1) - w1
    return (a.astype(np.float64) * w0 + b * w1).astype(np.float32)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for each of n_out outputs (half-pixel centres).

    src = scale * (dst + 0.5) - 0.5 with scale = float32(n_in / n_out), clamped at 0 (torch's
    area_pixel_compute_source_index). torch's compiled kernel fuses that multiply-add (one
    rounding); the float64 product of two float32 values is exact, so computing it in float64
    and rounding once reproduces the fused result. Unfused float32 math moves src by up to one
    ulp (7.6e-6 near 128), i.e. up to ~2e-4 on logits of magnitude ~30.
    """
    scale = np.float64(np.float32(n_in / n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)  # floor: src >= 0
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, w1


def masks_from_logits(low_res: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(1, K, 256, 256) or (K, 256, 256) logits -> (K, h, w) bool masks at the image size."""
    low_res = np.asarray(low_res).reshape(-1, *np.shape(low_res)[-2:])
    return upsample_bilinear(low_res, hw) > MASK_THRESHOLD
