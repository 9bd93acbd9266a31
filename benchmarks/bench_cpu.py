"""CPU benchmark: official-style PyTorch vs our PyTorch pipeline vs ONNX Runtime vs OpenVINO.

All configurations run in the same process, on the same images and prompts, with the same
thread count, so their ratios are comparable even on a loaded machine:

* ``torch_official_style``: the official code's structure on our PyTorch modules: the image
  encoder, then for each box one prompt-encoder + mask-decoder call, each kept mask upsampled
  to 1024 x 1024 and then to H x W with ``F.interpolate`` and thresholded, later mask wins,
  then the official hole filling. (Preprocessing is the pipeline's ``prepare`` stage, our NumPy
  port, which computes the same values as the official code.)
* ``torch_batched``: the pipeline's stages (``cellsam_trt.pipeline``) on ``TorchBackend`` (all
  boxes of an image in one decoder call, image side broadcast, cropped label assembly).
* ``ort_fp32`` / ``ort_int8``: the pipeline's stages on ``OrtBackend`` (INT8: dynamic-INT8 image
  encoder; the decoder stays FP32), image by image; and ``CellSAM.segment_many`` with the CPU
  scheduler (pre/post-processing overlapped with inference) for the end-to-end rate. Both run the split
  decoder (``prompt_context`` once per image, ``context_decoder`` one box per call), the CPU
  default; ``ort_fp32_whole_decoder`` is FP32 with the whole ``prompt_decoder`` graph in calls of
  16 boxes, for comparison.
* ``ov_fp32`` / ``ov_bf16`` / ``ov_int8``: the pipeline's stages on ``OvBackend`` (OpenVINO, the
  same export; BF16 only where the CPU has native BF16, otherwise skipped with OpenVINO's reason
  in ``skipped``; INT8: the NNCF-quantized image encoder, made with ``--calib-images`` when the
  export has none; decoder FP32), image by image and through ``segment_many``. Their label maps
  are compared with ``ort_fp32`` (FP32 parity) and with ``ov_fp32`` (BF16 / INT8 agreement:
  matched-instance IoU per image).

Inputs: the four sample images (``<reference>/sample_imgs/*.png``) with all their boxes
(``<reference>/inputs/<name>_boxes.json``), box-prompt mode. Per-stage times (preprocess,
encode, decode, postprocess) and achieved GFLOP/s per stage are reported against this CPU's
matrix-multiply ceiling measured in the same run, per precision: float32 (NumPy, ONNX Runtime,
OpenVINO MatMul), OpenVINO bf16 (native BF16 CPUs only) and OpenVINO INT8 (an NNCF-quantized
MatMul); each configuration's stages are compared with the ceiling of the precision they run in.
FLOPs are the models' own (counted with ``torch.utils.flop_counter`` on the official-style
computation: one image encoder pass, one single-box decoder call per box), so a faster
formulation shows as a higher effective rate. The split decoder's executed FLOPs (its
per-image part, and per box) are counted the same way and reported as ``decode_executed``.

    python benchmarks/bench_cpu.py --export /tmp/cellsam-onnx --out benchmarks/results/cpu.json
    python benchmarks/bench_cpu.py --export /tmp/cellsam-onnx --decoder-choice   # OpenVINO decoder forms

The export directory is created (``cellsam-trt export --int8`` on the synthetic checkpoint)
when it holds no manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's OpenMP threads crawl on a loaded machine

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        info["simd"] = sorted({f for f in flags.split() if f.startswith(("avx512_vnni", "avx512f", "avx2", "amx"))})
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["loadavg_start"] = os.getloadavg()
    return info


def matmul_ceiling(threads: int) -> dict:
    """Best-of-5 GFLOP/s of a 2048^3 float32 matmul in NumPy and in ONNX Runtime (``threads``)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = 2048
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)

    def best(fn, reps=5):
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return 2 * n**3 / min(t) / 1e9

    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "mm",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = {"numpy_gflops": best(lambda: a @ b), "ort_gflops": best(lambda: sess.run(None, {"a": a, "b": b}))}
    try:
        out.update(openvino_matmul(a, b, threads, best))
    except ImportError:
        pass
    out["ceiling_gflops"] = max(v for k, v in out.items() if k in ("numpy_gflops", "ort_gflops", "ov_fp32_gflops"))
    out["ceiling_gflops_per_precision"] = {
        "fp32": out["ceiling_gflops"],
        "bf16": out.get("ov_bf16_gflops"),
        "int8": out.get("ov_int8_gflops"),
    }
    return out


