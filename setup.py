"""cellsam-trt: the native extension and its build command (the rest is in pyproject.toml).

``cellsam_trt._native`` (``cpp_ext/``) is the C++ post-processing. Without a working C++17
compiler (or pybind11) the build skips it with a warning and the install goes on:
``cellsam_trt.labels`` then runs the same algorithms in NumPy/SciPy, much slower. Set
``CELLSAM_TRT_REQUIRE_NATIVE=1`` to make a failed native build fail the install instead.
"""

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "cellsam_trt._native"
NATIVE_HELP = (
    "cellsam-trt needs a C++17 compiler (g++ or clang) to build its native post-processing "
    f"({NATIVE}). Install one (Debian/Ubuntu: apt-get install g++; Fedora: dnf install gcc-c++; "
    "macOS: xcode-select --install) or point CXX/CC at it, then reinstall cellsam-trt "
    "(in a checkout: pip install -e . --force-reinstall --no-deps, or python setup.py build_ext --inplace)."
)
# measured: benchmarks/results/labels.json (tissuenet_boxes, 512 x 512, 325 kept masks)
NATIVE_COST = (
    "Without it cellsam-trt still works, on the NumPy/SciPy fallback, but label assembly is about 17x "
    "and hole filling about 49x slower (benchmarks/results/labels.json, tissuenet: 59 ms vs 1022 ms "
    "and 9 ms vs 441 ms)."
)


class NativeBuildSkipped(Exception):
    pass


class BuildNative(build_ext):
    """Checks for a working C++17 compiler first and adds pybind11 and the compile flags; where
    the native build cannot be done, warns and skips it (the install succeeds without it)."""

    def build_extensions(self):
        try:
            self._build_native()
        except NativeBuildSkipped as e:
            if os.environ.get("CELLSAM_TRT_REQUIRE_NATIVE", "") not in ("", "0"):
                raise RuntimeError(f"{e}\n(CELLSAM_TRT_REQUIRE_NATIVE is set: failing the build)") from e
            self._skip(str(e))

    def _build_native(self):
        from setuptools.errors import CCompilerError, ExecError, PlatformError

        if self.compiler.compiler_type == "msvc":
            flags = ["/std:c++17", "/O2", "/EHsc", "/fp:precise"]
        else:
            # -ffp-contract=off: no fused multiply-adds, the float32 arithmetic must match NumPy's
            flags = ["-std=c++17", "-O3", "-ffp-contract=off", "-fvisibility=hidden", "-pthread"]
        self._check_compiler(flags)
        try:
            import pybind11
        except ImportError as e:
            raise NativeBuildSkipped(f"building {NATIVE} needs pybind11>=2.10 (pip install pybind11): {e}") from e
        for ext in self.extensions:
            ext.include_dirs.append(pybind11.get_include())
            ext.extra_compile_args = flags + list(ext.extra_compile_args or [])
            if self.compiler.compiler_type != "msvc":
                ext.extra_link_args = ["-pthread"] + list(ext.extra_link_args or [])
        try:
            super().build_extensions()
        except (CCompilerError, ExecError, PlatformError, OSError) as e:
            raise NativeBuildSkipped(f"compiling {NATIVE} failed: {e}\n{NATIVE_HELP}") from e

    def _check_compiler(self, flags):
        from setuptools.errors import CCompilerError, ExecError, PlatformError

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "cxx17_check.cpp")
            with open(src, "w") as f:
                f.write("#include <optional>\nint check() { std::optional<int> v{17}; return *v; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            except (CCompilerError, ExecError, PlatformError, OSError) as e:
                raise NativeBuildSkipped(f"no working C++17 compiler ({e}).\n{NATIVE_HELP}") from e

    def _skip(self, why: str):
        # dropped from the command, so that nothing copies or packages a module that was not built
        # (build_ext.get_outputs / copy_extensions_to_source, which editable installs use, read it)
        self.extensions = [ext for ext in self.extensions if ext.name != NATIVE]
        bar = "=" * 100
        head = f"WARNING: cellsam-trt: {NATIVE} (the C++ post-processing) was NOT built; installing without it."
        print(f"\n{bar}\n{head}\n{why}\n{NATIVE_COST}\n{bar}\n", file=sys.stderr, flush=True)


setup(
    ext_modules=[
        Extension(
            NATIVE,
            sources=["cpp_ext/bindings.cpp", "cpp_ext/postprocess.cpp"],
            depends=["cpp_ext/postprocess.hpp"],
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
