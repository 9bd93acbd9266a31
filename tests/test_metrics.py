"""Matched-instance agreement of two label maps."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam_trt.metrics import iou_matrix, match_instances


def _discs(shape=(64, 80), specs=((20, 20, 8), (40, 50, 10), (15, 60, 5))):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx, r) in enumerate(specs, 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return lab


def test_identical_and_relabelled_maps_agree():
    a = _discs()
    m = match_instances(a, a)
    assert (m.n_reference, m.n_test, m.mean_iou, m.frac_matched_50, m.precision_50) == (3, 3, 1.0, 1.0, 1.0)
    b = np.where(a > 0, 10 - a, 0)  # same instances, other ids
    m = match_instances(a, b)
    assert m.mean_iou == 1.0 and sorted(map(tuple, m.pairs)) == [(1, 9), (2, 8), (3, 7)]
    assert m.pixel_agreement < 1.0  # ids differ, instances do not


def test_known_iou_of_a_shifted_square():
    a = np.zeros((20, 20), np.int32)
    b = np.zeros((20, 20), np.int32)
    a[0:10, 0:10] = 1
    b[0:10, 5:15] = 4  # overlap 50 of union 150
    iou, la, lb = iou_matrix(a, b)
    assert la.tolist() == [1] and lb.tolist() == [4]
    assert iou[0, 0] == pytest.approx(50 / 150)
    m = match_instances(a, b)
    assert m.mean_iou == pytest.approx(1 / 3) and m.frac_matched_50 == 0.0


def test_missing_and_extra_instances():
    a = _discs()
    b = a.copy()
    b[b == 2] = 0  # a missed cell
    m = match_instances(a, b)
    assert m.n_test == 2 and m.mean_iou == pytest.approx(2 / 3) and m.frac_matched_50 == pytest.approx(2 / 3)
    assert m.precision_50 == 1.0
    m = match_instances(b, a)  # an extra cell
    assert m.mean_iou == 1.0 and m.precision_50 == pytest.approx(2 / 3)


def test_one_to_one_assignment():
    # one big test instance covering two reference instances can match only one of them
    a = np.zeros((10, 20), np.int32)
    a[:, :10], a[:, 10:] = 1, 2
    b = np.ones((10, 20), np.int32)
    m = match_instances(a, b)
    assert len(m.pairs) == 1 and m.mean_iou == pytest.approx(0.5 / 2)


def test_empty_maps():
    z = np.zeros((5, 5), np.int32)
    assert match_instances(z, z).mean_iou == 1.0
    assert match_instances(_discs(), np.zeros((64, 80), np.int32)).mean_iou == 0.0
    with pytest.raises(ValueError, match="shape"):
        match_instances(z, np.zeros((5, 6), np.int32))


def test_min_area_ignores_fragments():
    a = np.zeros((40, 40), np.int32)
    a[5:15, 5:15] = 1
    a[20:30, 20:30] = 2
    b = a.copy()
    a[0, 0] = 9  # a one-pixel fragment only in the reference
    assert match_instances(a, b).frac_matched_50 == pytest.approx(2 / 3)
    m = match_instances(a, b, min_area=5)
    assert m.n_reference == 2 and m.frac_matched_50 == 1.0 and m.mean_iou == 1.0 and m.f1_50 == 1.0
