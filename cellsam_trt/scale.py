"""Cell scale: measure the median cell diameter, then show CellSAM the image at the scale
where it segments best (``CellSAM.segment(image, scale="auto")``, ``cellsam-trt run --scale auto``).

The official pipeline squashes every image to the 1024 x 1024 model frame, so a cell of d
pixels in an H x W image becomes ``d * 1024 / sqrt(H * W)`` model pixels (the *model-frame
diameter*): cells of a large image vanish, cells of a small one fill the frame. Its optional
gauge (``use_cellsize_gaging``) is a two-way switch: a first tiled segmentation, then tiles of
400 pixels again when the median cell area is below 0.002 of the image (a model-frame diameter
of 51.7 px in the whole-image squash), else the whole image.

Here a cheap first pass measures the median cell diameter d (input pixels) and ``plan_scale``
applies ``ScaleRule``:

* ``lo <= d_model <= hi`` (32-128 model px): the image is left to the official squash;
* otherwise the image is resampled by ``s = target / d`` model-frame pixels per input pixel
  (``target`` = 64, ``s`` clipped to [1/16, 16]): when the resampled image fits in the model
  frame it is placed at the top left of the 1024 x 1024 frame (mode "frame": normalised at
  the input resolution, resampled, zero-padded; the labels come back by nearest-neighbour
  resampling of the frame's label map to the input size); when it does not, it is segmented
  in the tiled mode of ``cellsam_trt.slide`` with tiles of ``1024 / s`` input pixels, each
  squashed to the model frame (mode "tiled"; an axis shorter than one tile is reflect-padded
  to a tile and cropped again).

Estimators of the median diameter (pluggable, ``estimator=``): "model" (default) and "log" (no model):
scale-normalised Laplacian-of-Gaussian maxima on a block-mean pyramid (``estimate_diameter``);
"model" (the default): the official-style gauge, the median mask area of a first whole-image segmentation
(``gauge_diameter``), used when that pass finds at least ``ScaleRule.min_cells`` cells (then,
when the scale is already right, the first pass is the result; otherwise the "log" estimate
decides and the plan says so); "boxes": the median side of the box prompts.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from . import pipeline as P
from . import preprocess as pre

MODEL_SIZE = pre.MODEL_SIZE
ESTIMATORS = ("log", "model", "boxes")
_SQRT2 = math.sqrt(2.0)
K_NOISE = 5.0
REL_RESPONSE = 0.5
RESPONSE_QUANTILE = 0.9


@dataclass(frozen=True)
class ScaleRule:
    """Where CellSAM segments best and how to get cells there (units: model-frame pixels, the
    1024 x 1024 frame the networks see).

    lo, hi: the range of median cell diameters left alone. lo = 32 (two ViT-B patches of 16
      px, just below the official sample images' medians under the trained model; README,
      "Cell scale"); hi = 128 (the default tile overlap: cells up to it stay whole across
      tiles).
    target: the median diameter a resampled image is given (64: the geometric middle of the
      range, near the official gauge's switch at 51.7 px).
    min_scale, max_scale: bounds of the resampling factor (model px per input px).
    overlap: tile overlap in model-frame pixels in the tiled mode.
    min_cells: the "model" estimator's first pass must find at least this many cells.
    """

    lo: float = 32.0
    hi: float = 128.0
    target: float = 64.0
    min_scale: float = 1 / 16
    max_scale: float = 16.0
    overlap: int = 128
    min_cells: int = 5

    def __post_init__(self):
        if not (0 < self.lo <= self.target <= self.hi):
            raise ValueError(f"need 0 < lo <= target <= hi, got {self.lo}, {self.target}, {self.hi}")
        if not (0 < self.min_scale <= 1 <= self.max_scale):
            raise ValueError(f"need 0 < min_scale <= 1 <= max_scale, got {self.min_scale}, {self.max_scale}")


@dataclass(frozen=True)
class DiameterEstimate:
    """A median cell diameter in input pixels (None: no cell found), how many cells (or blobs)
    it rests on, and the estimator ("log", "model", "boxes")."""

    diameter: float | None
    cells: int
    method: str
    note: str = ""


@dataclass(frozen=True)
class ScalePlan:
    """How an image is shown to CellSAM.

    mode: "squash" (the official whole-image squash, nothing resampled), "frame" (resampled
      by ``scale`` and zero-padded into one model frame) or "tiled" (resampled by ``scale``
      through tiles of ``1024 / scale`` input pixels).
    scale: model-frame pixels per input pixel (None for "squash").
    shape: the input (H, W); working_shape: the resampled (h, w) (mode "frame"; None else).
    diameter: the median cell diameter in input pixels (None: not measured / none found);
    model_diameter: that diameter in the model frame under the plan (``scale * diameter``, or
    the squash's ``diameter * 1024 / sqrt(H W)``); estimate: the ``DiameterEstimate`` behind
    an automatic plan; reason: one sentence.
    """

    mode: str
    scale: float | None
    shape: tuple[int, int]
    working_shape: tuple[int, int] | None = None
    diameter: float | None = None
    model_diameter: float | None = None
    estimate: DiameterEstimate | None = field(default=None, repr=False)
    reason: str = ""

    def describe(self) -> dict:
        """JSON-ready summary (run_summary.json)."""
        out = {
            "mode": self.mode,
            "scale": self.scale,
            "shape": list(self.shape),
            "working_shape": None if self.working_shape is None else list(self.working_shape),
            "diameter_px": self.diameter,
            "model_diameter_px": self.model_diameter,
            "reason": self.reason,
        }
        if self.estimate is not None:
            out["estimator"] = self.estimate.method
            out["estimate_cells"] = self.estimate.cells
        return out


def parse_scale(value) -> str | float | None:
    """``scale=`` -> None, "auto" or a positive finite float; anything else is a ValueError
    with one line naming the value."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"scale must be 'auto' or a positive number, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"scale must be 'auto' or a positive number, not {value!r}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"scale must be 'auto' or a positive number, not {value!r}")
    return value


# --------------------------------------------------------------------------- estimators


def squash_scale(height: int, width: int) -> float:
    """Model-frame pixels per input pixel of the official squash (geometric mean of the axes)."""
    return MODEL_SIZE / math.sqrt(height * width)


def intensity_image(image: np.ndarray, channels: P.Channels | None = None, sample: int = 1 << 20) -> np.ndarray:
    """Image ((H, W) or 3-D with channels, any numeric dtype) -> (H, W) float32 in [0, 1] with
    cells bright: the channels the pipeline would use (``channels``), each clipped to its
    0.5-99.5th percentiles (from at most ``sample`` pixels) and averaged; inverted when the
    median lies in the upper half (bright background: brightfield)."""
    ch = channels or P.Channels()
    img, axis = pre.select_channels(P.validate_image(image), ch.axis, ch.nuclear, ch.wholecell)
    if img.ndim == 2:
        planes = [img]
    else:
        axis = int(np.argmin(img.shape)) if axis is None else axis % 3
        planes = list(np.moveaxis(img, axis, 0))
    out = np.zeros(planes[0].shape, np.float32)
    used = 0
    for plane in planes:
        x = np.asarray(plane, np.float32)
        step = max(1, int(math.sqrt(x.size / sample)))
        lo, hi = np.percentile(x[::step, ::step], [0.5, 99.5])
        if hi <= lo:
            continue  # a blank or constant channel
        out += np.clip((x - lo) / (hi - lo), 0, 1)
        used += 1
    if used:
        out /= used
    if np.median(out[:: max(1, out.shape[0] // 512), :: max(1, out.shape[1] // 512)]) > 0.5:
        out = 1 - out
    return out


def estimate_diameter(
    image: np.ndarray,
    channels: P.Channels | None = None,
    *,
    min_diameter: float = 4.0,
    max_diameter: float = 256.0,
    window: int = 256,
    per_octave: int = 4,
) -> DiameterEstimate:
    """The median cell diameter of ``image`` in input pixels, without a model.

    Scale-space blob detection on a pyramid: level k is a window of ``window * 2**k`` input
    pixels around the image centre (the whole image once it fits), block-averaged by 2**k, so
    every level costs about ``window**2`` pixels. At each level the scale-normalised
    Laplacian of Gaussian ``-s**2 LoG_s`` is taken at ``per_octave`` scales per octave
    (``scipy.ndimage.gaussian_laplace``) over the octave that level owns (diameters
    ``min_diameter * 2**k`` to twice that) plus one scale on either side; its maxima in space
    and scale (``skimage.feature.peak_local_max``) above 4 noise standard deviations (noise
    from the median absolute difference of neighbouring pixels) are blobs, those whose Hessian
    (``skimage.feature.hessian_matrix``) is not blob-like (ratio of principal curvatures under
    0.3: edges and ridges) are dropped. A blob's diameter is ``2 sqrt(2) s`` (a disc's
    response peaks at s = r / sqrt(2)), refined by a parabola through the neighbouring scales.
    The estimate is the area-weighted median diameter of the blobs with at least half the
    90th-percentile response, each blob weighted by d**2 / (area its level examined), so that
    every level counts per unit area and fine texture counts by the area it covers.
    -> ``DiameterEstimate`` (diameter None when no blob is found). Measured accuracy:
    ``benchmarks/bench_scale.py`` (README, "Cell scale").

    ``skimage.feature.blob_log`` is not used: it returns no responses and its pairwise overlap
    pruning runs in Python over every pair of nearby blobs (seconds per level on dense cells);
    the maxima search is the same.
    """
    gray = intensity_image(image, channels)
    d, r, w = scale_space_blobs(gray, min_diameter, max_diameter, window, per_octave)
    if not len(d):
        return DiameterEstimate(None, 0, "log", "no blob above the noise")
    keep = r >= REL_RESPONSE * _weighted_quantile(r, w, RESPONSE_QUANTILE)
    area = w[keep] * d[keep] ** 2  # area-weighted: fine texture counts by the area it covers
    return DiameterEstimate(float(_weighted_quantile(d[keep], area, 0.5)), int(keep.sum()), "log")


def scale_space_blobs(
    gray: np.ndarray, min_diameter: float, max_diameter: float, window: int, per_octave: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright blobs of a (H, W) float32 image in [0, 1] (see ``estimate_diameter``) ->
    (diameters in input pixels, scale-normalised LoG responses, weights 1 / area examined)."""
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals, peak_local_max
    from skimage.transform import downscale_local_mean

    h0, w0 = gray.shape
    noise = float(np.median(np.abs(np.diff(gray[:: max(1, h0 // 1024)], axis=1)))) / (0.6745 * _SQRT2)
    s0 = min_diameter / (2 * _SQRT2)
    step = 2.0 ** (1.0 / per_octave)
    sigmas = s0 * step ** np.arange(-1, per_octave + 1)  # one below, the owned octave, its end
    diam, resp, weight = [], [], []
    f = 1
    while min_diameter * f <= max_diameter and min(h0, w0) >= 8 * f:
        ch, cw = min(h0, window * f) // f * f, min(w0, window * f) // f * f
        y0, x0 = (h0 - ch) // 2, (w0 - cw) // 2
        sub = gray[y0 : y0 + ch, x0 : x0 + cw]
        sub = downscale_local_mean(sub, (f, f)).astype(np.float32) if f > 1 else sub
        cube = np.stack([-(s * s) * ndi.gaussian_laplace(sub, s, mode="reflect") for s in sigmas], axis=-1)
        threshold = max(K_NOISE * noise / f / (math.sqrt(math.pi) * sigmas[1]), 0.02)
        peaks = peak_local_max(cube, threshold_abs=threshold, exclude_border=False, footprint=np.ones((3, 3, 3)))
        peaks = peaks[(peaks[:, 2] >= 1) & (peaks[:, 2] <= per_octave)]  # interior scales only
        if len(peaks):
            blob = np.zeros(len(peaks), bool)
            for j in np.unique(peaks[:, 2]):
                m = peaks[:, 2] == j
                ev = hessian_matrix_eigvals(hessian_matrix(sub, sigmas[j], order="rc", use_gaussian_derivatives=True))
                big, small = ev[0][peaks[m, 0], peaks[m, 1]], ev[1][peaks[m, 0], peaks[m, 1]]
                blob[m] = (big < 0) & (big / np.minimum(small, -1e-12) >= 0.3)  # both curvatures negative
            peaks = peaks[blob]
        if len(peaks):
            y, x, j = peaks[:, 0], peaks[:, 1], peaks[:, 2]
            r0, r1, r2 = cube[y, x, j - 1], cube[y, x, j], cube[y, x, j + 1]
            curv = r0 - 2 * r1 + r2
            off = np.clip(np.where(curv < 0, 0.5 * (r0 - r2) / np.where(curv < 0, curv, -1.0), 0.0), -0.5, 0.5)
            diam.append(2 * _SQRT2 * sigmas[j] * step**off * f)
            resp.append(r1)
            weight.append(np.full(len(peaks), 1.0 / (ch * cw)))
        f *= 2
    if not diam:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(diam), np.concatenate(resp), np.concatenate(weight)


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    order = np.argsort(x, kind="stable")
    cw = np.cumsum(w[order])
    return float(x[order][min(int(np.searchsorted(cw, q * cw[-1])), len(x) - 1)])


def gauge_diameter(labels: np.ndarray) -> DiameterEstimate:
    """The official gauge as a diameter: the median label area of a label map (H, W) int
    (``utils.get_median_size`` divides it by H * W) -> equivalent diameter sqrt(4 A / pi) in
    pixels of the label map."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel().astype(np.int64))[1:] if labels.size else np.zeros(0)
    areas = areas[areas > 0]
    if not len(areas):
        return DiameterEstimate(None, 0, "model", "the first pass found no cells")
    return DiameterEstimate(float(math.sqrt(4 * float(np.median(areas)) / math.pi)), len(areas), "model")


def boxes_diameter(boxes) -> DiameterEstimate:
    """The median geometric-mean side sqrt(w h) of (N, 4) XYXY boxes, in their pixels."""
    b = P.box_prompts(boxes)
    side = np.sqrt(np.abs(b[:, 2] - b[:, 0]) * np.abs(b[:, 3] - b[:, 1]))
    side = side[side > 0]
    if not len(side):
        return DiameterEstimate(None, 0, "boxes", "no box with an area")
    return DiameterEstimate(float(np.median(side)), len(side), "boxes")


# --------------------------------------------------------------------------- the rule


def plan_fixed(height: int, width: int, scale: float, rule: ScaleRule | None = None, **extra) -> ScalePlan:
    """The plan for a given ``scale`` (model px per input px): one padded frame when the
    resampled image fits in it, else tiles."""
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    d = extra.pop("diameter", None)
    common = dict(diameter=d, model_diameter=None if d is None else d * scale, **extra)
    if h <= MODEL_SIZE and w <= MODEL_SIZE:
        return ScalePlan("frame", float(scale), (height, width), (h, w), **common)
    return ScalePlan("tiled", float(scale), (height, width), None, **common)


def plan_scale(height: int, width: int, estimate: DiameterEstimate | float | None, rule: ScaleRule | None = None):
    """The rule (module docstring): median diameter ``estimate`` (input px) of an H x W image
    -> ``ScalePlan``."""
    rule = rule or ScaleRule()
    est = estimate if isinstance(estimate, DiameterEstimate) or estimate is None else None
    d = est.diameter if est is not None else (None if estimate is None else float(estimate))
    squash = squash_scale(height, width)
    if d is None:
        why = "no cell size measured" + (f" ({est.note})" if est is not None and est.note else "")
        return ScalePlan("squash", None, (height, width), estimate=est, reason=f"{why}: the official squash")
    dm = d * squash
    if rule.lo <= dm <= rule.hi:
        return ScalePlan(
            "squash",
            None,
            (height, width),
            diameter=d,
            model_diameter=dm,
            estimate=est,
            reason=f"cells of {dm:.0f} model px under the squash are within [{rule.lo:g}, {rule.hi:g}]",
        )
    s = min(max(rule.target / d, rule.min_scale), rule.max_scale)
    why = "small" if dm < rule.lo else "large"
    return plan_fixed(
        height,
        width,
        s,
        rule,
        diameter=d,
        estimate=est,
        reason=f"cells of {dm:.0f} model px under the squash are too {why}: resampled by {s:.3g} "
        f"to {d * s:.0f} model px",
    )


def tile_scale(estimate: DiameterEstimate, rule: ScaleRule | None = None) -> float:
    """``TileSettings.scale`` for tiles of 1024 model px from a diameter in input pixels: 1 (the
    model sees the slide at native resolution) when ``lo <= d <= hi``, else ``target / d``."""
    rule = rule or ScaleRule()
    d = estimate.diameter
    if d is None or rule.lo <= d <= rule.hi:
        return 1.0
    return min(max(rule.target / d, rule.min_scale), rule.max_scale)


# --------------------------------------------------------------------------- segmenting


def segment(
    model,
    image: np.ndarray,
    prompts: P.Prompts | None,
    settings: P.SegmentSettings,
    scale,
    estimator: str = "model",
    rule: ScaleRule | None = None,
) -> P.Segmentation:
    """Segment ``image`` with ``model`` (a ``CellSAM``: its backend, and ``segment_many`` for
    tiles) at ``scale``: "auto" (measured by ``estimator``, then ``plan_scale``) or model px
    per input px (``plan_fixed``). Prompts in input pixels. -> ``Segmentation`` at the input
    size, ``details.scale`` = the ``ScalePlan``; boxes in input pixels. In the tiled mode the
    result carries the label map only (no per-mask boxes, scores or IoU predictions)."""
    scale = parse_scale(scale)
    if estimator not in ESTIMATORS:
        raise ValueError(f"scale estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
    rule = rule or ScaleRule()
    prompts = prompts or P.Prompts()
    image = P.validate_image(image)
    h, w = _spatial_shape(image, settings.channels)
    if scale is None:
        return P.segment(model.backend, image, prompts, settings)
    if scale != "auto":
        return segment_planned(model, image, prompts, settings, plan_fixed(h, w, scale, rule, reason="scale given"))
    first = None
    if estimator == "boxes":
        if prompts.boxes is None:
            raise ValueError("scale estimator 'boxes' needs box prompts")
        est = boxes_diameter(prompts.boxes)
    elif estimator == "model":
        first = P.segment(model.backend, image, prompts, settings)
        est = gauge_diameter(first.labels)
        if est.cells < rule.min_cells:
            log_est = estimate_diameter(image, settings.channels)
            est = replace(log_est, note=f"the model's first pass found {est.cells} cells; the log estimate decides")
    else:
        est = estimate_diameter(image, settings.channels)
    plan = plan_scale(h, w, est, rule)
    if plan.mode == "squash" and first is not None:
        first.details.scale = plan  # the first pass is the answer: no second run
        return first
    return segment_planned(model, image, prompts, settings, plan, rule)


def _spatial_shape(image: np.ndarray, channels: P.Channels) -> tuple[int, int]:
    if image.ndim == 2:
        return image.shape
    if channels.nuclear is not None or channels.wholecell is not None or channels.axis is not None:
        axis = (int(np.argmin(image.shape)) if channels.axis is None else channels.axis) % 3
    else:
        axis = int(np.argmin(image.shape))
    return tuple(n for i, n in enumerate(image.shape) if i != axis)


def segment_planned(
    model, image, prompts: P.Prompts, settings: P.SegmentSettings, plan: ScalePlan, rule: ScaleRule | None = None
) -> P.Segmentation:
    """Run ``plan`` (see ``segment``)."""
    if plan.mode == "squash":
        seg = P.segment(model.backend, image, prompts, settings)
    elif plan.mode == "frame":
        seg = _segment_frame(model.backend, image, prompts, settings, plan)
    else:
        seg = _segment_tiled(model, image, prompts, settings, plan, rule or ScaleRule())
    seg.details.scale = plan
    return seg


def _fit_user_prompts(prompts: P.Prompts, height: int, width: int):
    boxes, pts, lab, index, dropped = P.fit_prompts(prompts, height, width)
    if len(dropped):
        warnings.warn(
            P.PromptWarning(
                f"{len(dropped)} of {len(dropped) + (len(boxes) if boxes is not None else len(pts))} prompts lie "
                f"outside the {height} x {width} image and were dropped (prompts {dropped[:10].tolist()}"
                f"{' ...' if len(dropped) > 10 else ''})"
            ),
            stacklevel=3,
        )
    return boxes, pts, lab, index, dropped


def nearest_resize(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) label map -> (height, width), nearest neighbour (pixel centres mapped)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _segment_frame(backend, image, prompts: P.Prompts, settings: P.SegmentSettings, plan: ScalePlan):
    """Mode "frame": normalise at the input resolution (``pipeline.normalized``), resample to
    ``plan.working_shape``, zero-pad into the 1024 x 1024 frame, segment the frame, crop,
    resample the raw labels to the input size (nearest), then ``pipeline.finish`` there."""
    norm, threshold = P.normalized(image, settings)
    H, W = norm.shape[:2]
    h, w = plan.working_shape
    # the squash's own kernel (torch's antialiased bilinear), width first: at the squash's scale
    # the frame is the squashed image exactly
    chw = np.ascontiguousarray(norm.transpose(2, 0, 1), dtype=np.float32)
    frame = np.zeros((3, MODEL_SIZE, MODEL_SIZE), np.float32)
    frame[:, :h, :w] = pre._resample_axis(pre._resample_axis(chw, 2, w), 1, h)
    prepared = P.Prepared(frame, MODEL_SIZE, MODEL_SIZE, threshold)
    sy, sx = h / H, w / W
    if prompts.automatic:
        ps = P.find_prompts(backend, prepared, None, settings)
    else:
        boxes, pts, lab, index, dropped = _fit_user_prompts(prompts, H, W)
        fb = None if boxes is None else boxes * np.array([sx, sy, sx, sy], np.float32)
        fp = None if pts is None else pts * np.array([sx, sy], np.float32)
        ps = P.find_prompts(backend, prepared, P.Prompts(fb, fp, lab), settings)
        ps.index, ps.dropped = index, dropped
    at_input = P.Prepared(frame, H, W, threshold)
    if ps is None:
        return P.empty(at_input)
    embedding = P.embed(backend, prepared)
    if ps.n == 0 or embedding is None:
        return P.empty(at_input, ps)
    keep, iou, raw_frame = P.decode_and_assemble(backend, embedding, ps, prepared, settings)
    raw = nearest_resize(raw_frame[:h, :w], H, W)
    # finish maps frame boxes to pixels by (width, height) / 1024: the frame spans 1024 / s pixels
    return P.finish(P.Prepared(frame, MODEL_SIZE / sy, MODEL_SIZE / sx, threshold), ps, keep, iou, raw, settings)


class _TileEngine:
    """``segment_many`` of a ``CellSAM`` with the channel choice fixed (tiles are channel-last)."""

    def __init__(self, model, channels: P.Channels) -> None:
        self.model, self.channels = model, channels

    def segment_many(self, sources, prompts=None, channels=None, max_in_flight=None):
        return self.model.segment_many(sources, prompts, channels=self.channels, max_in_flight=max_in_flight)


def _segment_tiled(model, image, prompts: P.Prompts, settings: P.SegmentSettings, plan: ScalePlan, rule: ScaleRule):
    """Mode "tiled": ``slide.run.segment_slide`` over the in-memory image with tiles of
    ``1024 / scale`` input pixels (a temporary tile store and label file), the labels read
    back at the input size."""
    missing = [m for m in ("zarr",) if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"scale {plan.scale:.3g} makes the image larger than the model frame; the tiled mode needs "
            f"{', '.join(missing)}: pip install 'cellsam-trt[slide]'"
        )
    from skimage.segmentation import relabel_sequential

    from .slide.grid import TileGrid, TileSettings
    from .slide.io import SlideSource, read_labels
    from .slide.run import SlideOutput, segment_slide

    ch = settings.channels
    img, axis = pre.select_channels(image, ch.axis, ch.nuclear, ch.wholecell)
    if img.ndim == 3:
        img = np.moveaxis(img, int(np.argmin(img.shape)) if axis is None else axis, -1)
        if img.shape[-1] > 3:
            pre.to_three_channels(img[:2, :2], -1)  # raises the pipeline's error for > 3 channels
    H, W = img.shape[:2]
    tiles = TileSettings(tile_size=MODEL_SIZE, overlap=min(rule.overlap, MODEL_SIZE - 1), scale=plan.scale)
    tile = TileGrid(1, 1, tiles).tile
    pad = ((0, max(0, tile - H)), (0, max(0, tile - W))) + (((0, 0),) if img.ndim == 3 else ())
    padded = np.pad(img, pad, mode="reflect") if any(p[1] for p in pad) else img
    boxes = pts = lab = None
    dropped = np.zeros(0, np.int64)
    if not prompts.automatic:
        boxes, pts, lab, _, dropped = _fit_user_prompts(prompts, H, W)
    engine = _TileEngine(model, P.Channels(axis=-1) if img.ndim == 3 else P.Channels())
    with tempfile.TemporaryDirectory(prefix="cellsam-scale-") as tmp:
        dest = Path(tmp) / "labels.ome.tif"
        source = SlideSource(array=padded, axes="YXC" if img.ndim == 3 else "YX")
        res = segment_slide(
            source, engine, SlideOutput(dest, fmt="bigtiff"), tiles, boxes=boxes, points=pts, point_labels=lab
        )
        if res.failed:
            raise RuntimeError(f"{len(res.failed)} of {res.grid['tiles']} tiles failed; the first: {res.failed[0][2]}")
        labels = read_labels(dest)[:H, :W]
    for i, why in res.unrouted:
        warnings.warn(P.PromptWarning(f"prompt {i} not segmented: {why}"), stacklevel=3)
    labels, _, _ = relabel_sequential(labels.astype(np.int32))
    n = int(labels.max(initial=0))
    return P.Segmentation(
        labels=labels,
        boxes=np.zeros((0, 4), np.float32),
        scores=None,
        iou_predictions=np.zeros(0, np.float32),
        details=P.Details(
            labels_raw=labels,
            label_sources=np.arange(1, n + 1, dtype=np.int64),
            prompt_index=np.zeros(0, np.int64),
            dropped_prompts=dropped,
        ),
    )


# --------------------------------------------------------------------------- synthetic cells


def synthetic_cells(
    diameter: float,
    shape: tuple[int, int],
    seed: int = 0,
    *,
    density: float = 0.3,
    noise: float = 0.1,
    blur: float = 1.0,
    spread: float = 0.15,
    max_aspect: float = 1.6,
    dark_cells: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Cells of known size, for tests and ``benchmarks/bench_scale.py``.

    Ellipses (aspect 1 to ``max_aspect``, random orientation) of equivalent diameter
    ``diameter * exp(N(0, spread))`` pixels, placed at random without overlapping (touching
    allowed) until ``density`` of the (H, W) ``shape`` is covered (or no room is left), each
    of intensity U(0.5, 1) on a background of 0.1, Gaussian-blurred by ``blur`` px, with
    Gaussian noise of standard deviation ``noise``; ``dark_cells`` inverts the contrast
    (brightfield-like). -> (image (H, W) float32, labels (H, W) int32).
    """
    rng = np.random.default_rng(seed)
    H, W = shape
    labels = np.zeros(shape, np.int32)
    image = np.zeros(shape, np.float64)
    # a grid of cells of the largest radius answers "is this spot free" in constant time
    cell = max(4.0, diameter * math.exp(3 * spread) * math.sqrt(max_aspect))
    grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    covered, n, fails = 0, 0, 0
    while covered < density * H * W and fails < 2000:
        d = diameter * math.exp(rng.normal(0, spread))
        ar = rng.uniform(1.0, max_aspect)
        a, b = d / 2 * math.sqrt(ar), d / 2 / math.sqrt(ar)
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        gy, gx = int(cy // cell), int(cx // cell)
        near = [c for dy in (-1, 0, 1) for dx in (-1, 0, 1) for c in grid.get((gy + dy, gx + dx), ())]
        if any((cy - y) ** 2 + (cx - x) ** 2 < (0.9 * (r + a)) ** 2 for y, x, r in near):
            fails += 1
            continue
        fails = 0
        th = rng.uniform(0, math.pi)
        R = int(math.ceil(a)) + 1
        y0, y1, x0, x1 = max(0, int(cy) - R), min(H, int(cy) + R + 1), max(0, int(cx) - R), min(W, int(cx) + R + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
        v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
        inside = ((u / a) ** 2 + (v / b) ** 2 <= 1) & (labels[y0:y1, x0:x1] == 0)
        if not inside.any():
            continue
        grid.setdefault((gy, gx), []).append((cy, cx, a))
        n += 1
        labels[y0:y1, x0:x1][inside] = n
        image[y0:y1, x0:x1][inside] = rng.uniform(0.5, 1.0)
        covered += int(inside.sum())
    image = ndi.gaussian_filter(image, blur) + 0.1 + rng.normal(0, noise, shape)
    if dark_cells:
        image = 1.2 - image
    return image.astype(np.float32), labels


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent diameter sqrt(4 A / pi) of the labels of a label map, in pixels."""
    d = gauge_diameter(labels).diameter
    return float("nan") if d is None else d
