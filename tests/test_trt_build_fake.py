"""``build_engine``'s control flow with STAND-INS for TensorRT and CUDA (not TensorRT).

A fake ``tensorrt`` module records what the builder is told (flags, workspace, profile,
per-layer precisions, timing cache, calibrator); its "network" has one layer per node of the
real tiny ONNX export, named as the ONNX parser names them. The fake build runs the INT8
calibration protocol (read cache, get_batch until None, write cache) against our calibrator
through the fake CUDA runtime. This checks our wiring, not TensorRT's behaviour.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from cellsam_trt.export import tensorrt_build as TB
from cellsam_trt.runtime import engine_file as EF
from cellsam_trt.runtime import specs as S
from test_trt import tiny_export  # noqa: F401  (module-scoped fixture: a real tiny export)
from test_trt_runtime_fake import GPU, FakeCudart

ONNX_TO_LAYER_TYPE = {
    "LayerNormalization": "NORMALIZATION",
    "InstanceNormalization": "NORMALIZATION",
    "Softmax": "SOFTMAX",
    "Shape": "SHAPE",
    "MatMul": "MATRIX_MULTIPLY",
    "Gemm": "MATRIX_MULTIPLY",
    "Conv": "CONVOLUTION",
    "ConvTranspose": "DECONVOLUTION",
}


def make_fake_builder_trt(version="10.3.0"):
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.bfloat16, trt.int64 = "FLOAT", "HALF", "BF16", "INT64"
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(
        **{f: f for f in ("FP16", "BF16", "INT8", "TF32", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")}
    )
    trt.log = {}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Tensor:
        def __init__(self, name, dtype):
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, name, op):
            self.name = name
            self.type = types.SimpleNamespace(name=ONNX_TO_LAYER_TYPE.get(op, "ELEMENTWISE"))
            out_dtype = "INT64" if op in ("Shape", "Constant") else "FLOAT"
            self.outputs = [Tensor(name + ":0", out_dtype)]
            self.precision = None
            self.output_types = {}

        num_outputs = property(lambda self: len(self.outputs))

        def get_output(self, i):
            return self.outputs[i]

        def set_output_type(self, i, dtype):
            self.output_types[i] = dtype

    class Network:
        def __init__(self):
            self.layers, self.inputs = [], []

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        fail = False

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            if OnnxParser.fail:
                return False
            model = onnx.load(path, load_external_data=False)
            self.network.inputs = [Tensor(i.name, "FLOAT") for i in model.graph.input]
            self.network.layers = [Layer(n.name, n.op_type) for n in model.graph.node if n.op_type != "Constant"]
            return True

        num_errors = property(lambda self: 1 if OnnxParser.fail else 0)

        def get_error(self, i):
            return "In node 7 (Foo): UNSUPPORTED_NODE"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, op, mx):
            self.shapes[name] = (tuple(mn), tuple(op), tuple(mx))

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.pools, self.profiles = [], [], {}, []
            self.cache = self.int8_calibrator = self.calib_profile = None
            self.builder_optimization_level = None
            self.cache_inputs = []

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, f):
            self.flags.append(f)

        def clear_flag(self, f):
            self.cleared.append(f)

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return 0

        def create_timing_cache(self, data):
            self.cache_inputs.append(bytes(data))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def set_calibration_profile(self, p):
            self.calib_profile = p
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            batches = []
            cal = config.int8_calibrator
            if cal is not None:
                assert isinstance(cal, trt.IInt8EntropyCalibrator2) and cal.get_batch_size() == 1
                if cal.read_calibration_cache() is None:
                    name = network.get_input(0).name
                    while True:
                        ptrs = cal.get_batch([name])
                        if not ptrs:
                            break
                        batches.append(ptrs)
                    cal.write_calibration_cache(b"calibration-table")
            trt.log = {"config": config, "network": network, "batches": batches}
            return b"SERIALIZED-ENGINE"

    class IInt8EntropyCalibrator2:
        def __init__(self):
            self.base_init = True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    trt = make_fake_builder_trt()
    cudart = FakeCudart()
    cuda_pkg, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda_pkg.bindings = cudart, bindings
    for name, mod in (
        ("tensorrt", trt),
        ("cuda", cuda_pkg),
        ("cuda.bindings", bindings),
        ("cuda.bindings.runtime", cudart),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    return trt, cudart


def test_fp16_build_wiring(fake_trt, tiny_export, tmp_path):  # noqa: F811
    trt, cudart = fake_trt
    out = tmp_path / "engines"
    plans = TB.plan_export(tiny_export, out, TB.BuildOptions(precision="fp16", max_batch=8, workspace_gib=2), GPU)
    for plan in plans:
        path = TB.build_engine(plan)
        cfg, net = trt.log["config"], trt.log["network"]
        assert cfg.flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and cfg.cleared == ["TF32"]
        assert cfg.pools == {"WORKSPACE": 2 * TB.GIB} and cfg.builder_optimization_level == 3
        assert cfg.profiles[0].shapes == plan.profile
        pinned = {l.name for l in net.layers if l.precision == "FLOAT"}
        want = {
            l.name
            for l in net.layers
            if plan.layer_precision(l.name, l.type.name) == "fp32" and l.outputs[0].dtype == "FLOAT"
        }
        assert pinned == want and pinned
        for l in net.layers:
            if l.name in pinned:
                assert l.output_types == {0: "FLOAT"}
            else:
                assert l.precision is None and not l.output_types
        assert not any(l.precision for l in net.layers if l.type.name == "SHAPE")
        header, blob = EF.read_engine_file(path)
        assert blob == b"SERIALIZED-ENGINE"
        assert header["tensorrt_version"] == "10.3.0" and header["gpu"]["name"] == GPU.name
        assert header["fp32_layers"]["counts"]["fp32"] == len(pinned)
        assert (
            header["onnx_sha256"]
            == json.loads((tiny_export / "manifest.json").read_text())["models"][plan.model]["sha256"]
        )
    # the timing cache is written after each build and fed to the next one
    cache = out / "timing.cache"
    assert cache.read_bytes() == b"+timings" * 3
    assert trt.log["config"].cache_inputs == [b"+timings" * 2]


def test_int8_build_calibrates_through_pinned_and_device_buffers(fake_trt, tiny_export, tmp_path):  # noqa: F811
    trt, cudart = fake_trt
    images = tmp_path / "calib"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.normal(100, 10, (80, 96))
        img[20:40, 30:60] += 500
        np.save(images / f"img{i}.npy", img.astype(np.uint16))
    out = tmp_path / "engines"
    opts = TB.BuildOptions(precision="int8", calib_images=str(images), calib_batch=1, max_batch=2)
    (enc,) = TB.plan_export(tiny_export, out, opts, GPU, models=[S.ENCODER])
    TB.build_engine(enc)
    cfg = trt.log["config"]
    assert cfg.flags == ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert cfg.calib_profile.shapes["image"] == ((1, 3, 1024, 1024),) * 3
    assert len(trt.log["batches"]) == 3  # one per image, each a device address
    uploads = [c for c in cudart.copies if c[0] == "H2D"]
    assert len(uploads) == 3 and all(n == 3 * 1024 * 1024 * 4 for _, _, n in uploads)
    assert not cudart.blocks  # the staging buffers were freed after the build
    assert (out / "image_encoder.int8.calib").read_bytes() == b"calibration-table"
    layers = trt.log["network"].layers
    fp16 = {l.name for l in layers if l.precision == "HALF"}
    assert fp16 and all("/neck/" in n or not n.startswith("/encoder/blocks") for n in fp16)
    # the second build reads the cache and asks for no batches
    TB.build_engine(enc)
    assert trt.log["batches"] == []
    header = EF.read_header(out / "image_encoder.engine")
    assert header["precision"] == "int8" and header["calibration_cache"] == str(out / "image_encoder.int8.calib")


def test_parser_errors_and_wrong_tensorrt_major(fake_trt, tiny_export, tmp_path, monkeypatch):  # noqa: F811
    trt, _ = fake_trt
    (plan,) = TB.plan_export(tiny_export, tmp_path, TB.BuildOptions(), GPU, models=[S.DECODER])
    monkeypatch.setattr(trt.OnnxParser, "fail", True)
    with pytest.raises(TB.BuildError, match="ONNX parser failed: In node 7"):
        TB.build_engine(plan)
    monkeypatch.setattr(trt, "__version__", "11.1.0")
    with pytest.raises(TB.BuildError, match="install TensorRT 10.x"):
        TB.build_engine(plan)
