"""``cellsam-trt``: the command line (the only place that parses argv).

Commands: ``run`` (segment files, folders and slides), ``demo`` (a self-contained run on
synthetic cells), ``bench`` (time the engine), ``export`` / ``build`` (ONNX graphs, TensorRT
engines), ``quantize`` (OpenVINO INT8 of an export), ``fetch`` (the official weights),
``info`` (installed backends and versions). The environment is read here only:
``DEEPCELL_ACCESS_TOKEN`` and ``CELLSAM_TRT_MODELS_URL`` (``fetch``), the home folder (the
official weights cache ``~/.deepcell/models``).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from . import io as cio
from . import outputs, weights
from .api import EngineSpec, LoadError
from .export.cli import add_export_parser
from .export.openvino_int8 import add_quantize_parser
from .export.trt_cli import add_build_parser
from .pipeline import NORMALIZE_MODES, Channels, Prompts, PromptWarning, SegmentSettings

FORMATS = ("tif", "npy", "png")


def _expand_inputs(inputs: list[str], slides: bool = False) -> list[Path]:
    """Files, folders (their images; with ``slides`` also their Zarr stores) and globs."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not (slides and p.suffix.lower() == ".zarr"):
            files += sorted(
                f
                for f in p.iterdir()
                if f.suffix.lower() in cio.IMAGE_SUFFIXES or (slides and f.suffix.lower() == ".zarr" and f.is_dir())
            )
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


DEFAULT_MODEL = weights.MODEL_NAMES[0]  # cellsam_general
OTHER_MODELS = (
    "or name a model with --model (cellsam_general, cellsam_extra, an export directory, a TensorRT engine "
    "directory or a checkpoint file), or --synthetic-seed N for the synthetic test checkpoint (random weights)"
)


def _models_root() -> Path:
    """The official weights cache, shared with the official package: ~/.deepcell/models."""
    return weights.default_root(Path.home())


def _named_model(name: str, version: str | None, default: bool = False) -> Path:
    """The installed checkpoint of a model name, or exit with the message that says how to get it."""
    try:
        return weights.find_model(name, version, _models_root())
    except weights.ModelNotFound as e:
        if default:
            raise SystemExit(f"cellsam-trt: no model given and the default {e}; {OTHER_MODELS}") from None
        raise SystemExit(f"cellsam-trt: {e}") from None


def _model_path(args) -> str:
    """The model the options name (``--model`` path or name / ``--checkpoint`` /
    ``--synthetic-seed``; none: the official cellsam_general), or exit."""
    model = getattr(args, "model", None)
    version = getattr(args, "model_version", None)
    if model is not None and weights.is_model_name(model):
        return str(_named_model(model, version))
    model = model or getattr(args, "checkpoint", None)
    if version is not None and (model is not None or getattr(args, "synthetic_seed", None) is not None):
        raise SystemExit(
            f"cellsam-trt: --model-version applies to model names ({', '.join(weights.MODEL_NAMES)}), "
            f"not to {model if model is not None else '--synthetic-seed'}"
        )
    if model is not None:
        return str(model)
    if getattr(args, "synthetic_seed", None) is not None:
        if importlib.util.find_spec("torch") is None:
            raise SystemExit(
                "cellsam-trt: --synthetic-seed needs PyTorch to make the synthetic checkpoint: "
                "pip install 'cellsam-trt[torch]'"
            )
        from .model.synthetic import synthetic_checkpoint

        return str(synthetic_checkpoint(args.synthetic_seed))
    return str(_named_model(DEFAULT_MODEL, version, default=True))


def settings_from_args(args) -> SegmentSettings:
    minmax, normalize = NORMALIZE_MODES[getattr(args, "normalize", None) or "official"]
    return SegmentSettings(
        bbox_threshold=args.bbox_threshold,
        iou_threshold=args.iou_threshold,
        channels=Channels(
            getattr(args, "nuclear_channel", None), getattr(args, "wholecell_channel", None), args.channel_axis
        ),
        normalize=normalize,
        minmax=minmax,
        low_contrast_enhancement=getattr(args, "low_contrast_enhancement", False),
        postprocess=getattr(args, "postprocess", False),
        remove_boundaries=getattr(args, "remove_boundaries", False),
    )


