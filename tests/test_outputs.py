"""Per-cell table and GeoJSON from constructed segmentations."""

from __future__ import annotations

import json

import numpy as np

from cellsam_trt.labels import fill_holes_and_remove_small_masks
from cellsam_trt.outputs import cell_table, label_polygons, write_geojson, write_table
from cellsam_trt.pipeline import Segmentation


def make_seg():
    raw = np.zeros((30, 40), np.int32)
    raw[2:8, 2:8] = 1  # 36 px, kept -> final 1
    raw[10:12, 10:12] = 2  # 4 px, removed
    raw[15:25, 20:35] = 3  # kept -> final 2
    raw[18, 25] = 0  # a hole, filled
    final = fill_holes_and_remove_small_masks(raw, 25)
    return Segmentation(labels=final, labels_raw=raw, boxes=np.zeros((3, 4), np.float32),
                        scores=np.array([0.9, 0.8, 0.7], np.float32),
                        iou_predictions=np.array([0.6, 0.55, 0.95], np.float32),
                        prompt_index=np.arange(3))


def test_table_maps_final_labels_to_their_prompts():
    seg = make_seg()
    t = cell_table(seg, 25)
    np.testing.assert_array_equal(t["label"], [1, 2])
    np.testing.assert_allclose(t["detection_score"], [0.9, 0.7])
    np.testing.assert_allclose(t["iou_prediction"], [0.6, 0.95])
    np.testing.assert_array_equal(t["area"], [36, 150])
    np.testing.assert_array_equal(np.stack([t["bbox_min_row"], t["bbox_min_col"], t["bbox_max_row"], t["bbox_max_col"]], 1),
                                  [[2, 2, 8, 8], [15, 20, 25, 35]])
    np.testing.assert_allclose(t["centroid_row"], [4.5, 19.5])


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
