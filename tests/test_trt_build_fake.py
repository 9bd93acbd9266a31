"""``build_engine``'s control flow with a STAND-IN for TensorRT (not TensorRT).

The fake ``tensorrt`` module records what the builder is told (network creation flags,
builder flags, workspace, profile, timing cache); its "network" has the inputs of the real
annotated tiny ONNX graph. Every name the fake offers (module attributes, class attributes and
methods) is checked against the names of the real bindings of TensorRT 10.3, 10.13 and 11.4
(``tests/data/trt_bindings``), so a call the fake answers is a call the real API has. This
checks our wiring, not TensorRT's behaviour: no engine is built.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from cellsam_trt.export import tensorrt_build as TB
from cellsam_trt.runtime import engine_file as EF
from cellsam_trt.runtime import specs as S
from test_trt import fp16_export  # noqa: F401  (module-scoped fixture: a real tiny export + its FP16 graphs)
from test_trt_api_names import VERSIONS, binding_names
from test_trt_runtime_fake import GPU, FakeCudart

STRONGLY_TYPED = 1  # the member's value in the bindings does not matter to the fake; it is recorded


def make_fake_builder_trt(version="10.3.0"):
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=STRONGLY_TYPED)
    trt.log = {}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        num_inputs = property(lambda self: len(self.inputs))

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
            self.network.inputs = [Tensor(i.name) for i in model.graph.input]
            self.network.parsed = path
            return True

        num_errors = property(lambda self: 1 if OnnxParser.fail else 0)

        def get_error(self, i):
            return "In node 7 (Foo): UNSUPPORTED_NODE"

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, op, mx):
            self.shapes[name] = (tuple(mn), tuple(op), tuple(mx))

    class ITimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class IBuilderConfig:
        def __init__(self):
            self.flags, self.cleared, self.pools, self.profiles = [], [], {}, []
            self.cache = None
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
            return ITimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            trt.log = {"config": config, "network": network}
            return b"SERIALIZED-ENGINE"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    fakes = (Logger, Network, OnnxParser, IOptimizationProfile, ITimingCache, IBuilderConfig, Builder)
    return trt, fakes


def offered_names(trt, fakes) -> set[str]:
    """Every public name the fake module, its enums and its classes (methods, properties and
    the attributes our code sets) offer to the code under test, less the fake's own knob."""
    names = {n for n in vars(trt) if not n.startswith("_") and n != "log"} | {"__version__"}
    for ns in (trt.MemoryPoolType, trt.BuilderFlag, trt.NetworkDefinitionCreationFlag):
        names |= set(vars(ns))
    for cls in fakes:
        names |= {n for n in vars(cls) if not n.startswith("_") and n != "fail"}
    return names | {"name", "builder_optimization_level"}  # Tensor.name, IBuilderConfig's attribute


def test_the_fake_offers_only_real_binding_names():
    trt, fakes = make_fake_builder_trt()
    offered = offered_names(trt, fakes)
    assert {"create_network", "STRONGLY_TYPED", "set_timing_cache", "num_errors"} <= offered
    for v in VERSIONS:
        assert offered <= binding_names(v), (v, sorted(offered - binding_names(v)))


@pytest.fixture
def fake_trt(monkeypatch):
    trt, _ = make_fake_builder_trt()
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


def test_fp16_build_is_strongly_typed_from_the_annotated_graphs(fake_trt, fp16_export, tmp_path):  # noqa: F811
    trt, cudart = fake_trt
    out = tmp_path / "engines"
    opts = TB.BuildOptions(precision="fp16", max_batch=8, workspace_gib=2)
    plans = TB.plan_export(fp16_export, out, opts, GPU, tensorrt="10.3.0")
    manifest = json.loads((fp16_export / "manifest.json").read_text())
    for plan in plans:
        path = TB.build_engine(plan)
        cfg, net = trt.log["config"], trt.log["network"]
        assert net.flags == 1 << STRONGLY_TYPED and net.parsed == str(fp16_export / f"{plan.model}.fp16.onnx")
        assert cfg.flags == [] and cfg.cleared == ["TF32"]  # no precision flags: the graph decides
        assert cfg.pools == {"WORKSPACE": 2 * TB.GIB} and cfg.builder_optimization_level == 3
        assert cfg.profiles[0].shapes == plan.profile
        header, blob = EF.read_engine_file(path)
        assert blob == b"SERIALIZED-ENGINE"
        assert header["tensorrt_version"] == "10.3.0" and header["gpu"]["name"] == GPU.name
        assert header["strongly_typed"] is True and header["graph_precision"] == "fp16"
        assert header["onnx_sha256"] == manifest["models"][plan.model]["annotated"]["fp16"]["sha256"]
    # the timing cache is written after each build and fed to the next one
    cache = out / "timing.cache"
    assert cache.read_bytes() == b"+timings" * 3
    assert trt.log["config"].cache_inputs == [b"+timings" * 2]


def test_tf32_and_the_fp32_graph(fake_trt, fp16_export, tmp_path):  # noqa: F811
    trt, _ = fake_trt
    (plan,) = TB.plan_export(fp16_export, tmp_path, TB.BuildOptions(precision="fp32", tf32=True), GPU, [S.ENCODER])
    TB.build_engine(plan)
    assert trt.log["config"].flags == ["TF32"] and trt.log["config"].cleared == []
    assert trt.log["network"].parsed == str(fp16_export / "image_encoder.onnx")


def test_parser_errors_and_the_version_guard(fake_trt, fp16_export, tmp_path, monkeypatch):  # noqa: F811
    trt, _ = fake_trt
    (plan,) = TB.plan_export(fp16_export, tmp_path, TB.BuildOptions(), GPU, models=[S.DECODER])
    monkeypatch.setattr(trt.OnnxParser, "fail", True)
    with pytest.raises(TB.BuildError, match="ONNX parser failed: In node 7"):
        TB.build_engine(plan)
    monkeypatch.setattr(trt.OnnxParser, "fail", False)
    for ok in ("10.3.0", "10.13.3.9", "11.4.0.106"):
        monkeypatch.setattr(trt, "__version__", ok)
        TB.build_engine(plan)
    for bad in ("10.2.0", "8.6.1", "12.0.0"):
        monkeypatch.setattr(trt, "__version__", bad)
        with pytest.raises(TB.BuildError, match=f"TensorRT {bad}: this builder supports TensorRT 10.3 to 11.x"):
            TB.build_engine(plan)
