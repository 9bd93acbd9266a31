"""PyTorch fast path: FP16 / BF16 autocast, SDPA attention and CUDA graphs (CPU works too).

Implements ``engine.base.Backend`` (NumPy float32 in and out, shapes as ``engine.base``) and,
for ``engine.gpu_pipeline``, ``decode_tensors`` which leaves the mask logits on the device.

* ``dtype``: "float32", "float16" or "bfloat16". Reduced precision is ``torch.autocast`` (so
  matmuls / convolutions run in FP16 / BF16 with FP32 accumulation) with FP32 islands forced
  on every device: every ``nn.LayerNorm`` / ``LayerNorm2d`` / ``GroupNorm`` (input cast to
  FP32, autocast off), the prompt encoder's random-Fourier positional encoding (its sin / cos
  arguments reach tens of radians), and CellFinder's class and box heads (the top-k inputs,
  followed by the FP32 inverse-sigmoid / sigmoid). Softmax outside SDPA follows autocast's
  op lists (FP32 on CUDA). Outputs are returned as float32.
* ``sdpa``: the SAM attentions use ``torch.nn.functional.scaled_dot_product_attention``:
  the ViT blocks pass SAM's decomposed relative-position bias as an additive ``attn_mask``
  with ``scale`` = head_dim^-0.5 (softmax(q k^T s + bias) v, the same arithmetic as
  softmax((q s) k^T + bias) v up to rounding), the mask decoder's attentions are plain SDPA
  (the image side, batch 1, is expanded to the N prompts as a view). CellFinder's
  row-column attention is left as it is (it is not a softmax(QK^T)V attention); its query
  self-attention is ``nn.MultiheadAttention``, which already uses SDPA. In FP32 the SDPA
  model equals the eager one within ~1e-5 (``tests/test_torch_cuda_backend.py``).
* ``cuda_graphs``: on a CUDA device, the image encoder and CellFinder are captured into a CUDA
  graph per input shape (after two warm-up runs on a side stream, autocast with
  ``cache_enabled=False`` as the CUDA-graph notes of PyTorch require) and replayed; the
  decoder (variable prompt count) runs eagerly. Ignored on the CPU.

The model is deep-copied (``copy_model``) before its modules are patched, so the caller's model
is untouched.
"""

from __future__ import annotations

import copy
import threading
import types
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.cellsam import CellSAM
from ..model.sam import Attention, LayerNorm2d, PositionEmbeddingRandom, ViTAttention

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- module patches


