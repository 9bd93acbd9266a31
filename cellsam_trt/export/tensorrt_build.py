"""TensorRT 10.3+ / 11.x engines from an export directory: a pure build plan, then a thin builder.

The precision is decided in the ONNX graph (``export.precision``: FP16 / BF16 graphs with FP32
islands, INT8 as Q/DQ), and the network is strongly typed
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): TensorRT keeps every tensor in the type
the graph gives it. No builder precision flag and no per-layer precision is set; those are
deprecated since TensorRT 10.12 and gone in 11.x, where strong typing is the only mode (the
flag is still accepted there). TensorRT 10.3 (JetPack 6) already has the flag.

``plan_build(spec, options, gpu, ...)`` computes a ``BuildPlan`` without TensorRT: which graph
file (the FP32 export or its annotated form), the optimization profile (every dynamic ``Dim``
at min / opt / max, overridable), the network flag, TF32 (off unless asked: TF32 rounds FP32
matmul inputs to 10 mantissa bits), the workspace limit, the timing cache and the target
TensorRT version's notes. ``build_engine(plan)`` is the only part that calls TensorRT; it writes
an engine container (``engine_file``) whose header records the TensorRT version, GPU, profile,
precision, ONNX sha256 and spec.

TensorRT Python API used (names checked against the bindings of 10.3.0, 10.13.3.9 and
11.4.0.106 by ``tests/test_trt_api_names.py``; calls from the Python API pages infer/Core/
Builder, NetworkConfig, OptimizationProfile, TimingCache and parsers/Onnx/pyOnnx):
``Logger(Logger.WARNING)``, ``Builder(logger)``, ``Builder.create_network(1 << int(
NetworkDefinitionCreationFlag.STRONGLY_TYPED))``, ``OnnxParser(network, logger)
.parse_from_file(path)`` / ``num_errors`` / ``get_error(i)``, ``INetworkDefinition.num_inputs``
/ ``get_input(i).name``, ``Builder.create_builder_config()``,
``IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``, ``set_flag`` /
``clear_flag(BuilderFlag.TF32)``, ``builder_optimization_level``,
``Builder.create_optimization_profile()``, ``IOptimizationProfile.set_shape(name, min, opt,
max)``, ``add_optimization_profile``, ``create_timing_cache(bytes)`` (empty bytes: a new
cache), ``set_timing_cache(cache, ignore_mismatch)`` (False when the cache does not fit),
``get_timing_cache().serialize()``, ``Builder.build_serialized_network(network, config)``
(None on failure).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..runtime import engine_file as EF
from ..runtime import specs as S
from ..runtime.engine_file import GpuFacts
from . import precision as P

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
GIB = 1 << 30
DEFAULT_WORKSPACE_CAP = 4 * GIB
TIMING_CACHE_NAME = "timing.cache"
# the TensorRT releases this builder is written for: the lowest (JetPack 6) and the majors
MIN_TENSORRT = (10, 3)
MAX_TENSORRT_MAJOR = 11
# what ``build --dry-run`` plans for when TensorRT is not installed
DRY_RUN_VERSIONS = ("11.4", "10.13", "10.3")


class PlanError(ValueError):
    """Options that cannot be built for this model / GPU / TensorRT; the message says what to change."""


class BuildError(RuntimeError):
    """TensorRT is missing or failed (parse or build); the message carries TensorRT's errors."""


@dataclass(frozen=True)
class BuildOptions:
    """What ``cellsam-trt build`` was asked for. None = derive from the spec / GPU.

    precision: "fp32", "fp16", "bf16" or "int8" (the export must hold the annotated graphs:
      ``cellsam-trt export --annotate-only --precision P``); "fp8" is refused.
    max_batch / opt_batch: batch bounds (B) of the image encoder and CellFinder profiles.
    max_prompts / opt_prompts: prompts per decoder call (N); max_points: points per prompt (P).
    workspace_gib: WORKSPACE pool limit (default min(4 GiB, a quarter of the GPU memory)).
    timing_cache: timing-cache file, read if present and written after each build
      (default ``<out>/timing.cache``); no_timing_cache: do neither.
    tf32: allow TF32 for FP32 matmuls / convolutions. optimization_level: builder level 0..5.
    """

    precision: str = "fp16"
    max_batch: int | None = None
    opt_batch: int | None = None
    max_prompts: int | None = None
    opt_prompts: int | None = None
    max_points: int | None = None
    workspace_gib: float | None = None
    timing_cache: str | None = None
    no_timing_cache: bool = False
    tf32: bool = False
    optimization_level: int = 3

    def to_argv(self, onnx_dir: str, out_dir: str) -> list[str]:
        """The ``cellsam-trt build`` command line that reproduces these options."""
        argv = ["cellsam-trt", "build", "--onnx", str(onnx_dir), "--out", str(out_dir), "--precision", self.precision]
        for flag, value in (
            ("--max-batch", self.max_batch),
            ("--opt-batch", self.opt_batch),
            ("--max-prompts", self.max_prompts),
            ("--opt-prompts", self.opt_prompts),
            ("--max-points", self.max_points),
            ("--workspace-gib", self.workspace_gib),
            ("--timing-cache", self.timing_cache),
        ):
            if value is not None:
                argv += [flag, str(value)]
        if self.no_timing_cache:
            argv.append("--no-timing-cache")
        if self.tf32:
            argv.append("--tf32")
        if self.optimization_level != 3:
            argv += ["--optimization-level", str(self.optimization_level)]
        return argv


