"""The small protocol every inference backend implements.

A backend runs the three networks; it knows nothing of images, thresholds or label maps
(that is ``cellsam_trt.pipeline``). Arrays cross the boundary as NumPy float32, in the
1024 x 1024 model frame:

* ``encode``: (B, 3, 1024, 1024) SAM encoder input -> (B, 256, 64, 64) image embedding.
* ``detect``: (B, 3, 1024, 1024) CellFinder input -> pred_logits (B, Q, 2), pred_boxes (B, Q, 4)
  as (cx, cy, w, h) in [0, 1].
* ``decode``: one embedding (1, 256, 64, 64) and N prompts -> low-res mask logits
  (N, 256, 256) and IoU predictions (N,). Boxes (N, 4) XYXY, points (N, P, 2) XY with
  labels (N, P) (1 foreground, 0 background, -1 padding).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    name: str
    adv_mode: bool
    has_detector: bool

    def encode(self, image: np.ndarray) -> np.ndarray: ...

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(
        self,
        embedding: np.ndarray,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...
