"""The official package's optional steps (``cellsam_trt.official``) against the official
functions' outputs (``../shared/reference/golden_api``), or their intended semantics where the
official code is defective; and the same steps reached through the pipeline, the front door and
the CLI.

Tolerances: label maps, min-max and the contrast statistics exactly equal; the enhanced image
within 1e-6 (float32 CLAHE arithmetic; achieved figures recorded)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellsam_trt import CellSAM, SegmentSettings, official
from cellsam_trt import labels as label_ops
from cellsam_trt import pipeline as P
from cellsam_trt import preprocess as pre
from cellsam_trt.cli import build_parser, main, settings_from_args
from conftest import record
from test_pipeline import cells_image

PRE_CASES = [f"{i}{s}" for i in ("YeaZ", "YeastNet", "ep_micro", "tissuenet") for s in ("_pre", "_lowcontrast_pre")]
POST_CASES = ["YeaZ_post", "YeastNet_post", "ep_micro_post", "tissuenet_post"]
KEEP_ALL = SegmentSettings(iou_threshold=-1e9)  # the tiny random model predicts low IoUs: keep every mask


@pytest.fixture(scope="session")
def golden_api(reference):
    path = reference / "golden_api"
    if not (path / "cases.json").is_file():
        pytest.skip(f"golden_api not found at {path}")
    return path


def load(golden_api, case: str) -> dict:
    with np.load(golden_api / f"{case}.npz") as d:
        return {k: d[k] for k in d.files}


def slots(image: np.ndarray, hwc: np.ndarray) -> np.ndarray:
    """The (H, W, 3) layout's channels that hold ``image`` (a 2-D image: slot 2)."""
    return hwc[..., 2] if image.ndim == 2 else hwc


# --------------------------------------------------------------------------- pre-normalisation


@pytest.mark.parametrize("case", PRE_CASES)
def test_minmax_is_per_channel_and_a_2d_image_is_one_channel(golden_api, case):
    g = load(golden_api, case)
    ours = slots(g["image"], official.minmax(pre.to_three_channels(g["image"])))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, g["intended_minmax"])
    if g["image"].ndim == 2:  # the official loop rescales columns 0-2 of a 2-D image: not copied
        assert not np.array_equal(ours, g["pipeline_minmax"])
    else:
        np.testing.assert_array_equal(ours, g["pipeline_minmax"])


@pytest.mark.parametrize("case", PRE_CASES)
def test_low_contrast_test_and_enhancement(golden_api, case):
    """is_low_contrast_clahe and enhance_low_contrast on the intended min-max image; the
    threshold the official branches meant to set (golden ``intended_bbox_threshold``)."""
    g = load(golden_api, case)
    image, threshold, contrast = official.enhance_low_contrast(g["intended_minmax"])
    assert contrast.low == bool(g["intended_lowcontrast_flag"])
    assert contrast.median_change == float(g["intended_lowcontrast_mean_diff"])
    assert contrast.change_std == float(g["intended_lowcontrast_mean_std"])
    d = float(np.abs(image - g["intended_enhanced"]).max())
    record(f"golden_api {case}", enhanced_max_abs_diff=d)
    assert d <= 1e-6
    assert (0.4 if threshold is None else threshold) == float(g["intended_bbox_threshold"])
    if "enhanced" in g:  # where the official call completed (tissuenet), it is the same image
        assert float(np.abs(image - g["enhanced"]).max()) <= 1e-6


def test_the_nuclear_channel_condition_reads_channel_1():
    """With a lower bound under the median change, the official rule also asks for an empty
    nuclear channel (``img[..., 1]``): a 2-D image has none; a 3-channel one is read at slot 1."""
    rng = np.random.default_rng(0)
    grey = np.clip(0.45 + 0.05 * rng.standard_normal((96, 96)), 0, 1).astype(np.float32)
    rule = official.ContrastRule(lower=1e-6, upper=1.0, std_threshold=1.0)  # every image low, condition on
    assert official.is_low_contrast(grey, rule).low and not official.is_low_contrast(grey).low
    assert official.enhance_low_contrast(grey, rule)[0] is not grey  # enhanced
    rgb = np.stack([np.zeros_like(grey), grey, grey], -1)
    assert official.enhance_low_contrast(rgb, rule)[0] is rgb  # nuclear channel not empty: unchanged
    rgb[..., 1] = 0
    assert official.enhance_low_contrast(rgb, rule)[0] is not rgb


