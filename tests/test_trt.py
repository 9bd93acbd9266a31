"""TensorRT engine building and loading: what can be checked without TensorRT or a GPU.

* the build plan from the specs (profiles, flags, FP32 layers, INT8 scope, workspace, caches),
  with the layer rules checked against the node names of a real (tiny) ONNX export;
* the engine container (header write / read / compatibility check with the rebuild command),
  on fake engine bytes (this tests the container, not an engine);
* the INT8 calibration data (same preprocessing as the pipeline) and the calibrator logic
  with a fake "device" copy;
* ``cellsam-trt build --dry-run``.

Tests that build or run real engines need TensorRT and a CUDA GPU and are skipped otherwise.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cellsam_trt.export import tensorrt_build as TB
from cellsam_trt.runtime import engine_file as EF
from cellsam_trt.runtime import specs as S

H100 = TB.GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 80 * TB.GIB)
T4 = TB.GpuFacts("Tesla T4", (7, 5), 16 * TB.GIB)
P100 = TB.GpuFacts("Tesla P100-PCIE-16GB", (6, 0), 16 * TB.GIB)


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


needs_trt = pytest.mark.skipif(not _has_tensorrt(), reason="TensorRT is not installed")
needs_gpu = pytest.mark.skipif(not _has_cuda(), reason="no CUDA device")


@pytest.fixture(scope="module")
def specs():
    return S.model_specs()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A real export directory of the tiny model (three ONNX graphs + manifest)."""
    import torch

    from cellsam_trt.export.onnx_export import export_model
    from cellsam_trt.model.cellsam import CellSAMConfig
    from cellsam_trt.model.checkpoint import load_state_dict
    from cellsam_trt.model.synthetic import synthetic_state_dict

    torch.manual_seed(0)
    cfg = CellSAMConfig.tiny()
    model, _ = load_state_dict(synthetic_state_dict(0, cfg), cfg=cfg)
    out = tmp_path_factory.mktemp("tiny_export")
    export_model(model, out, image_batches=(1,), decoder_prompts=(2,))
    return out


@pytest.fixture(scope="module")
def node_names(tiny_export):
    import onnx

    out = {}
    for m in S.MODEL_NAMES:
        model = onnx.load(str(tiny_export / f"{m}.onnx"), load_external_data=False)
        out[m] = {n.name: n.op_type for n in model.graph.node}
    return out


def _plan(spec, gpu=H100, tmp="/tmp/engines", **opts):
    return TB.plan_build(
        spec,
        TB.BuildOptions(**opts),
        gpu,
        f"/x/{spec.filename}",
        tmp,
        export_info={"adv_mode": True, "has_detector": True},
    )


# --------------------------------------------------------------------------- plans


def test_profiles_come_from_the_spec(specs):
    for spec in specs.values():
        plan = _plan(spec)
        assert plan.profile == S.profile_shapes(spec)
        for t in spec.inputs:
            mn, op, mx = plan.profile[t.name]
            assert mn == t.dims("min") and op == t.dims("opt") and mx == t.dims("max")
    enc = _plan(specs[S.ENCODER]).profile["image"]
    assert enc == ((1, 3, 1024, 1024), (1, 3, 1024, 1024), (8, 3, 1024, 1024))
    dec = _plan(specs[S.DECODER]).profile
    assert dec["image_embeddings"][0] == dec["image_embeddings"][2] == (1, 256, 64, 64)
    # the decoder's N is shared by coords and labels in every profile shape
    for i in range(3):
        assert dec["point_coords"][i][0] == dec["point_labels"][i][0]
        assert dec["point_coords"][i][1] == dec["point_labels"][i][1]


def test_profile_overrides(specs):
    for name in (S.ENCODER, S.CELLFINDER):
        plan = _plan(specs[name], max_batch=8, opt_batch=4)
        assert plan.profile["image"] == ((1, 3, 1024, 1024), (4, 3, 1024, 1024), (8, 3, 1024, 1024))
        # the header spec carries the engine's bounds, so runtime checks match the profile
        assert plan.spec.dims()["B"] == S.Dim("B", 1, 4, 8)
    dec = _plan(specs[S.DECODER], max_prompts=64, opt_prompts=500, max_points=4)
    assert dec.profile["point_coords"] == ((1, 1, 2), (64, 2, 2), (64, 4, 2))  # opt clamped to max
    assert dec.spec.dims()["N"].max == 64
    with pytest.raises(TB.PlanError, match="min <= opt <= max"):
        _plan(specs[S.ENCODER], max_batch=0)


