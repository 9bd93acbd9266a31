"""TensorRT 10 engines from an export directory: a pure build plan, then a thin builder.

``plan_build(spec, options, gpu, ...)`` computes a ``BuildPlan`` from the graph's ``ModelSpec``
(``runtime/specs.py``), the ``BuildOptions`` and the ``GpuFacts`` of the target GPU, without
TensorRT: the optimization profile (every dynamic ``Dim`` at min / opt / max, overridable),
the builder flags, which layers stay in FP32, the workspace limit and the cache paths. The
plan is JSON-serialisable and unit-tested on the CPU. ``build_engine(plan)`` is the only part
that calls TensorRT; it writes an engine container (``engine_file``) whose header records the
TensorRT version, GPU, profile, precision, ONNX sha256 and spec.

Precision policy
    * ``fp32``: FP32 everywhere; TF32 is switched off unless ``tf32=True`` (TF32 rounds
      matmul inputs to 10 mantissa bits, which is not "FP32-faithful").
    * ``fp16`` / ``bf16``: BuilderFlag.FP16 / BF16 plus OBEY_PRECISION_CONSTRAINTS (or
      PREFER_... with ``strict_precision=False``) and these layers pinned to FP32 (precision
      and output type): every normalization (LayerNormalization, the hand-written
      LayerNorm2d of the SAM neck, GroupNorm -> InstanceNormalization), every softmax, the
      sinusoidal positional encodings (the prompt encoder's Fourier features of the point
      coordinates reach |arguments| of tens of radians, where FP16 loses ~1e-2), and
      CellFinder's class / box heads with the inverse-sigmoid / sigmoid that produce the
      top-k inputs. ``fp32_attention=True`` also pins the attention-score products.
      BF16 needs compute capability >= 8.0.
    * ``int8``: post-training entropy calibration (IInt8EntropyCalibrator2) of the two ViT-B
      trunks (the image encoder and CellFinder's backbone); everything else runs FP16 (pinned),
      the FP32 set above stays FP32. Calibration batches are preprocessed by
      ``cellsam_trt.preprocess`` exactly as at run time; the calibration cache is reused.

TensorRT API notes. Python names, argument orders and return values were read in the
pybind11 binding sources and docstrings of NVIDIA/TensorRT v10.0.0 and v10.13.0 (see
``trt_backend``), and cross-checked with the documentation pages found by search: Python API
infer/Core/TimingCache.html and the "Optimizing Builder Performance" page of TensorRT 10.16
(createTimingCache with an empty buffer makes a new cache, setTimingCache before the build,
serialize after it), parsers/Onnx/pyOnnx.html (``parse_from_file``, ``num_errors``,
``get_error``), infer/Core/OptimizationProfile.html, the IBuilderConfig / MemoryPoolType
pages (kWORKSPACE), and include/NvInfer.h v10.0.0 (``setCalibrationProfile``; ``getBatchSize``
deprecated with implicit batch). Calls: ``Builder.create_network(0)`` (explicit batch is the only mode in TRT 10),
``OnnxParser.parse_from_file``, ``IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE,
bytes)``, ``set_flag``/``clear_flag``, ``builder_optimization_level``,
``IOptimizationProfile.set_shape(name, min, opt, max)``, ``add_optimization_profile``,
``create_timing_cache(bytes)`` / ``set_timing_cache(cache, ignore_mismatch)`` /
``get_timing_cache().serialize()``, ``int8_calibrator``, ``set_calibration_profile`` (its
MIN / MAX are overwritten by OPT), ``ILayer.precision`` / ``set_output_type``,
``Builder.build_serialized_network``. Per-layer precision and the FP16 / BF16 / INT8 builder
flags are deprecated since TensorRT 10.12 ("superseded by strong typing") but still work in
every 10.x release; TensorRT 11 removes them (checked in the v11.0 binding sources), and
``build_engine`` refuses TensorRT != 10.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__, pipeline
from .. import preprocess as pre
from ..runtime import engine_file as EF
from ..runtime import specs as S
from ..runtime.engine_file import GpuFacts

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
GIB = 1 << 30
DEFAULT_WORKSPACE_CAP = 4 * GIB
TIMING_CACHE_NAME = "timing.cache"

# Regular expressions over TensorRT layer names. The ONNX parser names each layer after its
# ONNX node (a suffix "_N" when a node makes several layers), and the exporter names nodes
# after the torch module path, e.g. "/encoder/blocks.0/norm1/LayerNormalization".
FP32_PATTERNS_COMMON = (
    r"LayerNormalization",
    r"(Instance|Group)Normalization",
    r"Softmax",
    r"/(Sin|Cos)(_\d+)?$",
)
FP32_PATTERNS_MODEL = {
    S.ENCODER: (r"/neck/neck\.[13]/",),  # LayerNorm2d written out (mean, pow, sqrt, div)
    S.DECODER: (),
    S.CELLFINDER: (r"/class_embed/", r"/bbox_embed/", r"/transformer/(Sigmoid|Log|Clip)(_\d+)?$"),
}
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")
ATTENTION_PATTERNS = (
    r"/attn/(MatMul|Mul|Add|Einsum)(_\d+)?$",  # ViT scores + decomposed rel-pos bias
    r"/(self_attn|cross_attn)/(MatMul|Mul|Div)(_\d+)?$",  # CellFinder RCDA / MHA
    r"/(self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)"
    r"(_\d+)?/(MatMul|Div|Mul)(_\d+)?$",  # mask decoder
)
# INT8 scope: the layers allowed to run INT8 (the ViT-B trunks); other compute layers are
# pinned to FP16 in an INT8 build.
INT8_SCOPE = {S.ENCODER: r"^/encoder/(patch_embed|blocks\.)", S.CELLFINDER: r"/backbone/"}
# Layers whose outputs are not float (shapes, indices) never get a precision constraint.
NON_COMPUTE_TYPES = (
    "SHAPE",
    "CONSTANT",
    "IDENTITY",
    "ASSERTION",
    "CONDITION",
    "CONDITIONAL_INPUT",
    "CONDITIONAL_OUTPUT",
    "TRIP_LIMIT",
    "ITERATOR",
    "LOOP_OUTPUT",
    "RECURRENCE",
)


class PlanError(ValueError):
    """Options that cannot be built for this model / GPU; the message says what to change."""


class BuildError(RuntimeError):
    """TensorRT failed (parse or build); the message carries TensorRT's errors."""


