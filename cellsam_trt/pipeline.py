"""The CellSAM pipeline over any backend: image -> label map.

read -> preprocess (``preprocess``) -> detect (backend + ``prompts``) -> encode (backend) ->
decode (backend, all prompts of the image batched) -> assemble labels (``labels``).

Defaults reproduce the official ``segment_cellular_image`` (PIPELINE.md), without its defects:
no detection or a blank image gives an all-zero label map instead of a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import labels as label_ops
from . import preprocess as pre
from . import prompts as prompt_ops
from .engine.base import Backend


@dataclass(frozen=True)
class SegmentSettings:
    """Thresholds of the official model (defaults) and input handling.

    bbox_threshold: CellFinder score threshold before the dynamic adjustment.
    iou_threshold: masks whose predicted IoU is below it are dropped.
    min_size: labels with fewer pixels are removed after hole filling.
    normalize: percentile clip + CLAHE (the official default).
    channel_axis: channel axis of a 3-D image; None = the official smallest-axis rule.
    """

    bbox_threshold: float = 0.4
    iou_threshold: float = 0.5
    min_size: int = 25
    normalize: bool = True
    channel_axis: int | None = None


@dataclass
class Segmentation:
    """Result for one image.

    labels: (H, W) int32 final label map (0 = background).
    labels_raw: (H, W) int32 before hole filling and small-object removal.
    boxes: (K, 4) float32 XYXY in original pixels of the kept prompts (box prompts; for point
      prompts, empty).
    scores: (K,) float32 CellFinder scores of the kept boxes (automatic mode), else None.
    iou_predictions: (K,) float32 IoU predicted by the mask decoder for the kept masks.
    prompt_index: (K,) int64 index of each kept mask in the prompt list.
    embedding: (1, 256, 64, 64) float32 when asked for.
    threshold: the dynamic score threshold used (automatic mode), else None.
    """

    labels: np.ndarray
    labels_raw: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray | None
    iou_predictions: np.ndarray
    prompt_index: np.ndarray
    embedding: np.ndarray | None = None
    threshold: float | None = None
    prompts_1024: np.ndarray | None = None
    all_iou_predictions: np.ndarray | None = None
    lowres_logits: np.ndarray | None = field(default=None, repr=False)  # (N, 256, 256), keep_logits
    detections: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # raw CellFinder outputs

    @property
    def n_cells(self) -> int:
        return int(len(np.unique(self.labels))) - int((self.labels == 0).any())


def _empty(h: int, w: int, embedding=None, threshold=None) -> Segmentation:
    z = np.zeros((h, w), dtype=np.int32)
    return Segmentation(
        labels=z, labels_raw=z.copy(), boxes=np.zeros((0, 4), np.float32), scores=None,
        iou_predictions=np.zeros(0, np.float32), prompt_index=np.zeros(0, np.int64),
        embedding=embedding, threshold=threshold,
    )


def validate_image(image: np.ndarray) -> np.ndarray:
    """Reject what cannot be segmented, with the problem named (ValueError)."""
    image = np.asarray(image)
    if image.dtype == object or not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise ValueError(f"image has unsupported dtype {image.dtype}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    return image


class CellSAMPipeline:
    """Segments images with a backend (``cellsam_trt.engine``) and the official settings."""

    def __init__(self, backend: Backend, settings: SegmentSettings | None = None, keep_logits: bool = False) -> None:
        self.backend = backend
        self.settings = settings or SegmentSettings()
        self.keep_logits = keep_logits

    # -- stages ------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image -> (normalised (H, W, 3) float64, squashed (3, 1024, 1024) float32)."""
        hwc = pre.to_three_channels(validate_image(image), self.settings.channel_axis)
        norm = pre.normalize_image(hwc) if self.settings.normalize else hwc
        return norm, pre.squashed(norm)

    def detect(self, squashed: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """CellFinder boxes above the dynamic threshold -> (boxes_1024 (K, 4), scores (K,), threshold, raw)."""
        logits, boxes = self.backend.detect(pre.cellfinder_input(squashed, self.backend.adv_mode))
        scores, _, boxes_1024 = prompt_ops.topk_detections(logits[0], boxes[0])
        threshold, _ = prompt_ops.dynamic_threshold(scores, self.settings.bbox_threshold)
        kept_scores, kept_boxes = prompt_ops.select_boxes(scores, boxes_1024, threshold)
        return kept_boxes, kept_scores, threshold, (logits, boxes)

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """Image -> SAM image embedding (1, 256, 64, 64) float32, or None for a blank image."""
        _, sq = self.preprocess(image)
        return self._embed(sq)

    def _embed(self, squashed: np.ndarray) -> np.ndarray | None:
        try:
            enc_in = pre.sam_encoder_input(squashed, self.backend.adv_mode)
        except pre.BlankImageError:
            return None
        return self.backend.encode(enc_in)

    # -- whole image -------------------------------------------------------------------------
    def segment(
        self,
        image: np.ndarray,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        return_embedding: bool = False,
    ) -> Segmentation:
        """Segment one image.

        image: (H, W) or (H, W, C)/(C, H, W) with C <= 3, any numeric dtype.
        boxes: optional (N, 4) XYXY in original pixels (x = column); skips CellFinder.
        points: optional (N, P, 2) XY in original pixels, one prompt of P points per row (a
          (P, 2) array is one prompt), with point_labels (N, P) (1 = cell, 0 = background).
        Without prompts, CellFinder finds the cells (automatic mode).
        """
        norm, sq = self.preprocess(image)
        h, w = norm.shape[:2]
        return self.segment_prepared(sq, h, w, boxes, points, point_labels, return_embedding)

    def prompts_1024(self, sq, h, w, boxes=None, points=None, point_labels=None):
        """The prompts of one image in the 1024 frame (CellFinder's when none are given).

        -> (boxes_1024 (N, 4) float32 or None, points (N, P, 2) float32 or None, point labels
        (N, P) int64 or None, scores (N,) or None, dynamic threshold or None, raw CellFinder
        outputs or None), or None in automatic mode on a blank image (nothing to detect).
        """
        scores = threshold = raw = pts = lab = None
        if boxes is None and points is None:
            if not self.backend.has_detector:
                raise ValueError("this model has no CellFinder: give box or point prompts")
            if not np.any(sq):
                return None
            boxes_1024, scores, threshold, raw = self.detect(sq)
        else:
            boxes_1024 = None if boxes is None else prompt_ops.scale_boxes_to_model(_box_prompts(boxes), h, w)
            if points is not None:
                pts, lab = _point_prompts(points, point_labels)
                pts = prompt_ops.scale_points_to_model(pts, h, w)
                if boxes_1024 is not None and len(boxes_1024) != len(pts):
                    raise ValueError(f"{len(boxes_1024)} boxes but {len(pts)} point prompts")
        return boxes_1024, pts, lab, scores, threshold, raw

    def segment_prepared(self, sq, h, w, boxes=None, points=None, point_labels=None, return_embedding=False, embedding=None):
        """``segment`` from the squashed (3, 1024, 1024) image, optionally with its embedding."""
        prompts = self.prompts_1024(sq, h, w, boxes, points, point_labels)
        if prompts is None:  # automatic mode on a blank image
            return _empty(h, w)
        boxes_1024, pts, lab, scores, threshold, raw = prompts
        n = len(boxes_1024) if boxes_1024 is not None else len(pts)
        if embedding is None and (n > 0 or return_embedding):
            embedding = self._embed(sq)
        if n == 0 or embedding is None:
            res = _empty(h, w, embedding if return_embedding else None, threshold)
            res.detections = raw if self.keep_logits else None
            return res
        lowres, iou = self.backend.decode(embedding, boxes=boxes_1024, points=pts, point_labels=lab)
        keep = np.flatnonzero(iou >= self.settings.iou_threshold)
        labels_raw = label_ops.assemble_labels(lowres[keep], h, w)
        final = label_ops.fill_holes_and_remove_small_masks(labels_raw, self.settings.min_size)
        return Segmentation(
            labels=final,
            labels_raw=labels_raw,
            boxes=(prompt_ops.scale_boxes_to_image(boxes_1024[keep], h, w) if boxes_1024 is not None
                   else np.zeros((0, 4), np.float32)),
            scores=None if scores is None else scores[keep],
            iou_predictions=iou[keep],
            prompt_index=keep.astype(np.int64),
            embedding=embedding if return_embedding else None,
            threshold=threshold,
            prompts_1024=boxes_1024,
            all_iou_predictions=iou,
            lowres_logits=lowres if self.keep_logits else None,
            detections=raw if self.keep_logits else None,
        )


def _box_prompts(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) XYXY, got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    return b


def _point_prompts(points, point_labels) -> tuple[np.ndarray, np.ndarray]:
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ValueError(f"points must be (N, P, 2) or (P, 2), got shape {np.shape(points)}")
    if point_labels is None:
        lab = np.ones(pts.shape[:2], dtype=np.int64)
    else:
        lab = np.asarray(point_labels, dtype=np.int64).reshape(pts.shape[:2])
    if not np.isin(lab, (-1, 0, 1)).all():
        raise ValueError("point labels must be 1 (cell), 0 (background) or -1 (padding)")
    return pts, lab
