"""Per-cell tables and QuPath-compatible GeoJSON from a segmentation.

Coordinates: rows/columns in pixels of the input image; GeoJSON uses (x = column, y = row)
with pixel corners, as QuPath expects.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage import measure

from .io import atomic_path
from .labels import fill_holes_and_remove_small_masks_with_sources

if TYPE_CHECKING:
    from .pipeline import Segmentation

TABLE_COLUMNS = (
    "label",
    "bbox_min_row",
    "bbox_min_col",
    "bbox_max_row",
    "bbox_max_col",
    "area",
    "centroid_row",
    "centroid_col",
    "detection_score",
    "iou_prediction",
)


def _field(seg, name: str):
    """``seg.<name>``, else ``seg.details.<name>``, else None."""
    value = getattr(seg, name, None)
    if value is None:
        value = getattr(getattr(seg, "details", None), name, None)
    return value


def cell_table(seg: Segmentation, min_size: int = 25) -> dict[str, np.ndarray]:
    """Columns of the per-cell table (one row per label present in ``seg.labels``).

    ``seg``: ``labels`` (H, W) int, the final label map; ``scores`` (M,) or None and
    ``iou_predictions`` (M,), per kept mask; ``label_sources`` int64 (K,) (on ``seg`` or on
    ``seg.details``): for each final label 1..K the kept mask (1-based, i.e. its raw label) it
    came from, as the hole-filling loop resolved it
    (``labels.fill_holes_and_remove_small_masks_with_sources``). Where the result has no
    ``label_sources`` (or it is None), they are recomputed with that function from
    ``labels_raw`` (on ``seg`` or ``seg.details``) and ``min_size``, which must then be the
    one the labels were made with. Labels without a source (a label map that is not the
    hole-filling output) get NaN scores.
    """
    labels = seg.labels
    n = int(labels.max(initial=0))
    idx = np.arange(1, n + 1)
    present = np.bincount(labels.ravel(), minlength=n + 1)[1:] > 0
    idx = idx[present]
    slices = ndimage.find_objects(labels)
    area = ndimage.sum_labels(np.ones_like(labels), labels, idx) if len(idx) else np.zeros(0)
    cent = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, idx)).reshape(-1, 2)
    bbox = np.array(
        [[slices[i - 1][0].start, slices[i - 1][1].start, slices[i - 1][0].stop, slices[i - 1][1].stop] for i in idx],
        dtype=np.int64,
    ).reshape(-1, 4)
    sources = _field(seg, "label_sources")
    if sources is None:
        raw = _field(seg, "labels_raw")
        if raw is None:
            raise ValueError("cell_table: the segmentation has neither label_sources nor labels_raw")
        sources = fill_holes_and_remove_small_masks_with_sources(raw, min_size)[1]
    sources = np.asarray(sources, np.int64)
    # index into the kept masks, -1 where a label has no (valid) source
    src = np.full(len(idx), -1, np.int64)
    has = idx <= len(sources)
    src[has] = sources[idx[has] - 1] - 1
    src[src >= len(seg.iou_predictions)] = -1

    def per_cell(values: np.ndarray | None) -> np.ndarray:
        out = np.full(len(idx), np.nan)
        if values is not None:
            ok = src >= 0
            out[ok] = np.asarray(values, np.float64)[src[ok]]
        return out

    return {
        "label": idx.astype(np.int64),
        "bbox_min_row": bbox[:, 0],
        "bbox_min_col": bbox[:, 1],
        "bbox_max_row": bbox[:, 2],
        "bbox_max_col": bbox[:, 3],
        "area": np.asarray(area, np.int64),
        "centroid_row": cent[:, 0],
        "centroid_col": cent[:, 1],
        "detection_score": per_cell(seg.scores),
        "iou_prediction": per_cell(seg.iou_predictions),
    }


def write_table(table: dict[str, np.ndarray], dest: str | os.PathLike) -> Path:
    """Write the table as CSV or Parquet (by suffix), atomically. Parquet needs pyarrow."""
    dest = Path(dest)
    if dest.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError("writing Parquet tables needs pyarrow (pip install pyarrow)") from e
        with atomic_path(dest) as tmp:
            pq.write_table(pa.table({k: table[k] for k in TABLE_COLUMNS}), tmp)
        return dest
    with atomic_path(dest) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(TABLE_COLUMNS)
            for row in zip(*(table[k] for k in TABLE_COLUMNS)):
                w.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else int(v) for v in row])
    return dest


def label_polygons(labels: np.ndarray) -> dict[int, list[list[float]]]:
    """Outer boundary of each label as a closed ring of (x, y) pixel-corner coordinates.

    A label made of several pieces gives the ring of its largest piece.
    """
    out: dict[int, list[list[float]]] = {}
    for i, slc in enumerate(ndimage.find_objects(labels), 1):
        if slc is None:
            continue
        mask = np.pad(labels[slc] == i, 1)
        # contours at 0.5 on the padded mask run along pixel edges' midpoints; shift to corners
        contours = measure.find_contours(mask.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        ys = ring[:, 0] - 1 + slc[0].start + 0.5
        xs = ring[:, 1] - 1 + slc[1].start + 0.5
        pts = np.stack([xs, ys], 1).round(3).tolist()
        if pts[0] != pts[-1]:
            pts.append(pts[0])
        out[i] = pts
    return out


def write_geojson(labels: np.ndarray, dest: str | os.PathLike, table: dict[str, np.ndarray] | None = None) -> Path:
    """QuPath-compatible GeoJSON FeatureCollection: one detection polygon per label."""
    rows = {int(lab): k for k, lab in enumerate(table["label"])} if table else {}
    features = []
    for label, ring in label_polygons(labels).items():
        props = {"objectType": "detection", "classification": {"name": "Cell"}, "label": label}
        if label in rows:
            k = rows[label]
            props["measurements"] = {
                c: float(table[c][k]) for c in ("area", "detection_score", "iou_prediction") if np.isfinite(table[c][k])
            }
        features.append(
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}
        )
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return Path(dest)
