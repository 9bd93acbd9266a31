"""Names of the TensorRT Python bindings, read from the bindings wheels without importing them.

    pip download --no-deps "tensorrt-cu12-bindings==10.3.0" -d wheels/
    pip download --no-deps "tensorrt-cu12-bindings==10.13.3.9" -d wheels/
    pip download --no-deps "tensorrt-cu12-bindings==11.4.0.106" -d wheels/
    python tools/trt_bindings_names.py wheels/*.whl --out tests/data/trt_bindings/

``tensorrt.so`` cannot be imported here (it needs libnvinfer, which the bindings wheels do not
carry), so the names are read from the file: pybind11 registers every class, method, attribute
and enum member with a C string literal (``.def("create_network", ...)``,
``.value("STRONGLY_TYPED", ...)``), and the code loads each literal's address with a
RIP-relative ``lea`` (or stores it in a table with a relative relocation). A plain ``strings``
listing misses names: the linker merges string tails, so ``"Logger"`` is stored as the tail of
``"ILogger"`` and ``"serialize"`` as the tail of ``"deserialize"``. So the names here are the
identifier-like C strings that start at an address the code refers to:

* every ``REX.W lea r64, [rip + disp32]`` (``48/4c 8d`` with ModRM mod=00 r/m=101) in
  ``.text`` whose target lies in ``.rodata``;
* every ``R_X86_64_RELATIVE`` addend in ``.rela.dyn`` that points into ``.rodata``;

plus the top-level and class-attribute names that the wheel's ``tensorrt/__init__.py`` defines
in Python (``__version__``, ``nptype``, ``Logger.Severity``, ...).

A byte pattern scan of ``.text`` can also decode bytes that are not an instruction start; such
a false target adds a name only if it lands exactly on the start of an identifier string, so
the list may hold a few names the bindings do not register, never miss one they do. The
namespace is flat: the file does not say which class a name belongs to.

Output: one JSON file per wheel, ``tensorrt-<version>.json``: the package, version, wheel file
name and sha256, how the names were read, and the sorted names. Standard library only;
x86-64 ELF only.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import struct
import sys
import zipfile
from pathlib import Path

IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
R_X86_64_RELATIVE = 8


def _sections(elf: bytes) -> dict[str, tuple[int, int, int]]:
    """Section name -> (virtual address, file offset, size) of an ELF64 little-endian file."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (e_machine,) = struct.unpack_from("<H", elf, 18)
    if e_machine != 62:
        raise ValueError(f"ELF machine {e_machine} is not x86-64 (62)")
    e_shoff, e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<Q", elf, 40) + struct.unpack_from("<3H", elf, 58)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    names_off = headers[e_shstrndx][4]
    out = {}
    for h in headers:
        start = names_off + h[0]
        name = elf[start : elf.index(b"\x00", start)].decode()
        out[name] = (h[3], h[4], h[5])  # sh_addr, sh_offset, sh_size
    return out


def _c_string(elf: bytes, offset: int) -> bytes:
    end = elf.find(b"\x00", offset)
    return elf[offset:end] if end >= 0 else b""


def so_names(elf: bytes) -> set[str]:
    """Identifier-like C strings of ``.rodata`` that the code or a relocation refers to."""
    sec = _sections(elf)
    ro_addr, ro_off, ro_size = sec[".rodata"]
    tx_addr, tx_off, tx_size = sec[".text"]
    targets: set[int] = set()
    text = elf[tx_off : tx_off + tx_size]
    for m in re.finditer(rb"[\x48\x4c]\x8d", text):
        i = m.start()
        if i + 7 > len(text) or text[i + 2] & 0xC7 != 0x05:
            continue
        (disp,) = struct.unpack_from("<i", text, i + 3)
        targets.add(tx_addr + i + 7 + disp)
    if ".rela.dyn" in sec:
        _, off, size = sec[".rela.dyn"]
        for _offset, r_info, r_addend in struct.iter_unpack("<QQq", elf[off : off + size]):
            if r_info & 0xFFFFFFFF == R_X86_64_RELATIVE:
                targets.add(r_addend)
    names = set()
    for t in targets:
        if ro_addr <= t < ro_addr + ro_size:
            s = _c_string(elf, ro_off + t - ro_addr)
            if IDENT.fullmatch(s):
                names.add(s.decode())
    return names


def python_names(source: str) -> set[str]:
    """Names the package's ``__init__.py`` defines at module level: functions, classes and
    assigned names, and attributes it assigns on classes (``Logger.Severity = ...``); the
    bodies of functions and loop variables are not names of the package."""
    names: set[str] = set()

    def visit(stmts) -> None:
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = list(node.targets) if isinstance(node, ast.Assign) else [node.target]
                while targets:
                    t = targets.pop()
                    if isinstance(t, ast.Name):
                        names.add(t.id)
                    elif isinstance(t, ast.Attribute):
                        names.add(t.attr)
                    elif isinstance(t, (ast.Tuple, ast.List)):
                        targets += t.elts
            for field in ("body", "orelse", "finalbody", "handlers"):
                if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) and hasattr(node, field):
                    visit(getattr(node, field))

    visit(ast.parse(source).body)
    return names


def read_wheel(path: Path) -> dict:
    """The record of one bindings wheel (see the module docstring)."""
    with zipfile.ZipFile(path) as z:
        so = [n for n in z.namelist() if n.endswith("/tensorrt.so") or re.search(r"/tensorrt\.cpython.*\.so$", n)]
        init = [n for n in z.namelist() if re.fullmatch(r"tensorrt[a-z_]*/__init__\.py", n)]
        meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        if len(so) != 1 or len(init) != 1 or len(meta) != 1:
            raise ValueError(f"{path}: expected one tensorrt.so, __init__.py and METADATA, found {so} {init} {meta}")
        fields = dict(
            line.split(": ", 1) for line in z.read(meta[0]).decode().splitlines() if ": " in line and line[0] != " "
        )
        elf = z.read(so[0])
        init_src = z.read(init[0]).decode()
    from_so = so_names(elf)
    from_py = python_names(init_src)
    version = re.search(r'__version__\s*=\s*"([^"]+)"', init_src)
    return {
        "package": fields.get("Name"),
        "version": fields.get("Version"),
        "module_version": version.group(1) if version else None,
        "wheel": path.name,
        "wheel_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "method": "tools/trt_bindings_names.py: identifier C strings of tensorrt.so referenced by RIP-relative "
        "lea or R_X86_64_RELATIVE relocations, plus names defined by tensorrt/__init__.py",
        "counts": {"so": len(from_so), "python": len(from_py)},
        "names": sorted(from_so | from_py),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheels", nargs="+", type=Path, help="tensorrt(-cuXX)-bindings wheels")
    ap.add_argument("--out", type=Path, required=True, help="folder for the tensorrt-<version>.json files")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for w in args.wheels:
        rec = read_wheel(w)
        dest = args.out / f"tensorrt-{rec['version']}.json"
        dest.write_text(json.dumps(rec, indent=0) + "\n")
        print(f"{w.name}: {len(rec['names'])} names -> {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
