"""``official.postprocess`` against the official route, on the golden_api label maps.

The official ``postprocess_predictions`` processes every mask over the whole image with
scikit-image's binary morphology (footprints of radius 2 and 10). The reference here is that
route with its intended semantics (radius 2 for every mask, as ``official.postprocess``
computes; SciPy's 8-connected labelling standing in for OpenCV's in ``remove_small_regions``).
``official.postprocess`` cleans each mask in its grown bounding box and closes with the exact
distance transform. Both are timed in the same run, interleaved, ``--repeats`` times (median),
and their outputs compared.

    PYTHONPATH=. python benchmarks/bench_official_steps.py [--cases ep_micro YeaZ] [--repeats 2]
        [--out benchmarks/results/official_steps.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from cellsam_trt import official

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("CELLSAM_TRT_REFERENCE", ROOT.parent / "shared" / "reference"))


def remove_small_regions(mask: np.ndarray, area: int, holes: bool) -> np.ndarray:
    regions, n = ndimage.label(mask ^ holes, structure=np.ones((3, 3)))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area]
    if not small:
        return mask
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n + 1) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill)


def official_route(labels: np.ndarray) -> np.ndarray:
    """postprocess_predictions' loop, every mask with disk(2) (the intended semantics)."""
    from skimage.morphology import binary_closing, binary_dilation, binary_erosion, binary_opening, disk

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_* are deprecated in scikit-image 0.26
        for value in np.unique(labels)[1:]:
            m = remove_small_regions(labels == value, 20, holes=True)
            m = remove_small_regions(m, 20, holes=False)
            m = binary_closing(binary_opening(m, disk(2)), disk(2))
            m = binary_erosion(binary_dilation(m, disk(10)), disk(10))
            m = ndimage.gaussian_filter(m.astype(np.float32), sigma=3) > 0.5
            out.append(m.astype(labels.dtype) * value)
    return np.max(out, axis=0)


def machine_info() -> dict:
    import scipy
    import skimage

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["ep_micro", "YeaZ"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "official_steps.json")
    args = ap.parse_args()
    results = []
    for case in args.cases:
        with np.load(REFERENCE / "golden_api" / f"{case}_post.npz") as d:
            labels = d["labels"]
        times = {"official_route": [], "cellsam_trt": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = official_route(labels)
            times["official_route"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours = official.postprocess(labels)
            times["cellsam_trt"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.append(
            {
                "case": case,
                "shape": list(labels.shape),
                "labels": int(len(np.unique(labels)) - 1),
                "seconds": times,
                "median_seconds": med,
                "speedup": med["official_route"] / med["cellsam_trt"],
                "identical": bool(np.array_equal(ref, ours)),
            }
        )
        print(json.dumps(results[-1]))
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "repeats": args.repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
