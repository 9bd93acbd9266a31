"""Per-cell table and GeoJSON from constructed segmentations."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from cellsam_trt.labels import fill_holes_and_remove_small_masks, fill_holes_and_remove_small_masks_with_sources
from cellsam_trt.outputs import cell_table, label_polygons, write_geojson, write_table


def result(raw, scores, iou, min_size=25, with_sources=True):
    """A segmentation result as the pipeline builds it: the final map from the raw one; with
    ``with_sources`` the new ``label_sources`` field, without it an older result object."""
    final, sources = fill_holes_and_remove_small_masks_with_sources(raw, min_size)
    seg = SimpleNamespace(
        labels=final,
        labels_raw=raw,
        boxes=np.zeros((len(iou), 4), np.float32),
        scores=None if scores is None else np.asarray(scores, np.float32),
        iou_predictions=np.asarray(iou, np.float32),
        prompt_index=np.arange(len(iou)),
    )
    if with_sources:
        seg.label_sources = sources
    return seg


def make_seg(with_sources=True):
    raw = np.zeros((30, 40), np.int32)
    raw[2:8, 2:8] = 1  # 36 px, kept -> final 1
    raw[10:12, 10:12] = 2  # 4 px, removed
    raw[15:25, 20:35] = 3  # kept -> final 2
    raw[18, 25] = 0  # a hole, filled
    return result(raw, [0.9, 0.8, 0.7], [0.6, 0.55, 0.95], with_sources=with_sources)


@pytest.mark.parametrize("with_sources", [True, False])
def test_table_maps_final_labels_to_their_prompts(with_sources):
    seg = make_seg(with_sources)
    t = cell_table(seg, 25)
    np.testing.assert_array_equal(t["label"], [1, 2])
    np.testing.assert_allclose(t["detection_score"], [0.9, 0.7])
    np.testing.assert_allclose(t["iou_prediction"], [0.6, 0.95])
    np.testing.assert_array_equal(t["area"], [36, 150])
    bbox = np.stack([t["bbox_min_row"], t["bbox_min_col"], t["bbox_max_row"], t["bbox_max_col"]], 1)
    np.testing.assert_array_equal(bbox, [[2, 2, 8, 8], [15, 20, 25, 35]])
    np.testing.assert_allclose(t["centroid_row"], [4.5, 19.5])


def ring_with_a_cell_inside():
    """Raw mask 1: a ring whose hole holds all of raw mask 2 (36 px, above min_size); raw mask 3
    elsewhere. The fill loop fills mask 1's hole over mask 2, so mask 2 gets no final label and
    mask 3 becomes final label 2 -- counting raw pixels (mask 2 has 36 >= 25) would say that
    final label 2 is mask 2."""
    raw = np.zeros((40, 40), np.int32)
    raw[2:16, 2:16] = 1
    raw[4:14, 4:14] = 0  # the hole: 10 x 10
    raw[6:12, 6:12] = 2  # wholly inside the hole, with background around it
    raw[24:32, 24:32] = 3
    return raw


@pytest.mark.parametrize("with_sources", [True, False])
def test_table_when_a_later_mask_lies_in_an_earlier_ones_hole(with_sources):
    raw = ring_with_a_cell_inside()
    seg = result(raw, [0.9, 0.8, 0.7], [0.61, 0.62, 0.63], with_sources=with_sources)
    assert (np.unique(seg.labels) == [0, 1, 2]).all()
    assert (seg.labels[2:16, 2:16] == 1).all() and (seg.labels[24:32, 24:32] == 2).all()
    if with_sources:
        np.testing.assert_array_equal(seg.label_sources, [1, 3])
    t = cell_table(seg, 25)
    np.testing.assert_array_equal(t["label"], [1, 2])
    np.testing.assert_array_equal(t["area"], [14 * 14, 64])
    np.testing.assert_allclose(t["detection_score"], [0.9, 0.7])  # final 2 is raw mask 3
    np.testing.assert_allclose(t["iou_prediction"], [0.61, 0.63])


def test_table_when_a_swallowed_mask_shrinks_below_min_size():
    """A later mask partly inside an earlier one's hole keeps fewer than min_size pixels: removed."""
    raw = ring_with_a_cell_inside()
    raw[7:9, 18:20] = 2  # 4 px of mask 2 outside the ring: 40 px raw, 4 after mask 1's filling
    seg = result(raw, None, [0.61, 0.62, 0.63])
    np.testing.assert_array_equal(seg.label_sources, [1, 3])
    t = cell_table(seg, 25)
    np.testing.assert_array_equal(t["label"], [1, 2])
    assert np.isnan(t["detection_score"]).all()  # no scores (box prompts)
    np.testing.assert_allclose(t["iou_prediction"], [0.61, 0.63])


