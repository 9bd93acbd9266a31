"""Plain NumPy/SciPy (and PyTorch) references for the native post-processing.

These are the semantics ``cellsam_trt._native`` must keep (they were the runtime
implementation of ``cellsam_trt/labels.py`` before the native one replaced it); tests and
``benchmarks/bench_labels.py`` compare against them. Nothing in the package imports this.

* ``assemble_labels``: each mask's (256, 256) logits are upsampled bilinearly
  (align_corners=False) to 1024 x 1024 and then to the original H x W, thresholded at
  sigmoid > 0.4 (float32), and written in order so that a later mask wins an overlap. Each mask
  is computed only on the bounding rectangle of its hot low-res pixels (logit above the
  threshold logit minus 1e-3), plus what the interpolation reaches from there.
* ``fill_holes_and_remove_small_masks``: the official (cellpose) loop with SciPy.
* ``torch_assemble_labels``: the official per-mask PyTorch route (F.interpolate twice,
  sigmoid, threshold, max over masks), which also returns the interpolated logits.
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
LOGIT_BOUND = math.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))


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


def upsample_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """One mask's (256, 256) float32 logits -> interpolated float32 logits (H, W), every pixel."""
    t1 = bilinear_taps(LOWRES, MODEL_SIZE)
    up = _resample(_resample(np.asarray(logits, np.float32), 1, t1, slice(None)), 0, t1, slice(None))
    tx, ty = bilinear_taps(MODEL_SIZE, width), bilinear_taps(MODEL_SIZE, height)
    return _resample(_resample(up, 1, tx, slice(None)), 0, ty, slice(None))


def upsample_mask(logits: np.ndarray, height: int, width: int) -> tuple[np.ndarray, slice, slice]:
    """One mask's (256, 256) float32 logits -> (probability-thresholded) boolean crop and where it goes.

    Returns (on, rows, cols): ``on`` is a boolean array for ``labels[rows, cols]``; empty
    slices when no logit clears the threshold.
    """
    hot = np.argwhere(logits > LOGIT_BOUND - 1e-3)
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
    """The official post-processing of a label map (H, W) int (cellpose's loop); returns int32."""
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


def torch_assemble_labels(lowres: np.ndarray, height: int, width: int, chunk: int = 16, return_logits: bool = False):
    """The official per-mask route in PyTorch (CPU): F.interpolate to 1024 x 1024 and to
    (H, W), sigmoid > 0.4, label = the largest mask number that is on (a later mask wins).
    Returns labels int32 (H, W), and with ``return_logits`` also the interpolated logits
    float32 (N, H, W). Masks go through in chunks of ``chunk`` to bound the memory of the
    1024 x 1024 intermediate."""
    import torch
    import torch.nn.functional as F

    n = len(lowres)
    labels = torch.zeros((height, width), dtype=torch.int32)
    logits = np.empty((n, height, width), np.float32) if return_logits else None
    with torch.no_grad():
        for s in range(0, n, chunk):
            t = torch.from_numpy(np.ascontiguousarray(lowres[s:s + chunk], np.float32))[:, None]
            up = F.interpolate(t, (MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
            up = F.interpolate(up, (height, width), mode="bilinear", align_corners=False)[:, 0]
            if return_logits:
                logits[s:s + len(up)] = up.numpy()
            on = torch.sigmoid(up) > MASK_THRESHOLD
            num = torch.arange(s + 1, s + len(up) + 1, dtype=torch.int32)[:, None, None]
            labels = torch.maximum(labels, (on.to(torch.int32) * num).amax(0))
    return (labels.numpy(), logits) if return_logits else labels.numpy()
