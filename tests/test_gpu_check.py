"""``benchmarks/gpu_check.py`` on the CPU (``--device cpu``) with the tiny model: the JSON it
writes, the CUDA-only checks skipped with their reason, the no-GPU exit; ``gpu_check.sh`` parses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CACHE, ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args, timeout=900):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_cpu_run_writes_the_report(tmp_path):
    out = tmp_path / "results"
    p = _run("--device", "cpu", "--out", str(out), "--images", "1", "--cache-dir", str(CACHE))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is True and report["failed"] == [] and report["precisions"] == ["fp32"]
    env = report["environment"]
    for key in ("device_name", "torch", "cuda", "cudnn", "cellsam_trt", "python", "cuda_available"):
        assert key in env
    assert env["torch"] == torch.__version__
    checks = report["checks"]
    assert set(checks) == {"cuda_graphs", "fp32_cuda_vs_cpu", "sdpa_kernels", "scheduler_vs_sequential"}
    for name in ("cuda_graphs", "fp32_cuda_vs_cpu"):
        assert checks[name]["status"] == "skipped" and "CUDA" in checks[name]["reason"]
    sdpa = checks["sdpa_kernels"]
    assert sdpa["status"] == "ok"
    fp32 = sdpa["per_precision"]["fp32"]
    assert fp32["fused"] == {"encoder": "ok", "decoder": "ok"} and fp32["ok"]
    assert all(ops and not any("math" in op for op in ops) for ops in fp32["dispatched"].values())
    sched = checks["scheduler_vs_sequential"]
    assert sched["status"] == "ok"
    items = sched["per_precision"]["fp32"]["items"]
    assert len(items) == 1 and items[0]["equal"] and items[0]["pixel_agreement"] == 1.0
    assert all(isinstance(c["seconds"], float) for c in checks.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_no_cuda_exit(tmp_path):
    p = _run("--device", "cuda", "--out", str(tmp_path), timeout=300)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and "no CUDA device" in report["error"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_shell_script_parses():
    sh = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    text = sh.read_text()
    assert "set -u" in text and "--junitxml" in text and "gpu_check.py" in text and "bench_gpu.py" in text