@dataclass(frozen=True)
class BuildOptions:
    """What ``cellsam-trt build`` was asked for. None = derive from the spec / GPU.

    precision: "fp32", "fp16", "bf16" or "int8".
    max_batch / opt_batch: batch bounds (B) of the image encoder and CellFinder profiles
      (default: the spec's; the brief's recommended range is 1..8).
    max_prompts / opt_prompts: prompts per decoder call (N); max_points: points per prompt (P).
    workspace_gib: WORKSPACE pool limit (default min(4 GiB, a quarter of the GPU memory)).
    timing_cache: timing-cache file, read if present and written after each build
      (default ``<out>/timing.cache``); no_timing_cache: do neither.
    calib_images: folder of images for INT8 calibration; calib_cache_dir: where the
      ``<model>.int8.calib`` caches live (default the output folder); calib_batch: images per
      calibration batch; calib_max_images: at most this many images are used.
    keep_fp32: extra layer-name regexes kept in FP32; fp32_attention: also the attention scores.
    strict_precision: OBEY (True) or PREFER (False) precision constraints.
    tf32: allow TF32 for FP32 layers. optimization_level: builder optimization level 0..5.
    strict_gpu_name: engines refuse to load on another GPU model of the same architecture.
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
    calib_images: str | None = None
    calib_cache_dir: str | None = None
    calib_batch: int = 1
    calib_max_images: int = 64
    keep_fp32: tuple[str, ...] = ()
    fp32_attention: bool = False
    strict_precision: bool = True
    tf32: bool = False
    optimization_level: int = 3
    strict_gpu_name: bool = True

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
            ("--calib-images", self.calib_images),
            ("--calib-cache-dir", self.calib_cache_dir),
        ):
            if value is not None:
                argv += [flag, str(value)]
        if self.precision == "int8":
            argv += ["--calib-batch", str(self.calib_batch), "--calib-max-images", str(self.calib_max_images)]
        for p in self.keep_fp32:
            argv += ["--keep-fp32", p]
        for flag, on in (
            ("--no-timing-cache", self.no_timing_cache),
            ("--fp32-attention", self.fp32_attention),
            ("--prefer-precision", not self.strict_precision),
            ("--tf32", self.tf32),
        ):
            if on:
                argv.append(flag)
        if self.optimization_level != 3:
            argv += ["--optimization-level", str(self.optimization_level)]
        return argv


@dataclass(frozen=True)
class CalibrationPlan:
    """INT8 calibration of one graph: input name, the fixed batch shape of the calibration
    profile, which preprocessing branch ("sam" or "cellfinder"), image folder and cache file."""

    input_name: str
    batch_shape: tuple[int, ...]
    branch: str
    adv_mode: bool
    image_dir: str | None
    cache_path: str
    max_images: int


@dataclass(frozen=True)
class BuildPlan:
    """Everything ``build_engine`` does for one graph, decided without TensorRT.

    profile: input name -> (min, opt, max) shapes (one optimization profile).
    flags / clear_flags: ``trt.BuilderFlag`` member names to set / clear.
    fp32_patterns, fp32_types, fp32_names: a layer stays FP32 when its name matches a
      pattern (re.search), its LayerType name is listed, or its name is one of the ONNX
      node names found by graph analysis (``onnx_fp32_nodes``).
    int8_scope: regex of the layers allowed to run INT8 (None unless precision is int8);
      other compute layers are pinned to FP16 in an INT8 build.
    """

    model: str
    onnx_path: str
    engine_path: str
    spec: S.ModelSpec
    precision: str
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    fp32_patterns: tuple[str, ...]
    fp32_types: tuple[str, ...]
    fp32_names: frozenset[str]
    int8_scope: str | None
    workspace_bytes: int
    timing_cache: str | None
    calibration: CalibrationPlan | None
    optimization_level: int
    gpu: GpuFacts
    build_command: tuple[str, ...]
    export_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p) for p in self.fp32_patterns))
        object.__setattr__(self, "_scope", re.compile(self.int8_scope) if self.int8_scope else None)

    def layer_precision(self, name: str, type_name: str) -> str | None:
        """ "fp32", "fp16" or None (no constraint) for a layer with this name and LayerType name."""
        if self.precision == "fp32" or type_name in NON_COMPUTE_TYPES:
            return None
        if name in self.fp32_names or type_name in self.fp32_types or any(p.search(name) for p in self._compiled):
            return "fp32"
        if self.precision == "int8" and self._scope is not None and not self._scope.search(name):
            return "fp16"
        return None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "onnx_path": self.onnx_path,
            "engine_path": self.engine_path,
            "precision": self.precision,
            "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.profile.items()},
            "flags": list(self.flags),
            "clear_flags": list(self.clear_flags),
            "fp32_patterns": list(self.fp32_patterns),
            "fp32_types": list(self.fp32_types),
            "fp32_names": sorted(self.fp32_names),
            "int8_scope": self.int8_scope,
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": self.timing_cache,
            "calibration": None if self.calibration is None else asdict(self.calibration),
            "optimization_level": self.optimization_level,
            "gpu": self.gpu.to_dict(),
            "build_command": list(self.build_command),
            "spec": self.spec.to_dict(),
            "export": self.export_info,
        }


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


def plan_build(
    spec: S.ModelSpec,
    options: BuildOptions,
    gpu: GpuFacts,
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    onnx_dir: str | os.PathLike | None = None,
    fp32_names: Iterable[str] = (),
    export_info: dict | None = None,
) -> BuildPlan:
    """The build plan of one graph (no TensorRT, no GPU access).

    fp32_names: ONNX node names to keep in FP32 found by ``onnx_fp32_nodes`` (optional).
    export_info: ``adv_mode`` / ``has_detector`` of the export (recorded in the header; the
    INT8 calibration of CellFinder / the encoder needs ``adv_mode``).
    Raises PlanError for an unknown precision, a precision the GPU lacks, bad bounds, INT8
    without calibration images or cache, or an INT8 request for the decoder.
    """
    p = options.precision
    if p not in PRECISIONS:
        raise PlanError(f"precision must be one of {PRECISIONS}, got {p!r}")
    if p == "bf16" and not gpu.supports_bf16:
        raise PlanError(f"bf16 needs compute capability >= 8.0; {gpu.name} has {gpu.cc}: use --precision fp16")
    if p in ("fp16", "int8") and not gpu.supports_fast_fp16:
        raise PlanError(
            f"{p} needs fast FP16 (compute capability >= 5.3); {gpu.name} has {gpu.cc}: use --precision fp32"
        )
    if p == "int8" and not gpu.supports_int8:
        raise PlanError(f"int8 needs compute capability >= 6.1; {gpu.name} has {gpu.cc}: use --precision fp16")
    if not 0 <= options.optimization_level <= 5:
        raise PlanError(f"optimization level must be 0..5, got {options.optimization_level}")
    export_info = dict(export_info or {})
    out_dir = Path(out_dir)

    bounds = {
        "B": (None, options.opt_batch, options.max_batch),
        "N": (None, options.opt_prompts, options.max_prompts),
        "P": (None, None, options.max_points),
    }
    spec = override_dims(spec, bounds)
    profile = S.profile_shapes(spec)

    # INT8 applies to the ViT trunks only; the decoder of an int8 build is FP16.
    precision = "fp16" if (p == "int8" and spec.name == S.DECODER) else p
    flags: list[str] = []
    if precision == "fp16":
        flags.append("FP16")
    elif precision == "bf16":
        flags.append("BF16")
    elif precision == "int8":
        flags += ["INT8", "FP16"]
    clear = [] if options.tf32 else ["TF32"]
    if options.tf32:
        flags.append("TF32")

    patterns: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    names: frozenset[str] = frozenset()
    if precision != "fp32":
        patterns = FP32_PATTERNS_COMMON + FP32_PATTERNS_MODEL.get(spec.name, ()) + tuple(options.keep_fp32)
        if options.fp32_attention:
            patterns += ATTENTION_PATTERNS
        for pat in patterns:
            try:
                re.compile(pat)
            except re.error as e:
                raise PlanError(f"invalid --keep-fp32 pattern {pat!r}: {e}") from e
        types = FP32_LAYER_TYPES
        names = frozenset(fp32_names)
        flags.append("OBEY_PRECISION_CONSTRAINTS" if options.strict_precision else "PREFER_PRECISION_CONSTRAINTS")

    calibration = None
    scope = None
    if precision == "int8":
        scope = INT8_SCOPE[spec.name]
        if "adv_mode" not in export_info:
            raise PlanError(f"{spec.name}: INT8 calibration needs the export's adv_mode (manifest.json)")
        inp = spec.inputs[0]
        batch = inp.shape[0]
        cb = int(options.calib_batch)
        if isinstance(batch, S.Dim) and not batch.min <= cb <= batch.max:
            raise PlanError(f"--calib-batch {cb} is outside the batch range [{batch.min}, {batch.max}] of {spec.name}")
        cache_dir = Path(options.calib_cache_dir) if options.calib_cache_dir else out_dir
        cache = cache_dir / f"{spec.name}.int8.calib"
        if options.calib_images is None and not cache.is_file():
            raise PlanError(
                f"{spec.name}: INT8 needs --calib-images DIR (a folder of representative images) "
                f"or an existing calibration cache {cache}"
            )
        shape = (cb,) + tuple(inp.dims("opt")[1:])
        calibration = CalibrationPlan(
            inp.name,
            shape,
            "sam" if spec.name == S.ENCODER else "cellfinder",
            bool(export_info["adv_mode"]),
            options.calib_images,
            str(cache),
            int(options.calib_max_images),
        )

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
        precision=precision,
        profile=profile,
        flags=tuple(flags),
        clear_flags=tuple(clear),
        fp32_patterns=patterns,
        fp32_types=types,
        fp32_names=names,
        int8_scope=scope,
        workspace_bytes=workspace,
        timing_cache=timing,
        calibration=calibration,
        optimization_level=int(options.optimization_level),
        gpu=gpu,
        build_command=tuple(argv),
        export_info=export_info,
    )


def onnx_fp32_nodes(model, name: str) -> set[str]:
    """ONNX node names of ``model`` (an ``onnx.ModelProto``) that the graph analysis keeps in
    FP32 for graph ``name``:

    * the argument chains of every Sin / Cos (positional encodings): walking back from the
      Sin / Cos through elementwise / reshaping ops and MatMuls with a constant operand
      (at most 10 steps), e.g. the prompt encoder's coords -> (x + 0.5) / 1024 -> 2x - 1 ->
      @ gaussian -> * 2 pi -> sin;
    * for CellFinder, the heads: everything the outputs depend on after the last decoder layer
      (class / box heads, inverse sigmoid, reference points, sigmoid).
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    elementwise = {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Unsqueeze",
        "Reshape",
        "Slice",
        "Gather",
        "Concat",
        "Cast",
        "Transpose",
        "Expand",
        "Flatten",
        "Squeeze",
        "Pow",
        "Neg",
        "Tile",
        "MatMul",
    }
    keep: set[str] = set()

    def is_const(t: str) -> bool:
        seen = 0
        while t in producer and seen < 8:  # a constant folded through Cast/Reshape still counts
            n = producer[t]
            if n.op_type == "Constant":
                return True
            if n.op_type not in ("Cast", "Reshape", "Unsqueeze", "Transpose", "Identity"):
                return False
            t, seen = n.input[0], seen + 1
        return t in constants

    for node in g.node:
        if node.op_type not in ("Sin", "Cos"):
            continue
        keep.add(node.name)
        frontier = [(t, 0) for t in node.input]
        while frontier:
            t, depth = frontier.pop()
            n = producer.get(t)
            if n is None or n.op_type == "Constant" or depth >= 10 or n.op_type not in elementwise:
                continue
            if n.op_type == "MatMul" and not any(is_const(i) for i in n.input):
                continue
            keep.add(n.name)
            frontier += [(i, depth + 1) for i in n.input if i]
    if name == S.CELLFINDER:
        stop = re.compile(r"(_layers\.\d+/|/backbone/|/input_proj)")
        frontier = [o.name for o in g.output]
        seen: set[str] = set()
        while frontier:
            t = frontier.pop()
            n = producer.get(t)
            if n is None or n.name in seen or n.op_type == "Constant" or stop.search(n.name):
                continue
            seen.add(n.name)
            keep.add(n.name)
            frontier += [i for i in n.input if i]
    return keep


