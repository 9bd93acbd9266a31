"""Reading images and prompt files, writing label maps atomically.

Readers: TIFF / OME-TIFF (tifffile), PNG / JPEG (imageio), NPY. Writers: compressed TIFF
(uint16 or uint32 by label count), NPY, 16-bit PNG. Every write goes to a temporary file in
the destination folder and is renamed into place, so an interrupted job never leaves a
half-written output.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy"}


class InputError(ValueError):
    """An input file that cannot be used; the message names the file and the problem."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Image file -> ndarray as stored ((H, W), (H, W, C) or (C, H, W))."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
        elif suffix == ".npy":
            image = np.load(path, allow_pickle=False)
        elif suffix in (".png", ".jpg", ".jpeg"):
            import imageio.v3 as iio

            image = iio.imread(path)
        else:
            raise InputError(f"{path}: unsupported file type {suffix!r}")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot be read: {type(e).__name__}: {e}") from e
    image = np.squeeze(np.asarray(image))
    if image.size == 0:
        raise InputError(f"{path}: no image data (empty or corrupt file; shape {image.shape})")
    return image


def read_boxes(path: str | os.PathLike) -> np.ndarray:
    """``{"boxes": [[x1, y1, x2, y2], ...]}`` (original pixels, x = column) -> (N, 4) float32."""
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text())
        boxes = np.asarray(data["boxes"], dtype=np.float32)
    except Exception as e:
        raise InputError(f"{path}: not a box file ({{\"boxes\": [[x1, y1, x2, y2], ...]}}): {e}") from e
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InputError(f"{path}: boxes must be [x1, y1, x2, y2] lists, got shape {boxes.shape}")
    return boxes


def read_points(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``{"points": [[[x, y], ...], ...], "point_labels": [[1, ...], ...]}`` -> ((N, P, 2) float32,
    (N, P) int64); labels default to 1 (cell); 0 = background, -1 = padding."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        pts = np.asarray(data["points"], dtype=np.float32)
        if pts.ndim == 2:
            pts = pts[None]
        labels = np.asarray(data.get("point_labels", np.ones(pts.shape[:2])), dtype=np.int64)
    except Exception as e:
        raise InputError(f"{path}: not a point file ({{\"points\": [[[x, y], ...], ...]}}): {e}") from e
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise InputError(f"{path}: points must be [[[x, y], ...], ...] (one list of points per prompt), got shape {pts.shape}")
    if labels.shape != pts.shape[:2]:
        raise InputError(f"{path}: point_labels shape {labels.shape} does not match the points {pts.shape[:2]}")
    return pts, labels


@contextmanager
def atomic_path(dest: str | os.PathLike):
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def label_dtype_for(max_label: int) -> np.dtype:
    """uint16 when the labels fit, else uint32."""
    return np.dtype(np.uint16) if int(max_label) <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def label_dtype(labels: np.ndarray) -> np.dtype:
    return label_dtype_for(labels.max(initial=0))


def write_labels(labels: np.ndarray, dest: str | os.PathLike, fmt: str = "tif") -> Path:
    """Write a label map (H, W) atomically as compressed TIFF, NPY or 16-bit PNG."""
    dest = Path(dest)
    out = labels.astype(label_dtype(labels))
    with atomic_path(dest) as tmp:
        if fmt == "tif":
            import tifffile

            tifffile.imwrite(tmp, out, compression="zlib")
        elif fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, out)
        elif fmt == "png":
            if out.dtype != np.uint16:
                raise ValueError(f"{dest}: {int(labels.max())} labels do not fit a 16-bit PNG; use tif or npy")
            import imageio.v3 as iio

            iio.imwrite(tmp, out, extension=".png")
        else:
            raise ValueError(f"unknown label format {fmt!r}")
    return dest


def write_json(data, dest: str | os.PathLike) -> Path:
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=str))
    return Path(dest)
