"""Pipeline behaviour on a small model: batching, prompts, edge cases, channel layouts.

The stages are functions of ``cellsam_trt.pipeline``; ``segment`` runs them in sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsam_trt import pipeline as P
from cellsam_trt.engine.torch_backend import TorchBackend
from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.model.checkpoint import load_state_dict
from cellsam_trt.model.synthetic import synthetic_state_dict
from cellsam_trt.pipeline import Channels, Prompts, SegmentSettings

TINY = CellSAMConfig.tiny()


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_state_dict(synthetic_state_dict(0, TINY), cfg=TINY)
    return model


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TorchBackend(tiny_model)


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
        lr1, iou1 = sam.decode(emb, boxes=boxes[i : i + 1])
        # float32 summation order differs between batch sizes: 1e-5 of the logits' magnitude (~50)
        assert (lr1 - lr[i : i + 1]).abs().max() <= 1e-5 * max(1.0, float(lr.abs().max()))
        assert (iou1 - iou[i : i + 1]).abs().max() <= 1e-4


def test_chunked_decode_equals_one_call(tiny_model):
    img, boxes = cells_image()
    a = P.segment(TorchBackend(tiny_model, decode_chunk=5), img, Prompts(boxes=boxes))
    b = P.segment(TorchBackend(tiny_model, decode_chunk=1000), img, Prompts(boxes=boxes))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.iou_predictions, b.iou_predictions, atol=1e-5)


def test_box_prompts_give_a_label_map(backend):
    img, boxes = cells_image()
    res = P.segment(backend, img, Prompts(boxes=boxes), return_embedding=True, keep_logits=True)
    assert res.labels.shape == img.shape and res.labels.dtype == np.int32
    assert res.details.embedding.shape == (1, 256, 64, 64)
    assert len(res.details.all_iou_predictions) == len(boxes)
    assert res.boxes.shape == (len(res.details.prompt_index), 4)
    np.testing.assert_allclose(res.boxes, boxes[res.details.prompt_index], atol=1e-3)
    # labels are sequential after the official post-processing
    ids = np.unique(res.labels)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))


def test_iou_threshold_drops_masks(tiny_model):
    img, boxes = cells_image()
    be = TorchBackend(tiny_model)
    keep_all = P.segment(be, img, Prompts(boxes=boxes), SegmentSettings(iou_threshold=-1e9))
    keep_none = P.segment(be, img, Prompts(boxes=boxes), SegmentSettings(iou_threshold=1e9))
    assert len(keep_all.details.prompt_index) == len(boxes)
    assert len(keep_none.details.prompt_index) == 0 and not keep_none.labels.any()


def test_point_prompts(backend):
    img, boxes = cells_image()
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :]
    res = P.segment(backend, img, Prompts(points=centres, point_labels=np.ones((len(boxes), 1))), keep_logits=True)
    assert res.labels.shape == img.shape
    assert len(res.details.all_iou_predictions) == len(boxes)
    # one prompt of several points, with a background point
    res2 = P.segment(backend, img, Prompts(points=np.array([[50, 60], [10, 10]]), point_labels=np.array([1, 0])))
    assert len(res2.details.all_iou_predictions) == 1
    with pytest.raises(ValueError, match="labels"):
        P.segment(backend, img, Prompts(points=centres, point_labels=np.full((len(boxes), 1), 3)))


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


def test_automatic_mode_runs_and_returns_thresholded_boxes(backend):
    img, _ = cells_image(3)
    res = P.segment(backend, img, keep_logits=True)
    assert res.details.threshold is not None
    assert res.labels.shape == img.shape
    logits, _ = res.details.detections
    assert logits.shape == (1, TINY.cellfinder.num_queries, 2)
    if res.scores is not None:
        assert np.all(res.scores > res.details.threshold)


def test_blank_image_gives_empty_labels_not_a_crash(backend):
    for prompts in (None, Prompts(boxes=[[1, 1, 10, 10]])):
        res = P.segment(backend, np.zeros((64, 80), np.uint16), prompts, keep_logits=True)
        assert res.labels.shape == (64, 80) and not res.labels.any()
        assert res.boxes.shape == (0, 4)


def test_empty_box_list(backend):
    img, _ = cells_image()
    res = P.segment(backend, img, Prompts(boxes=np.zeros((0, 4))), keep_logits=True)
    assert not res.labels.any() and res.labels.shape == img.shape


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((10, 10), np.nan), "NaN"),
        (np.zeros((0, 10)), "empty"),
        (np.zeros((10, 10, 5)), "3 channels"),
        (np.array([["a"]]), "dtype"),
    ],
)
def test_bad_images_are_named(backend, bad, match):
    with pytest.raises(ValueError, match=match):
        P.segment(backend, bad)


def test_bad_boxes(backend):
    img, _ = cells_image()
    with pytest.raises(ValueError, match="XYXY"):
        P.segment(backend, img, Prompts(boxes=[[1, 2, 3]]))


def test_channel_layouts_agree(backend):
    img, boxes = cells_image(5)
    nuc = img
    cyto = np.roll(img, 3, axis=1)
    hwc = np.stack([nuc, cyto], -1)
    chw = np.moveaxis(hwc, -1, 0)
    a = P.segment(backend, hwc, Prompts(boxes=boxes))
    b = P.segment(backend, chw, Prompts(boxes=boxes))
    np.testing.assert_array_equal(a.labels, b.labels)
    c = P.segment(backend, chw, Prompts(boxes=boxes), SegmentSettings(channels=Channels(axis=0)))
    np.testing.assert_array_equal(a.labels, c.labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_dtypes(backend, dtype):
    img, boxes = cells_image(6)
    res = P.segment(backend, img.astype(dtype), Prompts(boxes=boxes[:3]))
    base = P.segment(backend, img, Prompts(boxes=boxes[:3]))
    np.testing.assert_array_equal(res.labels, base.labels)


def test_plain_sam_has_no_automatic_mode(tiny_model):
    model, kind = load_state_dict(
        {k[len("model.") :]: v for k, v in synthetic_state_dict(0, TINY).items() if k.startswith("model.")}, cfg=TINY
    )
    assert kind == "sam"
    be = TorchBackend(model)
    assert not be.has_detector
    img, boxes = cells_image()
    with pytest.raises(ValueError, match="CellFinder"):
        P.segment(be, img)
    assert P.segment(be, img, Prompts(boxes=boxes)).labels.shape == img.shape
