"""From low-res mask logits to the final label map (PIPELINE.md, "Masks" 3-6).

* ``assemble_labels``: each kept mask's (256, 256) logits are upsampled bilinearly
  (align_corners=False) to 1024 x 1024 and then to the original H x W, thresholded at
  sigmoid > 0.4, and written in order so that a later mask wins an overlap.
  Bilinear interpolation is a convex combination of its inputs, so a pixel can only be on
  near low-res pixels whose logits clear the threshold: each mask is computed only on the
  bounding rectangle of those pixels (plus a one-pixel margin), not on the whole image.
* ``fill_holes_and_remove_small_masks``: the official post-processing (cellpose's rule):
  labels in increasing order; fewer than ``min_size`` pixels -> deleted; otherwise holes
  filled inside the label's bounding box and written back with the next sequential label.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.ndimage import binary_fill_holes, find_objects

LOWRES = 256
MODEL_SIZE = 1024
MASK_THRESHOLD = 0.4
# sigmoid(x) > 0.4  <=>  x > log(0.4 / 0.6); used only to bound where a mask can be on
_LOGIT_BOUND = math.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))


@lru_cache(maxsize=64)
def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear (align_corners=False, no antialias) resampling along one axis:
    (n_out,) lower source index, upper source index, float32 weight of the upper one."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _resample(x: np.ndarray, axis: int, taps: tuple[np.ndarray, np.ndarray, np.ndarray], sel: slice) -> np.ndarray:
    lo, hi, w = (t[sel] for t in taps)
    a = np.take(x, lo, axis=axis)
    b = np.take(x, hi, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return (np.float32(1) - w) * a + w * b


def _source_range(taps: tuple[np.ndarray, np.ndarray, np.ndarray], lo_src: int, hi_src: int) -> slice:
    """Output indices whose two source taps touch [lo_src, hi_src] (inclusive)."""
    lo, hi, _ = taps
    idx = np.flatnonzero((hi >= lo_src) & (lo <= hi_src))
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def upsample_mask(logits: np.ndarray, height: int, width: int) -> tuple[np.ndarray, slice, slice]:
    """One mask's (256, 256) float32 logits -> (probability-thresholded) boolean crop and where it goes.

    Returns (on, rows, cols): ``on`` is a boolean array for ``labels[rows, cols]``; empty
    slices when no logit clears the threshold.
    """
    hot = np.argwhere(logits > _LOGIT_BOUND - 1e-3)
    if hot.size == 0:
        return np.zeros((0, 0), dtype=bool), slice(0, 0), slice(0, 0)
    (r0, c0), (r1, c1) = hot.min(0), hot.max(0)
    t1 = bilinear_taps(LOWRES, MODEL_SIZE)
    ty, tx = bilinear_taps(MODEL_SIZE, height), bilinear_taps(MODEL_SIZE, width)
    # stage-1 rows/cols needed, then the final rows/cols that depend on them
    s1r = _source_range(t1, r0, r1)
    s1c = _source_range(t1, c0, c1)
    rows = _source_range(ty, s1r.start, s1r.stop - 1)
    cols = _source_range(tx, s1c.start, s1c.stop - 1)
    if rows.stop <= rows.start or cols.stop <= cols.start:  # no output pixel samples the hot region
        return np.zeros((0, 0), dtype=bool), slice(0, 0), slice(0, 0)
    # stage-1 rows/cols that the final crop reads
    need_r = slice(int(ty[0][rows].min()), int(ty[1][rows].max()) + 1)
    need_c = slice(int(tx[0][cols].min()), int(tx[1][cols].max()) + 1)
    # width first, then height, as torch's kernel nests them
    up = _resample(_resample(logits, 1, t1, need_c), 0, t1, need_r)  # (len need_r, len need_c)
    shifted_y = tuple(t - need_r.start if i < 2 else t for i, t in enumerate(ty))
    shifted_x = tuple(t - need_c.start if i < 2 else t for i, t in enumerate(tx))
    full = _resample(_resample(up, 1, shifted_x, cols), 0, shifted_y, rows)
    prob = np.float32(1) / (np.float32(1) + np.exp(-full, dtype=np.float32))
    return prob > np.float32(MASK_THRESHOLD), rows, cols


def assemble_labels(lowres_logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Kept masks' low-res logits (N, 256, 256) float32 -> label map (H, W) int32.

    Mask k (0-based) gets label k + 1; a later mask overwrites an earlier one.
    """
    labels = np.zeros((height, width), dtype=np.int32)
    for k, logits in enumerate(np.asarray(lowres_logits, dtype=np.float32).reshape(-1, LOWRES, LOWRES)):
        on, rows, cols = upsample_mask(logits, height, width)
        if on.size:
            labels[rows, cols][on] = k + 1
    return labels


def fill_holes_and_remove_small_masks(labels: np.ndarray, min_size: int = 25) -> np.ndarray:
    """The official post-processing of a label map (H, W) int; returns a new int32 array."""
    masks = np.array(labels, dtype=np.int32, copy=True)
    j = 0
    for i, slc in enumerate(find_objects(masks)):
        if slc is None:
            continue
        msk = masks[slc] == (i + 1)
        npix = int(msk.sum())
        if min_size > 0 and npix < min_size:
            masks[slc][msk] = 0
        elif npix > 0:
            masks[slc][binary_fill_holes(msk)] = j + 1
            j += 1
    return masks
