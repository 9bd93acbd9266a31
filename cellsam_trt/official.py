"""The official package's optional pre- and post-processing steps, with their intended semantics.

What the official ``cellSAM`` (v1.2) offers around the model (``cellsam_pipeline``,
``segment_cellular_image``, ``cellSAM/utils.py``), step by step, NumPy / SciPy / scikit-image
only (no torch):

* ``minmax``: ``cellsam_pipeline``'s pre-normalisation, float32 min-max per channel.
* ``is_low_contrast`` / ``enhance_low_contrast``: the low-contrast test (CLAHE, then the median
  and spread of what it changed) and the enhancement it gates (CLAHE + gamma, and a lower
  CellFinder threshold in two branches).
* ``postprocess``: ``postprocess_predictions``, each mask cleaned and smoothed.
* ``remove_boundaries``: ``subtract_boundaries``, a one-pixel outline taken off the labels.
* ``median_size`` / ``gauge_tiled``: the cell-size gauge of ``cellsam_pipeline(gauge_cell_size=True)``.

Where the official code is defective the intended semantics are implemented instead (each
function says which); ``README.md`` ("Migrating from the official package") lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.exposure import adjust_gamma, equalize_adapthist

# --------------------------------------------------------------------------- pre-normalisation


def minmax(hwc: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W, 3) float32: each channel cast to float32 and rescaled to [0, 1] by
    its own minimum and maximum, in float32 (``cellsam_pipeline``'s ``normalize_image``).

    Channels are the last axis, as ``preprocess.to_three_channels`` lays them out (a 2-D image
    is one channel there). Intended semantics: the official loop rescales ``img[..., i]`` for
    i in 0..2, which on a 2-D image are columns 0-2, not the image. A constant channel becomes 0
    (the official code leaves its raw values, which CLAHE then refuses when above 1; the
    percentile clip + CLAHE that follows turns a constant channel into 0 either way).
    """
    x = np.asarray(hwc).astype(np.float32)
    out = np.zeros(x.shape, np.float32)
    for c in range(x.shape[-1]):
        ch = x[..., c]
        lo, hi = ch.min(), ch.max()
        if hi != lo:
            out[..., c] = (ch - lo) / (hi - lo)
    return out


# --------------------------------------------------------------------------- low contrast


@dataclass(frozen=True)
class ContrastRule:
    """The constants of the official ``enhance_low_contrast`` (its defaults).

    An image is low-contrast when ``lower < median change < upper``, where the change is
    |image - CLAHE(image, kernel 256)| over the pixels CLAHE changed; with a median change
    below ``std_threshold`` it must also have an empty nuclear channel. Enhancement: CLAHE
    (``clip``, ``kernel``) then gamma, with the branch values below; ``bbox_threshold`` is the
    CellFinder threshold the two high-change branches set.
    """

    lower: float = 0.05
    upper: float = 0.1
    clip: float = 0.01
    kernel: int = 256
    gamma: float = 2.0
    high_clip: float = 0.02
    high_kernel: int = 384
    high_gamma: float = 1.2
    very_high_clip: float = 0.05
    very_high_change: float = 0.065
    adjusted_clip: float = 0.01
    adjusted_std: tuple[float, float] = (0.035, 0.04)
    std_threshold: float = 0.05
    bbox_threshold: float = 0.15


@dataclass(frozen=True)
class Contrast:
    """The low-contrast test's result: low (bool), median_change and change_std (the median and
    standard deviation of |image - CLAHE(image)| over the changed pixels, intensity units of a
    [0, 1] image)."""

    low: bool
    median_change: float
    change_std: float


def is_low_contrast(image: np.ndarray, rule: ContrastRule = ContrastRule()) -> Contrast:
    """``image``: (H, W) or (H, W, 3) float in [0, 1] (a 3-channel image is treated as RGB by
    CLAHE, as in the official code) -> ``Contrast`` (``utils.is_low_contrast_clahe`` with the
    thresholds ``enhance_low_contrast`` passes). An image that CLAHE leaves unchanged is not
    low-contrast (the official code takes the median of nothing there)."""
    image = np.asarray(image)
    diff = np.abs(image - equalize_adapthist(image, kernel_size=256))
    diff = diff[diff > 0]
    if diff.size == 0:
        return Contrast(False, 0.0, 0.0)
    median, std = float(np.median(diff)), float(np.std(diff))
    return Contrast(bool(rule.lower < median < rule.upper), median, std)