def test_prepare_applies_minmax_and_enhancement_in_the_official_order(golden_api):
    """cellsam_pipeline: float32 min-max -> enhancement -> percentile clip + CLAHE; the low-contrast
    branch's threshold travels with the prepared image."""
    g = load(golden_api, "ep_micro_lowcontrast_pre")  # a 2-D image whose branch sets 0.15
    prepared = P.prepare(g["image"], SegmentSettings(low_contrast_enhancement=True))
    hwc = np.zeros(g["image"].shape + (3,))
    hwc[..., 2] = g["intended_enhanced"]
    want = pre.squashed(pre.normalize_image(hwc))
    d = float(np.abs(prepared.squashed - want).max())
    record("golden_api ep_micro_lowcontrast_pre", prepared_max_abs_diff=d)
    assert d <= 1e-6 and prepared.bbox_threshold == float(g["intended_bbox_threshold"]) == 0.15
    plain = P.prepare(g["image"], SegmentSettings(minmax=True))
    assert plain.bbox_threshold is None


def test_pipeline_minmax_then_normalize_equals_the_official(golden_api):
    """segment_cellular_image(normalize=True)'s step on cellsam_pipeline's min-max (golden
    ``sci_normalized``), on the 3-channel image where the official min-max is per channel."""
    g = load(golden_api, "tissuenet_pre")
    norm = pre.normalize_image(official.minmax(pre.to_three_channels(g["image"])))
    np.testing.assert_array_equal(norm.astype(np.float32), g["sci_normalized"])


# --------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize("case", POST_CASES)
def test_postprocess_intended_semantics(golden_api, case):
    """Every mask opened / closed with disk(2) (golden ``postprocessed_intended``); the official
    run, which does so for the first mask only, differs."""
    g = load(golden_api, case)
    ours = official.postprocess(g["labels"])
    assert ours.dtype == g["labels"].dtype
    np.testing.assert_array_equal(ours, g["postprocessed_intended"])
    differ = int((ours != g["postprocessed"]).sum())
    record(f"golden_api {case}", pixels_differing_from_defective_official=differ)
    assert differ > 0


@pytest.mark.parametrize("case", POST_CASES)
def test_remove_boundaries_and_median_size(golden_api, case):
    g = load(golden_api, case)
    np.testing.assert_array_equal(official.remove_boundaries(g["labels"]), g["no_boundaries"])
    frac, sizes = official.median_size(g["labels"])
    assert frac == float(g["median_size_fraction"])
    np.testing.assert_array_equal(sizes, g["sizes_abs"])
    assert official.gauge_tiled(g["labels"]) == (float(g["median_size_fraction"]) < 0.002)


def test_steps_on_a_label_map_without_cells():
    """The official postprocess_predictions raises on an empty map (max of no masks); here the
    map comes back empty, and the gauge, seeing no cells, keeps the whole image."""
    z = np.zeros((40, 50), np.int32)
    assert official.postprocess(z).dtype == np.int32 and not official.postprocess(z).any()
    assert not official.remove_boundaries(z).any()
    assert np.isnan(official.median_size(z)[0]) and not official.gauge_tiled(z)


def test_finish_runs_postprocess_before_and_boundaries_after_hole_filling(golden_api):
    """segment_cellular_image's order: postprocess -> fill holes / drop < 25 px -> remove boundaries."""
    g = load(golden_api, "YeaZ_post")
    raw = g["labels"].astype(np.int32)
    h, w = raw.shape
    n = int(raw.max())
    prepared = P.Prepared(np.zeros((3, 1024, 1024), np.float32), h, w)
    ps = P.PromptSet(boxes=np.zeros((n, 4), np.float32))
    keep, iou = np.arange(n), np.ones(n, np.float32)
    settings = SegmentSettings(postprocess=True, remove_boundaries=True)
    seg = P.finish(prepared, ps, keep, iou, raw.copy(), settings)
    want = official.remove_boundaries(
        label_ops.fill_holes_and_remove_small_masks(g["postprocessed_intended"].astype(np.int32), 25)
    )
    np.testing.assert_array_equal(seg.labels, want)
    np.testing.assert_array_equal(seg.details.labels_raw, raw)  # the map as assembled


