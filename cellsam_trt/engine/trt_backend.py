"""TensorRT 10 backend: runs the engines of ``cellsam-trt build`` with cuda-python.

Implements ``engine.base.Backend`` on NumPy float32 in the 1024 frame:

* ``encode``: (B, 3, 1024, 1024) -> (B, 256, 64, 64), in calls of at most the engine's max B;
* ``detect``: (B, 3, 1024, 1024) -> pred_logits (B, Q, 2), pred_boxes (B, Q, 4) cxcywh in [0, 1];
* ``decode``: one embedding (1, 256, 64, 64) and N prompts -> low-res logits (N, 256, 256),
  IoU predictions (N,), in calls of at most the engine's max N (``decode_chunk``); the
  embedding is uploaded once per ``decode`` call and reused by every chunk.

How it runs
    Each engine gets one ``_EngineRunner``: an execution context, its own non-blocking CUDA
    stream and a completion event, and one ``HostDeviceBuffer`` per I/O tensor (pinned host
    staging + device memory, one owner that frees both) sized ONCE for the profile maxima, so
    tensor addresses are set once. A call checks the inputs against the spec (from the
    engine header; ``InputSpecError`` names the input), copies them into the pinned staging
    buffers, enqueues host->device copies, ``set_input_shape`` + ``execute_async_v3``, the
    device->host copies of the outputs, records the event and waits for it. The encoder and
    CellFinder at batch 1 (a fixed shape) are captured into a CUDA graph after one ordinary
    enqueue and replayed afterwards. Runners are locked individually, so the encoder /
    CellFinder and the decoder can run concurrently from different threads (``gpu_pipeline``)
    on their own streams.

Before deserializing, every engine header is checked against this machine (TensorRT version,
GPU name and compute capability, ``export.engine_file``): a mismatch raises
``EngineCompatError`` with the ``cellsam-trt build`` command that rebuilds the engine.

NOT RUN: no TensorRT and no GPU were available where this was written; nothing in this file
has executed against a real engine or a real CUDA device. Its control flow and data movement
are tested with stand-in ``tensorrt`` / ``cudart`` modules (``tests/test_trt_runtime_fake.py``),
everything around it (headers, plans, calibration logic, spec checks) on the CPU. The calls
were checked as follows:

* TensorRT 10 Python API. Exact Python names, argument orders and return values were read in
  the pybind11 binding sources and docstrings of NVIDIA/TensorRT at tags v10.0.0 and v10.13.0
  (python/src/infer/pyCore.cpp, pyGraph.cpp, pyInt8.cpp, pyFoundationalTypes.cpp,
  python/src/parsers/pyOnnx.cpp, python/docstrings/infer/pyCoreDoc.h, pyGraphDoc.h,
  pyInt8Doc.h, python/packaging/bindings_wheel/tensorrt/__init__.py, include/NvInfer.h), and
  cross-checked with the documentation pages found by search:
  docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html,
  .../python-api/infer/Core/OptimizationProfile.html, the TensorRT 10.x C++ pages of
  IExecutionContext and IOptimizationProfile, and "Migrating from enqueueV2 to enqueueV3"
  (docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-8x-to-10x-c-api-patterns.html:
  set every I/O tensor address, then enqueueV3). Calls used here:
  ``trt.Logger(trt.Logger.WARNING)``, ``trt.Runtime(logger).deserialize_cuda_engine(buffer)``
  (returns None on failure), ``engine.num_io_tensors``, ``get_tensor_name(i)``,
  ``get_tensor_mode(name)`` (``trt.TensorIOMode.INPUT``), ``get_tensor_dtype(name)``,
  ``get_tensor_profile_shape(name, profile_index)`` -> [min, opt, max],
  ``engine.create_execution_context()``, ``context.set_input_shape(name, shape)`` (bool),
  ``context.set_tensor_address(name, int_ptr)`` (bool), ``context.get_tensor_shape(name)``,
  ``context.execute_async_v3(stream_handle: int)`` (bool; the docstring asks for a
  non-default stream), ``trt.float32`` (module alias of ``trt.DataType.FLOAT``).
* cuda-python (``cuda.bindings.runtime``, NVIDIA's bindings): signatures and return tuples
  read from the docstrings of the installed cuda-bindings 13.4 and tried without a driver
  (every call returns ``(cudaError_t, *values)``; ``int(cudaStream_t)`` is the raw handle):
  ``cudaMallocHost(size)`` -> (err, ptr), ``cudaMalloc(size)``, ``cudaFreeHost``, ``cudaFree``,
  ``cudaMemcpyAsync(dst, src, count, kind, stream)`` with ``cudaMemcpyKind.cudaMemcpyHostToDevice``
  / ``DeviceToHost``, ``cudaMemcpy``, ``cudaStreamCreateWithFlags(cudaStreamNonBlocking)``,
  ``cudaEventCreateWithFlags(cudaEventDisableTiming)``, ``cudaEventRecord(event, stream)``,
  ``cudaEventSynchronize``, ``cudaStreamBeginCapture(stream,
  cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)``, ``cudaStreamEndCapture(stream)``
  -> (err, graph), ``cudaGraphInstantiate(graph, 0)`` -> (err, graph_exec),
  ``cudaGraphLaunch(graph_exec, stream)``, ``cudaGraphExecDestroy``, ``cudaGraphDestroy``,
  ``cudaStreamDestroy``, ``cudaEventDestroy``, ``cudaSetDevice``,
  ``cudaGetDeviceProperties(device)`` -> (err, prop) with ``prop.name`` (bytes) / ``major`` /
  ``minor`` / ``totalGlobalMem``, ``cudaGetErrorString(err)`` -> (err, bytes).
* Not found by the document search, taken from the TensorRT developer guide's "CUDA Graphs"
  section as remembered: enqueue once before capturing (deferred shape work must not happen
  inside the capture), and a graph is valid only for the shapes and addresses it was captured
  with. A failed capture is therefore not fatal here: the runner keeps ordinary enqueues.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np

from ..export import engine_file as EF
from ..export import specs as S
from ..export.wrappers import prompt_tokens


class TrtUnavailable(RuntimeError):
    """TensorRT or cuda-python is missing, or there is no CUDA device."""


class CudaError(RuntimeError):
    """A CUDA runtime call that failed; the message names the call and CUDA's error string."""


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as e:
            raise TrtUnavailable("cuda-python is not installed (pip install cuda-python)") from e
    return cudart


