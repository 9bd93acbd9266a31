"""cellsam-trt: a fast, faithful inference engine for CellSAM."""

import os
import tempfile

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

NATIVE_HELP = (
    "cellsam-trt needs a C++17 compiler (g++ or clang) to build its native post-processing "
    "(cellsam_trt._native). Install one (Debian/Ubuntu: apt-get install g++; Fedora: dnf install gcc-c++; "
    "macOS: xcode-select --install) or point CXX/CC at it, then retry."
)


class BuildNative(build_ext):
    """Checks for a working C++17 compiler first and adds pybind11 and the compile flags."""

    def build_extensions(self):
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("building cellsam_trt._native needs pybind11>=2.10 (pip install pybind11)") from e
        if self.compiler.compiler_type == "msvc":
            flags = ["/std:c++17", "/O2", "/EHsc", "/fp:precise"]
        else:
            # -ffp-contract=off: no fused multiply-adds, the float32 arithmetic must match NumPy's
            flags = ["-std=c++17", "-O3", "-ffp-contract=off", "-fvisibility=hidden", "-pthread"]
        self._check_compiler(flags)
        for ext in self.extensions:
            ext.include_dirs.append(pybind11.get_include())
            ext.extra_compile_args = flags + list(ext.extra_compile_args or [])
            if self.compiler.compiler_type != "msvc":
                ext.extra_link_args = ["-pthread"] + list(ext.extra_link_args or [])
        super().build_extensions()

    def _check_compiler(self, flags):
        from setuptools.errors import CCompilerError, ExecError, PlatformError

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "cxx17_check.cpp")
            with open(src, "w") as f:
                f.write("#include <optional>\nint check() { std::optional<int> v{17}; return *v; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            except (CCompilerError, ExecError, PlatformError, OSError) as e:
                raise PlatformError(f"{NATIVE_HELP}\n(compiler check failed: {e})") from e


native = Extension(
    "cellsam_trt._native",
    sources=["cpp_ext/bindings.cpp", "cpp_ext/postprocess.cpp"],
    depends=["cpp_ext/postprocess.hpp"],
    language="c++",
)

setup(
    name="cellsam-trt",
    version="0.1.0",
    description="Fast, faithful CellSAM inference: PyTorch reference, ONNX Runtime, TensorRT",
    packages=find_packages(include=["cellsam_trt", "cellsam_trt.*"]),
    python_requires=">=3.10",
    # the runtime (ONNX Runtime / TensorRT backends, pre/post-processing) needs no torch
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.21",
        "tifffile>=2023.1",
        "imageio>=2.30",
        "tqdm>=4.60",
    ],
    extras_require={
        # torch: install the build for your machine first (CPU CI: `pip install torch==2.13.0`)
        "export": ["torch>=2.1", "segment-anything>=1.0", "onnx>=1.15"],
        "ort": ["onnxruntime>=1.17"],
        "trt": ["tensorrt>=10.0", "cuda-python>=12.0"],
        "parquet": ["pyarrow>=12"],
        # whole slides: lazy OME-TIFF / OME-Zarr IO and label stores, Dask clusters
        "slide": ["zarr>=3.0", "dask[distributed]>=2024.1"],
        "dev": ["pytest>=7", "scikit-learn>=1.3", "hypothesis>=6", "pyarrow>=12", "zarr>=3.0",
                "dask[distributed]>=2024.1", "psutil>=5"],
    },
    entry_points={"console_scripts": ["cellsam-trt=cellsam_trt.cli:main"]},
    ext_modules=[native],
    cmdclass={"build_ext": BuildNative},
)
