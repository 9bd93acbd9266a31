"""Every TensorRT name our code uses exists in the real Python bindings of 10.3, 10.13 and 11.4,
and none of them is one that 11.x removed.

The names of each release were read from its bindings wheel's ``tensorrt.so`` by
``tools/trt_bindings_names.py`` (``tests/data/trt_bindings/tensorrt-<version>.json``; no
network needed here). The names our code uses are found by parsing the source with ``ast``:
within every module that imports ``tensorrt``, a value is a TensorRT object when it is the
imported module, an attribute or call result of a TensorRT object, the result of a
module-local function that returns one, or a variable / ``self`` attribute / parameter of a
module-local function or class that is assigned or passed one;
every attribute read or written on a TensorRT object is a name the code uses. A ``getattr``
on a TensorRT object with a name that is not a constant is refused (the check could not see it).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "trt_bindings"
VERSIONS = ("10.3.0", "10.13.3.9", "11.4.0.106")


def binding_names(version: str) -> set[str]:
    rec = json.loads((DATA / f"tensorrt-{version}.json").read_text())
    assert rec["version"] == version and rec["package"].startswith("tensorrt")
    return set(rec["names"])


class TrtUsage:
    """The TensorRT names used by one module's source (see the module docstring)."""

    def __init__(self, source: str, filename: str = "<source>") -> None:
        self.tree = ast.parse(source, filename)
        self.filename = filename
        self.funcs: dict[str, list[ast.FunctionDef]] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.funcs.setdefault(node.name, []).append(node)
            elif isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
        self.scope_of: dict[ast.AST, ast.AST] = {}  # node -> the function (or module) it runs in

        def assign(node: ast.AST, scope: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                self.scope_of[child] = scope
                inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
                assign(child, inner)

        assign(self.tree, self.tree)
        self.tainted: dict[ast.AST, set[str]] = {}  # scope -> tainted variable names
        self.self_attrs: set[str] = set()  # ``self.X`` holding TensorRT objects
        self.returns_trt: set[str] = set()  # module-local functions that return one
        self.dynamic: list[str] = []
        self._run()

    # -- taint
    def _is_trt(self, expr: ast.AST, scope) -> bool:
        if isinstance(expr, ast.Name):
            return expr.id in self.tainted.get(scope, set())
        if isinstance(expr, ast.Attribute):
            if isinstance(expr.value, ast.Name) and expr.value.id == "self":
                return expr.attr in self.self_attrs
            return self._is_trt(expr.value, scope)
        if isinstance(expr, ast.Call):
            f = expr.func
            local = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            return self._is_trt(f, scope) or local in self.returns_trt
        if isinstance(expr, ast.Subscript):
            return self._is_trt(expr.value, scope)
        return False

    def _taint_target(self, target: ast.AST, scope) -> bool:
        if isinstance(target, ast.Name):
            new = target.id not in self.tainted.setdefault(scope, set())
            self.tainted[scope].add(target.id)
            return new
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            new = target.attr not in self.self_attrs
            self.self_attrs.add(target.attr)
            return new
        return False

    def _callees(self, call: ast.Call) -> list[tuple[ast.FunctionDef, int]]:
        """Module-local functions a call may reach, with the index of its first bound parameter."""
        f = call.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in self.classes:
            inits = [n for n in self.classes[name].body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
            return [(i, 1) for i in inits]
        out = []
        for fn in self.funcs.get(name, []):
            first = 1 if fn.args.args and fn.args.args[0].arg in ("self", "cls") else 0
            out.append((fn, first))
        return out

    def _run(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "tensorrt":
                        self.tainted.setdefault(self.scope_of[node], set()).add(alias.asname or "tensorrt")
        changed = True
        while changed:
            changed = False
            for node in ast.walk(self.tree):
                scope = self.scope_of.get(node)
                if isinstance(node, ast.Return) and node.value is not None and self._is_trt(node.value, scope):
                    if isinstance(scope, ast.FunctionDef) and scope.name not in self.returns_trt:
                        self.returns_trt.add(scope.name)
                        changed = True
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple):
                            for tt, vv in zip(t.elts, node.value.elts):
                                if self._is_trt(vv, scope):
                                    changed |= self._taint_target(tt, scope)
                        elif self._is_trt(node.value, scope):
                            changed |= self._taint_target(t, scope)
                elif isinstance(node, ast.Call):
                    for fn, first in self._callees(node):
                        params = [a.arg for a in fn.args.args][first:]
                        for i, arg in enumerate(node.args):
                            if i < len(params) and self._is_trt(arg, scope):
                                changed |= self._taint_target(ast.Name(params[i]), fn)
                        for kw in node.keywords:
                            if kw.arg in params and self._is_trt(kw.value, scope):
                                changed |= self._taint_target(ast.Name(kw.arg), fn)

    # -- uses
    def names(self) -> set[str]:
        used = set()
        for node in ast.walk(self.tree):
            scope = self.scope_of.get(node)
            if isinstance(node, ast.Attribute) and self._is_trt(node.value, scope):
                used.add(node.attr)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and node.args
                and self._is_trt(node.args[0], scope)
            ):
                key = node.args[1] if len(node.args) > 1 else None
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    used.add(key.value)
                else:
                    self.dynamic.append(f"{self.filename}:{node.lineno}")
        return used


def trt_modules() -> list[Path]:
    """The package's modules that import tensorrt."""
    out = []
    for path in sorted((ROOT / "cellsam_trt").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Import) and any(a.name == "tensorrt" for a in n.names) for n in ast.walk(tree)):
            out.append(path)
    return out