def _check(result, call: str):
    """Unpack a cuda-python result tuple ``(err, *values)``; raise CudaError unless success."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, msg = cudart.cudaGetErrorString(err)
        raise CudaError(f"{call} failed: {msg.decode() if isinstance(msg, bytes) else msg} ({err})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def query_gpu(device_id: int = 0):
    """``GpuFacts`` of CUDA device ``device_id`` (TrtUnavailable when there is none)."""
    from ..export.tensorrt_build import GpuFacts

    cudart = _cudart()
    try:
        prop = _check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    except CudaError as e:
        raise TrtUnavailable(f"no usable CUDA device {device_id}: {e}") from e
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuFacts(name.split("\x00")[0].strip(), (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem))


def runtime_facts(device_id: int = 0) -> EF.RuntimeFacts:
    """TensorRT version and GPU of this machine, for ``engine_file.check_compatible``."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TrtUnavailable("TensorRT is not installed") from e
    gpu = query_gpu(device_id)
    return EF.RuntimeFacts(str(trt.__version__), gpu.name, gpu.cc)


def engine_files(engine_dir: str | os.PathLike) -> dict[str, Path]:
    """Graph name -> engine path for the engines present in ``engine_dir``."""
    out = {m: EF.engine_path(engine_dir, m) for m in S.MODEL_NAMES}
    return {m: p for m, p in out.items() if p.is_file()}


def check_engine_dir(engine_dir: str | os.PathLike, facts: EF.RuntimeFacts, strict_gpu_name: bool = True) -> dict[str, dict]:
    """Headers of the engines in ``engine_dir``, each checked against ``facts`` (no TensorRT
    needed). Raises EngineCompatError (with the rebuild command) for the first mismatch and
    FileNotFoundError when the image encoder or decoder engine is missing."""
    files = engine_files(engine_dir)
    missing = [m for m in (S.ENCODER, S.DECODER) if m not in files]
    if missing:
        raise FileNotFoundError(f"{engine_dir}: no {', '.join(EF.engine_path(engine_dir, m).name for m in missing)} "
                                "(run `cellsam-trt build --onnx EXPORT_DIR --out ENGINE_DIR`)")
    headers = {}
    for m, path in files.items():
        h = EF.read_header(path)
        if h.get("model") != m:
            raise EF.EngineFileError(f"{path}: header says model {h.get('model')!r}, expected {m!r}")
        EF.check_compatible(h, facts, path, strict_gpu_name)
        headers[m] = h
    return headers


