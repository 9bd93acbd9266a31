"""Peak memory and time against the number of box prompts on one image.

Each count runs in a fresh process: load the model and segment once (sessions and buffers
made), reset the kernel's peak-RSS mark (``/proc/self/clear_refs``, Linux), segment one image
with N boxes (decoded and assembled in chunks: ``pipeline.decode_and_assemble``), and report the
seconds of that ``segment`` and the peak resident memory during it. Flat memory and linear time
are what the streamed decode promises. Linux only (``/proc``).

    python benchmarks/bench_prompts.py --out benchmarks/results/prompts.json            # full-size synthetic
    python benchmarks/bench_prompts.py --model EXPORT_DIR --counts 10,100 --out x.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_cpu import machine_info  # same folder: one machine description for every benchmark

from cellsam_trt.pipeline import ASSEMBLY_CHUNK

CHILD = r"""
import json, resource, sys, time
import numpy as np
from cellsam_trt import CellSAM, SegmentSettings
model_dir, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
h, w = 512, 640
img = rng.normal(100, 20, (h, w)).clip(0, 255).astype(np.uint8)
xy = rng.uniform(0, [w - 20, h - 20], (n, 2))
boxes = np.concatenate([xy, xy + rng.uniform(6, 20, (n, 2))], 1).astype(np.float32)
def status(key):  # kB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
m = CellSAM.load(model_dir, backend="ort", threads=threads, settings=SegmentSettings(iou_threshold=-1e9)).warmup()
m.segment(img, boxes=boxes[:1])  # first run: every lazily made buffer exists
load_peak = status("VmHWM")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
res = m.segment(img, boxes=boxes)
sec = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({"boxes": n, "seconds": sec, "peak_rss_mib": peak / 1024, "rss_before_mib": base / 1024,
                  "load_peak_rss_mib": load_peak / 1024, "cells": int(res.labels.max()),
                  "kept": int(len(res.iou_predictions))}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="export directory (default: the full-size synthetic checkpoint, exported once)")
    ap.add_argument("--counts", default="10,100,1000,10000,20000")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from cellsam_trt.export.cache import export_on_the_fly
        from cellsam_trt.model.synthetic import synthetic_checkpoint

        model = str(export_on_the_fly(synthetic_checkpoint(0), synthetic_seed=0, log=print))
    rows = []
    for n in (int(c) for c in args.counts.split(",")):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, model, str(n), str(args.threads)], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    first = rows[0]
    for r in rows:
        r["ms_per_box"] = 1000 * r["seconds"] / r["boxes"]
        r["peak_rss_growth_mib"] = r["peak_rss_mib"] - first["peak_rss_mib"]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "model": model,
        "image": [512, 640],
        "backend": "ort (FP32)",
        "assembly_chunk": ASSEMBLY_CHUNK,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
