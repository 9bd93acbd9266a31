"""PyTorch backend: the FP32 reference, and FP16 / BF16 with SDPA and CUDA graphs on a GPU.

One backend on the shared base (``engine.base``: spec checks, batching, prompt layout, decode
chunks, a lock per runner), three runners: the SAM image encoder, CellFinder (absent for a
plain SAM checkpoint) and the prompt decoder, which takes the decoder graph's inputs
(``runtime.prompt_layout``: points with label codes) through ``Sam.decode_layout``.

* ``precision`` "fp32" (default), "fp16" or "bf16". Reduced precision is ``torch.autocast`` (so
  matmuls / convolutions run in FP16 / BF16 with FP32 accumulation) with FP32 islands forced on
  every device: every ``nn.LayerNorm`` / ``LayerNorm2d`` / ``GroupNorm`` (input cast to FP32,
  autocast off), the prompt encoder's random-Fourier positional encoding (its sin / cos
  arguments reach tens of radians), and CellFinder's class and box heads (the top-k inputs,
  followed by the FP32 inverse-sigmoid / sigmoid). Softmax outside SDPA follows autocast's op
  lists (FP32 on CUDA). Outputs are float32. INT8 is not a torch precision (``BackendError``:
  the ort and trt backends run INT8).
* ``sdpa``: the SAM attentions use ``torch.nn.functional.scaled_dot_product_attention`` with
  4-D (B, heads, L, D) operands, the layout PyTorch's fused kernels need. The ViT blocks pass
  SAM's decomposed relative-position bias as an additive (B, heads, L, L) ``attn_mask`` with
  ``scale`` = head_dim^-0.5 (softmax(q k^T s + bias) v, the same arithmetic as SAM's
  softmax((q s) k^T + bias) v up to rounding; the memory-efficient kernel takes such a mask on
  CUDA, flash attention does not); the mask decoder's attentions are plain SDPA (the image side,
  batch 1, expanded to the N prompts as a view). CellFinder's row-column attention is left as it
  is (it is not a softmax(QK^T)V attention); its query self-attention is
  ``nn.MultiheadAttention``, which already uses SDPA. Default: on for reduced precision or CUDA,
  off for FP32 on the CPU, so that the CPU FP32 backend is the eager, bit-faithful reference
  (in FP32 the SDPA model equals it within ~1e-5, ``tests/test_torch_backend.py``).
* ``cuda_graphs``: on a CUDA device, the image encoder and CellFinder are captured into a CUDA
  graph per input shape (``_GraphedCall``) and replayed; the decoder (variable prompt count)
  runs eagerly. Ignored on the CPU.
* TF32: every call of a CUDA backend runs with TF32 off for FP32 matmuls and convolutions
  (``no_tf32``: set around the call, restored after it, never at import), so FP32 on CUDA is
  FP32 and the FP32 islands of reduced precision are FP32 too.
* ``device_resident``: ``encode(..., on_device=True)`` and ``decode(..., on_device=True)`` return
  float32 tensors on the backend's device (the GPU scheduler keeps embeddings and mask logits
  there); runners have ``infer_tensors`` beside the base's NumPy ``infer``.
* ``copy_model``: the caller's model is never modified: the modules the backend runs (the mask
  SAM and CellFinder; not the unused SAM copy of an adv-mode checkpoint) are deep-copied when the
  backend must change them (SDPA or FP32-island patches, a move to another device, eval mode),
  and shared when it runs them as they are (FP32 eager on their own device: no second copy of
  the weights). ``copy_model=False`` patches / moves the caller's modules in place.

No silent fallback: a CUDA device that is not there, BF16 on a GPU without it, or an unknown
precision raise ``BackendError`` with one line saying why.
"""

from __future__ import annotations

import copy
import threading
import types
from collections.abc import Callable, Mapping
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.cellsam import CellSAM
from ..model.sam import Attention, LayerNorm2d, PositionEmbeddingRandom, ViTAttention
from ..runtime import specs as S
from ..runtime.prompt_layout import prompt_tokens
from .base import Backend, BackendError, Runner

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
INT8_HINT = (
    "INT8 runs on the ort backend (an export made with --int8, CPU) or the trt backend "
    "(engines built with --precision int8)"
)


# --------------------------------------------------------------------------- module patches


