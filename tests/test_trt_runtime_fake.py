"""``TrtBackend``'s own control flow and data movement, with STAND-INS for TensorRT and CUDA.

Nothing here is TensorRT: ``tensorrt`` and ``cuda.bindings.runtime`` are replaced (for these
tests only) by small fakes. The fake CUDA runtime allocates host memory for "device" buffers
and copies with ``memmove``; the fake engines compute simple NumPy functions of their inputs,
read from and written to the addresses the backend bound, in the dtypes the engine declares.
The fake CUDA runtime keeps a current device per thread, as CUDA does, and records the device
every allocation, copy and launch ran on. This checks what is ours: header checks before
deserializing, buffer sizing and dtypes, staging copies and casts, shapes, batch splitting,
decoder chunking with the embedding uploaded once, the device made current in every thread,
CUDA-graph capture / replay bookkeeping, input checks, cleanup. Whether the real TensorRT and
CUDA calls behave as the fakes do is exactly what these tests cannot tell (see
``trt_backend``'s docstring for how the calls were checked).
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import types

import numpy as np
import pytest

from cellsam_trt.engine.base import Backend, BackendError
from cellsam_trt.export import tensorrt_build as TB
from cellsam_trt.runtime import engine_file as EF
from cellsam_trt.runtime import specs as S

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
        self._current = threading.local()  # CUDA's current device is per host thread (default 0)
        self.set_device_calls: list[tuple[int, int]] = []  # (thread ident, device)
        self.ops: list[tuple[str, int, int]] = []  # (operation, thread ident, current device)

    def current_device(self) -> int:
        return getattr(self._current, "device", 0)

    def record(self, op: str) -> None:
        self.ops.append((op, threading.get_ident(), self.current_device()))

    def cudaGetErrorString(self, err):
        return 0, b"fake error"

    def cudaGetDeviceProperties(self, dev):
        prop = types.SimpleNamespace(
            name=GPU.name.encode() + b"\x00\x00", major=8, minor=9, totalGlobalMem=GPU.total_memory
        )
        return 0, prop

    def cudaSetDevice(self, dev):
        self.set_device_calls.append((threading.get_ident(), dev))
        self._current.device = dev
        return (0,)

    def _alloc(self, n):
        self.record("malloc")
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
        self.record("memcpy")
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
        self.record("graph_launch")
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


TRT_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


def _read(addr, shape, dtype=np.float32):
    """The memory at ``addr`` as an array of ``shape`` and ``dtype`` (a view, writable)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    return np.ctypeslib.as_array((ctypes.c_byte * n).from_address(addr)).view(dtype).reshape(shape)


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
        return {
            "pred_logits": np.broadcast_to(m, (b, q, 2)).astype(np.float32),
            "pred_boxes": np.broadcast_to(m * 0 + 0.5, (b, q, 4)).astype(np.float32),
        }
    coords, labels, emb = ins["point_coords"], ins["point_labels"], ins["image_embeddings"]
    lr = (coords[:, 0, 0] + emb.mean())[:, None, None, None] * np.ones((1, 1, 256, 256), np.float32)
    return {"low_res_masks": lr.astype(np.float32), "iou_predictions": labels.sum(1, keepdims=True).astype(np.float32)}


def make_fake_trt(cudart: FakeCudart):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION
    trt.float32, trt.float16, trt.bfloat16, trt.int32, trt.int64, trt.bool = (
        "FLOAT",
        "HALF",
        "BF16",
        "INT32",
        "INT64",
        "BOOL",
    )

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

        def _inputs(self, shapes):
            """The bound inputs in the engine's dtypes, computed on as float32."""
            eng = self.engine
            return {
                t.name: _read(self.addr[t.name], shapes[t.name], eng.np_dtype(t.name)).astype(np.float32)
                for t in eng.spec.inputs
            }

        def get_tensor_shape(self, name):
            return compute(self.engine.model, self._inputs(self.shapes), self.engine.spec)[name].shape

        def execute_async_v3(self, stream):
            assert isinstance(stream, int), "TensorRT takes the stream handle as an int"
            cudart.record("execute")
            self.enqueues += 1
            shapes = dict(self.shapes)
            eng = self.engine

            def work():
                for k, v in compute(eng.model, self._inputs(shapes), eng.spec).items():
                    _read(self.addr[k], v.shape, eng.np_dtype(k))[...] = v

            if stream in cudart.capturing:
                cudart.capturing[stream].append(work)
            else:
                work()
            return True

    class Engine:
        def __init__(self, blob):
            d = json.loads(blob)
            self.model, self.spec = d["model"], S.ModelSpec.from_dict(d["spec"])
            self.dtypes = d.get("dtypes", {})  # tensor -> TensorRT dtype name; FLOAT by default
            self.names = self.spec.input_names + self.spec.output_names
            self.contexts = []

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.spec.input_names else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtypes.get(name, "FLOAT")

        def np_dtype(self, name):
            return TRT_DTYPES[self.get_tensor_dtype(name)]

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
            cudart.record("deserialize")
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


