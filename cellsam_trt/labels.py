"""From low-res mask logits to the final label map (PIPELINE.md, "Masks" 3-6), natively.

The work is done by the C++ extension ``cellsam_trt._native`` (sources in ``cpp_ext/``);
the plain NumPy/SciPy implementations that define the semantics live in
``tests/reference_postprocess.py`` and the tests hold the two equal.

* ``assemble_labels``: each kept mask's (256, 256) logits are upsampled bilinearly
  (align_corners=False) to 1024 x 1024 and then to the original H x W, thresholded at
  sigmoid > 0.4, and written in order so that a later mask wins an overlap.
* ``fill_holes_and_remove_small_masks``: the official post-processing (cellpose's rule):
  labels in increasing order; fewer than ``min_size`` pixels -> deleted; otherwise holes
  filled inside the label's bounding box and written back with the next sequential label.
* ``link_labels_by_iou``: one-to-one matching of the labels of two overlapping tiles.
"""

from __future__ import annotations

import numpy as np

try:
    from . import _native
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "cellsam_trt._native (the C++ post-processing) is not built: install the package with "
        "`pip install .` / `pip install -e .`, or run `python setup.py build_ext --inplace` (needs a C++17 compiler)"
    ) from e

LOWRES = 256
MODEL_SIZE = 1024
MASK_THRESHOLD = 0.4
# the float32 logit threshold the native code uses: on <=> logit >= LOGIT_THRESHOLD
LOGIT_THRESHOLD = float(_native.LOGIT_THRESHOLD)


def assemble_labels(lowres_logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Kept masks' low-res logits (N, 256, 256) float32 -> label map (H, W) int32.

    Mask k (0-based) gets label k + 1; a later mask overwrites an earlier one.
    """
    lowres = np.ascontiguousarray(lowres_logits, dtype=np.float32).reshape(-1, LOWRES, LOWRES)
    return _native.assemble_labels(lowres, int(height), int(width))


def fill_holes_and_remove_small_masks(labels: np.ndarray, min_size: int = 25) -> np.ndarray:
    """The official post-processing of a label map (H, W) int; returns a new int32 array."""
    return _native.fill_holes_and_remove_small_masks(np.ascontiguousarray(labels, dtype=np.int32), int(min_size))


def link_labels_by_iou(a: np.ndarray, b: np.ndarray, min_iou: float) -> np.ndarray:
    """Two label maps (H, W) of the same region -> int64 (M, 2) matched (label_a, label_b) pairs:
    IoU inside the region >= min_iou, one-to-one, greedy by descending IoU, ties by labels."""
    return _native.link_labels_by_iou(np.ascontiguousarray(a, dtype=np.int32), np.ascontiguousarray(b, dtype=np.int32),
                                      float(min_iou))
