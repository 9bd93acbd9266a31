"""CPU INT8 versions of the two ViT-B graphs (image encoder, CellFinder) with ONNX Runtime.

Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): the weights of every
MatMul are stored as signed INT8 (per output channel), activations are quantized per call
(DynamicQuantizeLinear -> MatMulInteger). This is an ONNX Runtime CPU format, not a TensorRT
one (TensorRT wants explicit Q/DQ): ``trt_compat`` is not applied to these files.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx

from .onnx_export import IR_VERSION


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, per_channel: bool = True) -> Path:
    """Write the dynamic-INT8 (MatMul) version of the FP32 graph ``src`` to ``dst``.

    Shapes and I/O names are those of ``src``; ``metadata_props`` are kept and tagged
    ``cellsam_trt.precision = int8``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        raw = Path(tmp) / "q.onnx"
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its "consider pre-processing" advice, printed every time
        try:
            quantize_dynamic(src, raw, op_types_to_quantize=["MatMul"], per_channel=per_channel,
                             weight_type=QuantType.QInt8)
        finally:
            logging.disable(previous)
        model = onnx.load(str(raw))
    model.ir_version = min(model.ir_version, IR_VERSION)
    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    meta["cellsam_trt.precision"] = "int8"
    del model.metadata_props[:]
    for k, v in sorted(meta.items()):
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))
    return dst