def test_flags_per_precision(specs):
    enc = specs[S.ENCODER]
    p32 = _plan(enc, precision="fp32")
    assert p32.flags == () and p32.clear_flags == ("TF32",) and p32.fp32_patterns == ()
    assert p32.layer_precision("/encoder/blocks.0/norm1/LayerNormalization", "NORMALIZATION") is None
    p16 = _plan(enc, precision="fp16")
    assert p16.flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert _plan(enc, precision="fp16", strict_precision=False).flags == ("FP16", "PREFER_PRECISION_CONSTRAINTS")
    assert _plan(enc, precision="bf16").flags == ("BF16", "OBEY_PRECISION_CONSTRAINTS")
    t = _plan(enc, precision="fp32", tf32=True)
    assert t.flags == ("TF32",) and t.clear_flags == ()
    with pytest.raises(TB.PlanError, match="bf16 needs compute capability >= 8.0.*fp16"):
        _plan(enc, gpu=T4, precision="bf16")
    with pytest.raises(TB.PlanError, match="precision must be one of"):
        _plan(enc, precision="fp8")
    with pytest.raises(TB.PlanError, match="invalid --keep-fp32"):
        _plan(enc, keep_fp32=("(",))


def test_fp32_layer_rules_on_real_node_names(tiny_export, node_names):
    """Every normalization, softmax, positional sin/cos and CellFinder head layer stays FP32;
    the big matmuls of the trunks do not."""
    plans = {p.model: p for p in TB.plan_export(tiny_export, tiny_export / "engines", TB.BuildOptions(), H100)}
    for m, nodes in node_names.items():
        plan = plans[m]
        for name, op in nodes.items():
            prec = plan.layer_precision(name, "X")
            if op in ("LayerNormalization", "Softmax", "Sin", "Cos", "InstanceNormalization", "Sigmoid", "Log"):
                assert prec == "fp32", (m, name, op)
            if "/class_embed/" in name or "/bbox_embed/" in name or "/neck/neck.1/" in name or "/neck/neck.3/" in name:
                assert prec == "fp32", (m, name, op)
            if re.search(r"/blocks\.\d+/(attn/qkv|mlp/lin[12])/MatMul$", name):
                assert prec is None, (m, name, op)  # FP16 is free to run the trunk's matmuls
    dec = plans[S.DECODER]
    # the prompt encoder's Fourier-feature chain (coords -> ... -> @ gaussian -> sin/cos)
    chain = [n for n in dec.fp32_names if node_names[S.DECODER][n] == "MatMul"]
    assert len(chain) == 1
    assert {"Sin", "Cos", "Add", "Div"} <= {node_names[S.DECODER][n] for n in dec.fp32_names}
    cf = plans[S.CELLFINDER]
    assert not any("_layers." in n for n in cf.fp32_names)  # heads only, not the DETR layers
    assert any("class_embed" in n for n in cf.fp32_names) and any("bbox_embed" in n for n in cf.fp32_names)
    # layer types and non-compute layers
    assert dec.layer_precision("anything", "SOFTMAX") == "fp32"
    assert dec.layer_precision("/norm_final_attn/LayerNormalization", "SHAPE") is None
    # attention scores only on request
    attn = "/encoder/blocks.0/attn/MatMul"
    assert attn in node_names[S.ENCODER]
    assert plans[S.ENCODER].layer_precision(attn, "MATRIX_MULTIPLY") is None
    p = TB.plan_build(
        S.ModelSpec.from_dict(plans[S.ENCODER].spec.to_dict()),
        TB.BuildOptions(fp32_attention=True),
        H100,
        "/x/e.onnx",
        "/tmp/e",
    )
    assert p.layer_precision(attn, "MATRIX_MULTIPLY") == "fp32"


