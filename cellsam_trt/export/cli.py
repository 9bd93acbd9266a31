"""``cellsam-trt export``: checkpoint -> export directory (three ONNX graphs + manifest.json),
and the precision-annotated graphs TensorRT builds from (``export.precision``).

    cellsam-trt export --checkpoint ck.pt --out export/ --precision fp16
    cellsam-trt export --annotate-only --out export/ --precision int8 --calib-images calib/

Registered in ``cellsam_trt.cli`` with ``add_export_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .formats import INT8_SCOPES


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export the three networks to ONNX (+ manifest) for the ort backend")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", type=Path, help="CellSAM (or plain SAM) checkpoint file, loaded weights-only")
    g.add_argument("--synthetic-seed", type=int, default=0, help="use the synthetic checkpoint of this seed")
    p.add_argument("--out", required=True, help="export directory (created; existing graphs are replaced)")
    p.add_argument("--int8", action="store_true", help="also write dynamic-INT8 image encoder and CellFinder (CPU)")
    p.add_argument(
        "--int8-scope",
        choices=INT8_SCOPES,
        default="mlp",
        help="INT8 layers (--int8 and --precision int8): the ViT MLP MatMuls (closer to FP32) or all weight "
        "MatMuls (faster)",
    )
    p.add_argument("--validate-batches", default="1,2", help="batch sizes the image graphs are checked at")
    p.add_argument("--validate-prompts", default="1,37", help="prompt counts the decoder is checked at")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = library default)")
    g = p.add_argument_group("precision-annotated graphs for TensorRT (strongly typed engines)")
    g.add_argument(
        "--precision",
        action="append",
        default=[],
        choices=("fp16", "bf16", "int8", "fp8"),
        help="also write <graph>.<precision>.onnx: FP16 / BF16 with FP32 islands, INT8 as Q/DQ (repeatable; "
        "fp8 is refused)",
    )
    g.add_argument("--annotate-only", action="store_true", help="annotate the export already in --out; export nothing")
    g.add_argument("--calib-images", help="folder of representative images (int8)")
    g.add_argument("--calib-max-images", type=int, default=64, help="at most this many calibration images")
    g.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default="minmax")
    g.add_argument(
        "--keep-fp32", action="append", default=[], metavar="REGEX", help="extra node-name pattern kept in FP32"
    )
    g.add_argument("--fp32-attention", action="store_true", help="also keep the attention scores in FP32")
    p.set_defaults(func=cmd_export)
    return p


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"cellsam-trt export: {what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"cellsam-trt export: {what} must be positive integers, got {text!r}")
    return values


def _annotate(args) -> int:
    from ..runtime.manifest import ManifestError
    from .precision import PrecisionError, annotate_export

    say = lambda m: print(m, file=sys.stderr)
    for p in dict.fromkeys(args.precision):
        say(f"writing the {p} graphs ...")
        try:
            annotate_export(
                args.out,
                p,
                calib_images=args.calib_images,
                calib_max_images=args.calib_max_images,
                calib_method=args.calib_method,
                int8_scope=args.int8_scope,
                keep_fp32=tuple(args.keep_fp32),
                fp32_attention=args.fp32_attention,
                log=say,
            )
        except (PrecisionError, ManifestError) as e:
            print(f"cellsam-trt export: {e}", file=sys.stderr)
            return 2
    return 0


def cmd_export(args) -> int:
    if args.annotate_only:
        if not args.precision:
            raise SystemExit("cellsam-trt export: --annotate-only needs --precision fp16|bf16|int8")
        return _annotate(args)
    if "fp8" in args.precision:  # refused before minutes of export
        from .precision import PrecisionError, annotate_export

        try:
            annotate_export(args.out, "fp8")
        except PrecisionError as e:
            print(f"cellsam-trt export: {e}", file=sys.stderr)
            return 2
    try:
        import torch
    except ImportError:
        raise SystemExit("cellsam-trt export: needs PyTorch and onnx (pip install 'cellsam-trt[export]')") from None
    from ..model.checkpoint import CheckpointError, load_checkpoint, sha256_file
    from ..model.synthetic import synthetic_checkpoint
    from .onnx_export import ExportError, export_model

    if args.threads:
        torch.set_num_threads(args.threads)
    seed = None
    if args.checkpoint:
        path = args.checkpoint
    else:
        seed = args.synthetic_seed
        path = synthetic_checkpoint(seed)
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        print(f"cellsam-trt export: {e}", file=sys.stderr)
        return 2
    print(f"model: {path} ({ck.mode_description})", file=sys.stderr)
    sha = sha256_file(path)
    try:
        manifest = export_model(
            ck.model,
            args.out,
            checkpoint_sha256=sha,
            checkpoint_path=str(Path(path).resolve()),
            synthetic_seed=seed,
            image_batches=_ints(args.validate_batches, "--validate-batches"),
            decoder_prompts=_ints(args.validate_prompts, "--validate-prompts"),
            int8=args.int8,
            int8_scope=args.int8_scope,
            threads=args.threads,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (ExportError, ValueError) as e:  # validation, structure, TensorRT compatibility
        print(f"cellsam-trt export: {e}", file=sys.stderr)
        return 1
    files = [e["file"] for e in manifest["models"].values()] + [
        e["int8"]["file"] for e in manifest["models"].values() if "int8" in e
    ]
    print(f"exported {', '.join(files)} and manifest.json to {args.out}", file=sys.stderr)
    return _annotate(args) if args.precision else 0
