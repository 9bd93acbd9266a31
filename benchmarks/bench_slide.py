"""Whole-slide benchmark: peak memory and speed against slide size, tile size / overlap choice,
one process vs a local Dask cluster, and the official-style tiled path for a ratio.

Slides are ``cellsam_trt.slide.synthetic.SyntheticSlide`` (non-touching discs on noise, exact
ground truth), written as tiled OME-BigTIFF and segmented into an OME-Zarr label store.

* ``memory``: for each size (default 4096, 16384, 32768 px square): write the slide, segment it
  (tile 1024, overlap 128), score it against the ground truth (matched IoU of cells cut by a
  tile border vs interior cells, streamed chunk by chunk). Each step runs in its own process,
  whose peak RSS (``ru_maxrss``) is recorded. The segmenter is the exact threshold segmenter, so
  the figures are the slide machinery's (IO, tile store, links, label store), and the score is
  the stitching's.
  With ``--engine-export DIR`` the CellSAM engine (ONNX Runtime on that export, automatic
  mode) runs in the loop instead, for its memory against slide size (not scored: a synthetic
  checkpoint finds no cells).
* ``sweep``: tile size x overlap on one slide: border / interior IoU and split cells (threshold
  segmenter), tile count and the CellSAM cost that implies, with the seconds per tile of the
  CellSAM engine (ONNX Runtime FP32, synthetic checkpoint, automatic mode) measured in the same run.
* ``compare``: one slide with box prompts for all its cells (the synthetic checkpoint finds no
  cells itself): the official-style tiled path (tiles one after another, the PyTorch model,
  one prompt-encoder + mask-decoder call per box, as the official ``segment_wsi`` ->
  ``segment_cellular_image`` does) vs ``segment_slide`` on ONNX Runtime in one process vs
  ``segment_slide_dask`` on a local cluster, all in the same run; plus one process vs Dask with
  the threshold segmenter on a larger slide.

    python benchmarks/bench_slide.py memory --work /tmp/slides --out benchmarks/results/slide_memory.json
    python benchmarks/bench_slide.py sweep --work /tmp/slides --out benchmarks/results/slide_sweep.json
    python benchmarks/bench_slide.py compare --work /tmp/slides --export DIR --out benchmarks/results/slide_compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu import machine_info  # noqa: E402

SLIDE_KW = {"pitch": 40, "radius": (6, 16), "occupancy": 0.8}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: list[str]) -> dict:
    """Run one step in a fresh process -> its JSON report (with its own peak RSS)."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ steps
def _slide(size: int, seed: int, pitch: int | None = None):
    from cellsam_trt.slide.synthetic import SyntheticSlide

    return SyntheticSlide(size, size, seed=seed, **{**SLIDE_KW, **({"pitch": pitch} if pitch else {})})


def step_write(size: int, path: str, seed: int, pitch: int | None = None) -> dict:
    t0 = time.perf_counter()
    _slide(size, seed, pitch).write_ome_tiff(path, tile=512)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(), "bytes": os.path.getsize(path)}


def step_segment(
    path: str, dest: str, tile: int, overlap: int, threshold: float, mode: str = "exact", pitch: int | None = None
) -> dict:
    from cellsam_trt.slide.grid import TileSettings
    from cellsam_trt.slide.io import open_slide
    from cellsam_trt.slide.run import SlideOutput, segment_slide
    from cellsam_trt.slide.synthetic import ThresholdSegmenter

    t0 = time.perf_counter()
    threshold = threshold or _slide(8, 0, pitch).threshold()
    if mode.startswith("export="):  # the CellSAM engine on an export directory (ONNX Runtime)
        from cellsam_trt.api import CellSAM

        engine = CellSAM.load(mode.split("=", 1)[1])
    else:
        engine = ThresholdSegmenter(threshold, drop_edge_cells=mode == "drop_edge")
    res = segment_slide(
        open_slide(path), engine, SlideOutput(Path(dest)), TileSettings(tile_size=tile, overlap=overlap)
    )
    total = time.perf_counter() - t0
    return {
        "seconds": total,
        "passes": res.seconds,
        "tiles": res.grid["tiles"],
        "tiles_per_s": res.grid["tiles"] / total,
        "cells": res.cells,
        "peak_rss_mib": _peak_rss_mib(),
        "ok": res.ok,
    }