def enhance_low_contrast(
    image: np.ndarray, rule: ContrastRule = ContrastRule()
) -> tuple[np.ndarray, float | None, Contrast]:
    """``utils.enhance_low_contrast``: CLAHE + gamma on a low-contrast image.

    image: (H, W) or (H, W, 3) float in [0, 1] (``minmax`` output; a 3-channel image in the
    official (blank, nuclear, whole-cell) layout is treated as RGB by CLAHE).
    -> (image: unchanged when not low-contrast, else enhanced, in [0, 1], float32 for a
    float32 image and float64 otherwise (scikit-image's rule); the CellFinder
    threshold the chosen branch sets (``rule.bbox_threshold``) or None to keep the caller's;
    the ``Contrast`` measured).

    Intended semantics: two official branches assign ``model.bbox_threshold`` where no
    ``model`` exists (NameError); here the threshold is returned for the caller to use. The
    empty-nuclear-channel condition reads channel 1 of a 3-channel image (the official code
    reads ``img[..., 1]``, which on a 2-D image is column 1); a 2-D image has no nuclear channel.
    """
    c = is_low_contrast(image, rule)
    low = c.low
    if c.median_change < rule.std_threshold:
        low = low and (image.ndim == 2 or float(np.max(image[..., 1])) == 0.0)
    if not low:
        return image, None, c
    clip, kernel, gamma, threshold = rule.clip, rule.kernel, rule.gamma, None
    if c.median_change > rule.lower and c.change_std < rule.std_threshold:
        clip, kernel, gamma, threshold = rule.high_clip, rule.high_kernel, rule.high_gamma, rule.bbox_threshold
    if c.median_change > rule.very_high_change and c.change_std < rule.std_threshold:
        clip, threshold = rule.very_high_clip, rule.bbox_threshold
    if c.median_change > rule.very_high_change and rule.adjusted_std[0] < c.change_std < rule.adjusted_std[1]:
        clip = rule.adjusted_clip
    out = adjust_gamma(equalize_adapthist(image, kernel_size=kernel, clip_limit=clip), gamma=gamma)
    return out, threshold, c


def prenormalize(hwc: np.ndarray, channels: int, enhance: bool) -> tuple[np.ndarray, float | None]:
    """``cellsam_pipeline``'s steps before ``segment_cellular_image``: ``minmax`` and, with
    ``enhance``, ``enhance_low_contrast``.

    hwc: (H, W, 3) from ``preprocess.to_three_channels``; channels: how many input channels it
    holds (1: a grey image, in slot 2, enhanced as one (H, W) plane as the official code
    enhances a 2-D image; 2 or 3: the three slots enhanced as RGB).
    -> ((H, W, 3) float64 in [0, 1], the CellFinder threshold enhancement set or None).
    """
    x = minmax(hwc)
    if not enhance:
        return x.astype(np.float64), None
    out = x.astype(np.float64)
    if channels == 1:
        plane, threshold, _ = enhance_low_contrast(x[..., 2])
        out[..., 2] = plane
    else:
        full, threshold, _ = enhance_low_contrast(x)
        out[:] = full
    return out, threshold


# --------------------------------------------------------------------------- post-processing

_SMALL = 20  # holes and islands under this many pixels (``remove_small_regions(mask, 20, ...)``)
_SMOOTH = 10  # radius of the closing that smooths each mask
_SIGMA = 3.0  # Gaussian blur of each mask, thresholded at 0.5
_EIGHT = np.ones((3, 3), bool)


def _remove_small_regions(mask: np.ndarray, holes: bool) -> np.ndarray:
    """segment_anything's ``remove_small_regions(mask, 20, "holes" | "islands")``: holes
    (8-connected background regions, touching the border or not) under 20 pixels filled, or
    islands under 20 pixels removed (the largest kept when all are small)."""
    regions, n = ndimage.label(~mask if holes else mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = sizes < _SMALL
    if not small.any():
        return mask
    if holes:
        return mask | np.isin(regions, np.flatnonzero(small) + 1)
    keep = np.flatnonzero(~small) + 1
    if len(keep) == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, keep)


