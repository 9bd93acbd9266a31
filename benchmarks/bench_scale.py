"""Accuracy of the model-free cell-diameter estimate (``cellsam_trt.scale.estimate_diameter``)
and the scale it makes ``plan_scale`` choose, on synthetic cells of known size.

    python benchmarks/bench_scale.py [--seeds 3] [--out benchmarks/results/scale.json]

For each true median diameter (4-200 px) and seed, three conditions (``scale.synthetic_cells``):
"clean" (density 0.3, noise 0.1, blur 1), "dense-noisy" (density 0.6, noise 0.2, blur 1.5),
"sparse-dark" (density 0.15, noise 0.05, blur 0.7, dark cells on a bright background); the
image side is 16 x the diameter, clipped to 256-2048 px. Reported per diameter: the median and
worst relative error of the estimate against the labels' median equivalent diameter, the plan
(mode, scale) from the estimate and from the true diameter, and the estimate's seconds. Where
``../shared/reference/sample_imgs`` is present, also the four real sample images against the
median diameter of the trained official model's labels (``*_pred.npy``). No model runs here.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from cellsam_trt import scale as S
from cellsam_trt.cli import _machine, _versions

CONDITIONS = {
    "clean": {},
    "dense-noisy": {"density": 0.6, "noise": 0.2, "blur": 1.5},
    "sparse-dark": {"density": 0.15, "noise": 0.05, "blur": 0.7, "dark_cells": True},
}
DIAMETERS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 200)
ROOT = Path(__file__).resolve().parents[1]


def run(seeds: int) -> dict:
    rows = []
    for d in DIAMETERS:
        size = int(np.clip(16 * d, 256, 2048))
        for name, kw in CONDITIONS.items():
            for seed in range(seeds):
                image, labels = S.synthetic_cells(d, (size, size), seed, **kw)
                truth = S.median_diameter(labels)
                t0 = time.perf_counter()
                est = S.estimate_diameter(image)
                sec = time.perf_counter() - t0
                plan = S.plan_scale(size, size, est)
                ideal = S.plan_scale(size, size, truth)
                rows.append(
                    {
                        "diameter": d,
                        "condition": name,
                        "seed": seed,
                        "size": size,
                        "true_median_diameter": truth,
                        "estimate": est.diameter,
                        "rel_error": None if est.diameter is None else (est.diameter - truth) / truth,
                        "blobs": est.cells,
                        "seconds": sec,
                        "plan": plan.describe(),
                        "plan_from_truth": ideal.describe(),
                    }
                )
                print(d, name, seed, f"true {truth:.1f} est {est.diameter} {plan.mode} {plan.scale}", flush=True)
    return {"rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per diameter: errors, and the plans for the benchmark's image and for a 1024 x 1024
    image of the same cells (from the estimate and from the true diameter; plans are a pure
    function of the diameter and the image size)."""
    summary = []
    for d in DIAMETERS:
        r = [x for x in rows if x["diameter"] == d]
        err = np.array([np.nan if x["rel_error"] is None else x["rel_error"] for x in r])
        summary.append(
            {
                "diameter": d,
                "size": r[0]["size"],
                "median_rel_error": float(np.nanmedian(err)),
                "median_abs_rel_error": float(np.nanmedian(np.abs(err))),
                "worst_abs_rel_error": float(np.nanmax(np.abs(err))),
                "per_condition_median_rel_error": {
                    c: float(np.nanmedian([x["rel_error"] for x in r if x["condition"] == c])) for c in CONDITIONS
                },
                "modes": sorted({x["plan"]["mode"] for x in r}),
                "median_scale": float(np.median([x["plan"]["scale"] or 0.0 for x in r])),
                "scale_from_truth": r[0]["plan_from_truth"]["scale"],
                "mode_from_truth": r[0]["plan_from_truth"]["mode"],
                "mode_agrees": float(np.mean([x["plan"]["mode"] == x["plan_from_truth"]["mode"] for x in r])),
                "median_seconds": float(np.median([x["seconds"] for x in r])),
                **_plans_1024(r),
            }
        )
    return summary


def _plans_1024(r: list[dict]) -> dict:
    plans = [S.plan_scale(1024, 1024, x["estimate"]) for x in r]
    truth = S.plan_scale(1024, 1024, float(np.median([x["true_median_diameter"] for x in r])))
    modes = [p.mode for p in plans]
    return {
        "at_1024_modes": {m: modes.count(m) for m in sorted(set(modes))},
        "at_1024_median_scale": float(np.median([p.scale or 1.0 for p in plans])),
        "at_1024_scale_from_truth": truth.scale or 1.0,
        "at_1024_mode_from_truth": truth.mode,
        "at_1024_mode_agrees": float(np.mean([m == truth.mode for m in modes])),
    }


def real_images() -> list[dict]:
    ref = ROOT.parent / "shared" / "reference" / "sample_imgs"
    if not ref.is_dir():
        return []
    import imageio.v3 as iio

    out = []
    for name in ("YeaZ", "YeastNet", "ep_micro", "tissuenet"):
        image, labels = iio.imread(ref / f"{name}.png"), np.load(ref / f"{name}_pred.npy")
        truth = S.median_diameter(labels)
        t0 = time.perf_counter()
        est = S.estimate_diameter(image)
        sec = time.perf_counter() - t0
        h, w = labels.shape[:2]
        out.append(
            {
                "image": name,
                "shape": [h, w],
                "trained_model_median_diameter": truth,
                "trained_model_model_frame_diameter": truth * S.squash_scale(h, w),
                "estimate": est.diameter,
                "rel_error": None if est.diameter is None else (est.diameter - truth) / truth,
                "seconds": sec,
                "plan": S.plan_scale(h, w, est).describe(),
                "plan_from_trained_labels": S.plan_scale(h, w, truth).describe(),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    ap.add_argument("--resummarize", action="store_true", help="recompute the summary of --out's stored rows")
    args = ap.parse_args()
    if args.resummarize:
        report = json.loads(args.out.read_text())
        report["summary"] = summarize(report["rows"])
        args.out.write_text(json.dumps(report, indent=1))
        return
    t0 = time.perf_counter()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _machine(),
        "versions": {**_versions(), "python": platform.python_version()},
        "rule": vars(S.ScaleRule()),
        "conditions": CONDITIONS,
        "seeds": args.seeds,
        **run(args.seeds),
        "real_images": real_images(),
    }
    report["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for s in report["summary"]:
        print(json.dumps(s))
    for r in report["real_images"]:
        print(r["image"], r["trained_model_median_diameter"], r["estimate"], r["plan"]["mode"], r["plan"]["scale"])


if __name__ == "__main__":
    main()
