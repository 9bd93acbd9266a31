"""TensorRT engine building and loading: what can be checked without TensorRT or a GPU.

* the build plan from the specs (profiles, strongly typed network, TF32, the annotated graph
  file per precision, workspace, caches, the TensorRT version range), on a real (tiny) export;
* the engine container (header write / read / compatibility check with the rebuild command),
  on fake engine bytes (this tests the container, not an engine);
* ``cellsam-trt build --dry-run`` for TensorRT 11.4, 10.13 and 10.3.

The precision-annotated graphs themselves are tested in ``test_precision.py``.

Tests that build or run real engines need TensorRT and a CUDA GPU and are skipped otherwise.
"""

from __future__ import annotations

import json

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
def fp16_export(tiny_export, tmp_path_factory):
    """A copy of the session's tiny export with its FP16 graphs (``cellsam-trt export --precision fp16``)."""
    import shutil

    from cellsam_trt.export.precision import annotate_export

    out = tmp_path_factory.mktemp("fp16_export") / "onnx"
    shutil.copytree(tiny_export, out)
    annotate_export(out, "fp16")
    return out


def _plan(spec, gpu=H100, tmp="/tmp/engines", tensorrt="11.4", **opts):
    return TB.plan_build(
        spec,
        TB.BuildOptions(**opts),
        gpu,
        f"/x/{spec.filename}",
        tmp,
        tensorrt=tensorrt,
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


def test_strongly_typed_for_every_precision(specs):
    """No builder precision flag in any plan: the graph carries the precision."""
    enc, dec = specs[S.ENCODER], specs[S.DECODER]
    for p in ("fp32", "fp16", "bf16", "int8"):
        plan = _plan(enc, precision=p)
        assert plan.network_flags == ("STRONGLY_TYPED",) and plan.flags == () and plan.clear_flags == ("TF32",)
        assert plan.graph_precision == p
    assert _plan(dec, precision="int8").graph_precision == "fp16"  # the decoder has no INT8 graph
    t = _plan(enc, precision="fp32", tf32=True)
    assert t.flags == ("TF32",) and t.clear_flags == ()
    with pytest.raises(TB.PlanError, match="bf16 needs compute capability >= 8.0.*fp16"):
        _plan(enc, gpu=T4, precision="bf16")
    with pytest.raises(TB.PlanError, match="int8 needs compute capability >= 6.1"):
        _plan(enc, gpu=P100, precision="int8")
    with pytest.raises(TB.PlanError, match="fp8 is not built"):
        _plan(enc, precision="fp8")
    with pytest.raises(TB.PlanError, match="precision must be one of"):
        _plan(enc, precision="int4")


def test_tensorrt_version_range(specs):
    enc = specs[S.ENCODER]
    assert TB.check_tensorrt_version("10.3.0") == (10, 3)
    assert TB.check_tensorrt_version("11.4.0.106") == (11, 4)
    for bad in ("10.2.0", "8.6.1", "12.0", "9.3"):
        with pytest.raises(TB.PlanError, match="supports TensorRT 10.3 to 11.x"):
            TB.check_tensorrt_version(bad)
    with pytest.raises(TB.PlanError, match="not a TensorRT version"):
        TB.parse_version("latest")
    n11 = _plan(enc, tensorrt="11.4").notes
    n10 = _plan(enc, tensorrt="10.3").notes
    assert "strongly typed" in n11[0] and "ignored" in n11[0]
    assert n10[0].startswith("TensorRT 10.3: STRONGLY_TYPED network")
    assert any("Q/DQ" in n for n in _plan(enc, precision="int8").notes)


def test_plans_read_the_annotated_graphs(tiny_export, fp16_export, tmp_path):
    """FP16 plans parse the export's FP16 graphs; without them a plan says how to write them,
    and a build refuses."""
    plans = TB.plan_export(fp16_export, tmp_path / "e", TB.BuildOptions(precision="fp16"), H100)
    manifest = json.loads((fp16_export / "manifest.json").read_text())
    for p in plans:
        rec = manifest["models"][p.model]["annotated"]["fp16"]
        assert p.missing is None and p.onnx_path == str(fp16_export / f"{p.model}.fp16.onnx")
        assert p.export_info["onnx_sha256"] == rec["sha256"] and p.annotation["fp32_nodes"] > 0
    fp32 = TB.plan_export(fp16_export, tmp_path / "e", TB.BuildOptions(precision="fp32"), H100)
    assert all(p.onnx_path == str(fp16_export / f"{p.model}.onnx") and p.missing is None for p in fp32)
    bare = TB.plan_export(tiny_export, tmp_path / "e", TB.BuildOptions(precision="bf16"), H100)
    assert all(p.missing == f"cellsam-trt export --annotate-only --out {tiny_export} --precision bf16" for p in bare)
    with pytest.raises(TB.BuildError, match="no bf16 graph .* write it with: cellsam-trt export --annotate-only"):
        TB.build_engine(bare[0])
    # an annotated graph made from another FP32 graph is stale: it must be written again
    stale = json.loads(json.dumps(manifest))
    stale["models"][S.ENCODER]["annotated"]["fp16"]["source_sha256"] = "0" * 64
    (fp16_export / "manifest.json").write_text(json.dumps(stale))
    try:
        again = TB.plan_export(fp16_export, tmp_path / "e", TB.BuildOptions(precision="fp16"), H100, [S.ENCODER])
        assert again[0].missing is not None
    finally:
        (fp16_export / "manifest.json").write_text(json.dumps(manifest))


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


def test_engine_dir_check_from_real_plans(fp16_export, tmp_path):
    """Headers made from real plans (fake engine bytes) pass or fail the runtime's check."""
    from cellsam_trt.engine.trt_backend import check_engine_dir

    out = tmp_path / "engines"
    plans = TB.plan_export(fp16_export, out, TB.BuildOptions(precision="fp16", max_batch=8), H100, tensorrt="10.3")
    for p in plans:
        EF.write_engine_file(p.engine_path, TB.engine_header(p, "10.3.0", "abc"), b"fake")
    here = EF.RuntimeFacts("10.3.0", H100.name, "9.0")
    headers = check_engine_dir(out, here)
    assert set(headers) == set(S.MODEL_NAMES)
    h = headers[S.ENCODER]
    assert h["precision"] == "fp16" and h["gpu"]["compute_capability"] == "9.0"
    assert h["profiles"][0]["image"]["max"] == [8, 3, 1024, 1024]
    assert S.ModelSpec.from_dict(h["spec"]).dims()["B"].max == 8
    assert h["export"]["adv_mode"] is True and h["onnx_sha256"] == "abc"
    assert h["strongly_typed"] is True and h["graph_precision"] == "fp16"
    assert h["onnx_file"] == "image_encoder.fp16.onnx" and h["annotation"]["fp32_nodes"] > 0
    with pytest.raises(EF.EngineCompatError) as e:
        check_engine_dir(out, EF.RuntimeFacts("10.3.0", "NVIDIA GeForce RTX 4090", "8.9"))
    assert f"cellsam-trt build --onnx {fp16_export} --out {out} --precision fp16 --max-batch 8" in str(e.value)
    (out / "prompt_decoder.engine").unlink()
    with pytest.raises(FileNotFoundError, match="prompt_decoder.engine"):
        check_engine_dir(out, here)


# --------------------------------------------------------------------------- CLI


@pytest.mark.skipif(_has_tensorrt(), reason="plans for the three releases where TensorRT is not installed")
def test_cli_dry_run_plans_for_tensorrt_11_10_13_and_10_3(fp16_export, tiny_export, tmp_path, capsys):
    from cellsam_trt.cli import main

    out = tmp_path / "engines"
    argv = ["build", "--onnx", str(fp16_export), "--out", str(out), "--dry-run", "--gpu-name", "NVIDIA L4"]
    rc = main(argv + ["--compute-capability", "8.9", "--precision", "fp16", "--max-batch", "8"])
    assert rc == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["tensorrt"] for r in runs] == ["11.4", "10.13", "10.3"] and not any(r["installed"] for r in runs)
    for r in runs:
        plans = r["plans"]
        assert [p["model"] for p in plans] == list(S.MODEL_NAMES)
        assert all(p["network_flags"] == ["STRONGLY_TYPED"] and p["flags"] == [] for p in plans)
        assert all(p["onnx_path"].endswith(".fp16.onnx") and p["missing"] is None for p in plans)
        assert plans[0]["profile"]["image"]["max"] == [8, 3, 1024, 1024]
        assert plans[0]["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9", "total_memory": 16 * TB.GIB}
        assert plans[0]["notes"][0].startswith(
            "TensorRT 11" if r["tensorrt"] == "11.4" else f"TensorRT {r['tensorrt']}"
        )
    assert not out.exists()  # a dry run writes nothing
    # a Jetson Orin on JetPack 6 (TensorRT 10.3), an export without bf16 graphs: the plan says how to write them
    rc = main(
        ["build", "--onnx", str(tiny_export), "--out", str(out), "--dry-run", "--gpu-name", "Orin"]
        + ["--compute-capability", "8.7", "--precision", "bf16", "--tensorrt", "10.3"]
    )
    cap = capsys.readouterr()
    (run,) = json.loads(cap.out)
    assert rc == 0 and run["tensorrt"] == "10.3" and all(p["missing"] for p in run["plans"])
    assert f"write it with: cellsam-trt export --annotate-only --out {tiny_export} --precision bf16" in cap.err
    rc = main(argv + ["--compute-capability", "8.9", "--tensorrt", "8.6"])
    assert rc == 2 and "supports TensorRT 10.3 to 11.x" in capsys.readouterr().err
    rc = main(argv + ["--compute-capability", "8.9", "--precision", "fp8"])
    assert rc == 2 and "fp8 is not built" in capsys.readouterr().err


