"""OpenVINO backend: runs an export directory (``cellsam-trt export``) on the CPU with OpenVINO.

One ``OvRunner`` per graph on the shared base (``engine.base``: spec checks, batching, prompt
layout, decode chunks, the split decoder). The graphs are read from the export's ONNX files
once and kept beside them as OpenVINO IR (``<export>/openvino/<graph>.xml`` + ``.bin``, FP32
weights, stamped in ``openvino/ir.json`` with the sha256 of the ONNX file they came from: an IR
of another export is converted again); compiled models go to OpenVINO's model cache
(``CACHE_DIR``, default ``<export>/openvino/cache``), so a second start skips conversion and
compilation. An export directory that cannot be written runs from the ONNX files, uncached
(logged once).

Precision (``OvConfig.precision``) is OpenVINO's ``INFERENCE_PRECISION_HINT``, always set
explicitly (OpenVINO's own CPU default is bf16 on CPUs with AMX and f16 on ARM, not f32):

* ``fp32``: f32 everywhere (the exact path; the default).
* ``bf16`` / ``fp16``: only where the CPU reports the capability natively (OpenVINO's
  ``OPTIMIZATION_CAPABILITIES`` lists ``BF16`` / ``FP16``: AVX-512 BF16 or AMX, ARM FP16).
  Elsewhere OpenVINO would silently run f32, so the request is refused with a ``BackendError``;
  after compiling, the precision the compiled model reports is checked against the request.
* ``int8``: the image encoder and CellFinder from NNCF post-training-quantized IR
  (``<export>/openvino/<graph>.int8.xml``, made by ``cellsam_trt.export.openvino_int8``); the
  decoder runs f32 (``decoder_precision``). INT8 kernels use AMX / AVX-512 VNNI / AVX-VNNI
  where present, plain AVX2 / AVX-512 integer arithmetic elsewhere (slower, same results).

Arrays in and out are NumPy float32 (shapes: ``runtime.specs``); outputs are copies, safe to
keep after the next call.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime import specs as S
from ..runtime.manifest import read_manifest
from .base import Backend, BackendError, Runner

log = logging.getLogger("cellsam_trt")

IR_DIR = "openvino"  # beside the ONNX files of an export
IR_INDEX = "ir.json"  # {file stem: {"onnx_sha256", "openvino", ...}}
HINTS = ("latency", "throughput")
# our precision name -> (OpenVINO element type name, the OPTIMIZATION_CAPABILITIES entry it needs)
_PRECISIONS = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16"), "int8": ("f32", "INT8")}
INT8_GRAPHS = (S.ENCODER, S.CELLFINDER)


@dataclass
class OvConfig:
    """How the graphs are compiled.

    precision: "fp32", "bf16", "fp16" or "int8" (see the module doc); decoder_precision: the
      decoder graphs' precision (None: ``precision``, fp32 under int8).
    threads: ``INFERENCE_NUM_THREADS`` of every graph (0 = OpenVINO's default, the cores).
    performance_hint: "latency" (one inference stream per graph, all threads on one call) or
      "throughput" (OpenVINO's streams; concurrent calls on one graph run in parallel, each
      on a share of the threads).
    cache_dir: OpenVINO's compiled-model cache; None = ``<export>/openvino/cache``, "" = none.
    save_ir: keep the ONNX graphs as OpenVINO IR beside the export (read instead of the ONNX).
    split_decoder: run ``prompt_context`` + ``context_decoder`` instead of ``prompt_decoder``;
      None = where the export has them.
    decode_chunk: prompts per decoder call; 0 = 1 for the split decoder, 16 for the whole one.
    decode_streams: concurrent ``context_decoder`` calls a ``decode`` spreads its chunks over
      (OpenVINO streams of one compiled model, threads shared out); 0 = 2 for the split
      decoder when there are 2 threads or more, else 1.
    """

    precision: str = "fp32"
    decoder_precision: str | None = None
    threads: int = 0
    performance_hint: str = "latency"
    cache_dir: str | os.PathLike | None = None
    save_ir: bool = True
    split_decoder: bool | None = None
    decode_chunk: int = 0
    decode_streams: int = 0


def _cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_capabilities(core=None) -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU (e.g. ["FP32", "INT8", "BIN", ...])."""
    import openvino as ov
    import openvino.properties.device as device_props

    return list((core or ov.Core()).get_property("CPU", device_props.capabilities))


def precision_problem(precision: str, capabilities: list[str]) -> str | None:
    """Why ``precision`` cannot run natively on a CPU with these capabilities (None: it can)."""
    if precision not in _PRECISIONS:
        return f"OpenVINO runs fp32, bf16, fp16 or int8, not {precision!r}"
    need = _PRECISIONS[precision][1]
    if need in capabilities:
        return None
    return (
        f"{precision} on this CPU: OpenVINO reports no native {need} (OPTIMIZATION_CAPABILITIES: "
        f"{', '.join(capabilities)}) and would run it as f32; ask for fp32"
        + (" or int8" if "INT8" in capabilities else "")
    )


class OvRunner(Runner):
    """One compiled model and its inference requests (one per concurrent call it allows)."""

    def __init__(self, spec: S.ModelSpec, compiled, requests: int = 1) -> None:
        super().__init__(spec)
        self.compiled = compiled
        self._ports = [compiled.output(n) for n in spec.output_names]
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, requests)):
            self._pool.put(compiled.create_infer_request())

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """{input name: array} -> outputs (NumPy copies) in ``spec.output_names`` order; as many
        calls run at once as the runner has requests (one under the latency hint)."""
        self.spec.check_inputs(feeds)
        return self.infer_impl(feeds)

    def infer_impl(self, feeds):
        req = self._pool.get()
        try:
            res = req.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_inputs=True)
            return [np.array(res[p], copy=True) for p in self._ports]
        finally:
            self._pool.put(req)

    def close(self) -> None:
        self._pool = queue.SimpleQueue()
        self.compiled = None


