"""Label assembly and hole filling against plain reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellsam_trt.labels import assemble_labels, fill_holes_and_remove_small_masks

torch = pytest.importorskip("torch")


def reference_labels(lowres: np.ndarray, h: int, w: int):
    """The official per-mask route: two torch bilinear upsamplings, sigmoid > 0.4, later wins.
    Also returns the interpolated logits, to judge disagreeing pixels."""
    t = torch.from_numpy(lowres)[:, None]
    up = torch.nn.functional.interpolate(t, (1024, 1024), mode="bilinear", align_corners=False)
    up = torch.nn.functional.interpolate(up, (h, w), mode="bilinear", align_corners=False)[:, 0]
    on = (torch.sigmoid(up) > 0.4).numpy()
    labels = (on * np.arange(1, len(on) + 1)[:, None, None]).max(0) if len(on) else np.zeros((h, w), int)
    return labels, up.numpy()


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
    ref, logits = reference_labels(lowres, *hw)
    diff = ours != ref
    # wherever a pixel differs, the deciding mask's interpolated logit sits on the threshold
    if diff.any():
        thr = np.log(0.4 / 0.6)
        for y, x in zip(*np.nonzero(diff)):
            k = max(ours[y, x], ref[y, x]) - 1
            assert abs(logits[k, y, x] - thr) <= 1e-5
    assert diff.mean() < 1e-4


def test_empty_and_all_off():
    assert not assemble_labels(np.zeros((0, 256, 256), np.float32), 20, 30).any()
    assert not assemble_labels(np.full((3, 256, 256), -5, np.float32), 20, 30).any()


def test_later_mask_wins_and_border_masks():
    lowres = np.full((2, 256, 256), -10, np.float32)
    lowres[0, :128, :128] = 10  # touches the top-left border
    lowres[1, 64:192, 64:192] = 10
    out = assemble_labels(lowres, 512, 512)
    assert out[0, 0] == 1 and out[200, 200] == 2 and out[300, 300] == 2 and out[511, 511] == 0


def official_fill_holes(masks, min_size):
    """cellpose / official loop, kept here as the reference."""
    masks = masks.copy()
    j = 0
    for i, slc in enumerate(ndimage.find_objects(masks)):
        if slc is not None:
            msk = masks[slc] == (i + 1)
            npix = msk.sum()
            if min_size > 0 and npix < min_size:
                masks[slc][msk] = 0
            elif npix > 0:
                msk = ndimage.binary_fill_holes(msk)
                masks[slc][msk] = j + 1
                j += 1
    return masks


def test_fill_holes_semantics():
    m = np.zeros((20, 20), np.int32)
    m[2:9, 2:9] = 1
    m[5, 5] = 0  # a hole
    m[12:14, 12:14] = 2  # 4 px: removed
    m[10:19, 10:19][m[10:19, 10:19] == 0] = 3
    m[14, 16] = 0
    out = fill_holes_and_remove_small_masks(m, min_size=25)
    np.testing.assert_array_equal(out, official_fill_holes(m, 25))
    assert out[5, 5] == 1  # hole filled
    assert out[12, 12] == 2  # label 2 was removed, so label 3 became 2 and filled its holes over it


@pytest.mark.parametrize("seed", range(20))
def test_fill_holes_random(seed):
    rng = np.random.default_rng(seed)
    lowres = blobs(rng, int(rng.integers(1, 15)))
    labels = assemble_labels(lowres, int(rng.integers(20, 400)), int(rng.integers(20, 400)))
    np.testing.assert_array_equal(fill_holes_and_remove_small_masks(labels, 25),
                                  official_fill_holes(labels.astype(np.int64), 25))
