"""``cellsam_trt.compat``: the official functions' signatures and return types, end to end on the
tiny synthetic model (prompted mode segments cells; automatic mode finds none with random
weights, and the tests assert that), the official tiling mapped onto the tiled mode, and the
cell-size gauge run once."""

from __future__ import annotations

import importlib.util
import inspect
import warnings

import numpy as np
import pytest

from cellsam_trt import CellSAM, SegmentSettings, compat, official
from cellsam_trt import labels as label_ops
from cellsam_trt import pipeline as P
from cellsam_trt import preprocess as pre
from cellsam_trt.slide.grid import TileGrid
from test_pipeline import cells_image

KEEP_ALL = SegmentSettings(iou_threshold=-1e9)  # the tiny random model predicts low IoUs: keep every mask


@pytest.fixture(scope="module")
def model(tiny_export):
    with CellSAM.load(tiny_export, settings=KEEP_ALL, threads=2) as m:
        yield m


class Spy:
    """Records the CellFinder inputs a backend is given (and passes them on unchanged)."""

    def __init__(self, backend):
        self.backend, self.real, self.inputs = backend, backend.detect, []

    def __enter__(self):
        self.backend.detect = lambda x, **k: self.inputs.append(np.array(x)) or self.real(x, **k)
        return self

    def __exit__(self, *exc):
        self.backend.detect = self.real


def test_signatures_are_the_official_ones():
    sci = inspect.signature(compat.segment_cellular_image)
    assert [(p.name, p.default) for p in list(sci.parameters.values())[2:]] == [
        ("normalize", True),
        ("postprocess", False),
        ("remove_boundaries", False),
        ("bounding_boxes", None),
        ("bbox_threshold", 0.4),
        ("fast", False),
        ("device", "cpu"),
    ]
    pipe = inspect.signature(compat.cellsam_pipeline)
    official_args = [
        ("chunks", 256),
        ("model_path", None),
        ("bbox_threshold", 0.4),
        ("low_contrast_enhancement", False),
        ("swap_channels", False),
        ("use_wsi", True),
        ("gauge_cell_size", False),
        ("block_size", 400),
        ("overlap", 56),
        ("iou_depth", 56),
        ("iou_threshold", 0.5),
    ]
    positional = [p for p in pipe.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional[1:]] == official_args


def test_segment_cellular_image_prompted(model):
    img, boxes = cells_image(seed=7)
    mask, embedding, kept = compat.segment_cellular_image(img, model, bounding_boxes=boxes.tolist())
    view = model.prompt(img)
    res = view.segment(boxes=boxes)
    assert mask.dtype == np.int64 and mask.shape == img.shape and mask.max() > 0
    np.testing.assert_array_equal(mask, res.labels)
    assert embedding.dtype == np.float32 and embedding.shape == (1, 256, 64, 64)
    np.testing.assert_array_equal(embedding, view.embedding)
    assert kept.dtype == np.float64
    np.testing.assert_array_equal(kept, res.boxes)

    # postprocess and remove_boundaries, in the official order, on the same raw labels
    mask2, _, _ = compat.segment_cellular_image(img, model, True, True, True, boxes)
    raw = res.details.labels_raw
    want = official.remove_boundaries(label_ops.fill_holes_and_remove_small_masks(official.postprocess(raw), 25))
    np.testing.assert_array_equal(mask2, want)


def test_segment_cellular_image_without_normalisation(model):
    img, boxes = cells_image(seed=8)
    _, emb_raw, _ = compat.segment_cellular_image(img, model, normalize=False, bounding_boxes=boxes)
    want = P.embed(model.backend, P.Prepared(pre.squashed(pre.to_three_channels(img)), *img.shape))
    np.testing.assert_array_equal(emb_raw, want)


def test_segment_cellular_image_automatic_finds_no_cell_with_random_weights(model):
    img, _ = cells_image(seed=9)
    with Spy(model.backend) as spy, pytest.warns(UserWarning, match="No cells detected"):
        mask, embedding, boxes = compat.segment_cellular_image(img, model, bbox_threshold=0.3)
    assert len(spy.inputs) == 1  # CellFinder ran
    assert mask.dtype == np.int64 and mask.shape == img.shape and not mask.any()
    assert embedding is None and boxes is None


