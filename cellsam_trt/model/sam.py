"""SAM ViT-B modules, checkpoint-compatible with segment_anything.

The parameter names and shapes are those of ``segment_anything.modeling`` (so an official
CellSAM or SAM checkpoint loads unchanged), the arithmetic is the same, and the module
structure is written for this engine:

* the mask decoder takes ONE image embedding and N prompts and broadcasts the image side
  instead of repeating the embedding N times; the image-only projections of the first
  two-way layer are therefore computed once per image, not once per prompt;
* only what CellSAM needs is built (no mask prompts, single-mask output by default).

Shapes use B = images, N = prompts, T = tokens, C = channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of a SAM image encoder / prompt encoder / mask decoder.

    The defaults are SAM ViT-B as used by CellSAM. ``depth`` and ``global_attn_indexes`` may be
    reduced for fast tests (the checkpoint layout then has fewer ``blocks.*`` keys).
    """

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def grid_size(self) -> int:
        """Side of the embedding grid in patches (64 for 1024 / 16)."""
        return self.img_size // self.patch_size


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor (eps 1e-6, as SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """lin1 -> activation -> lin2."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


# --------------------------------------------------------------------------- image encoder


class PatchEmbed(nn.Module):
    """(B, 3, 1024, 1024) -> (B, 64, 64, 768) by a 16x16 stride-16 convolution."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def _rel_pos_index(size: int) -> torch.Tensor:
    """(size, size) int64 index into a (2*size-1, C) relative-position table: q - k + size - 1."""
    coords = torch.arange(size)
    return coords[:, None] - coords[None, :] + (size - 1)


class ViTAttention(nn.Module):
    """Multi-head self-attention with SAM's decomposed relative position bias.

    Input and output (B, H, W, C). The attention runs over all H*W tokens of each item
    (a window or the whole grid); padded tokens of a window take part, as in SAM.
    """

    def __init__(self, dim: int, num_heads: int, size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))
        self.register_buffer("rel_index", _rel_pos_index(size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, nh, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * nh, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        # decomposed relative position bias (uses the unscaled q)
        r_h = self.rel_pos_h[self.rel_index[:h, :h]]  # (h, h, hd)
        r_w = self.rel_pos_w[self.rel_index[:w, :w]]  # (w, w, hd)
        r_q = q.reshape(b * nh, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w)
        attn = attn.view(b * nh, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
        attn = attn.view(b * nh, h * w, h * w).softmax(dim=-1)
        x = (attn @ v).view(b, nh, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


class ViTBlock(nn.Module):
    """Pre-norm transformer block; windowed (window_size > 0) or global attention."""

    def __init__(self, cfg: SamConfig, window_size: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, cfg.num_heads, window_size if window_size > 0 else cfg.grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            b, h, w, c = x.shape
            ws = self.window_size
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
            x = self.attn(x)
            x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            x = x[:, :h, :w, :]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ViTTrunk(nn.Module):
    """Patch embedding + absolute position embedding + transformer blocks.

    (B, 3, 1024, 1024) float32 -> (B, 64, 64, 768) channels-last features. Shared by the SAM
    image encoder (which adds the neck) and the CellFinder backbone (which does not).
    """

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        g = cfg.grid_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            ViTBlock(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x


class ImageEncoder(ViTTrunk):
    """SAM image encoder: (B, 3, 1024, 1024) normalised image -> (B, 256, 64, 64) embedding."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__(cfg)
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(super().forward(x).permute(0, 3, 1, 2))


# --------------------------------------------------------------------------- prompt encoder


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates: (..., 2) in [0,1] -> (..., 256)."""

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.zeros(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: int) -> torch.Tensor:
        """Dense positional encoding of a size x size grid: (1, 256, size, size)."""
        ones = torch.ones((size, size), device=self.positional_encoding_gaussian_matrix.device)
        y = (ones.cumsum(dim=0) - 0.5) / size
        x = (ones.cumsum(dim=1) - 0.5) / size
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)


class PromptEncoder(nn.Module):
    """Embeds box and point prompts given in the 1024 x 1024 input frame.

    Boxes (N, 4) float XYXY -> sparse (N, 2, 256). Points (N, P, 2) float XY with labels (N, P)
    int (1 foreground, 0 background, -1 padding) -> (N, P(+1), 256); without boxes a padding
    point is appended, as SAM does. The dense embedding (no mask prompt) is ``no_mask_embed``.
    """

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.out_chans
        self.embed_dim = dim
        self.input_size = cfg.img_size
        self.grid = cfg.grid_size
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        # mask_downscaling exists only so that official checkpoints load strictly: CellSAM never
        # gives SAM a mask prompt.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=2, stride=2),
            LayerNorm2d(4),
            nn.GELU(),
            nn.Conv2d(4, 16, kernel_size=2, stride=2),
            LayerNorm2d(16),
            nn.GELU(),
            nn.Conv2d(16, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def _normalise(self, coords: torch.Tensor) -> torch.Tensor:
        # +0.5: pixel centres, as segment_anything does
        return ((coords + 0.5) / self.input_size).to(torch.float32)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.encode(self._normalise(boxes.reshape(-1, 2, 2)))
        first = corners[:, :1] + self.point_embeddings[2].weight
        second = corners[:, 1:] + self.point_embeddings[3].weight
        return torch.cat([first, second], dim=1)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.encode(self._normalise(points))
        lab = labels[..., None]
        emb = torch.where(lab == -1, torch.zeros_like(emb), emb)
        emb = emb + (lab == -1) * self.not_a_point_embed.weight
        emb = emb + (lab == 0) * self.point_embeddings[0].weight
        emb = emb + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def embed_layout(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embeddings (N, P, 256) float32 of prompts already laid out as points
        with label codes (``runtime.prompt_layout.prompt_tokens``: 1 foreground, 0 background,
        -1 padding, 2 / 3 box top-left / bottom-right corner).

        coords (N, P, 2) XY in the input frame; labels (N, P), any numeric dtype. The same tokens
        as ``forward`` for the same prompts: the positional encoding of the pixel centre, zeroed
        for padding, plus ``not_a_point_embed`` for -1 and ``point_embeddings[k]`` for code k.
        """
        emb = self.pe_layer.encode(self._normalise(coords))
        lab = labels[..., None]
        emb = torch.where(lab == -1, torch.zeros_like(emb), emb)
        emb = emb + (lab == -1) * self.not_a_point_embed.weight
        for k in range(4):
            emb = emb + (lab == k) * self.point_embeddings[k].weight
        return emb

    def forward(
        self,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sparse prompt embeddings (N, T, 256) float32."""
        parts = []
        if points is not None:
            parts.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        if not parts:
            raise ValueError("a prompt needs boxes or points")
        return torch.cat(parts, dim=1)

    def dense_pe(self) -> torch.Tensor:
        """(1, 256, 64, 64) positional encoding of the embedding grid."""
        return self.pe_layer.grid(self.grid)


# --------------------------------------------------------------------------- mask decoder


class Attention(nn.Module):
    """SAM's attention with an optional down-projection of the internal dimension.

    q: (Bq, Nq, C), k and v: (Bk, Nk, C) where Bq and Bk broadcast (one image vs N prompts).
    """

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = attn.softmax(dim=-1) @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token (SAM's two-way block)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        attn_out = self.cross_attn_image_to_token(k, queries + query_pe, queries)
        keys = self.norm4(keys + attn_out)
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """image, image_pe: (1 or N, HW, C); tokens: (N, T, C) -> (queries (N, T, C), keys (N, HW, C))."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(queries + tokens, k, keys))
        return queries, keys


class MLP(nn.Module):
    """Linear layers with ReLU between them (SAM's and DETR's heads)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """SAM mask decoder for one image embedding and N prompts.

    forward(embedding (1, 256, 64, 64), dense_pe (1, 256, 64, 64), sparse (N, T, 256),
    no_mask (1, 256)) -> low-res logits (N, M, 256, 256) float32 and IoU predictions (N, M),
    M = 1 (first mask, CellSAM's ``multimask_output=False``) or 3.
    """

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.out_chans
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(cfg.decoder_depth, dim, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden_dim, self.num_mask_tokens, 3)

    def forward(
        self,
        image_embedding: torch.Tensor,
        dense_pe: torch.Tensor,
        sparse: torch.Tensor,
        no_mask: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = image_embedding + no_mask.reshape(1, -1, 1, 1)
        b, c, h, w = src.shape
        src = src.flatten(2).transpose(1, 2)
        pos = dense_pe.flatten(2).transpose(1, 2)
        hs, keys = self.transformer(src, pos, tokens)
        keys = keys.expand(n, -1, -1) if keys.shape[0] != n else keys
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
        sel = range(1, self.num_mask_tokens) if multimask_output else range(0, 1)
        hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in sel], dim=1)
        nu, cu, hu, wu = upscaled.shape
        masks = (hyper @ upscaled.reshape(nu, cu, hu * wu)).reshape(nu, -1, hu, wu)
        iou = self.iou_prediction_head(hs[:, 0, :])[:, list(sel)]
        return masks, iou


class Sam(nn.Module):
    """Container with segment_anything's attribute names (image_encoder, prompt_encoder, mask_decoder)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)

    @torch.no_grad()
    def decode(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All prompts of one image in one call.

        embedding (1, 256, 64, 64) float32; boxes (N, 4) XYXY and/or points (N, P, 2) XY with labels
        (N, P), in the 1024 frame -> low-res logits (N, 1, 256, 256) float32, IoU predictions (N, 1).
        """
        sparse = self.prompt_encoder(boxes=boxes, points=points, labels=labels)
        return self.mask_decoder(
            embedding, self.prompt_encoder.dense_pe(), sparse, self.prompt_encoder.no_mask_embed.weight
        )

    @torch.no_grad()
    def decode_layout(
        self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode`` for prompts in the decoder graph's layout (``PromptEncoder.embed_layout``):
        embedding (1, 256, 64, 64), coords (N, P, 2), labels (N, P) label codes -> low-res
        logits (N, 1, 256, 256) float32, IoU predictions (N, 1)."""
        sparse = self.prompt_encoder.embed_layout(coords, labels)
        return self.mask_decoder(
            embedding, self.prompt_encoder.dense_pe(), sparse, self.prompt_encoder.no_mask_embed.weight
        )
