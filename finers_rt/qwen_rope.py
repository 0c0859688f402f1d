"""Qwen2.5-VL M-RoPE position ids on the host (numpy only, never torch).

The decoder graph (`finers_rt.export.onnx_decoder.export_decoder`) takes 3-D position ids
`[3, B, S]` (temporal, height, width axes). This module computes them exactly as HF
`Qwen2_5_VLModel.get_rope_index` does for one sequence holding at most one image:

    text before the image   t = h = w = 0 .. start-1
    image block (t, h, w)   t = start + i_t, h = start + i_h, w = start + i_w   (merged-token grid)
    text after the image    continues from start + max(H, W) // merge on all three axes

and, when decoding, `cache_position + rope_delta` on all three axes (HF's generate does the same
with the `rope_deltas` it stored at prefill).
"""
from __future__ import annotations

import numpy as np

IMAGE_PAD_ID = 151655  # <|image_pad|>


def _image_span(input_ids: np.ndarray, image_token_id: int, n_tokens: int) -> int:
    """Start index of the one contiguous run of `n_tokens` image tokens in `input_ids`."""
    (where,) = np.nonzero(input_ids == image_token_id)
    if len(where) != n_tokens:
        raise ValueError(f"image_grid_thw implies {n_tokens} image tokens, input_ids hold {len(where)}")
    start = int(where[0])
    if where[-1] - start + 1 != n_tokens:
        raise ValueError("image tokens must be one contiguous block (one image per sequence)")
    return start


def _vision_positions(start: int, grid_thw, spatial_merge_size: int) -> np.ndarray:
    """(3, T*h*w) int64 positions of the merged image tokens in raster (t, h, w) order."""
    t, h, w = (int(v) for v in grid_thw)
    h, w = h // spatial_merge_size, w // spatial_merge_size
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + start


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int = IMAGE_PAD_ID,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, int]:
    """M-RoPE position ids for one prompt, equal to HF `get_rope_index`.

    input_ids: (S,) int token ids; image_grid_thw: (1, 3) (T, H, W) in 14-px patches, or None for
    a text-only prompt. Returns (position_ids int64 [3, 1, S], rope_delta) where
    rope_delta = max(position) + 1 - S, the offset every later (decoded) position carries.
    """
    input_ids = np.asarray(input_ids).reshape(-1)
    seq = len(input_ids)
    if image_grid_thw is None or len(image_grid_thw) == 0:
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (3, seq))
    else:
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        if len(grid) != 1:
            raise ValueError(f"one image per sequence is supported, got image_grid_thw of {len(grid)} rows")
        t, h, w = (int(v) for v in grid[0])
        n_tokens = t * h * w // spatial_merge_size**2
        start = _image_span(input_ids, image_token_id, n_tokens)
        after = start + n_tokens
        resume = start + max(h, w) // spatial_merge_size  # HF: text resumes past the larger side
        positions = np.concatenate(
            [
                np.broadcast_to(np.arange(start, dtype=np.int64), (3, start)),
                _vision_positions(start, grid[0], spatial_merge_size),
                np.broadcast_to(np.arange(seq - after, dtype=np.int64) + resume, (3, seq - after)),
            ],
            axis=1,
        )
    rope_delta = int(positions.max()) + 1 - seq if seq else 0
    return np.ascontiguousarray(positions[:, None, :]), rope_delta


def decode_position_ids(cache_position: int, rope_delta: int) -> np.ndarray:
    """[3, 1, 1] int64 position of the token at `cache_position` (0-based index in the KV cache)."""
    return np.full((3, 1, 1), cache_position + rope_delta, dtype=np.int64)
