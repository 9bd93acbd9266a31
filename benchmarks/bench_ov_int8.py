"""OpenVINO INT8 (NNCF) scopes against OpenVINO FP32 on the CPU: mask agreement and encoder time.

    python benchmarks/bench_ov_int8.py --export cellsam-onnx/ [--scopes mlp,all] [--smooth-quant off,on] \
        [--calib-images calib/] [--out benchmarks/results/openvino_int8_scopes.json]

For each scope (``export.openvino_int8``: ``mlp`` = the ViT MLP MatMuls, ``all`` = NNCF's choice
for transformers) and SmoothQuant setting (off: the default of ``cellsam-trt quantize``; on:
NNCF's transformer default) the image encoder is quantized into a work copy of the export (``--work``,
default ``<export>-ov-int8``; the export's own files are linked, never written), calibrated on
``--calib-images`` (default the four sample images, prepared as at run time), then the box-prompt
pipeline runs every box of the four sample images on ``OvBackend`` FP32 and INT8 (FP32 decoder
in both). Recorded per image: matched-instance IoU of the INT8 label map against FP32
(``cellsam_trt.metrics.match_instances``) and the encoder seconds of both, in one run
(FP32 first, then each scope, image by image), so the time is a ratio within the run.
JSON with machine info; written after each configuration (``<scope>`` or ``<scope>+sq``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench_cpu import TimedBackend, load_inputs, machine_info, sample_image_folder
from bench_precision import write

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


def run_images(backend, inputs) -> dict:
    """{image: (label map, encoder seconds)} for the box-prompt pipeline on ``backend``."""
    from cellsam_trt import pipeline

    out = {}
    for stem, image, boxes in inputs:
        tb = TimedBackend(backend)
        labels = pipeline.segment(tb, image, pipeline.Prompts(boxes=boxes)).labels
        out[stem] = (labels, tb.t["encode"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, type=Path, help="full-size export directory")
    ap.add_argument("--work", type=Path, help="work copy (links to the export's files; default <export>-ov-int8)")
    ap.add_argument("--scopes", default="mlp,all")
    ap.add_argument("--smooth-quant", default="off,on", help="off, on or off,on")
    ap.add_argument("--calib-images", type=Path, help="calibration folder (default: the four sample images)")
    ap.add_argument("--max-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "openvino_int8_scopes.json"))
    args = ap.parse_args(argv)

    from cellsam_trt.engine.openvino_backend import IR_DIR, IR_INDEX, OvBackend
    from cellsam_trt.export.openvino_int8 import SCOPES, quantize_export
    from cellsam_trt.metrics import match_instances

    scopes = [s for s in args.scopes.split(",") if s]
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise SystemExit(f"bench_ov_int8: unknown scope(s) {bad}; choose from {SCOPES}")
    sq = [s for s in args.smooth_quant.split(",") if s]
    if not sq or set(sq) - {"off", "on"}:
        raise SystemExit(f"bench_ov_int8: --smooth-quant takes off, on or off,on, got {args.smooth_quant!r}")
    configs = [(scope, s == "on") for s in sq for scope in scopes]
    work = args.work or Path(str(args.export.resolve()) + "-ov-int8")
    if not work.exists():  # links: quantize_export replaces (os.replace) what it writes, never the target
        shutil.copytree(args.export, work, copy_function=os.symlink)
    calib = args.calib_images or sample_image_folder(args.reference, work / "calibration_images")
    inputs = load_inputs(args.reference)
    t0 = time.time()
    fp32 = OvBackend(work, threads=args.threads)
    fp32.warmup()
    ref = run_images(fp32, inputs)
    fp32.close()
    record = {
        "what": "OpenVINO NNCF INT8 image encoder per scope vs OpenVINO FP32, box prompts, FP32 decoder",
        "machine": machine_info(),
        "export": str(args.export.resolve()),
        "calibration": {"folder": str(calib), "max_images": args.max_images},
        "fp32": {s: {"cells": int(lab.max()), "encode_s": t} for s, (lab, t) in ref.items()},
        "configs": {},
    }
    for scope, smooth in configs:
        name = scope + ("+sq" if smooth else "")
        t = time.time()
        quantize_export(work, calib, args.max_images, graphs=("image_encoder",), scope=scope, smooth_quant=smooth)
        rec = {"quantize_s": time.time() - t}
        rec["stamp"] = json.loads((work / IR_DIR / IR_INDEX).read_text())["image_encoder.int8"]
        be = OvBackend(work, precision="int8", threads=args.threads)
        be.warmup()
        got = run_images(be, inputs)
        be.close()
        rec["images"] = {}
        for stem, (labels, enc) in got.items():
            m = match_instances(ref[stem][0], labels)
            rec["images"][stem] = {
                "mean_iou": m.mean_iou,
                "frac_matched_50": m.frac_matched_50,
                "n_fp32": m.n_reference,
                "n_int8": m.n_test,
                "encode_s": enc,
                "encode_vs_fp32": ref[stem][1] / enc,
            }
            print(f"{name} {stem}: {rec['images'][stem]}", file=sys.stderr, flush=True)
        ious = [r["mean_iou"] for r in rec["images"].values()]
        rec["mean_iou_min_max"] = [min(ious), max(ious)]
        record["configs"][name] = rec
        write(record, args.out, time.time() - t0)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
