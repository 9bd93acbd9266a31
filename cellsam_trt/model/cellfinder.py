"""CellFinder: the AnchorDETR cell detector of CellSAM, checkpoint-compatible.

SAM ViT-B trunk without neck -> 1x1 conv + GroupNorm(32) -> AnchorDETR transformer with
row-column decoupled attention (RCDA) -> per-query class logits and boxes.

Parameter names follow the official ``cellfinder.decode_head.*`` layout. The official model
registers the class and box heads six times (one name per decoder layer) but they are one
module; here they are one module and the checkpoint loader maps the six aliases onto it.

Input (B, 3, 1024, 1024) float32 -> pred_logits (B, Q, 2), pred_boxes (B, Q, 4) as
(cx, cy, w, h) in [0, 1], Q = 3500 queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .sam import MLP, SamConfig, ViTTrunk


@dataclass(frozen=True)
class CellFinderConfig:
    """AnchorDETR hyper-parameters; defaults are the official CellSAM values."""

    trunk: SamConfig = field(default_factory=SamConfig)
    hidden_dim: int = 256
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    num_queries: int = 3500
    num_patterns: int = 1
    num_classes: int = 2
    groupnorm_groups: int = 32


def pos2posemb1d(pos: torch.Tensor, num_feats: int = 256, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of scalar positions in [0, 1]: (...,) -> (..., num_feats), (sin, cos) interleaved."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    x = (pos * (2 * math.pi))[..., None] / dim_t
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def pos2posemb2d(pos: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of (x, y) in [0, 1]: (..., 2) -> (..., 2*num_feats) ordered (y-part, x-part)."""
    emb_x = pos2posemb1d(pos[..., 0], num_feats, temperature)
    emb_y = pos2posemb1d(pos[..., 1], num_feats, temperature)
    return torch.cat((emb_y, emb_x), dim=-1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MultiheadRCDA(nn.Module):
    """Row-column decoupled attention.

    Queries attend separately to the W column positions (keys averaged over rows) and the H row
    positions (keys averaged over columns); the value at (h, w) is weighted by the product of
    the two attention weights. Weights: ``in_proj_weight`` (5C, C) stacks the projections of
    (query_row, query_col, key_row, key_col, value).

    query_row, query_col: (B, L, C); key_row, key_col, value: (B, H, W, C) -> (B, L, C).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _proj(self, x: torch.Tensor, i: int) -> torch.Tensor:
        c = self.out_proj.in_features
        return F.linear(x, self.in_proj_weight[i * c : (i + 1) * c], self.in_proj_bias[i * c : (i + 1) * c])

    def forward(self, query_row, query_col, key_row, key_col, value) -> torch.Tensor:
        b, l, c = query_row.shape
        _, h, w, _ = value.shape
        nh = self.num_heads
        hd = c // nh
        scale = float(hd) ** -0.5
        q_row = (self._proj(query_row, 0) * scale).reshape(b, l, nh, hd).transpose(1, 2)  # (B, nh, L, hd)
        q_col = (self._proj(query_col, 1) * scale).reshape(b, l, nh, hd).transpose(1, 2)
        k_row = self._proj(key_row, 2).mean(1).reshape(b, w, nh, hd).transpose(1, 2)  # (B, nh, W, hd)
        k_col = self._proj(key_col, 3).mean(2).reshape(b, h, nh, hd).transpose(1, 2)  # (B, nh, H, hd)
        v = self._proj(value, 4).reshape(b, h, w, nh, hd).permute(0, 3, 1, 2, 4)  # (B, nh, H, W, hd)
        attn_row = (q_row @ k_row.transpose(-2, -1)).softmax(-1)  # (B, nh, L, W)
        attn_col = (q_col @ k_col.transpose(-2, -1)).softmax(-1)  # (B, nh, L, H)
        # contract the rows first: (B, nh, L, H) @ (B, nh, H, W*hd) -> (B, nh, L, W, hd)
        out_col = (attn_col @ v.reshape(b, nh, h, w * hd)).reshape(b, nh, l, w, hd)
        out = (attn_row.unsqueeze(-2) @ out_col).squeeze(-2)  # (B, nh, L, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, l, c))


class FFN(nn.Module):
    """Residual feed-forward block with post-norm: norm2(x + linear2(relu(linear1(x))))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """RCDA self-attention over the (H, W) feature map + FFN; src (B, H, W, C) channels-last."""

    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        self.self_attn = MultiheadRCDA(cfg.hidden_dim, cfg.num_heads)
        self.norm1 = nn.LayerNorm(cfg.hidden_dim)
        self.ffn = FFN(cfg.hidden_dim, cfg.dim_feedforward)

    def forward(self, src: torch.Tensor, posemb_row: torch.Tensor, posemb_col: torch.Tensor) -> torch.Tensor:
        b, h, w, c = src.shape
        k_row = src + posemb_row  # posemb_row (B, 1, W, C): varies along the columns
        k_col = src + posemb_col  # posemb_col (B, H, 1, C): varies along the rows
        out = self.self_attn(k_row.reshape(b, h * w, c), k_col.reshape(b, h * w, c), k_row, k_col, src)
        src = self.norm1(src + out.reshape(b, h, w, c))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    """Query self-attention, RCDA cross-attention to the features, FFN (post-norm)."""

    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cross_attn = MultiheadRCDA(d, cfg.num_heads)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = FFN(d, cfg.dim_feedforward)

    def forward(self, tgt, query_pos, query_pos_x, query_pos_y, src, posemb_row, posemb_col):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        out = self.cross_attn(tgt + query_pos_x, tgt + query_pos_y, src + posemb_row, src + posemb_col, src)
        tgt = self.norm1(tgt + out)
        return self.ffn(tgt)


class AnchorDetrTransformer(nn.Module):
    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.pattern = nn.Embedding(cfg.num_patterns, d)
        self.position = nn.Embedding(cfg.num_queries, 2)
        self.adapt_pos2d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.adapt_pos1d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.class_embed = nn.Linear(d, cfg.num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, C, H, W) projected features -> logits (B, Q, classes), boxes (B, Q, 4) cxcywh in [0, 1]."""
        b, c, h, w = src.shape
        # normalised cumulative positions of an unpadded map: (i + 0.5) / n
        pos_col = (torch.arange(h, dtype=torch.float32, device=src.device) + 0.5) / h
        pos_row = (torch.arange(w, dtype=torch.float32, device=src.device) + 0.5) / w
        posemb_row = self.adapt_pos1d(pos2posemb1d(pos_row)).reshape(1, 1, w, c)
        posemb_col = self.adapt_pos1d(pos2posemb1d(pos_col)).reshape(1, h, 1, c)

        x = src.permute(0, 2, 3, 1)
        for layer in self.encoder_layers:
            x = layer(x, posemb_row, posemb_col)

        p = self.cfg.num_patterns
        ref = self.position.weight.unsqueeze(0).repeat(1, p, 1)  # (1, P*Q, 2)
        tgt = self.pattern.weight.reshape(1, p, 1, c).repeat(b, 1, self.cfg.num_queries, 1).reshape(b, -1, c)
        query_pos = self.adapt_pos2d(pos2posemb2d(ref))
        query_pos_x = self.adapt_pos1d(pos2posemb1d(ref[..., 0]))
        query_pos_y = self.adapt_pos1d(pos2posemb1d(ref[..., 1]))
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, query_pos_x, query_pos_y, x, posemb_row, posemb_col)

        logits = self.class_embed(tgt)
        delta = self.bbox_embed(tgt)
        boxes = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], dim=-1).sigmoid()
        return logits, boxes


class Backbone(nn.Module):
    """Keeps the official ``backbone.body.*`` parameter names for the SAM trunk."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.body = ViTTrunk(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).permute(0, 3, 1, 2)


class CellFinder(nn.Module):
    """(B, 3, 1024, 1024) float32 -> (pred_logits (B, Q, 2), pred_boxes (B, Q, 4) cxcywh in [0, 1])."""

    def __init__(self, cfg: CellFinderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or CellFinderConfig()
        self.cfg = cfg
        self.backbone = Backbone(cfg.trunk)
        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(cfg.trunk.embed_dim, cfg.hidden_dim, kernel_size=1),
                    nn.GroupNorm(cfg.groupnorm_groups, cfg.hidden_dim),
                )
            ]
        )
        self.transformer = AnchorDetrTransformer(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transformer(self.input_proj[0](self.backbone(x)))
