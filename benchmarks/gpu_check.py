"""GPU check of the torch backend on the tiny synthetic model, recorded as JSON.

    python benchmarks/gpu_check.py                          # CUDA, results in benchmarks/results/
    python benchmarks/gpu_check.py --out DIR --precisions fp16 bf16
    python benchmarks/gpu_check.py --device cpu --out DIR   # what can be checked without a GPU

``benchmarks/gpu_check.sh`` runs it (with the GPU tests and a short benchmark). Writes
``DIR/gpu_check.json``:

* ``environment``: device name, compute capability, torch / CUDA / cuDNN versions, BF16 support;
* ``checks``: one entry per check, each with ``status`` ("ok", "failed" or "skipped"), ``seconds``
  and its figures, or ``error`` / ``reason``:

  - ``cuda_graphs``: per precision, CUDA-graph vs eager max abs difference of the encoder and
    CellFinder outputs (capture call and replay), and whether two replays are bit-identical;
  - ``fp32_cuda_vs_cpu``: the FP32 CUDA backend (TF32 off) vs the FP32 CPU reference: embedding,
    low-res logits, IoU, CellFinder outputs (max abs and scaled difference); the caller's TF32
    setting restored after the calls. TF32 would give ~1e-3 relative differences, FP32 ~1e-6;
  - ``sdpa_kernels``: per precision, which SDPA implementation the backend's calls dispatch to
    (``aten::_scaled_dot_product_*`` ops seen by the profiler), and whether the encoder and the
    decoder run with SDPA restricted to fused kernels (``torch.nn.attention.sdpa_kernel``: flash
    and memory-efficient on CUDA, flash on the CPU), and with each kernel alone (recorded);
  - ``scheduler_vs_sequential``: per precision, through the front door (``CellSAM.load(...,
    backend="torch")``): ``segment_many`` (the GPU scheduler on CUDA) vs ``segment`` one image at
    a time on box prompts; label maps must be identical. A failure here is recorded, the
    script goes on.

On the CPU (``--device cpu``) the CUDA-only checks are skipped with their reason, and only FP32
is checked by default (CPU FP16 / BF16 convolutions are emulated: minutes). Exit status: 0 when
no check failed, 1 when one did, 2 when ``--device cuda`` finds no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

TOL = {  # scaled max abs difference (max |a - b| / max(1, max |b|)) allowed for graph vs eager
    "fp32": 1e-5,
    "fp16": 1e-2,
    "bf16": 5e-2,
}
FP32_CUDA_VS_CPU_TOL = 1e-4  # FP32 without TF32: ~1e-6; with TF32: ~1e-3


def _scaled(a, b) -> float:
    a, b = (np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x, np.float64) for x in (a, b))
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max()))) if a.size else 0.0


def _maxabs(a, b) -> float:
    a, b = (np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x, np.float64) for x in (a, b))
    return float(np.abs(a - b).max()) if a.size else 0.0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class Skip(Exception):
    """A check that does not apply here (the reason is recorded)."""


def run_check(report: dict, name: str, fn) -> None:
    """Run one check, recording its figures and status; an exception is a recorded failure."""
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    entry: dict = {}
    try:
        entry.update(fn() or {})
        entry.setdefault("status", "ok")
    except Skip as e:
        entry = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # recorded, the other checks go on
        entry.update(status="failed", error=_first_line(e), traceback=traceback.format_exc(limit=8))
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    report["checks"][name] = entry
    print(
        f"gpu_check: {name}: {entry['status']}"
        + (f" ({entry.get('error') or entry.get('reason') or ''})" if entry["status"] != "ok" else ""),
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------- inputs


def cells_image(seed: int, h: int, w: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) uint8 image of n bright discs on noise and their (n, 4) XYXY boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(20, 5, (h, w))
    boxes = []
    for _ in range(n):
        r = int(rng.integers(6, 14))
        cy, cx = int(rng.integers(r + 1, h - r - 1)), int(rng.integers(r + 1, w - r - 1))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 150
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    return np.clip(img, 0, 255).astype(np.uint8), np.array(boxes, np.float32)


def model_inputs(adv_mode: bool, seed: int = 0):
    """A realistic encoder input, the CellFinder input of the same image, and box prompts in the
    model frame."""
    from cellsam_trt import preprocess as pre
    from cellsam_trt import prompts as prompt_ops

    img, boxes = cells_image(seed, 200, 240, 12)
    sq = pre.squashed(pre.normalize_image(pre.to_three_channels(img)))
    return (
        pre.sam_encoder_input(sq, adv_mode),
        pre.cellfinder_input(sq, adv_mode),
        prompt_ops.scale_boxes_to_model(boxes, *img.shape),
    )


# --------------------------------------------------------------------------- checks


def environment(device: str) -> dict:
    import torch

    import cellsam_trt

    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cellsam_trt": cellsam_trt.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "requested_device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env.update(
            device_name=torch.cuda.get_device_name(idx),
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
        )
    else:
        env.update(
            device_name=f"CPU ({platform.processor() or platform.machine()})",
            compute_capability=None,
            bf16_supported=None,
        )
    return env


def check_cuda_graphs(model, device: str, precisions: list[str]) -> dict:
    import torch

    from cellsam_trt.engine.base import BackendError
    from cellsam_trt.engine.torch_backend import TorchBackend
    from cellsam_trt.runtime import specs as S

    if not device.startswith("cuda"):
        raise Skip("CUDA graphs need a CUDA device")
    enc_in, cf_in, _ = model_inputs(model.adv_mode)
    out: dict = {"per_precision": {}}
    failed = []
    for p in precisions:
        try:
            b = TorchBackend(model, device=device, precision=p, cuda_graphs=True)
        except BackendError as e:
            out["per_precision"][p] = {"status": "skipped", "reason": str(e)}
            continue
        res: dict = {}
        graphs = [(S.ENCODER, {"image": enc_in})]
        if b.has_detector:
            graphs.append((S.CELLFINDER, {"image": cf_in}))
        for graph, feeds in graphs:
            r = b.runner(graph)
            first = r.infer_tensors(feeds)  # capture + first replay
            second = r.infer_tensors(feeds)  # replay
            eager = r.infer_tensors(feeds, eager=True)
            torch.cuda.synchronize()
            names = b.specs[graph].output_names
            res[graph] = {
                "graphed": bool(getattr(r.fn, "graphs", None)),
                "max_abs_diff_vs_eager": {n: _maxabs(a, e) for n, a, e in zip(names, first, eager)},
                "max_abs_diff_replay_vs_eager": {n: _maxabs(a, e) for n, a, e in zip(names, second, eager)},
                "scaled_diff_vs_eager": max(_scaled(a, e) for a, e in zip(second, eager)),
                "replays_identical": all(bool(torch.equal(a, c)) for a, c in zip(first, second)),
            }
            res[graph]["ok"] = (
                res[graph]["graphed"]
                and res[graph]["replays_identical"]
                and res[graph]["scaled_diff_vs_eager"] <= TOL[p]
            )
            if not res[graph]["ok"]:
                failed.append(f"{p}/{graph}")
        out["per_precision"][p] = res
        b.close()
        del b
        torch.cuda.empty_cache()
    out["tolerance_scaled"] = {p: TOL[p] for p in precisions}
    if failed:
        out.update(status="failed", error=f"graph vs eager out of tolerance or not graphed: {failed}")
    return out


def _tf32_state():
    import torch

    b = torch.backends
    try:
        return {"matmul": b.cuda.matmul.fp32_precision, "cudnn_conv": b.cudnn.conv.fp32_precision}
    except AttributeError:
        return {"matmul_allow_tf32": b.cuda.matmul.allow_tf32, "cudnn_allow_tf32": b.cudnn.allow_tf32}


def check_fp32_cuda_vs_cpu(model, device: str) -> dict:
    import torch

    from cellsam_trt.engine.torch_backend import TorchBackend

    if not device.startswith("cuda"):
        raise Skip("needs a CUDA device (compares the CUDA FP32 backend with the CPU reference)")
    enc_in, cf_in, boxes = model_inputs(model.adv_mode, seed=1)
    cpu = TorchBackend(model)  # the eager FP32 reference
    emb_c = cpu.encode(enc_in)
    lr_c, iou_c = cpu.decode(emb_c, boxes=boxes)
    det_c = cpu.detect(cf_in) if cpu.has_detector else None
    b = torch.backends
    has_new = hasattr(b.cuda.matmul, "fp32_precision")
    saved = b.cuda.matmul.fp32_precision if has_new else b.cuda.matmul.allow_tf32
    try:  # the caller allows TF32: the backend must still run FP32, and leave the setting alone
        if has_new:
            b.cuda.matmul.fp32_precision = "tf32"
        else:
            b.cuda.matmul.allow_tf32 = True
        before = _tf32_state()
        gpu = TorchBackend(model, device=device)
        emb_g = gpu.encode(enc_in)
        lr_g, iou_g = gpu.decode(emb_g, boxes=boxes)
        lr_gc, _ = gpu.decode(emb_c, boxes=boxes)  # the same embedding: the decoder alone
        det_g = gpu.detect(cf_in) if gpu.has_detector else None
        after = _tf32_state()
    finally:
        if has_new:
            b.cuda.matmul.fp32_precision = saved
        else:
            b.cuda.matmul.allow_tf32 = saved
    out = {
        "backend": {"sdpa": gpu.sdpa, "cuda_graphs": gpu.cuda_graphs},
        "embedding": {"max_abs": _maxabs(emb_g, emb_c), "scaled": _scaled(emb_g, emb_c)},
        "lowres_logits": {"max_abs": _maxabs(lr_g, lr_c), "scaled": _scaled(lr_g, lr_c)},
        "lowres_logits_same_embedding": {"max_abs": _maxabs(lr_gc, lr_c), "scaled": _scaled(lr_gc, lr_c)},
        "iou_predictions": {"max_abs": _maxabs(iou_g, iou_c), "scaled": _scaled(iou_g, iou_c)},
        "callers_tf32_setting_restored": before == after,
        "tf32_setting": before,
        "tolerance_scaled": FP32_CUDA_VS_CPU_TOL,
    }
    if det_c is not None:
        out["pred_logits"] = {"max_abs": _maxabs(det_g[0], det_c[0]), "scaled": _scaled(det_g[0], det_c[0])}
        out["pred_boxes"] = {"max_abs": _maxabs(det_g[1], det_c[1]), "scaled": _scaled(det_g[1], det_c[1])}
    worst = max(v["scaled"] for v in out.values() if isinstance(v, dict) and "scaled" in v)
    out["worst_scaled"] = worst
    if worst > FP32_CUDA_VS_CPU_TOL or not out["callers_tf32_setting_restored"]:
        out.update(
            status="failed",
            error=f"worst scaled difference {worst:.3g} (tolerance {FP32_CUDA_VS_CPU_TOL}) "
            f"or TF32 setting not restored ({before} -> {after})",
        )
    return out


def _sdpa_ops(fn) -> list[str]:
    """The ``aten::_scaled_dot_product_*`` / ``_efficient_attention`` / ``_flash_attention`` ops
    ``fn()`` dispatches to (torch profiler, CPU-side op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    prefixes = (
        "aten::_scaled_dot_product",
        "aten::_flash_attention",
        "aten::_efficient_attention",
        "aten::_cudnn_attention",
    )
    return sorted(n for n in names if n.startswith(prefixes))


def check_sdpa(model, device: str, precisions: list[str]) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cellsam_trt.engine.base import BackendError
    from cellsam_trt.engine.torch_backend import TorchBackend

    cuda = device.startswith("cuda")
    enc_in, _, boxes = model_inputs(model.adv_mode, seed=2)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if cuda else [SDPBackend.FLASH_ATTENTION]
    singles = {"flash": [SDPBackend.FLASH_ATTENTION]}
    if cuda:
        singles.update(
            efficient=[SDPBackend.EFFICIENT_ATTENTION], cudnn=[SDPBackend.CUDNN_ATTENTION], math=[SDPBackend.MATH]
        )
    out: dict = {"fused_set": [k.name for k in fused], "per_precision": {}}
    failed = []
    for p in precisions:
        try:
            b = TorchBackend(model, device=device, precision=p, sdpa=True, cuda_graphs=False)
        except BackendError as e:
            out["per_precision"][p] = {"status": "skipped", "reason": str(e)}
            continue
        emb = b.encode(enc_in, on_device=True)

        def encoder(b=b):
            b.encode(enc_in, on_device=True)
            if cuda:
                torch.cuda.synchronize()

        def decoder(b=b, emb=emb):
            b.decode(emb, boxes=boxes, on_device=True)
            if cuda:
                torch.cuda.synchronize()

        res: dict = {"dispatched": {"encoder": _sdpa_ops(encoder), "decoder": _sdpa_ops(decoder)}}
        for label, kernels in [("fused", fused)] + list(singles.items()):
            for part, fn in (("encoder", encoder), ("decoder", decoder)):
                try:
                    with sdpa_kernel(kernels):
                        fn()
                    res.setdefault(label, {})[part] = "ok"
                except RuntimeError as e:
                    res.setdefault(label, {})[part] = _first_line(e)
        res["ok"] = res["fused"] == {"encoder": "ok", "decoder": "ok"} and not any(
            "math" in op for ops in res["dispatched"].values() for op in ops
        )
        if not res["ok"]:
            failed.append(p)
        out["per_precision"][p] = res
        b = emb = encoder = decoder = None
        if cuda:
            torch.cuda.empty_cache()
    if failed:
        out.update(status="failed", error=f"SDPA not on a fused kernel for {failed}")
    return out


def check_scheduler(checkpoint: Path, device: str, precisions: list[str], n_images: int) -> dict:
    """``segment_many`` vs ``segment`` one at a time, through the front door."""
    from cellsam_trt import CellSAM, Prompts, SegmentSettings
    from cellsam_trt.engine.base import BackendError

    keep_all = SegmentSettings(iou_threshold=-1e9)  # the random model's IoU predictions are low
    data = [cells_image(100 + i, 200 + 40 * (i % 3), 240 + 24 * (i % 2), 10 + 3 * i) for i in range(n_images)]
    images, boxes = [d[0] for d in data], [d[1] for d in data]
    out: dict = {"images": n_images, "per_precision": {}}
    failed = []
    for p in precisions:
        try:
            model = CellSAM.load(checkpoint, backend="torch", device=device, precision=p, settings=keep_all)
        except Exception as e:  # LoadError wraps BackendError (e.g. no BF16)
            cause = e.__cause__ or e
            if isinstance(cause, BackendError) and p != "fp32":
                out["per_precision"][p] = {"status": "skipped", "reason": _first_line(e)}
                continue
            raise
        try:
            sequential = [model.segment(img, boxes=b) for img, b in zip(images, boxes)]
            many = list(model.segment_many(images, [Prompts(boxes=b) for b in boxes]))
        finally:
            close = getattr(model, "close", None)
            if close:
                close()
        items = []
        for i, (seq, item) in enumerate(zip(sequential, many)):
            if item.error is not None:
                items.append({"index": i, "error": _first_line(item.error)})
                continue
            a, b_ = seq.labels, item.segmentation.labels
            items.append(
                {
                    "index": i,
                    "equal": bool(a.shape == b_.shape and np.array_equal(a, b_)),
                    "pixel_agreement": float((a == b_).mean()) if a.shape == b_.shape else 0.0,
                    "n_labels": int(a.max()),
                    "order": item.index,
                }
            )
        ok = (
            len(many) == n_images
            and all(it.get("equal") for it in items)
            and [it.get("order") for it in items] == list(range(n_images))
        )
        out["per_precision"][p] = {
            "scheduler": type(model.scheduler).__name__,
            "backend": type(model.backend).__name__,
            "items": items,
            "ok": ok,
        }
        if not ok:
            failed.append(p)
    if failed:
        out.update(status="failed", error=f"segment_many differs from segment for {failed}")
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of gpu_check.json (default benchmarks/results)")
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "fp16", "bf16"),
        help="default: fp32 fp16 bf16 on CUDA, fp32 on the CPU",
    )
    p.add_argument("--images", type=int, default=3, help="images of the scheduler check")
    p.add_argument("--checkpoint", help="checkpoint file (default: the tiny synthetic model, generated and cached)")
    p.add_argument("--cache-dir", help="where the tiny synthetic checkpoint is cached (default ~/.cache/cellsam-trt)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("cuda_graphs", "fp32_cuda_vs_cpu", "sdpa_kernels", "scheduler_vs_sequential"),
    )
    args = p.parse_args(argv)

    import torch

    from cellsam_trt.model.cellsam import CellSAMConfig
    from cellsam_trt.model.checkpoint import load_checkpoint
    from cellsam_trt.model.synthetic import synthetic_checkpoint

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "gpu_check.json"
    cuda = args.device.startswith("cuda")
    precisions = args.precisions or (["fp32", "fp16", "bf16"] if cuda else ["fp32"])
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": args.device,
        "precisions": precisions,
        "environment": environment(args.device),
        "checks": {},
    }
    if cuda and not torch.cuda.is_available():
        report.update(
            ok=False,
            failed=[],
            error=f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu",
        )
        out_file.write_text(json.dumps(report, indent=1))
        print(f"gpu_check: {report['error']}; wrote {out_file}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    path = Path(args.checkpoint) if args.checkpoint else synthetic_checkpoint(0, args.cache_dir, CellSAMConfig.tiny())
    report["checkpoint"] = str(path)
    model = load_checkpoint(path).model

    checks = {
        "cuda_graphs": lambda: check_cuda_graphs(model, args.device, precisions),
        "fp32_cuda_vs_cpu": lambda: check_fp32_cuda_vs_cpu(model, args.device),
        "sdpa_kernels": lambda: check_sdpa(model, args.device, precisions),
        "scheduler_vs_sequential": lambda: check_scheduler(path, args.device, precisions, args.images),
    }
    for name, fn in checks.items():
        if name in args.skip:
            report["checks"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        run_check(report, name, fn)
    report["failed"] = [k for k, v in report["checks"].items() if v["status"] == "failed"]
    report["ok"] = not report["failed"]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out_file.write_text(json.dumps(report, indent=1, default=str))
    status = "all checks passed" if report["ok"] else f"FAILED: {', '.join(report['failed'])}"
    print(f"gpu_check: {status}; wrote {out_file}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
