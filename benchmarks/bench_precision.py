"""Agreement of the precision-annotated graphs with FP32, on the CPU with ONNX Runtime.

    python benchmarks/bench_precision.py --export cellsam-onnx/ --calib-images calib/ \
        --out benchmarks/results/precision.json

For each precision (fp16, bf16, int8 Q/DQ) the export's annotated graphs are written when
missing (``export.precision.annotate_export``; int8 calibrated on ``--calib-images``), then:

* tensors: each annotated graph and its FP32 graph on the same inputs (the four sample images'
  encoder / CellFinder inputs, the FP32 embedding and each image's boxes for the decoder, in
  chunks of ``--chunk``): max |difference| and max |FP32| per output;
* masks: the whole box-prompt pipeline (every box of the four sample images) with the
  annotated encoder and decoder against FP32, as matched-instance IoU
  (``cellsam_trt.metrics.match_instances``);
* where ONNX Runtime's CPU provider cannot run a graph (no kernel for a type), the record says
  so with ONNX Runtime's message, and nothing is measured for it.

JSON with machine info and the FP32 reference measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
IMAGES = ("YeaZ", "YeastNet", "ep_micro", "tissuenet")


def machine() -> dict:
    import onnxruntime

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": sys.version.split()[0],
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def backend(work: Path, files: dict[str, str], threads: int):
    """An ``OrtBackend`` on the CPU whose graphs are the FP32 export's, except those in
    ``files`` (graph -> annotated file). The whole decoder (``prompt_decoder``), as TensorRT
    builds it. A benchmark-only stand-in: the library runs annotated graphs on ONNX Runtime
    only through the TensorRT provider."""
    from cellsam_trt.engine.ort_backend import OrtBackend

    class Annotated(OrtBackend):
        def _file(self, name):
            return work / files[name] if name in files else super()._file(name)

    return Annotated(work, providers=["cpu"], threads=threads, split_decoder=False, decode_chunk=16)


def segment(be, image, boxes):
    from cellsam_trt import pipeline

    return pipeline.segment(be, image, pipeline.Prompts(boxes=np.asarray(boxes, np.float32)), return_embedding=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="export directory (annotated graphs are added to a copy)")
    ap.add_argument("--work", help="where the copy with the annotated graphs goes (default: <export>-precision)")
    ap.add_argument("--calib-images", help="folder of calibration images for int8 (default: the sample images)")
    ap.add_argument("--precisions", default="fp16,bf16,int8")
    ap.add_argument("--images", default=",".join(IMAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision.json"))
    args = ap.parse_args(argv)

    from cellsam_trt.export import precision as P
    from cellsam_trt.io import read_image
    from cellsam_trt.metrics import match_instances
    from cellsam_trt.runtime import specs as S
    from cellsam_trt.runtime.manifest import read_manifest

    work = Path(args.work or (str(Path(args.export).resolve()) + "-precision"))
    if not work.exists():
        shutil.copytree(args.export, work)
    manifest = read_manifest(work)
    adv = bool(manifest["adv_mode"])
    calib = args.calib_images
    if calib is None:
        calib = str(work.parent / (work.name + "-calib"))
        Path(calib).mkdir(exist_ok=True)
        for name in IMAGES:
            shutil.copy(REFERENCE / "sample_imgs" / f"{name}.png", calib)
    images = {
        n: (
            read_image(REFERENCE / "sample_imgs" / f"{n}.png"),
            json.loads((REFERENCE / "inputs" / f"{n}_boxes.json").read_text())["boxes"],
        )
        for n in args.images.split(",")
    }
    from cellsam_trt import pipeline
    from cellsam_trt import preprocess as pre
    from cellsam_trt.prompts import scale_boxes_to_model
    from cellsam_trt.runtime.prompt_layout import prompt_tokens

    t0 = time.time()
    fp32 = backend(work, {}, args.threads)
    ref = {}
    for n, (img, boxes) in images.items():
        t = time.time()
        seg = segment(fp32, img, boxes)
        sq = pipeline.prepare(img, pipeline.SegmentSettings()).squashed
        ref[n] = {
            "labels": seg.labels,
            "seconds": time.time() - t,
            "feeds": {
                S.ENCODER: {"image": pre.sam_encoder_input(sq, adv)},
                S.CELLFINDER: {"image": pre.cellfinder_input(sq, adv)},
            },
        }
        emb = fp32.encode(ref[n]["feeds"][S.ENCODER]["image"])
        b = np.asarray(boxes, np.float32)[: args.chunk]
        coords, labs = prompt_tokens(boxes=scale_boxes_to_model(b, *img.shape[:2]))
        ref[n]["feeds"][S.DECODER] = {"image_embeddings": emb, "point_coords": coords, "point_labels": labs}
        print(
            f"fp32 {n}: {len(boxes)} boxes, {int(seg.labels.max())} cells, {ref[n]['seconds']:.1f} s", file=sys.stderr
        )
    fp32.close()
    record = {
        "what": "precision-annotated ONNX graphs vs FP32 on the CPU (ONNX Runtime CPU provider), box prompts",
        "machine": machine(),
        "export": str(Path(args.export).resolve()),
        "sam_embed_dim": manifest.get("config", {}).get("sam", {}).get("embed_dim"),
        "threads": args.threads,
        "fp32": {
            n: {"boxes": len(images[n][1]), "cells": int(r["labels"].max()), "seconds": r["seconds"]}
            for n, r in ref.items()
        },
        "precisions": {},
    }
    for p in args.precisions.split(","):
        rec: dict = {}
        try:
            t = time.time()
            P.annotate_export(
                work, p, calib_images=calib if p == "int8" else None, log=lambda m: print(m, file=sys.stderr)
            )
            rec["annotate_seconds"] = time.time() - t
        except P.PrecisionError as e:
            rec["error"] = str(e)
            record["precisions"][p] = rec
            print(f"{p}: {e}", file=sys.stderr)
            continue
        manifest = read_manifest(work)
        files = {}
        for g in (S.ENCODER, S.DECODER, S.CELLFINDER):
            gp = "fp16" if p == "int8" and g == S.DECODER else p
            if g in manifest["models"] and gp in manifest["models"][g].get("annotated", {}):
                files[g] = manifest["models"][g]["annotated"][gp]["file"]
        rec["files"] = files
        rec["annotation"] = {g: manifest["models"][g]["annotated"] for g in files}
        tensors = {}
        for g, f in files.items():
            per = []
            for n, r in ref.items():
                c = P.compare_graphs(work / manifest["models"][g]["file"], work / f, r["feeds"][g], g, p, args.threads)
                per.append(
                    {
                        "image": n,
                        "runs": c.runs,
                        "error": c.error,
                        "max_abs_diff": c.max_abs_diff,
                        "max_abs_ref": c.max_abs_ref,
                    }
                )
                if not c.runs:
                    break
            tensors[g] = per
        rec["tensors"] = tensors
        if all(tensors[g][0]["runs"] for g in (S.ENCODER, S.DECODER) if g in tensors):
            be = backend(work, {g: f for g, f in files.items() if g in (S.ENCODER, S.DECODER)}, args.threads)
            masks = {}
            for n, (img, boxes) in images.items():
                t = time.time()
                m = match_instances(ref[n]["labels"], segment(be, img, boxes).labels)
                masks[n] = {
                    "seconds": time.time() - t,
                    "fp32_seconds": ref[n]["seconds"],
                    "n_fp32": m.n_reference,
                    "n_test": m.n_test,
                    "mean_iou": m.mean_iou,
                    "frac_matched_50": m.frac_matched_50,
                    "pixel_agreement": m.pixel_agreement,
                }
                print(f"{p} {n}: {masks[n]}", file=sys.stderr)
            be.close()
            rec["masks"] = masks
        else:
            rec["masks"] = "not measured: ONNX Runtime's CPU provider cannot run the annotated encoder / decoder"
        record["precisions"][p] = rec
    record["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
