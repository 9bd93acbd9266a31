"""Per-step parity with the golden intermediates, each stage fed the golden input of that stage
(the low-level steps, and the pipeline's stage functions where they compute the same thing)."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam_trt import labels as label_ops
from cellsam_trt import pipeline as P
from cellsam_trt import preprocess as pre
from cellsam_trt import prompts as prompt_ops
from conftest import AUTO_CASES, BOX_CASES, case_boxes, load_golden, record


@pytest.mark.parametrize("case", BOX_CASES)
def test_normalized_image(reference, case):
    g = load_golden(reference, case)
    norm = pre.normalize_image(pre.to_three_channels(g["image"]))
    d = np.abs(norm.astype(np.float32) - g["normalized_image"]).max()
    record(case, normalized_image_maxabs=d)
    assert d <= 1e-6


@pytest.mark.parametrize("case", ["YeaZ_boxes", "tissuenet_boxes", "YeaZ_boxes20_nocp", "tissuenet_boxes20_nocp"])
def test_sam_encoder_input(reference, case):
    g = load_golden(reference, case)
    sq = pre.squashed(pre.normalize_image(pre.to_three_channels(g["image"])))
    prepared = P.prepare(g["image"], P.SegmentSettings())  # the pipeline's stage
    np.testing.assert_array_equal(prepared.squashed, sq)
    assert (prepared.height, prepared.width) == pre.to_three_channels(g["image"]).shape[:2]
    x = pre.sam_encoder_input(sq, adv_mode=not case.endswith("nocp"))
    d = np.abs(x - g["sam_encoder_input"]).max()
    record(case, sam_encoder_input_maxabs=d)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32
    assert d <= 1e-5


@pytest.mark.parametrize("case", ["YeaZ_auto", "tissuenet_auto"])
def test_cellfinder_input(reference, case):
    g = load_golden(reference, case)
    sq = pre.squashed(pre.normalize_image(pre.to_three_channels(g["image"])))
    np.testing.assert_array_equal(P.prepare(g["image"], P.SegmentSettings()).squashed, sq)  # the pipeline's stage
    x = pre.cellfinder_input(sq, adv_mode=True)
    d = np.abs(x - g["cellfinder_input"]).max()
    record(case, cellfinder_input_maxabs=d)
    assert d <= 1e-6


@pytest.mark.parametrize("case", [c for c in BOX_CASES if not c.endswith("nocp")])
def test_box_scaling_is_exact(reference, case):
    g = load_golden(reference, case)
    h, w = pre.to_three_channels(g["image"]).shape[:2]
    b = prompt_ops.scale_boxes_to_model(case_boxes(reference, case), h, w)
    np.testing.assert_array_equal(b, g["boxes_prompt_1024"])
    np.testing.assert_array_equal(prompt_ops.scale_boxes_to_image(b, h, w), g["boxes_prompt_orig"])
    # the pipeline's stage (no backend call for box prompts)
    ps = P.find_prompts(None, P.Prepared(None, h, w), P.Prompts(boxes=case_boxes(reference, case)), P.SegmentSettings())
    np.testing.assert_array_equal(ps.boxes, g["boxes_prompt_1024"])
    assert ps.points is None and ps.scores is None and ps.threshold is None


@pytest.mark.parametrize("case", AUTO_CASES)
def test_topk_and_dynamic_threshold(reference, case):
    g = load_golden(reference, case)
    scores, classes, boxes = prompt_ops.topk_detections(g["pred_logits"][0], g["pred_boxes"][0])
    # equal float32 scores may be ordered differently by torch.topk: compare as multisets
    np.testing.assert_allclose(scores, g["pp_scores"], rtol=0, atol=1e-7)
    assert np.all(np.diff(scores) <= 0)

    def rows(s, c, b):
        return np.sort(
            np.concatenate([c[:, None].astype(np.float64), b.astype(np.float64)], 1)
            .view([("", np.float64)] * 5)
            .ravel()
        )

    assert np.array_equal(rows(scores, classes, boxes), rows(g["pp_scores"], g["pp_labels"], g["pp_boxes_1024"]))
    centres = prompt_ops.kmeans_1d_centres(g["pp_scores"])
    np.testing.assert_array_equal(centres, g["kmeans_centers"])
    thr, _ = prompt_ops.dynamic_threshold(g["pp_scores"], 0.4)
    record(case, kmeans_threshold_absdiff=abs(thr - float(g["dyn_threshold"])))
    assert abs(thr - float(g["dyn_threshold"])) <= 1e-7


@pytest.mark.parametrize("case", BOX_CASES)
def test_fill_holes_matches_official(reference, case):
    """The final mask is a pure function of labels_raw: must be identical."""
    g = load_golden(reference, case)
    out = label_ops.fill_holes_and_remove_small_masks(g["labels_raw"], min_size=25)
    np.testing.assert_array_equal(out, g["mask"])


@pytest.mark.slow
def test_image_encoder_on_golden_input(reference, full_models):
    import torch

    g = load_golden(reference, "tissuenet_boxes")
    with torch.no_grad():
        emb = full_models["adv"].mask_sam.image_encoder(torch.from_numpy(g["sam_encoder_input"])).numpy()
    d = np.abs(emb - g["embedding"]).max()
    record("tissuenet_boxes", encoder_on_golden_input_maxabs=d)
    assert d <= 1e-3


@pytest.mark.slow
def test_cellfinder_on_golden_input(reference, full_models):
    import torch

    g = load_golden(reference, "YeaZ_auto")
    with torch.no_grad():
        logits, boxes = full_models["adv"].finder(torch.from_numpy(g["cellfinder_input"]))
    dl = np.abs(logits.numpy() - g["pred_logits"]).max()
    db = np.abs(boxes.numpy() - g["pred_boxes"]).max()
    record("YeaZ_auto", cellfinder_on_golden_input_logits=dl, cellfinder_on_golden_input_boxes=db)
    assert dl <= 1e-3 and db <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["YeaZ_boxes", "YeaZ_boxes20_nocp"])
def test_mask_decoder_on_golden_embedding(reference, full_models, case):
    import torch

    g = load_golden(reference, case)
    sam = full_models["nocp" if case.endswith("nocp") else "adv"].mask_sam
    k = g["lowres_mask_logits_first16"].shape[0]
    lr, iou = sam.decode(torch.from_numpy(g["embedding"]), boxes=torch.from_numpy(g["boxes_prompt_1024"]))
    d = np.abs(lr[:k, 0].numpy() - g["lowres_mask_logits_first16"]).max()
    record(case, decoder_on_golden_embedding_maxabs=d)
    assert d <= 1e-3
    np.testing.assert_allclose(iou[:, 0].numpy(), g["iou_predictions"], atol=1e-4)
