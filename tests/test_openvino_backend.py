"""The OpenVINO backend on the tiny export: FP32 against ONNX Runtime on the same graphs, the IR
kept beside the export and the compiled-model cache, precision requests the CPU cannot meet
refused by name, NNCF INT8, and the front door's choice of backend."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("openvino")

from cellsam_trt.engine.base import BackendError  # noqa: E402
from cellsam_trt.runtime import specs as S  # noqa: E402

BOXES = np.array([[10, 20, 90, 110], [300, 310, 420, 400], [0, 0, 1023, 1023], [500, 40, 530, 90]], np.float32)
POINTS = np.array([[[50, 60], [70, 80]], [[400, 400], [0, 0]]], np.float32)
POINT_LABELS = np.array([[1, 0], [1, -1]], np.float32)


@pytest.fixture()
def export_copy(tiny_export, tmp_path):
    """A private copy of the tiny export (the backend writes its IR and cache into it)."""
    out = tmp_path / "onnx"
    shutil.copytree(tiny_export, out, ignore=shutil.ignore_patterns("openvino"))
    return out


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return {
        "image": rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32),
        "embedding": rng.standard_normal((1, 256, 64, 64)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def ort_reference(tiny_export, inputs):
    """ONNX Runtime FP32 on the same export: embedding, detections, box and point decodes."""
    from cellsam_trt.engine.ort_backend import OrtBackend

    ort = OrtBackend(tiny_export, threads=2)
    emb = inputs["embedding"]
    return {
        "encode": ort.encode(inputs["image"]),
        "detect": ort.detect(inputs["image"]),
        "boxes": ort.decode(emb, boxes=BOXES),
        "points": ort.decode(emb, points=POINTS, point_labels=POINT_LABELS),
    }


def _close(a, b, tol=2e-4):
    """max |a - b| within ``tol`` of b's magnitude (FP32 kernels of two libraries)."""
    scale = max(1.0, float(np.abs(b).max()))
    assert a.shape == b.shape and a.dtype == np.float32
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max()


def test_fp32_matches_onnx_runtime(export_copy, inputs, ort_reference):
    from cellsam_trt.engine.openvino_backend import OvBackend

    ov = OvBackend(export_copy, threads=2)
    assert ov.name == "openvino" and ov.precision == "fp32" and ov.device == "cpu"
    assert ov.split_decoder and ov.decode_chunk == 1 and ov.decode_streams == 2
    _close(ov.encode(inputs["image"]), ort_reference["encode"])
    for a, b in zip(ov.detect(inputs["image"]), ort_reference["detect"]):
        _close(a, b)
    whole = OvBackend(export_copy, threads=2, split_decoder=False)
    assert whole.decode_chunk == 16 and whole.decode_streams == 1
    for backend in (ov, whole):
        for a, b in zip(backend.decode(inputs["embedding"], boxes=BOXES), ort_reference["boxes"]):
            _close(a, b)
        pts = backend.decode(inputs["embedding"], points=POINTS, point_labels=POINT_LABELS)
        for a, b in zip(pts, ort_reference["points"]):
            _close(a, b)
    # the input checks of the shared base name the input
    with pytest.raises(S.InputSpecError, match="image"):
        ov.encode(inputs["image"][:, :, :512])


def test_ir_beside_the_export_and_the_model_cache(export_copy, inputs):
    from cellsam_trt.engine.openvino_backend import IR_DIR, IR_INDEX, OvBackend
    from cellsam_trt.runtime.manifest import read_manifest

    first = OvBackend(export_copy, threads=2)
    emb = first.encode(inputs["image"])
    ir = export_copy / IR_DIR
    index = json.loads((ir / IR_INDEX).read_text())
    sha = read_manifest(export_copy)["models"][S.ENCODER]["sha256"]
    assert index[S.ENCODER]["onnx_sha256"] == sha
    assert (ir / "image_encoder.xml").is_file() and (ir / "image_encoder.bin").stat().st_size > 0
    assert any((ir / "cache").iterdir())  # OpenVINO's compiled-model cache
    # a second start reads the IR (and the compiled cache), with the same result
    second = OvBackend(export_copy, threads=2)
    np.testing.assert_array_equal(second.encode(inputs["image"]), emb)
    assert second.sources[S.ENCODER] == str(ir / "image_encoder.xml")
    # an IR stamped for another ONNX file is converted again, not used
    index[S.ENCODER]["onnx_sha256"] = "0" * 64
    (ir / IR_INDEX).write_text(json.dumps(index))
    (ir / "image_encoder.xml").write_text("not an IR")
    third = OvBackend(export_copy, threads=2, cache_dir="")
    np.testing.assert_array_equal(third.encode(inputs["image"]), emb)
    assert json.loads((ir / IR_INDEX).read_text())[S.ENCODER]["onnx_sha256"] == sha