@pytest.fixture(scope="module")
def used() -> dict[str, set[str]]:
    out = {}
    for path in trt_modules():
        usage = TrtUsage(path.read_text(), str(path))
        out[str(path.relative_to(ROOT))] = usage.names()
        assert not usage.dynamic, f"getattr on a TensorRT object with a computed name: {usage.dynamic}"
    return out


def test_the_analysis_finds_the_builder_and_runtime_calls(used):
    assert set(used) >= {"cellsam_trt/export/tensorrt_build.py", "cellsam_trt/engine/trt_backend.py"}
    build = used["cellsam_trt/export/tensorrt_build.py"]
    # parsed from the source, not listed here: a few calls that must be among them
    assert {"create_network", "STRONGLY_TYPED", "parse_from_file", "build_serialized_network"} <= build
    assert {"set_shape", "create_timing_cache", "set_memory_pool_limit"} <= build
    run = used["cellsam_trt/engine/trt_backend.py"]
    assert {"deserialize_cuda_engine", "execute_async_v3", "set_tensor_address", "get_tensor_dtype"} <= run


@pytest.mark.parametrize("version", VERSIONS)
def test_every_used_name_exists_in_the_bindings(used, version):
    names = binding_names(version)
    missing = {f: sorted(u - names) for f, u in used.items() if u - names}
    assert not missing, f"TensorRT {version} bindings lack {missing}"


def test_nothing_removed_in_11_is_used(used):
    removed = binding_names("10.13.3.9") - binding_names("11.4.0.106")
    # what the issue names as removed: the weakly typed builder API and implicit INT8 calibration
    assert {"OBEY_PRECISION_CONSTRAINTS", "FP16", "int8_calibrator", "IInt8EntropyCalibrator2"} <= removed
    assert {"set_calibration_profile", "set_output_type", "precision"} <= removed
    hits = {f: sorted(u & removed) for f, u in used.items() if u & removed}
    assert not hits, f"uses names that TensorRT 11 removed: {hits}"


def test_the_check_catches_the_old_builder():
    """The analysis sees removed and misspelt names in code written the weakly typed way."""
    old = """
def build(plan, path):
    import tensorrt as trt
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    pin(network, trt)
    config.int8_calibrator = None
    config.set_calibraton_profile(None)


def pin(net, trt):
    layer = net.get_layer(0)
    layer.precision = trt.float32
    layer.set_output_type(0, trt.float32)
"""
    used = TrtUsage(old).names()
    removed = binding_names("10.13.3.9") - binding_names("11.4.0.106")
    assert used & removed == {"FP16", "int8_calibrator", "precision", "set_output_type"}
    assert used - binding_names("10.3.0") == {"set_calibraton_profile"}
    dyn = TrtUsage("import tensorrt as trt\nflag = getattr(trt.BuilderFlag, name)\n")
    dyn.names()
    assert dyn.dynamic == ["<source>:2"]


def test_names_file_matches_the_tool(tmp_path):
    """The stored names are what the tool writes (its format), and its ELF reader refuses
    what it cannot read."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trt_bindings_names", ROOT / "tools" / "trt_bindings_names.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for v in VERSIONS:
        rec = json.loads((DATA / f"tensorrt-{v}.json").read_text())
        assert rec["names"] == sorted(set(rec["names"])) and rec["counts"]["so"] > 1000
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        tool.so_names(b"\x7fELF\x01\x01" + bytes(64))
    assert tool.python_names("import x\n__version__ = '1'\ndef f():\n    y = 1\nA.b = 2\n") == {"__version__", "f", "b"}