def engine_spec(args) -> EngineSpec:
    """The ``api.EngineSpec`` (a picklable ``CellSAM.load`` recipe) the options name."""
    return EngineSpec(
        model=_model_path(args),
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        settings=settings_from_args(args),
        export_cache=None if args.export_cache is None else str(args.export_cache),
        strict=getattr(args, "strict", False),
    )


def _build_engine(spec: EngineSpec, **scheduler_options):
    """-> (CellSAM, description of the model for the run summary); a load failure is one line."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("cellsam_trt").setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. a checkpoint's unexpected keys
            model, info = spec.build(**scheduler_options)
    except LoadError as e:
        raise SystemExit(f"cellsam-trt: {e}") from None
    finally:
        said = list(dict.fromkeys(str(w.message) for w in caught))  # a key check and an export both warn
        for message in said:
            print(f"cellsam-trt: warning: {message}", file=sys.stderr)
    if said:
        info["load_warnings"] = said
    return model, info


def _outputs_for(f: Path, out: Path, args) -> dict[str, Path]:
    paths = {"labels": out / f"{f.stem}_labels.{args.format}"}
    if args.table:
        paths["table"] = out / f"{f.stem}_cells.{args.table}"
    if args.geojson:
        paths["geojson"] = out / f"{f.stem}_cells.geojson"
    return paths


def _write_outputs(res, paths: dict[str, Path], args) -> dict:
    cio.write_labels(res.labels, paths["labels"], args.format)
    if "table" in paths or "geojson" in paths:
        table = outputs.cell_table(res)
        if "table" in paths:
            outputs.write_table(table, paths["table"])
        if "geojson" in paths:
            outputs.write_geojson(res.labels, paths["geojson"], table)
    return {"cells": res.n_cells, "shape": list(res.labels.shape)}


def _run_images(model, jobs, boxes, points, args, bar):
    """Segment ``jobs`` [(file, output paths, summary entry)] with ``segment_many`` (read and
    prepared ahead, ``--batch-size`` images in flight) and write each result in a writer thread
    behind inference; yields each finished entry in input order."""
    prompt = (
        None
        if boxes is None and points is None
        else Prompts(boxes, None if points is None else points[0], None if points is None else points[1])
    )
    max_pixels = args.max_pixels or cio.default_max_pixels()
    # each file is read in a reader thread, its header checked against the pixel budget first
    if args.scale is None:
        results = model.segment_many((partial(cio.read_image, f, max_pixels=max_pixels) for f, _, _ in jobs), prompt)
    else:  # one image at a time: each image's scale decides its own plan (one frame or tiles)
        results = _segment_scaled(model, jobs, prompt, max_pixels, args)

    def write(f, paths, entry, item):
        try:
            if item.error is not None:
                raise item.error
            entry.update(_write_outputs(item.segmentation, paths, args))
            if item.segmentation.details.scale is not None:
                entry["scale"] = item.segmentation.details.scale.describe()
            entry.update(status="ok", seconds=round(item.seconds, 3))
            dropped = item.segmentation.details.dropped_prompts
            if len(dropped):
                entry["dropped_prompts"] = dropped.tolist()
                bar.write(
                    f"warning: {f}: {len(dropped)} prompts lie outside the image and were dropped "
                    f"(prompts {dropped[:10].tolist()}{' ...' if len(dropped) > 10 else ''})",
                    file=sys.stderr,
                )
        except Exception as e:  # one bad file must not stop the job
            msg = _error_message(f, e)
            entry.update(status="error", error=msg, seconds=round(item.seconds, 3))
            bar.write(f"error: {msg}", file=sys.stderr)
        return entry

    pending: deque = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="cellsam-write") as writer:
        for (f, paths, entry), item in zip(jobs, results, strict=True):
            pending.append(writer.submit(write, f, paths, entry, item))
            while pending and (pending[0].done() or len(pending) > max(1, args.batch_size)):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _segment_scaled(model, jobs, prompt, max_pixels, args):
    """``CellSAM.segment(..., scale=args.scale)`` over ``jobs`` in order -> ``ItemResult``s."""
    from .scheduler import ItemResult

    p = prompt or Prompts()
    for i, (f, _, _) in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            image = cio.read_image(f, max_pixels=max_pixels)
            seg = model.segment(
                image, p.boxes, p.points, p.point_labels, scale=args.scale, scale_estimator=args.scale_estimator
            )
            yield ItemResult(i, f, seg, None, time.perf_counter() - t0)
        except Exception as e:  # reported by name, the job goes on
            yield ItemResult(i, f, None, e, time.perf_counter() - t0)


def _error_message(f: Path, e: BaseException) -> str:
    """The error, naming the file once."""
    return str(e) if str(f) in str(e) else f"{f}: {e}"


def _run_slides(runner, jobs, boxes, points, bar):
    for f, paths, entry in jobs:
        t0 = time.perf_counter()
        try:
            entry.update(runner.segment(f, paths, boxes, points, bar))
            entry.update(status="ok")
        except Exception as e:  # one bad slide must not stop the job
            msg = _error_message(f, e)
            entry.update(getattr(e, "entry", {}))
            entry.update(status="error", error=msg)
            bar.write(f"error: {msg}", file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        yield entry


def _slide_outputs(f: Path, out: Path, args) -> dict[str, Path]:
    ext = "ome.zarr" if args.slide_format == "ome-zarr" else "ome.tif"
    paths = {"labels": out / f"{f.stem}_labels.{ext}"}
    if args.table:
        paths["table"] = out / f"{f.stem}_cells.{args.table}"
    return paths


def _tiled(args) -> bool:
    return bool(args.tile_size or args.dask or args.dask_local)


def _tile_settings(args, source):
    from .scale import parse_scale
    from .slide.grid import TileSettings

    scale = parse_scale(args.scale)  # idempotent: cmd_run parsed it already
    scale = 1.0 if scale is None else scale
    if scale == "auto":
        scale = _auto_tile_scale(args, source)
    if args.target_pixel_size is not None:
        px = args.pixel_size or (source.pixel_size_um[1] if source.pixel_size_um else None)
        if px is None:
            raise ValueError(
                f"{source.name}: --target-pixel-size given, but the file states no pixel size; give --pixel-size"
            )
        scale = TileSettings.scale_for_pixel_size(px, args.target_pixel_size)
    return TileSettings(tile_size=args.tile_size or 1024, overlap=args.overlap, scale=scale)


def _auto_tile_scale(args, source) -> float:
    """``--scale auto`` in tiled mode: the tile scale from the median cell diameter of the
    slide's central region (at most 2048 x 2048 pixels)."""
    from .scale import estimate_diameter, tile_scale
    from .slide.run import ChannelMap

    h, w = min(source.height, 2048), min(source.width, 2048)
    y0, x0 = (source.height - h) // 2, (source.width - w) // 2
    region = ChannelMap(args.nuclear_channel, args.wholecell_channel).apply(source.read(y0, y0 + h, x0, x0 + w))
    return tile_scale(estimate_diameter(region, Channels(axis=-1) if region.ndim == 3 else None))