def test_without_ir_or_cache_runs_the_onnx(export_copy, inputs, ort_reference):
    from cellsam_trt.engine.openvino_backend import OvBackend

    ov = OvBackend(export_copy, threads=1, save_ir=False, cache_dir="")
    _close(ov.encode(inputs["image"]), ort_reference["encode"])
    assert ov.sources[S.ENCODER] == str(export_copy / "image_encoder.onnx")
    assert not (export_copy / "openvino").exists() or not any((export_copy / "openvino").iterdir())


def test_throughput_hint_runs_calls_concurrently_with_the_same_results(export_copy, inputs, ort_reference):
    from cellsam_trt.engine.openvino_backend import OvBackend

    ov = OvBackend(export_copy, threads=2, performance_hint="throughput")
    runner = ov.runner(S.ENCODER)
    assert runner._pool.qsize() >= 1
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(ov.encode, [inputs["image"]] * 2))
    for out in outs:
        _close(out, ort_reference["encode"])


def test_precision_problem_names_the_missing_capability():
    from cellsam_trt.engine.openvino_backend import precision_problem

    avx2 = ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]
    assert precision_problem("fp32", avx2) is None and precision_problem("int8", avx2) is None
    msg = precision_problem("bf16", avx2)
    assert "no native BF16" in msg and "FP32, INT8, BIN" in msg and "would run it as f32" in msg
    assert precision_problem("bf16", ["FP32", "BF16", "INT8"]) is None
    assert "FP16" in precision_problem("fp16", avx2)
    assert "not 'fp8'" in precision_problem("fp8", avx2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_natively_or_is_refused(export_copy, inputs, ort_reference, precision):
    """On this CPU: refused with the reason where OpenVINO lacks the capability (it would run
    f32); where it has it, the compiled model reports that precision and the embedding is close."""
    from cellsam_trt.engine.openvino_backend import OvBackend, cpu_capabilities, precision_problem

    problem = precision_problem(precision, cpu_capabilities())
    if problem:
        with pytest.raises(BackendError, match=f"no native {precision.upper()}"):
            OvBackend(export_copy, precision=precision)
        return
    import openvino.properties.hint as hints

    ov = OvBackend(export_copy, precision=precision, threads=2)
    emb = ov.encode(inputs["image"])
    import openvino as ov_lib

    want = ov_lib.Type.bf16 if precision == "bf16" else ov_lib.Type.f16
    assert ov.compiled(S.ENCODER).get_property(hints.inference_precision) == want
    ref = ort_reference["encode"]
    assert np.abs(emb - ref).max() <= 0.1 * np.abs(ref).max()


def test_nncf_int8(export_copy, tmp_path):
    """``cellsam-trt quantize`` writes INT8 IR stamped with the ONNX it came from; the int8
    backend runs it (decoder FP32), close to FP32 on an image like the calibration ones; without
    it, one clear error."""
    pytest.importorskip("nncf")
    from cellsam_trt.cli import main, synthetic_cells
    from cellsam_trt.engine.openvino_backend import IR_INDEX, OvBackend
    from cellsam_trt.export.tensorrt_build import model_input

    with pytest.raises(BackendError, match="cellsam-trt quantize --model"):
        OvBackend(export_copy, precision="int8")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        np.save(calib / f"img{i}.npy", synthetic_cells(i, 96, 112, 6)[0])
    assert main(["quantize", "--model", str(export_copy), "--calib-images", str(calib)]) == 0
    index = json.loads((export_copy / "openvino" / IR_INDEX).read_text())
    assert index["image_encoder.int8"]["calibration_images"] == ["img0.npy", "img1.npy"]
    assert "cellfinder.int8" in index
    fp = OvBackend(export_copy, threads=2)
    q = OvBackend(export_copy, precision="int8", threads=2)
    assert q.decoder_precision == "fp32"
    image = synthetic_cells(5, 96, 112, 6)[0]  # not a calibration image
    x, xc = model_input(image, "sam", True), model_input(image, "cellfinder", True)
    ef, eq = fp.encode(x), q.encode(x)
    assert q.sources[S.ENCODER].endswith("image_encoder.int8.xml")
    assert not np.array_equal(ef, eq)  # really quantized ...
    assert np.corrcoef(ef.ravel(), eq.ravel())[0, 1] >= 0.98  # ... and close
    (lf, bf), (lq, bq) = fp.detect(xc), q.detect(xc)
    assert np.abs(lf - lq).max() <= 0.1 * np.abs(lf).max() and np.abs(bf - bq).max() <= 0.01
    np.testing.assert_array_equal(q.decode(ef, boxes=BOXES)[0], fp.decode(ef, boxes=BOXES)[0])
    # scope "mlp" (default): only the MLP MatMuls read quantized activations; "all": NNCF's choice
    stamp = index["image_encoder.int8"]
    assert stamp["scope"] == "mlp" and stamp["fp32_layers"] > 0 and stamp["smooth_quant"] is False
    assert _int8_matmuls(export_copy) and all("/mlp/lin" in n for n in _int8_matmuls(export_copy))
    argv = ["quantize", "--model", str(export_copy), "--calib-images", str(calib), "--scope", "all"]
    assert main(argv + ["--smooth-quant"]) == 0
    assert json.loads((export_copy / "openvino" / IR_INDEX).read_text())["image_encoder.int8"]["smooth_quant"] is True
    every = _int8_matmuls(export_copy)
    assert any("/attn/qkv/" in n for n in every) and any(n.endswith("/attn/MatMul") for n in every)


def _int8_matmuls(export_dir) -> list[str]:
    """MatMuls of the INT8 encoder IR with a FakeQuantize input (an INT8 activation)."""
    import openvino as ov_lib

    model = ov_lib.Core().read_model(str(export_dir / "openvino" / "image_encoder.int8.xml"))
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "MatMul"
        and any(op.input_value(i).get_node().get_type_name() == "FakeQuantize" for i in range(2))
    ]


