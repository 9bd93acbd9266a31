"""Pipeline behaviour on a small model: batching, prompts, edge cases, channel layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsam_trt.engine.torch_backend import TorchBackend
from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.model.checkpoint import load_state_dict
from cellsam_trt.model.synthetic import synthetic_state_dict
from cellsam_trt.pipeline import CellSAMPipeline, SegmentSettings

TINY = CellSAMConfig.tiny()


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_state_dict(synthetic_state_dict(0, TINY), cfg=TINY)
    return model


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return CellSAMPipeline(TorchBackend(tiny_model), keep_logits=True)


def cells_image(seed=0, h=200, w=240, n=12):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(20, 5, (h, w))
    boxes = []
    for _ in range(n):
        cy, cx, r = int(rng.integers(15, h - 15)), int(rng.integers(15, w - 15)), int(rng.integers(6, 14))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 150
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    return np.clip(img, 0, 255).astype(np.uint8), np.array(boxes, np.float32)


def test_batched_decoder_equals_per_box_loop(tiny_model):
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(0, 1, (1, 256, 64, 64)).astype(np.float32))
    xy = rng.uniform(0, 900, (37, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(10, 120, (37, 2))], 1).astype(np.float32))
    sam = tiny_model.mask_sam
    lr, iou = sam.decode(emb, boxes=boxes)
    for i in range(len(boxes)):
        lr1, iou1 = sam.decode(emb, boxes=boxes[i:i + 1])
        assert (lr1 - lr[i:i + 1]).abs().max() <= 1e-4
        assert (iou1 - iou[i:i + 1]).abs().max() <= 1e-4


def test_chunked_decode_equals_one_call(tiny_model):
    img, boxes = cells_image()
    a = CellSAMPipeline(TorchBackend(tiny_model, decode_chunk=5)).segment(img, boxes=boxes)
    b = CellSAMPipeline(TorchBackend(tiny_model, decode_chunk=1000)).segment(img, boxes=boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.iou_predictions, b.iou_predictions, atol=1e-5)


def test_box_prompts_give_a_label_map(pipe):
    img, boxes = cells_image()
    res = pipe.segment(img, boxes=boxes, return_embedding=True)
    assert res.labels.shape == img.shape and res.labels.dtype == np.int32
    assert res.embedding.shape == (1, 256, 64, 64)
    assert len(res.all_iou_predictions) == len(boxes)
    assert res.boxes.shape == (len(res.prompt_index), 4)
    np.testing.assert_allclose(res.boxes, boxes[res.prompt_index], atol=1e-3)
    # labels are sequential after the official post-processing
    ids = np.unique(res.labels)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))


def test_iou_threshold_drops_masks(tiny_model):
    img, boxes = cells_image()
    keep_all = CellSAMPipeline(TorchBackend(tiny_model), SegmentSettings(iou_threshold=-1e9)).segment(img, boxes=boxes)
    keep_none = CellSAMPipeline(TorchBackend(tiny_model), SegmentSettings(iou_threshold=1e9)).segment(img, boxes=boxes)
    assert len(keep_all.prompt_index) == len(boxes)
    assert len(keep_none.prompt_index) == 0 and not keep_none.labels.any()


def test_point_prompts(pipe):
    img, boxes = cells_image()
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :]
    res = pipe.segment(img, points=centres, point_labels=np.ones((len(boxes), 1)))
    assert res.labels.shape == img.shape
    assert len(res.all_iou_predictions) == len(boxes)
    # one prompt of several points, with a background point
    res2 = pipe.segment(img, points=np.array([[50, 60], [10, 10]]), point_labels=np.array([1, 0]))
    assert len(res2.all_iou_predictions) == 1
    with pytest.raises(ValueError, match="labels"):
        pipe.segment(img, points=centres, point_labels=np.full((len(boxes), 1), 3))


def test_points_are_embedded_as_sam_does(tiny_model):
    """Padding point appended without boxes; labels select the learned embeddings."""
    pe = tiny_model.mask_sam.prompt_encoder
    pts = torch.tensor([[[100.0, 200.0]]])
    with torch.no_grad():
        emb = pe(points=pts, labels=torch.tensor([[1]]))
        coords = (pts + 0.5) / 1024
        expected = pe.pe_layer.encode(coords) + pe.point_embeddings[1].weight
    assert emb.shape == (1, 2, 256)
    torch.testing.assert_close(emb[:, :1], expected)
    torch.testing.assert_close(emb[0, 1], pe.not_a_point_embed.weight[0])


def test_automatic_mode_runs_and_returns_thresholded_boxes(pipe):
    img, _ = cells_image(3)
    res = pipe.segment(img)
    assert res.threshold is not None
    assert res.labels.shape == img.shape
    logits, _ = res.detections
    assert logits.shape == (1, TINY.cellfinder.num_queries, 2)
    if res.scores is not None:
        assert np.all(res.scores > res.threshold)


def test_blank_image_gives_empty_labels_not_a_crash(pipe):
    for mode in ({}, {"boxes": [[1, 1, 10, 10]]}):
        res = pipe.segment(np.zeros((64, 80), np.uint16), **mode)
        assert res.labels.shape == (64, 80) and not res.labels.any()
        assert res.boxes.shape == (0, 4)


def test_empty_box_list(pipe):
    img, _ = cells_image()
    res = pipe.segment(img, boxes=np.zeros((0, 4)))
    assert not res.labels.any() and res.labels.shape == img.shape


@pytest.mark.parametrize("bad, match", [
    (np.full((10, 10), np.nan), "NaN"),
    (np.zeros((0, 10)), "empty"),
    (np.zeros((10, 10, 5)), "3 channels"),
    (np.array([["a"]]), "dtype"),
])
def test_bad_images_are_named(pipe, bad, match):
    with pytest.raises(ValueError, match=match):
        pipe.segment(bad)


def test_bad_boxes(pipe):
    img, _ = cells_image()
    with pytest.raises(ValueError, match="XYXY"):
        pipe.segment(img, boxes=[[1, 2, 3]])


def test_channel_layouts_agree(pipe):
    img, boxes = cells_image(5)
    nuc = img
    cyto = np.roll(img, 3, axis=1)
    hwc = np.stack([nuc, cyto], -1)
    chw = np.moveaxis(hwc, -1, 0)
    a = pipe.segment(hwc, boxes=boxes)
    b = pipe.segment(chw, boxes=boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = CellSAMPipeline(pipe.backend, SegmentSettings(channel_axis=0)).segment(chw, boxes=boxes)
    np.testing.assert_array_equal(a.labels, c.labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_dtypes(pipe, dtype):
    img, boxes = cells_image(6)
    res = pipe.segment(img.astype(dtype), boxes=boxes[:3])
    base = pipe.segment(img, boxes=boxes[:3])
    np.testing.assert_array_equal(res.labels, base.labels)


def test_plain_sam_has_no_automatic_mode(tiny_model):
    model, kind = load_state_dict(
        {k[len("model."):]: v for k, v in synthetic_state_dict(0, TINY).items() if k.startswith("model.")}, cfg=TINY)
    assert kind == "sam"
    p = CellSAMPipeline(TorchBackend(model))
    img, boxes = cells_image()
    with pytest.raises(ValueError, match="CellFinder"):
        p.segment(img)
    assert p.segment(img, boxes=boxes).labels.shape == img.shape
