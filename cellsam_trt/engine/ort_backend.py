"""ONNX Runtime backend: runs an export directory (``cellsam-trt export``) on CPU, CUDA or TensorRT.

One ``OrtRunner`` (an ``InferenceSession``) per graph on the shared base (``engine.base``: shapes,
spec checks, batching, prompt layout, decode chunks). On the CPU, where the export has them,
the split decoder runs (``specs.CONTEXT_GRAPHS``): the image side once per ``decode``, then one
prompt per call, in ``decode_streams`` concurrent single-threaded sessions, whose small working
set stays in cache (``benchmarks/bench_cpu.py`` compares it with the whole decoder in chunks).
GPU providers run the whole decoder in chunks of 16. ``adv_mode`` and the graphs come from the
manifest; sessions are made on first use (the detector's only in automatic mode).

With the TensorRT execution provider first, ``precision`` "fp16" / "bf16" / "int8" runs the
export's precision-annotated graphs (``cellsam-trt export --precision P``: the same files
``cellsam-trt build`` builds from); the provider builds strongly typed engines from them when
its own FP16 / INT8 switches are off, which they are here. Without that provider those
precisions are a ``BackendError``, never a silent FP32 run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import specs as S
from ..runtime.manifest import read_manifest
from .base import Backend, BackendError, Runner

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_ALIASES = {
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_OPT_LEVELS = ("disable", "basic", "extended", "all")


class ProviderError(BackendError):
    """A requested execution provider that this onnxruntime build does not offer."""


@dataclass
class OrtConfig:
    """How the sessions are built.

    providers: "auto" (TensorRT, CUDA, CPU: those available, in that order) or a list of names
      ("trt", "cuda", "cpu" or full ORT provider names); an unavailable one is an error.
    threads: intra-op threads (0 = ONNX Runtime's default, the physical cores).
    graph_optimization: "disable", "basic", "extended" or "all".
    precision: "fp32"; "int8": the dynamic-INT8 image encoder / CellFinder of the export on the
      CPU, its Q/DQ graphs under the TensorRT provider; "fp16" / "bf16": the annotated graphs,
      TensorRT provider only.
    decode_chunk: prompts per decoder call; 0 = 1 for the split decoder on the CPU, 16 otherwise
      (memory grows ~30 MB per prompt on CPU).
    split_decoder: run ``prompt_context`` + ``context_decoder`` instead of ``prompt_decoder``;
      None = on the CPU provider when the export has them.
    decode_streams: concurrent ``context_decoder`` sessions a ``decode`` call spreads its prompt
      chunks over, each with threads / streams intra-op threads; 0 = 2 for the split decoder on
      the CPU when there are 2 threads or more, else 1.
    device_id: GPU for the CUDA / TensorRT providers.
    trt_cache_dir: where the TensorRT provider caches its engines.
    """

    providers: str | Sequence[str] = "auto"
    threads: int = 0
    graph_optimization: str = "all"
    precision: str = "fp32"
    decode_chunk: int = 0
    split_decoder: bool | None = None
    decode_streams: int = 0
    device_id: int = 0
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
            hint = " (the TensorRT provider comes with onnxruntime-gpu and the TensorRT libraries)"
            raise ProviderError(
                f"execution provider {name!r} is not available in this onnxruntime build "
                f"(available: {', '.join(available)})" + (hint if full == "TensorrtExecutionProvider" else "")
            )
        out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")  # fallback for nodes a GPU provider does not take
    return out


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


TRT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def trt_provider_options(spec: S.ModelSpec, cfg: OrtConfig) -> dict:
    """TensorRT execution-provider options for one graph: its optimization profile (min / opt /
    max shape of every input, from the spec) and the engine cache. FP16 / INT8 switches stay
    off: the precision is in the (annotated) graph and the provider builds strongly typed."""
    prof = S.profile_shapes(spec)
    opts = {
        "device_id": cfg.device_id,
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
        "trt_profile_min_shapes": ",".join(f"{k}:{_shape_str(v[0])}" for k, v in prof.items()),
        "trt_profile_opt_shapes": ",".join(f"{k}:{_shape_str(v[1])}" for k, v in prof.items()),
        "trt_profile_max_shapes": ",".join(f"{k}:{_shape_str(v[2])}" for k, v in prof.items()),
    }
    if cfg.trt_cache_dir:
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cfg.trt_cache_dir))
    return opts


class OrtRunner(Runner):
    """One ONNX Runtime session."""

    def __init__(self, spec: S.ModelSpec, session) -> None:
        super().__init__(spec)
        self.session = session

    def infer_impl(self, feeds):
        return self.session.run(self.spec.output_names, dict(feeds))

    def close(self) -> None:
        self.session = None


class OrtBackend(Backend):
    """Runs the graphs of an export directory with ONNX Runtime (``OrtConfig``)."""

    name = "ort"

    def __init__(self, model_dir: str | os.PathLike, config: OrtConfig | None = None, **overrides) -> None:
        cfg = config or OrtConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown OrtBackend option {k!r}")
            setattr(cfg, k, v)
        if cfg.precision not in TRT_PRECISIONS:
            raise BackendError(f"ONNX Runtime runs an export in {', '.join(TRT_PRECISIONS)}, not {cfg.precision!r}")
        if cfg.graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {_OPT_LEVELS}, got {cfg.graph_optimization!r}")
        if cfg.decode_chunk < 0:
            raise ValueError("decode_chunk must be >= 1 (or 0: the default)")
        if cfg.decode_streams < 0:
            raise ValueError("decode_streams must be >= 1 (or 0: the default)")
        self.config = cfg
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        super().__init__({k: S.ModelSpec.from_dict(v["spec"]) for k, v in self.manifest["models"].items()})
        self.adv_mode = bool(self.manifest["adv_mode"])
        self.precision = cfg.precision
        self.providers = resolve_providers(cfg.providers)
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        self.device = f"cuda:{cfg.device_id}" if self.on_gpu else "cpu"
        self.annotated = self.providers[0] == "TensorrtExecutionProvider" and cfg.precision != "fp32"
        if cfg.precision in ("fp16", "bf16") and not self.annotated:
            raise BackendError(
                f"{cfg.precision} runs on ONNX Runtime only through its TensorRT execution provider "
                "(onnxruntime-gpu with the TensorRT libraries; this onnxruntime has "
                f"{', '.join(available_providers())}): "
                "use precision fp32 here, or the torch / TensorRT backend"
            )
        if self.annotated:
            missing = [
                k
                for k in (S.ENCODER, S.DECODER, S.CELLFINDER)
                if k in self.specs
                and self._annotated_precision(k) not in self.manifest["models"][k].get("annotated", {})
            ]
            if missing:
                raise BackendError(
                    f"{self.model_dir}: no {cfg.precision} graphs for {missing} (write them with "
                    f"`cellsam-trt export --annotate-only --out {self.model_dir} --precision {cfg.precision}`)"
                )
        elif cfg.precision == "int8":
            missing = [
                k for k in (S.ENCODER, S.CELLFINDER) if k in self.specs and "int8" not in self.manifest["models"][k]
            ]
            if missing:
                raise BackendError(f"{self.model_dir}: no INT8 graphs for {missing} (export with --int8)")
        has_split = all(k in self.specs for k in S.CONTEXT_GRAPHS)
        if cfg.split_decoder and not has_split:
            raise BackendError(
                f"{self.model_dir}: the export has no split decoder ({', '.join(S.CONTEXT_GRAPHS)}); "
                "export it again with this version"
            )
        self.split_decoder = has_split and not self.on_gpu if cfg.split_decoder is None else bool(cfg.split_decoder)
        self.decode_chunk = cfg.decode_chunk or (1 if self.split_decoder else 16)
        budget = cfg.threads or _cpu_count()
        if not self.split_decoder:
            self.decode_streams = 1
        else:
            self.decode_streams = cfg.decode_streams or (2 if budget >= 2 and not self.on_gpu else 1)
        self._stream_threads = max(1, budget // self.decode_streams)

    def _annotated_precision(self, name: str) -> str:
        """The annotated graph a TensorRT-provider run of ``name`` uses (an int8 run's decoder: fp16)."""
        p = self.config.precision
        return "fp16" if p == "int8" and name not in (S.ENCODER, S.CELLFINDER) else p

    def _file(self, name: str) -> Path:
        entry = self.manifest["models"][name]
        if self.annotated and name in (S.ENCODER, S.DECODER, S.CELLFINDER):
            return self.model_dir / entry["annotated"][self._annotated_precision(name)]["file"]
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

    def make_runner(self, graph: str, stream: int | None) -> OrtRunner:
        """An ``InferenceSession`` of ``graph``; decode stream sessions get ``_stream_threads`` threads."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False  # the arena keeps its peak (+1.4 GB for the decoder)
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
        providers = self._provider_options(graph)
        session = ort.InferenceSession(
            str(self._file(graph)), so, providers=[p for p, _ in providers], provider_options=[o for _, o in providers]
        )
        return OrtRunner(self.specs[graph], session)
