"""The official models by name: ``get_model`` / ``get_local_model`` as the official package
offers them (``cellSAM.model``), plus the cache, download and install of ``weights``.

    from cellsam_trt.models import get_model, fetch_model, install_archive
    model = get_model("cellsam_general")             # ~/.deepcell/models/cellsam_v1.2/cellsam_general.pt
    res = model.segment(image)

What differs from the official functions, on purpose:

* they return the front door ``cellsam_trt.api.CellSAM`` (``segment``, ``segment_many``,
  ``prompt``; backend, device and precision chosen by ``CellSAM.load``), not a torch module;
  ``cellsam_trt.compat`` builds the official call signatures on it;
* the official loaders use ``load_state_dict(strict=False)`` and ignore unknown and missing
  keys silently; here unexpected keys are reported (``CheckpointWarning``) and the model loads,
  a key missing from a part that runs is refused with the list, and ``strict=True`` refuses
  any mismatch (``cellsam_trt.model.checkpoint``);
* a missing model is downloaded only when a ``token`` is passed (the official function reads
  ``DEEPCELL_ACCESS_TOKEN`` itself; a library here never reads the environment); without one,
  ``ModelNotFound`` says both ways to get the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from .api import CellSAM
from .weights import (
    LATEST,
    MODEL_NAMES,
    RELEASES,
    FetchError,
    ModelNotFound,
    Release,
    default_root,
    fetch_model,
    find_model,
    install_archive,
    is_model_name,
    missing_message,
    model_path,
)

__all__ = [
    "LATEST",
    "MODEL_NAMES",
    "RELEASES",
    "FetchError",
    "ModelNotFound",
    "Release",
    "default_root",
    "fetch_model",
    "find_model",
    "get_local_model",
    "get_model",
    "install_archive",
    "is_model_name",
    "missing_message",
    "model_path",
]


def get_model(
    model: str = "cellsam_general",
    version: str | None = None,
    *,
    root: str | os.PathLike | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
    strict: bool = False,
    **load_options,
) -> CellSAM:
    """The named official model (``cellsam_general`` or ``cellsam_extra``; version None: the
    latest, 1.2) from ``<root>/cellsam_v<version>/<model>.pt`` (root: ``~/.deepcell/models``,
    the official package's cache), loaded with ``CellSAM.load(path, strict=strict,
    **load_options)`` (backend, device, precision, threads, settings, ...).

    With ``token`` a missing model is downloaded first (``fetch_model``; endpoint: a mirror);
    without one it raises ``ModelNotFound`` whose message says how to get it.
    """
    if token:
        path = fetch_model(model, version, token, endpoint, progress, root=root)
    else:
        path = find_model(model, version, root)
    return CellSAM.load(path, strict=strict, **load_options)


def get_local_model(model_path: str | os.PathLike, *, strict: bool = False, **load_options) -> CellSAM:
    """A model from a local path (a checkpoint file, as the official function takes, or an
    export / engine directory), loaded with ``CellSAM.load(path, strict=strict, **load_options)``.
    The path is never read as a model name."""
    return CellSAM.load(Path(model_path), strict=strict, **load_options)
