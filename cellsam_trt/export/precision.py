"""Precision-annotated ONNX graphs: the precision is decided in the graph, the builder obeys it.

TensorRT's strongly typed networks (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; in
TensorRT 11 the only mode) take every tensor's type from the ONNX graph, so reduced precision
is written into the graph here, with well-kept libraries, and ``tensorrt_build`` only parses:

* ``fp16``: ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16`` with
  an op block list and a node block list (the FP32 islands below); the graph inputs / outputs
  stay float32 (``keep_io_types``), values are clamped to the FP16 range (min positive
  5.96e-8, max 65504). (onnxconverter-common's converter of the same name leaves the graph's
  own Cast-to-float nodes typed float while retyping their outputs, which ONNX Runtime
  refuses to load for CellFinder and the prompt decoder.)
* ``bf16``: NVIDIA Model Optimizer's AutoCast (``modelopt.onnx.autocast
  .convert_to_mixed_precision``, ``low_precision_type="bf16"``) with the same islands as
  exclusions, the source opset kept (onnxconverter-common and onnxruntime's float16 tools
  convert to FP16 only). AutoCast is optional (``pip install "cellsam-trt[modelopt]"``: the
  base package without its ``[onnx]`` extra, whose onnx / onnxruntime pins collide with ours).
* ``int8``: explicit Q/DQ by ``onnxruntime.quantization.quantize_static`` (QDQ format,
  symmetric signed INT8 activations and per-channel weights, the form TensorRT's explicit
  quantization reads) of the inputs of weight layers of the two ViT-B trunks (the image
  encoder; CellFinder's backbone): scope "mlp" (default) the two MLP MatMuls of every block,
  "all" every weight MatMul / Conv of the trunk (attention qkv / proj and the patch
  embedding too); their outputs and everything else stay FP32.
  Calibrated on a folder of images prepared exactly as at run time (``pipeline.prepare`` +
  the branch's model input).
  The prompt decoder has no INT8 form: an INT8 build runs its FP16 graph.
* ``fp8``: refused (``PrecisionError``): FP8 Q/DQ (``QuantizeLinear`` to FLOAT8E4M3FN) needs
  opset 19 and the export is opset 17, and TensorRT runs FP8 only from compute capability 8.9;
  no FP8 graph is written.

FP32 islands (``fp32_nodes``): every normalization, softmax, the sinusoidal positional
encodings with their argument chains (the prompt encoder's Fourier features reach |arguments|
of tens of radians, where FP16 loses ~1e-2), the SAM neck's written-out LayerNorm2d, and
CellFinder's class / box heads with the inverse-sigmoid / sigmoid that produce the top-k
inputs; ``fp32_attention`` adds the attention-score products.

Each annotated graph is checked on the CPU with ONNX Runtime against its FP32 graph where
ONNX Runtime has the kernels (``compare_graphs``); ``benchmarks/bench_precision.py`` measures
the mask agreement.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .. import pipeline
from .. import preprocess as pre
from ..runtime import specs as S
from .formats import IR_VERSION, MLP_NODES
from .quantize import quiet_logs

PRECISIONS = ("fp16", "bf16", "int8", "fp8")
FILE_TAG = {"fp16": "fp16", "bf16": "bf16", "int8": "int8qdq"}  # <graph>.<tag>.onnx
# graphs each precision annotates; an int8 build runs the decoder's fp16 graph
GRAPHS = {
    "fp16": S.MODEL_NAMES,
    "bf16": S.MODEL_NAMES,
    "int8": (S.ENCODER, S.CELLFINDER),
}

FP32_OP_TYPES = (
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "Softmax",
    "Sin",
    "Cos",
)
FP32_PATTERNS = {
    S.ENCODER: (r"/neck/neck\.[13]/",),  # LayerNorm2d written out (mean, pow, sqrt, div)
    S.DECODER: (),
    S.CELLFINDER: (r"/class_embed/", r"/bbox_embed/", r"/transformer/(Sigmoid|Log|Clip)(_\d+)?$"),
}
ATTENTION_PATTERNS = (
    r"/attn/(MatMul|Mul|Add|Einsum)(_\d+)?$",  # ViT scores + decomposed rel-pos bias
    r"/(self_attn|cross_attn)/(MatMul|Mul|Div)(_\d+)?$",  # CellFinder RCDA / MHA
    r"/(self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)"
    r"(_\d+)?/(MatMul|Div|Mul)(_\d+)?$",  # mask decoder
)
# INT8: the ViT-B trunks' weight layers; the scope narrows them to the MLPs or keeps them all
INT8_SCOPE = {S.ENCODER: r"^/encoder/(patch_embed|blocks\.)", S.CELLFINDER: r"/backbone/"}
INT8_SCOPES = {"mlp": MLP_NODES, "all": ""}
INT8_OPS = ("MatMul", "Conv", "Gemm")
CALIB_METHODS = ("minmax", "percentile", "entropy")


class PrecisionError(ValueError):
    """A precision that cannot be written (missing library, no calibration images, FP8)."""


# --------------------------------------------------------------------------- FP32 islands


def onnx_fp32_nodes(model: onnx.ModelProto, name: str) -> set[str]:
    """ONNX node names of ``model`` that the graph analysis keeps in FP32 for graph ``name``:

    * the argument chains of every Sin / Cos (positional encodings): walking back from the
      Sin / Cos through elementwise / reshaping ops and MatMuls with a constant operand
      (at most 10 steps), e.g. the prompt encoder's coords -> (x + 0.5) / 1024 -> 2x - 1 ->
      @ gaussian -> * 2 pi -> sin;
    * for CellFinder, the heads: everything the outputs depend on after the last decoder layer
      (class / box heads, inverse sigmoid, reference points, sigmoid).
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    elementwise = {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Unsqueeze",
        "Reshape",
        "Slice",
        "Gather",
        "Concat",
        "Cast",
        "Transpose",
        "Expand",
        "Flatten",
        "Squeeze",
        "Pow",
        "Neg",
        "Tile",
        "MatMul",
    }
    keep: set[str] = set()

    def is_const(t: str) -> bool:
        seen = 0
        while t in producer and seen < 8:  # a constant folded through Cast/Reshape still counts
            n = producer[t]
            if n.op_type == "Constant":
                return True
            if n.op_type not in ("Cast", "Reshape", "Unsqueeze", "Transpose", "Identity"):
                return False
            t, seen = n.input[0], seen + 1
        return t in constants

    for node in g.node:
        if node.op_type not in ("Sin", "Cos"):
            continue
        keep.add(node.name)
        frontier = [(t, 0) for t in node.input]
        while frontier:
            t, depth = frontier.pop()
            n = producer.get(t)
            if n is None or n.op_type == "Constant" or depth >= 10 or n.op_type not in elementwise:
                continue
            if n.op_type == "MatMul" and not any(is_const(i) for i in n.input):
                continue
            keep.add(n.name)
            frontier += [(i, depth + 1) for i in n.input if i]
    if name == S.CELLFINDER:
        stop = re.compile(r"(_layers\.\d+/|/backbone/|/input_proj)")
        frontier = [o.name for o in g.output]
        seen: set[str] = set()
        while frontier:
            t = frontier.pop()
            n = producer.get(t)
            if n is None or n.name in seen or n.op_type == "Constant" or stop.search(n.name):
                continue
            seen.add(n.name)
            keep.add(n.name)
            frontier += [i for i in n.input if i]
    return keep


