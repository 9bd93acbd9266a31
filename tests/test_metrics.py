"""Matched-instance IoU between label maps."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam_trt.metrics import iou_matrix, matched_instance_iou


def _discs(shape=(64, 80), centres=((15, 20), (40, 50), (20, 60)), r=7):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = i
    return lab


def test_identical_and_relabelled_maps_agree_fully():
    a = _discs()
    perm = np.array([0, 3, 1, 2], np.int32)[a]  # same instances, other ids
    for b in (a, perm):
        m = matched_instance_iou(a, b)
        assert m["mean_iou"] == 1.0 and m["frac_matched"] == 1.0 and m["f1"] == 1.0
        assert m["n_reference"] == m["n_candidate"] == m["n_matched"] == 3 and m["pixel_agreement"] == 1.0


def test_shifted_and_missing_instances():
    a = _discs()
    b = np.roll(a, 2, axis=1)
    m = matched_instance_iou(a, b)
    assert 0.5 < m["mean_iou"] < 1.0 and m["frac_matched"] == 1.0
    c = a.copy()
    c[c == 2] = 0
    m = matched_instance_iou(a, c)
    assert m["mean_iou"] == 1.0 and m["frac_matched"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(0.8)


def test_matching_is_one_to_one():
    a = np.zeros((10, 20), np.int32)
    a[:, :10] = 1
    b = np.zeros_like(a)
    b[:, :5] = 1
    b[:, 5:10] = 2  # a split instance: only one half can be matched
    ids_a, ids_b, iou = iou_matrix(a, b)
    np.testing.assert_allclose(iou, [[0.5, 0.5]])
    m = matched_instance_iou(a, b)
    assert m["n_matched"] == 1 and m["mean_iou"] == 0.5 and m["f1"] == pytest.approx(2 / 3)


def test_empty_maps_and_shape_mismatch():
    z = np.zeros((8, 8), np.int32)
    assert matched_instance_iou(z, z)["mean_iou"] == 1.0
    one = z.copy()
    one[2:4, 2:4] = 1
    assert matched_instance_iou(one, z)["frac_matched"] == 0.0
    assert matched_instance_iou(z, one)["f1"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        matched_instance_iou(z, np.zeros((8, 9), np.int32))


def test_min_area_ignores_fragments():
    a = _discs()
    b = a.copy()
    a[0, 0] = 9  # a one-pixel fragment only in the reference
    assert matched_instance_iou(a, b)["frac_matched"] == pytest.approx(3 / 4)
    m = matched_instance_iou(a, b, min_area=5)
    assert m["n_reference"] == 3 and m["frac_matched"] == 1.0 and m["mean_iou"] == 1.0
