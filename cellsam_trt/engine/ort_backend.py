"""ONNX Runtime backend: runs an export directory (``cellsam-trt export``) on CPU, CUDA or TensorRT.

Implements ``engine.base.Backend`` on NumPy float32 in the 1024 frame:

* ``encode``: (B, 3, 1024, 1024) -> (B, 256, 64, 64), split into calls of at most the spec's max B;
* ``detect``: (B, 3, 1024, 1024) -> pred_logits (B, Q, 2), pred_boxes (B, Q, 4) cxcywh in [0, 1];
* ``decode``: one embedding (1, 256, 64, 64) and N box and/or point prompts -> low-res logits
  (N, 256, 256) float32, IoU predictions (N,) float32, in calls of ``decode_chunk`` prompts;
  the prompts become the decoder graph's points-with-label-codes (``export.wrappers.prompt_tokens``).
  On the CPU, where the export has them, the split decoder runs (``specs.CONTEXT_GRAPHS``): the
  image side once per call, then one prompt per call by default, in ``decode_streams``
  concurrent streams (2 single-threaded sessions on 2 cores). Measured on a 2-core Zen 5
  (``benchmarks/bench_cpu.py``): ~18 ms per box, against ~35 ms in calls of 16 prompts of the
  whole decoder, whose per-image part is repeated per call and whose (16, 4096, 256)
  intermediates are fresh, page-faulted allocations every call (ORT's CPU arena is off); two
  single-threaded streams do not wait on each other inside every small operator, which is what
  makes the 2-thread session erratic on a shared machine (14-21 ms per box between runs).

Every call's inputs are checked against the graph's spec from the manifest
(``export.specs.InputSpecError`` names the offending input). ``adv_mode`` and ``has_detector``
come from the manifest. Sessions are created on first use (the detector's only in automatic
mode) and are safe to call from several threads.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..export import specs as S
from ..export.onnx_export import read_manifest
from ..export.wrappers import prompt_tokens

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_ALIASES = {"trt": "TensorrtExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
            "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")


class ProviderError(ValueError):
    """A requested execution provider that this onnxruntime build does not offer."""


@dataclass
class OrtConfig:
    """How the sessions are built.

    providers: "auto" (TensorRT, CUDA, CPU: those available, in that order) or a list of names
      ("trt", "cuda", "cpu" or full ORT provider names); an unavailable one is an error.
    threads: intra-op threads (0 = ONNX Runtime's default, the physical cores).
    graph_optimization: "disable", "basic", "extended" or "all".
    precision: "fp32" or "int8" (the dynamic-INT8 image encoder / CellFinder of the export, CPU).
    decode_chunk: prompts per decoder call; 0 = 1 for the split decoder on the CPU, 16 otherwise
      (memory grows ~30 MB per prompt on CPU).
    split_decoder: run ``prompt_context`` + ``context_decoder`` instead of ``prompt_decoder``;
      None = on the CPU provider when the export has them.
    decode_streams: concurrent ``context_decoder`` sessions a ``decode`` call spreads its prompt
      chunks over, each with threads / streams intra-op threads; 0 = 2 for the split decoder on
      the CPU when there are 2 threads or more, else 1.
    device_id: GPU for the CUDA / TensorRT providers.
    trt_fp16: let the TensorRT provider build FP16 engines; trt_cache_dir: where it caches them.
    """

    providers: str | Sequence[str] = "auto"
    threads: int = 0
    graph_optimization: str = "all"
    precision: str = "fp32"
    decode_chunk: int = 0
    split_decoder: bool | None = None
    decode_streams: int = 0
    device_id: int = 0
    trt_fp16: bool = False
    trt_cache_dir: str | None = None
    extra_session_options: dict = field(default_factory=dict)


def _cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(requested: str | Sequence[str] = "auto", available: Sequence[str] | None = None) -> list[str]:
    """Provider names to use, best first. "auto": the available ones among TensorRT, CUDA, CPU."""
    available = list(available if available is not None else available_providers())
    if isinstance(requested, str) and requested == "auto":
        chosen = [p for p in PROVIDER_ORDER if p in available]
        return chosen or ["CPUExecutionProvider"]
    names = [requested] if isinstance(requested, str) else list(requested)
    out = []
    for name in names:
        full = _ALIASES.get(name.lower(), name)
        if full not in available:
            raise ProviderError(f"execution provider {name!r} is not available in this onnxruntime build "
                                f"(available: {', '.join(available)})")
        out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")  # fallback for nodes a GPU provider does not take
    return out


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trt_provider_options(spec: S.ModelSpec, cfg: OrtConfig) -> dict:
    """TensorRT execution-provider options for one graph: its optimization profile (min / opt /
    max shape of every input, from the spec), FP16 and the engine cache."""
    prof = S.profile_shapes(spec)
    opts = {
        "device_id": cfg.device_id, "trt_fp16_enable": cfg.trt_fp16,
        "trt_profile_min_shapes": ",".join(f"{k}:{_shape_str(v[0])}" for k, v in prof.items()),
        "trt_profile_opt_shapes": ",".join(f"{k}:{_shape_str(v[1])}" for k, v in prof.items()),
        "trt_profile_max_shapes": ",".join(f"{k}:{_shape_str(v[2])}" for k, v in prof.items()),
    }
    if cfg.trt_cache_dir:
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cfg.trt_cache_dir))
    return opts


class OrtBackend:
    """Runs the graphs of an export directory with ONNX Runtime."""

    name = "ort"

    def __init__(self, model_dir: str | os.PathLike, config: OrtConfig | None = None, **overrides) -> None:
        cfg = config or OrtConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown OrtBackend option {k!r}")
            setattr(cfg, k, v)
        if cfg.precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', got {cfg.precision!r}")
        if cfg.graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {_OPT_LEVELS}, got {cfg.graph_optimization!r}")
        if cfg.decode_chunk < 0:
            raise ValueError("decode_chunk must be >= 1 (or 0: the default)")
        if cfg.decode_streams < 0:
            raise ValueError("decode_streams must be >= 1 (or 0: the default)")
        self.config = cfg
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        self.specs = {k: S.ModelSpec.from_dict(v["spec"]) for k, v in self.manifest["models"].items()}
        self.adv_mode = bool(self.manifest["adv_mode"])
        self.has_detector = S.CELLFINDER in self.specs
        self.providers = resolve_providers(cfg.providers)
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        if cfg.precision == "int8":
            missing = [k for k in (S.ENCODER, S.CELLFINDER) if k in self.specs and "int8" not in self.manifest["models"][k]]
            if missing:
                raise ValueError(f"{self.model_dir}: no INT8 graphs for {missing} (export with --int8)")
        has_split = all(k in self.specs for k in S.CONTEXT_GRAPHS)
        if cfg.split_decoder and not has_split:
            raise ValueError(f"{self.model_dir}: the export has no split decoder ({', '.join(S.CONTEXT_GRAPHS)}); "
                             "export it again with this version")
        self.split_decoder = has_split and not self.on_gpu if cfg.split_decoder is None else bool(cfg.split_decoder)
        self.decode_chunk = cfg.decode_chunk or (1 if self.split_decoder else 16)
        budget = cfg.threads or _cpu_count()
        if not self.split_decoder:
            self.decode_streams = 1
        else:
            self.decode_streams = cfg.decode_streams or (2 if budget >= 2 and not self.on_gpu else 1)
        self._stream_threads = max(1, budget // self.decode_streams)
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    # -- sessions ------------------------------------------------------------------------------
    def _file(self, name: str) -> Path:
        entry = self.manifest["models"][name]
        if self.config.precision == "int8" and "int8" in entry:
            return self.model_dir / entry["int8"]["file"]
        return self.model_dir / entry["file"]

    def _provider_options(self, name: str) -> list[tuple[str, dict]]:
        cfg = self.config
        out = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                out.append((p, trt_provider_options(self.specs[name], cfg)))
            elif p == "CUDAExecutionProvider":
                out.append((p, {"device_id": cfg.device_id}))
            else:
                out.append((p, {}))
        return out

    def session(self, name: str, stream: int | None = None):
        """The ORT session of graph ``name`` (created on first use); ``stream`` i: the i-th of
        the ``decode_streams`` sessions of the split decoder (``_stream_threads`` threads each)."""
        key = name if stream is None else f"{name}#{stream}"
        sess = self._sessions.get(key)
        if sess is not None:
            return sess
        with self._lock:
            if key not in self._sessions:
                if name not in self.specs:
                    raise RuntimeError(f"{self.model_dir}: the export has no {name} graph")
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.enable_cpu_mem_arena = False
                so.graph_optimization_level = {
                    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                }[self.config.graph_optimization]
                if stream is not None:
                    so.intra_op_num_threads = self._stream_threads
                elif self.config.threads:
                    so.intra_op_num_threads = self.config.threads
                for k, v in self.config.extra_session_options.items():
                    so.add_session_config_entry(k, str(v))
                providers = self._provider_options(name)
                self._sessions[key] = ort.InferenceSession(
                    str(self._file(name)), so, providers=[p for p, _ in providers],
                    provider_options=[o for _, o in providers])
            return self._sessions[key]

    def close(self) -> None:
        """Release the sessions (they are recreated on the next call)."""
        with self._lock:
            self._sessions.clear()

    def _run(self, name: str, feeds: dict[str, np.ndarray], on_device: dict | None = None,
             stream: int | None = None) -> list[np.ndarray]:
        """Check ``feeds`` against the spec and run (on decode stream ``stream``'s session when
        given). On a GPU provider the inputs are bound with I/O binding; ``on_device`` maps input
        names to OrtValues already on the device (the embedding shared by all decoder chunks),
        which replace those feeds."""
        spec = self.specs.get(name)
        if spec is None:
            raise RuntimeError(f"{self.model_dir}: the export has no {name} graph")
        spec.check_inputs(feeds)
        sess = self.session(name, stream)
        if not self.on_gpu:
            return sess.run(spec.output_names, feeds)
        binding = sess.io_binding()
        for k, v in feeds.items():
            if on_device and k in on_device:
                binding.bind_ortvalue_input(k, on_device[k])
            else:
                binding.bind_cpu_input(k, v)
        for k in spec.output_names:
            binding.bind_output(k, "cpu")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _to_device(self, x: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.config.device_id)

    def _batched(self, name: str, image: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(image, dtype=np.float32)
        spec = self.specs.get(name)
        if spec is None:
            raise RuntimeError(f"{self.model_dir}: the export has no {name} graph")
        max_b = spec.inputs[0].shape[0].max if isinstance(spec.inputs[0].shape[0], S.Dim) else 1
        if x.ndim != 4 or x.shape[0] <= max_b:
            return self._run(name, {spec.input_names[0]: x})
        parts = [self._run(name, {spec.input_names[0]: x[s:s + max_b]}) for s in range(0, x.shape[0], max_b)]
        return [np.concatenate(p) for p in zip(*parts)]

    # -- Backend protocol ----------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> np.ndarray:
        return self._batched(S.ENCODER, image)[0]

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_detector:
            raise RuntimeError("this export has no CellFinder (plain SAM): give box or point prompts")
        logits, boxes = self._batched(S.CELLFINDER, image)
        return logits, boxes

    def decode(self, embedding, boxes=None, points=None, point_labels=None):
        spec = self.specs[S.DECODER]
        coords, labels = prompt_tokens(boxes, points, point_labels)
        n = coords.shape[0]
        if n == 0:
            side = spec.outputs[0].shape[-1]
            return np.zeros((0, side, side), np.float32), np.zeros((0,), np.float32)
        emb = np.ascontiguousarray(embedding, dtype=np.float32)
        spec.check_inputs({"image_embeddings": emb, "point_coords": coords[:1], "point_labels": labels[:1]})
        if self.split_decoder:
            name = S.CONTEXT_DECODER
            context = self._run(S.PROMPT_CONTEXT, {"image_embeddings": emb})
            base = dict(zip(self.specs[name].input_names, context))
            on_device = {k: self._to_device(v) for k, v in base.items()} if self.on_gpu else None
        else:
            name, base = S.DECODER, {"image_embeddings": emb}
            on_device = {"image_embeddings": self._to_device(emb)} if self.on_gpu else None
        chunk = min(self.decode_chunk, self.specs[name].dims()["N"].max)
        starts = list(range(0, n, chunk))
        out: list = [None] * len(starts)

        def run(i: int, stream: int | None) -> None:
            s = starts[i]
            lr, iou = self._run(name, {**base, "point_coords": coords[s:s + chunk],
                                       "point_labels": labels[s:s + chunk]}, on_device, stream)
            out[i] = (lr[:, 0], iou[:, 0])

        streams = min(self.decode_streams, len(starts))
        if streams <= 1:
            for i in range(len(starts)):
                run(i, None)
        else:  # stream k takes chunks k, k + streams, ...; results in prompt order
            def stream_job(k: int) -> None:
                for i in range(k, len(starts), streams):
                    run(i, k)

            from concurrent.futures import ThreadPoolExecutor

            # threads for this call only (~0.1 ms against ~15 ms per prompt): none outlive it
            with ThreadPoolExecutor(streams, thread_name_prefix="cellsam-ort-decode") as pool:
                futures = [pool.submit(stream_job, k) for k in range(streams)]
            for f in futures:  # all have finished; the first error (if any) is raised
                f.result()
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])
