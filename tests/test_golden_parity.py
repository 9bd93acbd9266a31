"""End-to-end parity of the PyTorch FP32 pipeline with the official implementation's outputs.

Tolerances (reference/README.md): tensors within 1e-3 max abs, the same kept prompts,
label maps with >= 99.9 % identical pixels, all-zero labels for the automatic cases
(a random checkpoint detects nothing). Each test records the figures it achieved.

Where this eager reference adds nothing the exported graphs do not already check, it runs less
(CI time): CellFinder on one grayscale and one RGB case (the other three automatic cases run on
ONNX Runtime, ``test_ort_golden.py``; the preprocessing is the same NumPy code for every
backend), and the 620-prompt tissuenet case on its first ``SUBSET`` prompts (tensors and keep
decisions; its label map is checked on ONNX Runtime and OpenVINO, and the label maps of the
other six box cases here).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AUTO_CASES, BOX_CASES, case_boxes, load_golden, record

TENSOR_TOL = 1e-3
PIXEL_AGREEMENT = 0.999

TORCH_AUTO_CASES = ["YeaZ_auto", "tissuenet_auto"]
SUBSET_CASES = ["tissuenet_boxes"]
SUBSET = 48
_RUNS: dict[tuple, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def _release_at_module_end():
    """The cached eager runs are dropped when this module ends."""
    yield
    _RUNS.clear()


def run_case(reference, full_models, case, n_prompts=None):
    """Run a golden case once per session (on its first ``n_prompts`` box prompts where given);
    returns (golden, result, backend)."""
    key = (case, n_prompts)
    if key not in _RUNS:
        from cellsam_trt import pipeline as P
        from cellsam_trt.engine.torch_backend import TorchBackend

        g = load_golden(reference, case)
        model = full_models["nocp" if case.endswith("nocp") else "adv"]
        backend = TorchBackend(model)
        if "_boxes" in case:
            res = P.segment(
                backend,
                g["image"],
                P.Prompts(boxes=case_boxes(reference, case)[:n_prompts]),
                return_embedding=True,
                keep_logits=True,
            )
        else:
            res = P.segment(backend, g["image"], keep_logits=True)
        _RUNS[key] = (g, res, backend)
    return _RUNS[key]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in BOX_CASES if c not in SUBSET_CASES])
def test_box_prompt_case(reference, full_models, case):
    g, res, backend = run_case(reference, full_models, case)
    assert g["meta"]["adv_mode"] == backend.adv_mode
    d = res.details

    emb = np.abs(d.embedding - g["embedding"]).max()
    k = g["lowres_mask_logits_first16"].shape[0]
    lowres = np.abs(d.lowres_logits[:k] - g["lowres_mask_logits_first16"]).max()
    iou = np.abs(d.all_iou_predictions - g["iou_predictions"]).max()
    prompts = np.abs(d.prompts_1024 - g["boxes_prompt_1024"]).max()
    raw_agree = (d.labels_raw == g["labels_raw"]).mean()
    agree = (res.labels == g["mask"]).mean()
    record(
        case,
        embedding_maxabs=emb,
        lowres_maxabs=lowres,
        iou_maxabs=iou,
        prompts_maxabs=prompts,
        raw_label_agreement=raw_agree,
        label_agreement=agree,
        kept=f"{len(d.prompt_index)}/{len(g['kept'])}",
    )

    assert emb <= TENSOR_TOL
    assert prompts <= 1e-4
    assert lowres <= TENSOR_TOL
    assert iou <= TENSOR_TOL
    np.testing.assert_array_equal(d.all_iou_predictions >= 0.5, g["kept"])
    np.testing.assert_allclose(res.boxes, g["boxes_kept_orig"], atol=1e-3)
    assert raw_agree >= PIXEL_AGREEMENT
    assert agree >= PIXEL_AGREEMENT
    assert res.labels.shape == g["mask"].shape
    assert res.labels.max() == g["mask"].max()


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBSET_CASES)
def test_box_prompt_case_on_a_prompt_subset(reference, full_models, case):
    """The first SUBSET prompts: embedding, low-res logits of the first 16, IoU predictions and
    keep decisions of those prompts, their kept boxes (the decoder runs each prompt alone)."""
    g, res, backend = run_case(reference, full_models, case, n_prompts=SUBSET)
    assert g["meta"]["adv_mode"] == backend.adv_mode and len(g["kept"]) > SUBSET
    d = res.details
    assert len(d.all_iou_predictions) == SUBSET
    emb = np.abs(d.embedding - g["embedding"]).max()
    lowres = np.abs(d.lowres_logits[:16] - g["lowres_mask_logits_first16"]).max()
    iou = np.abs(d.all_iou_predictions - g["iou_predictions"][:SUBSET]).max()
    prompts = np.abs(d.prompts_1024 - g["boxes_prompt_1024"][:SUBSET]).max()
    record(case, embedding_maxabs=emb, lowres_maxabs=lowres, iou_maxabs=iou, prompts_maxabs=prompts, subset=SUBSET)
    assert emb <= TENSOR_TOL
    assert prompts <= 1e-4
    assert lowres <= TENSOR_TOL
    assert iou <= TENSOR_TOL
    kept = g["kept"][:SUBSET]
    np.testing.assert_array_equal(d.all_iou_predictions >= 0.5, kept)
    np.testing.assert_allclose(res.boxes, g["boxes_prompt_orig"][:SUBSET][kept], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("case", TORCH_AUTO_CASES)
def test_automatic_case(reference, full_models, case):
    assert set(TORCH_AUTO_CASES) <= set(AUTO_CASES)
    g, res, _ = run_case(reference, full_models, case)
    logits, boxes = res.details.detections
    dl = np.abs(logits - g["pred_logits"]).max()
    db = np.abs(boxes - g["pred_boxes"]).max()
    dthr = abs(res.details.threshold - float(g["dyn_threshold"]))
    record(case, pred_logits_maxabs=dl, pred_boxes_maxabs=db, threshold_absdiff=dthr, n_labels=int(res.labels.max()))
    assert dl <= TENSOR_TOL
    assert db <= TENSOR_TOL
    assert dthr <= 1e-6
    # the random checkpoint detects nothing: an all-zero label map, not the official crash
    assert res.labels.shape == g["mask"].shape
    assert not res.labels.any() and not g["mask"].any()
    assert res.boxes.shape == (0, 4)
