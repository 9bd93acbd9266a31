"""ONNX Runtime FP32 and OpenVINO FP32 on the full synthetic model meet the PyTorch path's golden
tolerances; the INT8 option's agreement with FP32 is measured by matched-instance IoU.

The full-size export is made once (``full_exports``, via the CLI) and cached by checkpoint
identity and exporter code; both engines run that same export (OpenVINO keeps its IR and
compiled-model cache beside it).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import AUTO_CASES, BOX_CASES, case_boxes, load_golden, record

TENSOR_TOL = 1e-3
PIXEL_AGREEMENT = 0.999
# automatic cases: every one on ONNX Runtime (the PyTorch golden test runs CellFinder on two of
# them only); OpenVINO on the two with a golden CellFinder input
ORT_AUTO_CASES = AUTO_CASES
OV_AUTO_CASES = ["YeaZ_auto", "tissuenet_auto"]
INT8_CASES = ["YeaZ_boxes", "tissuenet_boxes"]
# every FP32 case runs on each installed CPU engine (OpenVINO: pip install ".[openvino]")
ENGINES = ["ort"] + (["openvino"] if importlib.util.find_spec("openvino") else [])

_BACKENDS: dict = {}
_RUNS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _release_at_module_end():
    """The cached runs and full-size backends are dropped when this module ends (the suite
    shares one 24 GB machine); test_native's use of ``run_case`` comes before this module."""
    yield
    _RUNS.clear()
    while _BACKENDS:
        _BACKENDS.popitem()[1].close()


def _backend(full_exports, variant: str, precision: str = "fp32", engine: str = "ort"):
    """The cached backend; the other engine's full-size backends are closed first, so that one
    engine's full-size graphs are in memory at a time. The items run ONNX Runtime's first, then
    OpenVINO's (conftest.pytest_collection_modifyitems)."""
    key = (variant, precision, engine)
    if key not in _BACKENDS:
        for other in [k for k in _BACKENDS if k[2] != engine]:
            _BACKENDS.pop(other).close()
        if engine == "openvino":
            from cellsam_trt.engine.openvino_backend import OvBackend

            _BACKENDS[key] = OvBackend(full_exports[variant], precision=precision)
        else:
            from cellsam_trt.engine.ort_backend import OrtBackend

            _BACKENDS[key] = OrtBackend(full_exports[variant], precision=precision)
    return _BACKENDS[key]


def run_case(reference, full_exports, case, precision="fp32", engine="ort"):
    """Run a golden case once per session and engine; returns (golden, result, backend)."""
    key = (case, precision, engine)
    if key not in _RUNS:
        from cellsam_trt import pipeline as P

        g = load_golden(reference, case)
        backend = _backend(full_exports, "nocp" if case.endswith("nocp") else "adv", precision, engine)
        if "_boxes" in case:
            res = P.segment(
                backend,
                g["image"],
                P.Prompts(boxes=case_boxes(reference, case)),
                return_embedding=True,
                keep_logits=True,
            )
        else:
            res = P.segment(backend, g["image"], keep_logits=True)
        _RUNS[key] = (g, res, backend)
    return _RUNS[key]


