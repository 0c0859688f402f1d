"""Host side of the Qwen2.5-VL vision tower: smart_resize, patchify, window/rotary index math.

Pure numpy + PIL (never torch): shared by the `ort` and `trt` backends, the exporter's
verification and the tests. It reproduces, for one image:
  - HF `Qwen2VLImageProcessorPil` (PIL resize to the smart_resize size, rescale, normalise,
    patchify with the temporal duplication), bit-exact through a per-channel lookup table;
  - the data-dependent index work of `Qwen2_5_VisionTransformerPretrainedModel.forward`
    (`get_vision_window_index`, `get_vision_position_ids`) plus a padded-window layout, so the
    exported graph (`finers_rt.export.onnx_vision.export_vision`) holds no data-dependent shapes.

Units: a *patch* is 14x14 pixels (x2 frames); a *merge unit* is 2x2 patches (one LLM token);
a *window* is window_size/14/2 = 4x4 merge units at most (fewer at the right/bottom edges).
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from .host_parallel import map_bands, resize_array

# Qwen2VLImageProcessor's fixed class values for the two settings that Qwen2.5-VL's own
# preprocessor_config.json does not write (it carries only pixels, sizes, mean and std). They are
# pinned here, not read from a library, so a transformers upgrade cannot change them.
QWEN_RESAMPLE = 3  # PIL.Image.BICUBIC
QWEN_RESCALE = 1 / 255


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(h, w) in pixels: multiples of `factor`, h*w within [min_pixels, max_pixels], aspect kept.

    Qwen's rule as HF implements it (Python `round`: half to even).
    """
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def need_key(doc: dict, key: str, where):
    """doc[key], or a KeyError naming the file (`where`): config values never come from library defaults."""
    if key not in doc:
        raise KeyError(f"{where} has no {key!r}; finers-rt never falls back to library defaults")
    return doc[key]



@dataclass(frozen=True)
class VisionPreprocessConfig:
    """Image processor settings (preprocessor_config.json) + the vision index geometry (config.json)."""

    min_pixels: int
    max_pixels: int
    patch_size: int  # pixels per patch side (14)
    temporal_patch_size: int  # frames per patch (2: a still image is duplicated)
    merge_size: int  # patches per merge-unit side (2)
    image_mean: tuple[float, ...]  # per RGB channel, on the [0, 1] scale
    image_std: tuple[float, ...]
    resample: int = QWEN_RESAMPLE  # PIL filter id
    rescale_factor: float = QWEN_RESCALE
    window_size: int | None = None  # pixels per window side (112); from config.json vision_config

    @classmethod
    def from_json(cls, path: str | Path, vision_config: dict | None = None) -> VisionPreprocessConfig:
        """Read a checkpoint's preprocessor_config.json (5.x `size` keys or legacy min/max_pixels)."""
        path = Path(path)
        doc = json.loads(path.read_text(encoding="utf-8"))
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if doc.get(flag, True) is not True:
                raise NotImplementedError(f"{path}: {flag}=false is not supported (Qwen2.5-VL sets it true)")
        size = doc.get("size") or {}
        if "shortest_edge" in size and "longest_edge" in size:
            min_pixels, max_pixels = size["shortest_edge"], size["longest_edge"]
        else:
            min_pixels, max_pixels = need_key(doc, "min_pixels", path), need_key(doc, "max_pixels", path)
        cfg = cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(need_key(doc, "patch_size", path)),
            temporal_patch_size=int(need_key(doc, "temporal_patch_size", path)),
            merge_size=int(need_key(doc, "merge_size", path)),
            image_mean=tuple(float(v) for v in need_key(doc, "image_mean", path)),
            image_std=tuple(float(v) for v in need_key(doc, "image_std", path)),
            resample=int(doc.get("resample", QWEN_RESAMPLE)),
            rescale_factor=float(doc.get("rescale_factor", QWEN_RESCALE)),
        )
        return cfg if vision_config is None else cfg.with_vision_config(vision_config)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> VisionPreprocessConfig:
        """From a checkpoint (or exported stage) folder: preprocessor_config.json + config.json."""
        checkpoint = Path(checkpoint)
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        return cls.from_json(checkpoint / "preprocessor_config.json", need_key(config, "vision_config", checkpoint))

    def with_vision_config(self, vision: dict) -> VisionPreprocessConfig:
        """Add window_size from a `vision_config` dict, checking the two files agree on the geometry."""
        where = "config.json vision_config"
        for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                             ("temporal_patch_size", "temporal_patch_size")):
            value = need_key(vision, theirs, Path(where))
            if int(value) != getattr(self, ours):
                raise ValueError(f"{where} {theirs}={value} disagrees with preprocessor {ours}={getattr(self, ours)}")
        window = int(need_key(vision, "window_size", Path(where)))
        if window % (self.patch_size * self.merge_size):
            raise ValueError(f"window_size {window} is not a multiple of patch*merge {self.factor}")
        return replace(self, window_size=window)

    @property
    def factor(self) -> int:
        """Resize granularity in pixels: one merge unit (28)."""
        return self.patch_size * self.merge_size

    @property
    def window_units(self) -> int:
        """Merge units per window side (112 / 28 = 4)."""
        if self.window_size is None:
            raise ValueError("window_size unknown: build the config with from_checkpoint(dir)")
        return self.window_size // self.factor