def openvino_matmul(a: np.ndarray, b: np.ndarray, threads: int, best) -> dict:
    """OpenVINO MatMul GFLOP/s of activations ``a`` times constant weights ``b`` (as in the models):
    f32, bf16 (where the CPU has native BF16) and INT8 (the MatMul quantized by NNCF)."""
    import nncf
    import openvino as ov
    import openvino.opset13 as ops
    import openvino.properties as props
    import openvino.properties.hint as hints

    from cellsam_trt.engine.openvino_backend import cpu_capabilities

    core = ov.Core()
    caps = cpu_capabilities(core)

    def model():
        x = ops.parameter(list(a.shape), ov.Type.f32, name="a")
        return ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x], "mm")

    def rate(m, precision):
        cfg = {hints.inference_precision: precision, props.inference_num_threads: threads}
        req = core.compile_model(m, "CPU", cfg).create_infer_request()
        return best(lambda: req.infer({0: a}))

    out = {"ov_capabilities": caps, "ov_fp32_gflops": rate(model(), ov.Type.f32)}
    if "BF16" in caps:
        out["ov_bf16_gflops"] = rate(model(), ov.Type.bf16)
    quantized = nncf.quantize(model(), nncf.Dataset([a]), subset_size=1, target_device=nncf.TargetDevice.CPU)
    out["ov_int8_gflops"] = rate(quantized, ov.Type.f32)
    return out


