"""GPU benchmark: official-style FP32 pipeline vs the PyTorch FP16 / BF16 GPU path (same run).

    python benchmarks/bench_gpu.py                       # synthetic full-size checkpoint
    python benchmarks/bench_gpu.py --checkpoint cellsam_general.pt --images 20
    python benchmarks/bench_gpu.py --trt-engines engines/   # also the TensorRT backend
    python benchmarks/bench_gpu.py --images 2 --boxes 100 --warmup 1 --out r/bench.json --results-md r/bench.md

Workload: 1024 x 1024 synthetic fluorescence-like images with ~100 and ~600 cells, given as
box prompts (the decoder cost scales with the boxes; CellFinder is not timed here because a
synthetic checkpoint finds no cells).

Configurations, each over the same images:

* ``official-fp32``: the pipeline's stages (``cellsam_trt.pipeline``) in sequence on
  ``TorchBackend`` FP32 eager (no SDPA, no CUDA graphs, TF32 off) with one mask-decoder call
  per box (``decode_chunk=1``, as the official code loops over boxes), NumPy label assembly,
  one image after the other;
* ``ours-fp16`` / ``ours-bf16`` (and ``ours-fp32``): the GPU scheduler (``GpuScheduler``:
  overlapped stages, label assembly on the device) on ``TorchBackend(precision=...)`` (autocast
  with FP32 islands, SDPA, CUDA graphs for the encoder);
* ``trt`` (with ``--trt-engines``): the GPU scheduler on ``TrtBackend``.

Reported per configuration and box count: images/s end to end (wall clock over all images,
after warm-up), per-stage milliseconds (mean per image; for the overlapped pipeline the stages
run concurrently, so they do not add up to 1 / throughput), and the agreement of every
label map with the official FP32 one (matched-instance IoU, ``cellsam_trt.metrics``).

Writes ``--out`` JSON and appends a section to ``benchmarks/RESULTS.md`` (date, GPU, driver,
CUDA / torch / TensorRT versions). Exits with a message and status 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def synthetic_image(seed: int, n_cells: int, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(size, size) uint16 image of ``n_cells`` bright discs on noise, and their (n, 4) XYXY boxes."""
    rng = np.random.default_rng(seed)
    img = rng.normal(200, 30, (size, size))
    boxes = []
    r_max = 14 if n_cells <= 200 else 9
    for _ in range(n_cells):
        r = int(rng.integers(5, r_max))
        cy, cx = int(rng.integers(r, size - r)), int(rng.integers(r, size - r))
        y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(1500, 4000)
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    return np.clip(img, 0, 65535).astype(np.uint16), np.asarray(boxes, np.float32)