def _vit_attention_sdpa(self: ViTAttention, x: torch.Tensor) -> torch.Tensor:
    """ViTAttention.forward with SDPA on 4-D (B, heads, L, D) operands; SAM's decomposed
    relative-position bias (computed from the unscaled q) is the additive (B, heads, L, L) mask."""
    b, h, w, c = x.shape
    nh = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, nh, -1).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hd)
    q, k, v = qkv.unbind(0)
    hd = q.shape[-1]
    r_h = self.rel_pos_h[self.rel_index[:h, :h]].to(q.dtype)  # (h, h, hd)
    r_w = self.rel_pos_w[self.rel_index[:w, :w]].to(q.dtype)  # (w, w, hd)
    r_q = q.reshape(b, nh, h, w, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, nh, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
    x = out.reshape(b, nh, h, w, hd).permute(0, 2, 3, 1, 4).reshape(b, h, w, nh * hd)
    return self.proj(x)


def _decoder_attention_sdpa(self: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mask-decoder Attention.forward with SDPA (batch 1 vs N broadcast by expanding views)."""
    q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
    n = max(q.shape[0], k.shape[0])
    q, k, v = (t.expand(n, -1, -1, -1) if t.shape[0] != n else t for t in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n_q, c = out.shape
    return self.out_proj(out.transpose(1, 2).reshape(b, n_q, h * c))


def _fp32_call(fn: Callable, device_type: str) -> Callable:
    """``fn`` run in FP32 with autocast off (floating tensor arguments cast to float32)."""

    def call(*args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)

    return call


def _fp32_forward(module: nn.Module, device_type: str) -> None:
    """Install an instance-level forward that runs ``module`` as an FP32 island."""
    call = _fp32_call(module.forward, device_type)
    module.forward = types.MethodType(lambda self, *a, **k: call(*a, **k), module)


def prepare_modules(sam: nn.Module, finder: nn.Module | None, device_type: str, reduced: bool, sdpa: bool) -> None:
    """Patch the mask SAM and CellFinder in place: SDPA attentions and (for reduced precision)
    the FP32 islands (every norm and the random-Fourier encoding; CellFinder's class and box heads)."""
    for root in (sam, finder):
        if root is None:
            continue
        for m in root.modules():
            if sdpa and isinstance(m, ViTAttention):
                m.forward = types.MethodType(_vit_attention_sdpa, m)
            elif sdpa and isinstance(m, Attention):
                m.forward = types.MethodType(_decoder_attention_sdpa, m)
            if reduced and isinstance(m, (nn.LayerNorm, LayerNorm2d, nn.GroupNorm)):
                _fp32_forward(m, device_type)
            if reduced and isinstance(m, PositionEmbeddingRandom):
                m.encode = _fp32_call(m.encode, device_type)
    if reduced and finder is not None:
        _fp32_forward(finder.transformer.class_embed, device_type)
        _fp32_forward(finder.transformer.bbox_embed, device_type)


# --------------------------------------------------------------------------- TF32 off


_TF32_LOCK = threading.Lock()
_TF32_DEPTH = 0
_TF32_SAVED: tuple | None = None


def _has_fp32_precision_api() -> bool:
    """torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision`` / ``cudnn.conv.fp32_precision``."""
    try:
        torch.backends.cuda.matmul.fp32_precision  # noqa: B018
        torch.backends.cudnn.conv.fp32_precision  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _tf32_save_and_disable() -> tuple:
    b = torch.backends
    if _has_fp32_precision_api():
        # the new API only (torch refuses to read the legacy flags once the two are mixed)
        saved = ("new", b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision)
        b.cuda.matmul.fp32_precision = "ieee"
        b.cudnn.conv.fp32_precision = "ieee"
        b.cudnn.rnn.fp32_precision = "ieee"
        return saved
    saved = ("legacy", b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    b.cuda.matmul.allow_tf32 = False
    b.cudnn.allow_tf32 = False
    return saved


def _tf32_restore(saved: tuple) -> None:
    b = torch.backends
    if saved[0] == "new":
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved[1:]
    else:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved[1:]


@contextmanager
def no_tf32():
    """FP32 matmuls and cuDNN convolutions in full FP32 (no TF32) inside the block.

    The flags are process-wide, so the context is reference-counted: the first of overlapping
    blocks (other threads' calls included) saves the caller's settings and turns TF32 off, the
    last one restores them exactly.
    """
    global _TF32_DEPTH, _TF32_SAVED
    with _TF32_LOCK:
        if _TF32_DEPTH == 0:
            _TF32_SAVED = _tf32_save_and_disable()
        _TF32_DEPTH += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32_DEPTH -= 1
            if _TF32_DEPTH == 0:
                saved, _TF32_SAVED = _TF32_SAVED, None
                _tf32_restore(saved)


# --------------------------------------------------------------------------- CUDA graphs


class _GraphedCall:
    """Replays ``fn(*tensors)`` from a CUDA graph per input-shape key (CUDA only).

    The first call with a new shape warms ``fn`` up twice on a side stream, captures it with
    static input / output tensors (``capture_error_mode="thread_local"``, so other threads'
    CUDA work does not invalidate the capture), then every call copies its inputs into the
    static inputs, replays, and returns clones of the static outputs. A call from another
    stream first waits for the previous replay's clones (the static buffers are shared).
    Beyond ``max_graphs`` shapes ``fn`` runs eagerly.
    """

    def __init__(self, fn: Callable, max_graphs: int = 4) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.lock = threading.Lock()
        self._done: torch.cuda.Event | None = None

    def __call__(self, *xs: torch.Tensor):
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in xs)
        with self.lock:
            cur = torch.cuda.current_stream()
            if self._done is not None:
                cur.wait_event(self._done)
            entry = self.graphs.get(key)
            if entry is None:
                if len(self.graphs) >= self.max_graphs:
                    return self.fn(*xs)
                static_in = [x.clone() for x in xs]
                side = torch.cuda.Stream()
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.fn(*static_in)
                cur.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    static_out = self.fn(*static_in)
                entry = self.graphs[key] = (graph, static_in, static_out)
            graph, static_in, static_out = entry
            for d, s in zip(static_in, xs):
                d.copy_(s)
            graph.replay()
            if isinstance(static_out, (tuple, list)):
                out = type(static_out)(o.clone() for o in static_out)
            else:
                out = static_out.clone()
            self._done = torch.cuda.Event()
            self._done.record(cur)
            return out

    def clear(self) -> None:
        with self.lock:
            self.graphs.clear()
            self._done = None


# --------------------------------------------------------------------------- runners


_NP_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
}


class _Meta:
    """Shape and NumPy dtype of a tensor, for ``ModelSpec.check_inputs``."""

    def __init__(self, t: torch.Tensor) -> None:
        self.shape = tuple(t.shape)
        self.dtype = np.dtype(_NP_DTYPES.get(t.dtype, object))


class TorchRunner(Runner):
    """One graph as a torch function ``fn(*inputs) -> tuple of float32 tensors`` (inputs in the
    spec's order). ``infer`` (the base's: NumPy in and out) and ``infer_tensors`` (NumPy or
    tensors in, tensors on the device out) check the feeds and hold the runner's lock.
    ``eager`` is ``fn`` without its CUDA graph (the same function where there is none)."""

    def __init__(self, spec: S.ModelSpec, backend: TorchBackend, eager: Callable, graphed: bool = False) -> None:
        super().__init__(spec)
        self.backend = backend
        self.eager = eager
        self.fn = _GraphedCall(eager) if graphed else eager

    def _run(self, feeds: Mapping, eager: bool = False) -> list[torch.Tensor]:
        xs = [self.backend.to_device(feeds[name]) for name in self.spec.input_names]
        with self.backend.call_context():
            return list((self.eager if eager else self.fn)(*xs))

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [o.cpu().numpy() for o in self._run(feeds)]

    def infer_tensors(self, feeds: Mapping, eager: bool = False) -> list[torch.Tensor]:
        """{input name: array or tensor} -> the outputs as float32 tensors on the backend's
        device, in ``spec.output_names`` order. eager: bypass the CUDA graph (for checks)."""
        self.spec.check_inputs({k: _Meta(v) if torch.is_tensor(v) else v for k, v in feeds.items()})
        with self.lock:
            return self._run(feeds, eager)

    def close(self) -> None:
        if isinstance(self.fn, _GraphedCall):
            self.fn.clear()


# --------------------------------------------------------------------------- backend


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BackendError(f"torch backend: bad device {device!r} ({e})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise BackendError(f"torch backend: device {device!r}: use 'cpu' or 'cuda' / 'cuda:N'")
    if not torch.cuda.is_available():
        raise BackendError(
            f"torch backend: device {device!r} asked for, but PyTorch {torch.__version__} sees no "
            "CUDA device (torch.cuda.is_available() is False); use device='cpu'"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise BackendError(
            f"torch backend: device {device!r} asked for, but there are only {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def _resolve_precision(precision: str) -> str:
    p = _ALIASES.get(str(precision).lower(), str(precision).lower())
    if p == "int8":
        raise BackendError(f"the torch backend runs fp32, fp16 or bf16, not int8; {INT8_HINT}")
    if p not in DTYPES:
        raise BackendError(f"torch backend: precision must be fp32, fp16 or bf16, not {precision!r}")
    return p


def _bf16_supported(device: torch.device) -> bool:
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no emulation argument
            return bool(torch.cuda.is_bf16_supported())


class TorchBackend(Backend):
    """Runs a loaded ``CellSAM`` with PyTorch (see the module doc).

    device: "cpu", "cuda" or "cuda:N". precision: "fp32", "fp16" or "bf16".
    sdpa: SDPA attentions (None: on for fp16 / bf16 or CUDA, off for fp32 on the CPU).
    cuda_graphs: CUDA graphs for the encoder and CellFinder (CUDA only).
    decode_chunk: prompts per decoder call (peak memory grows ~40 MB per prompt in FP32).
    copy_model: never modify the caller's model (see the module doc).
    """

    name = "torch"
    device_resident = True

    def __init__(
        self,
        model: CellSAM,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        sdpa: bool | None = None,
        cuda_graphs: bool = True,
        decode_chunk: int = 64,
        copy_model: bool = True,
    ) -> None:
        self.precision = _resolve_precision(precision)
        self.torch_device = _resolve_device(device)
        self.device = str(self.torch_device)
        self.dtype = DTYPES[self.precision]
        self.reduced = self.dtype != torch.float32
        on_cuda = self.torch_device.type == "cuda"
        if self.precision == "bf16" and on_cuda and not _bf16_supported(self.torch_device):
            raise BackendError(
                f"torch backend: {torch.cuda.get_device_name(self.torch_device)} has no BF16 "
                "support; use precision='fp16' (or 'fp32')"
            )
        if int(decode_chunk) < 1:
            raise ValueError("decode_chunk must be >= 1")
        self.decode_chunk = int(decode_chunk)
        self.sdpa = bool(self.reduced or on_cuda) if sdpa is None else bool(sdpa)
        self.cuda_graphs = bool(cuda_graphs and on_cuda)
        self.adv_mode = bool(model.adv_mode)

        sam, finder = model.mask_sam, model.finder
        parts = [m for m in (sam, finder) if m is not None]
        patch = self.sdpa or self.reduced
        moves = any(p.device != self.torch_device for m in parts for p in m.parameters())
        training = any(x.training for m in parts for x in m.modules())
        if copy_model and (patch or moves or training):
            sam = copy.deepcopy(sam)
            finder = copy.deepcopy(finder) if finder is not None else None
            parts = [m for m in (sam, finder) if m is not None]
        for m in parts:
            m.eval().to(self.torch_device)
        prepare_modules(sam, finder, self.torch_device.type, self.reduced, self.sdpa)
        self.sam, self.finder = sam, finder

        bounds = S.Bounds(max_prompts=max(256, self.decode_chunk), max_points=256)
        specs = S.specs_for_config(model.cfg, bounds)
        names = (S.ENCODER, S.DECODER) + ((S.CELLFINDER,) if finder is not None else ())
        super().__init__({k: specs[k] for k in names})

    # -- contexts and tensors ------------------------------------------------------------------
    def autocast(self):
        """The autocast context of this backend (no-op in FP32); cache off for CUDA graphs."""
        if not self.reduced:
            return nullcontext()
        return torch.autocast(self.torch_device.type, dtype=self.dtype, cache_enabled=False)

    def call_context(self) -> ExitStack:
        """What every runner call runs under: no_grad, the device, TF32 off (CUDA), autocast."""
        stack = ExitStack()
        stack.enter_context(torch.no_grad())
        if self.torch_device.type == "cuda":
            stack.enter_context(torch.cuda.device(self.torch_device))
            stack.enter_context(no_tf32())
        stack.enter_context(self.autocast())
        return stack

    def to_device(self, x) -> torch.Tensor:
        """An array or tensor as a tensor on the backend's device (its dtype kept)."""
        if torch.is_tensor(x):
            return x.to(self.torch_device)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.torch_device)

    # -- runners -------------------------------------------------------------------------------
    def make_runner(self, graph: str, stream: int | None) -> TorchRunner:
        spec = self.specs[graph]
        if graph == S.ENCODER:
            encoder = self.sam.image_encoder

            def encode(x):
                return (encoder(x).float(),)

            return TorchRunner(spec, self, encode, graphed=self.cuda_graphs)
        if graph == S.CELLFINDER:
            finder = self.finder

            def detect(x):
                logits, boxes = finder(x)
                return logits.float(), boxes.float()

            return TorchRunner(spec, self, detect, graphed=self.cuda_graphs)
        if graph == S.DECODER:
            sam = self.sam

            def decode(emb, coords, labels):
                lowres, iou = sam.decode_layout(emb, coords, labels)
                return lowres.float(), iou.float()

            return TorchRunner(spec, self, decode)
        raise BackendError(f"{self.name}: no runner for graph {graph!r}")

    # -- device-resident API (the GPU scheduler) -----------------------------------------------
    def _image_tensors(self, graph: str, image) -> list[torch.Tensor]:
        """An image graph on (B, 3, H, W) in calls of at most the spec's batch; device tensors."""
        spec = self.specs.get(graph)
        if spec is None:
            raise BackendError(f"{self.name}: this model has no {graph} graph")
        x = image if torch.is_tensor(image) else np.ascontiguousarray(image, dtype=np.float32)
        b = spec.inputs[0].shape[0]
        max_b = b.max if isinstance(b, S.Dim) else b
        runner, name = self.runner(graph), spec.input_names[0]
        if x.ndim != 4 or x.shape[0] <= max_b:
            return runner.infer_tensors({name: x})
        parts = [runner.infer_tensors({name: x[s : s + max_b]}) for s in range(0, x.shape[0], max_b)]
        return [torch.cat(p) for p in zip(*parts, strict=True)]

    def encode(self, image, on_device: bool = False):
        """(B, 3, 1024, 1024) float32 -> (B, 256, 64, 64) float32 embedding: NumPy, or a tensor on
        the backend's device with ``on_device``."""
        if on_device or torch.is_tensor(image):
            emb = self._image_tensors(S.ENCODER, image)[0]
            return emb if on_device else emb.cpu().numpy()
        return super().encode(image)

    def _tensor_chunks(self, embedding, boxes=None, points=None, point_labels=None, chunk: int | None = None):
        """The decoder over consecutive chunks of prompts, as device tensors (logits (n, 256, 256),
        IoU (n,)); the embedding (array or tensor) goes to the device once."""
        coords, labels = prompt_tokens(boxes, points, point_labels)
        n = coords.shape[0]
        if n == 0:
            return
        emb = embedding if torch.is_tensor(embedding) else np.ascontiguousarray(embedding, dtype=np.float32)
        emb = self.to_device(emb)
        runner = self.runner(S.DECODER)
        step = min(chunk or self.decode_chunk, self.specs[S.DECODER].dims()["N"].max)
        for s in range(0, n, step):
            lr, iou = runner.infer_tensors(
                {"image_embeddings": emb, "point_coords": coords[s : s + step], "point_labels": labels[s : s + step]}
            )
            yield lr[:, 0], iou[:, 0]

    def decode_chunks(self, embedding, boxes=None, points=None, point_labels=None, chunk: int | None = None):
        """``Backend.decode_chunks``; the embedding may also be a tensor (it stays on the device)."""
        if not torch.is_tensor(embedding):
            yield from super().decode_chunks(embedding, boxes, points, point_labels, chunk)
            return
        for lr, iou in self._tensor_chunks(embedding, boxes, points, point_labels, chunk):
            yield lr.cpu().numpy(), iou.cpu().numpy()

    def decode(self, embedding, boxes=None, points=None, point_labels=None, on_device: bool = False):
        """One embedding (1, 256, 64, 64) and N prompts -> low-res logits (N, 256, 256) float32 and
        IoU predictions (N,) float32 (``engine.base``); tensors on the device with ``on_device``
        (the embedding may be a device tensor, e.g. from ``encode(..., on_device=True)``)."""
        if not (on_device or torch.is_tensor(embedding)):
            return super().decode(embedding, boxes, points, point_labels)
        parts = list(self._tensor_chunks(embedding, boxes, points, point_labels))
        if parts:
            lr, iou = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            lr = torch.zeros((0, 256, 256), dtype=torch.float32, device=self.torch_device)
            iou = torch.zeros((0,), dtype=torch.float32, device=self.torch_device)
        if on_device:
            return lr, iou
        return lr.cpu().numpy(), iou.cpu().numpy()
