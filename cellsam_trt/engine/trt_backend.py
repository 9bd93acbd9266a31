"""TensorRT 10.3+ / 11.x backend: runs the engines of ``cellsam-trt build`` with cuda-python.

``TrtBackend(engine_dir)`` is an ``engine.base.Backend``: batching up to the engine's max B,
the decoder's prompt layout and chunks (``decode_chunk`` = the decoder engine's max N) and the
input checks against each engine's spec are the base's. Each engine gets one ``TrtRunner``:

* an execution context, its own non-blocking CUDA stream and a completion event, and one
  ``HostDeviceBuffer`` per I/O tensor (pinned host staging + device memory, one owner that
  frees both), sized once for the profile maxima in the engine's dtype, so tensor addresses
  are set once;
* ``infer_impl``: make the runner's device current (``cudaSetDevice`` binds only the calling
  thread, and the schedulers call runners from worker threads), stage each input in pinned
  memory cast to the engine's dtype, enqueue its host->device copy, ``set_input_shape``,
  ``execute_async_v3``, the device->host copies of the outputs, record the event, wait for
  it; the outputs come back as new arrays in the spec's dtype (float32);
* CUDA graphs: the encoder and CellFinder at batch 1 (a fixed shape) are captured after one
  ordinary enqueue and replayed while the runner's shapes stay those of the capture; a failed
  capture leaves the runner on ordinary enqueues;
* the decoder's runner keeps the embedding on the device: an ``image_embeddings`` array that
  is the same object, with the same shape, as the one it last uploaded is not uploaded again,
  so the chunks of one ``decode`` share one upload. ``decode_chunks`` drops the kept array at
  the start of each call, so an array changed in place between two calls is uploaded again;
  an array changed in place while one call's chunks are running is not.

Engine I/O dtypes come from the engine (a strongly typed engine has its ONNX graph's I/O
types; the annotated graphs keep float32 I/O): FLOAT, HALF, INT32, INT64 and BOOL are staged
as the NumPy dtype of the same layout; BF16 (NumPy has none) and other types are refused when
the runner is made.

Before deserializing, every engine header is checked against this machine (TensorRT version,
GPU name and compute capability, ``runtime.engine_file``): a mismatch raises
``EngineCompatError`` with the ``cellsam-trt build`` command that rebuilds the engine.

Not run against a real TensorRT or CUDA device: the data movement is tested with stand-in
``tensorrt`` / ``cudart`` modules (``tests/test_trt_runtime_fake.py``). The calls were checked
against:

* TensorRT Python API (every name checked against the 10.3.0, 10.13.3.9 and 11.4.0.106 bindings
  by ``tests/test_trt_api_names.py``): the
  pybind11 binding sources and docstrings of NVIDIA/TensorRT v10.0.0 and v10.13.0
  (python/src/infer/pyCore.cpp, pyGraph.cpp, pyInt8.cpp, pyFoundationalTypes.cpp,
  python/src/parsers/pyOnnx.cpp, python/docstrings/infer/pyCoreDoc.h, pyGraphDoc.h,
  pyInt8Doc.h, include/NvInfer.h; the dtype aliases ``trt.float32`` ... ``trt.bool`` in
  python/packaging/bindings_wheel/tensorrt/__init__.py) and the ExecutionContext /
  OptimizationProfile pages and the 8.x -> 10.x migration guide on docs.nvidia.com (set every
  I/O tensor address, then ``enqueueV3``). Used here:
  ``trt.Logger(trt.Logger.WARNING)``, ``trt.Runtime(logger).deserialize_cuda_engine(buffer)``
  (None on failure), ``engine.num_io_tensors``, ``get_tensor_name(i)``,
  ``get_tensor_mode(name)`` (``trt.TensorIOMode.INPUT``), ``get_tensor_dtype(name)``,
  ``get_tensor_profile_shape(name, 0)`` -> [min, opt, max], ``create_execution_context()``,
  ``context.set_input_shape`` / ``set_tensor_address(name, int)`` (bool),
  ``context.get_tensor_shape(name)``, ``context.execute_async_v3(stream: int)`` (bool; a
  non-default stream).
* cuda-python (``cuda.bindings.runtime``): the docstrings of cuda-bindings 13.4; every call
  returns ``(cudaError_t, *values)`` and ``int(cudaStream_t)`` is the raw handle. Used:
  ``cudaSetDevice``, ``cudaGetDeviceProperties`` (``name`` bytes, ``major``, ``minor``,
  ``totalGlobalMem``), ``cudaMallocHost`` / ``cudaMalloc`` / ``cudaFreeHost`` / ``cudaFree``,
  ``cudaMemcpyAsync(dst, src, count, kind, stream)``, ``cudaMemcpy``,
  ``cudaStreamCreateWithFlags(cudaStreamNonBlocking)``,
  ``cudaEventCreateWithFlags(cudaEventDisableTiming)``, ``cudaEventRecord``,
  ``cudaEventSynchronize``, ``cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal)``,
  ``cudaStreamEndCapture`` -> (err, graph), ``cudaGraphInstantiate(graph, 0)`` -> (err, exec),
  ``cudaGraphLaunch``, ``cudaGraphExecDestroy``, ``cudaGraphDestroy``, ``cudaStreamDestroy``,
  ``cudaEventDestroy``, ``cudaGetErrorString``.
* CUDA graphs: the TensorRT developer guide's "CUDA Graphs" section as remembered (the
  document search did not find it): enqueue once before capturing, so that deferred shape
  work is not captured; a graph holds only for the shapes and addresses it was captured with.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..runtime import engine_file as EF
from ..runtime import specs as S
from .base import Backend, BackendError, Runner


class TrtUnavailable(BackendError):
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


def _set_device(device_id: int) -> None:
    """Make ``device_id`` current for the calling thread (``cudaSetDevice`` is per thread)."""
    _check(_cudart().cudaSetDevice(device_id), "cudaSetDevice")


def query_gpu(device_id: int = 0) -> EF.GpuFacts:
    """``GpuFacts`` of CUDA device ``device_id`` (TrtUnavailable when there is none)."""
    cudart = _cudart()
    try:
        prop = _check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    except CudaError as e:
        raise TrtUnavailable(f"no usable CUDA device {device_id}: {e}") from e
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return EF.GpuFacts(name.split("\x00")[0].strip(), (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem))


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


def check_engine_dir(
    engine_dir: str | os.PathLike, facts: EF.RuntimeFacts, strict_gpu_name: bool = True
) -> dict[str, dict]:
    """Headers of the engines in ``engine_dir``, each checked against ``facts`` (no TensorRT
    needed). Raises EngineCompatError (with the rebuild command) for the first mismatch and
    FileNotFoundError when the image encoder or decoder engine is missing."""
    files = engine_files(engine_dir)
    missing = [m for m in (S.ENCODER, S.DECODER) if m not in files]
    if missing:
        raise FileNotFoundError(
            f"{engine_dir}: no {', '.join(EF.engine_path(engine_dir, m).name for m in missing)} "
            "(run `cellsam-trt build --onnx EXPORT_DIR --out ENGINE_DIR`)"
        )
    headers = {}
    for m, path in files.items():
        h = EF.read_header(path)
        if h.get("model") != m:
            raise EF.EngineFileError(f"{path}: header says model {h.get('model')!r}, expected {m!r}")
        EF.check_compatible(h, facts, path, strict_gpu_name)
        headers[m] = h
    return headers


def numpy_dtype(trt, trt_dtype, where: str = "tensor") -> np.dtype:
    """The NumPy dtype that stages a TensorRT I/O dtype (FLOAT, HALF, INT32, INT64, BOOL).
    EngineFileError for BF16 (NumPy has no bfloat16) and every other type."""
    # the dtype aliases of the tensorrt module (all in 10.3 to 11.x) -> NumPy dtypes of the same layout
    staged = (
        (trt.float32, np.float32),
        (trt.float16, np.float16),
        (trt.int32, np.int32),
        (trt.int64, np.int64),
        (trt.bool, np.bool_),
    )
    for trt_type, np_type in staged:
        if trt_dtype == trt_type:
            return np.dtype(np_type)
    if trt_dtype == trt.bfloat16:
        raise EF.EngineFileError(
            f"{where} is BF16 at the engine's inputs / outputs; NumPy has no bfloat16, so "
            "this runtime cannot stage it (build the engine with FP32 or FP16 I/O)"
        )
    raise EF.EngineFileError(
        f"{where} has TensorRT dtype {trt_dtype}, which this runtime does not stage (FLOAT, HALF, INT32, INT64 or BOOL)"
    )


class HostDeviceBuffer:
    """Pinned host staging memory and device memory of the same size, owned together.

    shape: the largest shape the buffer must hold; dtype: NumPy dtype of its elements. The
    device memory is on the current device of the calling thread. ``free()`` (also on garbage
    collection) releases both. Not thread-safe: one owner (a runner) uses it.
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
        """The first prod(shape) elements of the pinned staging memory, as ``dtype``."""
        n = int(np.prod(shape)) * self.dtype.itemsize
        if n > self.capacity:
            raise ValueError(f"shape {tuple(shape)} needs {n} bytes, buffer holds {self.capacity}")
        return self._host_bytes[:n].view(self.dtype).reshape(shape)

    def _stage(self, array: np.ndarray) -> int:
        """Copy ``array`` into pinned memory, cast to ``dtype`` in the same pass; its byte count."""
        array = np.asarray(array)
        view = self.host_view(array.shape)
        np.copyto(view, array, casting="unsafe")
        return view.nbytes

    def upload(self, array: np.ndarray, stream) -> None:
        """Stage ``array`` (cast to ``dtype``) in pinned memory and enqueue its host->device
        copy on ``stream``."""
        n = self._stage(array)
        _check(
            self.cudart.cudaMemcpyAsync(
                self.device, self.host, n, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream
            ),
            "cudaMemcpyAsync(H2D)",
        )

    def download(self, shape, stream) -> None:
        """Enqueue the device->host copy of the first prod(shape) elements on ``stream``."""
        n = int(np.prod(shape)) * self.dtype.itemsize
        _check(
            self.cudart.cudaMemcpyAsync(
                self.host, self.device, n, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream
            ),
            "cudaMemcpyAsync(D2H)",
        )

    def upload_sync(self, array: np.ndarray) -> int:
        """Synchronous upload (the INT8 calibrator); returns the device address."""
        n = self._stage(array)
        _check(
            self.cudart.cudaMemcpy(self.device, self.host, n, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice),
            "cudaMemcpy(H2D)",
        )
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


