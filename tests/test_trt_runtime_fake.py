"""``TrtBackend``'s own control flow and data movement, with STAND-INS for TensorRT and CUDA.

Nothing here is TensorRT: ``tensorrt`` and ``cuda.bindings.runtime`` are replaced (for these
tests only) by small fakes. The fake CUDA runtime allocates host memory for "device" buffers
and copies with ``memmove``; the fake engines compute simple NumPy functions of their inputs,
read from and written to the addresses the backend bound. This checks what is ours: header
checks before deserializing, buffer sizing, staging copies, shapes, batch splitting, decoder
chunking with the embedding uploaded once, CUDA-graph capture / replay bookkeeping, input
checks, cleanup. Whether the real TensorRT and CUDA calls behave as the fakes do is exactly
what these tests cannot tell (see ``trt_backend``'s docstring for how the calls were checked).
"""

from __future__ import annotations

import ctypes
import json
import sys
import types

import numpy as np
import pytest

from cellsam_trt.export import engine_file as EF
from cellsam_trt.export import specs as S
from cellsam_trt.export import tensorrt_build as TB

GPU = TB.GpuFacts("Fake GPU", (8, 9), 24 * TB.GIB)
TRT_VERSION = "10.99.0-fake"


# --------------------------------------------------------------------------- fake CUDA runtime


class FakeCudart(types.ModuleType):
    class cudaError_t:
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1
    cudaEventDisableTiming = 2

    class Stream:
        def __init__(self, handle):
            self.handle = handle

        def __int__(self):
            return self.handle

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.blocks: dict[int, ctypes.Array] = {}
        self.copies: list[tuple[str, int, int]] = []  # (kind, dst, nbytes)
        self.capturing: dict[int, list] = {}
        self.launches = 0
        self.freed = 0
        self.next_stream = 100

    def cudaGetErrorString(self, err):
        return 0, b"fake error"

    def cudaGetDeviceProperties(self, dev):
        prop = types.SimpleNamespace(name=GPU.name.encode() + b"\x00\x00", major=8, minor=9,
                                     totalGlobalMem=GPU.total_memory)
        return 0, prop

    def cudaSetDevice(self, dev):
        return (0,)

    def _alloc(self, n):
        buf = (ctypes.c_byte * n)()
        addr = ctypes.addressof(buf)
        self.blocks[addr] = buf
        return 0, addr

    cudaMallocHost = _alloc
    cudaMalloc = _alloc

    def _free(self, ptr):
        self.blocks.pop(ptr)
        self.freed += 1
        return (0,)

    cudaFree = _free
    cudaFreeHost = _free

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        self.copies.append(("H2D" if kind == 1 else "D2H", dst, n))
        return (0,)

    def cudaMemcpy(self, dst, src, n, kind):
        return self.cudaMemcpyAsync(dst, src, n, kind, None)

    def cudaStreamCreateWithFlags(self, flags):
        self.next_stream += 1
        return 0, self.Stream(self.next_stream)

    def cudaEventCreateWithFlags(self, flags):
        return 0, object()

    def cudaEventRecord(self, event, stream):
        return (0,)

    def cudaEventSynchronize(self, event):
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        return 0, self.capturing.pop(int(stream))

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, exe, stream):
        self.launches += 1
        for work in exe:
            work()
        return (0,)

    def cudaGraphExecDestroy(self, exe):
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaEventDestroy(self, e):
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)


# --------------------------------------------------------------------------- fake TensorRT


def _read(addr, shape):
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(addr)).reshape(shape)


def compute(model: str, ins: dict[str, np.ndarray], spec: S.ModelSpec) -> dict[str, np.ndarray]:
    """What the fake engines compute: simple functions that make mix-ups visible."""
    if model == S.ENCODER:
        x = ins["image"]
        b = x.shape[0]
        base = x.reshape(b, -1).mean(1)[:, None, None, None]
        return {"image_embeddings": np.broadcast_to(base, (b,) + spec.outputs[0].shape[1:]).astype(np.float32)}
    if model == S.CELLFINDER:
        x = ins["image"]
        b = x.shape[0]
        q = spec.outputs[0].shape[1]
        m = x.reshape(b, -1).mean(1)[:, None, None]
        return {"pred_logits": np.broadcast_to(m, (b, q, 2)).astype(np.float32),
                "pred_boxes": np.broadcast_to(m * 0 + 0.5, (b, q, 4)).astype(np.float32)}
    coords, labels, emb = ins["point_coords"], ins["point_labels"], ins["image_embeddings"]
    n = coords.shape[0]
    lr = (coords[:, 0, 0] + emb.mean())[:, None, None, None] * np.ones((1, 1, 256, 256), np.float32)
    return {"low_res_masks": lr.astype(np.float32), "iou_predictions": labels.sum(1, keepdims=True).astype(np.float32)}