def test_table_of_a_label_swallowed_by_a_later_hole_filling():
    """Final label 1 wholly inside raw mask 2's hole: covered, only final 2 is left, and it is mask 2."""
    raw = np.zeros((20, 20), np.int32)
    raw[6:12, 6:12] = 1
    raw[2:16, 2:16][raw[2:16, 2:16] == 0] = 2
    raw[4:14, 4:14][raw[4:14, 4:14] == 2] = 0
    seg = result(raw, [0.9, 0.8], [0.61, 0.62])
    np.testing.assert_array_equal(seg.label_sources, [1, 2])
    t = cell_table(seg, 25)
    np.testing.assert_array_equal(t["label"], [2])
    np.testing.assert_allclose(t["detection_score"], [0.8])
    np.testing.assert_allclose(t["iou_prediction"], [0.62])


def test_table_takes_label_sources_from_the_result():
    """label_sources is used as given (not recomputed from labels_raw)."""
    seg = make_seg()
    seg.label_sources = np.array([3, 1], np.int64)
    seg.labels_raw = None  # not read when label_sources is there
    t = cell_table(seg, 25)
    np.testing.assert_allclose(t["detection_score"], [0.7, 0.9])
    np.testing.assert_allclose(t["iou_prediction"], [0.95, 0.6])


def test_csv_round_trip(tmp_path):
    t = cell_table(make_seg(), 25)
    p = write_table(t, tmp_path / "cells.csv")
    lines = p.read_text().splitlines()
    assert lines[0].split(",")[0] == "label" and len(lines) == 3
    assert lines[2].split(",")[:6] == ["2", "15", "20", "25", "35", "150"]


def test_polygons_trace_the_pixel_edges(tmp_path):
    seg = make_seg()
    rings = label_polygons(seg.labels)
    ring = np.array(rings[1])
    assert ring[0].tolist() == ring[-1].tolist()
    xs, ys = ring[:, 0], ring[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2.0, 8.0, 2.0, 8.0)
    # shoelace area of the traced ring: the square minus its four cut corners
    area = 0.5 * abs(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1]))
    assert abs(area - 36) <= 2
    gj = json.loads(write_geojson(seg.labels, tmp_path / "c.geojson", cell_table(seg, 25)).read_text())
    assert [f["properties"]["label"] for f in gj["features"]] == [1, 2]
    assert gj["features"][1]["properties"]["measurements"]["area"] == 150


def test_final_map_unchanged_by_sources_variant():
    raw = ring_with_a_cell_inside()
    for min_size in (0, 25, 100):
        np.testing.assert_array_equal(
            fill_holes_and_remove_small_masks_with_sources(raw, min_size)[0],
            fill_holes_and_remove_small_masks(raw, min_size),
        )


def test_table_reads_label_sources_from_details():
    """A result that keeps labels_raw / label_sources in ``seg.details``."""
    raw = ring_with_a_cell_inside()
    flat = result(raw, [0.9, 0.8, 0.7], [0.61, 0.62, 0.63])
    for details in (SimpleNamespace(labels_raw=raw, label_sources=flat.label_sources), SimpleNamespace(labels_raw=raw)):
        seg = SimpleNamespace(
            labels=flat.labels,
            boxes=flat.boxes,
            scores=flat.scores,
            iou_predictions=flat.iou_predictions,
            details=details,
        )
        t = cell_table(seg)
        np.testing.assert_allclose(t["detection_score"], [0.9, 0.7])
        np.testing.assert_allclose(t["iou_prediction"], [0.61, 0.63])
    with pytest.raises(ValueError, match="label_sources"):
        cell_table(SimpleNamespace(labels=flat.labels, scores=None, iou_predictions=flat.iou_predictions))
