"""The embedding API: load an export, segment, embed once / decode many, and the pipelined
``segment_many`` (input order, per-image errors, bounded in-flight work)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cellsam_trt.engine.api import CellSAMEngine, Prompts
from cellsam_trt.pipeline import CellSAMPipeline, SegmentSettings

from test_pipeline import cells_image


KEEP_ALL = SegmentSettings(iou_threshold=-1e9)  # the tiny random model predicts low IoUs: keep every mask


@pytest.fixture(scope="module")
def engine(tiny_export):
    return CellSAMEngine.load(tiny_export, settings=KEEP_ALL, threads=2)


def test_segment_equals_the_pipeline(engine):
    img, boxes = cells_image()
    res = engine.segment(img, boxes=boxes)
    ref = CellSAMPipeline(engine.backend, KEEP_ALL).segment(img, boxes=boxes)
    np.testing.assert_array_equal(res.labels, ref.labels)
    assert res.n_cells > 0


def test_embed_once_decode_many(engine):
    img, boxes = cells_image(seed=3)
    emb = engine.embed(img)
    assert emb.embedding.shape == (1, 256, 64, 64) and (emb.height, emb.width) == img.shape
    calls = []
    real = engine.backend.encode
    engine.backend.encode = lambda x: calls.append(1) or real(x)
    try:
        a = engine.decode(emb, boxes=boxes)
        b = engine.decode(emb, boxes=boxes[:3])
        c = engine.decode(emb, points=((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None])
    finally:
        engine.backend.encode = real
    assert not calls  # the image was encoded once, by embed()
    np.testing.assert_array_equal(a.labels, engine.segment(img, boxes=boxes).labels)
    assert b.n_cells <= 3 and c.labels.shape == img.shape
    auto = engine.decode(emb)  # automatic mode on the embedded image
    np.testing.assert_array_equal(auto.labels, engine.segment(img).labels)


def test_blank_image_embeds_to_nothing(engine):
    emb = engine.embed(np.zeros((50, 60), np.uint8))
    assert emb.embedding is None
    res = engine.decode(emb, boxes=[[1, 1, 20, 20]])
    assert res.labels.shape == (50, 60) and not res.labels.any()


def test_segment_many_order_errors_and_paths(engine, tmp_path):
    imgs = [cells_image(seed=s)[0] for s in range(4)]
    boxes = [cells_image(seed=s)[1] for s in range(4)]
    np.save(tmp_path / "img2.npy", imgs[2])
    sources = [imgs[0], np.full((10, 10), np.nan), tmp_path / "img2.npy", tmp_path / "missing.png", imgs[3]]
    prompts = [Prompts(boxes=boxes[0]), None, Prompts(boxes=boxes[2]), None, Prompts(boxes=boxes[3])]
    out = list(engine.segment_many(sources, prompts, max_in_flight=2))
    assert [r.index for r in out] == [0, 1, 2, 3, 4]
    assert [r.ok for r in out] == [True, False, True, False, True]
    assert "NaN" in str(out[1].error) and "missing.png" in str(out[3].error)
    for r, i in ((out[0], 0), (out[2], 2), (out[4], 3)):
        np.testing.assert_array_equal(r.segmentation.labels, engine.segment(imgs[i], boxes=boxes[i]).labels)


def test_segment_many_overlaps_but_serializes_inference(engine):
    """Inference calls never run concurrently, yet more than one image is in flight."""
    active, peak, in_flight = [0], [0], set()
    lock = threading.Lock()
    real = engine.backend.decode

    def decode(*a, **k):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    engine.backend.decode = decode
    try:
        imgs = [cells_image(seed=s) for s in range(3)]
        out = list(engine.segment_many([i for i, _ in imgs], [Prompts(boxes=b) for _, b in imgs],
                                       inference_workers=3, max_in_flight=3))
    finally:
        engine.backend.decode = real
    assert all(r.ok for r in out) and peak[0] == 1


def test_load_torch_backend_gives_the_same_labels(tiny_export):
    img, boxes = cells_image(seed=5)
    t = CellSAMEngine.load(tiny_export, backend="torch", settings=KEEP_ALL)
    o = CellSAMEngine.load(tiny_export, settings=KEEP_ALL)
    assert t.backend.name == "torch" and t.backend.adv_mode == o.backend.adv_mode
    a, b = t.segment(img, boxes=boxes), o.segment(img, boxes=boxes)
    assert a.n_cells > 0 and (a.labels == b.labels).mean() >= 0.999
    with pytest.raises(ValueError, match="unknown backend"):
        CellSAMEngine.load(tiny_export, backend="tflite")
