"""CPU INT8 versions of the two ViT-B graphs (image encoder, CellFinder) with ONNX Runtime.

Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): the weights of the
selected MatMuls are stored as signed INT8 per output channel and their activations are
quantized per call (DynamicQuantizeLinear -> MatMulInteger); everything else, the attention
score / value products included, stays float32. Scopes:

* ``"mlp"`` (default): the two MLP MatMuls of every ViT block (``mlp/lin1``, ``mlp/lin2``),
  about 60 % of the trunk's FLOPs;
* ``"all"``: every MatMul with a constant weight (attention qkv / proj too; in CellFinder
  also the DETR layers): faster, and further from FP32.

The measured speed and mask agreement of both are in the README. This is an ONNX Runtime CPU
format, not a TensorRT one (TensorRT wants explicit Q/DQ): ``trt_compat`` rejects these files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path

import onnx

from .formats import INT8_SCOPES as SCOPES
from .formats import IR_VERSION, MLP_NODES

_MLP = re.compile(MLP_NODES)


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING):
    """Python logging at ``level`` and below off for the block (the ONNX quantization and
    conversion libraries log advice or every node they touch), the previous setting restored."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer (a weight)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, scope: str = "mlp") -> Path:
    """Write the dynamic-INT8 version of the FP32 graph ``src`` to ``dst``; returns ``dst``.

    Shapes and I/O names are those of ``src``; ``metadata_props`` are kept and tagged with
    ``cellsam_trt.precision = int8`` and the scope.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scope not in SCOPES:
        raise ValueError(f"INT8 scope must be one of {SCOPES}, got {scope!r}")
    src, dst = Path(src), Path(dst)
    fp32 = onnx.load(str(src))
    targets = weight_matmuls(fp32)
    if scope == "mlp":
        targets = [n for n in targets if _MLP.search(n)]
    if not targets:
        raise ValueError(f"{src}: no MatMul to quantize for scope {scope!r}")
    meta = {p.key: p.value for p in fp32.metadata_props}
    del fp32
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        raw = Path(tmp) / "q.onnx"
        with quiet_logs():  # its "consider pre-processing" advice, printed every time
            quantize_dynamic(
                src,
                raw,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=targets,
                per_channel=True,
                weight_type=QuantType.QInt8,
            )
        model = onnx.load(str(raw))
    model.ir_version = min(model.ir_version, IR_VERSION)
    meta.update(
        {
            "cellsam_trt.precision": "int8",
            "cellsam_trt.int8_scope": scope,
            "cellsam_trt.int8_matmuls": str(len(targets)),
        }
    )
    del model.metadata_props[:]
    for k, v in sorted(meta.items()):
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))
    return dst
