"""Declarative input/output specs of the three exported networks.

One ``ModelSpec`` per graph names its inputs and outputs, their dtypes and shapes; a shape
entry is either a fixed ``int`` or a ``Dim`` (a named dynamic dimension with min / opt / max).
The same spec drives

* the ONNX exporter's ``dynamic_axes`` (``ModelSpec.dynamic_axes``),
* TensorRT optimization profiles (``profile_shapes``: per input, the (min, opt, max) shapes),
* the runtime's input checks (``ModelSpec.check_inputs``: names, dtypes, ranks, fixed dims,
  dynamic dims within bounds and consistent across inputs), raising ``InputSpecError`` which
  names the offending input,
* the manifest of an export directory (``to_dict`` / ``from_dict``, JSON-safe).

Graphs (all float32 unless stated; coordinates in the 1024 x 1024 model frame):

``image_encoder``
    image (B, 3, 1024, 1024) normalised SAM input -> image_embeddings (B, 256, 64, 64).
``prompt_decoder`` (prompt encoder + mask decoder)
    image_embeddings (1, 256, 64, 64), point_coords (N, P, 2) XY pixels, point_labels (N, P)
    float32 codes -> low_res_masks (N, 1, 256, 256) logits, iou_predictions (N, 1).
    Label codes: 1 foreground point, 0 background point, -1 padding / not-a-point,
    2 box top-left corner, 3 box bottom-right corner (a box is two points labelled 2, 3).
    See ``cellsam_trt.runtime.prompt_layout.prompt_tokens`` for how boxes and points are laid out.
``cellfinder``
    image (B, 3, 1024, 1024) normalised CellFinder input -> pred_logits (B, Q, 2),
    pred_boxes (B, Q, 4) cxcywh in [0, 1] (Q = 3500 for the official model).

The same decoder, split at its per-image part (``CONTEXT_GRAPHS``, what the CPU runs: the
image side once per image, then the prompts in small calls whose working set stays in cache):

``prompt_context``
    image_embeddings (1, 256, 64, 64) -> image_tokens (1, 4096, 256), t2i_keys (1, 8, 16, 4096),
    t2i_values and i2t_queries (1, 8, 4096, 16) (the first two-way layer's image-side
    projections, split into its 8 heads).
``context_decoder``
    those four, point_coords (N, P, 2), point_labels (N, P) -> low_res_masks (N, 1, 256, 256),
    iou_predictions (N, 1), as ``prompt_decoder``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

ENCODER = "image_encoder"
DECODER = "prompt_decoder"
CELLFINDER = "cellfinder"
MODEL_NAMES = (ENCODER, DECODER, CELLFINDER)
PROMPT_CONTEXT = "prompt_context"
CONTEXT_DECODER = "context_decoder"
CONTEXT_GRAPHS = (PROMPT_CONTEXT, CONTEXT_DECODER)  # exported with the decoder, run by ORT on CPU

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class InputSpecError(ValueError):
    """An input that does not match a graph's spec. ``model`` and ``input`` name the graph and
    the offending input (``input`` is None when the set of names is wrong)."""

    def __init__(self, model: str, input: str | None, problem: str) -> None:
        self.model, self.input, self.problem = model, input, problem
        where = f"input {input!r} of {model}" if input else f"inputs of {model}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: ``name`` is shared by every axis that must agree (e.g. N of the
    decoder's three prompt inputs); ``min <= opt <= max`` bound it (opt: what TensorRT tunes for)."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(
                f"dimension {self.name}: need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}"
            )

    def to_dict(self) -> dict:
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype ("float32", "int64", ...), shape, meaning."""

    name: str
    dtype: str
    shape: tuple[int | Dim, ...]
    doc: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"{self.name}: unsupported dtype {self.dtype!r}")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype])

    def dims(self, which: str) -> tuple[int, ...]:
        """Concrete shape with every dynamic dim at its ``which`` ("min", "opt" or "max") value."""
        return tuple(getattr(d, which) if isinstance(d, Dim) else int(d) for d in self.shape)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "doc": self.doc,
            "shape": [d.to_dict() if isinstance(d, Dim) else int(d) for d in self.shape],
        }

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        shape = tuple(Dim(**x) if isinstance(x, dict) else int(x) for x in d["shape"])
        return cls(d["name"], d["dtype"], shape, d.get("doc", ""))


