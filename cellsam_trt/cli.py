"""``cellsam-trt``: the command line (the only place that parses argv).

Commands: ``run`` (segment files and folders), ``demo`` (a self-contained run on synthetic
cells), ``info`` (installed backends and versions).
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import io as cio

FORMATS = ("tif", "npy", "png")


def _expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in cio.IMAGE_SUFFIXES)
        elif any(c in item for c in "*?["):
            files += sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
        else:
            files.append(p)
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def _build_pipeline(args):
    """-> (pipeline, description of the model for the run summary).

    With ``--model DIR`` (an export directory, ``cellsam-trt export``) the default backend is
    ONNX Runtime; with a checkpoint (or a synthetic seed) it is the PyTorch reference.
    """
    from .pipeline import CellSAMPipeline, SegmentSettings

    settings = SegmentSettings(bbox_threshold=args.bbox_threshold, iou_threshold=args.iou_threshold,
                               channel_axis=args.channel_axis)
    model_dir = getattr(args, "model", None)
    if model_dir is not None:
        backend = "ort" if args.backend == "auto" else args.backend
        if backend not in ("ort", "torch"):
            raise SystemExit(f"cellsam-trt: backend {backend!r} is not available for run in this version; "
                             "use ort or torch")
        from .engine.api import CellSAMEngine

        try:
            engine = CellSAMEngine.load(model_dir, backend=backend, settings=settings, threads=args.threads,
                                        device=args.device, checkpoint=args.checkpoint)
        except (OSError, ValueError, ImportError) as e:
            raise SystemExit(f"cellsam-trt: cannot load the model in {model_dir}: {e}")
        print(f"model: {model_dir} ({backend}, adv mode {engine.backend.adv_mode})", file=sys.stderr)
        return engine.pipeline, {"model": str(model_dir), "backend": backend, "adv_mode": engine.backend.adv_mode}
    if args.backend not in ("auto", "torch"):
        raise SystemExit(f"cellsam-trt: backend {args.backend!r} needs an export directory (--model DIR, "
                         "made by cellsam-trt export)")
    try:
        import torch
    except ImportError:
        raise SystemExit("cellsam-trt: the torch backend needs PyTorch (pip install torch, then '.[export]')")
    from .engine.torch_backend import TorchBackend
    from .model.checkpoint import load_checkpoint
    from .model.synthetic import synthetic_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.checkpoint if args.checkpoint else synthetic_checkpoint(args.synthetic_seed)
    ck = load_checkpoint(path)
    print(f"model: {path} ({ck.mode_description})", file=sys.stderr)
    pipe = CellSAMPipeline(TorchBackend(ck.model, device=args.device), settings)
    return pipe, {"checkpoint": str(ck.path), "backend": "torch", "adv_mode": ck.adv_mode}


def select_channels(image: np.ndarray, channel_axis: int | None, nuclear: int | None, wholecell: int | None):
    """Pick the nuclear and whole-cell channels: -> (H, W, 2) [nuclear, whole-cell], (H, W, 1) or
    the image unchanged when no channel is named (the pipeline then applies the official rule)."""
    if nuclear is None and wholecell is None:
        return image, channel_axis
    if image.ndim == 2:
        raise ValueError(f"--nuclear-channel/--wholecell-channel given, but the image is 2-D {image.shape}")
    axis = int(np.argmin(image.shape)) if channel_axis is None else channel_axis % image.ndim
    planes = np.moveaxis(image, axis, -1)
    for name, idx in (("nuclear", nuclear), ("whole-cell", wholecell)):
        if idx is not None and not 0 <= idx < planes.shape[-1]:
            raise ValueError(f"{name} channel {idx} does not exist (image has {planes.shape[-1]} channels)")
    if wholecell is None:  # nuclear only: (blank, nuclear, blank)
        out = np.zeros(planes.shape[:2] + (2,), planes.dtype)
        out[..., 0] = planes[..., nuclear]
        return out, -1
    if nuclear is None:
        return planes[..., wholecell], None
    return np.stack([planes[..., nuclear], planes[..., wholecell]], -1), -1


def _outputs_for(f: Path, out: Path, args) -> dict[str, Path]:
    paths = {"labels": out / f"{f.stem}_labels.{args.format}"}
    if args.table:
        paths["table"] = out / f"{f.stem}_cells.{args.table}"
    if args.geojson:
        paths["geojson"] = out / f"{f.stem}_cells.geojson"
    return paths


def _segment_file(pipe, f: Path, paths: dict[str, Path], boxes, args) -> dict:
    from . import outputs
    from .pipeline import CellSAMPipeline

    image = cio.read_image(f)
    image, axis = select_channels(image, args.channel_axis, args.nuclear_channel, args.wholecell_channel)
    if axis != pipe.settings.channel_axis:
        pipe = CellSAMPipeline(pipe.backend, replace(pipe.settings, channel_axis=axis))
    res = pipe.segment(image, boxes=boxes)
    cio.write_labels(res.labels, paths["labels"], args.format)
    if "table" in paths or "geojson" in paths:
        table = outputs.cell_table(res, pipe.settings.min_size)
        if "table" in paths:
            outputs.write_table(table, paths["table"])
        if "geojson" in paths:
            outputs.write_geojson(res.labels, paths["geojson"], table)
    return {"cells": res.n_cells, "shape": list(res.labels.shape)}


def cmd_run(args) -> int:
    from tqdm import tqdm

    files = _expand_inputs(args.inputs)
    if not files:
        print("cellsam-trt: no input images found", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    boxes = cio.read_boxes(args.boxes) if args.boxes else None
    pipe, model_info = _build_pipeline(args)
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        **model_info, "versions": _versions(), "files": [],
    }
    failed = done = 0
    t_start = time.perf_counter()
    bar = tqdm(files, unit="img", file=sys.stderr, disable=args.quiet)
    for f in bar:
        paths = _outputs_for(f, out, args)
        entry = {"input": str(f), "outputs": {k: str(v) for k, v in paths.items()}}
        if all(p.exists() for p in paths.values()) and not args.overwrite:
            entry["status"] = "skipped: outputs exist"
        else:
            t0 = time.perf_counter()
            try:
                entry.update(_segment_file(pipe, f, paths, boxes, args))
                entry.update(status="ok", seconds=round(time.perf_counter() - t0, 3))
                done += 1
            except Exception as e:  # one bad file must not stop the job
                failed += 1
                msg = str(e) if str(f) in str(e) else f"{f}: {e}"
                entry.update(status="error", error=msg)
                bar.write(f"error: {msg}", file=sys.stderr)
        summary["files"].append(entry)
        bar.set_postfix_str(f"{done / max(time.perf_counter() - t_start, 1e-9):.2f} images/s")
    summary["failed"] = failed
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    cio.write_json(summary, out / "run_summary.json")
    skipped = len(files) - done - failed
    print(f"{done} segmented, {skipped} skipped, {failed} failed of {len(files)}; outputs in {out}", file=sys.stderr)
    return 1 if failed else 0


def synthetic_cells(seed: int, h: int = 384, w: int = 416, n: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic fluorescence-like image (bright discs on noise, uint16) and its cell boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    image = rng.normal(200, 30, (h, w))
    boxes = []
    for _ in range(n):
        r = int(rng.integers(8, 18))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(1500, 4000)
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    return np.clip(image, 0, 65535).astype(np.uint16), np.asarray(boxes, np.float32)


def cmd_demo(args) -> int:
    import tifffile

    out = Path(args.out)
    inputs = out / "images"
    inputs.mkdir(parents=True, exist_ok=True)
    image, boxes = synthetic_cells(0)
    tifffile.imwrite(inputs / "cells.tif", image)
    (out / "cells_boxes.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    print(f"demo: synthetic image and boxes in {inputs}; synthetic checkpoint seed {args.synthetic_seed}",
          file=sys.stderr)
    run_args = argparse.Namespace(
        inputs=[str(inputs)], out=str(out / "labels"), model=None, checkpoint=None, synthetic_seed=args.synthetic_seed,
        boxes=str(out / "cells_boxes.json"), backend="auto", device="cpu", format="tif", overwrite=True,
        bbox_threshold=0.4, iou_threshold=0.5, channel_axis=None, threads=args.threads, table="csv", geojson=True,
        nuclear_channel=None, wholecell_channel=None, quiet=False,
    )
    rc = cmd_run(run_args)
    print(f"demo: label images and run_summary.json are in {out / 'labels'} "
          "(a synthetic checkpoint makes arithmetically exact but biologically meaningless masks)", file=sys.stderr)
    return rc


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "onnx", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def cmd_info(args) -> int:
    info = _versions()
    try:
        import torch

        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        info["cuda_devices"] = []
    print(json.dumps(info, indent=2))
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", type=Path, help="CellSAM (or plain SAM) checkpoint file, loaded weights-only")
    g.add_argument("--synthetic-seed", type=int, default=0, help="use the synthetic checkpoint of this seed")
    p.add_argument("--backend", choices=("auto", "ort", "torch", "trt"), default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = library default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellsam-trt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="segment images (files, folders, globs)")
    run.add_argument("inputs", nargs="+")
    run.add_argument("--out", required=True)
    _add_model_options(run)
    run.add_argument("--model", type=Path, help="export directory (cellsam-trt export): ONNX Runtime by default")
    run.add_argument("--boxes", help='JSON {"boxes": [[x1, y1, x2, y2], ...]} in original pixels (x = column)')
    run.add_argument("--format", choices=FORMATS, default="tif")
    run.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    run.add_argument("--bbox-threshold", type=float, default=0.4, help="CellFinder score threshold (official 0.4)")
    run.add_argument("--iou-threshold", type=float, default=0.5, help="drop masks with lower predicted IoU (0.5)")
    run.add_argument("--channel-axis", type=int, default=None, help="channel axis of 3-D images (default: smallest)")
    run.add_argument("--nuclear-channel", type=int, default=None, help="index of the nuclear channel")
    run.add_argument("--wholecell-channel", type=int, default=None, help="index of the whole-cell channel")
    run.add_argument("--table", choices=("csv", "parquet"), help="also write a per-cell table")
    run.add_argument("--geojson", action="store_true", help="also write QuPath-compatible GeoJSON polygons")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="synthetic cells + synthetic checkpoint, end to end on the CPU")
    demo.add_argument("--out", default="cellsam-demo")
    demo.add_argument("--synthetic-seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    from .export.trt_cli import add_build_parser  # TensorRT engines (imports nothing heavy)
    add_build_parser(sub)
    info = sub.add_parser("info", help="installed backends, versions and GPUs")
    info.set_defaults(func=cmd_info)
    from .export.cli import add_export_parser
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
