"""Label assembly and hole filling: native (cellsam_trt._native) vs NumPy/SciPy vs PyTorch-CPU.

Input: the golden tissuenet case (512 x 512, 620 box prompts). The low-res logits of all 620
prompts come from the PyTorch model on the synthetic checkpoint (about a minute on 2 cores the
first time, then cached as .npy under ~/.cache/cellsam-trt). Two workloads:

* ``kept``: the masks with IoU prediction >= 0.5 (the pipeline's real input);
* ``all``:  all 620 masks (a stress case).

Routes, measured in the same run, each ``--repeats`` times, interleaved round by round so that
a shared machine's load weighs on all of them alike (median reported):

* ``native``: ``cellsam_trt._native.assemble_labels`` (single thread);
* ``numpy``:  ``tests/reference_postprocess.assemble_labels`` (the former runtime code);
* ``torch``:  the official per-mask route on CPU: F.interpolate to 1024 x 1024 and to H x W,
  sigmoid > 0.4, max over masks (in chunks of 16 masks, torch's own threads);
* fill holes: ``_native.fill_holes_and_remove_small_masks`` vs the SciPy loop.

    PYTHONPATH=. python benchmarks/bench_labels.py [--out benchmarks/results/labels.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import reference_postprocess as ref  # noqa: E402
from cellsam_trt import _native  # noqa: E402

CASE = "tissuenet_boxes"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import scipy
    import torch

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "native_threads": 1,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def load_golden(reference: Path) -> dict:
    with np.load(reference / "golden" / f"{CASE}.npz") as d:
        return {k: d[k] for k in ("embedding", "boxes_prompt_1024", "kept", "labels_raw", "mask")}


def lowres_logits(g: dict, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(620, 256, 256) float32 low-res logits and (620,) IoU predictions of all prompts, cached."""
    from cellsam_trt.model.synthetic import synthetic_checkpoint

    ckpt = synthetic_checkpoint(seed=0, cache_dir=cache)
    key = hashlib.sha1(g["embedding"].tobytes() + g["boxes_prompt_1024"].tobytes() + ckpt.name.encode()).hexdigest()[
        :12
    ]
    f_lowres = cache / f"bench_{CASE}_lowres_{key}.npy"
    f_iou = cache / f"bench_{CASE}_iou_{key}.npy"
    if f_lowres.exists() and f_iou.exists():
        return np.load(f_lowres), np.load(f_iou)
    import torch

    from cellsam_trt.model.checkpoint import load_checkpoint

    print(f"computing the low-res logits of {len(g['boxes_prompt_1024'])} prompts (cached afterwards) ...", flush=True)
    model = load_checkpoint(ckpt).model
    with torch.no_grad():
        lowres, iou = model.mask_sam.decode(
            torch.from_numpy(g["embedding"]), boxes=torch.from_numpy(g["boxes_prompt_1024"])
        )
    lowres, iou = np.ascontiguousarray(lowres[:, 0].numpy()), iou[:, 0].numpy()
    cache.mkdir(parents=True, exist_ok=True)
    for f, a in ((f_lowres, lowres), (f_iou, iou)):
        tmp = f.with_suffix(".tmp.npy")
        np.save(tmp, a)
        tmp.replace(f)
    return lowres, iou


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Times each callable ``repeats`` times, interleaved (one run of each per round) so that a
    shared machine's load weighs on all routes alike. Returns ({name: timings}, {name: result})."""
    results = {name: fn() for name, fn in fns.items()}  # warm-up (also the results)
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - t0) * 1e3)
    return (
        {name: {"median_ms": statistics.median(t), "min_ms": min(t), "runs_ms": t} for name, t in runs.items()},
        results,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "labels.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--reference",
        type=Path,
        default=Path(os.environ.get("CELLSAM_TRT_REFERENCE", ROOT.parent / "shared" / "reference")),
    )
    p.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("CELLSAM_TRT_CACHE", Path.home() / ".cache" / "cellsam-trt"))
    )
    args = p.parse_args(argv)
    if not (args.reference / "golden" / f"{CASE}.npz").exists():
        print(f"reference data not found at {args.reference}", file=sys.stderr)
        return 2

    g = load_golden(args.reference)
    lowres_all, iou = lowres_logits(g, args.cache)
    keep = iou >= 0.5
    h, w = g["labels_raw"].shape
    workloads = {"kept": np.ascontiguousarray(lowres_all[keep]), "all": lowres_all}
    result = {
        "case": CASE,
        "height": h,
        "width": w,
        "machine": machine_info(),
        "repeats": args.repeats,
        "kept_matches_golden": bool(np.array_equal(keep, g["kept"])),
        "assemble": {},
        "fill_holes": {},
    }

    for name, lowres in workloads.items():
        timings, labels = timed(
            {
                "native": lambda x=lowres: _native.assemble_labels(x, h, w),
                "numpy": lambda x=lowres: ref.assemble_labels(x, h, w),
                "torch": lambda x=lowres: ref.torch_assemble_labels(x, h, w),
            },
            args.repeats,
        )
        r = {"masks": len(lowres), **timings}
        lab_native = labels["native"]
        r["pixels_native_vs_numpy_differing"] = int((lab_native != labels["numpy"]).sum())
        r["pixels_native_vs_torch_differing"] = int((lab_native != labels["torch"]).sum())
        if name == "kept":
            r["pixels_native_vs_golden_labels_raw_differing"] = int((lab_native != g["labels_raw"]).sum())
        for route in ("numpy", "torch"):
            r[f"speedup_vs_{route}"] = r[route]["median_ms"] / r["native"]["median_ms"]
        result["assemble"][name] = r

        timings, filled = timed(
            {
                "native": lambda x=lab_native: _native.fill_holes_and_remove_small_masks(x, 25),
                "scipy": lambda x=lab_native: ref.fill_holes_and_remove_small_masks(x, 25),
            },
            args.repeats,
        )
        f = dict(timings)
        f["identical"] = bool(np.array_equal(filled["native"], filled["scipy"]))
        f["speedup_vs_scipy"] = f["scipy"]["median_ms"] / f["native"]["median_ms"]
        if name == "kept":
            f["pixels_vs_golden_mask_differing"] = int((filled["native"] != g["mask"]).sum())
        result["fill_holes"][name] = f
    result["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    m = result["machine"]
    print(
        f"{CASE} {h}x{w}; {m['cpu_model']}, {m['cores']} cores, load average {m['load_average'][0]:.1f} -> "
        f"{m['load_average_after'][0]:.1f}; "
        f"torch {m['torch']} ({m['torch_threads']} threads), numpy {m['numpy']}; median of {args.repeats}"
    )
    print(f"{'step':<10} {'masks':>5} {'route':<7} {'median ms':>10} {'min ms':>9} {'native x':>9}")
    for r in result["assemble"].values():
        for route in ("native", "numpy", "torch"):
            t = r[route]
            sp = t["median_ms"] / r["native"]["median_ms"]
            print(f"{'assemble':<10} {r['masks']:>5} {route:<7} {t['median_ms']:>10.2f} {t['min_ms']:>9.2f} {sp:>9.1f}")
    for name, f in result["fill_holes"].items():
        n = result["assemble"][name]["masks"]
        for route in ("native", "scipy"):
            t = f[route]
            sp = t["median_ms"] / f["native"]["median_ms"]
            print(f"{'fill':<10} {n:>5} {route:<7} {t['median_ms']:>10.2f} {t['min_ms']:>9.2f} {sp:>9.1f}")
    for name, r in result["assemble"].items():
        print(
            f"{name}: pixels differing native/numpy {r['pixels_native_vs_numpy_differing']}, "
            f"native/torch {r['pixels_native_vs_torch_differing']}; "
            f"fill identical {result['fill_holes'][name]['identical']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