def make_engine_dir(out, dtypes: dict[str, dict[str, str]] | None = None):
    """Engine files whose 'engine bytes' describe a fake engine (model + spec + the TensorRT
    dtype of each I/O tensor: ``dtypes[model][tensor]``, FLOAT where not given)."""
    specs = S.model_specs(num_queries=8)
    opts = TB.BuildOptions(precision="fp16", max_batch=2, max_prompts=16, max_points=4, no_timing_cache=True)
    for m in S.MODEL_NAMES:
        spec = specs[m]
        plan = TB.plan_build(
            spec,
            opts,
            GPU,
            f"/exp/{spec.filename}",
            out,
            onnx_dir="/exp",
            export_info={"adv_mode": True, "has_detector": True},
        )
        blob = json.dumps({"model": m, "spec": plan.spec.to_dict(), "dtypes": (dtypes or {}).get(m, {})}).encode()
        EF.write_engine_file(plan.engine_path, TB.engine_header(plan, TRT_VERSION, "sha"), blob)
    return out


@pytest.fixture
def engine_dir(tmp_path):
    return make_engine_dir(tmp_path / "engines")


def test_backend_data_path_with_fakes(fakes, engine_dir):
    from cellsam_trt.engine.trt_backend import TrtBackend, TrtRunner

    cudart, trt = fakes
    be = TrtBackend(engine_dir)
    assert isinstance(be, Backend) and be.name == "trt" and be.device == "cuda:0"
    assert be.adv_mode is True and be.has_detector and be.decode_chunk == 16 and be.precision == "fp16"
    enc = be.runner(S.ENCODER)
    assert isinstance(enc, TrtRunner) and be.runner(S.ENCODER) is enc
    rng = np.random.default_rng(0)
    # encoder: batch 3 is split into 2 + 1 (max B 2), results concatenated in order
    x = rng.standard_normal((3, 3, 1024, 1024)).astype(np.float32)
    emb = be.encode(x)
    assert emb.shape == (3, 256, 64, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[:, 0, 0, 0], x.reshape(3, -1).mean(1), rtol=1e-5)
    # batch 1: the first batch-1 call (the last part of the split above) enqueued and captured
    # a graph; the next batch-1 calls replay it
    x1 = x[:1]
    ctx = enc.context
    assert cudart.launches == 0 and len(enc.graphs) == 1
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
    dec = be.runner(S.DECODER)
    emb_buf = dec.buffers["image_embeddings"].device
    before = [c for c in cudart.copies if c[1] == emb_buf]
    enq = dec.context.enqueues
    lr, iou = be.decode(emb[:1], boxes=boxes)
    after = [c for c in cudart.copies if c[1] == emb_buf]
    assert len(after) - len(before) == 1 and dec.context.enqueues - enq == 3
    assert lr.shape == (37, 256, 256) and iou.shape == (37,)
    np.testing.assert_allclose(lr[:, 0, 0], boxes[:, 0] + emb[:1].mean(), rtol=1e-5)
    np.testing.assert_allclose(iou, 5.0)  # box corner labels 2 + 3
    # points with padding (labels 1 and the appended -1)
    pts = rng.uniform(0, 1000, (3, 2, 2)).astype(np.float32)
    lr, iou = be.decode(emb[:1], points=pts, point_labels=np.ones((3, 2)))
    np.testing.assert_allclose(iou, 1.0)
    assert be.decode(emb[:1], boxes=np.zeros((0, 4), np.float32))[0].shape == (0, 256, 256)
    # CellFinder, created on first use
    assert (S.CELLFINDER, None) not in be._runners
    logits, pboxes = be.detect(x[:2])
    assert logits.shape == (2, 8, 2) and pboxes.shape == (2, 8, 4)
    np.testing.assert_allclose(logits[:, 0, 0], x[:2].reshape(2, -1).mean(1), rtol=1e-5)
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
    # closed runners are made again on the next call
    np.testing.assert_allclose(be.encode(x1), e1, rtol=1e-6)
    be.close()
    assert not cudart.blocks


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


def test_missing_tensorrt_or_cellfinder_are_backend_errors(fakes, engine_dir, monkeypatch):
    from cellsam_trt.engine.trt_backend import TrtBackend, TrtUnavailable

    assert issubclass(TrtUnavailable, BackendError)
    (engine_dir / "cellfinder.engine").unlink()
    be = TrtBackend(engine_dir)
    assert not be.has_detector
    with pytest.raises(BackendError, match="no CellFinder"):
        be.detect(np.zeros((1, 3, 1024, 1024), np.float32))
    be.close()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TrtUnavailable, match="TensorRT is not installed"):
        TrtBackend(engine_dir)


