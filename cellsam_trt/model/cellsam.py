"""The CellSAM model: SAM ViT-B (``model``), its optional second copy (``model_cp``) and CellFinder.

Key prefixes match an official CellSAM checkpoint: ``model.``, ``model_cp.`` and
``cellfinder.decode_head.``. Which SAM copy makes the masks, and which preprocessing runs,
depends on whether the checkpoint carries ``model_cp.`` keys ("adv mode", see
``cellsam_trt.model.checkpoint``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .cellfinder import CellFinder, CellFinderConfig
from .sam import Sam, SamConfig


@dataclass(frozen=True)
class CellSAMConfig:
    """Architecture of the whole model. ``CellSAMConfig()`` is the official one."""

    sam: SamConfig = field(default_factory=SamConfig)
    cellfinder: CellFinderConfig = field(default_factory=CellFinderConfig)

    @classmethod
    def tiny(cls, depth: int = 2, num_queries: int = 64, layers: int = 2) -> CellSAMConfig:
        """A small stand-in with the same code paths (windowed and global blocks, full decoder,
        1024 input) for fast tests: a narrow 2-block trunk, few queries, 2+2 DETR layers."""
        sam = SamConfig(depth=depth, embed_dim=64, num_heads=2, global_attn_indexes=(depth - 1,))
        cf = CellFinderConfig(trunk=sam, num_queries=num_queries, enc_layers=layers, dec_layers=layers)
        return cls(sam=sam, cellfinder=cf)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CellSAMConfig:
        def sam(x: dict) -> SamConfig:
            return SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in x.items()})

        cf = dict(d["cellfinder"])
        cf["trunk"] = sam(cf["trunk"])
        return cls(sam=sam(d["sam"]), cellfinder=CellFinderConfig(**cf))


class _CellFinderWrapper(nn.Module):
    """Holds CellFinder under the official ``cellfinder.decode_head`` prefix."""

    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        self.decode_head = CellFinder(cfg)


class CellSAM(nn.Module):
    """Parameters of a CellSAM checkpoint. ``mask_sam`` is the SAM copy that makes masks."""

    def __init__(
        self, cfg: CellSAMConfig | None = None, with_model_cp: bool = True, with_cellfinder: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg or CellSAMConfig()
        self.model = Sam(self.cfg.sam)
        self.model_cp = Sam(self.cfg.sam) if with_model_cp else None
        self.cellfinder = _CellFinderWrapper(self.cfg.cellfinder) if with_cellfinder else None

    @property
    def adv_mode(self) -> bool:
        """True when the ``model_cp.`` copy exists (the official "adv_mode" preprocessing)."""
        return self.model_cp is not None

    @property
    def mask_sam(self) -> Sam:
        return self.model_cp if self.model_cp is not None else self.model

    @property
    def finder(self) -> CellFinder | None:
        """CellFinder, or None for a plain SAM checkpoint (prompt-only use)."""
        return self.cellfinder.decode_head if self.cellfinder is not None else None