def test_int8_plan(specs, tmp_path, node_names):
    enc, cf, dec = specs[S.ENCODER], specs[S.CELLFINDER], specs[S.DECODER]
    with pytest.raises(TB.PlanError, match="--calib-images"):
        _plan(enc, tmp=tmp_path, precision="int8")
    images = tmp_path / "calib"
    images.mkdir()
    p = _plan(enc, tmp=tmp_path, precision="int8", calib_images=str(images), calib_batch=2)
    assert p.flags == ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS")
    c = p.calibration
    assert c.batch_shape == (2, 3, 1024, 1024) and c.branch == "sam" and c.adv_mode is True
    assert c.cache_path == str(tmp_path / "image_encoder.int8.calib")
    # the trunk may run INT8, the neck is FP16, LayerNorms FP32
    assert p.layer_precision("/encoder/blocks.0/attn/qkv/MatMul", "MATRIX_MULTIPLY") is None
    assert p.layer_precision("/encoder/patch_embed/proj/Conv", "CONVOLUTION") is None
    assert p.layer_precision("/encoder/neck/neck.0/Conv", "CONVOLUTION") == "fp16"
    assert p.layer_precision("/encoder/blocks.0/norm1/LayerNormalization", "NORMALIZATION") == "fp32"
    q = _plan(cf, tmp=tmp_path, precision="int8", calib_images=str(images))
    assert q.calibration.branch == "cellfinder"
    assert q.layer_precision("/finder/backbone/body/blocks.0/attn/qkv/MatMul", "MATRIX_MULTIPLY") is None
    assert q.layer_precision("/finder/transformer/encoder_layers.0/ffn/linear1/MatMul", "MATRIX_MULTIPLY") == "fp16"
    for name in node_names[S.CELLFINDER]:
        if "/backbone/" not in name and node_names[S.CELLFINDER][name] in ("MatMul", "Gemm", "Conv"):
            assert q.layer_precision(name, "X") in ("fp16", "fp32"), name
    # the decoder of an INT8 build is FP16, without calibration
    d = _plan(dec, tmp=tmp_path, precision="int8", calib_images=str(images))
    assert d.precision == "fp16" and d.calibration is None and "INT8" not in d.flags
    # an existing cache is enough; a batch outside the profile is not
    (tmp_path / "cellfinder.int8.calib").write_bytes(b"cache")
    assert _plan(cf, tmp=tmp_path, precision="int8").calibration.image_dir is None
    with pytest.raises(TB.PlanError, match="outside the batch range"):
        _plan(cf, tmp=tmp_path, precision="int8", calib_batch=5)
    with pytest.raises(TB.PlanError, match="int8 needs compute capability >= 6.1"):
        _plan(enc, gpu=P100, tmp=tmp_path, precision="int8", calib_images=str(images))


def test_workspace_and_cache_paths(specs, tmp_path):
    enc = specs[S.ENCODER]
    assert _plan(enc).workspace_bytes == 4 * TB.GIB
    small = TB.GpuFacts("small", (8, 6), 8 * TB.GIB)
    assert _plan(enc, gpu=small).workspace_bytes == 2 * TB.GIB
    assert _plan(enc, workspace_gib=1.5).workspace_bytes == int(1.5 * TB.GIB)
    with pytest.raises(TB.PlanError, match="workspace"):
        _plan(enc, workspace_gib=0)
    assert _plan(enc, tmp=tmp_path).timing_cache == str(tmp_path / "timing.cache")
    assert _plan(enc, timing_cache="/c/t.cache").timing_cache == "/c/t.cache"
    assert _plan(enc, no_timing_cache=True).timing_cache is None
    assert _plan(enc, tmp=tmp_path).engine_path == str(tmp_path / "image_encoder.engine")


