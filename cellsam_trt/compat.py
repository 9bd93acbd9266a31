"""The official ``cellSAM`` package's functions, as drop-in replacements on this engine.

    from cellsam_trt.compat import cellsam_pipeline        # instead of: from cellSAM import cellsam_pipeline
    mask = cellsam_pipeline(img, use_wsi=False)

``cellsam_pipeline``, ``segment_cellular_image``, ``get_model`` and ``get_local_model`` take the
official arguments and return the official types (v1.2, commit 35bc6e0). A "model" here is a
``cellsam_trt.CellSAM`` (``CellSAM.load``, ``get_model``, ``get_local_model``); ``get_model`` and
``get_local_model`` are ``cellsam_trt.models``' (re-exported): a missing model is fetched only
with a token passed in (``get_model(token=...)``, or ``cellsam-trt fetch`` once), never from
the environment. The official steps run with their intended semantics
(``cellsam_trt.official``); README.md, "Migrating from the official package", lists the
differences.

Tiling (``use_wsi=True``): the official code cuts the image into blocks of ``block_size``
pixels, each extended by ``overlap`` pixels on every side (tiles of ``block_size + 2 * overlap``
pixels, squashed to the 1024 x 1024 model frame), and links labels whose IoU across a block
face reaches ``iou_threshold`` within ``iou_depth`` pixels of it. Here the same tiles run in the
tiled mode (``cellsam_trt.slide``, ``tile_settings``): ``TileSettings(tile_size=1024,
scale=1024 / (block_size + 2 * overlap), overlap=2 * overlap * scale, link_iou=iou_threshold)``,
so each tile has the official tile's size and is seen at the official scale; neighbouring tiles
overlap by ``2 * overlap`` image pixels, split in the middle, and labels are linked by IoU over
the whole overlap (``iou_depth`` is accepted and has no effect; the official code narrows the
compared strips to it, and raises on a multi-tile image when it exceeds ``overlap``). Tiles are
spread evenly over the image instead of padding its edges by wrap-around, an image no larger
than one tile is one tile, and a tile that fails is retried and then reported
(``RuntimeError``) instead of being replaced by zeros.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import official
from . import pipeline as P
from . import preprocess as pre
from .api import CellSAM
from .models import get_local_model, get_model

__all__ = ["cellsam_pipeline", "segment_cellular_image", "get_model", "get_local_model"]


def _engine(model) -> CellSAM:
    if not isinstance(model, CellSAM):
        raise TypeError(
            "model must be a cellsam_trt CellSAM (CellSAM.load, cellsam_trt.compat.get_model or get_local_model), "
            f"not {type(model).__name__}"
        )
    return model


def _check_device(model: CellSAM, device: str) -> None:
    """The official ``device`` moves the model; here the model runs where it was loaded, and a
    CUDA device asked for a model loaded elsewhere is an error (never a silent CPU run)."""
    if "cuda" in str(device) and not str(model.backend.device).startswith("cuda"):
        raise ValueError(
            f"device {device!r} asked for, but the model runs on {model.backend.device}; "
            "load it there: CellSAM.load(..., device='cuda')"
        )


def segment_cellular_image(
    img: np.ndarray,
    model: CellSAM,
    normalize: bool = True,
    postprocess: bool = False,
    remove_boundaries: bool = False,
    bounding_boxes=None,
    bbox_threshold: float = 0.4,
    fast: bool = False,
    device: str = "cpu",
):
    """The official ``segment_cellular_image``: segment one image with ``model``.

    img: (H, W) or (H, W, C) / (C, H, W) with C <= 3 (the smallest axis is the channel axis),
    any numeric dtype. normalize: percentile clip + CLAHE; postprocess / remove_boundaries:
    ``official.postprocess`` / ``official.remove_boundaries``; bounding_boxes: (N, 4) XYXY in
    original pixels (x = column), or None for automatic mode (CellFinder, ``bbox_threshold``).
    fast: accepted; every call decodes all boxes in one batched call, which gives the per-box
    results. device: see ``_check_device``; the model's other settings (IoU threshold,
    minimum size, channels) are those it was loaded with.

    -> (mask (H, W) int64 labels, embedding (1, 256, 64, 64) float32, boxes (K, 4) float64 XYXY
    original pixels of the kept prompts). When no mask is kept: (zeros (H, W) int64, None,
    None) and a warning, as the official code intends (it crashes there, and returns a
    (3, H, W) array on the path it reaches).
    """
    m = _engine(model)
    _check_device(m, device)
    settings = replace(
        m.settings,
        normalize=bool(normalize),
        minmax=False,
        low_contrast_enhancement=False,
        postprocess=bool(postprocess),
        remove_boundaries=bool(remove_boundaries),
        bbox_threshold=float(bbox_threshold),
    )
    prompts = None if bounding_boxes is None else P.Prompts(boxes=bounding_boxes)
    seg = P.segment(m.backend, img, prompts, settings, return_embedding=True)
    if len(seg.details.prompt_index) == 0:
        warnings.warn("No cells detected in the image.", stacklevel=2)
        return np.zeros(seg.labels.shape, np.int64), None, None
    embedding = np.asarray(seg.details.embedding, np.float32)
    return seg.labels.astype(np.int64), embedding, np.asarray(seg.boxes, np.float64)


def tile_settings(block_size: int = 400, overlap: int = 56, iou_depth: int = 56, iou_threshold: float = 0.5):
    """The official tiling arguments as ``slide.grid.TileSettings`` (see the module doc;
    ``iou_depth`` has no effect); ValueError for a block or overlap that cannot tile."""
    from .slide.grid import TileSettings

    if block_size < 1 or overlap < 0:
        raise ValueError(f"block_size must be >= 1 and overlap >= 0, got {block_size} and {overlap}")
    side = block_size + 2 * overlap  # image pixels of an official tile
    scale = 1024 / side
    return TileSettings(tile_size=1024, overlap=round(2 * overlap * scale), scale=scale, link_iou=iou_threshold)


def _tiled(model: CellSAM, hwc: np.ndarray, settings: P.SegmentSettings, tiles) -> np.ndarray:
    """Segment an (H, W, 3) image in memory in the tiled mode -> (H, W) labels."""
    import importlib.util

    if importlib.util.find_spec("zarr") is None:
        raise ImportError(
            "cellsam_pipeline(use_wsi=True) needs zarr (the tile store): pip install 'cellsam-trt[slide]'"
        )
    from .slide.io import SlideSource, read_labels
    from .slide.run import SlideOutput, segment_slide

    engine = CellSAM(model.backend, settings, model.description.get("scheduler", "auto"))
    with tempfile.TemporaryDirectory(prefix="cellsam-wsi-") as tmp:
        dest = Path(tmp) / "labels.ome.zarr"
        res = segment_slide(SlideSource(array=hwc.astype(np.float32), axes="YXC"), engine, SlideOutput(dest), tiles)
        if res.failed:
            raise RuntimeError(
                f"{len(res.failed)} of {res.grid['tiles']} tiles failed: " + "; ".join(msg for _, _, msg in res.failed)
            )
        return read_labels(dest)


def cellsam_pipeline(
    img: np.ndarray,
    chunks: int = 256,
    model_path=None,
    bbox_threshold: float = 0.4,
    low_contrast_enhancement: bool = False,
    swap_channels: bool = False,
    use_wsi: bool = True,
    gauge_cell_size: bool = False,
    block_size: int = 400,
    overlap: int = 56,
    iou_depth: int = 56,
    iou_threshold: float = 0.5,
    *,
    model: CellSAM | None = None,
) -> np.ndarray:
    """The official ``cellsam_pipeline``: pre-normalise, optionally enhance, segment whole or tiled.

    img: (H, W) or (H, W, C) / (C, H, W) with C <= 3 (channels (blank, nuclear, whole-cell) as
    the official docs say; the smallest axis is the channel axis), any numeric dtype. Steps:
    float32 per-channel min-max (``official.minmax``; a 2-D image is one channel), with
    ``low_contrast_enhancement`` CLAHE + gamma and CellFinder threshold 0.15 in the high-change
    branches (``official.enhance_low_contrast``), then
    - ``use_wsi=False``: the whole image (percentile clip + CLAHE, ``bbox_threshold``);
    - ``use_wsi=True``: tiles (``tile_settings(block_size, overlap, iou_depth, iou_threshold)``,
      module doc), each tile with percentile clip + CLAHE;
    - ``use_wsi=True, gauge_cell_size=True``: one tiled pass without percentile clip + CLAHE (as
      the official gauge runs it); when its median cell covers under 0.2 % of the image
      (``official.gauge_tiled``) that is the result (the official code runs the identical pass
      a second time), else the whole image, also without them.
    model_path: a checkpoint for ``get_local_model``; None: ``get_model()`` (the official
    default model); model (keyword, not in the official signature): a ``CellSAM`` already
    loaded, used instead of loading one per call. chunks, swap_channels: accepted, no effect
    (the official code does not use them either). bbox_threshold applies on every path (the
    official whole-image paths drop it and use 0.4).

    -> (H, W) uint32 label map (0 = background).
    """
    owned = None
    if model is None:
        model = owned = get_local_model(model_path) if model_path is not None else get_model()
    m = _engine(model)
    try:
        image = P.validate_image(img)
        hwc = pre.to_three_channels(image)
        n_channels = 1 if image.ndim == 2 else min(image.shape)
        hwc, threshold = official.prenormalize(hwc, n_channels, low_contrast_enhancement)
        settings = replace(
            m.settings,
            bbox_threshold=float(bbox_threshold) if threshold is None else threshold,
            channels=P.Channels(axis=-1),
            minmax=False,
            low_contrast_enhancement=False,
            postprocess=False,
            remove_boundaries=False,
        )
        if not use_wsi:
            return P.segment(m.backend, hwc, None, settings).labels.astype(np.uint32)
        tiles = tile_settings(block_size, overlap, iou_depth, iou_threshold)
        if not gauge_cell_size:
            return _tiled(m, hwc, settings, tiles).astype(np.uint32)
        raw = replace(settings, normalize=False)
        labels = _tiled(m, hwc, raw, tiles)
        if not official.gauge_tiled(labels):
            labels = P.segment(m.backend, hwc, None, raw).labels
        return labels.astype(np.uint32)
    finally:
        if owned is not None:
            owned.close()
