"""From CellFinder outputs to box prompts, and prompt scaling (PIPELINE.md, "Boxes").

* ``topk_detections``: sigmoid scores of all (query, class) pairs, sorted descending, each
  with its query's box as XYXY in the 1024 frame.
* ``dynamic_threshold``: the official rule ``0.66 * bbox_threshold + 0.33 * mean(centres)``
  where the centres come from scikit-learn's ``KMeans(n_clusters=2, random_state=42)`` on the
  scores. ``kmeans_1d_centres`` reproduces that estimator's computation for one-dimensional
  data (k-means++ seeding with ``RandomState(42)``, Lloyd iterations with its tolerance rule,
  float32 arithmetic) in plain NumPy, deterministically and without scikit-learn.
"""

from __future__ import annotations

import numpy as np

MODEL_SIZE = 1024


def topk_detections(pred_logits: np.ndarray, pred_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pred_logits (Q, K) float32, pred_boxes (Q, 4) cxcywh in [0, 1] ->
    scores (Q,) float32 descending, class ids (Q,) int64, boxes (Q, 4) float32 XYXY in the 1024 frame.

    As the official post-processing: top-k over the Q*K scores with k = Q, so a query may
    appear once per class and the lowest-scoring pairs are dropped.
    """
    q, k = pred_logits.shape
    prob = (1.0 / (1.0 + np.exp(-pred_logits.astype(np.float32)))).astype(np.float32).reshape(-1)
    order = np.argsort(-prob, kind="stable")[:q]
    query = order // k
    cx, cy, w, h = (pred_boxes[:, i].astype(np.float32) for i in range(4))
    xyxy = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1).astype(np.float32)
    return prob[order], (order % k).astype(np.int64), xyxy[query] * np.float32(MODEL_SIZE)


def _sq_dist_upcast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances between float32 scalars as scikit-learn computes them for float32
    data: -2ab + a^2 + b^2 in float64, cast to float32, clipped at 0. a (m,), b (n,) -> (m, n)."""
    a64 = a.astype(np.float64)[:, None]
    b64 = b.astype(np.float64)[None, :]
    d = -2 * (a64 * b64)
    d += a64 * a64
    d += b64 * b64
    return np.maximum(d.astype(np.float32), np.float32(0))


def _kmeanspp_1d(x: np.ndarray, rs: np.random.RandomState) -> np.ndarray:
    n = x.shape[0]
    w = np.ones(n, dtype=np.float32)
    first = rs.choice(n, p=w / w.sum())
    centres = [x[first]]
    closest = _sq_dist_upcast(x[first : first + 1], x)  # (1, n), shapes as scikit-learn's
    pot = closest @ w
    n_trials = 2 + int(np.log(2))
    rand = rs.uniform(size=n_trials) * pot
    cand = np.searchsorted(np.cumsum(w * closest, dtype=np.float64), rand)
    np.clip(cand, None, n - 1, out=cand)
    dist = np.minimum(closest, _sq_dist_upcast(x[cand], x))  # (n_trials, n)
    best = int(np.argmin(dist @ w.reshape(-1, 1)))
    centres.append(x[cand[best]])
    return np.array(centres, dtype=np.float32)


def _chunk_sums(x: np.ndarray, labels: np.ndarray, n_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float32 sums as scikit-learn's OpenMP Lloyd step forms them: samples in
    chunks of 256 (the last absorbing the remainder), chunks split statically over threads,
    a sequential float32 sum per thread, then the thread sums added."""
    n = x.shape[0]
    chunk = 256 if n > 256 else n
    n_chunks = n // chunk
    q, r = divmod(n_chunks, n_threads)
    sums = np.zeros(2, dtype=np.float32)
    start_chunk = 0
    for t in range(n_threads):
        count = q + (1 if t < r else 0)
        if count == 0:
            continue
        lo = start_chunk * chunk
        hi = n if start_chunk + count == n_chunks else (start_chunk + count) * chunk
        start_chunk += count
        xs, ls = x[lo:hi], labels[lo:hi]
        for j in range(2):
            v = xs[ls == j]
            if v.size:
                sums[j] = sums[j] + np.add.accumulate(v, dtype=np.float32)[-1]
    weights = np.array([(labels == 0).sum(), (labels == 1).sum()], dtype=np.float32)
    return sums, weights


def _assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Nearest centre by ||c||^2 - 2xc in float32 (the ||x||^2 term omitted); ties -> cluster 0."""
    c2 = centres * centres
    d0 = c2[0] - np.float32(2) * (x * centres[0])
    d1 = c2[1] - np.float32(2) * (x * centres[1])
    return (d1 < d0).astype(np.int32)


def kmeans_1d_centres(scores: np.ndarray, max_iter: int = 300, tol: float = 1e-4, n_threads: int = 2) -> np.ndarray:
    """The two cluster centres (2,) float32 that ``KMeans(n_clusters=2, random_state=42)``
    finds for ``scores`` as a column, in the estimator's order.

    n_threads: the OpenMP thread count whose float32 summation order is reproduced (it only
    moves the centres by float32 rounding).
    """
    x = np.asarray(scores, dtype=np.float32).reshape(-1, 1).copy()
    if x.shape[0] < 2:
        raise ValueError("k-means with 2 clusters needs at least 2 scores")
    mean = x.mean(axis=0)
    x -= mean
    tol_abs = np.mean(np.var(x, axis=0)) * tol
    x = x[:, 0]
    rs = np.random.RandomState(42)
    centres = _kmeanspp_1d(x, rs)
    labels_old = np.full(x.shape[0], -1, dtype=np.int32)
    for _ in range(max_iter):
        labels = _assign(x, centres)
        sums, weights = _chunk_sums(x, labels, n_threads)
        new = sums.copy()
        for j in np.flatnonzero(weights == 0):  # scikit-learn's empty-cluster relocation
            far = int(np.argmax((x - centres[labels]) ** 2))
            old = labels[far]
            new[old] -= x[far]
            new[j] = x[far]
            weights[j], weights[old] = 1, weights[old] - 1
        for j in range(2):
            if weights[j] > 0:
                new[j] = new[j] * (np.float32(1.0) / weights[j])
        shift = np.sqrt((new - centres) * (new - centres)).astype(np.float32)
        centres = new
        if np.array_equal(labels, labels_old) or (shift**2).sum() <= tol_abs:
            break  # (the estimator's final relabelling does not move the centres)
        labels_old = labels
    return (centres + mean).astype(np.float32)


def dynamic_threshold(scores: np.ndarray, bbox_threshold: float = 0.4) -> tuple[float, np.ndarray | None]:
    """The official score threshold for one image's top-k scores -> (threshold, centres or None).

    Fewer than 2 scores: the plain bbox_threshold, as the official code falls back to it.
    """
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape[0] < 2:
        return float(bbox_threshold), None
    centres = kmeans_1d_centres(scores)
    return 0.66 * bbox_threshold + 0.33 * float(np.mean(centres)), centres


def select_boxes(scores: np.ndarray, boxes: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep entries with score > threshold (when threshold > 0), in score order."""
    if threshold > 0 and scores.size:
        keep = scores > threshold
        return scores[keep], boxes[keep]
    return scores, boxes


def scale_boxes_to_model(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 4) XYXY in original pixels (x = column) -> (N, 4) float32 XYXY in the 1024 frame.

    float32 arithmetic, as the official code does for box lists given as floats.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    return b * np.tile(np.array([MODEL_SIZE / width, MODEL_SIZE / height], dtype=np.float32), 2)


def scale_boxes_to_image(boxes_1024: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 4) XYXY in the 1024 frame -> (N, 4) float32 XYXY in original pixels."""
    b = np.asarray(boxes_1024, dtype=np.float32).reshape(-1, 4)
    return b * np.tile(np.array([width / MODEL_SIZE, height / MODEL_SIZE], dtype=np.float32), 2)


def scale_points_to_model(points_xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., 2) XY in original pixels -> float32 XY in the 1024 frame."""
    p = np.asarray(points_xy, dtype=np.float32)
    return p * np.array([MODEL_SIZE / width, MODEL_SIZE / height], dtype=np.float32)