def make_fake_trt(cudart: FakeCudart):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION
    trt.float32 = "FLOAT"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Context:
        def __init__(self, engine):
            self.engine, self.addr, self.shapes = engine, {}, {}
            self.enqueues = 0

        def set_tensor_address(self, name, ptr):
            assert isinstance(ptr, int)
            self.addr[name] = ptr
            return True

        def set_input_shape(self, name, shape):
            t = {t.name: t for t in self.engine.spec.inputs}[name]
            if not all(t.dims("min")[i] <= shape[i] <= t.dims("max")[i] for i in range(len(shape))):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def _outputs(self):
            ins = {t.name: _read(self.addr[t.name], self.shapes[t.name]) for t in self.engine.spec.inputs}
            return ins, compute(self.engine.model, ins, self.engine.spec)

        def get_tensor_shape(self, name):
            return self._outputs()[1][name].shape

        def execute_async_v3(self, stream):
            assert isinstance(stream, int), "TensorRT takes the stream handle as an int"
            self.enqueues += 1
            shapes = dict(self.shapes)

            def work():
                ins = {t.name: _read(self.addr[t.name], shapes[t.name]) for t in self.engine.spec.inputs}
                for k, v in compute(self.engine.model, ins, self.engine.spec).items():
                    _read(self.addr[k], v.shape)[...] = v

            if stream in cudart.capturing:
                cudart.capturing[stream].append(work)
            else:
                work()
            return True

    class Engine:
        def __init__(self, blob):
            d = json.loads(blob)
            self.model, self.spec = d["model"], S.ModelSpec.from_dict(d["spec"])
            self.names = self.spec.input_names + self.spec.output_names
            self.contexts = []

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.spec.input_names else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def get_tensor_profile_shape(self, name, profile):
            t = {t.name: t for t in self.spec.inputs}[name]
            return [t.dims("min"), t.dims("opt"), t.dims("max")]

        def create_execution_context(self):
            c = Context(self)
            self.contexts.append(c)
            return c

    class Runtime:
        def __init__(self, logger):
            self.engines = []

        def deserialize_cuda_engine(self, blob):
            e = Engine(bytes(blob))
            self.engines.append(e)
            return e

    trt.TensorIOMode, trt.Logger, trt.Runtime = TensorIOMode, Logger, Runtime
    return trt


@pytest.fixture
def fakes(monkeypatch):
    cudart = FakeCudart()
    trt = make_fake_trt(cudart)
    cuda_pkg = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda_pkg.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return cudart, trt


@pytest.fixture
def engine_dir(tmp_path):
    """Engine files whose 'engine bytes' describe a fake engine (model + spec)."""
    specs = S.model_specs(num_queries=8)
    out = tmp_path / "engines"
    opts = TB.BuildOptions(precision="fp16", max_batch=2, max_prompts=16, max_points=4, no_timing_cache=True)
    for m, spec in specs.items():
        plan = TB.plan_build(spec, opts, GPU, f"/exp/{spec.filename}", out, onnx_dir="/exp",
                             export_info={"adv_mode": True, "has_detector": True})
        blob = json.dumps({"model": m, "spec": plan.spec.to_dict()}).encode()
        EF.write_engine_file(plan.engine_path, TB.engine_header(plan, TRT_VERSION, "sha"), blob)
    return out


