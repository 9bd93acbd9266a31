"""The pipeline's label assembly and hole filling (cellsam_trt.labels, native) against the
official per-mask PyTorch route and the plain NumPy/SciPy references."""

from __future__ import annotations

import numpy as np
import pytest

import reference_postprocess as ref
from cellsam_trt.labels import assemble_labels, fill_holes_and_remove_small_masks

torch = pytest.importorskip("torch")


def blobs(rng, n, size=256):
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, size, size), -12.0, np.float32)
    for i in range(n):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, 40))]
        out[i] += (24.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) + rng.normal(0, 2, (size, size))).astype(np.float32)
    return out


@pytest.mark.parametrize("hw", [(470, 486), (512, 512), (1024, 1024), (300, 1500), (2000, 700), (7, 9)])
def test_assembly_matches_official_route(hw):
    rng = np.random.default_rng(hw[0])
    lowres = blobs(rng, 12)
    ours = assemble_labels(lowres, *hw)
    official, logits = ref.torch_assemble_labels(lowres, *hw, return_logits=True)
    diff = ours != official
    # wherever a pixel differs, the deciding mask's interpolated logit sits on the threshold
    if diff.any():
        thr = np.log(0.4 / 0.6)
        for y, x in zip(*np.nonzero(diff)):
            k = max(ours[y, x], official[y, x]) - 1
            assert abs(logits[k, y, x] - thr) <= 1e-5
    assert diff.mean() < 1e-4
    # and the NumPy reference gives the same map on these inputs (no logit near the threshold)
    np.testing.assert_array_equal(ours, ref.assemble_labels(lowres, *hw))


def test_empty_and_all_off():
    assert not assemble_labels(np.zeros((0, 256, 256), np.float32), 20, 30).any()
    assert not assemble_labels(np.full((3, 256, 256), -5, np.float32), 20, 30).any()


def test_later_mask_wins_and_border_masks():
    lowres = np.full((2, 256, 256), -10, np.float32)
    lowres[0, :128, :128] = 10  # touches the top-left border
    lowres[1, 64:192, 64:192] = 10
    out = assemble_labels(lowres, 512, 512)
    assert out[0, 0] == 1 and out[200, 200] == 2 and out[300, 300] == 2 and out[511, 511] == 0


def test_fill_holes_semantics():
    m = np.zeros((20, 20), np.int32)
    m[2:9, 2:9] = 1
    m[5, 5] = 0  # a hole
    m[12:14, 12:14] = 2  # 4 px: removed
    m[10:19, 10:19][m[10:19, 10:19] == 0] = 3
    m[14, 16] = 0
    out = fill_holes_and_remove_small_masks(m, min_size=25)
    np.testing.assert_array_equal(out, ref.fill_holes_and_remove_small_masks(m, 25))
    assert out[5, 5] == 1  # hole filled
    assert out[12, 12] == 2  # label 2 was removed, so label 3 became 2 and filled its holes over it


@pytest.mark.parametrize("seed", range(20))
def test_fill_holes_random(seed):
    rng = np.random.default_rng(seed)
    lowres = blobs(rng, int(rng.integers(1, 15)))
    labels = assemble_labels(lowres, int(rng.integers(20, 400)), int(rng.integers(20, 400)))
    np.testing.assert_array_equal(fill_holes_and_remove_small_masks(labels, 25),
                                  ref.fill_holes_and_remove_small_masks(labels.astype(np.int64), 25))
