"""The CellSAM pipeline's stages, once, as functions over any backend.

    prepare -> find_prompts -> embed -> decode -> assemble -> finish

``segment`` runs them in sequence for one image; the schedulers (``cellsam_trt.scheduler``) run
the same functions with images overlapped (CPU: threads; GPU: streams, label assembly on the
device). Defaults reproduce the official ``segment_cellular_image`` (PIPELINE.md) without its
defects: no detection or a blank image gives an all-zero label map instead of a crash.

Coordinates: prompts from the user are in original-image pixels (x = column, y = row); the
backend works in the 1024 x 1024 model frame (the image squashed to 1024 x 1024).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from . import labels as label_ops
from . import official
from . import preprocess as pre
from . import prompts as prompt_ops
from .engine.base import Backend

ASSEMBLY_CHUNK = 64  # prompts decoded and assembled at a time: (64, 256, 256) float32 logits, 16 MiB


@dataclass(frozen=True)
class Channels:
    """Which planes of a multi-channel image CellSAM sees.

    axis: channel axis of a 3-D image (None: the official rule, the smallest axis).
    nuclear / wholecell: indices along that axis of the nuclear and whole-cell channels; with
      neither, the image's channels (at most 3) fill the last of the three slots (blank,
      nuclear, whole-cell) as the official code does.
    """

    nuclear: int | None = None
    wholecell: int | None = None
    axis: int | None = None


@dataclass(frozen=True)
class SegmentSettings:
    """Thresholds of the official model (defaults) and input handling.

    bbox_threshold: CellFinder score threshold before the dynamic adjustment.
    iou_threshold: masks whose predicted IoU is below it are dropped.
    min_size: labels with fewer pixels (after hole filling) are removed.
    normalize: percentile clip + CLAHE (the official default).
    channels: ``Channels`` (channel axis, nuclear / whole-cell channel).

    The official package's optional steps (``cellsam_trt.official``, intended semantics), all
    off by default (``NORMALIZE_MODES`` names the normalisation combinations):
    minmax: ``cellsam_pipeline``'s pre-normalisation before ``normalize``: float32, each
      channel min-max rescaled to [0, 1].
    low_contrast_enhancement: after the min-max (implied), CLAHE + gamma on a low-contrast
      image, whose CellFinder threshold then becomes 0.15 in the two high-change branches.
    postprocess: each mask cleaned and smoothed (``postprocess_predictions``), before hole filling.
    remove_boundaries: a one-pixel outline taken off the final labels (``subtract_boundaries``).
    """

    bbox_threshold: float = 0.4
    iou_threshold: float = 0.5
    min_size: int = 25
    normalize: bool = True
    channels: Channels = Channels()
    minmax: bool = False
    low_contrast_enhancement: bool = False
    postprocess: bool = False
    remove_boundaries: bool = False


# normalisation modes by name -> (minmax, normalize): "official" = segment_cellular_image's
# default; "pipeline" = cellsam_pipeline's (min-max first); "minmax" = min-max only (what its
# cell-size gauge feeds the model); "none" = segment_cellular_image(normalize=False)
NORMALIZE_MODES = {
    "official": (False, True),
    "pipeline": (True, True),
    "minmax": (True, False),
    "none": (False, False),
}


@dataclass
class Prompts:
    """Prompts for one image, in original pixels (x = column): boxes (N, 4) XYXY, and/or points
    (N, P, 2) XY (one prompt of P points per row; a (P, 2) array is one prompt) with
    point_labels (N, P) (1 cell, 0 background, -1 padding; default all 1). None everywhere:
    automatic mode (CellFinder finds the cells)."""

    boxes: object = None
    points: object = None
    point_labels: object = None

    @property
    def automatic(self) -> bool:
        return self.boxes is None and self.points is None


@dataclass
class Details:
    """What a segmentation went through, for tests, tables and debugging.

    labels_raw: (H, W) int32 label map before hole filling / small-object removal (label k =
      k-th kept mask, 1-based).
    label_sources: (K,) int64, for each final label 1..K the raw label it came from.
    prompt_index: (M,) int64 position of each kept mask's prompt in the user's prompt list.
    threshold: the dynamic CellFinder threshold (automatic mode), else None.
    prompts_1024: (N, 4) float32 box prompts in the model frame (None for point prompts).
    all_iou_predictions: (N,) float32 IoU predictions of every prompt, kept or not.
    embedding: (1, 256, 64, 64) float32, when asked for.
    lowres_logits: (N, 256, 256) float32 of every prompt, when asked for (``keep_logits``).
    detections: raw CellFinder outputs (pred_logits, pred_boxes), when asked for.
    dropped_prompts: (D,) int64 positions of the user's prompts dropped as outside the image.
    scale: the ``scale.ScalePlan`` a ``scale=`` segmentation ran (None: the official squash).
    """

    labels_raw: np.ndarray
    label_sources: np.ndarray
    prompt_index: np.ndarray
    threshold: float | None = None
    prompts_1024: np.ndarray | None = None
    all_iou_predictions: np.ndarray | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    lowres_logits: np.ndarray | None = field(default=None, repr=False)
    detections: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    dropped_prompts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scale: object = None


@dataclass
class Segmentation:
    """The result for one image.

    labels: (H, W) int32 label map (0 = background, cells 1..K).
    boxes: (M, 4) float32 XYXY, original pixels, of the kept box prompts (empty for points).
    scores: (M,) float32 CellFinder scores of the kept masks (automatic mode), else None.
    iou_predictions: (M,) float32 IoU predicted by the mask decoder for the kept masks.
    details: ``Details`` (raw labels, which prompt made which cell, thresholds, tensors).
    """

    labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray | None
    iou_predictions: np.ndarray
    details: Details = field(repr=False)

    @property
    def n_cells(self) -> int:
        return int(len(np.unique(self.labels))) - int((self.labels == 0).any())


@dataclass
class Prepared:
    """One image after ``prepare``: the squashed model-frame image (3, 1024, 1024) float32 and
    the original height and width in pixels; bbox_threshold: this image's CellFinder threshold
    when a step set one (low-contrast enhancement), else None (the settings')."""

    squashed: np.ndarray
    height: int
    width: int
    bbox_threshold: float | None = None


@dataclass
class PromptSet:
    """The prompts of one image in the model frame (``find_prompts``).

    boxes (N, 4) float32 XYXY or None; points (N, P, 2) float32 XY or None with point_labels
    (N, P) int64; scores (N,) float32 CellFinder scores (automatic mode) or None; threshold:
    the dynamic threshold (automatic mode); detections: raw CellFinder outputs.
    """

    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    threshold: float | None = None
    detections: tuple[np.ndarray, np.ndarray] | None = None
    index: np.ndarray | None = None  # (N,) int64: each prompt's position in the user's list (None: 0..N-1)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # user prompts dropped

    def positions(self, keep: np.ndarray) -> np.ndarray:
        """Indices ``keep`` into this set -> positions in the user's prompt list."""
        return keep if self.index is None else self.index[keep]

    @property
    def n(self) -> int:
        return len(self.boxes) if self.boxes is not None else (0 if self.points is None else len(self.points))


# --------------------------------------------------------------------------- stages


def validate_image(image: np.ndarray) -> np.ndarray:
    """Reject what cannot be segmented, with the problem named (ValueError), before any cast.

    dtype: bool, integers and float16/32/64 (``preprocess.unsupported_dtype``: complex, object,
    strings, datetime ... are refused by name). Shape, as given (nothing squeezed): (H, W) or 3-D
    with channels, every image side at least ``preprocess.MIN_IMAGE_SIDE`` pixels (the channel
    axis of a 3-D image is checked by ``preprocess.to_three_channels``). Values: finite.
    """
    image = np.asarray(image)
    why = pre.unsupported_dtype(image.dtype)
    if why is not None:
        raise ValueError(f"image has {why}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.ndim not in (2, 3):
        hint = "; np.squeeze drops its axes of length 1" if image.ndim > 3 and 1 in image.shape else ""
        raise ValueError(
            f"expected a 2-D image (H, W) or a 3-D image with channels ((H, W, C) or (C, H, W)), got "
            f"{image.ndim}-D shape {image.shape}{hint}"
        )
    sides = image.shape if image.ndim == 2 else sorted(image.shape)[1:]  # the channel axis is at most the smallest
    if min(sides) < pre.MIN_IMAGE_SIDE:
        size = (
            f"{image.shape[0]} x {image.shape[1]} pixels"
            if image.ndim == 2
            else f"of shape {image.shape}, a side of {min(sides)} pixel"
        )
        raise ValueError(
            f"the image is {size}; the minimum image size is {pre.MIN_IMAGE_SIDE} x {pre.MIN_IMAGE_SIDE} pixels"
        )
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    return image


def prepare(image: np.ndarray, settings: SegmentSettings) -> Prepared:
    """Image ((H, W) or 3-D with channels, any numeric dtype) -> ``Prepared``: channels picked
    (``settings.channels``), optionally min-max rescaled and enhanced (``settings.minmax``,
    ``low_contrast_enhancement``), normalised (percentile clip + CLAHE), squashed to 1024 x 1024."""
    norm, threshold = normalized(image, settings)
    return Prepared(pre.squashed(norm), norm.shape[0], norm.shape[1], threshold)


def normalized(image: np.ndarray, settings: SegmentSettings) -> tuple[np.ndarray, float | None]:
    """``prepare`` before the squash: -> ((H, W, 3) float64 normalised image, the CellFinder
    threshold the low-contrast enhancement sets or None)."""
    ch = settings.channels
    image, axis = pre.select_channels(validate_image(image), ch.axis, ch.nuclear, ch.wholecell)
    hwc = pre.to_three_channels(image, axis)
    threshold = None
    if settings.minmax or settings.low_contrast_enhancement:
        n_channels = 1 if image.ndim == 2 else image.shape[int(np.argmin(image.shape)) if axis is None else axis]
        hwc, threshold = official.prenormalize(hwc, n_channels, settings.low_contrast_enhancement)
    return (pre.normalize_image(hwc) if settings.normalize else hwc), threshold


def detect(backend: Backend, squashed: np.ndarray, settings: SegmentSettings) -> PromptSet:
    """CellFinder on the squashed image -> its boxes above the dynamic threshold (model frame)."""
    logits, boxes = backend.detect(pre.cellfinder_input(squashed, backend.adv_mode))
    scores, _, boxes_1024 = prompt_ops.topk_detections(logits[0], boxes[0])
    threshold, _ = prompt_ops.dynamic_threshold(scores, settings.bbox_threshold)
    kept_scores, kept_boxes = prompt_ops.select_boxes(scores, boxes_1024, threshold)
    return PromptSet(boxes=kept_boxes, scores=kept_scores, threshold=threshold, detections=(logits, boxes))


def find_prompts(
    backend: Backend, prepared: Prepared, prompts: Prompts | None, settings: SegmentSettings
) -> PromptSet | None:
    """The image's prompts in the model frame: the user's, or CellFinder's in automatic mode.
    None in automatic mode on a blank image (nothing to detect).

    The user's prompts are fitted to the image first (``fit_prompts``): box corners ordered,
    boxes and points clipped to the image, prompts whose box has no area inside it dropped
    (``PromptSet.dropped``, with a ``PromptWarning``)."""
    p = prompts or Prompts()
    h, w = prepared.height, prepared.width
    if p.automatic:
        if not backend.has_detector:
            raise ValueError("this model has no CellFinder: give box or point prompts")
        if not np.any(prepared.squashed):
            return None
        if prepared.bbox_threshold is not None:
            settings = replace(settings, bbox_threshold=prepared.bbox_threshold)
        return detect(backend, prepared.squashed, settings)
    boxes, pts, lab, index, dropped = fit_prompts(p, h, w)
    out = PromptSet(index=index, dropped=dropped)
    if boxes is not None:
        out.boxes = prompt_ops.scale_boxes_to_model(boxes, h, w)
    if pts is not None:
        out.points, out.point_labels = prompt_ops.scale_points_to_model(pts, h, w), lab
    if len(dropped):
        warnings.warn(
            PromptWarning(
                f"{len(dropped)} of {len(dropped) + out.n} prompts lie outside the "
                f"{h} x {w} image and were dropped (prompts {dropped[:10].tolist()}"
                f"{' ...' if len(dropped) > 10 else ''})"
            ),
            stacklevel=2,
        )
    return out


def embed(backend: Backend, prepared: Prepared, on_device: bool = False):
    """SAM image embedding (1, 256, 64, 64) float32 (a device tensor with ``on_device`` on a
    device-resident backend), or None for an image that is blank after normalisation."""
    try:
        enc_in = pre.sam_encoder_input(prepared.squashed, backend.adv_mode)
    except pre.BlankImageError:
        return None
    if on_device:
        return backend.encode(enc_in, on_device=True)
    return backend.encode(enc_in)


def decode(backend: Backend, embedding, ps: PromptSet) -> tuple[np.ndarray, np.ndarray]:
    """All prompts of one image -> low-res logits (N, 256, 256) float32, IoU predictions (N,)."""
    return backend.decode(embedding, boxes=ps.boxes, points=ps.points, point_labels=ps.point_labels)


def decode_and_assemble(
    backend: Backend,
    embedding,
    ps: PromptSet,
    prepared: Prepared,
    settings: SegmentSettings,
    chunk: int = ASSEMBLY_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``decode``, ``kept`` and ``assemble`` streamed over chunks of at most ``chunk`` prompts, so
    that memory does not grow with the number of prompts: each chunk's kept masks are assembled
    and pasted over the label map so far (a later mask wins, as in one ``assemble`` of all).
    -> (kept indices (M,) int64, IoU predictions (N,) float32, raw label map (H, W) int32)."""
    labels_raw = np.zeros((prepared.height, prepared.width), np.int32)
    ious, keeps = [], []
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    done = offset = 0

    def flush() -> None:
        nonlocal done, offset
        lowres = np.concatenate([p[0] for p in pending])
        iou = np.concatenate([p[1] for p in pending])
        pending.clear()
        keep = kept(iou, settings)
        if len(keep):
            part = assemble(lowres[keep], prepared)
            np.copyto(labels_raw, part + np.int32(offset), where=part > 0)
        ious.append(iou)
        keeps.append(keep + done)
        done += len(iou)
        offset += len(keep)

    for lowres, iou in backend.decode_chunks(embedding, boxes=ps.boxes, points=ps.points, point_labels=ps.point_labels):
        pending.append((lowres, iou))
        if sum(len(p[1]) for p in pending) >= chunk:
            flush()
    if pending:
        flush()
    return (
        np.concatenate(keeps) if keeps else np.zeros(0, np.int64),
        np.concatenate(ious) if ious else np.zeros(0, np.float32),
        labels_raw,
    )


def kept(iou: np.ndarray, settings: SegmentSettings) -> np.ndarray:
    """(N,) IoU predictions -> int64 indices of the masks kept (IoU >= iou_threshold)."""
    return np.flatnonzero(np.asarray(iou) >= settings.iou_threshold).astype(np.int64)


def assemble(lowres_kept: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Kept masks' low-res logits (M, 256, 256) -> raw label map (H, W) int32, later mask wins."""
    return label_ops.assemble_labels(lowres_kept, prepared.height, prepared.width)


def finish(
    prepared: Prepared,
    ps: PromptSet,
    keep: np.ndarray,
    iou: np.ndarray,
    labels_raw: np.ndarray,
    settings: SegmentSettings,
    embedding=None,
    lowres=None,
    keep_logits: bool = False,
) -> Segmentation:
    """Hole filling and small-object removal (after ``settings.postprocess``, before
    ``settings.remove_boundaries``, as the official order), kept boxes back in original pixels
    -> result. ``Details.labels_raw`` stays the label map as assembled."""
    cleaned = official.postprocess(labels_raw) if settings.postprocess else labels_raw
    final, sources = label_ops.fill_holes_and_remove_small_masks_with_sources(cleaned, settings.min_size)
    if settings.remove_boundaries:
        final = official.remove_boundaries(final)
    h, w = prepared.height, prepared.width
    return Segmentation(
        labels=final,
        boxes=(
            prompt_ops.scale_boxes_to_image(ps.boxes[keep], h, w)
            if ps.boxes is not None
            else np.zeros((0, 4), np.float32)
        ),
        scores=None if ps.scores is None else ps.scores[keep],
        iou_predictions=np.asarray(iou)[keep],
        details=Details(
            labels_raw=labels_raw,
            label_sources=sources,
            prompt_index=ps.positions(keep),
            threshold=ps.threshold,
            dropped_prompts=ps.dropped,
            prompts_1024=ps.boxes,
            all_iou_predictions=np.asarray(iou),
            embedding=embedding,
            lowres_logits=lowres if keep_logits else None,
            detections=ps.detections if keep_logits else None,
        ),
    )


def empty(prepared: Prepared, ps: PromptSet | None = None, embedding=None, keep_logits: bool = False) -> Segmentation:
    """The all-zero result (no prompts, nothing detected, or a blank image)."""
    h, w = prepared.height, prepared.width
    z = np.zeros((h, w), dtype=np.int32)
    return Segmentation(
        labels=z,
        boxes=np.zeros((0, 4), np.float32),
        scores=None,
        iou_predictions=np.zeros(0, np.float32),
        details=Details(
            labels_raw=z.copy(),
            label_sources=np.zeros(0, np.int64),
            prompt_index=np.zeros(0, np.int64),
            threshold=None if ps is None else ps.threshold,
            prompts_1024=None if ps is None else ps.boxes,
            dropped_prompts=np.zeros(0, np.int64) if ps is None else ps.dropped,
            embedding=embedding,
            detections=ps.detections if ps is not None and keep_logits else None,
        ),
    )


def segment_prepared(
    backend: Backend,
    prepared: Prepared,
    prompts: Prompts | None,
    settings: SegmentSettings,
    embedding=None,
    return_embedding: bool = False,
    keep_logits: bool = False,
) -> Segmentation:
    """The stages after ``prepare``, in sequence (``embedding``: reuse one already computed)."""
    ps = find_prompts(backend, prepared, prompts, settings)
    if ps is None:
        return empty(prepared)
    if embedding is None and (ps.n > 0 or return_embedding):
        embedding = embed(backend, prepared)
    emb_out = embedding if return_embedding else None
    if ps.n == 0 or embedding is None:
        return empty(prepared, ps, emb_out, keep_logits)
    if keep_logits:  # every prompt's logits are kept: decode at once
        lowres, iou = decode(backend, embedding, ps)
        keep = kept(iou, settings)
        labels_raw = assemble(lowres[keep], prepared)
        return finish(prepared, ps, keep, iou, labels_raw, settings, emb_out, lowres, keep_logits)
    keep, iou, labels_raw = decode_and_assemble(backend, embedding, ps, prepared, settings)
    return finish(prepared, ps, keep, iou, labels_raw, settings, emb_out)


def segment(
    backend: Backend,
    image: np.ndarray,
    prompts: Prompts | None = None,
    settings: SegmentSettings | None = None,
    return_embedding: bool = False,
    keep_logits: bool = False,
) -> Segmentation:
    """Segment one image with ``backend`` (every stage in sequence); see ``Prompts``."""
    settings = settings or SegmentSettings()
    return segment_prepared(
        backend, prepare(image, settings), prompts, settings, return_embedding=return_embedding, keep_logits=keep_logits
    )


def with_channels(settings: SegmentSettings, channels: Channels | None) -> SegmentSettings:
    """``settings`` with ``channels`` replacing its channel choice (None: unchanged)."""
    return settings if channels is None else replace(settings, channels=channels)


# --------------------------------------------------------------------------- prompt checks


class PromptWarning(UserWarning):
    """Prompts dropped because they lie outside the image."""


def fit_prompts(prompts: Prompts, height: int, width: int):
    """The user's prompts checked and fitted to a ``height`` x ``width`` image (original pixels).

    Box corners are ordered (x1 <= x2, y1 <= y2), boxes clipped to [0, width] x [0, height],
    points clipped to [0, width - 1] x [0, height - 1]; a prompt whose box has no area inside
    the image is dropped. -> (boxes (M, 4) float32 or None, points (M, P, 2) float32 or None,
    point labels (M, P) int64 or None, index (M,) int64 of the kept prompts in the user's list
    (None when none was dropped), dropped (D,) int64).
    """
    boxes = pts = lab = None
    if prompts.boxes is not None:
        b = box_prompts(prompts.boxes)
        boxes = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
        boxes = np.clip(boxes, 0, np.array([width, height, width, height], np.float32)).astype(np.float32)
    if prompts.points is not None:
        pts, lab = point_prompts(prompts.points, prompts.point_labels)
        pts = np.clip(pts, 0, np.array([width - 1, height - 1], np.float32)).astype(np.float32)
        if boxes is not None and len(boxes) != len(pts):
            raise ValueError(f"{len(boxes)} boxes but {len(pts)} point prompts")
    dropped = np.zeros(0, np.int64)
    index = None
    if boxes is not None:
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not inside.all():
            dropped = np.flatnonzero(~inside).astype(np.int64)
            index = np.flatnonzero(inside).astype(np.int64)
            boxes = boxes[inside]
            if pts is not None:
                pts, lab = pts[inside], lab[inside]
    return boxes, pts, lab, index, dropped


def box_prompts(boxes) -> np.ndarray:
    """Boxes -> (N, 4) float32 XYXY, or ValueError naming the problem."""
    b = np.asarray(boxes, dtype=np.float32)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) XYXY, got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    return b


def point_prompts(points, point_labels) -> tuple[np.ndarray, np.ndarray]:
    """Points -> ((N, P, 2) float32, (N, P) int64 labels), or ValueError naming the problem."""
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ValueError(f"points must be (N, P, 2) or (P, 2), got shape {np.shape(points)}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates")
    if point_labels is None:
        lab = np.ones(pts.shape[:2], dtype=np.int64)
    else:
        lab = np.asarray(point_labels, dtype=np.int64)
        if lab.size != pts.shape[0] * pts.shape[1]:
            raise ValueError(f"point_labels has {lab.size} entries for {pts.shape[0]} x {pts.shape[1]} points")
        lab = lab.reshape(pts.shape[:2])
    if not np.isin(lab, (-1, 0, 1)).all():
        raise ValueError("point labels must be 1 (cell), 0 (background) or -1 (padding)")
    return pts, lab