@dataclass(frozen=True)
class BuildPlan:
    """Everything ``build_engine`` does for one graph, decided without TensorRT.

    precision: what was asked; graph_precision: what this graph holds ("fp32", "fp16", "bf16"
      or "int8"; the decoder of an int8 build is fp16).
    onnx_path: the graph file parsed (the FP32 export or its annotated form).
    missing: None, or the command that writes the annotated graph this plan needs.
    profile: input name -> (min, opt, max) shapes (one optimization profile).
    network_flags: ``NetworkDefinitionCreationFlag`` member names; flags / clear_flags:
      ``BuilderFlag`` member names to set / clear.
    tensorrt: the TensorRT version planned for ("11.4", or the installed one); notes: what
      that version does with this plan.
    """

    model: str
    onnx_path: str
    engine_path: str
    spec: S.ModelSpec
    precision: str
    graph_precision: str
    missing: str | None
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    network_flags: tuple[str, ...]
    flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    workspace_bytes: int
    timing_cache: str | None
    optimization_level: int
    gpu: GpuFacts
    tensorrt: str
    notes: tuple[str, ...]
    build_command: tuple[str, ...]
    annotation: dict = field(default_factory=dict)
    export_info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "onnx_path": self.onnx_path,
            "engine_path": self.engine_path,
            "precision": self.precision,
            "graph_precision": self.graph_precision,
            "missing": self.missing,
            "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.profile.items()},
            "network_flags": list(self.network_flags),
            "flags": list(self.flags),
            "clear_flags": list(self.clear_flags),
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": self.timing_cache,
            "optimization_level": self.optimization_level,
            "gpu": self.gpu.to_dict(),
            "tensorrt": self.tensorrt,
            "notes": list(self.notes),
            "build_command": list(self.build_command),
            "annotation": self.annotation,
            "spec": self.spec.to_dict(),
            "export": {k: v for k, v in self.export_info.items() if k != "config"},
        }


# --------------------------------------------------------------------------- versions


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.13.3.9". PlanError if unreadable."""
    m = re.match(r"^(\d+)\.(\d+)", str(version).strip())
    if not m:
        raise PlanError(f"not a TensorRT version: {version!r} (e.g. 10.13 or 11.4.0.106)")
    return int(m.group(1)), int(m.group(2))


def check_tensorrt_version(version: str) -> tuple[int, int]:
    """(major, minor) of ``version`` when this builder supports it (10.3 to 11.x); PlanError
    naming the supported range otherwise."""
    v = parse_version(version)
    if v < MIN_TENSORRT or v[0] > MAX_TENSORRT_MAJOR:
        raise PlanError(
            f"TensorRT {version}: this builder supports TensorRT {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} to "
            f"{MAX_TENSORRT_MAJOR}.x (strongly typed networks); install one of those "
            "(pip install 'cellsam-trt[trt]'; JetPack 6 ships 10.3)"
        )
    return v


def version_notes(version: tuple[int, int], precision: str) -> tuple[str, ...]:
    """What TensorRT ``version`` does with a strongly typed plan of ``precision``."""
    notes = []
    if version[0] >= 11:
        notes.append("TensorRT 11: every network is strongly typed; the STRONGLY_TYPED flag is accepted and ignored")
    else:
        notes.append(
            f"TensorRT {version[0]}.{version[1]}: STRONGLY_TYPED network; tensor types come from the ONNX graph "
            "(no FP16 / BF16 / INT8 builder flags, no per-layer precision)"
        )
    if precision == "int8":
        notes.append("INT8 from the graph's Q/DQ nodes (explicit quantization; no calibrator)")
    return tuple(notes)


