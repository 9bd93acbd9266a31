"""Exports made on the fly for ONNX Runtime, cached by the checkpoint's sha256."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..model.checkpoint import load_checkpoint, sha256_file
from ..model.synthetic import default_cache_dir
from ..runtime.manifest import FORMAT_VERSION, MANIFEST
from .onnx_export import export_model


def export_on_the_fly(
    checkpoint: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    threads: int = 0,
    synthetic_seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The export directory of a checkpoint file (FP32 graphs, validated at batch 1 and 1 / 5
    prompts), made once under ``cache`` (default ``~/.cache/cellsam-trt/exports``)/<sha256
    prefix>-v<export format>; concurrent callers each export to a temporary folder and the
    first rename wins. ``log`` is told when an export is actually made (not when cached)."""
    path = Path(checkpoint)
    sha = sha256_file(path)
    root = Path(cache) if cache is not None else default_cache_dir() / "exports"
    dest = root / f"{sha[:16]}-v{FORMAT_VERSION}"  # a newer export format gets a fresh export
    if (dest / MANIFEST).is_file():
        return dest
    if log is not None:
        log(f"exporting {path} for ONNX Runtime into {dest} (once; later runs take it from the cache)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{sha[:16]}."))
    try:
        ck = load_checkpoint(path)
        export_model(
            ck.model,
            tmp,
            checkpoint_sha256=sha,
            checkpoint_path=str(path.resolve()),
            synthetic_seed=synthetic_seed,
            image_batches=(1,),
            decoder_prompts=(1, 5),
            threads=threads,
        )
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
