"""The GPU benchmark script's code paths on the CPU with the tiny model (no figures are
produced or recorded: the script itself refuses to run without CUDA)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_clearly_without_cuda(bench, capsys, tmp_path):
    rc = bench.main(["--out", str(tmp_path / "b.json"), "--results-md", str(tmp_path / "R.md")])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "R.md").exists()


def test_workload_and_code_paths_on_cpu(bench, tmp_path):
    from cellsam_trt.engine.torch_backend import TorchBackend
    from cellsam_trt.model.cellsam import CellSAMConfig
    from cellsam_trt.model.checkpoint import load_state_dict
    from cellsam_trt.model.synthetic import synthetic_state_dict

    img, boxes = bench.synthetic_image(0, 600)
    assert img.shape == (1024, 1024) and img.dtype == np.uint16 and boxes.shape == (600, 4)
    assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 1024
    cfg = CellSAMConfig.tiny()
    model, _ = load_state_dict(synthetic_state_dict(0, cfg), cfg=cfg)
    small = [bench.synthetic_image(i, 4, size=128) for i in range(2)]
    images, bxs = [s[0] for s in small], [s[1] for s in small]
    base, ref = bench.run_official(model, images, bxs, warmup=0, device="cpu")
    assert set(base["stage_ms"]) == {"preprocess", "encode", "decode", "postprocess"} and base["images_per_s"] > 0
    res, labels = bench.run_overlapped(
        TorchBackend(model, device="cpu", precision="fp32", sdpa=True), images, bxs, warmup=1, device="cpu"
    )
    assert set(res["stage_ms"]) == set(bench._gpu_scheduler().STAGES) and res["images_per_s"] > 0
    agr = bench.agreement(ref, labels)
    assert 0.0 <= agr["mean_iou"] <= 1.0
    report = {
        "date": "test",
        "checkpoint": "tiny",
        "images": 2,
        "warmup": 0,
        "machine": {
            "gpu": "none",
            "compute_capability": "-",
            "driver": None,
            "torch": torch.__version__,
            "cuda_runtime": None,
            "cudnn": None,
            "tensorrt": None,
            "cellsam_trt": "x",
            "python": "3",
        },
        "results": [
            dict(base, config="official-fp32", boxes=4, speedup=1.0),
            dict(res, config="ours-fp32", boxes=4, speedup=1.0, agreement=agr),
        ],
    }
    md = tmp_path / "RESULTS.md"
    bench.append_results_md(md, report)
    text = md.read_text()
    assert "| official-fp32 | 4 |" in text and "| ours-fp32 | 4 |" in text
