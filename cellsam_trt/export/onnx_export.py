"""Export of the three CellSAM networks to ONNX, each validated against its PyTorch module.

``export_model(model, out_dir, ...)`` writes an export directory:

    image_encoder.onnx      image (B,3,1024,1024) -> image_embeddings (B,256,64,64)
    prompt_decoder.onnx     image_embeddings (1,256,64,64), point_coords (N,P,2), point_labels (N,P)
                            -> low_res_masks (N,1,256,256), iou_predictions (N,1)
    prompt_context.onnx     the same decoder split in two (written with it): image_embeddings ->
    context_decoder.onnx    the image-side tensors, once per image; those + the prompts -> the
                            same outputs (``specs.CONTEXT_GRAPHS``, the CPU form)
    cellfinder.onnx         image (B,3,1024,1024) -> pred_logits (B,Q,2), pred_boxes (B,Q,4)
    *.int8.onnx             optional ORT dynamic-INT8 versions of the two ViT-B graphs
    manifest.json           specs, file hashes, checkpoint sha256, adv_mode, versions, the
                            validation figures (written last: its presence marks a complete export)

Every graph is exported with the TorchScript exporter (``torch.onnx.export(dynamo=False)``),
opset 17, the dynamic axes of its spec (``specs.py``), then: IR version lowered to what ONNX
Runtime loads, ``metadata_props`` (package version, spec JSON, checkpoint sha256, adv mode),
``onnx.checker``, strict shape inference, the static TensorRT 10 check (``trt_compat``), and
a numerical comparison of ONNX Runtime with the PyTorch module at several batch sizes /
prompt counts (``ExportValidationError`` reports the largest difference).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from ..model.checkpoint import sha256_file
from ..runtime import specs as S
from ..runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST
from ..runtime.prompt_layout import prompt_tokens
from .formats import IR_VERSION, OPSET
from .quantize import quantize_int8
from .trt_compat import assert_trt_compatible
from .wrappers import CellFinderGraph, ContextDecoderGraph, EncoderGraph, PromptContextGraph, PromptDecoderGraph

DEFAULT_TOL = 1e-4  # max |ort - torch| / max(1, max |torch|) per output


class ExportError(RuntimeError):
    """An export that failed a structural check (checker, shape inference, TensorRT compatibility)."""


class ExportValidationError(ExportError):
    """ONNX Runtime's output differs from PyTorch's: names the graph, the output, the case and
    the difference (absolute and scaled by max(1, max |reference|))."""

    def __init__(self, model: str, output: str, case: str, max_abs: float, scaled: float, tol: float) -> None:
        self.model, self.output, self.case = model, output, case
        self.max_abs_diff, self.scaled_diff, self.tol = max_abs, scaled, tol
        super().__init__(
            f"{model}: output {output!r} ({case}) differs from PyTorch by {max_abs:.3g} "
            f"(scaled {scaled:.3g} > tolerance {tol:.3g})"
        )


@dataclass
class GraphResult:
    name: str
    path: Path
    ops: dict[str, int]
    max_abs_diff: dict[str, float]
    seconds: float


def _ort_session(path: str | os.PathLike, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def finalize_graph(path: Path, spec: S.ModelSpec, metadata: dict[str, str]) -> dict[str, int]:
    """Lower the IR version, add metadata, check, shape-infer, TRT-check and save ``path`` in place.

    Returns the operator histogram. Raises ExportError / TrtCompatError.
    """
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, IR_VERSION)
    del model.metadata_props[:]
    for k, v in sorted(metadata.items()):
        model.metadata_props.add(key=k, value=str(v))
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if names_in != spec.input_names or names_out != spec.output_names:
        raise ExportError(
            f"{spec.name}: graph I/O {names_in} -> {names_out} does not match the spec "
            f"{spec.input_names} -> {spec.output_names}"
        )
    try:
        onnx.checker.check_model(model, full_check=False)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises several unrelated types
        raise ExportError(f"{spec.name}: ONNX check / shape inference failed: {e}") from e
    assert_trt_compatible(model, spec.name)
    onnx.save(model, str(path))
    return _op_histogram(model)


def _op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return dict(sorted(ops.items()))


def compare_outputs(
    model: str, names: Sequence[str], got: Sequence[np.ndarray], want: Sequence[np.ndarray], case: str, tol: float
) -> dict[str, float]:
    """Max |got - want| per output; raises ExportValidationError where the scaled diff exceeds tol."""
    out = {}
    for name, a, b in zip(names, got, want):
        if a.shape != b.shape:
            raise ExportValidationError(
                model, name, f"{case}: shape {a.shape} vs {b.shape}", float("inf"), float("inf"), tol
            )
        d = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        scaled = d / max(1.0, float(np.abs(b).max()) if b.size else 1.0)
        if not np.isfinite(d) or scaled > tol:
            raise ExportValidationError(model, name, case, d, scaled, tol)
        out[name] = max(out.get(name, 0.0), d)
    return out


def _export(module: torch.nn.Module, spec: S.ModelSpec, args: tuple, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
        )


@dataclass
class Case:
    """One validation case: its name, the graph feeds, and a function giving PyTorch's outputs."""

    name: str
    feeds: dict[str, np.ndarray]
    reference: Callable[[], Sequence[torch.Tensor]]
    expected: list[np.ndarray] | None = None  # filled by export_graph