def test_cli_dry_run_refusals(tiny_export, tmp_path, capsys):
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
    from cellsam_trt.engine.trt_backend import TrtUnavailable, query_gpu

    try:
        query_gpu(0)
    except TrtUnavailable:  # here: a dry run without --gpu-name says what to name
        rc = main(["build", "--onnx", str(tiny_export), "--out", str(out), "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 2 and "no GPU to plan for here" in err and "--gpu-name NAME --compute-capability" in err


@pytest.mark.skipif(_has_tensorrt(), reason="checks the message shown where TensorRT is missing")
def test_trt_backend_without_tensorrt_says_so(tmp_path):
    from cellsam_trt.engine.trt_backend import TrtBackend, TrtUnavailable

    with pytest.raises(TrtUnavailable, match="TensorRT is not installed"):
        TrtBackend(tmp_path)
    with pytest.raises(TB.BuildError, match="TensorRT is not installed"):
        TB.require_tensorrt()


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
def test_tiny_engines_match_torch(fp16_export, tmp_path, precision):
    """Build the tiny engines and compare the TensorRT backend with PyTorch (GPU only)."""
    import torch

    from cellsam_trt.engine.torch_backend import TorchBackend
    from cellsam_trt.engine.trt_backend import TrtBackend
    from cellsam_trt.model.cellsam import CellSAMConfig
    from cellsam_trt.model.checkpoint import load_state_dict
    from cellsam_trt.model.synthetic import synthetic_state_dict

    out = tmp_path / "engines"
    TB.build_export(
        fp16_export, out, TB.BuildOptions(precision=precision, max_batch=2, max_prompts=16, workspace_gib=1)
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
