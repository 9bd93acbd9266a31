"""Plain NumPy/SciPy post-processing: the semantics of the native extension, and its fallback.

``cellsam_trt.labels`` runs the C++ extension ``cellsam_trt._native`` (``cpp_ext/``) and falls
back on these functions, with a warning, where it is not built; the tests hold the two equal
(``tests/reference_postprocess.py`` re-exports this module for them and for
``benchmarks/bench_labels.py``). They give the same results as the native code, only slower
(on the tissuenet case of ``benchmarks/results/labels.json``, 17x slower label assembly and 49x
slower hole filling).

* ``assemble_labels``: each mask's (256, 256) logits are upsampled bilinearly
  (align_corners=False) to 1024 x 1024 and then to the original H x W in float32 (a width pass,
  then a height pass per stage, as PyTorch's kernel), on where the interpolated logit is
  ``>= LOGIT_THRESHOLD`` (= float32 sigmoid > 0.4 with a correctly rounded sigmoid), written in
  order so that a later mask wins an overlap. Each mask is computed only on the bounding
  rectangle of its hot low-res pixels (logit above the threshold logit minus 1e-3), plus what
  the interpolation reaches from there: bilinear interpolation is a convex combination, so no
  pixel outside can be on, and each value depends only on its own taps, so the values are those
  of the full-frame computation (``upsample_logits``).
* ``fill_holes_and_remove_small_masks`` / ``..._with_sources``: the official (cellpose) loop
  with SciPy; the second also returns, for each final label, the input label it was written for.
* ``link_labels_by_iou``: one-to-one matching of the labels of two label maps of the same
  region, greedy by descending IoU (compared exactly), ties by (label_a, label_b).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy.ndimage import binary_fill_holes, find_objects

LOWRES = 256
MODEL_SIZE = 1024
MASK_THRESHOLD = 0.4
# sigmoid(x) > 0.4  <=>  x > log(0.4 / 0.6) in real numbers
LOGIT_BOUND = math.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))


def _logit_threshold() -> float:
    """The smallest float32 x whose sigmoid, correctly rounded to float32, is > 0.4f (evaluated
    in float64, whose error is far below the float32 spacing here): the native LOGIT_THRESHOLD
    (-0.405465, 1e-7 above log(0.4 / 0.6)), computed the same way."""
    f32 = np.float32

    def on(x: np.float32) -> bool:
        return f32(1.0 / (1.0 + math.exp(-float(x)))) > f32(MASK_THRESHOLD)

    t = f32(math.log(2.0 / 3.0))
    while not on(t):
        t = np.nextafter(t, f32(1))
    while on(np.nextafter(t, f32(-1))):
        t = np.nextafter(t, f32(-1))
    return float(t)


# the float32 logit threshold: a pixel is on iff its interpolated float32 logit is >= this
LOGIT_THRESHOLD = _logit_threshold()


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
    """One mask's (256, 256) float32 logits -> its thresholded boolean crop and where it goes.

    Returns (on, rows, cols): ``on`` is a boolean array for ``labels[rows, cols]``; empty
    slices when no logit comes near the threshold.
    """
    hot = np.argwhere(logits > np.float32(LOGIT_THRESHOLD) - np.float32(1e-3))
    if hot.size == 0 or height <= 0 or width <= 0:
        return np.zeros((0, 0), dtype=bool), slice(0, 0), slice(0, 0)
    (r0, c0), (r1, c1) = hot.min(0), hot.max(0)
    t1 = bilinear_taps(LOWRES, MODEL_SIZE)
    ty, tx = bilinear_taps(MODEL_SIZE, height), bilinear_taps(MODEL_SIZE, width)
    # stage-1 rows/cols that can be hot, then the final rows/cols that depend on them
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
    return full >= np.float32(LOGIT_THRESHOLD), rows, cols


def assemble_labels(lowres_logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Kept masks' low-res logits (N, 256, 256) float32 -> label map (H, W) int32.

    Mask k (0-based) gets label k + 1; a later mask overwrites an earlier one.
    """
    labels = np.zeros((int(height), int(width)), dtype=np.int32)
    for k, logits in enumerate(np.asarray(lowres_logits, dtype=np.float32).reshape(-1, LOWRES, LOWRES)):
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf logits: as the native code, off
            on, rows, cols = upsample_mask(logits, int(height), int(width))
        if on.size:
            labels[rows, cols][on] = k + 1
    return labels


def fill_holes_and_remove_small_masks_with_sources(
    labels: np.ndarray, min_size: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """The official post-processing of a label map (H, W) int (cellpose's loop), and where each
    final label came from.

    Returns (final int32 (H, W), sources int64 (K,)): sources[k - 1] is the input label that
    final label k was written for, as the loop goes: labels in increasing order, boxes from the
    input; a label with fewer than ``min_size`` pixels (counted when it is reached, after earlier
    labels' filling) is deleted, otherwise its holes are filled and the whole is written with the
    next sequential label, over whatever lies in the holes.
    """
    masks = np.array(labels, dtype=np.int32, copy=True)
    sources: list[int] = []
    if masks.size == 0:  # (find_objects fails on empty arrays)
        return masks, np.zeros(0, np.int64)
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
            sources.append(i + 1)
    return masks, np.array(sources, dtype=np.int64)


def fill_holes_and_remove_small_masks(labels: np.ndarray, min_size: int = 25) -> np.ndarray:
    """The official post-processing of a label map (H, W) int (cellpose's loop); returns int32."""
    return fill_holes_and_remove_small_masks_with_sources(labels, min_size)[0]


def link_labels_by_iou(a: np.ndarray, b: np.ndarray, min_iou: float) -> np.ndarray:
    """Two label maps of the same region -> int64 (M, 2) matched (label_a, label_b) pairs.

    IoU counted inside the region (values <= 0 are background); candidates are the overlapping
    pairs with IoU >= min_iou (evaluated in float64); greedy one-to-one matching by descending
    IoU (compared exactly), ties by (label_a, label_b) ascending; rows in the order matched.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError("link_labels_by_iou: a and b must have the same shape")
    fa = a.reshape(-1).astype(np.int32).astype(np.int64)  # the int32 maps of the native code
    fb = b.reshape(-1).astype(np.int32).astype(np.int64)
    la_all, area_a = np.unique(fa[fa > 0], return_counts=True)
    lb_all, area_b = np.unique(fb[fb > 0], return_counts=True)
    both = (fa > 0) & (fb > 0)
    # one int64 key per (label_a, label_b) pair: labels are < 2**31 (int32 maps)
    keys, inter = np.unique((fa[both] << 32) | fb[both], return_counts=True)
    if len(keys) == 0:
        return np.zeros((0, 2), np.int64)
    la, lb = keys >> 32, keys & 0xFFFFFFFF
    union = area_a[np.searchsorted(la_all, la)] + area_b[np.searchsorted(lb_all, lb)] - inter
    ok = inter.astype(np.float64) / union.astype(np.float64) >= float(min_iou)
    cands = sorted(
        zip(la[ok].tolist(), lb[ok].tolist(), inter[ok].tolist(), union[ok].tolist()),
        key=lambda c: (-Fraction(c[2], c[3]), c[0], c[1]),
    )
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for x, y, _, _ in cands:
        if x in used_a or y in used_b:
            continue
        used_a.add(x)
        used_b.add(y)
        out.append((x, y))
    return np.array(out, np.int64).reshape(-1, 2)