def _vit_attention_sdpa(self: ViTAttention, x: torch.Tensor) -> torch.Tensor:
    """ViTAttention.forward with SDPA; the decomposed rel-pos bias is the additive mask."""
    b, h, w, c = x.shape
    nh = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, nh, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * nh, h * w, -1).unbind(0)
    r_h = self.rel_pos_h[self.rel_index[:h, :h]]
    r_w = self.rel_pos_w[self.rel_index[:w, :w]]
    r_q = q.reshape(b * nh, h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h.to(r_q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w.to(r_q.dtype))
    bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b * nh, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
    x = out.view(b, nh, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(x)


def _decoder_attention_sdpa(self: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mask-decoder Attention.forward with SDPA (batch 1 vs N broadcast by expanding views)."""
    q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
    n = max(q.shape[0], k.shape[0])
    q, k, v = (t.expand(n, -1, -1, -1) if t.shape[0] != n else t for t in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, l, c = out.shape
    return self.out_proj(out.transpose(1, 2).reshape(b, l, h * c))


def _fp32_forward(module: nn.Module, device_type: str):
    """A forward that runs ``module`` in FP32 with autocast off (inputs cast to float32)."""
    orig = module.forward

    def forward(self, *args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type, enabled=False):
            return orig(*args, **kwargs)

    return types.MethodType(forward, module)


def _fp32_method(obj, name: str, device_type: str) -> None:
    orig = getattr(obj, name)

    def method(*args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type, enabled=False):
            return orig(*args, **kwargs)

    setattr(obj, name, method)


def prepare_model(model: CellSAM, device: torch.device, reduced: bool, sdpa: bool) -> CellSAM:
    """Patch ``model`` in place: SDPA attentions and (for reduced precision) the FP32 islands."""
    dt = device.type
    for m in model.modules():
        if sdpa and isinstance(m, ViTAttention):
            m.forward = types.MethodType(_vit_attention_sdpa, m)
        elif sdpa and isinstance(m, Attention):
            m.forward = types.MethodType(_decoder_attention_sdpa, m)
        if reduced and isinstance(m, (nn.LayerNorm, LayerNorm2d, nn.GroupNorm)):
            m.forward = _fp32_forward(m, dt)
        if reduced and isinstance(m, PositionEmbeddingRandom):
            _fp32_method(m, "encode", dt)
    finder = model.finder
    if reduced and finder is not None:
        tr = finder.transformer
        tr.class_embed.forward = _fp32_forward(tr.class_embed, dt)
        tr.bbox_embed.forward = _fp32_forward(tr.bbox_embed, dt)
    return model


# --------------------------------------------------------------------------- CUDA graphs


class _GraphedCall:
    """Replays ``fn(*tensors)`` from a CUDA graph per input-shape key (CUDA only).

    The first call with a new shape warms ``fn`` up twice on a side stream, captures it with
    static input / output tensors (``capture_error_mode="thread_local"``, so other threads'
    CUDA work does not invalidate the capture), then every call copies its inputs into the
    static inputs, replays, and returns clones of the static outputs.
    """

    def __init__(self, fn, max_graphs: int = 4) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.lock = threading.Lock()

    def __call__(self, *xs: torch.Tensor):
        key = tuple((tuple(x.shape), x.dtype) for x in xs)
        with self.lock:
            entry = self.graphs.get(key)
            if entry is None:
                if len(self.graphs) >= self.max_graphs:
                    return self.fn(*xs)
                static_in = [x.clone() for x in xs]
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.fn(*static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    static_out = self.fn(*static_in)
                entry = self.graphs[key] = (graph, static_in, static_out)
            graph, static_in, static_out = entry
            for d, s in zip(static_in, xs):
                d.copy_(s)
            graph.replay()
            if isinstance(static_out, (tuple, list)):
                return type(static_out)(o.clone() for o in static_out)
            return static_out.clone()


# --------------------------------------------------------------------------- backend


class TorchCudaBackend:
    """``CellSAM`` in FP32 / FP16 / BF16 with SDPA and CUDA graphs (see the module doc).

    device: "cuda", "cuda:1", "cpu", ... (the CPU path serves tests; CUDA graphs are off there).
    decode_chunk: prompts per decoder call (peak memory grows ~40 MB per prompt in FP32).
    """

    name = "torch-cuda"

    def __init__(self, model: CellSAM, device: str | torch.device = "cuda", dtype: str = "float16",
                 sdpa: bool = True, cuda_graphs: bool = True, decode_chunk: int = 64, copy_model: bool = True) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (torch.cuda.is_available() is False): use device='cpu'")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        if self.dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"{torch.cuda.get_device_name(self.device)} has no BF16 support: use dtype='float16'")
        self.reduced = self.dtype != torch.float32
        m = copy.deepcopy(model) if copy_model else model
        self.model = prepare_model(m.eval().to(self.device), self.device, self.reduced, sdpa)
        self.sdpa = sdpa
        self.decode_chunk = decode_chunk
        self.adv_mode = model.adv_mode
        self.has_detector = model.finder is not None
        self.cuda_graphs = bool(cuda_graphs and self.device.type == "cuda")
        self._encode = self._graphed(self._encode_eager)
        self._detect = self._graphed(self._detect_eager) if self.has_detector else None

    # -- helpers -------------------------------------------------------------------------------
    def _graphed(self, fn):
        return _GraphedCall(fn) if self.cuda_graphs else fn

    def autocast(self):
        """The autocast context of this backend (no-op in FP32); cache off for CUDA graphs."""
        if not self.reduced:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def _tensor(self, x, dtype=torch.float32) -> torch.Tensor:
        if torch.is_tensor(x):
            return x.to(self.device, dtype)
        return torch.as_tensor(np.ascontiguousarray(x)).to(self.device, dtype, non_blocking=True)

    def _encode_eager(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.model.mask_sam.image_encoder(x).float()

    def _detect_eager(self, x: torch.Tensor):
        with torch.no_grad(), self.autocast():
            logits, boxes = self.model.finder(x)
            return logits.float(), boxes.float()

    # -- device-side API (gpu_pipeline) --------------------------------------------------------
    def encode_tensor(self, image) -> torch.Tensor:
        """(B, 3, 1024, 1024) -> (B, 256, 64, 64) float32 tensor on the device."""
        return self._encode(self._tensor(image))

    @torch.no_grad()
    def decode_tensors(self, embedding, boxes=None, points=None, point_labels=None):
        """``decode`` with device tensors out: logits (N, 256, 256) float32, IoU (N,) float32."""
        src = boxes if boxes is not None else points
        n = 0 if src is None else int(src.shape[0])
        if n == 0:
            z = torch.zeros((0, 256, 256), dtype=torch.float32, device=self.device)
            return z, torch.zeros((0,), dtype=torch.float32, device=self.device)
        emb = self._tensor(embedding)
        sam = self.model.mask_sam
        logits, ious = [], []
        with self.autocast():
            for s in range(0, n, self.decode_chunk):
                e = slice(s, min(n, s + self.decode_chunk))
                lr, iou = sam.decode(
                    emb,
                    boxes=None if boxes is None else self._tensor(boxes[e]),
                    points=None if points is None else self._tensor(points[e]),
                    labels=None if point_labels is None else self._tensor(point_labels[e], torch.int64),
                )
                logits.append(lr[:, 0].float())
                ious.append(iou[:, 0].float())
        return torch.cat(logits), torch.cat(ious)

    # -- Backend protocol ----------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.encode_tensor(image).cpu().numpy()

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._detect is None:
            raise RuntimeError("this checkpoint has no CellFinder (plain SAM): give box or point prompts")
        logits, boxes = self._detect(self._tensor(image))
        return logits.cpu().numpy(), boxes.cpu().numpy()

    def decode(self, embedding, boxes=None, points=None, point_labels=None):
        logits, ious = self.decode_tensors(embedding, boxes, points, point_labels)
        return logits.cpu().numpy(), ious.cpu().numpy()