@dataclass(frozen=True)
class ModelSpec:
    """Inputs and outputs of one exported graph (in graph order) and its file name."""

    name: str
    filename: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dims(self) -> dict[str, Dim]:
        """Every named dynamic dimension of the graph (inputs and outputs)."""
        out: dict[str, Dim] = {}
        for t in self.inputs + self.outputs:
            for d in t.shape:
                if isinstance(d, Dim):
                    if d.name in out and out[d.name] != d:
                        raise ValueError(f"{self.name}: dimension {d.name} declared with different bounds")
                    out[d.name] = d
        return out

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export(dynamic_axes=...)``: tensor name -> {axis: dim name}."""
        return {
            t.name: {i: d.name for i, d in enumerate(t.shape) if isinstance(d, Dim)}
            for t in self.inputs + self.outputs
            if any(isinstance(d, Dim) for d in t.shape)
        }

    def example_inputs(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        return {t.name: t.dims(which) for t in self.inputs}

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check ``feeds`` (name -> array) against the spec; returns the value of each dynamic dim.

        Raises InputSpecError naming the input for a missing or unexpected name, a wrong dtype,
        a wrong rank, a fixed dim that differs, a dynamic dim outside [min, max], or a dynamic
        dim whose value differs between inputs (e.g. 5 boxes but 4 label rows).
        """
        names = set(feeds)
        missing = [n for n in self.input_names if n not in names]
        extra = sorted(names - set(self.input_names))
        if missing:
            raise InputSpecError(self.name, missing[0], f"missing (expected inputs {self.input_names})")
        if extra:
            raise InputSpecError(self.name, extra[0], f"unexpected input (expected {self.input_names})")
        bound: dict[str, tuple[int, str]] = {}
        for t in self.inputs:
            a = feeds[t.name]
            dtype = getattr(a, "dtype", None)
            if dtype is None or np.dtype(dtype) != t.np_dtype:
                raise InputSpecError(self.name, t.name, f"dtype {dtype} where {t.dtype} is required")
            shape = tuple(a.shape)
            if len(shape) != len(t.shape):
                raise InputSpecError(
                    self.name,
                    t.name,
                    f"rank {len(shape)} (shape {shape}) where rank {len(t.shape)} {self.describe_shape(t)} is required",
                )
            for axis, (got, want) in enumerate(zip(shape, t.shape)):
                if isinstance(want, Dim):
                    if not want.min <= got <= want.max:
                        raise InputSpecError(
                            self.name,
                            t.name,
                            f"axis {axis} ({want.name}) is {got}, outside [{want.min}, {want.max}] (shape {shape})",
                        )
                    if want.name in bound and bound[want.name][0] != got:
                        other = bound[want.name][1]
                        raise InputSpecError(
                            self.name,
                            t.name,
                            f"axis {axis} ({want.name}) is {got} but {other!r} has {want.name} = {bound[want.name][0]}",
                        )
                    bound.setdefault(want.name, (got, t.name))
                elif got != want:
                    raise InputSpecError(
                        self.name,
                        t.name,
                        f"axis {axis} is {got} where {want} is required "
                        f"(shape {shape}, expected {self.describe_shape(t)})",
                    )
        return {k: v for k, (v, _) in bound.items()}

    @staticmethod
    def describe_shape(t: TensorSpec) -> str:
        return "(" + ", ".join(d.name if isinstance(d, Dim) else str(d) for d in t.shape) + ")"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "filename": self.filename,
            "doc": self.doc,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(
            d["name"],
            d["filename"],
            tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
            tuple(TensorSpec.from_dict(x) for x in d["outputs"]),
            d.get("doc", ""),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> ModelSpec:
        return cls.from_dict(json.loads(s))


def profile_shapes(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """TensorRT optimization profile of a spec: input name -> (min, opt, max) shapes.

    Fixed dims appear unchanged in all three; every dynamic dim takes its min / opt / max, so
    inputs that share a dim (the decoder's N) get consistent shapes.
    """
    return {t.name: (t.dims("min"), t.dims("opt"), t.dims("max")) for t in spec.inputs}


@dataclass(frozen=True)
class Bounds:
    """Bounds of the dynamic dims (batch of the two image networks, prompts per decoder call,
    points per prompt). The runtime splits larger batches into calls within these bounds."""

    max_images: int = 8
    max_detector_images: int = 4
    max_prompts: int = 256
    opt_prompts: int = 32
    max_points: int = 16


def model_specs(
    img_size: int = 1024,
    embed_dim: int = 256,
    grid: int = 64,
    num_queries: int = 3500,
    num_classes: int = 2,
    bounds: Bounds | None = None,
    heads: int = 8,
) -> dict[str, ModelSpec]:
    """The specs of every graph (``MODEL_NAMES`` + ``CONTEXT_GRAPHS``) for a model geometry (the
    defaults are the official CellSAM)."""
    b = bounds or Bounds()
    batch = Dim("B", 1, 1, b.max_images)
    det_batch = Dim("B", 1, 1, b.max_detector_images)
    n = Dim("N", 1, min(b.opt_prompts, b.max_prompts), b.max_prompts)
    p = Dim("P", 1, min(2, b.max_points), b.max_points)
    low = 4 * grid
    encoder = ModelSpec(
        ENCODER,
        f"{ENCODER}.onnx",
        (TensorSpec("image", "float32", (batch, 3, img_size, img_size), "normalised SAM encoder input"),),
        (TensorSpec("image_embeddings", "float32", (batch, embed_dim, grid, grid), "SAM image embedding"),),
        "SAM ViT-B image encoder",
    )
    decoder = ModelSpec(
        DECODER,
        f"{DECODER}.onnx",
        (
            TensorSpec("image_embeddings", "float32", (1, embed_dim, grid, grid), "one image's embedding"),
            TensorSpec("point_coords", "float32", (n, p, 2), "XY in the model frame (pixels)"),
            TensorSpec("point_labels", "float32", (n, p), "1 fg, 0 bg, -1 padding, 2/3 box corners"),
        ),
        (
            TensorSpec("low_res_masks", "float32", (n, 1, low, low), "mask logits"),
            TensorSpec("iou_predictions", "float32", (n, 1), "predicted IoU"),
        ),
        "SAM prompt encoder + mask decoder (single-mask output), image side broadcast over N prompts",
    )
    hw, d = grid * grid, embed_dim // 2 // heads
    context_tensors = (
        TensorSpec("image_tokens", "float32", (1, hw, embed_dim), "embedding + no-mask embedding, token-major"),
        TensorSpec("t2i_keys", "float32", (1, heads, d, hw), "first layer's token->image key projection, per head"),
        TensorSpec("t2i_values", "float32", (1, heads, hw, d), "first layer's token->image value projection, per head"),
        TensorSpec(
            "i2t_queries", "float32", (1, heads, hw, d), "first layer's image->token query projection, per head"
        ),
    )
    context = ModelSpec(
        PROMPT_CONTEXT,
        f"{PROMPT_CONTEXT}.onnx",
        (decoder.inputs[0],),
        context_tensors,
        "per-image part of the prompt decoder (computed once per image)",
    )
    context_decoder = ModelSpec(
        CONTEXT_DECODER,
        f"{CONTEXT_DECODER}.onnx",
        context_tensors + decoder.inputs[1:],
        decoder.outputs,
        "per-prompt part of the prompt decoder, given the image's prompt_context",
    )
    finder = ModelSpec(
        CELLFINDER,
        f"{CELLFINDER}.onnx",
        (TensorSpec("image", "float32", (det_batch, 3, img_size, img_size), "normalised CellFinder input"),),
        (
            TensorSpec("pred_logits", "float32", (det_batch, num_queries, num_classes), "class logits"),
            TensorSpec("pred_boxes", "float32", (det_batch, num_queries, 4), "cxcywh in [0, 1]"),
        ),
        "CellFinder (AnchorDETR on a SAM ViT-B trunk)",
    )
    return {
        ENCODER: encoder,
        DECODER: decoder,
        CELLFINDER: finder,
        PROMPT_CONTEXT: context,
        CONTEXT_DECODER: context_decoder,
    }


def specs_for_config(cfg, bounds: Bounds | None = None) -> dict[str, ModelSpec]:
    """Specs for a ``CellSAMConfig`` (tiny test models included)."""
    return model_specs(
        img_size=cfg.sam.img_size,
        embed_dim=cfg.sam.out_chans,
        grid=cfg.sam.grid_size,
        num_queries=cfg.cellfinder.num_queries,
        num_classes=cfg.cellfinder.num_classes,
        bounds=bounds,
        heads=cfg.sam.decoder_heads,
    )