def step_score(
    size: int, seed: int, dest: str, tile: int, overlap: int, pitch: int | None = None, chunk: int = 2048
) -> dict:
    from cellsam_trt.metrics import StreamedInstanceMatch
    from cellsam_trt.slide.grid import TileGrid, TileSettings
    from cellsam_trt.slide.io import open_slide

    t0 = time.perf_counter()
    s = _slide(size, seed, pitch)
    pred = open_slide(dest)
    m = StreamedInstanceMatch()
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            y1, x1 = min(y + chunk, size), min(x + chunk, size)
            m.add(s.labels(y, y1, x, x1), pred.read(y, y1, x, x1))
    border, interior = s.cells_cut_by(TileGrid(size, size, TileSettings(tile_size=tile, overlap=overlap)))
    return {
        "border": m.result(border),
        "interior": m.result(interior),
        "all": m.result(),
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": _peak_rss_mib(),
    }


# ------------------------------------------------------------------------------ commands
def cmd_memory(a) -> dict:
    from cellsam_trt.slide.synthetic import SyntheticSlide

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in a.sizes:
        path, dest = work / f"slide{size}.ome.tif", work / f"slide{size}_labels.ome.zarr"
        thr = SyntheticSlide(8, 8, **SLIDE_KW).threshold()
        row = {"size": size}
        row["write"] = _child(["_write", str(size), str(path), str(a.seed)])
        if a.engine_export:  # the real engine in the loop (a random tiny model: finds no cells; not scored)
            row["segment"] = _child(
                ["_segment", str(path), str(dest), str(a.tile), str(a.overlap), str(thr), f"export={a.engine_export}"]
            )
            row["engine"] = a.engine_export
        else:
            row["segment"] = _child(["_segment", str(path), str(dest), str(a.tile), str(a.overlap), str(thr)])
            row["score"] = _child(["_score", str(size), str(a.seed), str(dest), str(a.tile), str(a.overlap)])
        row["label_store_bytes"] = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(json.dumps({"size": size, "segment": row["segment"]}), file=sys.stderr)
        rows.append(row)
        Path(a.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows}, indent=1, default=float))
        if not a.keep:
            path.unlink()
            import shutil

            shutil.rmtree(dest)
    return {"tile": a.tile, "overlap": a.overlap, "rows": rows}


def cellsam_seconds_per_tile(export: str, threads: int, reps: int = 2) -> dict:
    """Seconds of one 1024 x 1024 automatic-mode tile on the CellSAM engine (ORT FP32)."""
    from cellsam_trt.api import CellSAM
    from cellsam_trt.slide.synthetic import SyntheticSlide

    engine = CellSAM.load(export, threads=threads)
    tile = SyntheticSlide(1024, 1024, seed=11, **SLIDE_KW).image(0, 1024, 0, 1024)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.segment(tile)
        times.append(time.perf_counter() - t0)
    return {"seconds_min": min(times), "seconds_all": times, "threads": threads}


