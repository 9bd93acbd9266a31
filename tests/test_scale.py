"""Cell scale (``cellsam_trt.scale``): the model-free diameter estimate on synthetic cells of
known size, the rule (squash / one padded frame / tiles), ``CellSAM.segment(scale=...)`` at the
input size with box prompts scaled consistently, and the CLI flag."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellsam_trt import CellSAM, SegmentSettings, cli
from cellsam_trt import labels as label_ops
from cellsam_trt import pipeline as P
from cellsam_trt import scale as S
from test_pipeline import cells_image

KEEP_ALL = SegmentSettings(iou_threshold=-1e9)  # the tiny random model predicts low IoUs: keep every mask


@pytest.fixture(scope="module")
def model(tiny_export):
    with CellSAM.load(tiny_export, settings=KEEP_ALL, threads=2) as m:
        yield m


# ------------------------------------------------------------------ estimator


@pytest.mark.parametrize(
    "diameter, size, kw",
    [
        (8, 256, {}),
        (24, 384, {"dark_cells": True, "density": 0.2}),
        (64, 768, {"noise": 0.15, "blur": 2.0}),
    ],
)
def test_estimator_recovers_known_diameters(diameter, size, kw):
    """Within 20 % of the true median equivalent diameter (bench_scale.py measures 4-200 px)."""
    image, labels = S.synthetic_cells(diameter, (size, size), seed=1, **kw)
    truth = S.median_diameter(labels)
    est = S.estimate_diameter(image)
    assert est.method == "log" and est.cells > 0
    assert abs(est.diameter - truth) / truth < 0.2, (est.diameter, truth)


def test_estimator_on_noise_only_and_blank_images():
    assert S.estimate_diameter(np.zeros((64, 64), np.uint8)).diameter is None
    flat = np.full((64, 64), 7.0)
    assert S.estimate_diameter(flat).diameter is None


def test_gauge_and_boxes_diameters():
    yy, xx = np.mgrid[:200, :200]
    labels = np.zeros((200, 200), np.int32)
    for i, (cy, cx) in enumerate([(40, 40), (40, 140), (140, 90)]):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 20**2] = i + 1
    g = S.gauge_diameter(labels)
    assert g.cells == 3 and abs(g.diameter - 40) < 1.0
    assert S.gauge_diameter(np.zeros((5, 5), np.int32)).diameter is None
    b = S.boxes_diameter([[0, 0, 10, 40], [0, 0, 30, 30], [5, 5, 25, 25]])
    assert b.diameter == pytest.approx(20.0) and b.cells == 3


# ------------------------------------------------------------------ the rule


def test_rule_picks_squash_frame_or_tiles():
    rule = S.ScaleRule()
    # 512 x 512: the squash doubles; 20 px cells -> 40 model px, in [32, 128]: left alone
    p = S.plan_scale(512, 512, 20.0, rule)
    assert p.mode == "squash" and p.scale is None and p.model_diameter == pytest.approx(40)
    # 150 px cells -> 300 model px: too large, shrunk to 64 px in one padded frame
    p = S.plan_scale(512, 512, 150.0, rule)
    assert p.mode == "frame" and p.scale == pytest.approx(64 / 150)
    assert p.working_shape == (round(512 * 64 / 150),) * 2 and p.model_diameter == pytest.approx(64)
    # 4 px cells in a 2048 image -> 2 model px: enlarged 16x, larger than the frame -> tiles
    p = S.plan_scale(2048, 2048, 4.0, rule)
    assert p.mode == "tiled" and p.scale == 16 and p.working_shape is None
    # the bounds of the factor
    assert S.plan_scale(100, 100, 2000.0, rule).scale == rule.min_scale
    assert S.plan_scale(4000, 4000, 1.0, rule).scale == rule.max_scale
    # nothing measured: the squash, saying why
    p = S.plan_scale(300, 300, S.DiameterEstimate(None, 0, "log", "no blob above the noise"))
    assert p.mode == "squash" and "no blob" in p.reason
    # a fixed scale: a frame while it fits, tiles beyond
    assert S.plan_fixed(300, 400, 2.0).working_shape == (600, 800)
    assert S.plan_fixed(300, 600, 2.0).mode == "tiled"
    # tiled mode's auto scale: native resolution when cells are in range at scale 1
    assert S.tile_scale(S.DiameterEstimate(50.0, 9, "log")) == 1.0
    assert S.tile_scale(S.DiameterEstimate(8.0, 9, "log")) == 8.0


@pytest.mark.parametrize("bad", ["big", "-1", 0, -2.0, float("nan"), float("inf"), True, [1.0]])
def test_bad_scales_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="scale must be 'auto' or a positive number") as e:
        S.parse_scale(bad)
    assert "\n" not in str(e.value)
    assert S.parse_scale("AUTO") == "auto" and S.parse_scale("2.5") == 2.5 and S.parse_scale(None) is None


# ------------------------------------------------------------------ segment(scale=...)


def test_frame_mode_labels_and_boxes_in_input_pixels(model):
    img, boxes = cells_image(seed=2)  # 200 x 240
    res = model.segment(img, boxes=boxes, scale=1.5)
    plan = res.details.scale
    assert plan.mode == "frame" and plan.working_shape == (300, 360)
    assert res.labels.shape == img.shape and res.n_cells > 0
    # prompts reach the model frame multiplied by the scale, and come back in input pixels
    np.testing.assert_allclose(res.details.prompts_1024, boxes * 1.5, rtol=1e-6)
    np.testing.assert_allclose(res.boxes, boxes[res.details.prompt_index], rtol=1e-5, atol=1e-4)


def test_frame_mode_at_the_squash_scale_agrees_with_the_default(model):
    """A 512 x 512 image at scale 2 fills the frame exactly as the squash does: same prompts,
    same decoder outputs; the label maps differ only by the resampling back to 512 x 512
    (the frame's label map, nearest, instead of the default's bilinear logits)."""
    img, boxes = cells_image(seed=4, h=512, w=512, n=20)
    default = P.segment(model.backend, img, P.Prompts(boxes), KEEP_ALL, keep_logits=True)
    scaled = model.segment(img, boxes=boxes, scale=2.0)
    assert scaled.details.scale.mode == "frame" and default.details.scale is None
    np.testing.assert_allclose(scaled.details.prompts_1024, default.details.prompts_1024, rtol=1e-6)
    np.testing.assert_allclose(scaled.details.all_iou_predictions, default.details.all_iou_predictions, atol=1e-6)
    keep = P.kept(default.details.all_iou_predictions, KEEP_ALL)
    frame_labels = label_ops.assemble_labels(default.details.lowres_logits[keep], 1024, 1024)
    np.testing.assert_array_equal(scaled.details.labels_raw, S.nearest_resize(frame_labels, 512, 512))


def test_tiled_mode_returns_labels_at_the_input_size(model):
    img, boxes = cells_image(seed=5, h=300, w=300, n=10)
    res = model.segment(img, boxes=boxes, scale=4.0)  # 1200 px > the frame: tiles of 256 px
    assert res.details.scale.mode == "tiled"
    assert res.labels.shape == img.shape and res.labels.dtype == np.int32 and res.n_cells > 0
    assert set(np.unique(res.labels)) == set(range(res.n_cells + 1))  # numbered 1..K


def test_auto_scale_in_range_is_the_default_run(model):
    img, boxes = cells_image(seed=6)  # discs of 12-28 px in 200 x 240: ~50-115 model px under the squash
    auto = model.segment(img, boxes=boxes, scale="auto", scale_estimator="log")
    assert auto.details.scale.mode == "squash", auto.details.scale
    np.testing.assert_array_equal(auto.labels, model.segment(img, boxes=boxes).labels)


def test_auto_scale_shrinks_large_cells_into_one_frame(model):
    image, labels = S.synthetic_cells(60, (256, 256), seed=0, density=0.4)
    truth = S.median_diameter(labels)
    res = model.segment(image, scale="auto", scale_estimator="log")
    plan = res.details.scale
    assert plan.mode == "frame" and plan.scale < S.squash_scale(256, 256) and res.labels.shape == (256, 256)
    assert plan.estimate.method == "log" and abs(plan.diameter - truth) / truth < 0.25
    assert plan.working_shape == (round(256 * plan.scale),) * 2


def test_model_estimator_without_cells_says_the_log_estimate_decided(model):
    img, _ = cells_image(seed=7)
    res = model.segment(img, scale="auto", scale_estimator="model")  # the random model finds no cell
    est = res.details.scale.estimate
    assert est.method == "log" and "first pass found 0 cells" in est.note


def test_bad_scale_arguments(model):
    img, boxes = cells_image()
    with pytest.raises(ValueError, match="scale must be"):
        model.segment(img, scale="huge")
    with pytest.raises(ValueError, match="estimator must be one of"):
        model.segment(img, scale="auto", scale_estimator="eyeball")
    with pytest.raises(ValueError, match="needs box prompts"):
        model.segment(img, scale="auto", scale_estimator="boxes")
    res = model.segment(img, boxes=boxes, scale="auto", scale_estimator="boxes")
    assert res.details.scale.estimate.method == "boxes"


# ------------------------------------------------------------------ CLI


def test_cli_scale_flag(tiny_export, tmp_path, capsys):
    import tifffile

    img, boxes = cells_image(seed=8)
    tifffile.imwrite(tmp_path / "a.tif", img)
    (tmp_path / "b.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    base = ["run", str(tmp_path / "a.tif"), "--model", str(tiny_export), "--quiet", "--iou-threshold=-100"]
    assert cli.main([*base, "--out", str(tmp_path / "o1"), "--boxes", str(tmp_path / "b.json"), "--scale", "1.5"]) == 0
    summary = json.loads((tmp_path / "o1" / "run_summary.json").read_text())
    entry = summary["files"][0]
    assert entry["scale"]["mode"] == "frame" and entry["scale"]["scale"] == 1.5 and entry["shape"] == [200, 240]
    assert cli.main([*base, "--out", str(tmp_path / "o2"), "--scale", "auto"]) == 0
    entry = json.loads((tmp_path / "o2" / "run_summary.json").read_text())["files"][0]
    assert entry["scale"]["estimator"] == "log"
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "o3"), "--scale", "zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--scale" in err and "'zero'" in err
    assert cli.main([*base, "--out", str(tmp_path / "o4"), "--scale", "auto", "--scale-estimator", "boxes"]) == 2
    assert "needs --boxes" in capsys.readouterr().err