# --------------------------------------------------------------------------- front door and CLI


@pytest.fixture(scope="module")
def model(tiny_export):
    with CellSAM.load(tiny_export, settings=KEEP_ALL, threads=2) as m:
        yield m


def test_front_door_settings_reach_every_step(tiny_export):
    """Load-time settings (the front door's one path): postprocess -> hole filling -> boundaries,
    on the raw label map the model assembled (the CLI test below runs ``segment_many``)."""
    img, boxes = cells_image(seed=5)
    options = SegmentSettings(iou_threshold=-1e9, postprocess=True, remove_boundaries=True)
    with CellSAM.load(tiny_export, settings=options, threads=2) as m:
        res = m.segment(img, boxes=boxes)
    raw = res.details.labels_raw
    assert raw.max() > 0
    want = official.remove_boundaries(label_ops.fill_holes_and_remove_small_masks(official.postprocess(raw), 25))
    np.testing.assert_array_equal(res.labels, want)


def test_low_contrast_threshold_reaches_cellfinder(golden_api, model):
    """Automatic mode: the enhanced image's CellFinder threshold is the branch's 0.15 (the
    dynamic threshold is 0.66 * it + 0.33 * the k-means centres' mean)."""
    g = load(golden_api, "ep_micro_lowcontrast_pre")
    settings = SegmentSettings(iou_threshold=-1e9, low_contrast_enhancement=True)
    enhanced = P.segment(model.backend, g["image"], None, settings)
    same_image = P.segment(model.backend, g["intended_enhanced"], None, SegmentSettings(bbox_threshold=0.15))
    # the same image at threshold 0.4 would give a dynamic threshold 0.66 * 0.25 higher
    assert enhanced.details.threshold == pytest.approx(same_image.details.threshold, abs=1e-6)


def test_cli_flags_make_the_settings(tmp_path):
    args = build_parser().parse_args(
        ["run", "x.tif", "--out", str(tmp_path), "--postprocess", "--remove-boundaries", "--low-contrast-enhancement"]
        + ["--normalize", "pipeline", "--bbox-threshold", "0.3"]
    )
    s = settings_from_args(args)
    assert (s.postprocess, s.remove_boundaries, s.low_contrast_enhancement, s.minmax, s.normalize) == (
        True,
        True,
        True,
        True,
        True,
    )
    assert s.bbox_threshold == 0.3
    d = settings_from_args(build_parser().parse_args(["run", "x.tif", "--out", str(tmp_path), "--normalize", "none"]))
    assert (d.postprocess, d.remove_boundaries, d.low_contrast_enhancement, d.minmax, d.normalize) == (
        False,
        False,
        False,
        False,
        False,
    )


def test_cli_run_with_the_official_options(tiny_export, tmp_path, model):
    img, boxes = cells_image(seed=6)
    np.save(tmp_path / "img.npy", img)
    (tmp_path / "boxes.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    rc = main(
        ["run", str(tmp_path / "img.npy"), "--out", str(tmp_path / "out"), "--model", str(tiny_export)]
        + ["--boxes", str(tmp_path / "boxes.json"), "--iou-threshold=-1e9", "--format", "npy", "--quiet"]
        + ["--postprocess", "--remove-boundaries", "--normalize", "pipeline"]
    )
    assert rc == 0
    settings = SegmentSettings(iou_threshold=-1e9, postprocess=True, remove_boundaries=True, minmax=True)
    want = P.segment(model.backend, img, P.Prompts(boxes=boxes), settings).labels
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "img_labels.npy"), want)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())["settings"]
    assert summary["postprocess"] and summary["remove_boundaries"] and summary["normalize"] == "pipeline"


def test_cli_refuses_whole_image_rescaling_in_tiled_mode(tmp_path, capsys):
    np.save(tmp_path / "img.npy", np.zeros((64, 64), np.uint8))
    rc = main(
        ["run", str(tmp_path / "img.npy"), "--out", str(tmp_path / "out"), "--model", str(tmp_path)]
        + ["--tile-size", "512", "--low-contrast-enhancement"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "tiled mode" in err and "cellsam_pipeline" in err and len(err.strip().splitlines()) == 1