def test_a_failed_graph_capture_falls_back_to_enqueues(fakes, engine_dir, monkeypatch):
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    monkeypatch.setattr(
        cudart, "cudaStreamEndCapture", lambda stream: (cudart.capturing.pop(int(stream)) and None) or (901, None)
    )
    be = TrtBackend(engine_dir)
    x = np.random.default_rng(1).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    runner = be.runner(S.ENCODER)
    outs = [be.encode(x * k) for k in (1, 2, 3)]
    assert not runner.graphs and cudart.launches == 0 and runner.context.enqueues == 4  # 3 + the failed capture
    for k, o in zip((1, 2, 3), outs):
        np.testing.assert_allclose(o[0, 0, 0, 0], k * x.mean(), rtol=1e-5)
    be.close()


def test_runners_make_their_device_current_in_worker_threads(fakes, engine_dir):
    """CUDA's current device is per host thread: a worker thread that never called
    cudaSetDevice would run on device 0. Every allocation, copy, deserialization and launch,
    in the constructing thread and in workers, runs on the backend's device (1 here)."""
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    be = TrtBackend(engine_dir, device_id=1)
    assert be.device == "cuda:1"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    boxes = np.array([[10, 20, 60, 80], [100, 100, 200, 220]], np.float32)
    results, errors, idents = {}, [], []

    def work(tag):
        try:
            idents.append(threading.get_ident())
            emb = be.encode(x)
            results[tag] = (emb, be.decode(emb, boxes=boxes), be.detect(x))  # CellFinder made here
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    for tag in ("a", "b"):  # one after the other: each a fresh thread
        t = threading.Thread(target=work, args=(tag,))
        t.start()
        t.join()
    assert not errors, errors
    for emb, (lr, iou), (logits, _) in results.values():
        np.testing.assert_allclose(emb[0, 0, 0, 0], x.mean(), rtol=1e-5)
        np.testing.assert_allclose(lr[:, 0, 0], boxes[:, 0] + emb.mean(), rtol=1e-5)
        np.testing.assert_allclose(iou, 5.0)
        np.testing.assert_allclose(logits[0, 0, 0], x.mean(), rtol=1e-5)
    for ident in idents:
        assert (ident, 1) in cudart.set_device_calls
        assert any(t == ident and op == "execute" for op, t, _ in cudart.ops)
    deserialized_in = [t for op, t, _ in cudart.ops if op == "deserialize"]
    assert len(deserialized_in) == 3 and deserialized_in[-1] == idents[0]  # the CellFinder, in a worker
    ops = {op for op, _, _ in cudart.ops}
    assert {"malloc", "memcpy", "deserialize", "execute", "graph_launch"} <= ops
    assert {dev for _, _, dev in cudart.ops} == {1}, [o for o in cudart.ops if o[2] != 1][:5]
    be.close()
    assert not cudart.blocks


def test_embedding_uploaded_once_across_the_chunks_of_one_decode(fakes, engine_dir):
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    be = TrtBackend(engine_dir, decode_chunk=4)
    assert be.decode_chunk == 4 and TrtBackend(engine_dir, decode_chunk=99).decode_chunk == 16  # max N
    dec = be.runner(S.DECODER)
    bufs = {n: dec.buffers[n].device for n in dec.spec.input_names}

    def uploads():
        return {n: sum(1 for c in cudart.copies if c[0] == "H2D" and c[1] == d) for n, d in bufs.items()}

    rng = np.random.default_rng(4)
    emb = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    xy = rng.uniform(0, 900, (10, 2))
    boxes = np.concatenate([xy, xy + 30], 1).astype(np.float32)
    u0, enq = uploads(), dec.context.enqueues
    lr, iou = be.decode(emb, boxes=boxes)  # chunks 4 + 4 + 2
    u1 = uploads()
    assert dec.context.enqueues - enq == 3
    assert u1["image_embeddings"] - u0["image_embeddings"] == 1
    assert u1["point_coords"] - u0["point_coords"] == 3 and u1["point_labels"] - u0["point_labels"] == 3
    np.testing.assert_allclose(lr[:, 0, 0], boxes[:, 0] + emb.mean(), rtol=1e-5)
    # the streaming form, chunks of 3: still one upload for the call
    parts = list(be.decode_chunks(emb, boxes=boxes, chunk=3))
    assert [p[0].shape[0] for p in parts] == [3, 3, 3, 1]
    u2 = uploads()
    assert u2["image_embeddings"] - u1["image_embeddings"] == 1
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), lr)
    # a later call uploads again, even with the same array object changed in place
    emb += 1.0
    lr2, _ = be.decode(emb, boxes=boxes)
    assert uploads()["image_embeddings"] - u2["image_embeddings"] == 1
    np.testing.assert_allclose(lr2[:, 0, 0], boxes[:, 0] + emb.mean(), rtol=1e-5)
    # the runner itself: the same object (and shape) is not uploaded again, an equal copy is
    feeds = {
        "image_embeddings": emb,
        "point_coords": np.zeros((1, 2, 2), np.float32),
        "point_labels": np.ones((1, 2), np.float32),
    }
    dec.forget_resident()
    u3 = uploads()["image_embeddings"]
    a = dec.infer(feeds)
    b = dec.infer(dict(feeds))
    assert uploads()["image_embeddings"] - u3 == 1
    c = dec.infer({**feeds, "image_embeddings": emb.copy()})
    assert uploads()["image_embeddings"] - u3 == 2
    for out in (b, c):
        np.testing.assert_array_equal(out[0], a[0])
    be.close()