def count_flops(sam) -> dict:
    """Model FLOPs: one image-encoder pass, one single-box prompt encoder + mask decoder call
    (the official computation); and what the exported split decoder executes: its per-image
    part (``prompt_context``) and its per-box part (``context_decoder``, one box)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cellsam_trt.export.wrappers import PromptDecoderGraph
    from cellsam_trt.runtime.prompt_layout import prompt_tokens

    box = np.array([[100.0, 100.0, 160.0, 170.0]], np.float32)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            emb = sam.image_encoder(torch.zeros(1, 3, 1024, 1024))
        enc = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            sam.decode(emb, boxes=torch.from_numpy(box))
        dec = fc.get_total_flops()
        graph = PromptDecoderGraph(sam).eval()
        with FlopCounterMode(display=False) as fc:
            ctx = graph.context(emb)
        ctx_flops = fc.get_total_flops()
        coords, labels = (torch.from_numpy(a) for a in prompt_tokens(boxes=box))
        with FlopCounterMode(display=False) as fc:
            graph.decode_context(*ctx, coords, labels)
        box_flops = fc.get_total_flops()
    return {
        "encoder_gflop": enc / 1e9,
        "decoder_gflop_per_box": dec / 1e9,
        "split_decoder_executed": {"context_gflop_per_image": ctx_flops / 1e9, "gflop_per_box": box_flops / 1e9},
    }


def load_inputs(reference: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from cellsam_trt import io as cio

    out = []
    for png in sorted((reference / "sample_imgs").glob("*.png")):
        boxes = json.loads((reference / "inputs" / f"{png.stem}_boxes.json").read_text())["boxes"]
        out.append((png.stem, cio.read_image(png), np.asarray(boxes, np.float32)))
    return out


def sample_image_folder(reference: Path, folder: Path) -> Path:
    """``folder`` (created) with links to the sample images, without the ``*_pred.npy`` label
    maps beside them: the default calibration images."""
    folder.mkdir(parents=True, exist_ok=True)
    for png in sorted((Path(reference) / "sample_imgs").glob("*.png")):
        if not (folder / png.name).exists():
            (folder / png.name).symlink_to(png.resolve())
    return folder


class TimedBackend:
    """Backend proxy that accumulates the seconds spent in encode / detect / decode (host arrays:
    ``device_resident`` is off, so the pipeline's stages call ``encode`` / ``decode`` plainly)."""

    device_resident = False

    def __init__(self, backend) -> None:
        self.b = backend
        self.name, self.adv_mode, self.has_detector = backend.name, backend.adv_mode, backend.has_detector
        self.device, self.precision = backend.device, backend.precision
        self.t = {"encode": 0.0, "detect": 0.0, "decode": 0.0}

    def _timed(self, key, fn, *a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            self.t[key] += time.perf_counter() - t0

    def encode(self, x):
        return self._timed("encode", self.b.encode, x)

    def detect(self, x):
        return self._timed("detect", self.b.detect, x)

    def decode(self, emb, boxes=None, points=None, point_labels=None):
        return self._timed("decode", self.b.decode, emb, boxes=boxes, points=points, point_labels=point_labels)

    def decode_chunks(self, emb, boxes=None, points=None, point_labels=None, chunk=None):
        """The backend's chunk stream, timing only the time spent producing each chunk (the
        pipeline assembles labels between chunks)."""
        it = self.b.decode_chunks(emb, boxes=boxes, points=points, point_labels=point_labels, chunk=chunk)
        while True:
            t0 = time.perf_counter()
            try:
                part = next(it)
            except StopIteration:
                return
            finally:
                self.t["decode"] += time.perf_counter() - t0
            yield part

    def __getattr__(self, name):  # anything else (specs, decode_chunk, ...): the backend's
        return getattr(self.b, name)


def _new_run() -> dict:
    return {
        "seconds": 0.0,
        "stages": {"preprocess": 0.0, "encode": 0.0, "decode": 0.0, "postprocess": 0.0},
        "per_image_s": {},
        "labels": {},
    }


def pipeline_image(run: dict, settings, tb: TimedBackend, stem: str, image, boxes) -> None:
    """One image through the pipeline's stages (``prepare``, then ``segment_prepared``: prompts,
    embed, decode, assemble, finish) on ``tb``, accumulating per-stage seconds into ``run``."""
    from cellsam_trt import pipeline as P

    t0 = time.perf_counter()
    prepared = P.prepare(image, settings)
    t1 = time.perf_counter()
    before = dict(tb.t)
    res = P.segment_prepared(tb, prepared, P.Prompts(boxes=boxes), settings)
    t2 = time.perf_counter()
    enc, dec = tb.t["encode"] - before["encode"], tb.t["decode"] - before["decode"]
    st = run["stages"]
    st["preprocess"] += t1 - t0
    st["encode"] += enc
    st["decode"] += dec
    st["postprocess"] += (t2 - t1) - enc - dec
    run["seconds"] += t2 - t0
    run["per_image_s"][stem] = t2 - t0
    run["labels"][stem] = res.labels


def official_style_image(run: dict, sam, adv_mode: bool, settings, stem: str, image, boxes) -> None:
    """The official structure: per-box decoder calls and full-size per-mask upsampling (torch)."""
    import torch
    import torch.nn.functional as F

    from cellsam_trt import labels as L
    from cellsam_trt import pipeline as P
    from cellsam_trt import preprocess as pre
    from cellsam_trt import prompts as prompt_ops

    t0 = time.perf_counter()
    prepared = P.prepare(image, settings)  # channels, percentile clip + CLAHE, squash to 1024
    x = torch.from_numpy(pre.sam_encoder_input(prepared.squashed, adv_mode))
    h, w = prepared.height, prepared.width
    b1024 = torch.from_numpy(prompt_ops.scale_boxes_to_model(P.box_prompts(boxes), h, w))
    t1 = time.perf_counter()
    t_dec = t_post = 0.0
    masks = []
    with torch.no_grad():
        emb = sam.image_encoder(x)
        t2 = time.perf_counter()
        for i in range(len(b1024)):
            td = time.perf_counter()
            lr, iou = sam.decode(emb, boxes=b1024[i : i + 1])
            tp = time.perf_counter()
            t_dec += tp - td
            if float(iou[0, 0]) >= settings.iou_threshold:
                up = F.interpolate(lr, (1024, 1024), mode="bilinear", align_corners=False)
                up = F.interpolate(up, (h, w), mode="bilinear", align_corners=False)
                masks.append((up.sigmoid() > 0.4)[0, 0].numpy())
            t_post += time.perf_counter() - tp
    tp = time.perf_counter()
    lab = np.zeros((h, w), np.int32)
    for k, m in enumerate(masks):
        lab[m] = k + 1
    lab = L.fill_holes_and_remove_small_masks(lab, settings.min_size)
    t3 = time.perf_counter()
    t_post += t3 - tp
    st = run["stages"]
    st["preprocess"] += t1 - t0
    st["encode"] += t2 - t1
    st["decode"] += t_dec
    st["postprocess"] += t_post
    run["seconds"] += t3 - t0
    run["per_image_s"][stem] = t3 - t0
    run["labels"][stem] = lab


def run_many(model, inputs) -> dict:
    """``CellSAM.segment_many`` on every input (box prompts), results in input order."""
    from cellsam_trt.pipeline import Prompts

    t0 = time.perf_counter()
    out = list(model.segment_many([i for _, i, _ in inputs], [Prompts(boxes=b) for _, _, b in inputs]))
    total = time.perf_counter() - t0
    errors = [str(r.error) for r in out if not r.ok]
    return {
        "seconds": total,
        "images_per_s": len(inputs) / total,
        "errors": errors,
        "labels": {stem: r.segmentation.labels for (stem, _, _), r in zip(inputs, out) if r.ok},
    }


def openvino_backend(result: dict, name: str, precision: str, export: Path, threads: int, args):
    """``OvBackend`` for configuration ``name`` with its graphs compiled (outside the timings), or
    None with the reason in ``result["skipped"]`` (OpenVINO missing, no native BF16 on this CPU).
    INT8: the export's NNCF INT8 IR, quantized now (``--calib-images``) when it has none."""
    try:
        from cellsam_trt.engine.openvino_backend import OvBackend, cpu_capabilities, precision_problem
    except ImportError as e:
        result["skipped"][name] = f"openvino not installed ({e})"
        return None
    problem = precision_problem(precision, cpu_capabilities())
    if problem:
        result["skipped"][name] = problem
        print(f"  skipping {name}: {problem}", flush=True)
        return None
    if precision == "int8":
        from cellsam_trt.engine.base import BackendError

        try:
            OvBackend(export, precision="int8")
        except BackendError:  # quantize in a process of its own: NNCF's peak memory is freed after it
            import subprocess

            calib = args.calib_images or sample_image_folder(args.reference, export / "openvino" / "calibration_images")
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "cellsam_trt.cli", "quantize", "--model", str(export), "--calib-images"]
            subprocess.run(cmd + [str(calib)], check=True)
            result["openvino"]["int8_quantize_s"] = time.perf_counter() - t0
        index = json.loads((export / "openvino" / "ir.json").read_text())
        result["openvino"]["int8_calibration"] = {
            k: v for k, v in index.items() if k.endswith(".int8")
        }  # which images, NNCF version
    backend = OvBackend(export, precision=precision, threads=threads)
    t0 = time.perf_counter()
    backend.warmup()
    backend.encode(np.zeros((1, 3, 1024, 1024), np.float32))
    backend.decode(np.zeros((1, 256, 64, 64), np.float32), boxes=np.array([[0, 0, 10, 10]], np.float32))
    result["openvino"][f"{name}_load_s"] = time.perf_counter() - t0
    result["openvino"]["capabilities"] = backend.capabilities
    result["openvino"][f"{name}_sources"] = dict(backend.sources)
    return backend


def decoder_choice(result: dict, export: Path, reference: Path, threads: int, out_path: str) -> int:
    """OpenVINO decoder forms on one embedding and the first 64 boxes of YeaZ (1024 frame), FP32
    and (native BF16 CPUs) BF16, interleaved, best of 3: the whole ``prompt_decoder`` in chunks of
    16 and 64 vs the split decoder (``prompt_context`` once, ``context_decoder`` one box per call
    on 1 or 2 streams); ONNX Runtime's split decoder (its CPU default) as the reference."""
    from cellsam_trt.engine.openvino_backend import OvBackend, cpu_capabilities, precision_problem
    from cellsam_trt.engine.ort_backend import OrtBackend

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    boxes = json.loads((reference / "inputs" / "YeaZ_boxes.json").read_text())["boxes"][:64]
    boxes = np.asarray(boxes, np.float32) * (1024 / 480)  # roughly the 1024 frame; only the count matters
    configs = {"ort_fp32_split_2_streams": OrtBackend(export, threads=threads)}
    caps = cpu_capabilities()
    result["openvino_capabilities"] = caps
    result["skipped"] = {}
    for prec in ("fp32", "bf16"):
        problem = precision_problem(prec, caps)
        if problem:
            result["skipped"][prec] = problem
            continue
        for chunk in (16, 64):
            configs[f"ov_{prec}_whole_chunk_{chunk}"] = OvBackend(
                export, precision=prec, threads=threads, split_decoder=False, decode_chunk=chunk
            )
        for streams in (1, 2):
            configs[f"ov_{prec}_split_{streams}_streams"] = OvBackend(
                export, precision=prec, threads=threads, split_decoder=True, decode_streams=streams
            )
    ref = None
    for name, b in configs.items():  # compile outside the timings
        lr, _ = b.decode(emb, boxes=boxes[:4])
        if ref is None:
            ref = lr
        result.setdefault("max_abs_diff_vs_ort", {})[name] = float(np.abs(lr - ref).max())
    times: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(3):
        for name, b in configs.items():
            t0 = time.perf_counter()
            b.decode(emb, boxes=boxes)
            times[name].append(time.perf_counter() - t0)
            print(f"  rep {rep} {name}: {times[name][-1] / len(boxes) * 1e3:.1f} ms/box", flush=True)
    result["boxes"] = len(boxes)
    result["ms_per_box"] = {k: min(v) / len(boxes) * 1e3 for k, v in times.items()}
    result["all_seconds"] = times
    for prec in ("fp32", "bf16"):
        mine = {k: v for k, v in result["ms_per_box"].items() if k.startswith(f"ov_{prec}_")}
        if mine:
            result.setdefault("fastest", {})[prec] = min(mine, key=mine.get)
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(out_path)
    if out.name == "bench_cpu.json":
        out = out.with_name("openvino_decoder.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    for k, v in result["ms_per_box"].items():
        print(f"| {k} | {v:.1f} ms/box |")
    print(f"fastest: {result.get('fastest')}; written {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="export directory (created with --int8 when absent)")
    ap.add_argument("--checkpoint", help="checkpoint (default: the synthetic one, seed 0)")
    ap.add_argument("--reference", default=str(ROOT.parent / "shared" / "reference"))
    ap.add_argument("--threads", type=int, default=0, help="threads for every configuration (0 = all cores)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_cpu.json"))
    ap.add_argument("--skip", default="", help="comma-separated configurations to skip")
    ap.add_argument("--images", default="", help="comma-separated image stems (default: all four)")
    ap.add_argument("--max-boxes", type=int, default=0, help="use the first N boxes of each image (0 = all)")
    ap.add_argument(
        "--calib-images",
        default=None,
        help="folder of images for OpenVINO INT8 calibration when the export has none "
        "(default: the PNGs of <reference>/sample_imgs, which are also the benchmark's inputs)",
    )
    ap.add_argument(
        "--decoder-choice",
        action="store_true",
        help="only measure the OpenVINO decoder forms (whole decoder in chunks vs split per prompt, FP32 / BF16)",
    )
    args = ap.parse_args(argv)

    import torch

    from cellsam_trt.api import CellSAM
    from cellsam_trt.engine.ort_backend import OrtBackend
    from cellsam_trt.engine.torch_backend import TorchBackend
    from cellsam_trt.metrics import match_instances
    from cellsam_trt.model.checkpoint import load_checkpoint
    from cellsam_trt.model.synthetic import synthetic_checkpoint
    from cellsam_trt.pipeline import SegmentSettings
    from cellsam_trt.runtime.manifest import MANIFEST

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    skip = set(filter(None, args.skip.split(",")))
    ckpt = Path(args.checkpoint) if args.checkpoint else synthetic_checkpoint(0)
    export = Path(args.export)
    if not (export / MANIFEST).is_file():
        from cellsam_trt.cli import main as cli

        rc = cli(["export", "--checkpoint", str(ckpt), "--out", str(export), "--int8", "--validate-batches", "1"])
        if rc:
            return rc
    result = {"machine": machine_info(), "threads": threads, "checkpoint": str(ckpt), "export": str(export)}
    if args.decoder_choice:
        return decoder_choice(result, export, Path(args.reference), threads, args.out)
    result["matmul"] = matmul_ceiling(threads)
    print(f"matmul ceiling: {result['matmul']}", flush=True)
    model = load_checkpoint(ckpt).model
    sam = model.mask_sam.eval()
    result["flops"] = count_flops(sam)
    inputs = load_inputs(Path(args.reference))
    if args.images:
        inputs = [i for i in inputs if i[0] in args.images.split(",")]
    if args.max_boxes:
        inputs = [(stem, img, b[: args.max_boxes]) for stem, img, b in inputs]
    n_boxes = int(sum(len(b) for _, _, b in inputs))
    result["inputs"] = {stem: {"shape": list(img.shape), "boxes": int(len(b))} for stem, img, b in inputs}
    settings = SegmentSettings()

    # every configuration on image 1, then every configuration on image 2, ...: a changing
    # machine load spreads over all of them instead of penalising one
    runners = {}
    if "torch_official_style" not in skip:
        runners["torch_official_style"] = lambda run, *a: official_style_image(run, sam, model.adv_mode, settings, *a)
    if "torch_batched" not in skip:
        tb = TimedBackend(TorchBackend(model))
        runners["torch_batched"] = lambda run, *a, tb=tb: pipeline_image(run, settings, tb, *a)
    ort_backends = {}
    for name, prec, split in (
        ("ort_fp32", "fp32", None),
        ("ort_int8", "int8", None),
        ("ort_fp32_whole_decoder", "fp32", False),
    ):
        if name in skip:
            continue
        backend = OrtBackend(export, precision=prec, threads=threads, split_decoder=split)
        backend.encode(np.zeros((1, 3, 1024, 1024), np.float32))  # session creation outside the timings
        backend.decode(np.zeros((1, 256, 64, 64), np.float32), boxes=np.array([[0, 0, 10, 10]], np.float32))
        if split is None:
            ort_backends[f"ort_{prec}"] = backend
        tb = TimedBackend(backend)
        runners[name] = lambda run, *a, tb=tb: pipeline_image(run, settings, tb, *a)
    result["skipped"] = {}
    result["openvino"] = {}
    for name, prec in (("ov_fp32", "fp32"), ("ov_bf16", "bf16"), ("ov_int8", "int8")):
        if name in skip:
            continue
        backend = openvino_backend(result, name, prec, export, threads, args)
        if backend is None:
            continue
        ort_backends[name] = backend
        tb = TimedBackend(backend)
        runners[name] = lambda run, *a, tb=tb: pipeline_image(run, settings, tb, *a)
    runs = {name: _new_run() for name in runners}
    for stem, image, boxes in inputs:
        for name, fn in runners.items():
            fn(runs[name], stem, image, boxes)
            print(f"  {name} {stem} ({len(boxes)} boxes): {runs[name]['per_image_s'][stem]:.1f} s", flush=True)
    for run in runs.values():
        run["images_per_s"] = len(inputs) / run["seconds"]
    for name, backend in ort_backends.items():
        runs[f"{name}_segment_many"] = r = run_many(CellSAM(backend, settings, scheduler="cpu"), inputs)
        print(f"  {name} segment_many: {r['seconds']:.1f} s", flush=True)

    f = result["flops"]
    ceilings = result["matmul"]["ceiling_gflops_per_precision"]
    base = runs.get("torch_official_style")
    for name, r in runs.items():
        r["speedup_vs_official_style"] = base["seconds"] / r["seconds"] if base else None
        st = r.get("stages")
        if st:
            n_img = len(inputs)
            r["gflops"] = {
                "encode": f["encoder_gflop"] * n_img / st["encode"] if st["encode"] else None,
                "decode": f["decoder_gflop_per_box"] * n_boxes / st["decode"] if st["decode"] else None,
            }
            # the ceiling of the precision each stage runs in (INT8: the encoder; decoders FP32)
            prec = {"ov_bf16": "bf16", "ov_int8": "int8", "ort_int8": "int8"}.get(name, "fp32")
            dec_prec = "bf16" if name == "ov_bf16" else "fp32"
            r["ceiling_gflops"] = {"encode": ceilings.get(prec), "decode": ceilings.get(dec_prec)}
            c = r["ceiling_gflops"]
            r["fraction_of_ceiling"] = {k: (v / c[k] if v and c[k] else None) for k, v in r["gflops"].items()}
            ceiling = r["ceiling_gflops"]["decode"]
            if name in ("ort_fp32", "ort_int8", "ov_fp32", "ov_bf16", "ov_int8") and st["decode"]:  # split decoder
                x = f["split_decoder_executed"]
                r["gflops"]["decode_executed"] = (
                    x["context_gflop_per_image"] * n_img + x["gflop_per_box"] * n_boxes
                ) / st["decode"]
                r["fraction_of_ceiling"]["decode_executed"] = r["gflops"]["decode_executed"] / ceiling
        if base and name != "torch_official_style":
            agree = [match_instances(base["labels"][s], r["labels"][s]) for s in base["labels"] if s in r["labels"]]
            r["agreement_vs_official_style"] = {
                "mean_matched_iou": float(np.mean([a.mean_iou for a in agree])),
                "frac_matched_50": float(np.mean([a.frac_matched_50 for a in agree])),
                "pixel_agreement": float(np.mean([a.pixel_agreement for a in agree])),
            }
        for ref in ("ort_fp32", "ov_fp32"):
            compare = {"ort_fp32": ("ort_int8", "ov_fp32"), "ov_fp32": ("ov_bf16", "ov_int8")}[ref]
            if ref in runs and name in compare and "labels" in r:
                agree = [match_instances(runs[ref]["labels"][s], r["labels"][s]) for s in r["labels"]]
                r[f"agreement_vs_{ref}"] = {
                    "per_image": {s: a.as_dict() for s, a in zip(r["labels"], agree)},
                    "mean_matched_iou": float(np.mean([a.mean_iou for a in agree])),
                    "frac_matched_50": float(np.mean([a.frac_matched_50 for a in agree])),
                    "min_frac_matched_50": float(min(a.frac_matched_50 for a in agree)),
                    "pixel_identical": float(
                        np.mean([(runs[ref]["labels"][s] == r["labels"][s]).mean() for s in r["labels"]])
                    ),
                }
    for r in runs.values():
        r.pop("labels", None)
    result["runs"] = runs
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(table(result))
    print(f"written {out}")
    return 0


def table(result: dict) -> str:
    rows = [
        "| configuration | seconds (all images) | images/s | vs official-style | preprocess s | encode s (GFLOP/s) "
        "| decode s (GFLOP/s) | postprocess s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        st, g = r.get("stages"), r.get("gflops", {})
        sp = r.get("speedup_vs_official_style")
        if st:
            rows.append(
                f"| {name} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | {sp:.2f}x | {st['preprocess']:.1f} "
                f"| {st['encode']:.1f} ({g['encode']:.0f}) | {st['decode']:.1f} ({g['decode']:.0f}) "
                f"| {st['postprocess']:.1f} |"
            )
        else:
            rows.append(f"| {name} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | {sp:.2f}x | | | | |")
    m = result["matmul"]
    x = result["flops"]["split_decoder_executed"]
    rows.append(
        f"\nmatmul ceiling: NumPy {m['numpy_gflops']:.0f}, ORT {m['ort_gflops']:.0f} GFLOP/s; "
        f"model FLOPs: encoder {result['flops']['encoder_gflop']:.0f} GFLOP/image, decoder "
        f"{result['flops']['decoder_gflop_per_box']:.2f} GFLOP/box (GFLOP/s above are of these); the "
        f"split decoder executes {x['context_gflop_per_image']:.2f} GFLOP/image + {x['gflop_per_box']:.2f} GFLOP/box"
    )
    rows.append(
        "matmul ceiling per precision (GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in m["ceiling_gflops_per_precision"].items() if v)
    )
    for name, why in result.get("skipped", {}).items():
        rows.append(f"{name}: skipped: {why}")
    for name, r in result["runs"].items():
        for ref in ("ort_fp32", "ov_fp32"):
            a = r.get(f"agreement_vs_{ref}")
            if a:
                rows.append(
                    f"{name} vs {ref}: mean matched IoU {a['mean_matched_iou']:.3f}, matched at 0.5 "
                    f"{a['frac_matched_50']:.3f} (lowest image {a['min_frac_matched_50']:.3f}), "
                    f"identical label pixels {a['pixel_identical']:.4f}"
                )
    for name, r in result["runs"].items():
        if "decode_executed" in r.get("gflops", {}):
            rows.append(
                f"{name} decode: {r['gflops']['decode_executed']:.0f} GFLOP/s executed "
                f"({r['fraction_of_ceiling']['decode_executed']:.0%} of the MatMul ceiling)"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