def test_quantize_without_images_is_one_line(export_copy, tmp_path, capsys):
    from cellsam_trt.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["quantize", "--model", str(export_copy), "--calib-images", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no images in" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the front door


def test_auto_on_the_cpu_picks_openvino_and_says_why(export_copy):
    from cellsam_trt.api import resolve

    choice = resolve(export_copy, "auto", "cpu")
    assert choice.backend == "openvino" and choice.precision == "fp32" and choice.device == "cpu"
    assert "OpenVINO" in choice.reason
    assert resolve(export_copy, "ort", "cpu").backend == "ort"


def test_impossible_requests_are_one_line(export_copy):
    from cellsam_trt.api import LoadError, resolve
    from cellsam_trt.engine.openvino_backend import cpu_capabilities

    with pytest.raises(LoadError, match="OpenVINO runs on the CPU"):
        resolve(export_copy, "openvino", "cuda")
    if "BF16" not in cpu_capabilities():
        with pytest.raises(LoadError, match="no native BF16"):
            resolve(export_copy, "openvino", "cpu", "bf16")
        with pytest.raises(LoadError, match="no native BF16"):
            resolve(export_copy, "auto", "cpu", "bf16")
    else:
        assert resolve(export_copy, "auto", "cpu", "bf16").backend == "openvino"


def test_load_segment_and_cli_run_on_openvino(export_copy, tmp_path):
    from cellsam_trt import CellSAM, SegmentSettings
    from cellsam_trt.cli import main, synthetic_cells
    from cellsam_trt.engine.ort_backend import OrtBackend
    from cellsam_trt.pipeline import Prompts, segment

    img, boxes = synthetic_cells(1, 128, 144, 5)
    settings = SegmentSettings(iou_threshold=-100)
    with CellSAM.load(export_copy, threads=2, settings=settings) as model:
        assert model.description["backend"] == "openvino"
        res = model.segment(img, boxes=boxes)
    ref = segment(OrtBackend(export_copy, threads=2), img, Prompts(boxes=boxes), settings)
    assert res.labels.max() > 0
    assert (res.labels == ref.labels).mean() >= 0.999
    np.save(tmp_path / "img.npy", img)
    (tmp_path / "boxes.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    rc = main(
        ["run", str(tmp_path / "img.npy"), "--out", str(tmp_path / "out"), "--model", str(export_copy),
         "--backend", "openvino", "--boxes", str(tmp_path / "boxes.json"), "--quiet", "--iou-threshold=-100",
         "--format", "npy"]
    )  # fmt: skip
    assert rc == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "img_labels.npy"), res.labels)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert "openvino" in json.dumps(summary)