def test_export_manifests(full_exports):
    from cellsam_trt.runtime.manifest import read_manifest

    adv, nocp = read_manifest(full_exports["adv"]), read_manifest(full_exports["nocp"])
    assert adv["adv_mode"] is True and adv["has_detector"] is True and len(adv["checkpoint"]["sha256"]) == 64
    assert nocp["adv_mode"] is False and nocp["has_detector"] is False
    for name, entry in adv["models"].items():
        record(f"export_{name}", **{f"ort_vs_torch_{k}": v for k, v in entry["validation"]["max_abs_diff"].items()})


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", BOX_CASES)
def test_ort_box_prompt_case(reference, full_exports, case, engine):
    g, res, backend = run_case(reference, full_exports, case, engine=engine)
    assert backend.name == engine and backend.precision == "fp32"
    assert g["meta"]["adv_mode"] == backend.adv_mode
    d = res.details
    emb = np.abs(d.embedding - g["embedding"]).max()
    k = g["lowres_mask_logits_first16"].shape[0]
    lowres = np.abs(d.lowres_logits[:k] - g["lowres_mask_logits_first16"]).max()
    iou = np.abs(d.all_iou_predictions - g["iou_predictions"]).max()
    raw_agree = (d.labels_raw == g["labels_raw"]).mean()
    agree = (res.labels == g["mask"]).mean()
    record(
        case,
        **{
            f"{engine}_embedding_maxabs": emb,
            f"{engine}_lowres_maxabs": lowres,
            f"{engine}_iou_maxabs": iou,
            f"{engine}_raw_label_agreement": raw_agree,
            f"{engine}_label_agreement": agree,
            f"{engine}_kept": f"{len(d.prompt_index)}/{len(g['kept'])}",
        },
    )
    assert emb <= TENSOR_TOL
    assert lowres <= TENSOR_TOL
    assert iou <= TENSOR_TOL
    np.testing.assert_array_equal(d.all_iou_predictions >= 0.5, g["kept"])
    np.testing.assert_allclose(res.boxes, g["boxes_kept_orig"], atol=1e-3)
    assert raw_agree >= PIXEL_AGREEMENT
    assert agree >= PIXEL_AGREEMENT
    assert res.labels.shape == g["mask"].shape


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, engine",
    [(c, "ort") for c in ORT_AUTO_CASES] + [(c, "openvino") for c in OV_AUTO_CASES if "openvino" in ENGINES],
)
def test_ort_automatic_case(reference, full_exports, case, engine):
    assert set(OV_AUTO_CASES) <= set(AUTO_CASES)
    g, res, backend = run_case(reference, full_exports, case, engine=engine)
    assert backend.name == engine
    logits, boxes = res.details.detections
    dl = np.abs(logits - g["pred_logits"]).max()
    db = np.abs(boxes - g["pred_boxes"]).max()
    dthr = abs(res.details.threshold - float(g["dyn_threshold"]))
    figures = {
        f"{engine}_pred_logits_maxabs": dl,
        f"{engine}_pred_boxes_maxabs": db,
        f"{engine}_threshold_absdiff": dthr,
    }
    if "cellfinder_input" in g:  # the CellFinder graph alone on the official CellFinder input
        gl, gb = backend.detect(g["cellfinder_input"])
        figures[f"{engine}_cellfinder_on_golden_input_logits"] = dgl = np.abs(gl - g["pred_logits"]).max()
        assert dgl <= TENSOR_TOL and np.abs(gb - g["pred_boxes"]).max() <= TENSOR_TOL
    record(case, **figures)
    assert dl <= TENSOR_TOL and db <= TENSOR_TOL
    assert dthr <= 1e-6
    assert res.labels.shape == g["mask"].shape
    assert not res.labels.any() and not g["mask"].any() and res.boxes.shape == (0, 4)


@pytest.mark.slow
@pytest.mark.parametrize("case", INT8_CASES)
def test_int8_mask_agreement(reference, full_exports, case):
    """INT8 image encoder vs FP32 (same FP32 decoder): matched-instance IoU of the label maps."""
    from cellsam_trt.metrics import match_instances

    _, fp, _ = run_case(reference, full_exports, case)
    _, q, _ = run_case(reference, full_exports, case, precision="int8")
    m = match_instances(fp.labels, q.labels)
    emb_rel = np.abs(q.details.embedding - fp.details.embedding).max() / np.abs(fp.details.embedding).max()
    same_kept = float(np.mean((fp.details.all_iou_predictions >= 0.5) == (q.details.all_iou_predictions >= 0.5)))
    record(
        f"int8_{case}",
        mean_matched_iou=m.mean_iou,
        frac_matched_50=m.frac_matched_50,
        precision_50=m.precision_50,
        pixel_agreement=m.pixel_agreement,
        embedding_rel_maxabs=emb_rel,
        same_keep_decision=same_kept,
        cells=f"{m.n_test}/{m.n_reference}",
    )
    assert m.n_reference > 0
    # measured with the default "mlp" scope: mean IoU 0.85 / 0.83, matched at 0.5: 0.97 / 0.95
    # (onnxruntime 1.31); onnxruntime 1.32's INT8 kernels on this CI's CPU: 0.815 (YeaZ), 0.762
    # (tissuenet), the same before and after the refactor that met them: the bound is for a gross
    # break (a wrong scale, a quantized normalisation), not for kernel-version drift
    assert m.mean_iou >= 0.72 and m.frac_matched_50 >= 0.9


@pytest.mark.slow
def test_int8_cellfinder_detections(reference, full_exports):
    """INT8 CellFinder on the golden CellFinder input: scores close to FP32, same (empty) selection."""
    from cellsam_trt import prompts as P

    g = load_golden(reference, "YeaZ_auto")
    fl, fb = _backend(full_exports, "adv").detect(g["cellfinder_input"])
    ql, qb = _backend(full_exports, "adv", "int8").detect(g["cellfinder_input"])
    sf = P.topk_detections(fl[0], fb[0])[0]
    sq = P.topk_detections(ql[0], qb[0])[0]
    thr_f, _ = P.dynamic_threshold(sf, 0.4)
    thr_q, _ = P.dynamic_threshold(sq, 0.4)
    record(
        "int8_cellfinder_YeaZ_auto",
        score_maxabs=np.abs(sf - sq).max(),
        box_maxabs=np.abs(fb - qb).max(),
        threshold_absdiff=abs(thr_f - thr_q),
    )
    assert np.abs(sf - sq).max() <= 0.05
    assert (sf > thr_f).sum() == (sq > thr_q).sum()
