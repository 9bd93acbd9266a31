"""Precision-annotated ONNX graphs (``export.precision``) on the tiny export, run on the CPU
with ONNX Runtime against their FP32 graphs. Mask agreement on the sample images:
``benchmarks/bench_precision.py``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from cellsam_trt.export import precision as P
from cellsam_trt.runtime import specs as S
from test_trt import fp16_export  # noqa: F401  (module-scoped: the tiny export + its FP16 graphs)


def _cells(seed, h=96, w=112):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(6):
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(4, 9)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 800
    return img.astype(np.uint16)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_fp32_islands_on_real_node_names(fp16_export):  # noqa: F811
    for m in S.MODEL_NAMES:
        model = onnx.load(str(fp16_export / f"{m}.onnx"), load_external_data=False)
        keep = set(P.fp32_nodes(model, m))
        ops = {n.name: n.op_type for n in model.graph.node}
        for name, op in ops.items():
            if op in ("LayerNormalization", "Softmax", "Sin", "Cos"):
                assert name in keep, (m, name)
            if "/class_embed/" in name or "/bbox_embed/" in name or "/neck/neck.1/" in name:
                assert name in keep, (m, name)
            if name.endswith(("/attn/qkv/MatMul", "/mlp/lin1/MatMul")):
                assert name not in keep, (m, name)  # the trunks' matmuls run in reduced precision
        if m == S.DECODER:  # the prompt encoder's Fourier-feature chain, one weight MatMul
            assert sum(ops[n] == "MatMul" for n in keep) == 1
    with pytest.raises(P.PrecisionError, match="invalid FP32 node pattern"):
        P.fp32_nodes(model, S.ENCODER, keep_fp32=("(",))


def test_fp16_graphs_run_on_the_cpu_close_to_fp32(fp16_export):  # noqa: F811
    manifest = json.loads((fp16_export / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    for m in (S.ENCODER, S.CELLFINDER):
        rec = manifest["models"][m]["annotated"]["fp16"]
        g = onnx.load(str(fp16_export / rec["file"]), load_external_data=False)
        meta = {p.key: p.value for p in g.metadata_props}
        assert meta["cellsam_trt.precision"] == "fp16" and int(meta["cellsam_trt.fp32_nodes"]) == rec["fp32_nodes"]
        assert all(t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in [*g.graph.input, *g.graph.output])
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.graph.initializer)
        c = P.compare_graphs(fp16_export / f"{m}.onnx", fp16_export / rec["file"], {"image": x}, m, "fp16", threads=2)
        assert c.runs, c.error
        for out, d in c.max_abs_diff.items():
            assert 0 < d <= 1e-2 * max(1.0, c.max_abs_ref[out]), (m, out, d)


def test_int8_qdq_graphs(fp16_export, tmp_path):  # noqa: F811
    out = tmp_path / "onnx"
    shutil.copytree(fp16_export, out)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "a.npy", _cells(0))
    np.save(calib / "b.npy", np.zeros((40, 40), np.uint16))  # blank: skipped by the SAM branch
    with pytest.raises(P.PrecisionError, match="--calib-images"):
        P.annotate_export(out, "int8")
    manifest = P.annotate_export(out, "int8", calib_images=calib, calib_max_images=2, models=[S.ENCODER])
    rec = manifest["models"][S.ENCODER]["annotated"]["int8"]
    assert rec["calibration"] == {"method": "minmax", "images": 1} and rec["int8_nodes"] > 0
    g = onnx.load(str(out / rec["file"]), load_external_data=False)
    # every op that reads a dequantized tensor (but for its shape) is a weight MatMul / Conv of the trunk
    dq = {o for n in g.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    skip = ("QuantizeLinear", "DequantizeLinear", "Shape")
    readers = {n.name for n in g.graph.node if n.op_type not in skip and dq & set(n.input)}
    targets = set(P.int8_targets(onnx.load(str(out / "image_encoder.onnx"), load_external_data=False), S.ENCODER))
    assert readers and readers <= targets and len(targets) == rec["int8_nodes"] and rec["int8_scope"] == "mlp"
    assert all(r.startswith("/encoder/blocks.") and "/mlp/lin" in r for r in readers)
    assert not P.trt_problems(out / rec["file"])  # TensorRT's Q/DQ: INT8 data / zero points, float bias
    cache = P.calib_cache(out, manifest["models"][S.ENCODER], "minmax", "mlp")  # reused next time: no image read
    assert cache.is_file() and manifest["models"][S.ENCODER]["sha256"][:12] in cache.name
    _, n, served = P.to_int8_qdq(out / "image_encoder.onnx", tmp_path / "again.onnx", S.ENCODER, iter(()), cache=cache)
    assert served == 0 and n == rec["int8_nodes"]
    x = np.random.default_rng(1).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    c = P.compare_graphs(out / "image_encoder.onnx", out / rec["file"], {"image": x}, S.ENCODER, "int8", threads=2)
    assert c.runs and 0 < c.max_abs_diff["image_embeddings"] < 0.25 * c.max_abs_ref["image_embeddings"]


def test_int8_scopes_on_real_node_names(fp16_export):  # noqa: F811
    for m, trunk in ((S.ENCODER, "/encoder/"), (S.CELLFINDER, "/backbone/")):
        model = onnx.load(str(fp16_export / f"{m}.onnx"), load_external_data=False)
        blocks = {n.name.split("/blocks.")[1].split("/")[0] for n in model.graph.node if "/blocks." in n.name}
        mlp, every = P.int8_targets(model, m, "mlp"), P.int8_targets(model, m, "all")
        assert len(mlp) == 2 * len(blocks) and set(mlp) < set(every)
        assert all(trunk in n and n.endswith(("/mlp/lin1/MatMul", "/mlp/lin2/MatMul")) for n in mlp)
        kinds = {n.rsplit("/", 2)[-2] for n in every}  # qkv, proj, lin1, lin2 and the patch embedding
        assert {"qkv", "proj", "lin1", "lin2"} <= kinds and any(n.endswith("/patch_embed/proj/Conv") for n in every)
        assert len(every) == 4 * len(blocks) + 1 and all(trunk in n for n in every)
    with pytest.raises(P.PrecisionError, match="INT8 scope must be one of"):
        P.int8_targets(model, S.CELLFINDER, "attention")
    with pytest.raises(P.PrecisionError, match="has no INT8 form"):
        P.int8_targets(model, S.DECODER)


def test_refusals(fp16_export):  # noqa: F811
    with pytest.raises(P.PrecisionError, match="fp8: this version writes no FP8 graph"):
        P.annotate_export(fp16_export, "fp8")
    if not _has("modelopt"):
        with pytest.raises(P.PrecisionError, match="Model Optimizer's AutoCast, which is not installed"):
            P.annotate_export(fp16_export, "bf16")


@pytest.mark.skipif(
    not _has("modelopt"), reason="nvidia-modelopt (AutoCast) is not installed: pip install '.[modelopt]'"
)
def test_bf16_graph_keeps_islands_and_io(fp16_export, tmp_path):  # noqa: F811
    src = fp16_export / "image_encoder.onnx"
    model = onnx.load(str(src), load_external_data=False)
    islands = P.fp32_nodes(model, S.ENCODER)
    g = P.to_bf16(src, islands)
    assert [o.version for o in g.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in g.graph.initializer)
    assert all(t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in [*g.graph.input, *g.graph.output])
    onnx.checker.check_model(g)


def test_export_cli_annotates_an_existing_export(fp16_export, tmp_path, capsys):  # noqa: F811
    from cellsam_trt.cli import main

    out = tmp_path / "onnx"
    shutil.copytree(fp16_export, out)
    (out / "prompt_decoder.fp16.onnx").unlink()
    assert main(["export", "--annotate-only", "--out", str(out), "--precision", "fp16"]) == 0
    assert (out / "prompt_decoder.fp16.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["models"][S.DECODER]["annotated"]["fp16"]
    assert rec["source_sha256"] == manifest["models"][S.DECODER]["sha256"]
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "a.npy", _cells(2))
    argv = ["export", "--annotate-only", "--out", str(out), "--precision", "int8", "--calib-images", str(calib)]
    assert main(argv + ["--int8-scope", "all"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for m in (S.ENCODER, S.CELLFINDER):
        rec = manifest["models"][m]["annotated"]["int8"]
        model = onnx.load(str(out / f"{m}.onnx"), load_external_data=False)
        assert rec["int8_scope"] == "all" and rec["int8_nodes"] == len(P.int8_targets(model, m, "all"))
    assert main(["export", "--out", str(tmp_path / "new"), "--precision", "fp8"]) == 2
    assert "fp8: this version writes no FP8 graph" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # refused before any export
    assert main(["export", "--annotate-only", "--out", str(tmp_path), "--precision", "fp16"]) == 2
    assert "cellsam-trt export:" in capsys.readouterr().err


def test_bf16_emulation_rounds_every_bf16_tensor(tmp_path):
    """``benchmarks/bench_precision.py``'s BF16 emulation (ONNX Runtime's CPU provider runs no
    BF16 arithmetic): a graph as AutoCast writes it (Cast to BF16, ops in BF16 with a BF16
    weight, Cast back) gives, emulated, exactly the BF16 arithmetic of ml_dtypes (each op's FP32
    result rounded to nearest even), and the unemulated graph is refused by ONNX Runtime."""
    import importlib.util

    import ml_dtypes
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_precision", ROOT / "benchmarks" / "bench_precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bf16 = ml_dtypes.bfloat16
    w = np.random.default_rng(0).normal(size=(64,)).astype(bf16)
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=T.BFLOAT16),
        helper.make_node("Mul", ["xb", "w"], ["m"]),
        helper.make_node("Add", ["m", "xb"], ["a"]),
        helper.make_node("Cast", ["a"], ["y"], to=T.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [64])],
        [helper.make_tensor_value_info("y", T.FLOAT, [64])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "bf16.onnx")
    counts = bench.emulate_bf16(tmp_path / "bf16.onnx", tmp_path / "em.onnx")
    assert counts == {
        "initializers": 1,
        "casts": 1,
        "rounded_outputs": 3,
        "untyped_outputs": 0,
        "bf16_graph_io": 0,
    }
    x = np.random.default_rng(1).normal(size=64).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "em.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def rnd(v):
        return v.astype(bf16).astype(np.float32)

    xb = rnd(x)
    want = rnd(rnd(xb * w.astype(np.float32)) + xb)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, (x * w.astype(np.float32)) + x)  # the rounding is there
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(str(tmp_path / "bf16.onnx"), providers=["CPUExecutionProvider"])
