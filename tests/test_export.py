"""ONNX export of the three graphs at a small config: structure, metadata, TensorRT check,
dynamic batch / prompt counts against PyTorch, and the exporter's own failure reports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from cellsam_trt.export.onnx_export import IR_VERSION, OPSET, Case, ExportValidationError, export_graph
from cellsam_trt.export.trt_compat import TrtCompatError, assert_trt_compatible, check_trt_compat
from cellsam_trt.runtime import specs as S
from cellsam_trt.runtime.manifest import read_manifest
from cellsam_trt.runtime.prompt_layout import prompt_tokens


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_manifest_and_metadata(tiny_export, tiny_model):
    m = read_manifest(tiny_export)
    assert m["adv_mode"] is True and m["has_detector"] is True and m["opset"] == OPSET
    assert len(m["checkpoint"]["sha256"]) == 64
    from cellsam_trt.model.cellsam import CellSAMConfig

    assert CellSAMConfig.from_dict(m["config"]) == tiny_model.cfg
    for name in S.MODEL_NAMES + S.CONTEXT_GRAPHS:
        entry = m["models"][name]
        model = onnx.load(str(tiny_export / entry["file"]), load_external_data=False)
        assert model.ir_version <= IR_VERSION
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
        meta = {p.key: p.value for p in model.metadata_props}
        assert S.ModelSpec.from_json(meta["cellsam_trt.spec"]) == S.ModelSpec.from_dict(entry["spec"])
        assert meta["cellsam_trt.checkpoint_sha256"] == m["checkpoint"]["sha256"]
        assert meta["cellsam_trt.adv_mode"] == "true" and meta["cellsam_trt.model"] == name
        assert entry["validation"]["max_abs_diff"]  # the exporter's own comparison ran
    assert "int8" in m["models"][S.ENCODER] and "int8" in m["models"][S.CELLFINDER]


def test_checker_shape_inference_and_trt_compat(tiny_export):
    m = read_manifest(tiny_export)
    for name in S.MODEL_NAMES + S.CONTEXT_GRAPHS:
        model = onnx.load(str(tiny_export / m["models"][name]["file"]))
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        report = assert_trt_compatible(model, name)
        assert report.ok and "MatMul" in report.ops
        assert not {"If", "Loop", "Scan"} & set(report.ops)  # control-flow free


def test_int8_graph_is_reported_as_not_trt_compatible(tiny_export):
    m = read_manifest(tiny_export)
    q = onnx.load(str(tiny_export / m["models"][S.ENCODER]["int8"]["file"]))
    report = check_trt_compat(q)
    assert any("DynamicQuantizeLinear" in p for p in report.problems)
    assert any("MatMulInteger" in p for p in report.problems)
    with pytest.raises(TrtCompatError, match="not TensorRT 10 compatible"):
        assert_trt_compatible(q, "int8 encoder")


def test_trt_check_finds_opset_and_non_constant_axes():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    axes = onnx.helper.make_tensor_value_info("axes", onnx.TensorProto.INT64, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node("ReduceSum", ["x", "axes"], ["y"])
    g = onnx.helper.make_graph([node], "g", [x, axes], [y])
    problems = check_trt_compat(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])).problems
    assert any("opset 21" in p for p in problems)
    assert any("must be an initializer" in p for p in problems)
    d = onnx.helper.make_tensor_value_info("d", onnx.TensorProto.DOUBLE, [2, 3])
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["d"], ["y"])], "g", [d], [y])
    problems = check_trt_compat(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])).problems
    assert any("DOUBLE" in p for p in problems)


def _run_images(path, x):
    sess = _session(path)
    return sess.run(None, {"image": x})


@pytest.mark.parametrize("name", [S.ENCODER, S.CELLFINDER])
def test_image_graphs_dynamic_batch(tiny_export, tiny_model, name):
    """Batch 2 with two different images gives each image's batch-1 PyTorch output."""
    m = read_manifest(tiny_export)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 1024, 1024)).astype(np.float32)
    got2 = _run_images(tiny_export / m["models"][name]["file"], x)
    got1 = _run_images(tiny_export / m["models"][name]["file"], x[1:])
    module = tiny_model.mask_sam.image_encoder if name == S.ENCODER else tiny_model.finder
    with torch.no_grad():
        want = module(torch.from_numpy(x))
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    for g2, g1, w in zip(got2, got1, want):
        assert g2.shape == w.shape and g2.shape[0] == 2
        assert np.abs(g2 - w).max() <= 1e-4 * max(1.0, np.abs(w).max())
        assert np.abs(g1[0] - w[1]).max() <= 1e-4 * max(1.0, np.abs(w).max())


@pytest.fixture(scope="module")
def decoder_session(tiny_export):
    return _session(tiny_export / read_manifest(tiny_export)["models"][S.DECODER]["file"])


@pytest.fixture(scope="module")
def embedding():
    return np.random.default_rng(11).standard_normal((1, 256, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 37])
def test_decoder_dynamic_box_count(decoder_session, tiny_model, embedding, n):
    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 900, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 120, (n, 2))], 1).astype(np.float32)
    coords, labels = prompt_tokens(boxes=boxes)
    lr, iou = decoder_session.run(None, {"image_embeddings": embedding, "point_coords": coords, "point_labels": labels})
    want_lr, want_iou = tiny_model.mask_sam.decode(torch.from_numpy(embedding), boxes=torch.from_numpy(boxes))
    assert lr.shape == (n, 1, 256, 256) and iou.shape == (n, 1)
    scale = max(1.0, float(want_lr.abs().max()))
    assert np.abs(lr - want_lr.numpy()).max() <= 1e-5 * scale
    assert np.abs(iou - want_iou.numpy()).max() <= 1e-5