# ---------------------------------------------------------------------------------------------
# pixels -> patches


def resize_for_vision(image: np.ndarray, cfg: VisionPreprocessConfig, threads: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (h, w, 3) uint8 at the smart_resize size (PIL, cfg.resample).

    threads > 1 splits PIL's passes into bands (`host_parallel.resize`: byte-identical)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    h, w = smart_resize(image.shape[0], image.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    # HF resizes even when the size already fits; PIL then returns an identical copy.
    return resize_array(image, (w, h), cfg.resample, threads)


def _normalise_lut(cfg: VisionPreprocessConfig) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level per channel.

    Same arithmetic as HF (rescale in float64 then cast, normalise in float32), so a table lookup
    is bit-identical to HF's per-pixel math and costs one gather instead of three passes.
    """
    scaled = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, np.float32)[:, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None]
    return (scaled[None, :] - mean) / std


@lru_cache(maxsize=8)
def _pair_lut(cfg: VisionPreprocessConfig) -> np.ndarray:
    """(3 * 65536,) uint64: `_normalise_lut` for two neighbouring pixels of one channel at once.

    Entry c * 65536 + (a + 256 * b) holds the float32 values of levels a then b (8 bytes, copied
    from `_normalise_lut`, so bit for bit its values); a pixel pair read as a little-endian uint16
    indexes it, halving the lookups. 1.5 MB, built once per config.
    """
    lut = _normalise_lut(cfg)
    level = np.arange(65536)
    pairs = np.stack([lut[:, level & 255], lut[:, level >> 8]], axis=-1)  # (3, 65536, 2) float32
    return np.ascontiguousarray(pairs).view(np.uint64).reshape(-1)


class PixelBuffer:
    """A pixel_values buffer reused call after call, one per thread.

    `get(shape)` returns the same float32 array for the same shape on the same thread (another
    shape replaces it). Why: a fresh GSE array (50 MB) is page-faulted in on its first write: ~8 ms
    standalone, 40-85 ms of kernel time per image measured inside the pipeline (2-core VM, after
    the vision graph's large frees). The array is overwritten by the next `vision_inputs` given
    this buffer, so its owner runs the graph on the feeds first (`OrtVision.prepare` then
    `run_prepared`).
    """

    def __init__(self):
        self._local = threading.local()

    def get(self, shape: tuple[int, int]) -> np.ndarray:
        buf = getattr(self._local, "array", None)
        if buf is None or buf.shape != tuple(shape):
            buf = self._local.array = np.empty(shape, np.float32)
        return buf


_UNITS_PER_STEP = 128  # merge units per step of `_normalise_units`: its scratch stays in the CPU cache


def _rows_shape(cfg: VisionPreprocessConfig, units: int) -> tuple[int, int]:
    """(patches, values per patch) of pixel_values for `units` merge units."""
    return units * cfg.merge_size**2, 3 * cfg.temporal_patch_size * cfg.patch_size**2


def _normalise_units(resized: np.ndarray, rows: np.ndarray, cols: np.ndarray, cfg: VisionPreprocessConfig,
                     out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Normalised patches of the merge units at (rows, cols) of `resized`, in that order.

    resized: (h, w, 3) uint8, h and w multiples of cfg.factor; rows, cols: (U,) unit coordinates.
    Returns (U*m*m, 3*T*P*P) float32: per unit its m x m patches in raster order, each row laid out
    (C, T, P, P) as HF's processor does (a still image: T equal frames), into `out` when given.
    Exact: every value is a `_normalise_lut` entry. Steps of `_UNITS_PER_STEP` units (unit gather,
    RGB -> planar, pair-LUT lookup, temporal broadcast) keep the 50 MB GSE output a single write;
    `threads` > 1 runs bands of units in parallel (numpy releases the GIL).
    """
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    f, shape = p * m, _rows_shape(cfg, len(rows))
    n = shape[0]
    if out is None:
        out = np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {shape} float32 array, got {out.shape} {out.dtype}")
    # pairs of pixels per lookup when a patch row splits into pairs (P even, Qwen's 14), else single
    pair = 2 if p % 2 == 0 else 1
    lut = _pair_lut(cfg) if pair == 2 else _normalise_lut(cfg).reshape(-1).view(np.uint32)
    key = np.dtype("<u2") if pair == 2 else np.dtype(np.uint8)
    offs = (np.arange(3, dtype=np.intp) << (8 * pair))[:, None, None]  # channel c: entries c * 256**pair
    h, w, _ = resized.shape
    units = resized.reshape(h // f, f, w // f, f * 3).transpose(0, 2, 1, 3)  # (uh, uw, f, 3f) view
    dest = out.view(lut.dtype).reshape(n, 3, t, p * p // pair)

    def band(span: tuple[int, int]) -> None:
        planar = np.empty((_UNITS_PER_STEP * m * m, 3, 1, p * p), np.uint8)
        index = np.empty((_UNITS_PER_STEP * m * m, 3, 1, p * p // pair), np.intp)
        values = np.empty(index.shape, lut.dtype)
        for a in range(span[0], span[1], _UNITS_PER_STEP):
            b = min(a + _UNITS_PER_STEP, span[1])
            r = (b - a) * m * m
            rgb = units[rows[a:b], cols[a:b]].reshape(b - a, m, p, m, p, 3)  # (k, my, py, mx, px, c)
            np.copyto(planar[:r].reshape(b - a, m, m, 3, p, p), rgb.transpose(0, 1, 3, 5, 2, 4))
            np.add(planar[:r].view(key), offs, out=index[:r], casting="unsafe")
            np.take(lut, index[:r], out=values[:r])
            dest[a * m * m:b * m * m] = values[:r]  # broadcast over the T frames

    map_bands(band, len(rows), threads)
    return out


def pixel_values(image: np.ndarray, cfg: VisionPreprocessConfig, threads: int = 1
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """HF processor output for one image: (N, 3*T*P*P) float32 patches in raster (merge-block) order,
    and the grid (t, gh, gw) in patches."""
    resized = resize_for_vision(image, cfg, threads)
    uh, uw = resized.shape[0] // cfg.factor, resized.shape[1] // cfg.factor
    rows, cols = np.divmod(np.arange(uh * uw), uw)
    patches = _normalise_units(resized, rows, cols, cfg, threads=threads)
    return patches, (1, uh * cfg.merge_size, uw * cfg.merge_size)


# ---------------------------------------------------------------------------------------------
# index math of the vision tower (one image, grid (1, gh, gw))


def window_index(grid: tuple[int, int, int], merge: int, window_units: int) -> tuple[np.ndarray, np.ndarray]:
    """HF `get_vision_window_index` for one image.

    Returns (index (U,) int64: the raster merge-unit id at each window-order slot,
             unit_counts (W,) int64: merge units per non-empty window, in window order).
    Windows tile the unit grid in raster order, units inside a window in raster order too.
    """
    t, gh, gw = grid
    if t != 1:
        raise ValueError(f"one still image expected (t=1), got grid {grid}")
    uh, uw = gh // merge, gw // merge
    rows, cols = np.divmod(np.arange(uh * uw, dtype=np.int64), uw)
    windows_w = -(-uw // window_units)  # ceil: partial windows at the right edge
    window_id = (rows // window_units) * windows_w + cols // window_units
    slot = (rows % window_units) * window_units + cols % window_units
    index = np.argsort(window_id * window_units**2 + slot, kind="stable")
    counts = np.bincount(window_id, minlength=windows_w * -(-uh // window_units))
    return index, counts[counts > 0]


def rotary_positions(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(N, 2) int64 (h, w) patch coordinates in the processor's merge-block order (HF
    `get_vision_position_ids`): unit by unit in raster order, the m x m patches of a unit inside."""
    _, gh, gw = grid
    h, w = np.meshgrid(np.arange(gh, dtype=np.int64), np.arange(gw, dtype=np.int64), indexing="ij")
    pos = np.stack([h, w], axis=-1).reshape(gh // merge, merge, gw // merge, merge, 2)
    return pos.transpose(0, 2, 1, 3, 4).reshape(-1, 2)


def padded_windows(unit_counts: np.ndarray, unit_size: int) -> dict[str, np.ndarray]:
    """Window-order patches as a padded [W, L] batch of windows.

    unit_counts: (W,) merge units per window; unit_size: patches per unit (4).
    Returns win_gather (W, L) int64 indices into the N window-ordered patches (padding slots repeat
    the window's first patch), win_mask (W, L) bool (True = real patch), and win_scatter (N,) int64:
    the slot of each patch in the flattened W*L layout.
    """
    lengths = unit_counts * unit_size  # (W,) patches per window
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    width = int(lengths.max())
    offs = np.arange(width, dtype=np.int64)
    mask = offs[None, :] < lengths[:, None]
    gather = starts[:, None] + np.where(mask, offs[None, :], 0)
    window_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    scatter = window_of * width + (np.arange(int(lengths.sum()), dtype=np.int64) - starts[window_of])
    return {"win_gather": gather.astype(np.int64), "win_mask": mask, "win_scatter": scatter}


def vision_inputs(image: np.ndarray, cfg: VisionPreprocessConfig, threads: int = 1,
                  out: PixelBuffer | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int, int]]:
    """Everything the vision graph needs for one image, in window order.

    Returns (feeds: pixel_values (N, 3*T*P*P) float32, pos_ids (N, 2) int64, win_gather (W, L) int64,
             win_mask (W, L) bool, win_scatter (N,) int64  -- the graph's inputs, see specs.VISION;
             reverse (N/4,) int64: `image_embeds[reverse]` restores raster (LLM token) order;
             grid (1, gh, gw) in patches).
    out: pixel_values is written into `out.get((N, 3*T*P*P))` (reused memory), else a new array.
    """
    m = cfg.merge_size
    resized = resize_for_vision(image, cfg, threads)
    uh, uw = resized.shape[0] // cfg.factor, resized.shape[1] // cfg.factor
    grid = (1, uh * m, uw * m)
    index, counts = window_index(grid, m, cfg.window_units)
    rows, cols = np.divmod(index, uw)
    buffer = out.get(_rows_shape(cfg, len(index))) if out is not None else None
    feeds = {
        "pixel_values": _normalise_units(resized, rows, cols, cfg, buffer, threads),  # units in window order
        "pos_ids": rotary_positions(grid, m).reshape(-1, m * m, 2)[index].reshape(-1, 2),
        **padded_windows(counts, m * m),
    }
    return feeds, np.argsort(index), grid


def vision_dims(cfg: VisionPreprocessConfig, width: int, height: int) -> dict[str, int]:
    """The vision graph's dynamic dims (names of specs.VISION) for a width x height stage input:
    the shapes `vision_inputs` feeds for it, computed without pixels (TensorRT profile opt).

    GSE 1920x1080 -> 1932x1092: 10,764 patches in 180 windows of <= 64; LPR 512x512 -> 504x504:
    1,296 patches in 25 windows (Qwen2.5-VL-7B's processor settings).
    """
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    grid = (1, h // cfg.patch_size, w // cfg.patch_size)
    _, counts = window_index(grid, cfg.merge_size, cfg.window_units)
    return {"num_patches": grid[1] * grid[2], "num_windows": len(counts),
            "window_len": int(counts.max()) * cfg.merge_size**2}
