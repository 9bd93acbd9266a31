"""``cellsam-trt build``: TensorRT engines from an export directory (argument parsing only;
the work is in ``tensorrt_build``).

    cellsam-trt export --annotate-only --out export/ --precision fp16       # the FP16 graphs, once
    cellsam-trt build --onnx export/ --out engines/ --precision fp16
    cellsam-trt build --onnx export/ --out engines/ --dry-run --gpu-name "NVIDIA L4" --compute-capability 8.9

Engines are strongly typed: the precision comes from the export's annotated graphs
(``cellsam-trt export --precision fp16|bf16|int8``). ``--dry-run`` prints the build plans
(graph file, profiles, flags, workspace, cache paths, what the TensorRT version does) as JSON
and builds nothing: for the installed TensorRT, or, where none is installed, for TensorRT 11.4,
10.13 and 10.3 (``--tensorrt`` picks others); with ``--gpu-name`` / ``--compute-capability``
it needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..runtime import specs as S


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``build`` on an ``argparse`` subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "build",
        help="build TensorRT engines from an ONNX export directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--onnx", required=True, help="export directory (cellsam-trt export): manifest.json + *.onnx")
    p.add_argument("--out", required=True, help="where the .engine files and the timing cache go")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8", "fp8"), default="fp16")
    p.add_argument("--models", nargs="+", choices=S.MODEL_NAMES, help="graphs to build (default: all in the export)")
    g = p.add_argument_group("profiles (default: the spec's bounds)")
    g.add_argument("--max-batch", type=int, help="max images per encoder / CellFinder call (e.g. 8)")
    g.add_argument("--opt-batch", type=int, help="batch TensorRT tunes for")
    g.add_argument("--max-prompts", type=int, help="max prompts per decoder call")
    g.add_argument("--opt-prompts", type=int, help="prompt count TensorRT tunes the decoder for")
    g.add_argument("--max-points", type=int, help="max points per prompt")
    g = p.add_argument_group("builder")
    g.add_argument("--workspace-gib", type=float, help="WORKSPACE pool limit (default min(4, GPU memory / 4))")
    g.add_argument("--timing-cache", help="timing cache file (default OUT/timing.cache), reused and updated")
    g.add_argument("--no-timing-cache", action="store_true")
    g.add_argument("--tf32", action="store_true", help="allow TF32 in FP32 matmuls / convolutions")
    g.add_argument("--optimization-level", type=int, default=3, help="builder optimization level 0..5")
    g = p.add_argument_group("target")
    g.add_argument("--device", type=int, default=0, help="CUDA device index")
    g.add_argument("--dry-run", action="store_true", help="print the build plans as JSON, build nothing")
    g.add_argument(
        "--tensorrt",
        action="append",
        metavar="VERSION",
        help="with --dry-run: plan for this TensorRT version (repeatable; default: the installed one, "
        "else 11.4, 10.13 and 10.3)",
    )
    g.add_argument("--gpu-name", help="plan for this GPU instead of querying one (with --dry-run)")
    g.add_argument("--compute-capability", help="e.g. 8.9 (with --gpu-name)")
    g.add_argument("--gpu-memory-gib", type=float, default=16.0, help="GPU memory for planning (with --gpu-name)")
    p.set_defaults(func=cmd_build)
    return p


def options_from_args(args):
    from .tensorrt_build import BuildOptions

    return BuildOptions(
        precision=args.precision,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        max_prompts=args.max_prompts,
        opt_prompts=args.opt_prompts,
        max_points=args.max_points,
        workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache,
        no_timing_cache=args.no_timing_cache,
        tf32=args.tf32,
        optimization_level=args.optimization_level,
    )


def _gpu_from_args(args):
    from .tensorrt_build import GIB, GpuFacts

    if args.gpu_name is None:
        return None
    if not args.compute_capability:
        raise SystemExit("cellsam-trt build: --gpu-name needs --compute-capability (e.g. 8.9)")
    try:
        major, minor = (int(x) for x in args.compute_capability.split("."))
    except ValueError:
        raise SystemExit(
            f"cellsam-trt build: --compute-capability must look like 8.9, got {args.compute_capability!r}"
        ) from None
    return GpuFacts(args.gpu_name, (major, minor), int(args.gpu_memory_gib * GIB))


def _installed_tensorrt() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def cmd_build(args) -> int:
    from ..runtime.engine_file import EngineCompatError
    from ..runtime.manifest import ManifestError
    from .tensorrt_build import DRY_RUN_VERSIONS, BuildError, PlanError, build_export, plan_export

    options = options_from_args(args)
    log = lambda m: print(m, file=sys.stderr)
    try:
        gpu = _gpu_from_args(args)
        if args.dry_run:
            if gpu is None:
                from ..engine.trt_backend import TrtUnavailable, query_gpu

                try:
                    gpu = query_gpu(args.device)
                except TrtUnavailable as e:  # planning needs no GPU, only its facts
                    raise PlanError(
                        f"no GPU to plan for here ({e}); name the target: --gpu-name NAME --compute-capability X.Y"
                    ) from None
            installed = _installed_tensorrt()
            versions = args.tensorrt or ([installed] if installed else list(DRY_RUN_VERSIONS))
            out = []
            for v in versions:
                plans = plan_export(args.onnx, args.out, options, gpu, args.models, tensorrt=v)
                out.append({"tensorrt": v, "installed": v == installed, "plans": [p.to_dict() for p in plans]})
                for p in plans:
                    if p.missing:
                        log(f"TensorRT {v}, {p.model}: no {p.graph_precision} graph yet; write it with: {p.missing}")
            print(json.dumps(out, indent=1, sort_keys=True))
            return 0
        if args.tensorrt:
            raise SystemExit("cellsam-trt build: --tensorrt plans for another version and is only valid with --dry-run")
        if gpu is not None:
            raise SystemExit(
                "cellsam-trt build: --gpu-name plans for another GPU and is only valid with --dry-run "
                "(engines are built on the GPU they will run on)"
            )
        paths = build_export(args.onnx, args.out, options, args.models, args.device, log)
    except (PlanError, BuildError, ManifestError, EngineCompatError, RuntimeError) as e:
        print(f"cellsam-trt build: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0