class OvBackend(Backend):
    """Runs the graphs of an export directory with OpenVINO on the CPU (``OvConfig``)."""

    name = "openvino"

    def __init__(self, model_dir: str | os.PathLike, config: OvConfig | None = None, **overrides) -> None:
        cfg = config or OvConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown OvBackend option {k!r}")
            setattr(cfg, k, v)
        if cfg.performance_hint not in HINTS:
            raise ValueError(f"performance_hint must be one of {HINTS}, got {cfg.performance_hint!r}")
        if cfg.decode_chunk < 0 or cfg.decode_streams < 0 or cfg.threads < 0:
            raise ValueError("threads, decode_chunk and decode_streams must be >= 0 (0: the default)")
        import openvino as ov

        self.config = cfg
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        super().__init__({k: S.ModelSpec.from_dict(v["spec"]) for k, v in self.manifest["models"].items()})
        self.adv_mode = bool(self.manifest["adv_mode"])
        self.core = ov.Core()
        self.capabilities = cpu_capabilities(self.core)
        self.precision = cfg.precision
        self.decoder_precision = cfg.decoder_precision or ("fp32" if cfg.precision == "int8" else cfg.precision)
        if self.decoder_precision == "int8":
            raise BackendError("the decoder runs fp32, bf16 or fp16, not int8")
        for p in {self.precision, self.decoder_precision}:
            problem = precision_problem(p, self.capabilities)
            if problem:
                raise BackendError(problem)
        self.ir_dir = self.model_dir / IR_DIR
        if cfg.precision == "int8":
            missing = [g for g in INT8_GRAPHS if g in self.specs and not self._int8_ir_ok(g)]
            if missing:
                raise BackendError(
                    f"{self.model_dir}: no OpenVINO INT8 model of {', '.join(missing)} for this export "
                    f"(cellsam-trt quantize --model {self.model_dir} --calib-images DIR)"
                )
        has_split = all(k in self.specs for k in S.CONTEXT_GRAPHS)
        if cfg.split_decoder and not has_split:
            raise BackendError(
                f"{self.model_dir}: the export has no split decoder ({', '.join(S.CONTEXT_GRAPHS)}); "
                "export it again with this version"
            )
        self.split_decoder = has_split if cfg.split_decoder is None else bool(cfg.split_decoder)
        self.decode_chunk = cfg.decode_chunk or (1 if self.split_decoder else 16)
        budget = cfg.threads or _cpu_count()
        if not self.split_decoder:
            self.decode_streams = 1
        else:
            self.decode_streams = cfg.decode_streams or (2 if budget >= 2 else 1)
        self.cache_dir = self._cache_dir()
        self._compiled: dict[str, object] = {}
        self._compile_lock = threading.Lock()
        self.sources: dict[str, str] = {}  # graph -> the file it was compiled from

    # -- files ---------------------------------------------------------------------------------
    def _writable(self) -> bool:
        try:
            self.ir_dir.mkdir(exist_ok=True)
        except OSError:
            return False
        return os.access(self.ir_dir, os.W_OK)

    def _cache_dir(self) -> str | None:
        cache = self.config.cache_dir
        if cache is not None:
            return str(cache) or None
        if not self._writable():
            log.warning("cellsam_trt: %s is read-only: OpenVINO runs without its model cache", self.model_dir)
            return None
        return str(self.ir_dir / "cache")

    def _index(self) -> dict:
        try:
            return json.loads((self.ir_dir / IR_INDEX).read_text())
        except (OSError, ValueError):
            return {}

    def _int8_ir_ok(self, graph: str) -> bool:
        entry = self._index().get(f"{graph}.int8", {})
        sha = self.manifest["models"][graph].get("sha256")
        return bool(entry) and entry.get("onnx_sha256") == sha and (self.ir_dir / f"{graph}.int8.xml").is_file()

    def _source(self, graph: str) -> Path:
        """The file ``graph`` is compiled from: its INT8 IR, its FP32 IR (converted from the
        ONNX now if absent or stale and the directory is writable), or the ONNX file."""
        entry = self.manifest["models"][graph]
        if self.precision == "int8" and graph in INT8_GRAPHS:
            return self.ir_dir / f"{graph}.int8.xml"
        onnx_path = self.model_dir / entry["file"]
        xml = self.ir_dir / f"{graph}.xml"
        sha = entry.get("sha256")
        if sha and self._index().get(graph, {}).get("onnx_sha256") == sha and xml.is_file():
            return xml
        if not (self.config.save_ir and sha and self._writable()):
            return onnx_path
        write_ir(self.core.read_model(str(onnx_path)), self.ir_dir, graph, {"onnx_sha256": sha})
        return xml

    # -- runners -------------------------------------------------------------------------------
    def _properties(self, graph: str, streams: int | None) -> dict:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        decoder = graph in (S.DECODER, *S.CONTEXT_GRAPHS)
        precision = self.decoder_precision if decoder else self.precision
        cfg = {
            hints.inference_precision: getattr(ov.Type, _PRECISIONS[precision][0]),
            hints.performance_mode: hints.PerformanceMode.LATENCY
            if self.config.performance_hint == "latency"
            else hints.PerformanceMode.THROUGHPUT,
        }
        if self.config.threads:
            cfg[props.inference_num_threads] = self.config.threads
        if streams:
            cfg[props.num_streams] = streams
        if self.cache_dir:
            cfg[props.cache_dir] = self.cache_dir
        return cfg

    def compiled(self, graph: str):
        """The compiled model of ``graph`` (compiled on first use; the decode streams share one)."""
        with self._compile_lock:
            if graph in self._compiled:
                return self._compiled[graph]
            import openvino.properties.hint as hints

            streams = self.decode_streams if graph == S.CONTEXT_DECODER and self.decode_streams > 1 else None
            cfg = self._properties(graph, streams)
            src = self._source(graph)
            try:
                cm = self.core.compile_model(str(src), "CPU", cfg)
            except RuntimeError as e:
                raise BackendError(f"{src}: OpenVINO cannot compile it: {str(e).splitlines()[0]}") from e
            want, got = cfg[hints.inference_precision], cm.get_property(hints.inference_precision)
            if got != want:
                raise BackendError(f"{graph}: OpenVINO compiled it for {got}, not the {want} asked for")
            self._compiled[graph] = cm
            self.sources[graph] = str(src)
            return cm

    def make_runner(self, graph: str, stream: int | None) -> OvRunner:
        """A runner of ``graph``; decode stream ``stream`` gets its own request on the shared
        compiled model; under the throughput hint a runner holds OpenVINO's optimal number
        of requests."""
        import openvino.properties as props

        cm = self.compiled(graph)
        requests = 1
        if stream is None and self.config.performance_hint == "throughput":
            requests = int(cm.get_property(props.optimal_number_of_infer_requests))
        return OvRunner(self.specs[graph], cm, requests)

    def close(self) -> None:
        super().close()
        with self._compile_lock:
            self._compiled = {}


def write_ir(model, ir_dir: str | os.PathLike, stem: str, stamp: dict) -> Path:
    """Save an ``openvino.Model`` as ``ir_dir/<stem>.xml`` + ``.bin`` (weights as they are, no
    FP16 compression) and record ``stamp`` (with the OpenVINO version) under ``stem`` in
    ``ir.json``; files are written under temporary names and renamed."""
    import openvino as ov

    d = Path(ir_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{stem}.{os.getpid()}.{threading.get_ident()}.xml"
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), d / f"{stem}.bin")
    os.replace(tmp, d / f"{stem}.xml")
    index_path = d / IR_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    index[stem] = {**stamp, "openvino": ov.get_version()}
    tmp_index = d / f".{IR_INDEX}.{os.getpid()}"
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, index_path)
    return d / f"{stem}.xml"
