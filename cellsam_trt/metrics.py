"""Agreement between two instance label maps (e.g. INT8 / FP16 / TensorRT against FP32).

``match_instances(reference, test)`` pairs the instances of two (H, W) integer label maps
(0 = background) one-to-one so that the total IoU is maximal (Hungarian assignment on the
IoU matrix; pairs that do not overlap are never matched) and reports:

* ``mean_iou``: mean over the reference instances of the IoU of each one's match (0 when it
  has none), so missed cells count against the test map;
* ``frac_matched_50``: fraction of reference instances matched with IoU >= 0.5 (recall at 0.5);
* ``precision_50``: the same count over the test instances (extra cells count against it);
* the instance counts and the per-pair IoUs.

Two empty maps agree perfectly (1.0 everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class InstanceMatch:
    n_reference: int
    n_test: int
    mean_iou: float
    frac_matched_50: float
    precision_50: float
    pixel_agreement: float
    matched_ious: np.ndarray = field(repr=False)  # (n_matched,) IoU of every matched pair
    pairs: np.ndarray = field(repr=False)  # (n_matched, 2) reference label, test label

    @property
    def f1_50(self) -> float:
        """F1 at IoU >= 0.5 (harmonic mean of recall and precision at 0.5)."""
        p, r = self.precision_50, self.frac_matched_50
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "n_reference": self.n_reference,
            "n_test": self.n_test,
            "mean_iou": self.mean_iou,
            "frac_matched_50": self.frac_matched_50,
            "precision_50": self.precision_50,
            "pixel_agreement": self.pixel_agreement,
        }


def iou_matrix(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (reference instance, test instance) pair.

    Returns (iou (R, T) float64, reference labels (R,), test labels (T,)), labels sorted.
    """
    a = np.asarray(reference)
    b = np.asarray(test)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    la, ia = np.unique(a, return_inverse=True)
    lb, ib = np.unique(b, return_inverse=True)
    ia, ib = ia.reshape(-1), ib.reshape(-1)
    # drop background (label 0) from both axes
    a0 = int(np.searchsorted(la, 0)) if (la == 0).any() else None
    b0 = int(np.searchsorted(lb, 0)) if (lb == 0).any() else None
    area_a = np.bincount(ia, minlength=len(la)).astype(np.float64)
    area_b = np.bincount(ib, minlength=len(lb)).astype(np.float64)
    inter = np.zeros((len(la), len(lb)), np.float64)
    pair, count = np.unique(ia.astype(np.int64) * len(lb) + ib, return_counts=True)
    inter[pair // len(lb), pair % len(lb)] = count
    keep_a = np.ones(len(la), bool)
    keep_b = np.ones(len(lb), bool)
    if a0 is not None:
        keep_a[a0] = False
    if b0 is not None:
        keep_b[b0] = False
    inter = inter[keep_a][:, keep_b]
    union = area_a[keep_a][:, None] + area_b[keep_b][None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, la[keep_a], lb[keep_b]


def drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """A copy of ``labels`` with instances of fewer than ``min_area`` pixels set to 0."""
    lab = np.asarray(labels)
    ids, counts = np.unique(lab, return_counts=True)
    small = ids[(counts < min_area) & (ids != 0)]
    return np.where(np.isin(lab, small), 0, lab)


def match_instances(
    reference: np.ndarray, test: np.ndarray, threshold: float = 0.5, min_area: int = 0
) -> InstanceMatch:
    """One-to-one matching of the instances of two label maps by IoU (see the module doc).

    min_area: instances of fewer pixels are ignored in both maps (fragments whose IoU is
    dominated by single pixels).
    """
    if min_area > 0:
        reference, test = drop_small(reference, min_area), drop_small(test, min_area)
    iou, la, lb = iou_matrix(reference, test)
    r, t = iou.shape
    pixel = float((np.asarray(reference) == np.asarray(test)).mean()) if np.size(reference) else 1.0
    if r == 0 and t == 0:
        return InstanceMatch(0, 0, 1.0, 1.0, 1.0, pixel, np.zeros(0), np.zeros((0, 2), np.int64))
    if r == 0 or t == 0:
        return InstanceMatch(r, t, 0.0, 0.0, 0.0, pixel, np.zeros(0), np.zeros((0, 2), np.int64))
    rows, cols = linear_sum_assignment(iou, maximize=True)
    good = iou[rows, cols] > 0
    rows, cols = rows[good], cols[good]
    ious = iou[rows, cols]
    n50 = int((ious >= threshold).sum())
    return InstanceMatch(
        n_reference=r,
        n_test=t,
        mean_iou=float(ious.sum() / r),
        frac_matched_50=n50 / r,
        precision_50=n50 / t,
        pixel_agreement=pixel,
        matched_ious=ious,
        pairs=np.stack([la[rows], lb[cols]], axis=1).astype(np.int64),
    )


class StreamedInstanceMatch:
    """Instance agreement of two label maps too large for memory, accumulated region by region.

    ``add(reference_block, test_block)`` for every block of a partition of the slide, then
    ``result(reference_ids)`` for any subset of reference instances (e.g. cells on tile borders
    vs interior cells). Each reference instance is matched to the test instance of highest IoU
    not taken by a better pair (greedy one-to-one by descending IoU; at IoU > 0.5 a match is
    unique, so this equals the Hungarian matching there). ``split``: reference instances whose
    pixels fall on two or more test labels holding >= 5 % of the instance each (a cell cut by a
    tile border and labelled twice shows here).
    """

    def __init__(self) -> None:
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._ref: list[tuple[np.ndarray, np.ndarray]] = []
        self._test: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, reference: np.ndarray, test: np.ndarray) -> None:
        a = np.asarray(reference, np.int64).ravel()
        b = np.asarray(test, np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"blocks differ in shape: {np.shape(reference)} vs {np.shape(test)}")
        for lab, acc in ((a, self._ref), (b, self._test)):
            ids, n = np.unique(lab[lab > 0], return_counts=True)
            acc.append((ids, n))
        both = (a > 0) & (b > 0)
        key = (a[both] << 32) | b[both]
        ids, n = np.unique(key, return_counts=True)
        self._pairs.append((ids, n))

    @staticmethod
    def _sum(parts) -> tuple[np.ndarray, np.ndarray]:
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.concatenate([p[0] for p in parts])
        n = np.concatenate([p[1] for p in parts])
        u, inv = np.unique(ids, return_inverse=True)
        return u, np.bincount(inv, weights=n, minlength=len(u)).astype(np.int64)

    def result(self, reference_ids=None, threshold: float = 0.5) -> dict:
        rid, rarea = self._sum(self._ref)
        tid, tarea = self._sum(self._test)
        key, inter = self._sum(self._pairs)
        ra = rarea[np.searchsorted(rid, key >> 32)] if len(key) else np.zeros(0, np.int64)
        ta = tarea[np.searchsorted(tid, key & 0xFFFFFFFF)] if len(key) else np.zeros(0, np.int64)
        iou = inter / np.maximum(ra + ta - inter, 1)
        order = np.lexsort((key, -iou))
        best: dict[int, float] = {}
        used: set[int] = set()
        for k in order:
            r, t = int(key[k] >> 32), int(key[k] & 0xFFFFFFFF)
            if r in best or t in used:
                continue
            best[r] = float(iou[k])
            used.add(t)
        share = inter / np.maximum(ra, 1)
        big = share >= 0.05
        pieces = np.bincount(np.searchsorted(rid, key[big] >> 32), minlength=len(rid)) if len(rid) else np.zeros(0)
        ids = rid if reference_ids is None else np.intersect1d(np.asarray(reference_ids, np.int64), rid)
        missing = 0 if reference_ids is None else len(np.setdiff1d(np.asarray(reference_ids, np.int64), rid))
        vals = np.array([best.get(int(i), 0.0) for i in ids])
        n = len(ids) + missing  # reference ids absent from every block count as unmatched
        split = int((pieces[np.searchsorted(rid, ids)] >= 2).sum()) if len(ids) else 0
        return {
            "n_reference": int(n),
            "mean_iou": float(vals.sum() / n) if n else 1.0,
            "frac_matched_50": float((vals >= threshold).sum() / n) if n else 1.0,
            "split": split,
            "n_test_total": int(len(tid)),
        }
