"""Loading CellSAM and SAM checkpoints.

Accepted files (``torch.load(weights_only=True)``: a checkpoint cannot run code):

* an official CellSAM checkpoint (``cellsam_general.pt``): keys ``model.``, ``cellfinder.`` and,
  in "adv mode", ``model_cp.``; either flat or nested as ``{"state_dict": {...}}``;
* a plain segment_anything SAM ViT-B checkpoint (``image_encoder.``, ``prompt_encoder.``,
  ``mask_decoder.``): loads for prompt-only use (no CellFinder, no automatic mode).

The official model silently switches preprocessing when ``model_cp.`` keys are absent; we do
the same for fidelity but report it as ``LoadedCheckpoint.adv_mode``.

Keys (the official loader, ``load_state_dict(strict=False)``, ignores unknown and missing keys
silently): a tensor of the wrong shape is always refused; a key missing from a part that runs
(``running_parts``: the SAM copy that makes the masks, CellFinder) is always refused, with the
list; unexpected keys, and missing keys of parts that never run (the ``model.`` copy in adv
mode, the prompt encoder's mask-prompt branch), are reported as a ``CheckpointWarning`` and the
model loads. ``strict=True`` refuses every unexpected or missing key.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .cellfinder import CellFinderConfig
from .cellsam import CellSAM, CellSAMConfig
from .sam import SamConfig

# The official model registers its class/box heads once per decoder layer under these names.
_HEAD_ALIAS = re.compile(r"(transformer\.(?:class_embed|bbox_embed))\.(\d+)\.")
_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but does not match the layout exactly (keys listed)."""


@dataclass(frozen=True)
class KeyReport:
    """How a state dict's keys meet the model's. kind: "cellsam" or "sam"; adv_mode: the
    ``model_cp.`` copy is present; unexpected: keys the model has no place for (ignored);
    unused_missing: keys missing from parts that never run (left at their initial values)."""

    kind: str
    cfg: CellSAMConfig
    adv_mode: bool
    unexpected: tuple[str, ...] = ()
    unused_missing: tuple[str, ...] = ()


@dataclass
class LoadedCheckpoint:
    model: CellSAM
    path: str | None
    kind: str  # "cellsam" or "sam"
    adv_mode: bool
    sha256: str | None
    unexpected: tuple[str, ...] = ()  # keys ignored (reported as a CheckpointWarning)
    unused_missing: tuple[str, ...] = ()  # keys of parts that never run, absent from the file

    @property
    def mode_description(self) -> str:
        if self.kind == "sam":
            return "plain SAM checkpoint: prompt-only (no CellFinder), non-adv preprocessing"
        if self.adv_mode:
            return "adv mode: model_cp.* present; masks from model_cp, extra ImageNet/min-max preprocessing"
        return "non-adv mode: no model_cp.* keys; masks from model., no extra preprocessing"


def head_aliases(n_layers: int) -> dict[str, list[str]]:
    """Canonical head prefix -> the official aliased prefixes (``class_embed.0.`` ... ``.5.``)."""
    out = {}
    for head in ("class_embed", "bbox_embed"):
        canon = f"cellfinder.decode_head.transformer.{head}."
        out[canon] = [f"cellfinder.decode_head.transformer.{head}.{i}." for i in range(n_layers)]
    return out