# --------------------------------------------------------------------------- planning (pure)


def override_dims(spec: S.ModelSpec, bounds: dict[str, tuple[int | None, int | None, int | None]]) -> S.ModelSpec:
    """``spec`` with the named dynamic dims replaced: name -> (min, opt, max), None keeps a value.
    opt is clamped into the new [min, max]. Raises PlanError for impossible bounds."""
    dims = spec.dims()
    new: dict[str, S.Dim] = {}
    for name, (mn, op, mx) in bounds.items():
        if name not in dims:
            continue
        d = dims[name]
        mn = d.min if mn is None else int(mn)
        mx = d.max if mx is None else int(mx)
        op = min(max(d.opt if op is None else int(op), mn), mx)
        try:
            new[name] = S.Dim(name, mn, op, mx)
        except ValueError as e:
            raise PlanError(f"{spec.name}: {e}") from e

    def swap(t: S.TensorSpec) -> S.TensorSpec:
        return replace(t, shape=tuple(new.get(d.name, d) if isinstance(d, S.Dim) else d for d in t.shape))

    return replace(spec, inputs=tuple(swap(t) for t in spec.inputs), outputs=tuple(swap(t) for t in spec.outputs))


def default_workspace(gpu: GpuFacts) -> int:
    return int(min(DEFAULT_WORKSPACE_CAP, max(GIB // 4, gpu.total_memory // 4)))


def graph_precision(model: str, precision: str) -> str:
    """The precision of the graph file a ``precision`` build of ``model`` parses."""
    if precision == "int8" and model not in P.GRAPHS["int8"]:
        return "fp16"
    return precision


def check_precision(precision: str, gpu: GpuFacts) -> None:
    """PlanError for an unknown precision, FP8, or a precision ``gpu`` lacks."""
    p = precision
    if p not in PRECISIONS:
        raise PlanError(f"precision must be one of {PRECISIONS}, got {p!r}")
    if p == "fp8":
        raise PlanError(
            "fp8 is not built: no FP8 Q/DQ graph is written (see `cellsam-trt export --precision fp8`), and "
            "TensorRT runs FP8 only on compute capability >= 8.9; use --precision int8, fp16 or bf16"
        )
    if p == "bf16" and not gpu.supports_bf16:
        raise PlanError(f"bf16 needs compute capability >= 8.0; {gpu.name} has {gpu.cc}: use --precision fp16")
    if p in ("fp16", "int8") and not gpu.supports_fast_fp16:
        raise PlanError(
            f"{p} needs fast FP16 (compute capability >= 5.3); {gpu.name} has {gpu.cc}: use --precision fp32"
        )
    if p == "int8" and not gpu.supports_int8:
        raise PlanError(f"int8 needs compute capability >= 6.1; {gpu.name} has {gpu.cc}: use --precision fp16")


def plan_build(
    spec: S.ModelSpec,
    options: BuildOptions,
    gpu: GpuFacts,
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tensorrt: str = DRY_RUN_VERSIONS[0],
    onnx_dir: str | os.PathLike | None = None,
    missing: str | None = None,
    annotation: dict | None = None,
    export_info: dict | None = None,
) -> BuildPlan:
    """The build plan of one graph (no TensorRT, no GPU access).

    onnx_path: the graph file to parse (already the annotated one for a reduced precision).
    tensorrt: the TensorRT version planned for (checked: 10.3 to 11.x).
    missing: the command that writes ``onnx_path`` when it does not exist yet.
    annotation / export_info: the manifest's record of the annotated graph and the export's
    ``adv_mode`` / ``has_detector`` / ``onnx_sha256`` (recorded in the header).
    Raises PlanError for an unknown precision or one the GPU lacks, FP8, an unsupported
    TensorRT version, bad bounds or a bad workspace / optimization level.
    """
    check_precision(options.precision, gpu)
    version = check_tensorrt_version(tensorrt)
    if not 0 <= options.optimization_level <= 5:
        raise PlanError(f"optimization level must be 0..5, got {options.optimization_level}")
    out_dir = Path(out_dir)
    bounds = {
        "B": (None, options.opt_batch, options.max_batch),
        "N": (None, options.opt_prompts, options.max_prompts),
        "P": (None, None, options.max_points),
    }
    spec = override_dims(spec, bounds)
    if options.workspace_gib is not None:
        if options.workspace_gib <= 0:
            raise PlanError("--workspace-gib must be > 0")
        workspace = int(options.workspace_gib * GIB)
    else:
        workspace = default_workspace(gpu)
    timing = None
    if not options.no_timing_cache:
        timing = str(Path(options.timing_cache) if options.timing_cache else out_dir / TIMING_CACHE_NAME)
    argv = options.to_argv(str(onnx_dir if onnx_dir is not None else Path(onnx_path).parent), str(out_dir))
    return BuildPlan(
        model=spec.name,
        onnx_path=str(onnx_path),
        engine_path=str(EF.engine_path(out_dir, spec.name)),
        spec=spec,
        precision=options.precision,
        graph_precision=graph_precision(spec.name, options.precision),
        missing=missing,
        profile=S.profile_shapes(spec),
        network_flags=("STRONGLY_TYPED",),
        flags=("TF32",) if options.tf32 else (),
        clear_flags=() if options.tf32 else ("TF32",),
        workspace_bytes=workspace,
        timing_cache=timing,
        optimization_level=int(options.optimization_level),
        gpu=gpu,
        tensorrt=str(tensorrt),
        notes=version_notes(version, options.precision),
        build_command=tuple(argv),
        annotation=dict(annotation or {}),
        export_info=dict(export_info or {}),
    )


def plan_export(
    onnx_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: BuildOptions,
    gpu: GpuFacts,
    models: Sequence[str] | None = None,
    tensorrt: str = DRY_RUN_VERSIONS[0],
) -> list[BuildPlan]:
    """Plans for the graphs of an export directory (its ``manifest.json`` specs).

    models: which graphs (default: the image encoder, decoder and CellFinder in the export).
    A reduced precision parses the annotated graph of the manifest
    (``models[graph]["annotated"][precision]``); where it is absent, or was made from another
    FP32 graph, the plan's ``missing`` names the ``cellsam-trt export`` command that writes it.
    """
    from ..runtime.manifest import read_manifest

    check_precision(options.precision, gpu)
    manifest = read_manifest(onnx_dir)
    entries = manifest["models"]
    names = list(models) if models else [m for m in S.MODEL_NAMES if m in entries]
    unknown = [m for m in names if m not in entries]
    if unknown:
        raise PlanError(f"{onnx_dir}: the export has no {unknown} graph (has {sorted(entries)})")
    info = {
        "adv_mode": bool(manifest["adv_mode"]),
        "has_detector": bool(manifest.get("has_detector", False)),
        "config": manifest.get("config"),
    }
    plans = []
    for m in names:
        entry = entries[m]
        gp = graph_precision(m, options.precision)
        path = Path(onnx_dir) / entry["file"]
        record: dict = {}
        missing = None
        sha = entry.get("sha256")
        if gp != "fp32":
            record = dict(entry.get("annotated", {}).get(gp, {}))
            path = Path(onnx_dir) / (record.get("file") or P.annotated_file(m, gp))
            if not record or record.get("source_sha256") != entry.get("sha256") or not path.is_file():
                ask = options.precision
                calib = " --calib-images DIR" if ask == "int8" else ""
                missing = f"cellsam-trt export --annotate-only --out {onnx_dir} --precision {ask}{calib}"
            sha = record.get("sha256")
        plans.append(
            plan_build(
                S.ModelSpec.from_dict(entry["spec"]),
                options,
                gpu,
                path,
                out_dir,
                tensorrt=tensorrt,
                onnx_dir=onnx_dir,
                missing=missing,
                annotation=record,
                export_info=dict(info, onnx_sha256=sha),
            )
        )
    return plans


def engine_header(plan: BuildPlan, tensorrt_version: str, onnx_sha256: str | None) -> dict:
    """The JSON header of an engine built from ``plan`` (``engine_file`` adds the engine hash)."""
    return {
        "format": "cellsam-trt-engine",
        "cellsam_trt": __version__,
        "model": plan.model,
        "tensorrt_version": tensorrt_version,
        "gpu": plan.gpu.to_dict(),
        "precision": plan.precision,
        "graph_precision": plan.graph_precision,
        "strongly_typed": True,
        "profiles": [{k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in plan.profile.items()}],
        "annotation": plan.annotation,
        "flags": list(plan.flags),
        "workspace_bytes": plan.workspace_bytes,
        "onnx_file": Path(plan.onnx_path).name,
        "onnx_sha256": onnx_sha256,
        "onnx_dir": str(Path(plan.onnx_path).parent),
        "spec": plan.spec.to_dict(),
        "export": {k: v for k, v in plan.export_info.items() if k != "config"},
        "config": plan.export_info.get("config"),
        "build_command": list(plan.build_command),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ------------------------------------------------- calibration helpers (kept for openvino_int8)


def calibration_files(image_dir: str | os.PathLike, max_images: int) -> list[Path]:
    """``precision.calibration_files`` raising PlanError (the callers of this module catch it)."""
    try:
        return P.calibration_files(image_dir, max_images)
    except P.PrecisionError as e:
        raise PlanError(str(e)) from None


calibration_batches = P.calibration_batches
model_input = P.model_input


# --------------------------------------------------------------------------- the TensorRT part


def require_tensorrt():
    """The ``tensorrt`` module, when it is installed and a supported version (BuildError)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BuildError(
            "TensorRT is not installed (pip install 'cellsam-trt[trt]' on a machine with an NVIDIA GPU and driver)"
        ) from e
    try:
        check_tensorrt_version(str(trt.__version__))
    except PlanError as e:
        raise BuildError(str(e)) from None
    return trt


def build_engine(plan: BuildPlan, log: Callable[[str], None] | None = None) -> Path:
    """Build and write the engine of ``plan`` (TensorRT 10.3+ / 11.x and a CUDA GPU); its path."""
    say = log or (lambda m: None)
    if plan.missing:
        raise BuildError(
            f"{plan.model}: no {plan.graph_precision} graph {plan.onnx_path}; write it with: {plan.missing}"
        )
    trt = require_tensorrt()
    from ..model.checkpoint import sha256_file

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(plan.onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{plan.onnx_path}: the TensorRT ONNX parser failed: " + "; ".join(errors))
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != plan.spec.input_names:
        raise BuildError(f"{plan.onnx_path}: network inputs {inputs} differ from the spec {plan.spec.input_names}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if "TF32" in plan.flags:
        config.set_flag(trt.BuilderFlag.TF32)
    if "TF32" in plan.clear_flags:
        config.clear_flag(trt.BuilderFlag.TF32)
    config.builder_optimization_level = plan.optimization_level
    profile = builder.create_optimization_profile()
    for name, (mn, op, mx) in plan.profile.items():
        profile.set_shape(name, mn, op, mx)
    config.add_optimization_profile(profile)

    cache = None
    if plan.timing_cache:
        raw = Path(plan.timing_cache).read_bytes() if Path(plan.timing_cache).is_file() else b""
        cache = config.create_timing_cache(raw)
        if not config.set_timing_cache(cache, False):  # cache from another device: start afresh
            say(f"timing cache {plan.timing_cache} does not match this GPU; starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)

    say(f"building {plan.engine_path} ({plan.graph_precision} graph, strongly typed; this takes minutes) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{plan.model}: TensorRT could not build the engine (see the TensorRT log above)")
    if cache is not None:
        Path(plan.timing_cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(plan.timing_cache + ".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, plan.timing_cache)
    header = engine_header(
        plan, str(trt.__version__), plan.export_info.get("onnx_sha256") or sha256_file(plan.onnx_path)
    )
    path = EF.write_engine_file(plan.engine_path, header, serialized)
    say(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def build_export(
    onnx_dir,
    out_dir,
    options: BuildOptions,
    models: Sequence[str] | None = None,
    device_id: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Plan and build every engine of an export directory on GPU ``device_id`` with the
    installed TensorRT. BuildError when TensorRT is missing or an annotated graph is."""
    from ..engine.trt_backend import query_gpu

    trt = require_tensorrt()  # say "TensorRT is not installed" before anything else
    gpu = query_gpu(device_id)
    plans = plan_export(onnx_dir, out_dir, options, gpu, models, tensorrt=str(trt.__version__))
    missing = sorted({p.missing for p in plans if p.missing})
    if missing:
        raise BuildError(
            f"{onnx_dir}: the export has no {options.precision} graphs for "
            f"{', '.join(p.model for p in plans if p.missing)}; write them with: {missing[0]}"
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = [build_engine(p, log) for p in plans]
    summary = {"engines": [p.name for p in paths], "plans": [p.to_dict() for p in plans]}
    (Path(out_dir) / "build_plan.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return paths
