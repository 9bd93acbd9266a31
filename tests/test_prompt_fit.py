"""Prompts fitted to the image (ordered corners, clipping, dropping what lies outside) and the
decoder streamed over chunks of prompts (memory that does not grow with their number)."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import numpy as np
import pytest

from cellsam_trt import CellSAM, Prompts, SegmentSettings
from cellsam_trt import pipeline as P
from test_pipeline import cells_image

KEEP_ALL = SegmentSettings(iou_threshold=-1e9)


def test_fit_orders_clips_and_drops():
    boxes = np.array(
        [
            [30, 40, 10, 20],  # inverted corners -> ordered
            [-5, -5, 20, 300],  # partly outside -> clipped
            [200, 10, 260, 30],  # wholly outside (x >= width) -> dropped
            [5, 5, 15, 15],
        ],
        np.float32,
    )
    b, pts, lab, index, dropped = P.fit_prompts(Prompts(boxes=boxes), height=100, width=120)
    np.testing.assert_array_equal(b, [[10, 20, 30, 40], [0, 0, 20, 100], [5, 5, 15, 15]])
    assert index.tolist() == [0, 1, 3] and dropped.tolist() == [2] and pts is None
    pts_in = np.array([[[130.0, -4.0]], [[50.0, 50.0]]], np.float32)
    _, pts, lab, index, dropped = P.fit_prompts(Prompts(points=pts_in), height=100, width=120)
    np.testing.assert_array_equal(pts, [[[119, 0]], [[50, 50]]])
    assert index is None and len(dropped) == 0 and lab.tolist() == [[1], [1]]


def test_front_door_drops_outside_boxes_with_a_warning(tiny_export):
    img, boxes = cells_image(seed=4)
    h, w = img.shape
    outside = np.array([[w + 10, 5, w + 40, 30]], np.float32)
    with CellSAM.load(tiny_export, settings=KEEP_ALL) as m:
        ref = m.segment(img, boxes=boxes)
        with pytest.warns(P.PromptWarning, match="1 of 13 prompts lie outside"):
            res = m.segment(img, boxes=np.concatenate([boxes[:5], outside, boxes[5:]]))
        np.testing.assert_array_equal(res.labels, ref.labels)
        assert res.details.dropped_prompts.tolist() == [5]
        assert res.details.prompt_index.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]  # user positions
        shifted = boxes + np.array([-1000, -1000, 0, 0], np.float32)  # clipped back to the image edge
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a = m.segment(img, boxes=shifted)
        b = m.segment(img, boxes=np.concatenate([np.zeros((len(boxes), 2), np.float32), boxes[:, 2:]], 1))
        np.testing.assert_array_equal(a.labels, b.labels)


def test_cli_counts_dropped_prompts(tiny_export, tmp_path, capsys):
    from cellsam_trt import cli

    img, boxes = cells_image(seed=4)
    np.save(tmp_path / "img.npy", img)
    (tmp_path / "b.json").write_text(json.dumps({"boxes": boxes.tolist() + [[-50, -50, -10, -10]]}))
    assert (
        cli.main(
            [
                "run",
                str(tmp_path / "img.npy"),
                "--out",
                str(tmp_path / "o"),
                "--model",
                str(tiny_export),
                "--boxes",
                str(tmp_path / "b.json"),
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "img.npy: 1 prompts lie outside the image and were dropped (prompts [12])" in err
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert summary["dropped_prompts"] == 1 and summary["files"][0]["dropped_prompts"] == [12]


def test_streamed_decode_equals_decoding_all_at_once(tiny_export):
    img, boxes = cells_image(seed=6, n=20)
    with CellSAM.load(tiny_export, settings=SegmentSettings(iou_threshold=0.0)) as m:
        prepared = P.prepare(img, m.settings)
        ps = P.find_prompts(m.backend, prepared, Prompts(boxes=boxes), m.settings)
        emb = P.embed(m.backend, prepared)
        lowres, iou = P.decode(m.backend, emb, ps)
        keep = P.kept(iou, m.settings)
        assert 0 < len(keep) < len(boxes)  # some masks dropped by the IoU filter, across chunks
        want = P.assemble(lowres[keep], prepared)
        for chunk in (1, 3, 7, 64):
            k, i, labels = P.decode_and_assemble(m.backend, emb, ps, prepared, m.settings, chunk=chunk)
            np.testing.assert_array_equal(k, keep)
            np.testing.assert_array_equal(labels, want)
            np.testing.assert_allclose(i, iou)


def test_memory_does_not_grow_with_the_number_of_prompts(tiny_export):
    """The NumPy memory of one ``segment`` (tracemalloc sees NumPy's buffers) is bounded by the
    assembly chunk, not by the prompt count: 8x the prompts, about the same peak."""
    img, _ = cells_image(seed=1, h=128, w=160)
    rng = np.random.default_rng(0)

    def peak(n):
        xy = rng.uniform(0, [140, 110], (n, 2))
        boxes = np.concatenate([xy, xy + 12], 1).astype(np.float32)
        tracemalloc.start()
        m.segment(img, boxes=boxes)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    with CellSAM.load(tiny_export, settings=KEEP_ALL) as m:
        m.segment(img, boxes=[[5, 5, 20, 20]])  # sessions made outside the measurement
        small, large = peak(P.ASSEMBLY_CHUNK), peak(8 * P.ASSEMBLY_CHUNK)
    logits_all = 8 * P.ASSEMBLY_CHUNK * 256 * 256 * 4  # what holding every prompt's logits would take
    assert large < small + logits_all / 10, (small, large)
