"""Plain NumPy/SciPy (and PyTorch) references for the native post-processing.

The NumPy/SciPy implementations that define the semantics ``cellsam_trt._native`` must keep
live in the package, ``cellsam_trt/_postprocess_numpy.py`` (``cellsam_trt.labels`` falls back
on them where the extension is not built); this module re-exports them for the tests and
``benchmarks/bench_labels.py``, and adds the official per-mask PyTorch route:

* ``torch_assemble_labels``: F.interpolate twice, sigmoid, threshold, max over masks; also
  returns the interpolated logits.
"""

from __future__ import annotations

import numpy as np

from cellsam_trt._postprocess_numpy import (  # noqa: F401  (re-exported)
    LOGIT_BOUND,
    LOGIT_THRESHOLD,
    LOWRES,
    MASK_THRESHOLD,
    MODEL_SIZE,
    assemble_labels,
    bilinear_taps,
    fill_holes_and_remove_small_masks,
    fill_holes_and_remove_small_masks_with_sources,
    link_labels_by_iou,
    upsample_logits,
    upsample_mask,
)


def torch_assemble_labels(lowres: np.ndarray, height: int, width: int, chunk: int = 16, return_logits: bool = False):
    """The official per-mask route in PyTorch (CPU): F.interpolate to 1024 x 1024 and to
    (H, W), sigmoid > 0.4, label = the largest mask number that is on (a later mask wins).
    Returns labels int32 (H, W), and with ``return_logits`` also the interpolated logits
    float32 (N, H, W). Masks go through in chunks of ``chunk`` to bound the memory of the
    1024 x 1024 intermediate."""
    import torch
    import torch.nn.functional as F

    n = len(lowres)
    labels = torch.zeros((height, width), dtype=torch.int32)
    logits = np.empty((n, height, width), np.float32) if return_logits else None
    with torch.no_grad():
        for s in range(0, n, chunk):
            t = torch.from_numpy(np.ascontiguousarray(lowres[s : s + chunk], np.float32))[:, None]
            up = F.interpolate(t, (MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
            up = F.interpolate(up, (height, width), mode="bilinear", align_corners=False)[:, 0]
            if return_logits:
                logits[s : s + len(up)] = up.numpy()
            on = torch.sigmoid(up) > MASK_THRESHOLD
            num = torch.arange(s + 1, s + len(up) + 1, dtype=torch.int32)[:, None, None]
            labels = torch.maximum(labels, (on.to(torch.int32) * num).amax(0))
    return (labels.numpy(), logits) if return_logits else labels.numpy()
