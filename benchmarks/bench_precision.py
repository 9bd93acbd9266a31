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
  so with ONNX Runtime's message, and nothing is measured for it;
* BF16 (ONNX Runtime's CPU provider has no BF16 arithmetic kernels): ``bf16_emulated`` runs a
  copy of the BF16 graph (``emulate_bf16``) in which every BF16 tensor is an FP32 tensor
  holding BF16-rounded values (each op computes in FP32, its output is rounded to BF16 by a
  Cast pair, round to nearest even), which is how BF16 GPU kernels store their results (FP32
  accumulation inside a kernel; fused kernels round less often). It is an emulation of the
  graph's BF16 storage, recorded under its own name, not a run of the BF16 graph.

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


def emulate_bf16(src: Path, dst: Path) -> dict:
    """Write ``dst``: the graph ``src`` with BF16 storage emulated in FP32 (see the module text).

    BF16 initializers / Constant values become FP32 (exact), ``Cast(to=BFLOAT16)`` becomes
    ``Cast(to=FLOAT)``, and every node output that ONNX shape inference types BF16 is followed
    by ``Cast(to=BFLOAT16) -> Cast(to=FLOAT)``. Returns counts of what was changed; a BF16 graph
    input / output, or a node output left untyped by inference, is counted, not guessed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bf, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    g = model.graph
    typed = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    typed.update({t.name: t.data_type for t in g.initializer})
    counts = {"initializers": 0, "casts": 0, "rounded_outputs": 0, "untyped_outputs": 0, "bf16_graph_io": 0}
    counts["bf16_graph_io"] = sum(typed.get(v.name) == bf for v in list(g.input) + list(g.output))
    for i, t in enumerate(g.initializer):
        if t.data_type == bf:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            counts["initializers"] += 1
    nodes = []
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"{src}: node {node.name} has a subgraph; emulate_bf16 handles flat graphs only")
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == bf:
                a.i = f32
                counts["casts"] += 1
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
                counts["initializers"] += 1
        nodes.append(node)
        for j, out in enumerate(node.output):
            if not out:
                continue
            if out not in typed:
                counts["untyped_outputs"] += 1
            elif typed[out] == bf:
                node.output[j] = f"{out}__fp32"
                nodes.append(helper.make_node("Cast", [f"{out}__fp32"], [f"{out}__bf16"], to=bf))
                nodes.append(helper.make_node("Cast", [f"{out}__bf16"], [out], to=f32))
                counts["rounded_outputs"] += 1
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # ONNX Runtime infers the (now FP32) intermediate types
    onnx.save(model, str(dst))
    return counts


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


def measure(work, manifest, files, p, ref, images, threads):
    """Tensors (each graph in ``files`` against its FP32 graph on every image's feeds) and masks
    (the box-prompt pipeline with the annotated encoder and decoder, matched-instance IoU
    against FP32 per image); masks are not measured where the encoder / decoder cannot run."""
    from cellsam_trt.export import precision as P
    from cellsam_trt.metrics import match_instances
    from cellsam_trt.runtime import specs as S

    tensors = {}
    for g, f in files.items():
        per = []
        for n, r in ref.items():
            c = P.compare_graphs(work / manifest["models"][g]["file"], work / f, r["feeds"][g], g, p, threads)
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
    if all(tensors[g][0]["runs"] for g in (S.ENCODER, S.DECODER) if g in tensors):
        be = backend(work, {g: f for g, f in files.items() if g in (S.ENCODER, S.DECODER)}, threads)
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
        return tensors, masks
    return tensors, "not measured: ONNX Runtime's CPU provider cannot run the annotated encoder / decoder"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="export directory (annotated graphs are added to a copy)")
    ap.add_argument("--work", help="where the copy with the annotated graphs goes (default: <export>-precision)")
    ap.add_argument("--calib-images", help="folder of calibration images for int8 (default: the sample images)")
    ap.add_argument("--precisions", default="fp16,bf16,int8")
    ap.add_argument("--calib-method", default="minmax", help="int8: minmax, percentile or entropy")
    ap.add_argument(
        "--int8-scope", default="mlp", help="int8: mlp (the ViT MLP MatMuls) or all (every trunk weight layer)"
    )
    ap.add_argument("--images", default=",".join(IMAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision.json"))
    args = ap.parse_args(argv)

    from cellsam_trt.export import precision as P
    from cellsam_trt.io import read_image
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
        "calib_method": args.calib_method,
        "int8_scope": args.int8_scope,
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
                work,
                p,
                calib_images=calib if p == "int8" else None,
                calib_method=args.calib_method,
                int8_scope=args.int8_scope,
                log=lambda m: print(m, file=sys.stderr),
            )
            rec["annotate_seconds"] = time.time() - t
        except P.PrecisionError as e:
            rec["error"] = str(e)
            record["precisions"][p] = rec
            write(record, args.out, time.time() - t0)
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
        rec["tensors"], rec["masks"] = measure(work, manifest, files, p, ref, images, args.threads)
        if p == "bf16" and not all(t[0]["runs"] for t in rec["tensors"].values()):
            em_files, em = {}, {"emulation": {}}
            for g, f in files.items():
                em_files[g] = f.replace(".onnx", ".emulated.onnx")
                em["emulation"][g] = emulate_bf16(work / f, work / em_files[g])
            em["files"] = em_files
            em["what"] = "the BF16 graphs' storage emulated in FP32 (emulate_bf16), not a BF16 run"
            em["tensors"], em["masks"] = measure(work, manifest, em_files, "bf16_emulated", ref, images, args.threads)
            record["precisions"]["bf16_emulated"] = em
        record["precisions"][p] = rec
        write(record, args.out, time.time() - t0)  # after each precision: a later failure keeps it
    write(record, args.out, time.time() - t0)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def write(record: dict, out: str, seconds: float) -> None:
    record["seconds"] = seconds
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    raise SystemExit(main())