def fp32_nodes(
    model: onnx.ModelProto, name: str, keep_fp32: Sequence[str] = (), fp32_attention: bool = False
) -> list[str]:
    """Sorted names of the nodes of graph ``name`` kept in FP32: ``FP32_OP_TYPES``, the
    ``FP32_PATTERNS`` of the graph (and ``ATTENTION_PATTERNS`` with ``fp32_attention``), the
    extra regexes ``keep_fp32`` (``re.search`` on node names) and ``onnx_fp32_nodes``.
    Raises PrecisionError for an invalid regex."""
    patterns = list(FP32_PATTERNS.get(name, ())) + list(keep_fp32)
    if fp32_attention:
        patterns += ATTENTION_PATTERNS
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise PrecisionError(f"invalid FP32 node pattern: {e}") from e
    keep = onnx_fp32_nodes(model, name)
    for n in model.graph.node:
        if n.op_type in FP32_OP_TYPES or any(p.search(n.name) for p in compiled):
            keep.add(n.name)
    return sorted(k for k in keep if k)


# --------------------------------------------------------------------------- FP16 / BF16


def _finish(model: onnx.ModelProto, meta: dict[str, str]) -> onnx.ModelProto:
    model.ir_version = min(model.ir_version, IR_VERSION)
    kept = {p.key: p.value for p in model.metadata_props}
    kept.update(meta)
    del model.metadata_props[:]
    for k, v in sorted(kept.items()):
        model.metadata_props.add(key=k, value=v)
    return model


