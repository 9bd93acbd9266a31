"""Static TensorRT 10 / 11 compatibility check of an ONNX graph (no TensorRT needed).

The facts come from the ONNX-TensorRT operator support matrix of TensorRT 10
(onnx/onnx-tensorrt ``docs/operators.md``, 10.x releases): opsets 9 to 20 are parsed; every
operator below is supported with the listed data types; INT64 tensors (shape tensors
included) are supported natively since TensorRT 10, so no INT64 -> INT32 rewrite is needed.
Only operators whose support is documented are listed; anything else is reported.

Checked per node: the operator is supported; every input tensor whose dtype is known (graph
inputs/outputs, initializers, shape-inferred value_info) has a dtype listed for
that operator (per input for QuantizeLinear / DequantizeLinear: float data and scales,
INT8 / FP8 / INT4 quantized data and zero points, so an INT32-quantized bias is reported);
the documented "must be an initializer / constant" restrictions on ``axes`` style inputs; and
the opset of the default domain (9 to 20, the range of TensorRT 10.0; later releases read
more).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

MIN_OPSET, MAX_OPSET = 9, 20

F = ("FLOAT", "FLOAT16", "BFLOAT16")
I = ("INT32", "INT64")
B = ("BOOL",)

# operator -> supported tensor dtypes (TensorRT 10 ONNX parser)
_SUPPORTED: dict[str, tuple[str, ...]] = {
    **{
        op: F
        for op in (
            "Acos",
            "Acosh",
            "Asin",
            "Asinh",
            "Atan",
            "Atanh",
            "AveragePool",
            "BatchNormalization",
            "Ceil",
            "Celu",
            "Clip",
            "Conv",
            "ConvTranspose",
            "Cos",
            "Cosh",
            "CumSum",
            "Dropout",
            "Einsum",
            "Elu",
            "Erf",
            "Exp",
            "Floor",
            "Gemm",
            "GlobalAveragePool",
            "GlobalLpPool",
            "GlobalMaxPool",
            "GroupNormalization",
            "GRU",
            "HardSigmoid",
            "HardSwish",
            "Hardmax",
            "ImageScaler",
            "InstanceNormalization",
            "IsInf",
            "LayerNormalization",
            "LeakyRelu",
            "Log",
            "LogSoftmax",
            "LRN",
            "LSTM",
            "LpNormalization",
            "LpPool",
            "MatMul",
            "MaxPool",
            "MeanVarianceNormalization",
            "ParametricSoftplus",
            "Pow",
            "PRelu",
            "RandomNormal",
            "RandomNormalLike",
            "RandomUniform",
            "RandomUniformLike",
            "Reciprocal",
            "Resize",
            "RNN",
            "Round",
            "ScaledTanh",
            "Scan",
            "Selu",
            "Sigmoid",
            "Sin",
            "Sinh",
            "Softmax",
            "Softplus",
            "Softsign",
            "Sqrt",
            "Tan",
            "Tanh",
            "ThresholdedRelu",
            "Upsample",
            "GridSample",
            "RoiAlign",
            "NonMaxSuppression",
            "NonZero",
            "Mish",
            "DeformConv",
        )
    },
    **{
        op: F + I
        for op in (
            "Abs",
            "Add",
            "ArgMax",
            "ArgMin",
            "DepthToSpace",
            "Div",
            "Equal",
            "Greater",
            "GreaterOrEqual",
            "IsNaN",
            "Less",
            "LessOrEqual",
            "Max",
            "Mean",
            "Min",
            "Mod",
            "Mul",
            "Neg",
            "Pad",
            "Range",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
            "Relu",
            "Scatter",
            "ScatterElements",
            "ScatterND",
            "Shrink",
            "Sign",
            "SpaceToDepth",
            "Sub",
            "Sum",
            "TopK",
        )
    },
    **{
        op: F + I + B
        for op in (
            "Concat",
            "Constant",
            "ConstantOfShape",
            "Expand",
            "EyeLike",
            "Flatten",
            "Gather",
            "GatherElements",
            "GatherND",
            "Identity",
            "If",
            "Loop",
            "OneHot",
            "Reshape",
            "ReverseSequence",
            "Shape",
            "Size",
            "Slice",
            "Split",
            "Squeeze",
            "Tile",
            "Transpose",
            "Trilu",
            "Unsqueeze",
            "Where",
        )
    },
    "Cast": F + I + ("UINT8",) + B,
    "CastLike": F + I + ("UINT8",) + B,
    "Gelu": F + I + ("INT8",),
    "And": B,
    "Or": B,
    "Xor": B,
    "Not": B,
}
Q = ("INT8", "FLOAT8E4M3FN", "INT4")  # TensorRT's quantized types (explicit quantization)
# operators whose inputs differ in dtype: op -> supported dtypes per input position
_SUPPORTED_PER_INPUT: dict[str, tuple[tuple[str, ...], ...]] = {
    "QuantizeLinear": (F, F, Q),  # x, scale, zero point (a quantized type; all zeros)
    "DequantizeLinear": (Q, F, Q),  # quantized x, scale, zero point
}

# inputs that the parser needs as build-time constants: op -> input positions
_CONST_INPUTS: dict[str, tuple[int, ...]] = {
    **{
        op: (1,)
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
            "Squeeze",
            "Unsqueeze",
            "CumSum",
        )
    },
    "Slice": (3,),  # axes
    "Pad": (3,),  # axes
}


class TrtCompatError(ValueError):
    """The graph uses something TensorRT 10's ONNX parser does not support; ``problems`` lists it."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        super().__init__(f"{name}: not TensorRT 10 compatible: {shown}")


