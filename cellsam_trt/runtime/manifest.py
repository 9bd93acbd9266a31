"""The manifest of an export directory (``manifest.json``, written last by ``cellsam-trt export``).

Keys read at run time: ``format`` / ``format_version``, ``adv_mode`` (bool), ``has_detector``,
``models`` ({graph name: {"file", "spec" (``specs.ModelSpec`` dict), optional "int8": {"file"}}}),
``checkpoint`` ({"path", "sha256", "synthetic_seed"}).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "cellsam-trt-onnx"
FORMAT_VERSION = 2  # 2: the decoder's split form (specs.CONTEXT_GRAPHS) is written with it
READABLE_VERSIONS = (1, 2)  # a v1 export runs, with the whole decoder only


class ManifestError(ValueError):
    """An export directory that cannot be used (no manifest, wrong format, missing files)."""


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """Load and sanity-check ``model_dir/manifest.json``; returns the manifest."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{model_dir}: not an export directory (no {MANIFEST}; run `cellsam-trt export`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: invalid JSON: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ManifestError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} "
            f"(expected {FORMAT!r} v{' or v'.join(map(str, READABLE_VERSIONS))})"
        )
    for name, entry in manifest.get("models", {}).items():
        for f in [entry["file"]] + ([entry["int8"]["file"]] if "int8" in entry else []):
            if not (Path(model_dir) / f).is_file():
                raise ManifestError(f"{model_dir}: {f} ({name}) listed in the manifest is missing")
    return manifest
