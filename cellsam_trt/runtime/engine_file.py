"""The ``.engine`` container: a JSON header in front of a serialized TensorRT engine.

A TensorRT plan only runs with the TensorRT version that built it, and is tuned for (and
usually only loads on) the GPU model it was built on. The header records what the engine was
built for, so that a mismatch is reported with the command that rebuilds it instead of a
deserialization error from inside TensorRT.

Layout (all integers little-endian)::

    offset 0   8 bytes   magic  b"CSAMTRT\\0"
    offset 8   uint32    container version (1)
    offset 12  uint64    header length L in bytes
    offset 20  L bytes   UTF-8 JSON header (an object, see below)
    offset 20+L          the serialized engine (``IHostMemory`` bytes), to the end of the file

Header keys written by ``cellsam_trt.export.tensorrt_build``:

* ``model``: graph name (``specs.MODEL_NAMES``); ``spec``: the ``ModelSpec`` dict;
* ``tensorrt_version``: e.g. "10.3.0"; ``gpu``: {"name", "compute_capability": "9.0"};
* ``precision``, ``graph_precision``, ``strongly_typed``, ``profiles`` ({input: {"min",
  "opt", "max"}}), ``annotation`` (the manifest's record of the precision-annotated graph),
  ``onnx_file``, ``onnx_sha256``, ``export`` (adv_mode, has_detector of the ONNX export),
  ``engine_sha256``, ``engine_bytes``, ``build_command`` (argv that rebuilds it), ``created``.

Nothing here needs TensorRT: ``check_compatible`` compares a header with the facts of the
machine that wants to load it (``RuntimeFacts``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"CSAMTRT\0"
CONTAINER_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
MAX_HEADER_BYTES = 16 << 20
ENGINE_SUFFIX = ".engine"


class EngineFileError(ValueError):
    """A file that is not a readable cellsam-trt engine container (wrong magic, truncated,
    corrupt header or engine bytes)."""


class EngineCompatError(RuntimeError):
    """An engine built for another TensorRT version or GPU. The message says exactly what
    differs and the command that rebuilds the engine on this machine (``rebuild_command``)."""

    def __init__(self, path: str, problems: list[str], rebuild_command: str) -> None:
        self.path, self.problems, self.rebuild_command = path, problems, rebuild_command
        super().__init__(
            f"{path}: cannot be used on this machine: "
            + "; ".join(problems)
            + f". Rebuild it here with:\n  {rebuild_command}"
        )


@dataclass(frozen=True)
class RuntimeFacts:
    """What the loading machine offers: TensorRT version, GPU name and compute capability
    ("major.minor", e.g. "8.9")."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def engine_path(out_dir: str | os.PathLike, model: str) -> Path:
    """Where ``cellsam-trt build`` writes the engine of graph ``model``."""
    return Path(out_dir) / f"{model}{ENGINE_SUFFIX}"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(header: dict, engine: bytes | memoryview) -> bytes:
    """Container bytes for ``header`` (JSON-serialisable dict) and the serialized engine."""
    if not isinstance(header, dict):
        raise TypeError("header must be a dict")
    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    if len(blob) > MAX_HEADER_BYTES:
        raise EngineFileError(f"header of {len(blob)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, CONTAINER_VERSION, len(blob)) + blob + bytes(engine)


def write_engine_file(path: str | os.PathLike, header: dict, engine: bytes | memoryview) -> Path:
    """Write the container atomically (temporary file in the same folder, then rename).

    ``engine_sha256`` and ``engine_bytes`` are added to the header (a copy) so that a
    truncated or altered file is detected on load.
    """
    path = Path(path)
    engine = bytes(engine)
    header = dict(header, engine_sha256=sha256_bytes(engine), engine_bytes=len(engine))
    data = pack(header, engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _read_prefix(f, path) -> int:
    raw = f.read(_PREFIX.size)
    if len(raw) < _PREFIX.size:
        raise EngineFileError(f"{path}: too short to be an engine file ({len(raw)} bytes)")
    magic, version, length = _PREFIX.unpack(raw)
    if magic != MAGIC:
        raise EngineFileError(
            f"{path}: not a cellsam-trt engine file (magic {magic!r}); a bare TensorRT plan "
            "has no header: rebuild it with `cellsam-trt build`"
        )
    if version != CONTAINER_VERSION:
        raise EngineFileError(
            f"{path}: engine container version {version}, this cellsam-trt reads version "
            f"{CONTAINER_VERSION}: rebuild it with `cellsam-trt build`"
        )
    if length > MAX_HEADER_BYTES:
        raise EngineFileError(f"{path}: header length {length} is implausible (corrupt file)")
    return length


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header only (the engine bytes are not read)."""
    with open(path, "rb") as f:
        length = _read_prefix(f, path)
        blob = f.read(length)
    if len(blob) != length:
        raise EngineFileError(f"{path}: truncated header ({len(blob)} of {length} bytes)")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineFileError(f"{path}: corrupt header: {e}") from e
    if not isinstance(header, dict):
        raise EngineFileError(f"{path}: header is not a JSON object")
    return header


def read_engine_file(path: str | os.PathLike, verify: bool = True) -> tuple[dict, bytes]:
    """(header, serialized engine bytes). ``verify`` checks the length and sha256 recorded in
    the header (EngineFileError on a mismatch)."""
    with open(path, "rb") as f:
        length = _read_prefix(f, path)
        blob = f.read(length)
        engine = f.read()
    if len(blob) != length:
        raise EngineFileError(f"{path}: truncated header ({len(blob)} of {length} bytes)")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineFileError(f"{path}: corrupt header: {e}") from e
    if verify:
        want_len = header.get("engine_bytes")
        if want_len is not None and want_len != len(engine):
            raise EngineFileError(f"{path}: engine is {len(engine)} bytes, the header says {want_len} (truncated?)")
        want_sha = header.get("engine_sha256")
        if want_sha is not None and want_sha != sha256_bytes(engine):
            raise EngineFileError(f"{path}: engine bytes do not match the sha256 in the header (corrupt file)")
    return header, engine


def rebuild_command(header: dict, path: str | os.PathLike | None = None) -> str:
    """The shell command that rebuilds this engine (recorded at build time; a generic one when
    the header has none)."""
    argv = header.get("build_command")
    if isinstance(argv, list) and argv:
        return " ".join(shlex.quote(str(a)) for a in argv)
    onnx_dir = header.get("onnx_dir") or "EXPORT_DIR"
    out_dir = str(Path(path).parent) if path is not None else "ENGINE_DIR"
    precision = header.get("precision", "fp16")
    return f"cellsam-trt build --onnx {shlex.quote(str(onnx_dir))} --out {shlex.quote(out_dir)} --precision {precision}"


def compatibility_problems(header: dict, facts: RuntimeFacts, strict_gpu_name: bool = True) -> list[str]:
    """What keeps an engine with ``header`` from running on a machine with ``facts`` (empty
    when compatible).

    TensorRT version: must be identical (plans are not portable across versions unless built
    version-compatible, which these are not). Compute capability: must be identical. GPU
    name: must be identical when ``strict_gpu_name`` (tactics are timed on that model;
    another model of the same architecture loads but may be slow or fail).
    """
    problems = []
    built_trt = str(header.get("tensorrt_version", "?"))
    if built_trt != facts.tensorrt_version:
        problems.append(f"built with TensorRT {built_trt}, this machine has TensorRT {facts.tensorrt_version}")
    gpu = header.get("gpu") or {}
    cc = str(gpu.get("compute_capability", "?"))
    name = str(gpu.get("name", "?"))
    if cc != facts.compute_capability:
        problems.append(
            f"built for {name} (compute capability {cc}), this GPU is {facts.gpu_name} "
            f"(compute capability {facts.compute_capability})"
        )
    elif strict_gpu_name and name != facts.gpu_name:
        problems.append(
            f"built on {name}, this GPU is {facts.gpu_name} (same compute capability {cc}; "
            "tactics were tuned for the other model)"
        )
    return problems


def check_compatible(
    header: dict, facts: RuntimeFacts, path: str | os.PathLike = "engine", strict_gpu_name: bool = True
) -> None:
    """Raise EngineCompatError (with the rebuild command) when the engine cannot run here."""
    problems = compatibility_problems(header, facts, strict_gpu_name)
    if problems:
        raise EngineCompatError(str(path), problems, rebuild_command(header, path))


@dataclass(frozen=True)
class GpuFacts:
    """The target GPU: marketing name, compute capability (major, minor), memory in bytes."""

    name: str
    compute_capability: tuple[int, int]
    total_memory: int

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def supports_fast_fp16(self) -> bool:
        return self.compute_capability >= (5, 3)

    @property
    def supports_int8(self) -> bool:
        return self.compute_capability >= (6, 1)

    def to_dict(self) -> dict:
        return {"name": self.name, "compute_capability": self.cc, "total_memory": int(self.total_memory)}