def test_bad_model_and_device_are_refused(model):
    img, boxes = cells_image(seed=1)
    with pytest.raises(TypeError, match="CellSAM"):
        compat.segment_cellular_image(img, "cellsam_general.pt")
    with pytest.raises(ValueError, match="cuda"):
        compat.segment_cellular_image(img, model, bounding_boxes=boxes, device="cuda")


def test_tile_settings_are_the_official_tiles():
    grid = TileGrid(2000, 1500, compat.tile_settings(400, 56, 56, 0.5))
    assert grid.tile == 512 and grid.overlap == 112  # block + 2 overlap; the two overlaps of a face
    assert compat.tile_settings(block_size=256, overlap=32, iou_threshold=0.7).link_iou == 0.7
    with pytest.raises(ValueError, match="block_size"):
        compat.tile_settings(0, 56)


def test_cellsam_pipeline_whole_image(model):
    """use_wsi=False: float32 min-max, then the official normalisation; uint32 out (no cell is
    found by the random weights)."""
    img, _ = cells_image(seed=10, h=120, w=136)
    img16 = img.astype(np.uint16) * 200 + 1000  # min-max makes the scale irrelevant ...
    with Spy(model.backend) as spy:
        labels = compat.cellsam_pipeline(img16, use_wsi=False, model=model)
    assert labels.dtype == np.uint32 and labels.shape == img.shape and not labels.any()
    want = P.prepare(img, SegmentSettings(minmax=True))  # ... as the same image in uint8
    np.testing.assert_allclose(spy.inputs[0], pre.cellfinder_input(want.squashed, model.backend.adv_mode), atol=1e-6)


def test_cellsam_pipeline_tiles_like_the_official_and_gauges_once(model):
    img, _ = cells_image(seed=11, h=60, w=110)
    tiles = compat.tile_settings(block_size=48, overlap=8, iou_depth=8)
    grid = TileGrid(60, 110, tiles)
    n = len(grid)
    assert n == 2 and grid.tile == 64  # a tile of block_size + 2 overlap pixels
    if importlib.util.find_spec("zarr") is None:
        pytest.skip("the tiled mode needs zarr")
    with Spy(model.backend) as spy:
        labels = compat.cellsam_pipeline(img, block_size=48, overlap=8, iou_depth=8, model=model)
    assert labels.dtype == np.uint32 and labels.shape == img.shape and not labels.any()
    assert len(spy.inputs) == n  # CellFinder once per tile

    # the gauge: one tiled pass without percentile clip + CLAHE; no cells (median size NaN) ->
    # the whole image, also without them; never the tiled pass twice
    with Spy(model.backend) as spy, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = compat.cellsam_pipeline(img, block_size=48, overlap=8, iou_depth=8, gauge_cell_size=True, model=model)
    assert not labels.any() and len(spy.inputs) == n + 1
    whole = P.prepare(img, SegmentSettings(minmax=True, normalize=False))
    np.testing.assert_allclose(spy.inputs[-1], pre.cellfinder_input(whole.squashed, model.backend.adv_mode), atol=1e-6)


def test_cellsam_pipeline_low_contrast_enhancement_reaches_the_model(model):
    """The enhanced image, and its branch's CellFinder threshold, as ``prepare`` makes them."""
    rng = np.random.default_rng(3)
    img, _ = cells_image(seed=12, h=128, w=128)
    low = (0.45 * 255 + 0.1 * img + rng.normal(0, 1, img.shape)).astype(np.float32)  # a narrow band
    with Spy(model.backend) as spy:
        compat.cellsam_pipeline(low, use_wsi=False, low_contrast_enhancement=True, model=model)
    want = P.prepare(low, SegmentSettings(low_contrast_enhancement=True))
    np.testing.assert_allclose(spy.inputs[0], pre.cellfinder_input(want.squashed, model.backend.adv_mode), atol=1e-6)


def test_get_model_and_get_local_model_are_the_models_ones():
    from cellsam_trt import models

    assert compat.get_model is models.get_model and compat.get_local_model is models.get_local_model
    params = list(inspect.signature(compat.get_model).parameters.values())
    assert [(p.name, p.default) for p in params[:2]] == [("model", "cellsam_general"), ("version", None)]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[2:])
    assert list(inspect.signature(compat.get_local_model).parameters)[0] == "model_path"