def to_official_layout(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Our state dict -> the official key layout (head tensors under all six aliases)."""
    aliases = head_aliases(n_layers)
    out = {}
    for k, v in state.items():
        for canon, names in aliases.items():
            if k.startswith(canon):
                for name in names:
                    out[name + k[len(canon) :]] = v
                break
        else:
            out[k] = v
    return out


def _canonicalise(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Fold the aliased head names onto one module. The official model loads the aliases in
    order into one shared module, so the last alias wins; differing aliases are reported."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}
    for k, v in state.items():
        m = _HEAD_ALIAS.search(k)
        if m is None:
            out[k] = v
            continue
        canon = k[: m.start()] + m.group(1) + "." + k[m.end() :]
        idx = int(m.group(2))
        if canon in out and not torch.equal(out[canon], v):
            warnings.warn(
                f"{source}: aliased head tensors differ for {canon}; using the last alias, as the official model does",
                stacklevel=2,
            )
        if canon not in out or idx >= seen[canon]:
            out[canon], seen[canon] = v, idx
    return out


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a state dict, got {type(obj).__name__}")
    if (
        "state_dict" in obj
        and isinstance(obj["state_dict"], dict)
        and not any(isinstance(k, str) and k.startswith("model.") for k in obj)
    ):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:5]}")
    return obj


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _trunk_config(state: dict[str, torch.Tensor], prefix: str) -> SamConfig:
    """SAM ViT hyper-parameters read off the tensor shapes under ``prefix`` (e.g. ``model.image_encoder.``)."""
    pos = state[prefix + "pos_embed"]
    grid, dim = pos.shape[1], pos.shape[3]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)))
    rel = [state[f"{prefix}blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
    global_idx = tuple(i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1)
    windowed = [r for r in rel if r.shape[0] != 2 * grid - 1]
    window = (windowed[0].shape[0] + 1) // 2 if windowed else SamConfig.window_size
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    return SamConfig(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=dim // rel[0].shape[1],
        window_size=window,
        global_attn_indexes=global_idx,
    )


def infer_config(state: dict[str, torch.Tensor]) -> CellSAMConfig:
    """The architecture of a (canonicalised, ``model.``-prefixed) state dict, from its shapes.

    The official checkpoint gives ``CellSAMConfig()``; smaller stand-ins (tests) give theirs.
    """
    trunk = "model.image_encoder." if "model.image_encoder.pos_embed" in state else "model_cp.image_encoder."
    sam = _trunk_config(state, trunk)
    body = "cellfinder.decode_head.backbone.body."
    if body + "pos_embed" not in state:
        return CellSAMConfig(sam=sam)
    tr = "cellfinder.decode_head.transformer."
    count = lambda name: (
        1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(tr + name) + r"\.(\d+)\.", k)))
    )
    cf = CellFinderConfig(
        trunk=_trunk_config(state, body),
        hidden_dim=state[tr + "pattern.weight"].shape[1],
        enc_layers=count("encoder_layers"),
        dec_layers=count("decoder_layers"),
        dim_feedforward=state[tr + "encoder_layers.0.ffn.linear1.weight"].shape[0],
        num_queries=state[tr + "position.weight"].shape[0],
        num_patterns=state[tr + "pattern.weight"].shape[0],
        num_classes=state[tr + "class_embed.weight"].shape[0],
    )
    return CellSAMConfig(sam=sam, cellfinder=cf)


def running_parts(kind: str, adv_mode: bool) -> tuple[str, ...]:
    """Key prefixes of the parameters that inference uses: the SAM copy that makes the masks
    (``model_cp.`` in adv mode, else ``model.``: image encoder, prompt encoder, mask decoder)
    and, for a CellSAM checkpoint, CellFinder (``cellfinder.``). The prompt encoder's
    mask-prompt branch (``mask_downscaling``) never runs: CellSAM gives SAM no mask prompt."""
    sam = "model_cp." if adv_mode else "model."
    parts = tuple(sam + p for p in _SAM_PARTS)
    return parts + (("cellfinder.",) if kind == "cellsam" else ())


def _runs(key: str, parts: tuple[str, ...]) -> bool:
    return key.startswith(parts) and ".prompt_encoder.mask_downscaling." not in key


def _prepare(state, cfg: CellSAMConfig | None, source: str) -> tuple[dict[str, torch.Tensor], str, CellSAMConfig]:
    """Unwrapped, ``model.``-prefixed (plain SAM), canonicalised state; its kind and architecture."""
    state = _unwrap(state, source)
    if any(k.startswith(_SAM_PARTS) for k in state) and not any(k.startswith("model.") for k in state):
        state = {"model." + k: v for k, v in state.items()}
        kind = "sam"
    else:
        kind = "cellsam"
    state = _canonicalise(state, source)
    if cfg is None:
        try:
            cfg = infer_config(state)
        except (KeyError, ValueError, IndexError) as e:
            raise CheckpointError(
                f"{source}: not a CellSAM or SAM checkpoint (cannot read its architecture: {e})"
            ) from e
    return state, kind, cfg


def _check(state: dict[str, torch.Tensor], kind: str, cfg: CellSAMConfig, strict: bool, source: str) -> KeyReport:
    """Compare ``state`` (prepared) with the model it makes (built on the meta device: no memory)."""
    adv = any(k.startswith("model_cp.") for k in state)
    with torch.device("meta"):
        own = {
            k: v.shape
            for k, v in CellSAM(cfg, with_model_cp=adv, with_cellfinder=(kind == "cellsam")).state_dict().items()
        }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(own[k])})"
        for k in set(own) & set(state)
        if state[k].shape != own[k]
    )
    if wrong:
        raise CheckpointError(f"{source}: tensors of the wrong shape: {_format_keys(wrong)}")
    parts = running_parts(kind, adv)
    needed = [k for k in missing if _runs(k, parts)]
    if needed:
        raise CheckpointError(
            f"{source}: keys missing from parts that run ({', '.join(p.rstrip('.') for p in parts)}): "
            f"{_format_keys(needed)}"
        )
    if strict and (missing or unexpected):
        found = []
        if missing:
            found.append(f"missing keys (parts that never run): {_format_keys(missing)}")
        if unexpected:
            found.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise CheckpointError(f"{source}: checkpoint does not match the CellSAM layout (strict); " + "; ".join(found))
    if unexpected:
        warnings.warn(
            f"{source}: {len(unexpected)} unexpected keys ignored: {_format_keys(unexpected)}",
            CheckpointWarning,
            stacklevel=3,
        )
    if missing:
        warnings.warn(
            f"{source}: {len(missing)} keys of parts that never run are absent (left unset): {_format_keys(missing)}",
            CheckpointWarning,
            stacklevel=3,
        )
    return KeyReport(kind, cfg, adv, tuple(unexpected), tuple(missing))


def check_state_dict(
    state, cfg: CellSAMConfig | None = None, strict: bool = False, source: str = "<state dict>"
) -> KeyReport:
    """The key check of ``load_state_dict`` without building the model's weights: raises
    CheckpointError (wrong shapes; missing keys of parts that run; with ``strict`` any
    mismatch), warns ``CheckpointWarning`` for what it lets through, returns the report."""
    state, kind, cfg = _prepare(state, cfg, source)
    return _check(state, kind, cfg, strict, source)


def load_state_dict(
    state: dict[str, torch.Tensor],
    cfg: CellSAMConfig | None = None,
    strict: bool = False,
    source: str = "<state dict>",
    report: list | None = None,
) -> tuple[CellSAM, str]:
    """Build a CellSAM for ``state`` and load it. Returns (model, kind) with kind "cellsam" or "sam".

    Keys are checked as the module doc says (``strict``: refuse any mismatch); ``report``, a
    list, receives the ``KeyReport``.
    """
    state, kind, cfg = _prepare(state, cfg, source)
    rep = _check(state, kind, cfg, strict, source)
    if report is not None:
        report.append(rep)
    model = CellSAM(cfg, with_model_cp=rep.adv_mode, with_cellfinder=(kind == "cellsam"))
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model.eval(), kind


def _read(path: Path, mmap: bool = False):
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle with code, truncated file, not a torch file
        if mmap and "mmap" in str(e):  # a legacy (non-zip) torch file cannot be memory-mapped
            return _read(path)
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint: {e}") from e


def check_checkpoint(path: str | os.PathLike, cfg: CellSAMConfig | None = None, strict: bool = False) -> KeyReport:
    """``check_state_dict`` on a checkpoint file, memory-mapped (the tensors are not read)."""
    path = Path(path)
    return check_state_dict(_read(path, mmap=True), cfg=cfg, strict=strict, source=str(path))


def load_checkpoint(
    path: str | os.PathLike, cfg: CellSAMConfig | None = None, strict: bool = False, compute_sha: bool = False
) -> LoadedCheckpoint:
    """Load a CellSAM or SAM checkpoint file safely (weights_only) and report its mode and keys
    (checked as the module doc says; ``strict``: refuse any mismatch)."""
    path = Path(path)
    report: list[KeyReport] = []
    model, kind = load_state_dict(_read(path), cfg=cfg, strict=strict, source=str(path), report=report)
    return LoadedCheckpoint(
        model=model,
        path=str(path),
        kind=kind,
        adv_mode=model.adv_mode and kind == "cellsam",
        sha256=sha256_file(path) if compute_sha else None,
        unexpected=report[0].unexpected,
        unused_missing=report[0].unused_missing,
    )
