"""The seeded synthetic CellSAM checkpoint (spec v1, ``shared/reference/SYNTHETIC_WEIGHTS.md``).

Trained weights cannot be downloaded here, so tests, benchmarks and the demo use a checkpoint
in the official layout whose values follow a fixed rule from a seed. Anyone can regenerate it
bit for bit; it is cached on disk because 290 M values take a few seconds to draw.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .cellsam import CellSAM, CellSAMConfig
from .checkpoint import to_official_layout

SPEC_VERSION = 1
_CACHE_REVISION = 2  # bump when the generated values change
_CLASS_BIAS = re.compile(r"transformer\.class_embed\.\d+\.bias$")
_BOX_LAST_BIAS = re.compile(r"transformer\.bbox_embed\.\d+\.layers\.2\.bias$")
_BOX_LAST_WEIGHT = re.compile(r"transformer\.bbox_embed\.\d+\.layers\.2\.weight$")
_ALIAS = re.compile(r"\.(class_embed|bbox_embed)\.\d+\.")
# Two rules that SYNTHETIC_WEIGHTS.md does not list but the golden data shows (fitted on the
# golden low-res logits and IoU predictions to ~1e-5): the mask decoder's hypernetwork output
# layers are 20x the generic draw, and its IoU head's output bias takes the norm-scale rule
# (1 + 0.1 N). Without them no golden mask or IoU prediction is reproduced.
_HYPER_LAST_WEIGHT = re.compile(r"mask_decoder\.output_hypernetworks_mlps\.\d+\.layers\.2\.weight$")
_IOU_LAST_BIAS = re.compile(r"mask_decoder\.iou_prediction_head\.layers\.2\.bias$")


def canonical_name(key: str) -> str:
    """The name whose CRC seeds a key: head aliases ``.class_embed.<i>.`` -> ``.class_embed.0.``."""
    return _ALIAS.sub(lambda m: f".{m.group(1)}.0.", key)


def synthetic_tensor(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The value of one key under spec v1: float64 draws from a per-key generator, cast to float32."""
    canon = canonical_name(key)
    rng = np.random.default_rng([seed, zlib.crc32(canon.encode("utf-8"))])
    fan_in = float(np.prod(shape[1:])) if len(shape) > 1 else 1.0
    if key.endswith(".pixel_mean"):
        v = np.array([123.675, 116.28, 103.53]).reshape(shape)
    elif key.endswith(".pixel_std"):
        v = np.array([58.395, 57.12, 57.375]).reshape(shape)
    elif key.endswith("transformer.position.weight"):
        v = rng.random(shape)
    elif key.endswith("positional_encoding_gaussian_matrix"):
        v = rng.standard_normal(shape)
    elif _CLASS_BIAS.search(key):
        v = -3.0 + 0.1 * rng.standard_normal(shape)
    elif _BOX_LAST_BIAS.search(key):
        v = np.array([0.0, 0.0, -3.0, -3.0]) + 0.1 * rng.standard_normal(shape)
    elif _BOX_LAST_WEIGHT.search(key):
        v = 0.1 * rng.standard_normal(shape) / np.sqrt(fan_in)
    elif _HYPER_LAST_WEIGHT.search(key):
        v = 20.0 * rng.standard_normal(shape) / np.sqrt(fan_in)
    elif _IOU_LAST_BIAS.search(key) or (len(shape) == 1 and key.endswith(".weight")):
        v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1 and key.endswith(".bias"):
        v = 0.1 * rng.standard_normal(shape)
    else:
        v = rng.standard_normal(shape) / np.sqrt(fan_in)
    return np.asarray(v, dtype=np.float64).astype(np.float32)


def official_layout(cfg: CellSAMConfig | None = None, with_model_cp: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint for ``cfg`` in the official layout (head aliases expanded)."""
    cfg = cfg or CellSAMConfig()
    with torch.device("meta"):
        model = CellSAM(cfg, with_model_cp=with_model_cp)
    state = to_official_layout(model.state_dict(), cfg.cellfinder.dec_layers)
    return {k: tuple(v.shape) for k, v in state.items()}


def synthetic_state_dict(
    seed: int = 0, cfg: CellSAMConfig | None = None, with_model_cp: bool = True
) -> dict[str, torch.Tensor]:
    """The synthetic checkpoint as a flat official-layout state dict of float32 tensors."""
    return {
        k: torch.from_numpy(synthetic_tensor(k, shape, seed))
        for k, shape in official_layout(cfg, with_model_cp).items()
    }


def _cache_name(seed: int, cfg: CellSAMConfig, with_model_cp: bool) -> str:
    arch = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    official = cfg == CellSAMConfig()
    tag = "official" if official else f"arch-{arch}"
    return f"cellsam_synthetic_v{SPEC_VERSION}r{_CACHE_REVISION}_seed{seed}_{tag}{'' if with_model_cp else '_nocp'}.pt"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "cellsam-trt"


def synthetic_checkpoint(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    cfg: CellSAMConfig | None = None,
    with_model_cp: bool = True,
) -> Path:
    """Path of the synthetic checkpoint file for ``seed``, generated once and cached.

    The file is an ordinary official-layout checkpoint (flat state dict); it is written to a
    temporary file and renamed, so a concurrent or interrupted writer never leaves a torn file.
    """
    cfg = cfg or CellSAMConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / _cache_name(seed, cfg, with_model_cp)
    if path.is_file():
        return path
    state = synthetic_state_dict(seed, cfg, with_model_cp)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