def to_fp16(model: onnx.ModelProto, islands: Sequence[str]) -> onnx.ModelProto:
    """FP16 graph of ``model`` with the nodes ``islands`` (and ``FP32_OP_TYPES``) in FP32 and
    float32 graph inputs / outputs (``onnxruntime.transformers.float16``)."""
    import onnxruntime
    from onnxruntime.transformers import float16

    blocked_ops = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OP_TYPES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per value clamped to the FP16 range
        out = float16.convert_float_to_float16(
            model,
            min_positive_val=5.96e-08,
            max_finite_val=65504.0,
            keep_io_types=True,
            op_block_list=blocked_ops,
            node_block_list=list(islands),
        )
    return _finish(
        out,
        {
            "cellsam_trt.precision": "fp16",
            "cellsam_trt.fp32_nodes": str(len(islands)),
            "cellsam_trt.annotated_by": f"onnxruntime {onnxruntime.__version__} transformers.float16",
        },
    )


def to_bf16(src: str | os.PathLike, islands: Sequence[str]) -> onnx.ModelProto:
    """BF16 graph of the ONNX file ``src`` with the nodes ``islands`` (and ``FP32_OP_TYPES``)
    in FP32 and float32 graph inputs / outputs (Model Optimizer AutoCast; the opset of
    ``src`` is kept)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise PrecisionError(
            "bf16 graphs are written by NVIDIA Model Optimizer's AutoCast, which is not installed "
            "(pip install 'cellsam-trt[modelopt]'); ONNX Runtime's float16 converter writes FP16 only"
        ) from e
    from importlib.metadata import version

    src = Path(src)
    opset = next(
        o.version for o in onnx.load(str(src), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    )
    with quiet_logs():  # AutoCast logs every node it classifies
        out = convert_to_mixed_precision(
            onnx_path=str(src),
            low_precision_type="bf16",
            nodes_to_exclude=[f"^{re.escape(n)}$" for n in islands],
            op_types_to_exclude=list(FP32_OP_TYPES),
            data_max=float("inf"),  # BF16 has the FP32 range: no magnitude-based exclusions
            init_max=float("inf"),
            keep_io_types=True,
            opset=opset,
        )
    return _finish(
        out,
        {
            "cellsam_trt.precision": "bf16",
            "cellsam_trt.fp32_nodes": str(len(islands)),
            "cellsam_trt.annotated_by": f"nvidia-modelopt {version('nvidia-modelopt')} AutoCast",
        },
    )


# --------------------------------------------------------------------------- INT8 Q/DQ


def calibration_files(image_dir: str | os.PathLike, max_images: int) -> list[Path]:
    """The first ``max_images`` image files of a folder, sorted by name (deterministic).
    PrecisionError for a missing or image-less folder."""
    from ..io import IMAGE_SUFFIXES

    d = Path(image_dir)
    if not d.is_dir():
        raise PrecisionError(f"calibration image folder {d} does not exist")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrecisionError(f"no images in {d} (suffixes {sorted(IMAGE_SUFFIXES)})")
    return files[:max_images]


def model_input(
    image: np.ndarray, branch: str, adv_mode: bool, normalize: bool = True, channel_axis: int | None = None
) -> np.ndarray:
    """One image -> the (1, 3, 1024, 1024) float32 input of the SAM encoder ("sam") or CellFinder
    ("cellfinder"), prepared by the pipeline's own ``prepare`` stage, as at run time.
    Raises ``preprocess.BlankImageError`` for a blank image on the SAM branch."""
    settings = pipeline.SegmentSettings(normalize=normalize, channels=pipeline.Channels(axis=channel_axis))
    sq = pipeline.prepare(image, settings).squashed
    if branch == "sam":
        return pre.sam_encoder_input(sq, adv_mode)
    if branch == "cellfinder":
        return pre.cellfinder_input(sq, adv_mode)
    raise ValueError(f"branch must be 'sam' or 'cellfinder', got {branch!r}")


def calibration_batches(
    images: Iterable[np.ndarray | str | os.PathLike],
    branch: str,
    adv_mode: bool,
    batch_size: int = 1,
    log: Callable[[str], None] | None = None,
    reader: Callable[[str | os.PathLike], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Preprocessed calibration batches (batch_size, 3, 1024, 1024) float32, C-contiguous.

    images: arrays or file paths (read with ``reader``, default ``cellsam_trt.io.read_image``).
    Blank or unreadable images are skipped (logged); a final partial batch is dropped.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    say = log or (lambda m: None)
    if reader is None:
        from ..io import read_image as reader
    buf: list[np.ndarray] = []
    for item in images:
        try:
            img = item if isinstance(item, np.ndarray) else reader(item)
            x = model_input(img, branch, adv_mode)
        except (pre.BlankImageError, ValueError, OSError) as e:
            say(f"calibration: skipping {item if not isinstance(item, np.ndarray) else 'an image'}: {e}")
            continue
        buf.append(x[0])
        if len(buf) == batch_size:
            yield np.ascontiguousarray(np.stack(buf), dtype=np.float32)
            buf = []
    if buf:
        say(f"calibration: dropping the last {len(buf)} image(s) (not a full batch of {batch_size})")


def calibration_reader(batches: Iterable[np.ndarray], input_name: str = "image"):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``batches`` (each fed as
    ``{input_name: batch}``); counts what it served in ``.served``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)
            self.served = 0

        def get_next(self):
            batch = next(self._it, None)
            if batch is None:
                return None
            self.served += 1
            return {input_name: batch}

    return _Reader()


def int8_targets(model: onnx.ModelProto, name: str, scope: str = "mlp") -> list[str]:
    """Nodes ``quantize_static`` quantizes in graph ``name``: the MatMul / Conv / Gemm nodes
    with an initializer weight inside the trunk ``INT8_SCOPE[name]``; with ``scope="mlp"``
    only the two MLP MatMuls of each ViT block, with ``"all"`` every such node of the trunk
    (patch embedding, attention qkv / proj too)."""
    if name not in INT8_SCOPE:
        raise PrecisionError(f"{name} has no INT8 form (INT8 covers {sorted(INT8_SCOPE)})")
    if scope not in INT8_SCOPES:
        raise PrecisionError(f"INT8 scope must be one of {tuple(INT8_SCOPES)}, got {scope!r}")
    trunk, narrow = re.compile(INT8_SCOPE[name]), re.compile(INT8_SCOPES[scope])
    inits = {t.name for t in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in INT8_OPS
        and len(n.input) > 1
        and n.input[1] in inits
        and trunk.search(n.name)
        and narrow.search(n.name)
    ]


def calibrate_inputs(src: Path, tensors: set[str], reader, method: str, cache: Path, work: Path) -> None:
    """Activation ranges of ``tensors`` (the INT8 targets' inputs) by ONNX Runtime's calibrator
    for ``method``, written to ``cache`` (ONNX Runtime's calibration cache, which
    ``quantize_static`` reads instead of calibrating).

    ONNX Runtime's own calibration in ``quantize_static`` reduces every input and output of
    every MatMul / Conv, the (12, 4096, 4096) attention scores of the global blocks included,
    with reduce nodes appended after the whole graph, so every one of those tensors stays
    alive to the end of a run (the README's INT8 notes give the memory this takes). Here the
    calibrator reduces only the tensors that get a Q/DQ pair; its settings are
    ``create_calibrator``'s defaults.
    """
    from onnxruntime.quantization import calibrate as C

    base, kwargs = {
        "minmax": (C.MinMaxCalibrater, {}),
        "entropy": (C.EntropyCalibrater, {"num_bins": 128, "num_quantized_bins": 128}),
        "percentile": (C.PercentileCalibrater, {"num_bins": 2048, "percentile": 99.999, "symmetric": True}),
    }[method]

    class TargetInputs(base):
        def select_tensors_to_calibrate(self, model):
            found, value_infos = super().select_tensors_to_calibrate(model)
            return {t for t in found if t in tensors}, value_infos

    calibrator = TargetInputs(str(src), list(INT8_OPS), str(work / "augmented.onnx"), **kwargs)
    calibrator.augment_graph()
    calibrator.create_inference_session()
    calibrator.collect_data(reader)
    C.save_tensors_data(calibrator.compute_data(), cache)
    del calibrator


def to_int8_qdq(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    name: str,
    batches: Iterable[np.ndarray],
    method: str = "minmax",
    cache: str | os.PathLike | None = None,
    scope: str = "mlp",
) -> tuple[Path, int, int]:
    """Write the explicit-quantization (Q/DQ) INT8 graph of ``src`` (graph ``name``) to ``dst``.

    batches: calibration inputs, (B, 3, 1024, 1024) float32 (``calibration_batches``).
    method: "minmax", "percentile" or "entropy" (ONNX Runtime's calibrators).
    cache: ONNX Runtime's calibration cache file (reused when it exists; then no batch is read).
    scope: "mlp" or "all" (``int8_targets``).
    Returns (dst, quantized node count, batches read). PrecisionError when nothing is in scope
    or no batch was read.
    """
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise PrecisionError(f"calibration method must be one of {CALIB_METHODS}, got {method!r}")
    src, dst = Path(src), Path(dst)
    fp32 = onnx.load(str(src))
    targets = int8_targets(fp32, name, scope)
    if not targets:
        raise PrecisionError(f"{src}: no MatMul / Conv with a weight in the {scope!r} INT8 scope of {name}")
    meta = {p.key: p.value for p in fp32.metadata_props}
    input_name = fp32.graph.input[0].name
    weights = {t.name for t in fp32.graph.initializer}
    target_set = set(targets)
    wanted = {i for n in fp32.graph.node if n.name in target_set for i in n.input if i and i not in weights}
    del fp32
    reader = calibration_reader(batches, input_name)
    cached = cache is not None and Path(cache).is_file()
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        raw = Path(tmp) / "q.onnx"
        if not cached:  # ranges of the targets' inputs only, into the cache quantize_static reads
            cache = Path(cache) if cache is not None else Path(tmp) / "ranges.calib"
            try:
                calibrate_inputs(src, wanted, reader, method, cache, Path(tmp))
            except ValueError as e:  # ONNX Runtime's "No data is collected."
                if reader.served == 0:
                    raise PrecisionError(f"{name}: no calibration image could be read") from e
                raise
        with quiet_logs():  # its "consider pre-processing" advice, printed every time
            quantize_static(
                src,
                raw,
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OPS),
                nodes_to_quantize=targets,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[method],
                # TensorRT's Q/DQ: symmetric INT8, no INT32-quantized Conv / Gemm bias; only the
                # inputs of the targets are quantized (their outputs, read by the bias Adds, are not)
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "QuantizeBias": False,
                    "OpTypesToExcludeOutputQuantization": list(INT8_OPS),
                },
                calibration_cache_path=str(cache),
            )
        model = onnx.load(str(raw))
    meta.update(
        {
            "cellsam_trt.precision": "int8",
            "cellsam_trt.int8_nodes": str(len(targets)),
            "cellsam_trt.int8_scope": scope,
            "cellsam_trt.int8_calibration": f"{method}, {reader.served} batch(es)" + (", cache" if cached else ""),
            "cellsam_trt.annotated_by": f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ)",
        }
    )
    onnx.save(_finish(model, meta), str(dst))
    return dst, len(targets), reader.served


# --------------------------------------------------------------------------- checks


@dataclass
class GraphComparison:
    """ONNX Runtime (CPU) outputs of an annotated graph against its FP32 graph on one input.

    runs: False when ONNX Runtime's CPU provider cannot run the annotated graph (``error``).
    max_abs_diff / max_abs_ref: per output, the largest |annotated - fp32| and |fp32|.
    """

    graph: str
    precision: str
    runs: bool
    max_abs_diff: dict[str, float]
    max_abs_ref: dict[str, float]
    error: str | None = None


def compare_graphs(
    fp32_path: str | os.PathLike,
    annotated_path: str | os.PathLike,
    feeds: dict[str, np.ndarray],
    graph: str,
    precision: str,
    threads: int = 0,
) -> GraphComparison:
    """Run both graphs on ``feeds`` with ONNX Runtime's CPU provider and compare the outputs."""
    import onnxruntime as ort

    def session(path):
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False
        so.log_severity_level = 3  # FP16 graphs: a warning per constant it cannot fold
        if threads:
            so.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    ref_sess = session(fp32_path)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = ref_sess.run(names, feeds)
    del ref_sess
    try:
        got = session(annotated_path).run(names, feeds)
    except Exception as e:  # onnxruntime raises its own error types for missing kernels
        return GraphComparison(graph, precision, False, {}, {}, f"{type(e).__name__}: {str(e).splitlines()[0]}")
    diff = {n: float(np.abs(g.astype(np.float64) - r).max()) for n, g, r in zip(names, got, ref)}
    mag = {n: float(np.abs(r).max()) for n, r in zip(names, ref)}
    return GraphComparison(graph, precision, True, diff, mag)


# --------------------------------------------------------------------------- export directories


def trt_problems(path: str | os.PathLike) -> list[str]:
    """What ``trt_compat.check_trt_compat`` finds in the (shape-inferred) graph file ``path``."""
    from onnx import shape_inference

    from .trt_compat import check_trt_compat

    return check_trt_compat(shape_inference.infer_shapes(onnx.load(str(path)))).problems


def calib_cache(export_dir: Path, entry: dict, method: str, scope: str = "mlp") -> Path:
    """The INT8 calibration cache of a manifest entry's FP32 graph (see ``annotate_export``)."""
    stem = entry["file"].removesuffix(".onnx")
    return Path(export_dir) / f"{stem}.{method}.{scope}.{(entry.get('sha256') or 'unknown')[:12]}.calib"


def annotated_file(graph: str, precision: str) -> str:
    """File name of the annotated graph, e.g. ``image_encoder.fp16.onnx``."""
    return f"{graph}.{FILE_TAG[precision]}.onnx"


def annotate_export(
    export_dir: str | os.PathLike,
    precision: str,
    calib_images: str | os.PathLike | None = None,
    calib_max_images: int = 64,
    calib_method: str = "minmax",
    int8_scope: str = "mlp",
    keep_fp32: Sequence[str] = (),
    fp32_attention: bool = False,
    log: Callable[[str], None] | None = None,
    models: Sequence[str] | None = None,
) -> dict:
    """Write the ``precision`` graphs of an export directory beside its FP32 graphs and record
    them in its manifest (``models[graph]["annotated"][precision]``: file, sha256, source
    sha256, FP32 node count, the library, INT8 node / batch counts). Every graph written passes
    the static TensorRT check (``trt_compat``) or PrecisionError names its problems. Returns
    the manifest.

    int8_scope: "mlp" (the ViT MLP MatMuls) or "all" (every weight layer of the trunks).
    The INT8 calibration cache is ``<export>/<graph>.<method>.<scope>.<FP32 sha256[:12]>.calib``
    (ONNX Runtime's JSON ranges; reused when present, so a new FP32 graph is calibrated anew).
    An ``int8`` request also writes the FP16 decoder (what an INT8 build runs for it).
    models: only these graphs (default: every graph the precision covers).
    Raises PrecisionError (FP8, missing library, calibration images) and ManifestError.
    """
    from ..model.checkpoint import sha256_file
    from ..runtime.manifest import MANIFEST, read_manifest
    from .onnx_export import _write_json

    say = log or (lambda m: None)
    if precision == "fp8":
        raise PrecisionError(
            "fp8: this version writes no FP8 graph (FP8 Q/DQ needs opset 19, the export is opset 17, and "
            "TensorRT runs FP8 only on compute capability >= 8.9); use --precision int8, fp16 or bf16"
        )
    if precision not in FILE_TAG:
        raise PrecisionError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out = Path(export_dir)
    manifest = read_manifest(out)
    entries = manifest["models"]
    todo = [(g, precision) for g in GRAPHS[precision] if g in entries and (models is None or g in models)]
    if precision == "int8":
        if calib_images is None and not all(
            calib_cache(out, entries[g], calib_method, int8_scope).is_file() for g, _ in todo
        ):
            raise PrecisionError("int8 needs --calib-images DIR (a folder of representative images)")
        if S.DECODER in entries and (models is None or S.DECODER in models):
            todo.append((S.DECODER, "fp16"))
    files = calibration_files(calib_images, calib_max_images) if calib_images is not None else []
    for g, p in todo:
        src = out / entries[g]["file"]
        model = onnx.load(str(src))
        islands = fp32_nodes(model, g, keep_fp32, fp32_attention) if p != "int8" else []
        dst = out / annotated_file(g, p)
        tmp = dst.with_name(dst.name + ".tmp")
        record = {"file": dst.name, "source_sha256": entries[g].get("sha256") or sha256_file(src)}
        if p == "fp16":
            onnx.save(to_fp16(model, islands), str(tmp))
            record.update(fp32_nodes=len(islands), library="onnxruntime.transformers.float16")
        elif p == "bf16":
            del model
            onnx.save(to_bf16(src, islands), str(tmp))
            record.update(fp32_nodes=len(islands), library="nvidia-modelopt AutoCast")
        else:
            del model
            branch = "sam" if g == S.ENCODER else "cellfinder"
            batches = calibration_batches(files, branch, bool(manifest["adv_mode"]), 1, say)
            cache = calib_cache(out, entries[g], calib_method, int8_scope)
            _, n, served = to_int8_qdq(src, tmp, g, batches, calib_method, cache, int8_scope)
            record.update(int8_nodes=n, int8_scope=int8_scope, calibration={"method": calib_method, "images": served})
            record["library"] = "onnxruntime quantize_static (QDQ)"
        problems = trt_problems(tmp)
        if problems:
            tmp.unlink()
            raise PrecisionError(f"{dst.name}: not TensorRT compatible: " + "; ".join(problems[:5]))
        os.replace(tmp, dst)
        record["sha256"] = sha256_file(dst)
        entries[g].setdefault("annotated", {})[p] = record
        say(f"  {g}: {dst.name} ({p})")
    _write_json(manifest, out / MANIFEST)
    return manifest