def test_build_command_round_trips_through_the_cli(specs, tmp_path):
    import argparse

    from cellsam_trt.export.trt_cli import add_build_parser, options_from_args

    opts = TB.BuildOptions(
        precision="int8",
        max_batch=8,
        opt_batch=2,
        max_prompts=128,
        workspace_gib=2.0,
        timing_cache="/t.cache",
        calib_images="/calib",
        calib_batch=2,
        calib_max_images=16,
        keep_fp32=("foo", "bar"),
        fp32_attention=True,
        strict_precision=False,
        tf32=True,
        optimization_level=5,
    )
    argv = opts.to_argv("/export", "/engines")
    assert argv[:6] == ["cellsam-trt", "build", "--onnx", "/export", "--out", "/engines"]
    parser = argparse.ArgumentParser()
    add_build_parser(parser.add_subparsers())
    back = options_from_args(parser.parse_args(argv[1:]))
    assert back == opts
    plan = _plan(specs[S.ENCODER], precision="fp16", max_batch=8)
    assert "--max-batch" in plan.build_command and plan.build_command[0] == "cellsam-trt"
    json.dumps(plan.to_dict())  # JSON-safe


# --------------------------------------------------------------------------- engine container


def _header(**kw):
    h = {
        "model": S.ENCODER,
        "tensorrt_version": "10.3.0",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "precision": "fp16",
        "build_command": ["cellsam-trt", "build", "--onnx", "/exp", "--out", "/eng", "--precision", "fp16"],
    }
    h.update(kw)
    return h


def test_engine_container_round_trip(tmp_path):
    fake = bytes(range(256)) * 10  # stands in for a serialized engine: this tests the container
    path = EF.write_engine_file(tmp_path / "e.engine", _header(), fake)
    head, blob = EF.read_engine_file(path)
    assert blob == fake
    assert head["engine_bytes"] == len(fake) and head["engine_sha256"] == EF.sha256_bytes(fake)
    assert EF.read_header(path) == head
    raw = path.read_bytes()
    assert raw[:8] == EF.MAGIC and raw.endswith(fake)
    assert not list(tmp_path.glob("*.tmp"))


def test_engine_container_rejects_damage(tmp_path):
    path = EF.write_engine_file(tmp_path / "e.engine", _header(), b"x" * 100)
    raw = path.read_bytes()
    (tmp_path / "cut.engine").write_bytes(raw[:-10])
    with pytest.raises(EF.EngineFileError, match="truncated"):
        EF.read_engine_file(tmp_path / "cut.engine")
    (tmp_path / "flip.engine").write_bytes(raw[:-1] + b"y")
    with pytest.raises(EF.EngineFileError, match="sha256"):
        EF.read_engine_file(tmp_path / "flip.engine")
    (tmp_path / "plan.engine").write_bytes(b"\x00" * 64)
    with pytest.raises(EF.EngineFileError, match="bare TensorRT plan"):
        EF.read_header(tmp_path / "plan.engine")
    (tmp_path / "v2.engine").write_bytes(EF._PREFIX.pack(EF.MAGIC, 2, 2) + b"{}")
    with pytest.raises(EF.EngineFileError, match="version 2"):
        EF.read_header(tmp_path / "v2.engine")
    (tmp_path / "short.engine").write_bytes(b"CSAM")
    with pytest.raises(EF.EngineFileError, match="too short"):
        EF.read_header(tmp_path / "short.engine")
    (tmp_path / "json.engine").write_bytes(EF._PREFIX.pack(EF.MAGIC, 1, 5) + b"{nope")
    with pytest.raises(EF.EngineFileError, match="corrupt header"):
        EF.read_header(tmp_path / "json.engine")


