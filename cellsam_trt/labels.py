"""From low-res mask logits to the final label map (PIPELINE.md, "Masks" 3-6), natively.

The work is done by the C++ extension ``cellsam_trt._native`` (sources in ``cpp_ext/``). The
plain NumPy/SciPy implementations that define the semantics live in
``cellsam_trt/_postprocess_numpy.py`` and the tests hold the two equal; where the extension is
not built (no C++17 compiler at install time), these functions run the NumPy ones instead, with
the same results, and warn once, at the first call, that they are much slower.

* ``assemble_labels``: each kept mask's (256, 256) logits are upsampled bilinearly
  (align_corners=False) to 1024 x 1024 and then to the original H x W, thresholded at
  sigmoid > 0.4 (logit >= ``LOGIT_THRESHOLD``), and written in order so that a later mask wins
  an overlap.
* ``fill_holes_and_remove_small_masks``: the official post-processing (cellpose's rule):
  labels in increasing order; fewer than ``min_size`` pixels -> deleted; otherwise holes
  filled inside the label's bounding box and written back with the next sequential label.
  ``fill_holes_and_remove_small_masks_with_sources`` also returns which input label (kept
  mask) each final label came from.
* ``link_labels_by_iou``: one-to-one matching of the labels of two overlapping tiles.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np

from . import _postprocess_numpy

LOWRES = 256
MODEL_SIZE = 1024
MASK_THRESHOLD = 0.4
# the float32 logit threshold of both implementations: on <=> logit >= LOGIT_THRESHOLD
# (-0.405465: the smallest float32 whose correctly rounded float32 sigmoid is > 0.4)
LOGIT_THRESHOLD = _postprocess_numpy.LOGIT_THRESHOLD

# The measured cost of the fallback: benchmarks/results/labels.json, tissuenet_boxes (512 x 512,
# 325 kept masks), medians of 5 runs on a 2-core AMD EPYC, native vs the NumPy/SciPy code.
FALLBACK_SLOWDOWN = {"assemble_labels": 17.3, "fill_holes_and_remove_small_masks": 48.9}
FALLBACK_WARNING = (
    "cellsam_trt._native (the C++ post-processing) is not built{why}; using the NumPy/SciPy "
    "fallback (cellsam_trt._postprocess_numpy), which gives the same label maps but is much slower: "
    "on the tissuenet case of benchmarks/results/labels.json (512 x 512, 325 masks) the native code "
    "is {assemble}x faster at label assembly (59 ms vs 1022 ms) and {fill}x faster at hole filling "
    "(9 ms vs 441 ms). To build it, install a C++17 compiler (Debian/Ubuntu: apt-get install g++; "
    "Fedora: dnf install gcc-c++; macOS: xcode-select --install) and reinstall cellsam-trt "
    "(in a checkout: pip install -e . --force-reinstall --no-deps)."
)

_impl: ModuleType | None = None


def implementation() -> ModuleType:
    """The module that does the work: ``cellsam_trt._native``, or ``cellsam_trt._postprocess_numpy``
    where the extension does not import (then warns once, at the first call)."""
    global _impl
    if _impl is None:
        try:
            from . import _native as impl
        except ImportError as e:
            impl = _postprocess_numpy
            warnings.warn(
                FALLBACK_WARNING.format(
                    why=f" ({type(e).__name__}: {e})",
                    assemble=FALLBACK_SLOWDOWN["assemble_labels"],
                    fill=FALLBACK_SLOWDOWN["fill_holes_and_remove_small_masks"],
                ),
                RuntimeWarning,
                stacklevel=3,
            )
        _impl = impl
    return _impl


def is_native() -> bool:
    """Whether the C++ extension does the work (resolves the implementation, see ``implementation``)."""
    return implementation() is not _postprocess_numpy


def assemble_labels(lowres_logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Kept masks' low-res logits (N, 256, 256) float32 -> label map (H, W) int32.

    Mask k (0-based) gets label k + 1; a later mask overwrites an earlier one.
    """
    impl = implementation()
    lowres = np.ascontiguousarray(lowres_logits, dtype=np.float32).reshape(-1, LOWRES, LOWRES)
    return impl.assemble_labels(lowres, int(height), int(width))


def fill_holes_and_remove_small_masks(labels: np.ndarray, min_size: int = 25) -> np.ndarray:
    """The official post-processing of a label map (H, W) int; returns a new int32 array."""
    impl = implementation()
    return impl.fill_holes_and_remove_small_masks(np.ascontiguousarray(labels, dtype=np.int32), int(min_size))


def fill_holes_and_remove_small_masks_with_sources(
    labels: np.ndarray, min_size: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """``fill_holes_and_remove_small_masks``, also returning where each final label came from.

    Returns (final int32 (H, W), sources int64 (K,)): K is the number of final labels the loop
    wrote and ``sources[k - 1]`` the input label that final label k was written for; for an
    assembled map (``assemble_labels``) that is the 1-based index of the kept mask. Taken from
    the loop itself: an input label covered by an earlier label's hole filling gets no final
    label (and the later labels shift), and a final label may have no pixels left in ``final``
    (covered by a later label's hole filling).
    """
    impl = implementation()
    return impl.fill_holes_and_remove_small_masks_with_sources(
        np.ascontiguousarray(labels, dtype=np.int32), int(min_size)
    )


def link_labels_by_iou(a: np.ndarray, b: np.ndarray, min_iou: float) -> np.ndarray:
    """Two label maps (H, W) of the same region -> int64 (M, 2) matched (label_a, label_b) pairs:
    IoU inside the region >= min_iou, one-to-one, greedy by descending IoU, ties by labels."""
    impl = implementation()
    return impl.link_labels_by_iou(
        np.ascontiguousarray(a, dtype=np.int32), np.ascontiguousarray(b, dtype=np.int32), float(min_iou)
    )
