"""Agreement between two label maps (e.g. BF16 / FP16 / TensorRT vs the FP32 reference).

``matched_instance_iou(reference, candidate)`` matches the instances (nonzero labels) of two
(H, W) integer label maps one-to-one by IoU (Hungarian assignment, maximising the total IoU,
``scipy.optimize.linear_sum_assignment``) and reports:

* ``mean_iou``: mean IoU over the matched pairs (1.0 when both maps are empty);
* ``frac_matched``: fraction of reference instances matched with IoU >= ``threshold`` (0.5);
* ``f1``: 2 * matches / (n_reference + n_candidate) at that threshold;
* ``n_reference``, ``n_candidate``, ``n_matched``; ``pixel_agreement``: fraction of pixels
  where foreground/background agree.

``min_area`` ignores instances smaller than that many pixels in both maps.

The IoU matrix is built from the joint histogram of the overlapping pixels (sparse), so it
costs O(pixels + overlaps), not O(instances^2 * pixels).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment


def iou_matrix(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ref ids (R,), cand ids (C,), IoU (R, C) float64) of two same-shape label maps."""
    a = np.asarray(reference)
    b = np.asarray(candidate)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    a = a.ravel().astype(np.int64)
    b = b.ravel().astype(np.int64)
    ra, ia = np.unique(a, return_inverse=True)
    rb, ib = np.unique(b, return_inverse=True)
    joint = sparse.coo_matrix((np.ones(a.size, np.int64), (ia, ib)), shape=(ra.size, rb.size)).tocsr()
    area_a = np.bincount(ia, minlength=ra.size)
    area_b = np.bincount(ib, minlength=rb.size)
    keep_a = ra != 0
    keep_b = rb != 0
    inter = joint[keep_a][:, keep_b].toarray().astype(np.float64)
    union = area_a[keep_a][:, None] + area_b[keep_b][None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return ra[keep_a], rb[keep_b], iou


def drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """A copy of ``labels`` with instances of fewer than ``min_area`` pixels set to 0."""
    lab = np.asarray(labels)
    ids, counts = np.unique(lab, return_counts=True)
    small = ids[(counts < min_area) & (ids != 0)]
    return np.where(np.isin(lab, small), 0, lab)


def matched_instance_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5,
                         min_area: int = 0) -> dict:
    """Matched-instance agreement of ``candidate`` with ``reference`` (see the module doc).

    min_area: instances of fewer pixels are ignored in both maps (fragments whose IoU is
    dominated by single pixels).
    """
    if min_area > 0:
        reference, candidate = drop_small(reference, min_area), drop_small(candidate, min_area)
    ids_a, ids_b, iou = iou_matrix(reference, candidate)
    n_a, n_b = len(ids_a), len(ids_b)
    fg = (np.asarray(reference) != 0) == (np.asarray(candidate) != 0)
    out = {"n_reference": n_a, "n_candidate": n_b, "pixel_agreement": float(fg.mean()) if fg.size else 1.0}
    if n_a == 0 and n_b == 0:
        return dict(out, mean_iou=1.0, frac_matched=1.0, f1=1.0, n_matched=0)
    if n_a == 0 or n_b == 0:
        return dict(out, mean_iou=0.0, frac_matched=0.0 if n_a else 1.0, f1=0.0, n_matched=0)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    vals = iou[rows, cols]
    vals = vals[vals > 0]
    good = int((vals >= threshold).sum())
    return dict(out, mean_iou=float(vals.mean()) if vals.size else 0.0, frac_matched=good / n_a,
                f1=2 * good / (n_a + n_b), n_matched=good)