class _SlideRunner:
    """Segments slides one after another, in this process or on a Dask cluster."""

    def __init__(self, args, spec):
        import importlib.util

        self.args, self.spec, self.client, self.cluster, self.engine = args, spec, None, None, None
        need = ["zarr"] + (["distributed"] if args.dask or args.dask_local else [])
        missing = [m for m in need if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(f"cellsam-trt: tiled mode needs {', '.join(missing)}: pip install 'cellsam-trt[slide]'")
        if args.dask or args.dask_local:
            from distributed import Client

            from .slide.distributed import PLUGIN, local_cluster, make_engine_plugin

            if args.dask:
                self.client = Client(args.dask)
            else:
                if not spec.threads:  # share the cores between the workers instead of oversubscribing them
                    from dataclasses import replace

                    self.spec = spec = replace(spec, threads=max(1, (os.cpu_count() or 1) // args.dask_local))
                self.cluster = local_cluster(args.dask_local, threads_per_worker=max(1, args.threads or 1))
                self.client = Client(self.cluster)
            self.client.register_plugin(make_engine_plugin(spec), name=PLUGIN)
            print(
                f"dask: {self.client.scheduler_info().get('address', args.dask)} with "
                f"{len(self.client.scheduler_info().get('workers', {}))} workers",
                file=sys.stderr,
            )
        else:
            self.engine, _ = _build_engine(spec)

    def segment(self, f: Path, paths: dict[str, Path], boxes, points, bar) -> dict:
        from .slide.io import open_slide
        from .slide.run import ChannelMap, SlideOutput, segment_slide

        args = self.args
        source = open_slide(f, level=args.level)
        try:
            tiles = _tile_settings(args, source)
            dest = paths["labels"]
            output = SlideOutput(
                dest, fmt=args.slide_format, chunk=args.chunk, levels=args.levels, table=paths.get("table")
            )
            kw = dict(
                boxes=boxes,
                points=points[0] if points else None,
                point_labels=points[1] if points else None,
                channels=ChannelMap(args.nuclear_channel, args.wholecell_channel),
                fingerprint={"engine": repr(self.spec)},
                progress=lambda k, n: bar.set_postfix_str(f"{f.name}: tile {k}/{n}"),
            )
            if self.client is not None:
                from .slide.distributed import segment_slide_dask

                res = segment_slide_dask(self.client, source, self.spec, output, tiles, register_plugin=False, **kw)
            else:
                res = segment_slide(source, self.engine, output, tiles, **kw)
        finally:
            source.close()
        for _, _, msg in res.failed:
            bar.write(f"error: {msg}", file=sys.stderr)
        for i, why in res.unrouted:
            bar.write(f"warning: {f}: prompt {i} not segmented: {why}", file=sys.stderr)
        entry = {"cells": res.cells, "shape": [source.height, source.width], "slide": res.summary()}
        if res.failed:
            raise _SlideIncomplete(
                f"{f}: {len(res.failed)} of {res.grid['tiles']} tiles failed (their regions are "
                f"empty in {dest}; run again to redo them)",
                entry,
            )
        return entry

    def close(self):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class _SlideIncomplete(RuntimeError):
    def __init__(self, msg, entry):
        super().__init__(msg)
        self.entry = entry


def _needs_run(paths: dict[str, Path], args) -> bool:
    """Outputs missing, --overwrite, or a slide whose work folder says it is unfinished."""
    from .slide.run import work_dir_for

    if args.overwrite or not all(p.exists() for p in paths.values()):
        return True
    return _tiled(args) and work_dir_for(paths["labels"]).exists()


def cmd_run(args) -> int:
    warnings.filterwarnings("ignore", category=PromptWarning)  # reported per file below, in one line
    from tqdm import tqdm

    files = _expand_inputs(args.inputs, slides=_tiled(args))
    if not files:
        print("cellsam-trt: no input images found", file=sys.stderr)
        return 2
    try:  # a bad prompt file is a usage error: one line, exit code 2
        boxes = cio.read_boxes(args.boxes) if args.boxes else None
        points = cio.read_points(args.points) if args.points else None
    except cio.InputError as e:
        raise SystemExit(f"cellsam-trt: {e}") from None
    from .scale import parse_scale

    try:
        args.scale = parse_scale(args.scale)
    except ValueError as e:
        raise SystemExit(f"cellsam-trt: --scale: {e}") from None
    if args.scale == "auto" and args.scale_estimator == "boxes" and boxes is None and not _tiled(args):
        raise SystemExit("cellsam-trt: --scale-estimator boxes needs --boxes")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = engine_spec(args)
    if _tiled(args):
        if args.low_contrast_enhancement or spec.settings.minmax:
            raise SystemExit(
                "cellsam-trt: --low-contrast-enhancement and --normalize pipeline / minmax rescale the whole image, "
                "which tiled mode never holds; use them without --tile-size / --dask, or "
                "cellsam_trt.compat.cellsam_pipeline for an image in memory"
            )
        if args.geojson:
            raise SystemExit("cellsam-trt: --geojson is for whole images; in tiled mode use --table (csv or parquet)")
        runner = _SlideRunner(args, spec)
        model_info = {"engine": repr(spec), "tiled": True}
    else:
        engine, model_info = _build_engine(spec, readers=max(1, args.workers), max_in_flight=max(1, args.batch_size))
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        **model_info,
        "versions": _versions(),
        "files": [],
    }
    t_start = time.perf_counter()
    entries, jobs = [], []
    for f in files:
        paths = _slide_outputs(f, out, args) if _tiled(args) else _outputs_for(f, out, args)
        entry = {"input": str(f), "outputs": {k: str(v) for k, v in paths.items()}}
        entries.append(entry)
        if _needs_run(paths, args):
            jobs.append((f, paths, entry))
        else:
            entry["status"] = "skipped: outputs exist"
    summary["files"] = entries
    failed = done = 0
    bar = tqdm(total=len(jobs), unit="img", file=sys.stderr, disable=args.quiet)
    try:
        finished = (
            _run_slides(runner, jobs, boxes, points, bar)
            if _tiled(args)
            else _run_images(engine, jobs, boxes, points, args, bar)
        )
        for entry in finished:
            if entry["status"] == "ok":
                done += 1
            else:
                failed += 1
            bar.update(1)
            bar.set_postfix_str(f"{done / max(time.perf_counter() - t_start, 1e-9):.2f} images/s")
    finally:
        bar.close()
        if _tiled(args):
            runner.close()
    summary["failed"] = failed
    summary["dropped_prompts"] = sum(len(e.get("dropped_prompts", ())) for e in entries)
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
    print(
        f"demo: synthetic image and boxes in {inputs}; synthetic checkpoint seed {args.synthetic_seed}", file=sys.stderr
    )
    run_args = build_parser().parse_args(
        [
            "run",
            str(inputs),
            "--out",
            str(out / "labels"),
            "--synthetic-seed",
            str(args.synthetic_seed),
            "--boxes",
            str(out / "cells_boxes.json"),
            "--overwrite",
            "--table",
            "csv",
            "--geojson",
            "--threads",
            str(args.threads),
        ]
    )
    rc = cmd_run(run_args)
    print(
        f"demo: label images and run_summary.json are in {out / 'labels'} "
        "(a synthetic checkpoint makes arithmetically exact but biologically meaningless masks)",
        file=sys.stderr,
    )
    return rc


def cmd_bench(args) -> int:
    """Per-image seconds, one image at a time and pipelined (``segment_many``), on synthetic cells."""
    engine, model_info = _build_engine(engine_spec(args))
    h, w = args.size
    data = [synthetic_cells(1000 + i, h, w, args.cells) for i in range(args.images)]
    prompts = [None if args.automatic else Prompts(boxes=b) for _, b in data]
    p0 = prompts[0]
    engine.segment(data[0][0], boxes=None if p0 is None else p0.boxes)  # warm-up
    per_image, cells = [], []
    for (img, _), p in zip(data, prompts):
        t0 = time.perf_counter()
        res = engine.segment(img, boxes=None if p is None else p.boxes)
        per_image.append(time.perf_counter() - t0)
        cells.append(res.n_cells)
    t0 = time.perf_counter()
    results = list(engine.segment_many([img for img, _ in data], prompts))
    many = time.perf_counter() - t0
    failed = [str(r.error) for r in results if not r.ok]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _machine(),
        "versions": _versions(),
        **model_info,
        "settings": {
            "images": args.images,
            "size": [h, w],
            "prompts": "automatic" if args.automatic else "boxes",
            "cells_per_image": args.cells,
            "threads": args.threads,
        },
        "seconds_per_image": per_image,
        "cells": cells,
        "images_per_s_sequential": len(per_image) / sum(per_image),
        "images_per_s_segment_many": len(data) / many,
        "failed": failed,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        cio.write_json(report, args.out)
        print(
            f"bench: {report['images_per_s_sequential']:.3f} images/s one at a time, "
            f"{report['images_per_s_segment_many']:.3f} pipelined; {args.out}",
            file=sys.stderr,
        )
    else:
        print(text)
    return 1 if failed else 0


def _machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()}
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return info


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "onnx", "openvino", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def cmd_fetch(args) -> int:
    """Install the named official model (the environment gives the token and the endpoint)."""
    root = _models_root()
    try:
        if args.archive is not None:
            weights.install_archive(args.archive, args.version, root=root, force=args.force)
            path = weights.find_model(args.name, args.version, root)
        else:
            path = weights.fetch_model(
                args.name,
                args.version,
                token=os.environ.get("DEEPCELL_ACCESS_TOKEN") or None,
                endpoint=os.environ.get("CELLSAM_TRT_MODELS_URL") or None,
                progress=not args.quiet,
                root=root,
                force=args.force,
            )
    except (weights.FetchError, weights.ModelNotFound) as e:
        raise SystemExit(f"cellsam-trt fetch: {e}") from None
    print(f"cellsam-trt fetch: {args.name} v{args.version} is installed: {path}", file=sys.stderr)
    print(path)
    return 0


def cmd_info(args) -> int:
    info = _versions()
    try:
        import torch

        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        info["cuda_devices"] = []
    print(json.dumps(info, indent=2))
    return 0


def _add_threshold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bbox-threshold", type=float, default=0.4, help="CellFinder score threshold (official 0.4)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="drop masks with lower predicted IoU (0.5)")
    p.add_argument("--channel-axis", type=int, default=None, help="channel axis of 3-D images (default: smallest)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--model",
        help="a model name: cellsam_general (the default) or cellsam_extra, the official weights in "
        "~/.deepcell/models (cellsam-trt fetch); or an export directory (cellsam-trt export), a TensorRT engine "
        "directory (cellsam-trt build) or a checkpoint file (./cellsam_general: a path, not the name)",
    )
    g.add_argument("--checkpoint", type=Path, help="CellSAM (or plain SAM) checkpoint file, loaded weights-only")
    g.add_argument(
        "--synthetic-seed",
        type=int,
        default=None,
        help="the synthetic test checkpoint of this seed (random weights: for tests and demos)",
    )
    p.add_argument(
        "--model-version",
        default=None,
        help=f"version of a named model (default: the latest, {weights.LATEST})",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a checkpoint with unexpected keys or any missing key (default: unexpected keys are "
        "reported and ignored; keys missing from a part that runs are always refused)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "ort", "openvino", "trt", "torch"),
        default="auto",
        help="auto: engines -> trt; a checkpoint on CUDA -> torch; else openvino where installed, else ort",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16", "int8"),
        default=None,
        help="fp32 (default; an engine directory: its build precision); fp16 / bf16: torch, trt or openvino "
        "(a CPU with native BF16 / FP16); int8: openvino (cellsam-trt quantize), ort (export --int8) or trt",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (auto: CUDA for a checkpoint where "
        "PyTorch sees one, the GPU for engines, else the CPU)",
    )
    p.add_argument(
        "--export-cache",
        type=Path,
        default=None,
        help="where a checkpoint's export for ONNX Runtime is kept (default ~/.cache/cellsam-trt/exports)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = library default)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellsam-trt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="segment images (files, folders, globs)")
    run.add_argument("inputs", nargs="+")
    run.add_argument("--out", required=True)
    _add_model_options(run)
    run.add_argument("--boxes", help='JSON {"boxes": [[x1, y1, x2, y2], ...]} in original pixels (x = column)')
    run.add_argument("--format", choices=FORMATS, default="tif")
    run.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    _add_threshold_options(run)
    run.add_argument("--nuclear-channel", type=int, default=None, help="index of the nuclear channel")
    run.add_argument("--wholecell-channel", type=int, default=None, help="index of the whole-cell channel")
    official = run.add_argument_group("the official package's optional steps (cellsam_trt.official)")
    official.add_argument(
        "--normalize",
        choices=tuple(NORMALIZE_MODES),
        default="official",
        help="official: percentile clip + CLAHE (segment_cellular_image's default); pipeline: per-channel "
        "min-max first (cellsam_pipeline's); minmax: min-max only; none: the pixels as read",
    )
    official.add_argument(
        "--low-contrast-enhancement",
        action="store_true",
        help="CLAHE + gamma on low-contrast images, CellFinder threshold 0.15 in the high-change branches "
        "(cellsam_pipeline's low_contrast_enhancement; implies the min-max)",
    )
    official.add_argument(
        "--postprocess", action="store_true", help="clean and smooth each mask (segment_cellular_image's postprocess)"
    )
    official.add_argument(
        "--remove-boundaries",
        action="store_true",
        help="take a one-pixel outline off the labels (segment_cellular_image's remove_boundaries)",
    )
    run.add_argument("--table", choices=("csv", "parquet"), help="also write a per-cell table")
    run.add_argument("--geojson", action="store_true", help="also write QuPath-compatible GeoJSON polygons")
    run.add_argument(
        "--points",
        help='JSON {"points": [[[x, y], ...], ...], "point_labels": [[1, ...], ...]}: '
        "one prompt of P points per row, original (slide) pixels; labels 1 cell, 0 background",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="images in flight: read and preprocessed ahead, post-processed behind inference (2)",
    )
    run.add_argument("--workers", type=int, default=1, help="threads reading and preprocessing images (1)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        help="whole-image mode: refuse images with more pixels, from their header, before decoding "
        "(default: this machine's memory / 256, cellsam_trt.io.default_max_pixels); tiled mode "
        "(--tile-size) reads lazily and has no such limit",
    )
    slide = run.add_argument_group("large images and slides (tiled mode: any of --tile-size, --dask, --dask-local)")
    slide.add_argument(
        "--tile-size",
        type=int,
        default=0,
        help="segment in overlapping tiles of this many model-frame pixels (1024: native resolution)",
    )
    slide.add_argument(
        "--overlap",
        type=int,
        default=128,
        help="tile overlap in model-frame pixels; cells up to this diameter stay whole (128)",
    )
    slide.add_argument(
        "--scale",
        default=None,
        metavar="auto|FLOAT",
        help="model-frame pixels per image pixel (> 1 enlarges small cells); auto: measure the median cell "
        "diameter and resample (whole images: padded frame or tiles as needed; tiled mode: the tile scale); "
        "default: the official 1024 x 1024 squash (tiled mode: 1)",
    )
    slide.add_argument(
        "--scale-estimator",
        choices=("log", "model", "boxes"),
        default="model",
        help="--scale auto on whole images: model (median mask of a first segmentation, default; log when it "
        "finds too few cells), log (model-free blob scale: exact on clean round cells, fooled by halos and "
        "texture on phase-contrast images) or boxes (median box side)",
    )
    slide.add_argument("--pixel-size", type=float, default=None, help="slide pixel size in um (default: from the file)")
    slide.add_argument(
        "--target-pixel-size",
        type=float,
        default=None,
        help="resample to this pixel size in um (sets --scale from the pixel size)",
    )
    slide.add_argument("--level", type=int, default=0, help="pyramid level to segment (0 = full resolution)")
    slide.add_argument(
        "--slide-format",
        choices=("ome-zarr", "bigtiff"),
        default="ome-zarr",
        help="label store: <stem>_labels.ome.zarr (OME-NGFF) or <stem>_labels.ome.tif (tiled BigTIFF)",
    )
    slide.add_argument("--chunk", type=int, default=1024, help="output chunk / TIFF tile side in pixels (1024)")
    slide.add_argument("--levels", type=int, default=1, help="pyramid levels of an OME-Zarr label store (1)")
    slide.add_argument("--dask", metavar="ADDRESS", help="run the tiles on this Dask scheduler (shared filesystem)")
    slide.add_argument(
        "--dask-local",
        metavar="N",
        type=int,
        default=0,
        help="run the tiles on a local Dask cluster of N worker processes",
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="synthetic cells + synthetic checkpoint, end to end on the CPU")
    demo.add_argument("--out", default="cellsam-demo")
    demo.add_argument("--synthetic-seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    add_build_parser(sub)
    bench = sub.add_parser("bench", help="time the engine on synthetic cell images (JSON with machine info)")
    _add_model_options(bench)
    _add_threshold_options(bench)
    bench.add_argument("--images", type=int, default=4, help="synthetic images to time (4)")
    bench.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"), help="image size (512 512)")
    bench.add_argument("--cells", type=int, default=60, help="cells (box prompts) per image (60)")
    bench.add_argument("--automatic", action="store_true", help="automatic mode (CellFinder) instead of box prompts")
    bench.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    bench.set_defaults(func=cmd_bench)

    fetch = sub.add_parser(
        "fetch",
        help="install the official CellSAM weights into ~/.deepcell/models: download (DEEPCELL_ACCESS_TOKEN) "
        "or --archive FILE",
        description="Download the official weights archive with a DeepCell access token (environment: "
        "DEEPCELL_ACCESS_TOKEN, from https://users.deepcell.org; CELLSAM_TRT_MODELS_URL: another endpoint, "
        "e.g. a mirror), or install an archive copied by hand (--archive), into ~/.deepcell/models, the cache "
        "the official package uses.",
    )
    fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=weights.MODEL_NAMES)
    fetch.add_argument("--version", default=weights.LATEST, help=f"model version (default {weights.LATEST})")
    fetch.add_argument("--archive", type=Path, help="install this archive (cellsam-models_v<version>.tar.gz)")
    fetch.add_argument("--force", action="store_true", help="download / install again, replacing what is there")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=cmd_fetch)

    info = sub.add_parser("info", help="installed backends, versions and GPUs")
    info.set_defaults(func=cmd_info)
    add_export_parser(sub)
    add_quantize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 some inputs failed, 2 a usage or set-up error (one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