@dataclass
class CompatReport:
    ops: dict[str, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def check_trt_compat(model: onnx.ModelProto) -> CompatReport:
    """Report the operator histogram and every TensorRT 10 incompatibility of ``model``.

    The model should carry shape-inferred ``value_info`` (``onnx.shape_inference``) so that
    intermediate dtypes are known; tensors of unknown dtype are not judged.
    """
    problems: list[str] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not MIN_OPSET <= imp.version <= MAX_OPSET:
            problems.append(f"opset {imp.version} outside TensorRT 10's range [{MIN_OPSET}, {MAX_OPSET}]")
        elif imp.domain not in ("", "ai.onnx"):
            problems.append(f"operator domain {imp.domain!r} (only the default ONNX domain is parsed)")
    g = model.graph
    dtypes: dict[str, str] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            dtypes[vi.name] = _dtype_name(vi.type.tensor_type.elem_type)
    constants = {t.name for t in g.initializer}
    for t in g.initializer:
        dtypes[t.name] = _dtype_name(t.data_type)
    for node in g.node:
        if node.op_type == "Constant":
            constants.update(node.output)
    ops: dict[str, int] = {}
    for node in g.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name or node.op_type}: custom operator {node.domain}::{node.op_type}")
            continue
        per_input = _SUPPORTED_PER_INPUT.get(node.op_type)
        allowed = _SUPPORTED.get(node.op_type)
        if allowed is None and per_input is None:
            problems.append(f"node {node.name or node.op_type}: operator {node.op_type} is not supported")
            continue
        for pos, tensor in enumerate(node.input):  # outputs are checked as the next node's inputs / graph outputs
            if per_input is not None:
                allowed = per_input[min(pos, len(per_input) - 1)]
            if tensor and tensor in dtypes and dtypes[tensor] not in allowed:
                problems.append(
                    f"node {node.name or node.op_type}: {node.op_type} on {dtypes[tensor]} tensor "
                    f"{tensor!r} (supported: {', '.join(allowed)})"
                )
        for pos in _CONST_INPUTS.get(node.op_type, ()):
            if len(node.input) > pos and node.input[pos] and node.input[pos] not in constants:
                problems.append(
                    f"node {node.name or node.op_type}: input {pos} of {node.op_type} "
                    f"({node.input[pos]!r}) must be an initializer or constant"
                )
    for vi in list(g.input) + list(g.output):
        if dtypes.get(vi.name) not in F + I + B + ("UINT8",):
            problems.append(f"graph tensor {vi.name!r} has dtype {dtypes[vi.name]}")
    return CompatReport(dict(sorted(ops.items())), problems)


def assert_trt_compatible(model: onnx.ModelProto, name: str = "model") -> CompatReport:
    """``check_trt_compat`` that raises TrtCompatError when anything is incompatible."""
    report = check_trt_compat(model)
    if not report.ok:
        raise TrtCompatError(name, report.problems)
    return report