class TimedBackend:
    """Wraps a backend and accumulates wall seconds per method (results are NumPy, so each
    call has finished on the GPU when it returns)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.adv_mode, self.has_detector = inner.name, inner.adv_mode, inner.has_detector
        self.seconds = {"encode": 0.0, "detect": 0.0, "decode": 0.0}

    def _timed(self, what, *a, **k):
        t0 = time.perf_counter()
        out = getattr(self.inner, what)(*a, **k)
        self.seconds[what] += time.perf_counter() - t0
        return out

    def encode(self, image):
        return self._timed("encode", image)

    def detect(self, image):
        return self._timed("detect", image)

    def decode(self, embedding, boxes=None, points=None, point_labels=None):
        return self._timed("decode", embedding, boxes=boxes, points=points, point_labels=point_labels)

    def decode_chunks(self, embedding, boxes=None, points=None, point_labels=None, chunk=None):
        """The inner ``decode_chunks``, the time spent producing each chunk added to "decode"."""
        it = self.inner.decode_chunks(embedding, boxes=boxes, points=points, point_labels=point_labels, chunk=chunk)
        while True:
            t0 = time.perf_counter()
            try:
                part = next(it)
            except StopIteration:
                self.seconds["decode"] += time.perf_counter() - t0
                return
            self.seconds["decode"] += time.perf_counter() - t0
            yield part

    def __getattr__(self, name):  # anything else (specs, device, precision, ...) from the backend
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    for mod in ("tensorrt", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    from cellsam_trt import __version__

    info["cellsam_trt"] = __version__
    return info


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_scheduler():
    """The GPU scheduler class (``cellsam_trt.scheduler.GpuScheduler`` or ``cellsam_trt.gpu_scheduler``)."""
    try:
        from cellsam_trt.scheduler import GpuScheduler
    except ImportError:
        from cellsam_trt.gpu_scheduler import GpuScheduler
    return GpuScheduler


def run_official(model, images, boxes, warmup: int, device: str = "cuda") -> tuple[dict, list[np.ndarray]]:
    """Sequential FP32 eager pipeline, one decoder call per box; per-stage times."""
    from cellsam_trt import pipeline as P
    from cellsam_trt.engine.torch_backend import TorchBackend

    backend = TimedBackend(
        TorchBackend(model, device=device, precision="fp32", sdpa=False, cuda_graphs=False, decode_chunk=1)
    )
    settings = P.SegmentSettings()
    for i in range(warmup):
        P.segment(backend, images[i % len(images)], P.Prompts(boxes=boxes[i % len(images)]), settings)
    backend.seconds = dict.fromkeys(backend.seconds, 0.0)
    pre = post = 0.0
    labels = []
    _sync(device)
    t_all = time.perf_counter()
    for img, b in zip(images, boxes):
        t0 = time.perf_counter()
        prepared = P.prepare(img, settings)
        pre += time.perf_counter() - t0
        t1 = time.perf_counter()
        enc_before, dec_before = backend.seconds["encode"], backend.seconds["decode"]
        res = P.segment_prepared(backend, prepared, P.Prompts(boxes=b), settings)
        inner = backend.seconds["encode"] - enc_before + backend.seconds["decode"] - dec_before
        post += time.perf_counter() - t1 - inner
        labels.append(res.labels)
    wall = time.perf_counter() - t_all
    n = len(images)
    stages = {
        "preprocess": pre / n * 1e3,
        "encode": backend.seconds["encode"] / n * 1e3,
        "decode": backend.seconds["decode"] / n * 1e3,
        "postprocess": post / n * 1e3,
    }
    return {"images_per_s": n / wall, "stage_ms": stages, "wall_s": wall}, labels


def run_overlapped(backend, images, boxes, warmup: int, device: str = "cuda") -> tuple[dict, list[np.ndarray]]:
    """The GPU scheduler over all images (after ``warmup`` images through it)."""
    from cellsam_trt import pipeline as P

    GpuScheduler = _gpu_scheduler()
    sched = GpuScheduler(backend, P.SegmentSettings())
    prompts = [P.Prompts(boxes=b) for b in boxes]
    list(sched.run(images[:warmup] or images[:1], prompts[:warmup] or prompts[:1]))
    _sync(device)
    t0 = time.perf_counter()
    results = list(sched.run(images, prompts))
    wall = time.perf_counter() - t0
    errors = [repr(r.error) for r in results if not r.ok]
    if errors:
        raise RuntimeError(f"{len(errors)} image(s) failed: {errors[:3]}")
    n = len(images)
    stages = {s: float(np.mean([r.timings.get(s, 0.0) for r in results])) * 1e3 for s in GpuScheduler.STAGES}
    return {"images_per_s": n / wall, "stage_ms": stages, "wall_s": wall}, [r.segmentation.labels for r in results]


def agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    from cellsam_trt.metrics import match_instances

    ms = [match_instances(a, b) for a, b in zip(reference, candidate)]
    return {
        "mean_iou": float(np.mean([m.mean_iou for m in ms])),
        "min_mean_iou": float(np.min([m.mean_iou for m in ms])),
        "frac_matched": float(np.mean([m.frac_matched_50 for m in ms])),
        "f1": float(np.mean([m.f1_50 for m in ms])),
    }


def append_results_md(path: Path, report: dict) -> None:
    m = report["machine"]
    lines = [
        f"\n## {report['date']} — {m['gpu']} (sm {m['compute_capability']}), driver {m['driver']}",
        "",
        f"torch {m['torch']} (CUDA {m['cuda_runtime']}, cuDNN {m['cudnn']}), TensorRT {m['tensorrt']}, "
        f"cellsam-trt {m['cellsam_trt']}, Python {m['python']}; checkpoint: {report['checkpoint']}; "
        f"{report['images']} images of 1024 x 1024 per box count, {report['warmup']} warm-up.",
        "",
        "| config | boxes | images/s | x official | stage ms (mean per image) | mean matched IoU vs official "
        "| frac matched >= 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_ms"].items())
        agr = r.get("agreement") or {}
        lines.append(
            f"| {r['config']} | {r['boxes']} | {r['images_per_s']:.2f} | {r.get('speedup', 1.0):.2f} | {stages} | "
            f"{agr.get('mean_iou', float('nan')):.4f} | {agr.get('frac_matched', float('nan')):.4f} |"
        )
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="CellSAM checkpoint (default: the synthetic full-size one)")
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument("--images", type=int, default=10, help="images per box count")
    p.add_argument("--boxes", type=int, nargs="+", default=[100, 600])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--precisions",
        "--dtypes",
        nargs="+",
        default=["fp16", "bf16", "fp32"],
        help="torch backend precisions (fp16, bf16, fp32; float16 / bfloat16 / float32 accepted)",
    )
    p.add_argument("--trt-engines", help="also run the TensorRT backend on these engines")
    p.add_argument("--out", default=str(HERE / "bench_gpu.json"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("bench_gpu: PyTorch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device (torch.cuda.is_available() is False); this benchmark only runs on a GPU",
            file=sys.stderr,
        )
        return 2

    from cellsam_trt.engine.base import BackendError
    from cellsam_trt.engine.torch_backend import TorchBackend
    from cellsam_trt.model.checkpoint import load_checkpoint
    from cellsam_trt.model.synthetic import synthetic_checkpoint

    path = args.checkpoint or synthetic_checkpoint(args.synthetic_seed)
    model = load_checkpoint(path).model.eval()
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    precisions = [short.get(d, d) for d in args.precisions]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results_md).parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "checkpoint": str(path),
        "images": args.images,
        "warmup": args.warmup,
        "results": [],
    }
    for n_boxes in args.boxes:
        data = [synthetic_image(1000 * n_boxes + i, n_boxes) for i in range(args.images)]
        images, boxes = [d[0] for d in data], [d[1] for d in data]
        print(f"{n_boxes} boxes: official-fp32 ...", file=sys.stderr)
        base, ref_labels = run_official(model, images, boxes, args.warmup)
        report["results"].append(dict(base, config="official-fp32", boxes=n_boxes, speedup=1.0))
        configs = [(f"ours-{p}", lambda p=p: TorchBackend(model, device="cuda", precision=p)) for p in precisions]
        if args.trt_engines:
            from cellsam_trt.engine.trt_backend import TrtBackend

            configs.append(("trt", lambda: TrtBackend(args.trt_engines)))
        for name, make in configs:
            try:
                backend = make()
            except BackendError as e:  # e.g. BF16 on a GPU without it
                print(f"  {name}: skipped ({e})", file=sys.stderr)
                continue
            print(f"{n_boxes} boxes: {name} ...", file=sys.stderr)
            res, labels = run_overlapped(backend, images, boxes, args.warmup)
            res.update(
                config=name,
                boxes=n_boxes,
                speedup=res["images_per_s"] / base["images_per_s"],
                agreement=agreement(ref_labels, labels),
            )
            report["results"].append(res)
            if hasattr(backend, "close"):
                backend.close()
            del backend
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(report, indent=1))
    append_results_md(Path(args.results_md), report)
    for r in report["results"]:
        print(
            f"{r['config']:>14} {r['boxes']:>4} boxes: {r['images_per_s']:.2f} images/s (x{r['speedup']:.2f})",
            file=sys.stderr,
        )
    print(f"wrote {args.out} and appended to {args.results_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