def plan_export(
    onnx_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: BuildOptions,
    gpu: GpuFacts,
    models: Sequence[str] | None = None,
    analyse_onnx: bool = True,
) -> list[BuildPlan]:
    """Plans for the graphs of an export directory (its ``manifest.json`` specs).

    models: which graphs (default: all in the export). analyse_onnx: load each ONNX graph
    (without weights) for ``onnx_fp32_nodes``.
    """
    from ..runtime.manifest import read_manifest

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
        spec = S.ModelSpec.from_dict(entry["spec"])
        path = Path(onnx_dir) / entry["file"]
        fp32 = set()
        if analyse_onnx and options.precision != "fp32":
            import onnx

            fp32 = onnx_fp32_nodes(onnx.load(str(path), load_external_data=False), m)
        plan = plan_build(
            spec,
            options,
            gpu,
            path,
            out_dir,
            onnx_dir=onnx_dir,
            fp32_names=fp32,
            export_info=dict(info, onnx_sha256=entry.get("sha256")),
        )
        plans.append(plan)
    return plans


def engine_header(
    plan: BuildPlan, tensorrt_version: str, onnx_sha256: str | None, layer_counts: dict | None = None
) -> dict:
    """The JSON header of an engine built from ``plan`` (``engine_file`` adds the engine hash)."""
    return {
        "format": "cellsam-trt-engine",
        "cellsam_trt": __version__,
        "model": plan.model,
        "tensorrt_version": tensorrt_version,
        "gpu": plan.gpu.to_dict(),
        "precision": plan.precision,
        "profiles": [{k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in plan.profile.items()}],
        "fp32_layers": {
            "patterns": list(plan.fp32_patterns),
            "types": list(plan.fp32_types),
            "names": sorted(plan.fp32_names),
            "counts": layer_counts or {},
        },
        "int8_scope": plan.int8_scope,
        "calibration_cache": plan.calibration.cache_path if plan.calibration else None,
        "flags": list(plan.flags),
        "workspace_bytes": plan.workspace_bytes,
        "onnx_sha256": onnx_sha256,
        "onnx_dir": str(Path(plan.onnx_path).parent),
        "spec": plan.spec.to_dict(),
        "export": {k: v for k, v in plan.export_info.items() if k != "config"},
        "config": plan.export_info.get("config"),
        "build_command": list(plan.build_command),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --------------------------------------------------------------------------- INT8 calibration data


def calibration_files(image_dir: str | os.PathLike, max_images: int) -> list[Path]:
    """The first ``max_images`` image files of a folder, sorted by name (deterministic)."""
    from ..io import IMAGE_SUFFIXES

    d = Path(image_dir)
    if not d.is_dir():
        raise PlanError(f"calibration image folder {d} does not exist")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PlanError(f"no images in {d} (suffixes {sorted(IMAGE_SUFFIXES)})")
    return files[:max_images]


def model_input(
    image: np.ndarray, branch: str, adv_mode: bool, normalize: bool = True, channel_axis: int | None = None
) -> np.ndarray:
    """One image -> the (1, 3, 1024, 1024) float32 input of the SAM encoder ("sam") or CellFinder
    ("cellfinder"), prepared by the pipeline's own ``prepare`` stage, as at run time.
    Raises ``preprocess.BlankImageError`` for a blank image on the SAM branch."""
    settings = pipeline.SegmentSettings(normalize=normalize, channels=pipeline.Channels(axis=channel_axis))
    sq = pipeline.prepare(image, settings).squashed
    if branch == "sam":
        return pre.sam_encoder_input(sq, adv_mode)
    if branch == "cellfinder":
        return pre.cellfinder_input(sq, adv_mode)
    raise ValueError(f"branch must be 'sam' or 'cellfinder', got {branch!r}")


def calibration_batches(
    images: Iterable[np.ndarray | str | os.PathLike],
    branch: str,
    adv_mode: bool,
    batch_size: int,
    log: Callable[[str], None] | None = None,
    reader: Callable[[str | os.PathLike], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Preprocessed calibration batches (batch_size, 3, 1024, 1024) float32, C-contiguous.

    images: arrays or file paths (read with ``reader``, default ``cellsam_trt.io.read_image``).
    Blank or unreadable images are skipped (logged); a final partial batch is dropped (the
    calibration profile has one fixed batch size).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    say = log or (lambda m: None)
    if reader is None:
        from ..io import read_image as reader
    buf: list[np.ndarray] = []
    for item in images:
        try:
            img = item if isinstance(item, np.ndarray) else reader(item)
            x = model_input(img, branch, adv_mode)
        except (pre.BlankImageError, ValueError, OSError) as e:
            say(f"calibration: skipping {item if not isinstance(item, np.ndarray) else 'an image'}: {e}")
            continue
        buf.append(x[0])
        if len(buf) == batch_size:
            yield np.ascontiguousarray(np.stack(buf), dtype=np.float32)
            buf = []
    if buf:
        say(f"calibration: dropping the last {len(buf)} image(s) (not a full batch of {batch_size})")


class CalibratorCore:
    """The logic of an INT8 calibrator, without TensorRT or CUDA (unit-tested on the CPU).

    batches: iterator of (B, 3, 1024, 1024) float32 arrays of ``batch_shape``.
    to_device: copies one batch into a device buffer and returns its address (int); the
      TensorRT runtime passes ``HostDeviceBuffer.upload`` (pinned staging + device memory).
    cache_path: the calibration cache (read by ``read_cache``, written atomically by
      ``write_cache``); when it holds a cache, TensorRT asks for no batches.
    """

    def __init__(
        self,
        batches: Iterable[np.ndarray],
        input_name: str,
        batch_shape: Sequence[int],
        to_device: Callable[[np.ndarray], int],
        cache_path: str | os.PathLike | None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._it = iter(batches)
        self.input_name = input_name
        self.batch_shape = tuple(int(d) for d in batch_shape)
        self.to_device = to_device
        self.cache_path = Path(cache_path) if cache_path else None
        self.log = log or (lambda m: None)
        self.batches_served = 0

    def get_batch_size(self) -> int:
        # The batch is explicit in the calibration profile (TRT 10 has no implicit batch); the
        # deprecated getBatchSize() is still called by the Python trampoline: 1, as Polygraphy does.
        return 1

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        """Device addresses for the next batch in the order of ``names``; None when exhausted."""
        names = list(names)
        if names != [self.input_name]:
            raise ValueError(f"calibrator for {self.input_name!r} was asked for inputs {names}")
        try:
            batch = next(self._it)
        except StopIteration:
            self.log(f"calibration: {self.batches_served} batch(es) of {self.batch_shape}")
            return None
        if tuple(batch.shape) != self.batch_shape or batch.dtype != np.float32:
            raise ValueError(f"calibration batch {batch.shape} {batch.dtype}, expected {self.batch_shape} float32")
        ptr = int(self.to_device(np.ascontiguousarray(batch)))
        self.batches_served += 1
        return [ptr]

    def read_cache(self) -> bytes | None:
        if self.cache_path is not None and self.cache_path.is_file() and self.cache_path.stat().st_size > 0:
            self.log(f"calibration: using cache {self.cache_path}")
            return self.cache_path.read_bytes()
        return None

    def write_cache(self, cache: bytes) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(self.cache_path.name + ".tmp")
        tmp.write_bytes(bytes(cache))
        os.replace(tmp, self.cache_path)
        self.log(f"calibration: wrote cache {self.cache_path} ({len(cache)} bytes)")


def make_entropy_calibrator(core: CalibratorCore):
    """A ``tensorrt.IInt8EntropyCalibrator2`` delegating to ``core`` (needs TensorRT)."""
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self, c: CalibratorCore) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 trampolines need the explicit base init
            self.core = c

        def get_batch_size(self) -> int:
            return self.core.get_batch_size()

        def get_batch(self, names):
            return self.core.get_batch(names)

        def read_calibration_cache(self):
            return self.core.read_cache()

        def write_calibration_cache(self, cache) -> None:
            self.core.write_cache(bytes(cache))

    return EntropyCalibrator(core)


# --------------------------------------------------------------------------- the TensorRT part


def _require_trt10():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BuildError(
            "TensorRT is not installed (pip install 'cellsam-trt[trt]' on a machine with an NVIDIA GPU and driver)"
        ) from e
    major = int(str(trt.__version__).split(".")[0])
    if major != 10:
        raise BuildError(
            f"TensorRT {trt.__version__}: this builder uses the TensorRT 10 weakly-typed API "
            "(per-layer precision, FP16/BF16/INT8 builder flags); install TensorRT 10.x"
        )
    return trt


def apply_precision_constraints(network, plan: BuildPlan, trt) -> dict[str, int]:
    """Pin layer precisions and float output types per ``plan.layer_precision``; returns counts."""
    counts = {"fp32": 0, "fp16": 0}
    dtypes = {"fp32": trt.float32, "fp16": trt.float16}
    floats = (trt.float32, trt.float16, trt.bfloat16)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        want = plan.layer_precision(layer.name, layer.type.name)
        if want is None:
            continue
        outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outs:
            continue
        layer.precision = dtypes[want]
        for j in outs:
            layer.set_output_type(j, dtypes[want])
        counts[want] += 1
    return counts


def build_engine(plan: BuildPlan, log: Callable[[str], None] | None = None) -> Path:
    """Build and write the engine of ``plan`` (TensorRT 10 + a CUDA GPU). Returns its path."""
    say = log or (lambda m: None)
    trt = _require_trt10()
    from ..model.checkpoint import sha256_file

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(plan.onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{plan.onnx_path}: the TensorRT ONNX parser failed: " + "; ".join(errors))
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != plan.spec.input_names:
        raise BuildError(f"{plan.onnx_path}: network inputs {inputs} differ from the spec {plan.spec.input_names}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for f in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    for f in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, f))
    config.builder_optimization_level = plan.optimization_level
    profile = builder.create_optimization_profile()
    for name, (mn, op, mx) in plan.profile.items():
        profile.set_shape(name, mn, op, mx)
    config.add_optimization_profile(profile)
    counts = apply_precision_constraints(network, plan, trt)
    say(f"{plan.model}: {plan.precision}, {counts['fp32']} layers pinned to FP32, {counts['fp16']} to FP16")

    cache = None
    if plan.timing_cache:
        raw = Path(plan.timing_cache).read_bytes() if Path(plan.timing_cache).is_file() else b""
        cache = config.create_timing_cache(raw)
        if not config.set_timing_cache(cache, False):  # cache from another device: start afresh
            say(f"timing cache {plan.timing_cache} does not match this GPU; starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)

    staging = None
    if plan.calibration is not None:
        from ..engine.trt_backend import HostDeviceBuffer

        c = plan.calibration
        staging = HostDeviceBuffer(c.batch_shape, np.float32)
        files = calibration_files(c.image_dir, c.max_images) if c.image_dir else []
        core = CalibratorCore(
            calibration_batches(files, c.branch, c.adv_mode, c.batch_shape[0], say),
            c.input_name,
            c.batch_shape,
            staging.upload_sync,
            c.cache_path,
            say,
        )
        config.int8_calibrator = make_entropy_calibrator(core)
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(c.input_name, c.batch_shape, c.batch_shape, c.batch_shape)
        if not config.set_calibration_profile(calib_profile):
            raise BuildError(f"{plan.model}: TensorRT rejected the calibration profile {c.batch_shape}")

    say(f"building {plan.engine_path} (this takes minutes) ...")
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if staging is not None:
            staging.free()
    if serialized is None:
        raise BuildError(f"{plan.model}: TensorRT could not build the engine (see the TensorRT log above)")
    if cache is not None:
        Path(plan.timing_cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(plan.timing_cache + ".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, plan.timing_cache)
    header = engine_header(
        plan, str(trt.__version__), plan.export_info.get("onnx_sha256") or sha256_file(plan.onnx_path), counts
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
    """Plan and build every engine of an export directory on GPU ``device_id``."""
    from ..engine.trt_backend import query_gpu

    _require_trt10()  # say "TensorRT is not installed" before anything else
    gpu = query_gpu(device_id)
    plans = plan_export(onnx_dir, out_dir, options, gpu, models)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = [build_engine(p, log) for p in plans]
    summary = {"engines": [p.name for p in paths], "plans": [p.to_dict() for p in plans]}
    (Path(out_dir) / "build_plan.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return paths