@pytest.mark.parametrize("with_boxes", [False, True])
def test_decoder_point_prompts(decoder_session, tiny_model, embedding, with_boxes):
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 1023, (5, 4, 2)).astype(np.float32)
    lab = rng.integers(-1, 2, (5, 4))
    boxes = np.concatenate([pts[:, 0], pts[:, 0] + 60], 1).astype(np.float32) if with_boxes else None
    coords, labels = prompt_tokens(boxes=boxes, points=pts, point_labels=lab)
    assert coords.shape == (5, 6 if with_boxes else 5, 2)
    lr, iou = decoder_session.run(None, {"image_embeddings": embedding, "point_coords": coords, "point_labels": labels})
    want_lr, want_iou = tiny_model.mask_sam.decode(
        torch.from_numpy(embedding),
        boxes=None if boxes is None else torch.from_numpy(boxes),
        points=torch.from_numpy(pts),
        labels=torch.from_numpy(lab),
    )
    assert np.abs(lr - want_lr.numpy()).max() <= 1e-5 * max(1.0, float(want_lr.abs().max()))
    assert np.abs(iou - want_iou.numpy()).max() <= 1e-5


@pytest.mark.parametrize("n", [1, 9])
def test_split_decoder_graphs_match_sam_decode(tiny_export, tiny_model, embedding, n):
    """prompt_context once, then context_decoder on its outputs, equals Sam.decode (boxes + a point)."""
    m = read_manifest(tiny_export)
    ctx = _session(tiny_export / m["models"][S.PROMPT_CONTEXT]["file"])
    dec = _session(tiny_export / m["models"][S.CONTEXT_DECODER]["file"])
    context = ctx.run(None, {"image_embeddings": embedding})
    assert [c.shape for c in context] == [(1, 4096, 256), (1, 8, 16, 4096), (1, 8, 4096, 16), (1, 8, 4096, 16)]
    rng = np.random.default_rng(20 + n)
    xy = rng.uniform(0, 900, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 120, (n, 2))], 1).astype(np.float32)
    pts = rng.uniform(0, 1023, (n, 1, 2)).astype(np.float32)
    coords, labels = prompt_tokens(boxes=boxes, points=pts, point_labels=np.ones((n, 1)))
    feeds = dict(zip(S.model_specs()[S.CONTEXT_DECODER].input_names, context))
    lr, iou = dec.run(None, {**feeds, "point_coords": coords, "point_labels": labels})
    want_lr, want_iou = tiny_model.mask_sam.decode(
        torch.from_numpy(embedding),
        boxes=torch.from_numpy(boxes),
        points=torch.from_numpy(pts),
        labels=torch.ones(n, 1, dtype=torch.int64),
    )
    assert lr.shape == (n, 1, 256, 256)
    assert np.abs(lr - want_lr.numpy()).max() <= 1e-5 * max(1.0, float(want_lr.abs().max()))
    assert np.abs(iou - want_iou.numpy()).max() <= 1e-5


def test_prompt_tokens_layout():
    c, l = prompt_tokens(boxes=np.array([[1, 2, 3, 4]], np.float32))
    assert c.tolist() == [[[1, 2], [3, 4]]] and l.tolist() == [[2, 3]]
    c, l = prompt_tokens(points=np.array([[[5, 6]]], np.float32), point_labels=np.array([[0]]))
    assert c.tolist() == [[[5, 6], [0, 0]]] and l.tolist() == [[0, -1]]
    with pytest.raises(ValueError, match="2 boxes but 1 point prompts"):
        prompt_tokens(boxes=np.zeros((2, 4)), points=np.zeros((1, 1, 2)))


class _Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


_SMALL = S.ModelSpec(
    "affine",
    "affine.onnx",
    (S.TensorSpec("x", "float32", (S.Dim("B", 1, 2, 8), 4)),),
    (S.TensorSpec("y", "float32", (S.Dim("B", 1, 2, 8), 3)),),
)


def test_validation_error_reports_the_difference(tmp_path):
    module = _Affine().eval()
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    good = Case("2 rows", {"x": x}, lambda: module(torch.from_numpy(x)))
    res = export_graph("affine", module, _SMALL, tmp_path / "a.onnx", [good], {})
    assert res.max_abs_diff["y"] <= 1e-6
    off = Case("2 rows, reference + 0.5", {"x": x}, lambda: module(torch.from_numpy(x)) + 0.5)
    with pytest.raises(ExportValidationError, match="differs from PyTorch by 0.5") as e:
        export_graph("affine", module, _SMALL, tmp_path / "b.onnx", [off], {})
    assert e.value.output == "y" and e.value.max_abs_diff == pytest.approx(0.5, abs=1e-5)


def test_manifest_errors(tmp_path, tiny_export):
    from cellsam_trt.runtime.manifest import ManifestError

    with pytest.raises(ManifestError, match="not an export directory"):
        read_manifest(tmp_path)
    m = json.loads((tiny_export / "manifest.json").read_text())
    m["models"] = {"image_encoder": dict(m["models"]["image_encoder"], file="gone.onnx")}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="gone.onnx"):
        read_manifest(tmp_path)
    m["format_version"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="v3 .expected 'cellsam-trt-onnx' v1 or v2"):
        read_manifest(tmp_path)