def export_graph(
    name: str,
    graph: torch.nn.Module,
    spec: S.ModelSpec,
    path: Path,
    cases: Sequence[Case],
    metadata: dict[str, str],
    tol: float = DEFAULT_TOL,
    threads: int = 0,
) -> GraphResult:
    """Export ``graph`` to ``path`` (traced on the first case), finalize it, and check ONNX
    Runtime against each case's PyTorch reference."""
    t0 = time.perf_counter()
    first = cases[0].feeds
    _export(graph.eval(), spec, tuple(torch.from_numpy(first[n]) for n in spec.input_names), path)
    ops = finalize_graph(path, spec, metadata)
    sess = _ort_session(path, threads)
    diffs: dict[str, float] = {}
    for case in cases:
        spec.check_inputs(case.feeds)
        got = sess.run(spec.output_names, case.feeds)
        with torch.no_grad():
            want = case.reference()
        want = case.expected = [w.numpy() for w in (want if isinstance(want, (tuple, list)) else (want,))]
        for k, v in compare_outputs(name, spec.output_names, got, want, case.name, tol).items():
            diffs[k] = max(diffs.get(k, 0.0), v)
    del sess
    return GraphResult(name, path, ops, diffs, time.perf_counter() - t0)


def _image_cases(module: torch.nn.Module, batches: Sequence[int], seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for b in batches:
        x = rng.standard_normal((b, 3, 1024, 1024)).astype(np.float32)
        cases.append(Case(f"batch {b}", {"image": x}, lambda x=x: module(torch.from_numpy(x))))
    return cases


def _decoder_cases(sam, embedding: np.ndarray, counts: Sequence[int], seed: int) -> list[Case]:
    """Box prompts for every count, then points only and points + boxes; the reference is
    ``Sam.decode`` on the prompts as the PyTorch backend passes them."""
    rng = np.random.default_rng(seed)
    emb = torch.from_numpy(embedding)

    def case(label, boxes=None, points=None, labels=None):
        c, l = prompt_tokens(boxes=boxes, points=points, point_labels=labels)
        t = lambda a, dt=torch.float32: None if a is None else torch.as_tensor(np.asarray(a), dtype=dt)
        ref = lambda: sam.decode(emb, boxes=t(boxes), points=t(points), labels=t(labels, torch.int64))
        return Case(label, {"image_embeddings": embedding, "point_coords": c, "point_labels": l}, ref)

    cases = []
    for n in counts:
        xy = rng.uniform(0, 900, (n, 2))
        cases.append(case(f"{n} boxes", boxes=np.concatenate([xy, xy + rng.uniform(8, 120, (n, 2))], 1)))
    n = max(1, min(counts))
    pts = rng.uniform(0, 1023, (n, 3, 2))
    lab = rng.integers(-1, 2, (n, 3))
    cases.append(case(f"{n} x 3 points", points=pts, labels=lab))
    xy = rng.uniform(0, 900, (n, 2))
    cases.append(
        case(
            f"{n} boxes + 1 point",
            boxes=np.concatenate([xy, xy + 50], 1),
            points=pts[:, :1],
            labels=np.ones((n, 1), np.int64),
        )
    )
    return cases


def _context_decoder_cases(decoder: PromptDecoderGraph, spec: S.ModelSpec, cases: Sequence[Case]) -> list[Case]:
    """The decoder's cases with the embedding replaced by its (PyTorch) context; same references."""
    out = []
    for c in cases:
        with torch.no_grad():
            ctx = decoder.context(torch.from_numpy(c.feeds["image_embeddings"]))
        feeds = dict(zip(spec.input_names, [t.numpy() for t in ctx]))
        feeds.update(point_coords=c.feeds["point_coords"], point_labels=c.feeds["point_labels"])
        out.append(Case(c.name, feeds, c.reference))
    return out


def versions() -> dict[str, str | None]:
    out = {
        "cellsam_trt": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    return out


def export_model(
    model,
    out_dir: str | os.PathLike,
    checkpoint_sha256: str | None = None,
    checkpoint_path: str | None = None,
    synthetic_seed: int | None = None,
    parts: Sequence[str] = S.MODEL_NAMES,
    image_batches: Sequence[int] = (1, 2),
    decoder_prompts: Sequence[int] = (1, 37),
    int8: bool = False,
    int8_scope: str = "mlp",
    bounds: S.Bounds | None = None,
    tol: float = DEFAULT_TOL,
    threads: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Export ``model`` (a ``CellSAM``) into ``out_dir``; returns the manifest (also written).

    parts: which graphs (``specs.MODEL_NAMES``); CellFinder is skipped for a plain SAM model.
    image_batches / decoder_prompts: the batch sizes and prompt counts each exported graph is
    validated at (ONNX Runtime vs PyTorch); the first one is also the tracing example.
    int8: also write ORT dynamic-INT8 versions of the image encoder and CellFinder
    (``quantize.quantize_int8``, ``int8_scope`` "mlp" or "all").
    """
    say = log or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    specs = S.specs_for_config(cfg, bounds)
    parts = [p for p in parts if p != S.CELLFINDER or model.finder is not None]
    unknown = set(parts) - set(S.MODEL_NAMES)
    if unknown:
        raise ValueError(f"unknown graph names {sorted(unknown)} (known: {S.MODEL_NAMES})")
    if S.DECODER in parts:  # its split form goes with it
        i = parts.index(S.DECODER) + 1
        parts = parts[:i] + list(S.CONTEXT_GRAPHS) + parts[i:]
    sam = model.mask_sam.eval()
    base_meta = {
        "cellsam_trt.version": __version__,
        "cellsam_trt.checkpoint_sha256": checkpoint_sha256 or "",
        "cellsam_trt.adv_mode": str(bool(model.adv_mode)).lower(),
        "cellsam_trt.config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "opset": OPSET,
        "checkpoint": {"sha256": checkpoint_sha256, "path": checkpoint_path, "synthetic_seed": synthetic_seed},
        "adv_mode": bool(model.adv_mode),
        "has_detector": S.CELLFINDER in parts,
        "config": cfg.to_dict(),
        "versions": versions(),
        "models": {},
    }
    results: list[GraphResult] = []
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        embedding = None
        for name in parts:
            spec = specs[name]
            meta = dict(base_meta, **{"cellsam_trt.model": name, "cellsam_trt.spec": spec.to_json()})
            path = tmp / spec.filename
            say(f"exporting {name} ...")
            if name == S.ENCODER:
                graph = EncoderGraph(sam)
                cases = _image_cases(graph, image_batches, seed=1)
            elif name == S.DECODER:
                if embedding is None:
                    embedding = (
                        np.random.default_rng(3)
                        .standard_normal((1, cfg.sam.out_chans, cfg.sam.grid_size, cfg.sam.grid_size))
                        .astype(np.float32)
                    )
                graph = decoder_graph = PromptDecoderGraph(sam)
                cases = decoder_cases = _decoder_cases(sam, embedding, decoder_prompts, seed=2)
            elif name == S.PROMPT_CONTEXT:
                graph = PromptContextGraph(decoder_graph)
                cases = [
                    Case(
                        "embedding",
                        {"image_embeddings": embedding},
                        lambda g=graph, e=embedding: g(torch.from_numpy(e)),
                    )
                ]
            elif name == S.CONTEXT_DECODER:
                graph = ContextDecoderGraph(decoder_graph)
                cases = _context_decoder_cases(decoder_graph, spec, decoder_cases)
            else:
                graph = CellFinderGraph(model.finder.eval())
                cases = _image_cases(graph, image_batches, seed=4)
            res = export_graph(name, graph, spec, path, cases, meta, tol, threads)
            if name == S.ENCODER:
                embedding = np.ascontiguousarray(cases[0].expected[0][:1])
            say(
                f"  {name}: {sum(res.ops.values())} nodes, max |ORT - torch| "
                + ", ".join(f"{k} {v:.2g}" for k, v in res.max_abs_diff.items())
                + f" ({res.seconds:.0f} s)"
            )
            results.append(res)
            entry = {
                "file": spec.filename,
                "spec": spec.to_dict(),
                "ops": res.ops,
                "validation": {
                    "max_abs_diff": res.max_abs_diff,
                    "cases": [c.name for c in cases],
                    "tolerance_scaled": tol,
                },
            }
            if int8 and name in (S.ENCODER, S.CELLFINDER):
                q_name = spec.filename.replace(".onnx", ".int8.onnx")
                say(f"  quantizing {name} (dynamic INT8) ...")
                quantize_int8(path, tmp / q_name, int8_scope)
                entry["int8"] = {
                    "file": q_name,
                    "scope": int8_scope,
                    "method": "onnxruntime quantize_dynamic (MatMul, per-channel QInt8 weights)",
                }
            manifest["models"][name] = entry
        for entry in manifest["models"].values():
            for key in ("file",):
                src = tmp / entry[key]
                entry["sha256"] = sha256_file(src)
                os.replace(src, out / entry[key])
            if "int8" in entry:
                src = tmp / entry["int8"]["file"]
                entry["int8"]["sha256"] = sha256_file(src)
                os.replace(src, out / entry["int8"]["file"])
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json(manifest, out / MANIFEST)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return manifest


def _write_json(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