class TrtRunner(Runner):
    """One engine on device ``device_id``: execution context, stream, event, I/O buffers sized
    for the profile maxima in the engine's dtypes, CUDA graphs for the input shapes in
    ``graph_shapes`` (tuples of every input's shape).

    resident_input: an input kept on the device between calls (the decoder's
    ``image_embeddings``): not uploaded again when ``infer`` gets the same array object with
    the same shape as the last upload (``forget_resident`` drops it). The runner holds a
    reference to that array until then.
    """

    def __init__(
        self,
        spec: S.ModelSpec,
        trt,
        engine,
        path: str | os.PathLike,
        device_id: int = 0,
        graph_shapes=(),
        resident_input: str | None = None,
    ) -> None:
        super().__init__(spec)
        self.cudart = _cudart()
        self.trt, self.engine, self.path, self.device_id = trt, engine, Path(path), device_id
        self.context = self.stream = self.done = None
        self.buffers: dict[str, HostDeviceBuffer] = {}
        self.graphs: dict[tuple, tuple] = {}
        self.graph_shapes = set(graph_shapes)
        self.last_key = None
        self.resident_input = resident_input
        self._resident: tuple[np.ndarray, tuple] | None = None
        _set_device(device_id)
        self.dtypes = self._check_io()
        try:
            self.context = engine.create_execution_context()
            if self.context is None:
                raise TrtUnavailable(f"{path}: could not create an execution context (out of GPU memory?)")
            self.stream = _check(
                self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
            )
            self.done = _check(
                self.cudart.cudaEventCreateWithFlags(self.cudart.cudaEventDisableTiming), "cudaEventCreateWithFlags"
            )
            for t in spec.inputs + spec.outputs:
                self.buffers[t.name] = HostDeviceBuffer(t.dims("max"), self.dtypes[t.name])
                if not self.context.set_tensor_address(t.name, self.buffers[t.name].device):
                    raise TrtUnavailable(f"{path}: set_tensor_address({t.name!r}) failed")
        except BaseException:
            self.close()
            raise

    def _check_io(self) -> dict[str, np.dtype]:
        """Check the engine's I/O names and profile against the spec; the NumPy dtype of each
        I/O tensor."""
        trt, eng = self.trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(self.spec.input_names) or sorted(outputs) != sorted(self.spec.output_names):
            raise EF.EngineFileError(
                f"{self.path}: engine I/O {inputs} -> {outputs} does not match its spec "
                f"{self.spec.input_names} -> {self.spec.output_names}"
            )
        for t in self.spec.inputs:
            mn, op, mx = (tuple(s) for s in eng.get_tensor_profile_shape(t.name, 0))
            if mn != t.dims("min") or mx != t.dims("max"):
                raise EF.EngineFileError(
                    f"{self.path}: profile of {t.name!r} is {mn}..{mx}, the header spec says "
                    f"{t.dims('min')}..{t.dims('max')}"
                )
        return {n: numpy_dtype(trt, eng.get_tensor_dtype(n), f"{self.path}: tensor {n!r}") for n in names}

    def forget_resident(self) -> None:
        """Upload ``resident_input`` on the next call whatever array it gets."""
        self._resident = None  # one assignment: safe without the lock

    def _upload(self, name: str, array: np.ndarray) -> None:
        self.buffers[name].upload(array, self.stream)
        if not self.context.set_input_shape(name, tuple(array.shape)):
            raise RuntimeError(f"{self.path}: set_input_shape({name!r}, {tuple(array.shape)}) rejected")

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Upload, execute, download on this runner's stream; the outputs (new arrays in the
        spec's dtypes) in spec order."""
        _set_device(self.device_id)  # this thread may never have used the device
        for t in self.spec.inputs:
            a = feeds[t.name]
            if t.name == self.resident_input:
                kept = self._resident
                if kept is not None and kept[0] is a and kept[1] == a.shape:
                    continue  # on the device already, with its input shape set
                self._resident = None
                self._upload(t.name, a)
                self._resident = (a, a.shape)
            else:
                self._upload(t.name, a)
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
        return [self.buffers[t.name].host_view(s).astype(t.np_dtype) for t, s in zip(self.spec.outputs, shapes)]

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
            _check(
                cudart.cudaStreamBeginCapture(
                    self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
                ),
                "cudaStreamBeginCapture",
            )
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

    def close(self) -> None:
        """Free the graphs, buffers, event, stream, context and engine (waits for a running call)."""
        with self.lock:
            cudart = self.cudart
            try:
                _set_device(self.device_id)
            except CudaError:
                pass  # release what can be released
            for graph, exe in self.graphs.values():
                cudart.cudaGraphExecDestroy(exe)
                cudart.cudaGraphDestroy(graph)
            self.graphs.clear()
            self.last_key = None
            self._resident = None
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
            self.engine = None


