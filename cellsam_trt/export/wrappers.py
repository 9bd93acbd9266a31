"""Export-friendly forms of the three networks (control-flow free, dynamic batch / prompts).

* ``EncoderGraph`` and ``CellFinderGraph`` run the model modules unchanged.
* ``PromptDecoderGraph`` is the prompt encoder + mask decoder of one SAM for one image
  embedding and N prompts, written for inference speed and exact in real arithmetic to
  ``Sam.decode`` (checked at export, see ``onnx_export``):

  - prompts are points with label codes (``runtime.prompt_layout.prompt_tokens``): a box is its two corners
    labelled 2 and 3, a padding / not-a-point entry is labelled -1; the embedding of every
    code is selected arithmetically (no branches), so one graph serves boxes, points and both;
  - the image side is computed once and broadcast over the N prompts (the first two-way
    layer's key/value/query projections of the image: ~0.8 GFLOP that the official code
    repeats per prompt);
  - per-prompt attention over the 4096 image tokens is re-associated around the few prompt
    tokens (T = 5 + P): a projection of the 4096 image tokens (4096 x 256 x 128) is replaced by
    projecting the T tokens back into the 256-channel space (8 heads x T x 256), e.g. the
    token->image logits ``(k Wk^T + bk) q_h`` become ``k (Wk_h^T q_h)`` (the bias term is
    constant along each softmax row and cancels), and the image->token output
    ``out_proj(P V)`` becomes ``P (V_h Wo_h^T + bo / h)``. This is ~40 % fewer FLOPs per
    prompt, and fewer passes over (N, 4096, 256) tensors, which are memory-bound on a CPU;
    the 1/sqrt(d) scales are folded into the small token-side factors;
  - the output upscaling (two stride-2 2x2 transposed convolutions) is written as two
    channel-last 2-D GEMMs (bias fused) with LayerNormalization / GELU on the last axis, and
    the hypernetwork product contracts the 32 channels before the pixels are reordered.

  The re-association changes the float32 rounding only (max |diff| ~1e-6 relative to the
  logits' scale against ``Sam.decode``).

Shapes: B images, N prompts, P points per prompt, T = 5 + P tokens, C = 256 channels,
HW = 64 * 64 image tokens, h = 8 heads, d = 16 (internal 128 / 8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.sam import Attention, Sam
from ..runtime.prompt_layout import LABEL_BG, LABEL_BOX_BR, LABEL_BOX_TL, LABEL_FG, LABEL_PAD


class EncoderGraph(nn.Module):
    """image (B, 3, 1024, 1024) -> image_embeddings (B, 256, 64, 64)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class CellFinderGraph(nn.Module):
    """image (B, 3, 1024, 1024) -> pred_logits (B, Q, 2), pred_boxes (B, Q, 4)."""

    def __init__(self, finder: nn.Module) -> None:
        super().__init__()
        self.finder = finder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finder(image)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(N, L, h*d) -> (N, h, L, d)."""
    n, l, c = x.shape
    return x.reshape(n, l, h, c // h).transpose(1, 2)


class PromptDecoderGraph(nn.Module):
    """image_embeddings (1, 256, 64, 64), point_coords (N, P, 2), point_labels (N, P) float32 ->
    low_res_masks (N, 1, 256, 256), iou_predictions (N, 1) (first mask, multimask off)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        pe, md = sam.prompt_encoder, sam.mask_decoder
        self.pe, self.md = pe, md
        self.input_size = float(pe.input_size)
        with torch.no_grad():
            self.register_buffer("image_pe", pe.dense_pe().flatten(2).transpose(1, 2).contiguous())  # (1, HW, C)
            # point-embedding table indexed by label code + 1: -1, 0, 1, 2, 3
            table = torch.cat([pe.not_a_point_embed.weight] + [pe.point_embeddings[i].weight for i in range(4)])
            self.register_buffer("label_embed", table)  # (5, C)
            self.register_buffer("out_tokens", torch.cat([md.iou_token.weight, md.mask_tokens.weight]))
            up1, ln, _, up2, _ = md.output_upscaling
            c4, c8 = up1.out_channels, up2.out_channels
            # ConvTranspose2d(k=2, s=2) weight (in, out, ky, kx) -> (in, ky*kx*out), column (ky, kx, out)
            self.register_buffer("up1_w", up1.weight.permute(0, 2, 3, 1).reshape(up1.in_channels, 4 * c4).contiguous())
            self.register_buffer("up1_b", up1.bias.repeat(4))
            self.register_buffer("up2_w", up2.weight.permute(0, 2, 3, 1).reshape(up2.in_channels, 4 * c8).contiguous())
            self.register_buffer("up2_b", up2.bias.repeat(4))
            self.register_buffer("ln_w", ln.weight.detach().clone())
            self.register_buffer("ln_b", ln.bias.detach().clone())
        self.c4, self.c8, self.ln_eps = c4, c8, ln.eps
        self.grid = pe.grid

    # -- prompt encoder ----------------------------------------------------------------------
    def embed_prompts(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, P, 2), (N, P) -> sparse embeddings (N, P, C), as PromptEncoder (bit for bit)."""
        pos = self.pe.pe_layer.encode((coords + 0.5) / self.input_size)
        lab = labels.unsqueeze(-1)
        pad = lab == LABEL_PAD
        emb = torch.where(pad, torch.zeros_like(pos), pos)
        for i, code in enumerate((LABEL_PAD, LABEL_BG, LABEL_FG, LABEL_BOX_TL, LABEL_BOX_BR)):
            emb = emb + (lab == code).to(emb.dtype) * self.label_embed[i]
        return emb

    # -- attention, re-associated --------------------------------------------------------------
    @staticmethod
    def _t2i(att: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Tokens attend to image tokens. q (N, T, C); k, v (N, HW, C) -> (N, T, C).

        logits_h = (k Wk_h^T + bk_h) q_h / sqrt(d) = k (Wk_h^T q_h / sqrt(d)) + const(row): the
        key bias adds one constant per softmax row and cancels, so it is dropped; the output
        P (v Wv_h^T + bv_h) = (P v) Wv_h^T + bv_h since each softmax row sums to 1.
        """
        h = att.num_heads
        n, t, _ = q.shape
        d = att.q_proj.out_features // h
        qh = _heads(att.q_proj(q), h) * (1.0 / math.sqrt(d))  # (N, h, T, d)
        wk = att.k_proj.weight.reshape(h, d, -1)  # (h, d, C)
        a = (qh @ wk).reshape(n, h * t, -1)  # (N, hT, C)
        pv = ((a @ k.transpose(1, 2)).softmax(-1) @ v).reshape(n, h, t, -1)  # (N, h, T, C)
        wv = att.v_proj.weight.reshape(h, d, -1).transpose(1, 2)  # (h, C, d)
        out = pv @ wv + att.v_proj.bias.reshape(h, 1, d)  # (N, h, T, d)
        return att.out_proj(out.transpose(1, 2).reshape(n, t, h * d))

    @staticmethod
    def _i2t_output(att: Attention, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """probs (N, HW, h*T) per-head softmax, v (N, T, C) -> out_proj(P V) = P U with
        U_h = V_h Wo_h^T + bo / h (each head's probabilities sum to 1, so the bias folds into U)."""
        h = att.num_heads
        n, t, _ = v.shape
        d = att.v_proj.out_features // h
        vh = _heads(att.v_proj(v), h)  # (N, h, T, d)
        wo = att.out_proj.weight.reshape(-1, h, d).permute(1, 2, 0)  # (h, d, C)
        u = (vh @ wo + att.out_proj.bias * (1.0 / h)).reshape(n, h * t, -1)  # (N, hT, C)
        return probs @ u

    def _i2t_shared(self, att: Attention, qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Image tokens attend to prompt tokens, image side shared: qh (1, h, HW, d) the image
        tokens' query projection, once per image (``context``); k, v (N, T, C)."""
        h = att.num_heads
        n, t, _ = k.shape
        kh = _heads(att.k_proj(k), h) * (1.0 / math.sqrt(qh.shape[-1]))  # (N, h, T, d)
        probs = (qh @ kh.transpose(-2, -1)).softmax(-1).permute(0, 2, 1, 3).reshape(n, -1, h * t)  # (N, HW, hT)
        return self._i2t_output(att, probs, v)

    def _i2t(self, att: Attention, q_img: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Image tokens attend to prompt tokens, per prompt: q_img (N, HW, C); k, v (N, T, C).

        logits_h = (q Wq_h^T + bq_h) k_h^T / sqrt(d) = q (Wq_h^T k_h^T / sqrt(d)) + bq_h k_h^T / sqrt(d).
        """
        h = att.num_heads
        n, t, _ = k.shape
        d = att.q_proj.out_features // h
        kh = _heads(att.k_proj(k), h) * (1.0 / math.sqrt(d))  # (N, h, T, d)
        wq = att.q_proj.weight.reshape(h, d, -1).transpose(1, 2)  # (h, C, d)
        b = (wq @ kh.transpose(-2, -1)).permute(0, 2, 1, 3).reshape(n, -1, h * t)  # (N, C, hT)
        c = (kh * att.q_proj.bias.reshape(h, 1, d)).sum(-1).reshape(n, 1, h * t)
        hw = q_img.shape[1]
        probs = (q_img @ b + c).reshape(n, hw, h, t).softmax(-1).reshape(n, hw, h * t)
        return self._i2t_output(att, probs, v)

    # -- image side (once per image) ----------------------------------------------------------
    def context(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, C, g, g) -> what the first two-way layer needs of the image, shared by all prompts,
        in the layouts its products read (no per-prompt transposes): image_tokens (1, HW, C)
        (embedding + no-mask embedding, token-major), t2i_keys (1, h, d, HW) and t2i_values
        (1, h, HW, d) (its token->image key / value projections), i2t_queries (1, h, HW, d)
        (its image->token query projection); h heads of d = C / 2h."""
        l1 = self.md.transformer.layers[0]
        src = (image_embeddings + self.pe.no_mask_embed.weight.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
        k_img = src + self.image_pe
        t2i, i2t = l1.cross_attn_token_to_image, l1.cross_attn_image_to_token
        h = t2i.num_heads
        return (
            src,
            _heads(t2i.k_proj(k_img), h).transpose(-2, -1),
            _heads(t2i.v_proj(src), h),
            _heads(i2t.q_proj(k_img), h),
        )

    # -- prompt side -----------------------------------------------------------------------------
    def decode_context(
        self,
        src: torch.Tensor,
        t2i_keys: torch.Tensor,
        t2i_values: torch.Tensor,
        i2t_queries: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ):
        """The N prompts of one image given its ``context``: -> low_res_masks (N, 1, 4g, 4g),
        iou_predictions (N, 1)."""
        md = self.md
        tr = md.transformer
        sparse = self.embed_prompts(point_coords, point_labels)
        n = sparse.shape[0]
        tokens = torch.cat([self.out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)  # (N, T, C)
        pos = self.image_pe

        # first two-way layer (no PE on the first self-attention), image-side projections given
        l1 = tr.layers[0]
        queries = l1.norm1(l1.self_attn(tokens, tokens, tokens))
        att = l1.cross_attn_token_to_image
        h = att.num_heads
        qh = _heads(att.q_proj(queries + tokens), h) * (1.0 / math.sqrt(t2i_values.shape[-1]))  # (N, h, T, d)
        o = (qh @ t2i_keys).softmax(-1) @ t2i_values  # (N, h, T, d)
        queries = l1.norm2(queries + att.out_proj(o.transpose(1, 2).reshape(n, -1, o.shape[1] * o.shape[-1])))
        queries = l1.norm3(queries + l1.mlp(queries))
        keys = l1.norm4(src + self._i2t_shared(l1.cross_attn_image_to_token, i2t_queries, queries + tokens, queries))

        for layer in tr.layers[1:]:
            q = queries + tokens
            queries = layer.norm1(queries + layer.self_attn(q, q, queries))
            k_img = keys + pos
            queries = layer.norm2(queries + self._t2i(layer.cross_attn_token_to_image, queries + tokens, k_img, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + self._i2t(layer.cross_attn_image_to_token, k_img, queries + tokens, queries))

        # only the IoU token (0) and the first mask token (1) are read after the final attention,
        # and it (and its LayerNorm) acts per token: the other T - 2 query rows are not computed
        queries, tokens = queries[:, :2], tokens[:, :2]
        queries = tr.norm_final_attn(
            queries + self._t2i(tr.final_attn_token_to_image, queries + tokens, keys + pos, keys)
        )

        # upscaling, channel-last 2-D GEMMs (bias fused): (N*HW, C) -> (N*HW*4, C/4) -> (N*HW*16, C/8)
        g = self.grid
        x = F.linear(keys.reshape(-1, keys.shape[-1]), self.up1_w.t(), self.up1_b).reshape(-1, self.c4)
        x = F.gelu(F.layer_norm(x, (self.c4,), self.ln_w, self.ln_b, self.ln_eps))
        x = F.gelu(F.linear(x, self.up2_w.t(), self.up2_b)).reshape(n, g * g * 16, self.c8)
        hyper = md.output_hypernetworks_mlps[0](queries[:, 1, :])  # (N, C/8)
        m = (x @ hyper.unsqueeze(-1)).reshape(n, g, g, 2, 2, 2, 2)  # (i, j, ky, kx, ky2, kx2)
        masks = m.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 1, 4 * g, 4 * g)
        iou = md.iou_prediction_head(queries[:, 0, :])[:, 0:1]
        return masks, iou

    # -- whole decoder -------------------------------------------------------------------------
    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor):
        return self.decode_context(*self.context(image_embeddings), point_coords, point_labels)


class PromptContextGraph(nn.Module):
    """image_embeddings (1, C, g, g) -> image_tokens (1, HW, C), t2i_keys (1, h, d, HW), t2i_values
    and i2t_queries (1, h, HW, d): ``PromptDecoderGraph.context``, the decoder's per-image part."""

    def __init__(self, decoder: PromptDecoderGraph) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings: torch.Tensor):
        return self.decoder.context(image_embeddings)


class ContextDecoderGraph(nn.Module):
    """The decoder's per-prompt part: ``PromptContextGraph``'s four outputs, point_coords (N, P, 2),
    point_labels (N, P) -> low_res_masks (N, 1, 4g, 4g), iou_predictions (N, 1)."""

    def __init__(self, decoder: PromptDecoderGraph) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_tokens, t2i_keys, t2i_values, i2t_queries, point_coords, point_labels):
        return self.decoder.decode_context(image_tokens, t2i_keys, t2i_values, i2t_queries, point_coords, point_labels)