_DISK2 = np.add.outer(np.arange(-2, 3) ** 2, np.arange(-2, 3) ** 2) <= 4  # skimage.morphology.disk(2)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by ``skimage.morphology.disk(radius)`` (radius 2 or more; pixels outside
    the image unset, as in scikit-image's binary morphology). Radius 2 with the footprint;
    larger radii by the exact Euclidean distance transform (a pixel is set when a mask pixel
    lies within ``radius``), much faster than a footprint of radius 10."""
    if radius == 2:
        return ndimage.binary_dilation(mask, _DISK2)
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by ``disk(radius)`` (pixels outside the image count as set, as in
    scikit-image's binary morphology): a pixel stays when no unset pixel lies within ``radius``."""
    if radius == 2:
        return ndimage.binary_erosion(mask, _DISK2, border_value=1)
    if mask.all():
        return mask.copy()
    return ndimage.distance_transform_edt(mask) > radius


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """One mask through ``postprocess_predictions``' steps (bool in, bool out)."""
    mask = _remove_small_regions(mask, holes=True)
    mask = _remove_small_regions(mask, holes=False)
    mask = _dilate(_erode(mask, 2), 2)  # opening
    mask = _erode(_dilate(mask, 2), 2)  # closing
    mask = _erode(_dilate(mask, _SMOOTH), _SMOOTH)
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma=_SIGMA) > 0.5


# A cleaned mask stays inside its bounding box (opening and closing by a disk stay inside the
# convex hull); the radius-10 closing reads 20 pixels beyond it, the blur 12 and the small-region
# test needs a background ring of 20 pixels: a mask cleaned in its bounding box grown by this
# margin equals one cleaned in the whole image
_MARGIN = 24


def postprocess(labels: np.ndarray) -> np.ndarray:
    """``model.postprocess_predictions``, intended semantics: each label's mask on its own has
    holes and islands under 20 pixels removed, is opened and closed with a disk of radius 2,
    closed with a disk of radius 10, blurred (Gaussian, sigma 3) and thresholded at 0.5; the
    masks are combined by maximum (a higher label wins an overlap).

    labels: (H, W) integer label map (0 = background) -> (H, W) of the same dtype. The official
    code rebinds the radius-2 disk to radius 10 inside its loop, so only the first mask is
    opened / closed with radius 2; here every mask is. Each mask is processed in its bounding
    box grown by a margin that every step's reach fits in, which gives the whole-image result.
    """
    labels = np.asarray(labels)
    out = np.zeros_like(labels)
    h, w = labels.shape
    for value, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - _MARGIN, 0), min(sl[0].stop + _MARGIN, h)
        x0, x1 = max(sl[1].start - _MARGIN, 0), min(sl[1].stop + _MARGIN, w)
        cleaned = _clean_mask(labels[y0:y1, x0:x1] == value)
        window = out[y0:y1, x0:x1]
        np.maximum(window, np.where(cleaned, labels.dtype.type(value), 0), out=window)
    return out


def remove_boundaries(labels: np.ndarray) -> np.ndarray:
    """``utils.subtract_boundaries``: (H, W) integer labels -> the same with the official
    one-pixel outline set to 0: a pixel whose left neighbour has another label, and a pixel
    whose lower neighbour has another label (so a cell loses its left and bottom edge pixels,
    and one side of every contact with another cell)."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return np.where(edge, labels.dtype.type(0), labels)


# --------------------------------------------------------------------------- cell-size gauge

GAUGE_THRESHOLD = 0.002  # median cell area / image area under which the official gauge tiles


def median_size(labels: np.ndarray) -> tuple[float, np.ndarray]:
    """``utils.get_median_size``: (H, W) integer labels -> (median cell area as a fraction of
    the image area (NaN without cells), (K,) int64 areas in pixels of the labels present, in
    increasing label order)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel().astype(np.int64))[1:] if labels.size else np.zeros(0, np.int64)
    sizes = counts[counts > 0].astype(np.int64)
    frac = float(np.median(sizes / labels.size)) if len(sizes) else float("nan")
    return frac, sizes


def gauge_tiled(labels: np.ndarray) -> bool:
    """The official gauge's switch: tiles when the median cell is under 0.2 % of the image
    (``GAUGE_THRESHOLD``); no cells (median NaN) -> False (whole image), as the official
    comparison with NaN gives."""
    frac, _ = median_size(labels)
    return bool(frac < GAUGE_THRESHOLD)