def test_backend_data_path_with_fakes(fakes, engine_dir):
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    be = TrtBackend(engine_dir)
    assert be.adv_mode is True and be.has_detector and be.decode_chunk == 16 and be.precision == "fp16"
    rng = np.random.default_rng(0)
    # encoder: batch 3 is split into 2 + 1 (max B 2), results concatenated in order
    x = rng.standard_normal((3, 3, 1024, 1024)).astype(np.float32)
    emb = be.encode(x)
    assert emb.shape == (3, 256, 64, 64)
    np.testing.assert_allclose(emb[:, 0, 0, 0], x.reshape(3, -1).mean(1), rtol=1e-5)
    # batch 1: the first batch-1 call (the last part of the split above) enqueued and captured
    # a graph; the next batch-1 calls replay it
    x1 = x[:1]
    ctx = be._runners[S.ENCODER].context
    assert cudart.launches == 0 and len(be._runners[S.ENCODER].graphs) == 1
    enq = ctx.enqueues
    e1 = be.encode(x1)
    e2 = be.encode(x1 * 2)
    assert cudart.launches == 2 and ctx.enqueues == enq  # replays, no new enqueue
    np.testing.assert_allclose(e2[0, 0, 0, 0], 2 * x1.mean(), rtol=1e-5)
    np.testing.assert_allclose(e1[0, 0, 0, 0], x1.mean(), rtol=1e-5)
    # after another shape, the graph is not replayed until the shape state is re-established
    be.encode(x[:2])
    enq = ctx.enqueues
    e3 = be.encode(x1)
    assert ctx.enqueues == enq + 1
    np.testing.assert_allclose(e3, e1, rtol=1e-6)
    # decoder: 37 boxes -> chunks of 16, 16, 5; the embedding is uploaded once per call
    xy = rng.uniform(0, 900, (37, 2))
    boxes = np.concatenate([xy, xy + 50], 1).astype(np.float32)
    emb_buf = be._runners[S.DECODER].buffers["image_embeddings"].device
    before = [c for c in cudart.copies if c[1] == emb_buf]
    lr, iou = be.decode(emb[:1], boxes=boxes)
    after = [c for c in cudart.copies if c[1] == emb_buf]
    assert len(after) - len(before) == 1
    assert lr.shape == (37, 256, 256) and iou.shape == (37,)
    np.testing.assert_allclose(lr[:, 0, 0], boxes[:, 0] + emb[:1].mean(), rtol=1e-5)
    np.testing.assert_allclose(iou, 5.0)  # box corner labels 2 + 3
    # points with padding (labels 1 and the appended -1)
    pts = rng.uniform(0, 1000, (3, 2, 2)).astype(np.float32)
    lr, iou = be.decode(emb[:1], points=pts, point_labels=np.ones((3, 2)))
    np.testing.assert_allclose(iou, 1.0)
    assert be.decode(emb[:1], boxes=np.zeros((0, 4), np.float32))[0].shape == (0, 256, 256)
    # CellFinder, created on first use
    logits, pboxes = be.detect(x[:2])
    assert logits.shape == (2, 8, 2) and pboxes.shape == (2, 8, 4)
    # inputs are checked against the spec, naming the input
    with pytest.raises(S.InputSpecError, match="input 'image' of image_encoder: axis 2 is 512"):
        be.encode(np.zeros((1, 3, 512, 1024), np.float32))
    with pytest.raises(S.InputSpecError, match="image_embeddings"):
        be.decode(np.zeros((1, 256, 32, 32), np.float32), boxes=boxes[:2])
    with pytest.raises(S.InputSpecError, match="point_coords"):
        be.decode(emb[:1], points=rng.uniform(0, 9, (2, 9, 2)))  # 10 points > max P 4
    n_blocks = len(cudart.blocks)
    assert n_blocks == 2 * (2 + 5 + 3)  # pinned + device per I/O tensor of the three engines
    be.close()
    assert not cudart.blocks and cudart.freed == n_blocks


def test_backend_refuses_an_engine_for_another_gpu(fakes, engine_dir, monkeypatch):
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    monkeypatch.setattr(trt, "__version__", "10.0.1")
    with pytest.raises(EF.EngineCompatError) as e:
        TrtBackend(engine_dir)
    msg = str(e.value)
    assert f"built with TensorRT {TRT_VERSION}, this machine has TensorRT 10.0.1" in msg
    assert f"cellsam-trt build --onnx /exp --out {engine_dir} --precision fp16 --max-batch 2" in msg
    assert not cudart.blocks  # nothing was allocated before the check


def test_a_failed_graph_capture_falls_back_to_enqueues(fakes, engine_dir, monkeypatch):
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    monkeypatch.setattr(cudart, "cudaStreamEndCapture",
                        lambda stream: (cudart.capturing.pop(int(stream)) and None) or (901, None))
    be = TrtBackend(engine_dir)
    x = np.random.default_rng(1).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    runner = be._runners[S.ENCODER]
    outs = [be.encode(x * k) for k in (1, 2, 3)]
    assert not runner.graphs and cudart.launches == 0 and runner.context.enqueues == 4  # 3 + the failed capture
    for k, o in zip((1, 2, 3), outs):
        np.testing.assert_allclose(o[0, 0, 0, 0], k * x.mean(), rtol=1e-5)
    be.close()
