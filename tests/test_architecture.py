"""Layers that point one way: no import cycles between the package's modules, the runtime core
and the backends free of torch / onnx / export, and the runtime running where importing torch
or onnx raises (``pip install ".[ort]"`` without torch)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

PKG = Path(__file__).resolve().parents[1] / "cellsam_trt"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import of ``path`` (relative ones resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports under a module-level `if` / `try` count as module level
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, id(node) in top))
            out += [(f"{mod}.{a.name}", id(node) in top) for a in node.names]  # `from . import x`
    return out


def _graph(module_level_only: bool = False) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for imp, top in _imports(path):
            if module_level_only and not top:
                continue
            if imp in modules and imp != m:
                graph[m].add(imp)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    """Counting function-level imports too: a cycle hidden behind a lazy import is still one."""
    graph = _graph()
    # a package's __init__ re-exporting lazily (``__getattr__``) is not a dependency of its children
    graph["cellsam_trt"] = set()
    assert _cycles(graph) == []


def test_layers_point_one_way():
    graph = _graph()
    heavy = {"torch", "onnx", "onnxruntime", "tensorrt", "openvino"}
    for path in (PKG / "runtime").glob("*.py"):
        for imp, _ in _imports(path):
            root = imp.split(".")[0]
            assert root not in heavy, f"{path.name} imports {imp}: the runtime core is NumPy only"
            if imp.startswith("cellsam_trt."):
                assert imp.startswith("cellsam_trt.runtime"), f"{path.name} imports {imp}"
    for m, deps in graph.items():
        if m.startswith("cellsam_trt.engine"):
            assert not any(d.startswith("cellsam_trt.export") for d in deps), f"{m} imports export: {deps}"
            assert not any(
                d.split(".")[1] in ("pipeline", "scheduler", "gpu_scheduler", "api", "cli", "slide")
                for d in deps
                if d.count(".")
            ), f"{m} imports a layer above the backends: {deps}"
        if m in ("cellsam_trt.pipeline", "cellsam_trt.scheduler"):
            assert not any(d.split(".")[1] in ("api", "cli", "export", "model") for d in deps if d.count(".")), deps
    # the modules `run` needs import no torch / onnx at module level
    for m in ("pipeline", "scheduler", "api", "cli", "engine/base", "engine/ort_backend", "labels", "io", "outputs"):
        for imp, top in _imports(PKG / f"{m}.py"):
            if top:
                assert imp.split(".")[0] not in ("torch", "onnx"), f"{m}.py imports {imp} at module level"


BLOCK = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None
    sys.meta_path.insert(0, _Block())
""")


def test_the_runtime_runs_where_importing_torch_or_onnx_raises(tiny_export, tmp_path):
    """`run`, `segment`, `segment_many` and the interactive calls on an ONNX export, in a process
    where `import torch` / `import onnx` raise (as after `pip install ".[ort]"`)."""
    from cellsam_trt.cli import synthetic_cells

    img, boxes = synthetic_cells(1, 128, 144, 5)
    np.save(tmp_path / "img.npy", img)
    (tmp_path / "boxes.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    script = BLOCK + textwrap.dedent(f"""
        import json, numpy as np
        from cellsam_trt import CellSAM, Prompts, SegmentSettings
        from cellsam_trt.cli import main
        img = np.load({str(tmp_path / "img.npy")!r}); boxes = np.array({boxes.tolist()!r}, np.float32)
        m = CellSAM.load({str(tiny_export)!r}, settings=SegmentSettings(iou_threshold=-100))
        a = m.segment(img, boxes=boxes)
        b = [r.segmentation.labels for r in m.segment_many([img, img], Prompts(boxes=boxes))]
        view = m.prompt(img)
        c = view.segment(boxes=boxes); d = view.segment(points=[[[20.0, 30.0]]])
        auto = m.segment(img)
        rc = main(["run", {str(tmp_path / "img.npy")!r}, "--out", {str(tmp_path / "out")!r}, "--model",
                   {str(tiny_export)!r}, "--boxes", {str(tmp_path / "boxes.json")!r}, "--quiet",
                   "--iou-threshold=-100", "--format", "npy"])
        assert all((x == a.labels).all() for x in b) and (c.labels == a.labels).all()
        assert "torch" not in sys.modules and "onnx" not in sys.modules
        np.save({str(tmp_path / "front.npy")!r}, a.labels.astype(np.uint16))
        print(json.dumps({{"rc": rc, "cells": int(a.labels.max()), "point": d.labels.shape[0],
                           "auto": int(auto.labels.max())}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0 and res["cells"] > 0 and res["point"] == 128
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "img_labels.npy"), np.load(tmp_path / "front.npy"))


def test_a_checkpoint_without_torch_is_one_clear_line(tmp_path):
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"x")
    np.save(tmp_path / "img.npy", np.ones((32, 32), np.uint8))
    script = BLOCK + textwrap.dedent(f"""
        from cellsam_trt.cli import main
        sys.exit(main(["run", {str(tmp_path / "img.npy")!r}, "--out", {str(tmp_path / "o")!r}, "--checkpoint",
                       {str(ck)!r}, "--quiet"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pip install" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "module",
    [
        "cellsam_trt",
        "cellsam_trt.runtime.specs",
        "cellsam_trt.engine.ort_backend",
        "cellsam_trt.pipeline",
        "cellsam_trt.api",
        "cellsam_trt.cli",
    ],
)
def test_importing_loads_nothing_heavy(module):
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, {module}; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
