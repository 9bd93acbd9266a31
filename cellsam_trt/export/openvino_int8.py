"""INT8 the OpenVINO way: NNCF post-training quantization of the two ViT-B trunks of an export.

``quantize_export(model_dir, calib_images)`` reads the export's ``image_encoder`` and
``cellfinder`` graphs (ONNX, through OpenVINO), runs ``nncf.quantize`` (transformer patterns,
CPU target, statistics from the calibration images) on the layers of the scope and writes
``<export>/openvino/<graph>.int8.xml`` + ``.bin``, stamped in ``openvino/ir.json`` with the
sha256 of the ONNX they came from, the scope and the calibration images.
``OvBackend(..., precision="int8")`` runs them; the decoder stays FP32. Scopes:

* ``"mlp"`` (default): only the two MLP MatMuls of every ViT block get INT8 weights and
  activations (every other MatMul / convolution is in NNCF's ignored scope), as the CPU INT8
  of ONNX Runtime (``export.quantize``) and the Q/DQ graphs (``export.precision``);
* ``"all"``: NNCF's own choice for transformers: every MatMul / convolution, the attention
  score products (query x key) too.

NNCF's SmoothQuant (per-channel rescaling of MatMul activations into the weights, alpha 0.95
by default for transformers) is off unless ``smooth_quant=True``; ``benchmarks/bench_ov_int8.py``
measures the agreement with FP32 of each scope with and without it (figures in the README).

Calibration inputs are made by the pipeline's own ``prepare`` stage and ``cellsam_trt.preprocess``
exactly as at run time (``export.tensorrt_build.calibration_batches``: the same inputs as the
TensorRT INT8 calibration). Needs ``pip install "cellsam-trt[openvino]"`` (openvino, nncf).

    cellsam-trt quantize --model cellsam-onnx/ --calib-images calib/ [--max-images 4] [--scope mlp|all]
        [--smooth-quant]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from ..engine.openvino_backend import INT8_GRAPHS, IR_DIR, write_ir
from ..runtime.manifest import ManifestError, read_manifest
from .formats import INT8_SCOPES as SCOPES
from .formats import MLP_NODES

_BRANCH = {"image_encoder": "sam", "cellfinder": "cellfinder"}
_MLP = re.compile(MLP_NODES)
_LAYERS = ("MatMul", "Convolution")


def ignored_layers(model, scope: str) -> list[str]:
    """Friendly names of the MatMul / Convolution ops of the OpenVINO ``model`` that NNCF must
    leave in FP32 for ``scope`` (none for "all")."""
    if scope not in SCOPES:
        raise QuantizeError(f"INT8 scope must be one of {SCOPES}, got {scope!r}")
    if scope == "all":
        return []
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() in _LAYERS and not _MLP.search(op.get_friendly_name())
    ]


class QuantizeError(ValueError):
    """A quantization that cannot be done as asked; the message says why."""


def quantize_export(
    model_dir: str | os.PathLike,
    calib_images: str | os.PathLike,
    max_images: int = 4,
    graphs: tuple[str, ...] = INT8_GRAPHS,
    log: Callable[[str], None] | None = None,
    scope: str = "mlp",
    smooth_quant: bool = False,
) -> dict[str, Path]:
    """Quantize ``graphs`` of the export in ``model_dir`` with the first ``max_images`` images
    (sorted by name) of the folder ``calib_images``, the layers of ``scope`` ("mlp" or "all"),
    with NNCF's SmoothQuant on the MatMuls where ``smooth_quant``; -> {graph: the INT8 IR written}.

    Raises QuantizeError (no images, no such graph, an export without ``adv_mode`` for
    CellFinder) and ManifestError (not an export directory).
    """
    from .quantize import quiet_logs
    from .tensorrt_build import PlanError, calibration_batches, calibration_files

    say = log or (lambda m: None)
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if scope not in SCOPES:
        raise QuantizeError(f"INT8 scope must be one of {SCOPES}, got {scope!r}")
    try:
        files = calibration_files(calib_images, max_images)
    except PlanError as e:
        raise QuantizeError(str(e)) from None
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    core = ov.Core()
    out = {}
    for graph in graphs:
        if graph not in _BRANCH:
            raise QuantizeError(f"only {', '.join(_BRANCH)} are quantized, not {graph}")
        entry = manifest["models"].get(graph)
        if entry is None:
            if graph == "cellfinder":
                continue  # a plain SAM export has no CellFinder
            raise QuantizeError(f"{model_dir}: no {graph} graph")
        inputs = list(calibration_batches(files, _BRANCH[graph], bool(manifest["adv_mode"]), 1, log=say))
        if not inputs:
            raise QuantizeError(f"{calib_images}: no usable calibration image (all blank or unreadable)")
        say(f"quantize {graph}: NNCF on {len(inputs)} calibration image(s)")
        model = core.read_model(str(model_dir / entry["file"]))
        name = model.inputs[0].get_any_name()
        ignored = ignored_layers(model, scope)
        with quiet_logs():  # NNCF logs a line per layer it leaves in FP32
            quantized = nncf.quantize(
                model,
                nncf.Dataset(inputs, lambda x, name=name: {name: x}),
                model_type=nncf.ModelType.TRANSFORMER,
                target_device=nncf.TargetDevice.CPU,
                subset_size=len(inputs),
                ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
                # SmoothQuant: NNCF's transformer default for MatMuls, or off (alpha -1)
                advanced_parameters=None
                if smooth_quant
                else AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)),
            )
        stamp = {
            "onnx_sha256": entry.get("sha256"),
            "method": "nncf.quantize (ModelType.TRANSFORMER, TargetDevice.CPU)",
            "scope": scope,
            "fp32_layers": len(ignored),
            "smooth_quant": smooth_quant,
            "nncf": nncf.__version__,
            "calibration_images": [f.name for f in files],
            "calibration_used": len(inputs),
        }
        out[graph] = write_ir(quantized, model_dir / IR_DIR, f"{graph}.int8", stamp)
        say(f"quantize {graph}: wrote {out[graph]}")
    return out


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="INT8 image encoder and CellFinder for the openvino backend (NNCF, calibration images)"
    )
    p.add_argument("--model", required=True, type=Path, help="export directory (cellsam-trt export)")
    p.add_argument("--calib-images", required=True, type=Path, help="folder of representative images")
    p.add_argument(
        "--max-images",
        type=int,
        default=4,
        help="use at most this many images, sorted by name (4; NNCF's peak memory grows with the count)",
    )
    p.add_argument(
        "--scope",
        choices=SCOPES,
        default="mlp",
        help="INT8 layers: the ViT MLP MatMuls (closer to FP32) or NNCF's choice for transformers (every MatMul)",
    )
    p.add_argument(
        "--smooth-quant",
        action="store_true",
        help="apply NNCF's SmoothQuant to the MatMuls (its transformer default; off unless given)",
    )
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args) -> int:
    if not all(importlib.util.find_spec(m) for m in ("openvino", "nncf")):
        raise SystemExit("cellsam-trt quantize: needs openvino and nncf: pip install 'cellsam-trt[openvino]'")
    if args.max_images < 1:
        raise SystemExit("cellsam-trt quantize: --max-images must be >= 1")
    try:
        out = quantize_export(
            args.model,
            args.calib_images,
            args.max_images,
            log=lambda m: print(m, file=sys.stderr),
            scope=args.scope,
            smooth_quant=args.smooth_quant,
        )
    except (QuantizeError, ManifestError) as e:
        raise SystemExit(f"cellsam-trt quantize: {e}") from None
    for graph, path in out.items():
        print(f"{graph}: {path}")
    return 0
