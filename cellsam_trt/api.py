"""The front door: ``from cellsam_trt import CellSAM``.

    with CellSAM.load("cellsam-onnx/") as model:           # export dir, engine dir or checkpoint
        res = model.segment(image)                          # automatic mode (CellFinder)
        res = model.segment(image, boxes=[[x1, y1, x2, y2]])
        res.labels, res.boxes, res.scores, res.iou_predictions
        for item in model.segment_many(paths_or_arrays):    # overlapped, results in input order
            item.index, item.segmentation, item.error
        view = model.prompt(image)                          # interactive: embed once ...
        view.segment(points=[[[x, y]]])                     # ... prompt many times

``CellSAM.load`` picks the backend and the scheduler (``resolve``): an engine directory runs on
TensorRT; a checkpoint on a CUDA device (torch installed) on the torch backend with the GPU
scheduler; otherwise the CPU default: OpenVINO where it is installed, else ONNX Runtime (a
checkpoint is exported once and cached). ``backend="ort", device="cuda"`` runs FP32 on ONNX
Runtime's CUDA provider, and fp16 / bf16 / int8 as the export's precision-annotated graphs on its
TensorRT provider.
A request that cannot be met raises ``LoadError`` with one line that says why; nothing falls
back silently to another backend, device or precision. The choice and its reason are logged
(logger ``cellsam_trt``) and kept in ``CellSAM.description``.

Thread safety: one ``CellSAM`` may be used from several threads at once; each graph runs one
call at a time (a lock per runner) and the stages keep no state, so concurrent ``segment``
calls give the results of sequential ones.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import pipeline as P
from . import weights
from .engine.base import PRECISIONS, Backend, BackendError
from .runtime.manifest import MANIFEST, read_manifest
from .scheduler import CpuScheduler, ItemResult

log = logging.getLogger("cellsam_trt")

BACKENDS = ("auto", "ort", "openvino", "trt", "torch")


class LoadError(ValueError):
    """A model that cannot be loaded as asked; the message is one line saying why and what to do."""


def _has(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device (torch is imported only if present)."""
    if not _has("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class Choice:
    """What ``resolve`` decided: model kind ("engines", "export" or "checkpoint"), path,
    backend, device ("cpu" or "cuda:N"), precision, scheduler ("cpu" or "gpu") and why."""

    kind: str
    path: Path
    backend: str
    device: str
    precision: str
    scheduler: str
    reason: str


def model_kind(
    model: str | os.PathLike, version: str | None = None, models_root: str | os.PathLike | None = None
) -> tuple[str, Path]:
    """-> ("engines" | "export" | "checkpoint", path), or LoadError naming what is wrong.

    A model name (a str equal to one of ``weights.MODEL_NAMES``: ``cellsam_general``,
    ``cellsam_extra``) is the official checkpoint ``<models_root>/cellsam_v<version>/<name>.pt``
    (models_root: ``~/.deepcell/models``, shared with the official package; version None: the
    latest); any other str or a Path is a path (``./cellsam_general`` names a local folder).
    """
    if weights.is_model_name(model):
        try:
            return "checkpoint", weights.find_model(model, version, models_root)
        except weights.ModelNotFound as e:
            raise LoadError(str(e)) from e
    path = Path(model)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "export", path
        if any(path.glob("*.engine")):
            return "engines", path
        raise LoadError(
            f"{path}: neither an export directory (no {MANIFEST}; `cellsam-trt export`) nor a TensorRT "
            "engine directory (no *.engine; `cellsam-trt build`)"
        )
    if path.is_file():
        return "checkpoint", path
    raise LoadError(f"{model}: no such model file or directory")


def _device(device: str, want_cuda: bool) -> str:
    """ "auto" / "cpu" / "cuda" / "cuda:N" -> "cpu" or "cuda:N"."""
    if device == "auto":
        return "cuda:0" if want_cuda else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return "cuda:0" if device == "cuda" else device
    raise LoadError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")


def resolve(
    model: str | os.PathLike,
    backend: str = "auto",
    device: str = "auto",
    precision: str | None = None,
    *,
    version: str | None = None,
    models_root: str | os.PathLike | None = None,
) -> Choice:
    """Which backend, device, precision and scheduler ``CellSAM.load`` uses (see the module doc).

    precision None: FP32, or an engine directory's build precision; version / models_root: of a
    model name (``model_kind``). Raises LoadError when the request cannot be met (no CUDA,
    precision the backend does not run, library missing, a named model not installed).
    """
    if backend not in BACKENDS:
        raise LoadError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision is not None and precision not in PRECISIONS:
        raise LoadError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    kind, path = model_kind(model, version, models_root)
    if kind == "engines":
        if backend not in ("auto", "trt"):
            raise LoadError(f"{path} holds TensorRT engines: they run on backend trt, not {backend}")
        dev = _device(device, True)
        if dev == "cpu":
            raise LoadError(f"{path} holds TensorRT engines, which run on a CUDA device, not the CPU")
        built = _engine_precision(path)
        if precision is not None and precision != built:
            raise LoadError(
                f"{path}: the engines were built for {built}, not {precision} "
                f"(rebuild: cellsam-trt build --precision {precision})"
            )
        return Choice(
            kind, path, "trt", dev, built, "gpu" if _has("torch") else "cpu", "an engine directory runs on TensorRT"
        )
    if backend == "trt":
        raise LoadError(f"{path}: backend trt needs an engine directory (cellsam-trt build --onnx EXPORT --out DIR)")
    if backend == "openvino" and device not in ("auto", "cpu"):
        raise LoadError(f"backend openvino: OpenVINO runs on the CPU in this engine, not on {device}")
    cuda = None
    if device == "auto" and kind == "checkpoint" and backend in ("auto", "torch"):
        cuda = cuda_available()
    dev = _device(device, bool(cuda))
    if dev.startswith("cuda") and backend != "ort" and not cuda_available():
        raise LoadError(
            f"device {device} asked for, but no CUDA device is visible to PyTorch"
            + ("" if _has("torch") else " (PyTorch is not installed)")
        )
    prec = precision or "fp32"
    if backend == "auto":
        ov_reason = _openvino_default(kind, dev, prec)
        if ov_reason:
            backend, reason = "openvino", ov_reason
        elif kind == "export":
            backend, reason = "ort", "an export directory runs on ONNX Runtime"
        elif dev.startswith("cuda"):
            backend, reason = "torch", "a checkpoint on a CUDA device runs on the torch backend"
        elif _has("onnxruntime") and _has("onnx") and prec in ("fp32",):
            backend, reason = "ort", "a checkpoint on the CPU runs on ONNX Runtime (exported once, cached)"
        else:
            backend = "torch"
            reason = "a checkpoint on the CPU runs on the torch backend (" + (
                "onnxruntime / onnx not installed)" if prec == "fp32" else f"{prec} on the CPU)"
            )
    else:
        reason = f"backend {backend} asked for"
    if backend == "ort":
        if not _has("onnxruntime"):
            raise LoadError("backend ort needs ONNX Runtime: pip install 'cellsam-trt[ort]'")
        if prec not in ("fp32", "int8") and not dev.startswith("cuda"):
            raise LoadError(
                f"ONNX Runtime on the CPU runs fp32 or int8 exports, not {prec} (fp16 / bf16: on a CUDA "
                "device through ONNX Runtime's TensorRT provider, or backend torch / trt)"
            )
        if kind == "checkpoint" and prec == "int8":
            raise LoadError(f"{path}: int8 needs an export made with `cellsam-trt export --int8`")
        if kind == "checkpoint" and prec != "fp32":
            raise LoadError(
                f"{path}: {prec} on ONNX Runtime's TensorRT provider runs an export's precision-annotated "
                f"graphs: cellsam-trt export --checkpoint {path} --out EXPORT --precision {prec}"
            )
        if dev.startswith("cuda") and prec != "fp32":
            reason += f"; {prec} through ONNX Runtime's TensorRT provider (the export's annotated graphs)"
        if kind == "checkpoint":
            _require_exporter(path, "ONNX Runtime")
    if backend == "openvino":
        if not _has("openvino"):
            raise LoadError("backend openvino needs OpenVINO: pip install 'cellsam-trt[openvino]'")
        problem = _openvino_precision_problem(prec)
        if problem:
            raise LoadError(problem)
        if kind == "checkpoint" and prec == "int8":
            raise LoadError(f"{path}: OpenVINO int8 needs an export quantized with `cellsam-trt quantize`")
        if kind == "checkpoint":
            _require_exporter(path, "OpenVINO")
    if backend == "torch":
        if not _has("torch"):
            raise LoadError("backend torch needs PyTorch: pip install 'cellsam-trt[torch]'")
        if prec == "int8":
            raise LoadError("the torch backend runs fp32, fp16 or bf16; int8: backend ort (export --int8) or trt")
    scheduler = "gpu" if dev.startswith("cuda") and _has("torch") else "cpu"
    return Choice(kind, path, backend, dev, prec, scheduler, reason)


def _require_exporter(path: Path, runtime: str) -> None:
    """LoadError unless torch and onnx are installed: a checkpoint is exported for ``runtime``."""
    if not (_has("torch") and _has("onnx")):
        raise LoadError(
            f"{path}: exporting a checkpoint for {runtime} needs torch and onnx: "
            "pip install 'cellsam-trt[export]' (or run an export directory)"
        )


def _openvino_precision_problem(precision: str) -> str | None:
    """Why OpenVINO cannot run ``precision`` natively on this CPU (None: it can)."""
    from .engine.openvino_backend import cpu_capabilities, precision_problem

    return precision_problem(precision, cpu_capabilities())


def _openvino_default(kind: str, device: str, precision: str) -> str | None:
    """The reason ``backend="auto"`` runs this request on OpenVINO, or None when it does not:
    OpenVINO is the CPU default where it is installed (faster than ONNX Runtime on the same
    export, ``benchmarks/bench_cpu.py``). A checkpoint asking for a precision this CPU has no
    native support for keeps the torch backend; an export directory gets OpenVINO's refusal."""
    if device != "cpu" or not _has("openvino"):
        return None
    if kind == "checkpoint":
        if not (_has("torch") and _has("onnx")):
            return None
        if precision in ("bf16", "fp16") and _openvino_precision_problem(precision):
            return None
        return "a checkpoint on the CPU runs on OpenVINO (exported once, cached), the CPU default where installed"
    return "an export directory on the CPU runs on OpenVINO, the CPU default where installed"


def _engine_precision(engine_dir: Path) -> str:
    from .runtime import engine_file as EF

    precisions = {EF.read_header(p).get("precision", "fp32") for p in sorted(engine_dir.glob("*.engine"))}
    if len(precisions) != 1:
        raise LoadError(f"{engine_dir}: engines of different precisions {sorted(precisions)}")
    return precisions.pop()


def _export_checkpoint(model_dir: Path) -> Path:
    """The checkpoint an export was made from (for backend torch on an export), sha256-checked."""
    from .model.checkpoint import sha256_file

    ck = read_manifest(model_dir).get("checkpoint", {})
    path = ck.get("path")
    if not path or not Path(path).is_file():
        raise LoadError(
            f"{model_dir}: the checkpoint it was exported from ({path}) is not here; "
            "load the checkpoint itself with backend torch"
        )
    if ck.get("sha256") and sha256_file(path) != ck["sha256"]:
        raise LoadError(f"{path}: sha256 differs from the checkpoint {model_dir} was exported from")
    return Path(path)


def _checked_checkpoint(path: Path, strict: bool, load: bool):
    """The checkpoint's keys checked (``model.checkpoint``: unexpected keys reported, missing keys
    of parts that run refused, ``strict`` refuses any mismatch); load: -> the loaded model."""
    from .model.checkpoint import CheckpointError, check_checkpoint, load_checkpoint

    try:
        return load_checkpoint(path, strict=strict).model if load else check_checkpoint(path, strict=strict)
    except CheckpointError as e:
        raise LoadError(str(e)) from e


def build_backend(
    choice: Choice, threads: int = 0, export_cache: str | os.PathLike | None = None, strict: bool = False
) -> Backend:
    """The backend ``choice`` names (libraries imported here, as each needs them). strict: refuse
    a checkpoint whose keys do not match the layout exactly (default: report unexpected keys)."""
    try:
        if choice.kind == "checkpoint" and choice.backend != "torch":  # its export runs: check the keys
            _checked_checkpoint(choice.path, strict, load=False)  # (memory-mapped, cheap), also when cached
        if choice.backend == "trt":
            from .engine.trt_backend import TrtBackend

            return TrtBackend(choice.path, device_id=int(choice.device.split(":")[1]))
        if choice.backend == "ort":
            from .engine.ort_backend import OrtBackend, OrtConfig

            model_dir = choice.path
            if choice.kind == "checkpoint":
                from .export.cache import export_on_the_fly

                model_dir = export_on_the_fly(choice.path, export_cache, threads, log=log.info)
            # on a GPU: fp32 on the CUDA provider; fp16 / bf16 / int8 are the export's annotated
            # graphs, which run strongly typed on the TensorRT provider (refused where it is absent)
            providers = ["cpu"] if choice.device == "cpu" else ["cuda"] if choice.precision == "fp32" else ["trt"]
            device_id = int(choice.device.split(":")[1]) if choice.device.startswith("cuda") else 0
            return OrtBackend(
                model_dir,
                OrtConfig(providers=providers, threads=threads, precision=choice.precision, device_id=device_id),
            )
        if choice.backend == "openvino":
            from .engine.openvino_backend import OvBackend

            model_dir = choice.path
            if choice.kind == "checkpoint":
                from .export.cache import export_on_the_fly

                model_dir = export_on_the_fly(choice.path, export_cache, threads, log=log.info)
            return OvBackend(model_dir, threads=threads, precision=choice.precision)
        import torch

        from .engine.torch_backend import TorchBackend

        if threads:
            torch.set_num_threads(threads)
        path = _export_checkpoint(choice.path) if choice.kind == "export" else choice.path
        model = _checked_checkpoint(path, strict, load=True)
        return TorchBackend(model, device=choice.device, precision=choice.precision)
    except LoadError:
        raise
    except (BackendError, OSError, ValueError, ImportError) as e:
        raise LoadError(
            f"{choice.path}: cannot load on {choice.backend} ({choice.device}, {choice.precision}): {e}"
        ) from e


class CellSAM:
    """CellSAM on one backend with one scheduler (see the module doc).

    backend: an ``engine.base.Backend``; settings: ``pipeline.SegmentSettings`` (official
    thresholds by default); scheduler: "cpu", "gpu" or "auto" (gpu when the backend's device is
    CUDA); readers / workers / max_in_flight: the CPU scheduler's threads and bound on images
    held (the GPU scheduler holds ``queue_size`` per stage).
    """

    def __init__(
        self,
        backend: Backend,
        settings: P.SegmentSettings | None = None,
        scheduler: str = "auto",
        readers: int = 1,
        workers: int = 2,
        max_in_flight: int = 4,
        description: dict | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings or P.SegmentSettings()
        if scheduler == "auto":
            scheduler = "gpu" if str(backend.device).startswith("cuda") else "cpu"
        if scheduler == "gpu":
            from .gpu_scheduler import GpuScheduler  # needs torch (label assembly on the device)

            self.scheduler = GpuScheduler(backend, self.settings, queue_size=max(1, max_in_flight // 2))
        elif scheduler == "cpu":
            self.scheduler = CpuScheduler(backend, self.settings, readers, workers, max_in_flight)
        else:
            raise ValueError(f"scheduler must be auto, cpu or gpu, not {scheduler!r}")
        self.description = {
            "backend": backend.name,
            "device": str(backend.device),
            "precision": backend.precision,
            "scheduler": scheduler,
            "adv_mode": backend.adv_mode,
            **(description or {}),
        }

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        backend: str = "auto",
        device: str = "auto",
        precision: str | None = None,
        threads: int = 0,
        *,
        settings: P.SegmentSettings | None = None,
        channels: P.Channels | None = None,
        export_cache: str | os.PathLike | None = None,
        strict: bool = False,
        version: str | None = None,
        models_root: str | os.PathLike | None = None,
        **scheduler_options,
    ) -> CellSAM:
        """Load ``model``: an export directory (``cellsam-trt export``), a TensorRT engine
        directory (``cellsam-trt build``), a checkpoint file (CellSAM or SAM, weights only) or a
        model name: ``"cellsam_general"`` / ``"cellsam_extra"``, the official checkpoint in
        ``<models_root>/cellsam_v<version>/`` (default ``~/.deepcell/models``, latest version;
        ``cellsam-trt fetch`` or ``cellsam_trt.models.fetch_model`` installs it).

        backend: auto, ort, trt or torch; device: auto, cpu, cuda or cuda:N; precision: fp32,
        fp16, bf16 or int8 (None: fp32, or an engine directory's build precision); threads: CPU
        threads (0: the library's default); channels: the default ``Channels`` of every call;
        export_cache: where a checkpoint's export for ONNX Runtime is kept; strict: refuse a
        checkpoint whose keys do not match the layout exactly (default: unexpected keys are
        reported as a ``CheckpointWarning``; keys missing from a part that runs are always refused).
        """
        choice = resolve(model, backend, device, precision, version=version, models_root=models_root)
        log.info(
            "cellsam_trt: %s on %s (%s, %s, %s scheduler): %s",
            choice.path,
            choice.backend,
            choice.device,
            choice.precision,
            choice.scheduler,
            choice.reason,
        )
        settings = P.with_channels(settings or P.SegmentSettings(), channels)
        be = build_backend(choice, threads, export_cache, strict)
        desc = {"model": str(choice.path), "reason": choice.reason}
        if weights.is_model_name(model):
            desc["model_name"] = f"{model} v{weights.release(version).version}"
        if choice.kind == "checkpoint" and choice.backend in ("ort", "openvino"):
            desc["export"] = str(be.model_dir)  # the cached export it runs
        return cls(be, settings, choice.scheduler, description=desc, **scheduler_options)

    # -- one image -----------------------------------------------------------------------------
    def segment(
        self,
        image: np.ndarray,
        boxes=None,
        points=None,
        point_labels=None,
        channels: P.Channels | None = None,
        scale=None,
        scale_estimator: str = "model",
    ) -> P.Segmentation:
        """Segment one image ((H, W) or 3-D with channels, any numeric dtype).

        boxes: (N, 4) XYXY; points: (N, P, 2) XY with point_labels (N, P) (1 cell, 0
        background); both in original pixels. Without prompts CellFinder finds the cells.
        scale: None (the official 1024 x 1024 squash), "auto" (the median cell diameter
        measured by ``scale_estimator``: "log", "model" or "boxes", then ``scale.plan_scale``)
        or model-frame pixels per input pixel (float); labels and boxes come back in input
        pixels, the plan in ``details.scale`` (``cellsam_trt.scale``).
        """
        settings = P.with_channels(self.settings, channels)
        prompts = P.Prompts(boxes, points, point_labels)
        if scale is not None:
            from . import scale as cell_scale

            return cell_scale.segment(self, image, prompts, settings, scale, scale_estimator)
        return P.segment(self.backend, image, prompts, settings)

    def prompt(self, image: np.ndarray, channels: P.Channels | None = None) -> PromptView:
        """Prepare and embed ``image`` once, for any number of ``PromptView.segment`` calls."""
        settings = P.with_channels(self.settings, channels)
        prepared = P.prepare(image, settings)
        return PromptView(self, prepared, P.embed(self.backend, prepared), settings)

    # -- many images ---------------------------------------------------------------------------
    def segment_many(
        self, sources: Iterable, prompts=None, channels: P.Channels | None = None, max_in_flight: int | None = None
    ) -> Iterator[ItemResult]:
        """Segment a stream of images (arrays, paths, or zero-argument callables returning an
        array), yielding one ``ItemResult`` per image in input order, with bounded memory.

        prompts: None (automatic mode), one ``pipeline.Prompts`` for every image, or an iterable
        of ``Prompts`` / None, one per image. An image's failure is reported in its result and
        the others go on. max_in_flight: this call's bound on images held (default: the
        scheduler's).
        """
        return self.scheduler.run(sources, prompts, P.with_channels(self.settings, channels), max_in_flight)

    # -- lifetime ------------------------------------------------------------------------------
    def warmup(self) -> CellSAM:
        """Load every graph now (sessions, engines) rather than on the first image."""
        self.backend.warmup()
        return self

    def close(self) -> None:
        """Release the backend's sessions / engines (they are made again if used later)."""
        self.backend.close()

    def __enter__(self) -> CellSAM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        d = self.description
        return f"CellSAM({d.get('model', '?')}: {d['backend']} {d['precision']} on {d['device']})"


@dataclass
class PromptView:
    """One image prepared and embedded for interactive prompting (``CellSAM.prompt``).

    embedding: (1, 256, 64, 64) float32, or None for an image blank after normalisation.
    """

    model: CellSAM
    prepared: P.Prepared
    embedding: np.ndarray | None
    settings: P.SegmentSettings = field(repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.prepared.height, self.prepared.width

    def segment(self, boxes=None, points=None, point_labels=None) -> P.Segmentation:
        """Masks for these prompts (original pixels) on the embedded image; no prompts:
        automatic mode on this image."""
        prompts = P.Prompts(boxes, points, point_labels)
        if self.embedding is None:  # blank image: nothing to segment, but prompts are still checked
            P.find_prompts(self.model.backend, self.prepared, prompts, self.settings)
            return P.empty(self.prepared)
        return P.segment_prepared(self.model.backend, self.prepared, prompts, self.settings, embedding=self.embedding)


@dataclass(frozen=True)
class EngineSpec:
    """A picklable recipe for a ``CellSAM``, so that each process (a Dask worker) loads its own:
    the arguments of ``CellSAM.load``."""

    model: str
    backend: str = "auto"
    device: str = "auto"
    precision: str | None = None
    threads: int = 0
    settings: P.SegmentSettings = P.SegmentSettings()
    export_cache: str | None = None
    strict: bool = False

    def build(self, **scheduler_options) -> tuple[CellSAM, dict]:
        """-> (model, its description for run summaries); scheduler_options go to
        ``CellSAM.load``."""
        m = CellSAM.load(
            self.model,
            self.backend,
            self.device,
            self.precision,
            self.threads,
            settings=self.settings,
            export_cache=self.export_cache,
            strict=self.strict,
            **scheduler_options,
        )
        return m, dict(m.description)

    def with_device(self, device: str) -> EngineSpec:
        return replace(self, device=device)