def test_compatibility_check_says_how_to_rebuild(tmp_path):
    h = _header()
    same = EF.RuntimeFacts("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    EF.check_compatible(h, same)
    cases = [
        (
            EF.RuntimeFacts("10.4.0", "NVIDIA H100 80GB HBM3", "9.0"),
            "built with TensorRT 10.3.0, this machine has TensorRT 10.4.0",
        ),
        (
            EF.RuntimeFacts("10.3.0", "NVIDIA L4", "8.9"),
            "compute capability 9.0.*NVIDIA L4 \\(compute capability 8.9\\)",
        ),
        (
            EF.RuntimeFacts("10.3.0", "NVIDIA H100 PCIe", "9.0"),
            "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H100 PCIe",
        ),
    ]
    for facts, match in cases:
        with pytest.raises(EF.EngineCompatError, match=match) as e:
            EF.check_compatible(h, facts, tmp_path / "image_encoder.engine")
        msg = str(e.value)
        assert "Rebuild it here with:" in msg
        assert "cellsam-trt build --onnx /exp --out /eng --precision fp16" in msg
        assert e.value.rebuild_command == "cellsam-trt build --onnx /exp --out /eng --precision fp16"
    EF.check_compatible(h, EF.RuntimeFacts("10.3.0", "NVIDIA H100 PCIe", "9.0"), strict_gpu_name=False)
    # a header without a recorded command still gets a usable one
    bare = {k: v for k, v in h.items() if k != "build_command"}
    bare["onnx_dir"] = "/my export"
    cmd = EF.rebuild_command(bare, tmp_path / "e" / "image_encoder.engine")
    assert cmd == f"cellsam-trt build --onnx '/my export' --out {tmp_path / 'e'} --precision fp16"


def test_engine_dir_check_from_real_plans(tiny_export, tmp_path):
    """Headers made from real plans (fake engine bytes) pass or fail the runtime's check."""
    from cellsam_trt.engine.trt_backend import check_engine_dir

    out = tmp_path / "engines"
    plans = TB.plan_export(tiny_export, out, TB.BuildOptions(precision="fp16", max_batch=8), H100)
    for p in plans:
        EF.write_engine_file(p.engine_path, TB.engine_header(p, "10.3.0", "abc", {"fp32": 3, "fp16": 0}), b"fake")
    here = EF.RuntimeFacts("10.3.0", H100.name, "9.0")
    headers = check_engine_dir(out, here)
    assert set(headers) == set(S.MODEL_NAMES)
    h = headers[S.ENCODER]
    assert h["precision"] == "fp16" and h["gpu"]["compute_capability"] == "9.0"
    assert h["profiles"][0]["image"]["max"] == [8, 3, 1024, 1024]
    assert S.ModelSpec.from_dict(h["spec"]).dims()["B"].max == 8
    assert h["export"]["adv_mode"] is True and h["onnx_sha256"] == "abc"
    assert h["fp32_layers"]["counts"] == {"fp32": 3, "fp16": 0}
    with pytest.raises(EF.EngineCompatError) as e:
        check_engine_dir(out, EF.RuntimeFacts("10.3.0", "NVIDIA GeForce RTX 4090", "8.9"))
    assert f"cellsam-trt build --onnx {tiny_export} --out {out} --precision fp16 --max-batch 8" in str(e.value)
    (out / "prompt_decoder.engine").unlink()
    with pytest.raises(FileNotFoundError, match="prompt_decoder.engine"):
        check_engine_dir(out, here)


# --------------------------------------------------------------------------- INT8 calibration


def _cells(seed, h=96, w=112):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(6):
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(4, 9)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 800
    return img.astype(np.uint16)


@pytest.mark.parametrize("adv", [True, False])
def test_calibration_inputs_equal_runtime_inputs(adv):
    from cellsam_trt import pipeline
    from cellsam_trt import preprocess as pre

    images = [_cells(i) for i in range(3)]
    for branch, fn in (("sam", pre.sam_encoder_input), ("cellfinder", pre.cellfinder_input)):
        batches = list(TB.calibration_batches(images, branch, adv, batch_size=1))
        assert len(batches) == 3
        for img, b in zip(images, batches):
            sq = pipeline.prepare(img, pipeline.SegmentSettings()).squashed
            np.testing.assert_array_equal(b, fn(sq, adv))
            assert b.dtype == np.float32 and b.flags.c_contiguous


def test_calibration_batching_skips_blank_and_drops_partial(tmp_path):
    log = []
    images = [_cells(0), np.zeros((40, 40), np.uint8), _cells(1), _cells(2)]
    batches = list(TB.calibration_batches(images, "sam", True, batch_size=2, log=log.append))
    assert len(batches) == 1 and batches[0].shape == (2, 3, 1024, 1024)
    assert any("skipping" in m for m in log) and any("dropping the last 1" in m for m in log)
    # files: read in name order, unreadable ones skipped
    np.save(tmp_path / "b.npy", _cells(3))
    np.save(tmp_path / "a.npy", _cells(4))
    (tmp_path / "c.tif").write_bytes(b"not a tiff")
    (tmp_path / "notes.txt").write_text("ignored")
    files = TB.calibration_files(tmp_path, max_images=10)
    assert [f.name for f in files] == ["a.npy", "b.npy", "c.tif"]
    got = list(TB.calibration_batches(files, "cellfinder", False, 1, log=log.append))
    assert len(got) == 2
    assert TB.calibration_files(tmp_path, max_images=1)[0].name == "a.npy"
    (tmp_path / "empty").mkdir()
    with pytest.raises(TB.PlanError, match="no images"):
        TB.calibration_files(tmp_path / "empty", 5)
    with pytest.raises(TB.PlanError, match="does not exist"):
        TB.calibration_files(tmp_path / "missing", 5)


def test_calibrator_core_with_a_fake_device(tmp_path):
    """The calibrator hands TensorRT one device address per batch, copying each batch into
    'device' memory first (here a dict standing in for the pinned + device buffer)."""
    device: dict[int, np.ndarray] = {}
    copies = []

    def to_device(batch):
        copies.append(batch.copy())
        device[0xD000] = batch.copy()
        return 0xD000

    rng = np.random.default_rng(0)
    shape = (2, 3, 8, 8)
    batches = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    core = TB.CalibratorCore(iter(batches), "image", shape, to_device, tmp_path / "c" / "enc.calib")
    assert core.get_batch_size() == 1
    for b in batches:
        assert core.get_batch(["image"]) == [0xD000]
        np.testing.assert_array_equal(device[0xD000], b)
    assert core.get_batch(["image"]) is None and core.batches_served == 3
    assert len(copies) == 3
    with pytest.raises(ValueError, match="asked for inputs"):
        core.get_batch(["image", "other"])
    bad = TB.CalibratorCore(iter([np.zeros((1, 3, 8, 8), np.float32)]), "image", shape, to_device, None)
    with pytest.raises(ValueError, match="expected"):
        bad.get_batch(["image"])
    # cache
    assert core.read_cache() is None
    core.write_cache(b"TRT-calibration-table")
    assert core.read_cache() == b"TRT-calibration-table"
    (tmp_path / "c" / "enc.calib").write_bytes(b"")
    assert core.read_cache() is None  # an empty cache means: calibrate again


# --------------------------------------------------------------------------- CLI


def test_cli_dry_run_plans_without_a_gpu(tiny_export, tmp_path, capsys):
    from cellsam_trt.cli import main

    out = tmp_path / "engines"
    rc = main(
        [
            "build",
            "--onnx",
            str(tiny_export),
            "--out",
            str(out),
            "--dry-run",
            "--gpu-name",
            "NVIDIA L4",
            "--compute-capability",
            "8.9",
            "--precision",
            "bf16",
            "--max-batch",
            "8",
        ]
    )
    assert rc == 0
    plans = json.loads(capsys.readouterr().out)
    assert [p["model"] for p in plans] == list(S.MODEL_NAMES)
    assert all(p["precision"] == "bf16" and "BF16" in p["flags"] for p in plans)
    assert plans[0]["profile"]["image"]["max"] == [8, 3, 1024, 1024]
    assert plans[0]["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9", "total_memory": 16 * TB.GIB}
    assert not out.exists()  # a dry run writes nothing
    rc = main(
        [
            "build",
            "--onnx",
            str(tiny_export),
            "--out",
            str(out),
            "--dry-run",
            "--gpu-name",
            "Tesla T4",
            "--compute-capability",
            "7.5",
            "--precision",
            "bf16",
        ]
    )
    assert rc == 2 and "bf16 needs compute capability" in capsys.readouterr().err
    rc = main(
        ["build", "--onnx", str(tiny_export), "--out", str(out), "--gpu-name", "X", "--compute-capability", "8.0"]
    )
    assert rc == 2 and "only valid with --dry-run" in capsys.readouterr().err
    rc = main(
        [
            "build",
            "--onnx",
            str(tmp_path),
            "--out",
            str(out),
            "--dry-run",
            "--gpu-name",
            "X",
            "--compute-capability",
            "8.0",
        ]
    )
    assert rc == 2 and "not an export directory" in capsys.readouterr().err


@pytest.mark.skipif(_has_tensorrt(), reason="checks the message shown where TensorRT is missing")
def test_trt_backend_without_tensorrt_says_so(tmp_path):
    from cellsam_trt.engine.trt_backend import TrtBackend, TrtUnavailable

    with pytest.raises(TrtUnavailable, match="TensorRT is not installed"):
        TrtBackend(tmp_path)
    with pytest.raises(TB.BuildError, match="TensorRT is not installed"):
        TB._require_trt10()


@pytest.mark.skipif(_has_tensorrt(), reason="checks the message shown where TensorRT is missing")
def test_cli_build_without_tensorrt_says_so(tiny_export, tmp_path, capsys):
    from cellsam_trt.cli import main

    assert main(["build", "--onnx", str(tiny_export), "--out", str(tmp_path / "e")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


# --------------------------------------------------------------------------- real TensorRT (GPU)


@needs_trt
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_engines_match_torch(tiny_export, tmp_path, precision):
    """Build the tiny engines and compare the TensorRT backend with PyTorch (GPU only)."""
    import torch

    from cellsam_trt.engine.torch_backend import TorchBackend
    from cellsam_trt.engine.trt_backend import TrtBackend
    from cellsam_trt.model.cellsam import CellSAMConfig
    from cellsam_trt.model.checkpoint import load_state_dict
    from cellsam_trt.model.synthetic import synthetic_state_dict

    out = tmp_path / "engines"
    TB.build_export(
        tiny_export, out, TB.BuildOptions(precision=precision, max_batch=2, max_prompts=16, workspace_gib=1)
    )
    cfg = CellSAMConfig.tiny()
    model, _ = load_state_dict(synthetic_state_dict(0, cfg), cfg=cfg)
    ref = TorchBackend(model)
    trt_b = TrtBackend(out)
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)
        tol = 1e-3 if precision == "fp32" else 5e-2
        e_ref, e_trt = ref.encode(x), trt_b.encode(x)
        assert np.abs(e_trt - e_ref).max() <= tol * max(1.0, np.abs(e_ref).max())
        e2 = trt_b.encode(x)  # CUDA-graph replay gives the same result
        np.testing.assert_array_equal(e2, e_trt)
        xy = rng.uniform(0, 900, (37, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 100, (37, 2))], 1).astype(np.float32)
        l_ref, i_ref = ref.decode(e_ref, boxes=boxes)
        l_trt, i_trt = trt_b.decode(e_ref, boxes=boxes)
        assert np.abs(l_trt - l_ref).max() <= tol * max(1.0, np.abs(l_ref).max())
        d_ref, d_trt = ref.detect(x), trt_b.detect(x)
        assert np.abs(d_trt[1] - d_ref[1]).max() <= tol
    finally:
        trt_b.close()
    torch.cuda.empty_cache()


@needs_trt
def test_entropy_calibrator_subclass_delegates(tmp_path):
    calib = TB.make_entropy_calibrator(
        TB.CalibratorCore(iter([]), "image", (1, 3, 8, 8), lambda b: 0, tmp_path / "c.calib")
    )
    import tensorrt as trt

    assert isinstance(calib, trt.IInt8EntropyCalibrator2)
    assert calib.get_batch_size() == 1 and calib.get_batch(["image"]) is None
    calib.write_calibration_cache(b"abc")
    assert calib.read_calibration_cache() == b"abc"


def test_cuda_python_without_a_device_is_reported():
    """With cuda-python but no driver / GPU, the GPU query and buffers fail with clear errors."""
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    if _has_cuda():
        pytest.skip("a CUDA device is present")
    from cellsam_trt.engine.trt_backend import CudaError, HostDeviceBuffer, TrtUnavailable, query_gpu

    with pytest.raises(TrtUnavailable, match="no usable CUDA device 0: cudaGetDeviceProperties failed"):
        query_gpu(0)
    with pytest.raises(CudaError, match="cudaMallocHost failed"):
        HostDeviceBuffer((2, 3), np.float32)