class HostDeviceBuffer:
    """Pinned host staging memory and device memory of the same size, owned together.

    shape: the largest shape the buffer must hold; dtype: NumPy dtype. ``free()`` (also on
    garbage collection) releases both. Not thread-safe: one owner (a runner) uses it.
    """

    def __init__(self, shape, dtype=np.float32) -> None:
        self.cudart = _cudart()
        self.dtype = np.dtype(dtype)
        self.capacity = int(np.prod(shape)) * self.dtype.itemsize
        self.host = self.device = None
        self.host = int(_check(self.cudart.cudaMallocHost(self.capacity), "cudaMallocHost"))
        try:
            self.device = int(_check(self.cudart.cudaMalloc(self.capacity), "cudaMalloc"))
        except CudaError:
            self.free()
            raise
        raw = (ctypes.c_byte * self.capacity).from_address(self.host)
        self._host_bytes = np.ctypeslib.as_array(raw)

    def host_view(self, shape) -> np.ndarray:
        n = int(np.prod(shape)) * self.dtype.itemsize
        if n > self.capacity:
            raise ValueError(f"shape {tuple(shape)} needs {n} bytes, buffer holds {self.capacity}")
        return self._host_bytes[:n].view(self.dtype).reshape(shape)

    def upload(self, array: np.ndarray, stream) -> None:
        """Stage ``array`` in pinned memory and enqueue its host->device copy on ``stream``."""
        a = np.ascontiguousarray(array, dtype=self.dtype)
        np.copyto(self.host_view(a.shape), a)
        _check(self.cudart.cudaMemcpyAsync(self.device, self.host, a.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync(H2D)")

    def download(self, shape, stream) -> None:
        """Enqueue the device->host copy of the first prod(shape) elements on ``stream``."""
        n = int(np.prod(shape)) * self.dtype.itemsize
        _check(self.cudart.cudaMemcpyAsync(self.host, self.device, n,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync(D2H)")

    def upload_sync(self, array: np.ndarray) -> int:
        """Synchronous upload (the INT8 calibrator); returns the device address."""
        a = np.ascontiguousarray(array, dtype=self.dtype)
        np.copyto(self.host_view(a.shape), a)
        _check(self.cudart.cudaMemcpy(self.device, self.host, a.nbytes,
                                      self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy(H2D)")
        return self.device

    def free(self) -> None:
        if getattr(self, "device", None):
            self.cudart.cudaFree(self.device)
            self.device = None
        if getattr(self, "host", None):
            self._host_bytes = None
            self.cudart.cudaFreeHost(self.host)
            self.host = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


class _EngineRunner:
    """One engine: context, stream, event, fixed I/O buffers, CUDA graphs for fixed shapes."""

    def __init__(self, trt, engine, spec: S.ModelSpec, graph_shapes: set, path: Path) -> None:
        self.cudart = _cudart()
        self.trt, self.engine, self.spec, self.path = trt, engine, spec, path
        self._check_io()
        self.context = engine.create_execution_context()
        if self.context is None:
            raise TrtUnavailable(f"{path}: could not create an execution context (out of GPU memory?)")
        self.stream = _check(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking),
                             "cudaStreamCreateWithFlags")
        self.done = _check(self.cudart.cudaEventCreateWithFlags(self.cudart.cudaEventDisableTiming),
                           "cudaEventCreateWithFlags")
        self.buffers: dict[str, HostDeviceBuffer] = {}
        for t in spec.inputs + spec.outputs:
            self.buffers[t.name] = HostDeviceBuffer(t.dims("max"), t.np_dtype)
            if not self.context.set_tensor_address(t.name, self.buffers[t.name].device):
                raise TrtUnavailable(f"{path}: set_tensor_address({t.name!r}) failed")
        self.graph_shapes = set(graph_shapes)
        self.graphs: dict[tuple, tuple] = {}
        self.last_key = None
        self.lock = threading.RLock()  # decode() holds it across chunks; run() re-enters

    def _check_io(self) -> None:
        trt, eng = self.trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(self.spec.input_names) or sorted(outputs) != sorted(self.spec.output_names):
            raise EF.EngineFileError(f"{self.path}: engine I/O {inputs} -> {outputs} does not match its spec "
                                     f"{self.spec.input_names} -> {self.spec.output_names}")
        for t in self.spec.inputs + self.spec.outputs:
            if eng.get_tensor_dtype(t.name) != trt.float32:
                raise EF.EngineFileError(f"{self.path}: tensor {t.name!r} is {eng.get_tensor_dtype(t.name)}, not float32")
        for t in self.spec.inputs:
            mn, op, mx = (tuple(s) for s in eng.get_tensor_profile_shape(t.name, 0))
            if mn != t.dims("min") or mx != t.dims("max"):
                raise EF.EngineFileError(f"{self.path}: profile of {t.name!r} is {mn}..{mx}, the header spec says "
                                         f"{t.dims('min')}..{t.dims('max')}")

    def upload(self, name: str, array: np.ndarray) -> None:
        self.buffers[name].upload(array, self.stream)
        if not self.context.set_input_shape(name, tuple(array.shape)):
            raise RuntimeError(f"{self.path}: set_input_shape({name!r}, {array.shape}) rejected")

    def _enqueue(self, key: tuple) -> None:
        if key in self.graphs and self.last_key == key:
            _check(self.cudart.cudaGraphLaunch(self.graphs[key][1], self.stream), "cudaGraphLaunch")
            return
        if not self.context.execute_async_v3(int(self.stream)):  # TRT takes the handle as an int
            raise RuntimeError(f"{self.path}: execute_async_v3 failed (see the TensorRT log)")
        if key in self.graph_shapes and key not in self.graphs:
            self.graph_shapes.discard(key)  # one attempt per shape; a failed capture is not fatal
            self._capture(key)

    def _capture(self, key: tuple) -> None:
        """Capture the enqueue for the current shapes into a CUDA graph (after one ordinary
        enqueue with these shapes, whose results this call returns). Capture errors leave the
        runner on ordinary enqueues."""
        cudart = self.cudart
        try:
            _check(cudart.cudaStreamBeginCapture(self.stream,
                                                 cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                   "cudaStreamBeginCapture")
        except CudaError:
            return
        ok = False
        try:
            ok = self.context.execute_async_v3(int(self.stream))
        finally:
            err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess or graph is None:
            if graph is not None and err == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(graph)
            return
        err, exe = cudart.cudaGraphInstantiate(graph, 0)
        if err != cudart.cudaError_t.cudaSuccess:
            cudart.cudaGraphDestroy(graph)
            return
        self.graphs[key] = (graph, exe)

    def run(self, feeds: dict[str, np.ndarray], resident: tuple[str, ...] = ()) -> list[np.ndarray]:
        """Check, upload (except ``resident`` inputs already on the device with their shape
        set), execute, download. Returns the outputs (new arrays) in spec order."""
        with self.lock:
            for name, a in feeds.items():
                if name not in resident:
                    self.upload(name, a)
            key = tuple(tuple(feeds[n].shape) for n in self.spec.input_names)
            self._enqueue(key)
            self.last_key = key
            shapes = []
            for t in self.spec.outputs:
                shape = tuple(self.context.get_tensor_shape(t.name))
                self.buffers[t.name].download(shape, self.stream)
                shapes.append(shape)
            _check(self.cudart.cudaEventRecord(self.done, self.stream), "cudaEventRecord")
            _check(self.cudart.cudaEventSynchronize(self.done), "cudaEventSynchronize")
            return [self.buffers[t.name].host_view(s).copy() for t, s in zip(self.spec.outputs, shapes)]

    def close(self) -> None:
        cudart = self.cudart
        for graph, exe in self.graphs.values():
            cudart.cudaGraphExecDestroy(exe)
            cudart.cudaGraphDestroy(graph)
        self.graphs.clear()
        self.context = None
        for b in self.buffers.values():
            b.free()
        self.buffers.clear()
        if self.done is not None:
            cudart.cudaEventDestroy(self.done)
            self.done = None
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class TrtBackend:
    """Runs the engines in ``engine_dir`` (``cellsam-trt build``) on CUDA device ``device_id``.

    decode_chunk: prompts per decoder call (default and maximum: the engine's max N).
    cuda_graphs: capture the encoder / CellFinder at batch 1 into CUDA graphs.
    strict_gpu_name: refuse engines built on another GPU model of the same architecture.
    """

    name = "trt"

    def __init__(self, engine_dir: str | os.PathLike, device_id: int = 0, decode_chunk: int | None = None,
                 cuda_graphs: bool = True, strict_gpu_name: bool = True) -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise TrtUnavailable("TensorRT is not installed (pip install 'cellsam-trt[trt]')") from e
        cudart = _cudart()
        self.engine_dir = Path(engine_dir)
        self.device_id = device_id
        self.facts = runtime_facts(device_id)
        self.headers = check_engine_dir(self.engine_dir, self.facts, strict_gpu_name)
        _check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self.specs = {m: S.ModelSpec.from_dict(h["spec"]) for m, h in self.headers.items()}
        export = self.headers[S.ENCODER].get("export", {})
        self.adv_mode = bool(export.get("adv_mode"))
        self.has_detector = S.CELLFINDER in self.headers
        self.precision = self.headers[S.ENCODER].get("precision")
        n_max = self.specs[S.DECODER].dims()["N"].max
        self.decode_chunk = min(decode_chunk or n_max, n_max)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._cuda_graphs = cuda_graphs
        self._runners: dict[str, _EngineRunner] = {}
        self._lock = threading.Lock()
        for m in (S.ENCODER, S.DECODER):
            self._runner(m)

    def _runner(self, model: str) -> _EngineRunner:
        r = self._runners.get(model)
        if r is not None:
            return r
        with self._lock:
            if model not in self._runners:
                if model not in self.headers:
                    raise RuntimeError(f"{self.engine_dir}: no {model} engine")
                path = EF.engine_path(self.engine_dir, model)
                header, blob = EF.read_engine_file(path)
                engine = self._runtime.deserialize_cuda_engine(blob)
                if engine is None:
                    raise EF.EngineCompatError(str(path), ["TensorRT could not deserialize the engine"],
                                               EF.rebuild_command(header, path))
                spec = self.specs[model]
                graphs = set()
                if self._cuda_graphs and model in (S.ENCODER, S.CELLFINDER):
                    graphs.add(((1,) + tuple(spec.inputs[0].dims("opt")[1:]),))
                self._runners[model] = _EngineRunner(self._trt, engine, spec, graphs, path)
            return self._runners[model]

    def _batched(self, model: str, image: np.ndarray) -> list[np.ndarray]:
        spec = self.specs[model]
        x = np.ascontiguousarray(image, dtype=np.float32)
        b = spec.inputs[0].shape[0]
        max_b = b.max if isinstance(b, S.Dim) else int(b)
        name = spec.input_names[0]
        runner = self._runner(model)
        parts = []
        for s in range(0, max(1, x.shape[0] if x.ndim == 4 else 1), max_b):
            feed = {name: x[s:s + max_b] if x.ndim == 4 else x}
            spec.check_inputs(feed)
            parts.append(runner.run(feed))
        return [np.concatenate(p) for p in zip(*parts)] if len(parts) > 1 else parts[0]

    # -- Backend protocol ----------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> np.ndarray:
        return self._batched(S.ENCODER, image)[0]

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_detector:
            raise RuntimeError("no CellFinder engine (plain SAM export): give box or point prompts")
        logits, boxes = self._batched(S.CELLFINDER, image)
        return logits, boxes

    def decode(self, embedding, boxes=None, points=None, point_labels=None):
        spec = self.specs[S.DECODER]
        coords, labels = prompt_tokens(boxes, points, point_labels)
        n = coords.shape[0]
        side = spec.outputs[0].shape[-1]
        if n == 0:
            return np.zeros((0, side, side), np.float32), np.zeros((0,), np.float32)
        emb = np.ascontiguousarray(embedding, dtype=np.float32)
        spec.check_inputs({"image_embeddings": emb, "point_coords": coords[:1], "point_labels": labels[:1]})
        runner = self._runner(S.DECODER)
        logits, ious = [], []
        with runner.lock:  # the embedding stays resident across this call's chunks
            runner.upload("image_embeddings", emb)
            for s in range(0, n, self.decode_chunk):
                feeds = {"image_embeddings": emb, "point_coords": coords[s:s + self.decode_chunk],
                         "point_labels": labels[s:s + self.decode_chunk]}
                spec.check_inputs(feeds)
                lr, iou = runner.run(feeds, resident=("image_embeddings",))
                logits.append(lr[:, 0])
                ious.append(iou[:, 0])
        return np.concatenate(logits), np.concatenate(ious)

    def close(self) -> None:
        """Free the device memory, graphs, streams and contexts."""
        with self._lock:
            for r in self._runners.values():
                r.close()
            self._runners.clear()