def cmd_sweep(a) -> dict:
    """Each (tile, overlap) on a slide of exactly 4 tiles of that overlap per side (so the
    overlap is the one asked for; a grid spreads tiles evenly, which would enlarge it), with a
    cell pitch (37) that tile edges do not line up with."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    per_tile = cellsam_seconds_per_tile(a.export, a.threads) if a.export else None
    rows = []
    for tile in a.tiles:
        for overlap in a.overlaps:
            if overlap >= tile:
                continue
            size = 4 * (tile - overlap) + overlap
            path = work / f"sweep{size}.ome.tif"
            _child(["_write", str(size), str(path), str(a.seed), "37"])
            row = {"tile": tile, "overlap": overlap, "slide": size, "tiles_per_megapixel": 1e6 / (tile - overlap) ** 2}
            for mode in ("exact", "drop_edge"):
                dest = work / f"sweep_{tile}_{overlap}_{mode}.ome.zarr"
                seg = _child(["_segment", str(path), str(dest), str(tile), str(overlap), "0", mode, "37"])
                score = _child(["_score", str(size), str(a.seed), str(dest), str(tile), str(overlap), "37"])
                row[mode] = {"border": score["border"], "interior": score["interior"], "tiles": seg["tiles"]}
                import shutil

                shutil.rmtree(dest)
            if per_tile:
                row["cellsam_seconds_per_megapixel"] = row["tiles_per_megapixel"] * per_tile["seconds_min"]
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            path.unlink()
    return {
        "cellsam_per_tile": per_tile,
        "rows": rows,
        "slide": {
            **SLIDE_KW,
            "pitch": 37,
            "cell_diameter_px": [2 * SLIDE_KW["radius"][0] - 1, 2 * SLIDE_KW["radius"][1] - 1],
        },
    }


def _tiles(size, tile, overlap):
    from cellsam_trt.slide.grid import TileGrid, TileSettings

    return len(TileGrid(size, size, TileSettings(tile_size=tile, overlap=overlap)))


def official_style_tiled(slide_path: str, boxes: np.ndarray, tile: int, overlap: int, threads: int) -> dict:
    """Tiles one after another through the official structure (PyTorch, one decoder call per box)."""
    import torch
    from bench_cpu import _new_run, official_style_image

    from cellsam_trt.model.checkpoint import load_checkpoint
    from cellsam_trt.model.synthetic import synthetic_checkpoint
    from cellsam_trt.pipeline import SegmentSettings
    from cellsam_trt.slide.grid import TileGrid, TileSettings, route_prompts
    from cellsam_trt.slide.io import open_slide

    torch.set_num_threads(threads)
    model = load_checkpoint(synthetic_checkpoint(0)).model
    sam = model.mask_sam.eval()
    src = open_slide(slide_path)
    grid = TileGrid(src.height, src.width, TileSettings(tile_size=tile, overlap=overlap))
    routed = route_prompts(grid, boxes=boxes)
    run = _new_run()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in grid:
            e = routed.per_tile.get(t.index)
            if e is None:
                continue
            official_style_image(
                run,
                sam,
                model.adv_mode,
                SegmentSettings(),
                f"tile{t.index}",
                src.read(t.y0, t.y1, t.x0, t.x1),
                e["boxes"],
            )
    return {"seconds": time.perf_counter() - t0, "tiles": len(routed.per_tile), "stages": run["stages"]}


def cmd_compare(a) -> dict:
    from distributed import Client

    from cellsam_trt.api import CellSAM, EngineSpec
    from cellsam_trt.slide.distributed import local_cluster, segment_slide_dask
    from cellsam_trt.slide.grid import TileSettings
    from cellsam_trt.slide.io import open_slide, read_labels
    from cellsam_trt.slide.run import SlideOutput, segment_slide
    from cellsam_trt.slide.synthetic import SyntheticSlide, ThresholdSegmenter

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    # 1. CellSAM, box prompts for every cell
    s = SyntheticSlide(a.size, a.size, seed=a.seed, **SLIDE_KW)
    path = work / f"compare{a.size}.ome.tif"
    s.write_ome_tiff(path, tile=512)
    c = s.cells()
    boxes = np.stack([c["cx"] - c["r"], c["cy"] - c["r"], c["cx"] + c["r"], c["cy"] + c["r"]], 1).astype(np.float32)
    tiles = TileSettings(tile_size=a.tile, overlap=a.overlap)
    res = {"boxes": len(boxes)}
    res["official_style_torch"] = official_style_tiled(str(path), boxes, a.tile, a.overlap, a.threads)
    print(json.dumps(res), file=sys.stderr)
    engine = CellSAM.load(a.export, threads=a.threads)
    t0 = time.perf_counter()
    r1 = segment_slide(open_slide(path), engine, SlideOutput(work / "c_one.ome.zarr"), tiles, boxes=boxes)
    res["ort_one_process"] = {"seconds": time.perf_counter() - t0, "passes": r1.seconds, "cells": r1.cells}
    engine.close()
    del engine
    spec = EngineSpec(model=a.export, threads=1)
    with local_cluster(a.workers) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        r2 = segment_slide_dask(
            client, open_slide(path), spec, SlideOutput(work / "c_dask.ome.zarr"), tiles, boxes=boxes
        )
        res["ort_dask_local"] = {
            "seconds": time.perf_counter() - t0,
            "workers": a.workers,
            "threads_per_worker": 1,
            "passes": r2.seconds,
            "cells": r2.cells,
        }
    one, dask = read_labels(work / "c_one.ome.zarr"), read_labels(work / "c_dask.ome.zarr")
    res["dask_vs_one_process_pixel_agreement"] = float((one == dask).mean())
    base = res["official_style_torch"]["seconds"]
    for k in ("ort_one_process", "ort_dask_local"):
        res[k]["speedup_vs_official_style"] = base / res[k]["seconds"]
    out["cellsam_prompted"] = res
    print(json.dumps(res), file=sys.stderr)
    # 2. the machinery alone, larger slide: one process vs Dask
    big = work / f"compare{a.big}.ome.tif"
    SyntheticSlide(a.big, a.big, seed=a.seed, **SLIDE_KW).write_ome_tiff(big, tile=512)
    thr = s.threshold()
    t0 = time.perf_counter()
    r3 = segment_slide(open_slide(big), ThresholdSegmenter(thr), SlideOutput(work / "b_one.ome.zarr"), TileSettings())
    m = {"one_process": {"seconds": time.perf_counter() - t0, "tiles": r3.grid["tiles"], "passes": r3.seconds}}
    with local_cluster(a.workers) as cluster, Client(cluster) as client:
        from cellsam_trt.slide.synthetic import ThresholdSegmenter as TS

        t0 = time.perf_counter()
        r4 = segment_slide_dask(
            client, open_slide(big), _ThresholdFactory(thr), SlideOutput(work / "b_dask.ome.zarr"), TileSettings()
        )
        m["dask_local"] = {"seconds": time.perf_counter() - t0, "workers": a.workers, "passes": r4.seconds}
        del TS
    for k in m:
        m[k]["tiles_per_s"] = r3.grid["tiles"] / m[k]["seconds"]
    m["identical_labels"] = bool((read_labels(work / "b_one.ome.zarr") == read_labels(work / "b_dask.ome.zarr")).all())
    out["threshold_machinery"] = {"size": a.big, **m}
    return {"size": a.size, "tile": a.tile, "overlap": a.overlap, **out}


class _ThresholdFactory:
    def __init__(self, thr):
        self.thr = thr

    def __call__(self):
        from cellsam_trt.slide.synthetic import ThresholdSegmenter

        return ThresholdSegmenter(self.thr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768])
    m.add_argument("--keep", action="store_true")
    m.add_argument(
        "--engine-export",
        default=None,
        help="segment with CellSAM on this export (automatic mode) instead of the threshold stand-in",
    )
    w = sub.add_parser("sweep")
    w.add_argument("--tiles", type=int, nargs="+", default=[512, 1024])
    w.add_argument("--overlaps", type=int, nargs="+", default=[0, 8, 16, 24, 32, 48, 64, 128])
    c = sub.add_parser("compare")
    c.add_argument("--size", type=int, default=2048)
    c.add_argument("--big", type=int, default=8192)
    c.add_argument("--workers", type=int, default=2)
    for q in (m, w, c):
        q.add_argument("--work", default="/tmp/cellsam-slides")
        q.add_argument("--out", required=True)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--tile", type=int, default=1024)
        q.add_argument("--overlap", type=int, default=128)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--export", default=None, help="export directory (cellsam-trt export) for the CellSAM figures")
    a = p.parse_args(argv)
    t0 = time.time()
    result = {
        "command": a.cmd,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        **{"memory": cmd_memory, "sweep": cmd_sweep, "compare": cmd_compare}[a.cmd](a),
    }
    result["wall_seconds"] = time.time() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


def _step_main(argv) -> int:
    kind, rest = argv[0], argv[1:]
    pitch = lambda i: int(rest[i]) if len(rest) > i else None  # noqa: E731
    if kind == "_write":
        r = step_write(int(rest[0]), rest[1], int(rest[2]), pitch(3))
    elif kind == "_segment":
        r = step_segment(
            rest[0],
            rest[1],
            int(rest[2]),
            int(rest[3]),
            float(rest[4]),
            rest[5] if len(rest) > 5 else "exact",
            pitch(6),
        )
    else:
        r = step_score(int(rest[0]), int(rest[1]), rest[2], int(rest[3]), int(rest[4]), pitch(5))
    print(json.dumps(r, default=float))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(_step_main(sys.argv[1:]))
    sys.exit(main())
