"""Packaging: the metadata in pyproject.toml, one version, and a native build that may fail
without failing the install."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import cellsam_trt

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def names(requirements):
    """Distribution names (lower case, extras and versions stripped)."""
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_project_metadata():
    assert PROJECT["name"] == "cellsam-trt"
    assert PROJECT["requires-python"] == ">=3.10"
    assert PROJECT["readme"] == "README.md" and PROJECT["description"]
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cellsam_trt.__version__"}
    assert {"numpy", "scipy", "scikit-image", "tifffile"} <= names(PROJECT["dependencies"])
    assert "torch" not in names(PROJECT["dependencies"])  # the runtime needs no torch
    assert PROJECT["scripts"] == {"cellsam-trt": "cellsam_trt.cli:main"}
    build = PYPROJECT["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert {"setuptools", "pybind11"} <= names(build["requires"])


def test_extras():
    extras = PROJECT["optional-dependencies"]
    want = {
        "ort": {"onnxruntime>=1.17"},
        "openvino": {"openvino>=2025.0", "nncf>=2.16"},
        "trt": {"tensorrt-cu12>=10.3,<12", "cuda-python>=12.6,<13"},
        "trt-cu13": {"tensorrt-cu13>=10.13.2,<12", "cuda-python>=13,<14"},
        "torch": {"torch>=2.1"},
        "slide": {"zarr>=3.0", "dask[distributed]>=2024.1"},
    }
    for extra, reqs in want.items():
        assert set(extras[extra]) == reqs, extra
    assert names(extras["parquet"]) == {"pyarrow"}
    assert {"pytest", "scikit-learn", "hypothesis", "pyarrow", "zarr", "dask", "psutil", "ruff"} <= names(extras["dev"])
    assert "dask[distributed]>=2024.1" in extras["dev"]
    # export validates with ONNX Runtime; onnxscript only if the export code imports it,
    # segment-anything only if package code (not tests) imports it
    export_code = "\n".join(p.read_text() for p in (ROOT / "cellsam_trt" / "export").glob("*.py"))
    package_code = "\n".join(p.read_text() for p in (ROOT / "cellsam_trt").rglob("*.py"))
    assert {"torch>=2.1", "onnx>=1.15", "onnxruntime>=1.17"} <= set(extras["export"])
    assert ("onnxscript" in names(extras["export"])) == bool(
        re.search(r"^\s*(import|from) onnxscript\b", export_code, re.M)
    )
    assert ("segment-anything" in names(extras["export"])) == bool(
        re.search(r"^\s*(import|from) segment_anything\b", package_code, re.M)
    )


def test_setup_py_says_only_what_pyproject_cannot():
    """setup.py: the native extension and its build command, no metadata."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1
    assert {k.arg for k in calls[0].keywords} == {"ext_modules", "cmdclass"}


def test_version_is_single_sourced():
    assert cellsam_trt.__version__ == importlib.metadata.version("cellsam-trt")
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [e.value for e in scripts if e.name == "cellsam-trt"] == ["cellsam_trt.cli:main"]


def test_ruff_configuration():
    ruff = PYPROJECT["tool"]["ruff"]
    assert ruff["line-length"] == 120 and ruff["target-version"] == "py310"
    lint = ruff["lint"]
    assert set(lint["select"]) == {"E", "F", "W", "I", "B", "UP"}
    assert "E501" not in lint.get("ignore", [])
    assert "format" in ruff


# ---------------------------------------------------------------------------- native build
WARNING = "cellsam_trt._native (the C++ post-processing) was NOT built"


def build_ext(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """``python setup.py build_ext`` into tmp_path (nothing written into the checkout)."""
    cmd = [
        sys.executable,
        "setup.py",
        "build_ext",
        "--build-lib",
        str(tmp_path / "lib"),
        "--build-temp",
        str(tmp_path / "tmp"),
    ]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def built(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "lib").rglob("_native*")) if (tmp_path / "lib").exists() else []


def test_build_without_a_compiler_warns_and_succeeds(tmp_path):
    proc = build_ext(tmp_path, CC="/nonexistent/cc", CXX="/nonexistent/c++")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert WARNING in out
    assert "no working C++17 compiler" in out and "apt-get install g++" in out  # the fix
    assert "17x" in out and "49x" in out and "benchmarks/results/labels.json" in out  # the cost
    assert not built(tmp_path)


def test_build_without_a_compiler_fails_when_native_is_required(tmp_path):
    proc = build_ext(tmp_path, CC="/nonexistent/cc", CXX="/nonexistent/c++", CELLSAM_TRT_REQUIRE_NATIVE="1")
    assert proc.returncode != 0
    assert "CELLSAM_TRT_REQUIRE_NATIVE" in proc.stdout + proc.stderr


def test_build_that_fails_to_compile_the_sources_warns_and_succeeds(tmp_path):
    """A compiler that passes the C++17 check but fails on the extension's own sources."""
    real = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if real is None:
        pytest.skip("no C++ compiler here")
    fake = tmp_path / "fake-c++"
    fake.write_text(
        f'#!/bin/sh\nfor a in "$@"; do case "$a" in *cpp_ext/*) echo \'fake: error\' >&2; exit 1;; esac; '
        f'done\nexec {real} "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc = build_ext(tmp_path, CC=str(fake), CXX=str(fake))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert WARNING in out and "compiling cellsam_trt._native failed" in out
    assert not built(tmp_path)