class TrtBackend(Backend):
    """Runs the engines in ``engine_dir`` (``cellsam-trt build``) on CUDA device ``device_id``.

    decode_chunk: prompts per decoder call (default and maximum: the decoder engine's max N).
    cuda_graphs: capture the encoder / CellFinder at batch 1 into CUDA graphs.
    strict_gpu_name: refuse engines built on another GPU model of the same architecture.
    The encoder and decoder engines are loaded here, the CellFinder's on first use.
    """

    name = "trt"

    def __init__(
        self,
        engine_dir: str | os.PathLike,
        device_id: int = 0,
        decode_chunk: int | None = None,
        cuda_graphs: bool = True,
        strict_gpu_name: bool = True,
    ) -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise TrtUnavailable("TensorRT is not installed (pip install 'cellsam-trt[trt]')") from e
        self.engine_dir = Path(engine_dir)
        self.device_id = device_id
        self.facts = runtime_facts(device_id)
        self.headers = check_engine_dir(self.engine_dir, self.facts, strict_gpu_name)
        super().__init__({m: S.ModelSpec.from_dict(h["spec"]) for m, h in self.headers.items()})
        self.device = f"cuda:{device_id}"
        self.precision = self.headers[S.ENCODER].get("precision", self.precision)
        self.adv_mode = bool(self.headers[S.ENCODER].get("export", {}).get("adv_mode"))
        n_max = self.specs[S.DECODER].dims()["N"].max
        self.decode_chunk = min(decode_chunk or n_max, n_max)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._cuda_graphs = cuda_graphs
        try:
            for m in (S.ENCODER, S.DECODER):
                self.runner(m)
        except BaseException:
            self.close()  # free what the first engine took
            raise

    def make_runner(self, graph: str, stream: int | None) -> TrtRunner:
        """Deserialize ``graph``'s engine on this backend's device and wrap it in a runner."""
        path = EF.engine_path(self.engine_dir, graph)
        header, blob = EF.read_engine_file(path)
        _set_device(self.device_id)  # the engine goes to the calling thread's current device
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise EF.EngineCompatError(
                str(path), ["TensorRT could not deserialize the engine"], EF.rebuild_command(header, path)
            )
        spec = self.specs[graph]
        graph_shapes = set()
        if self._cuda_graphs and graph in (S.ENCODER, S.CELLFINDER):
            graph_shapes.add(((1,) + tuple(spec.inputs[0].dims("opt")[1:]),))
        resident = "image_embeddings" if graph == S.DECODER else None
        return TrtRunner(spec, self._trt, engine, path, self.device_id, graph_shapes, resident)

    def decode_chunks(self, *args, **kwargs):
        """``Backend.decode_chunks`` (same arguments). The decoder runner's kept embedding is
        dropped first, so the embedding is uploaded once per call and reused by its chunks."""
        self.runner(S.DECODER).forget_resident()
        yield from super().decode_chunks(*args, **kwargs)