FP16_IO = {
    S.ENCODER: {"image": "HALF", "image_embeddings": "HALF"},
    S.CELLFINDER: {"image": "HALF", "pred_logits": "HALF", "pred_boxes": "HALF"},
    S.DECODER: {
        "image_embeddings": "HALF",
        "point_coords": "HALF",
        "point_labels": "INT32",
        "low_res_masks": "HALF",
        "iou_predictions": "HALF",
    },
}


def test_fp16_io_engines_take_cast_inputs_and_give_float32(fakes, tmp_path):
    """Engines with FP16 (and INT32) I/O: buffers sized in the engine's dtype, inputs cast on
    upload, outputs back as float32."""
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    be = TrtBackend(make_engine_dir(tmp_path / "engines", FP16_IO))
    enc = be.runner(S.ENCODER)
    assert enc.buffers["image"].dtype == np.float16 and enc.dtypes["image_embeddings"] == np.float16
    assert enc.buffers["image"].capacity == 2 * 3 * 1024 * 1024 * 2  # max B 2, two bytes each
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    image_dev = enc.buffers["image"].device
    emb = be.encode(x)
    (copy,) = [c for c in cudart.copies if c[0] == "H2D" and c[1] == image_dev]
    assert copy[2] == x.size * 2
    staged = _read(image_dev, x.shape, np.float16)
    np.testing.assert_array_equal(staged, x.astype(np.float16))  # cast on upload, not truncated bytes
    assert emb.dtype == np.float32 and emb.shape == (1, 256, 64, 64)
    want = np.float16(x.astype(np.float16).astype(np.float32).mean())  # the fake computes in fp32, stores fp16
    np.testing.assert_allclose(emb[0, 0, 0, 0], np.float32(want), rtol=1e-6)
    logits, pboxes = be.detect(x)
    assert logits.dtype == np.float32 and pboxes.dtype == np.float32
    np.testing.assert_allclose(pboxes, 0.5)
    dec = be.runner(S.DECODER)
    assert dec.buffers["point_labels"].dtype == np.int32
    boxes = np.array([[10.25, 20, 60, 80], [100, 100, 200, 220]], np.float32)
    lr, iou = be.decode(emb, boxes=boxes)
    assert lr.dtype == np.float32 and iou.dtype == np.float32 and lr.shape == (2, 256, 256)
    np.testing.assert_array_equal(_read(dec.buffers["point_labels"].device, (2, 2), np.int32), [[2, 3], [2, 3]])
    np.testing.assert_allclose(iou, 5.0)
    np.testing.assert_allclose(lr[:, 0, 0], boxes[:, 0] + emb.mean(), rtol=2e-3)
    be.close()
    assert not cudart.blocks


@pytest.mark.parametrize(
    "dtype, match",
    [
        ("BF16", "BF16 at the engine's inputs / outputs; NumPy has no bfloat16"),
        ("FP8", "TensorRT dtype FP8, which this runtime does not stage"),
    ],
)
def test_unstageable_io_dtypes_are_refused(fakes, tmp_path, dtype, match):
    from cellsam_trt.engine.trt_backend import TrtBackend

    cudart, trt = fakes
    out = make_engine_dir(tmp_path / "engines", {S.DECODER: {"low_res_masks": dtype}})
    with pytest.raises(EF.EngineFileError, match=match) as e:
        TrtBackend(out)
    assert "'low_res_masks'" in str(e.value) and "prompt_decoder.engine" in str(e.value)
    assert not cudart.blocks  # the encoder's buffers, made first, were freed
