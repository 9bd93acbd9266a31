"""How prompts become decoder-graph inputs (the ``point_coords`` / ``point_labels`` layout).

A prompt is one row of points with label codes: 1 foreground, 0 background, -1 padding,
2 / 3 box top-left / bottom-right corner, in the order SAM's prompt encoder gives its tokens
(points, then the box; points only: one padding point appended). Every backend feeds its
decoder graph through ``prompt_tokens``.
"""

from __future__ import annotations

import numpy as np

LABEL_PAD = -1.0
LABEL_BG = 0.0
LABEL_FG = 1.0
LABEL_BOX_TL = 2.0
LABEL_BOX_BR = 3.0


def prompt_tokens(
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Backend prompts -> decoder graph inputs, laid out exactly as ``PromptEncoder`` orders tokens.

    boxes: (N, 4) XYXY float; points: (N, P, 2) XY float with point_labels (N, P) in {1, 0, -1}
    (1024 frame). Returns point_coords (N, P', 2) float32 and point_labels (N, P') float32:
    boxes only -> the two corners (labels 2, 3); points only -> the points and one padding
    point (0, 0) labelled -1 (as SAM appends); both -> the points, then the box corners.
    """
    coords, labels = [], []
    n = None
    if points is not None:
        pts = np.asarray(points, np.float32)
        n = pts.shape[0]
        lab = (
            np.ones(pts.shape[:2], np.float32)
            if point_labels is None
            else np.asarray(point_labels, np.float32).reshape(pts.shape[:2])
        )
        coords.append(pts)
        labels.append(lab)
        if boxes is None:
            coords.append(np.zeros((n, 1, 2), np.float32))
            labels.append(np.full((n, 1), LABEL_PAD, np.float32))
    if boxes is not None:
        b = np.asarray(boxes, np.float32).reshape(-1, 2, 2)
        if n is not None and b.shape[0] != n:
            raise ValueError(f"{b.shape[0]} boxes but {n} point prompts")
        n = b.shape[0]
        coords.append(b)
        labels.append(np.tile(np.array([[LABEL_BOX_TL, LABEL_BOX_BR]], np.float32), (n, 1)))
    if n is None:
        raise ValueError("a prompt needs boxes or points")
    return (
        np.ascontiguousarray(np.concatenate(coords, axis=1), dtype=np.float32),
        np.ascontiguousarray(np.concatenate(labels, axis=1), dtype=np.float32),
    )
