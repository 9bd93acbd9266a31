"""The engine API for embedding CellSAM in other software.

    from cellsam_trt.engine.api import CellSAMEngine

    engine = CellSAMEngine.load("cellsam-onnx/")            # ONNX Runtime, FP32, CPU by default
    res = engine.segment(image)                             # automatic mode (CellFinder)
    res = engine.segment(image, boxes=[[x1, y1, x2, y2]])   # box prompts, original pixels
    for item in engine.segment_many(paths_or_arrays):       # pipelined, results in input order
        item.index, item.segmentation, item.error

    emb = engine.embed(image)                               # interactive: embed once ...
    res = engine.decode(emb, points=[[[x, y]]])             # ... prompt many times

Every result is a ``pipeline.Segmentation`` (labels (H, W) int32, kept boxes, scores, IoU
predictions, ...). All the image logic is ``pipeline.CellSAMPipeline``'s; this module adds
loading, the interactive split and the batched, overlapped driver.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..pipeline import CellSAMPipeline, Segmentation, SegmentSettings
from .base import Backend


@dataclass
class ImageEmbedding:
    """One image prepared for prompting: ``embedding`` (1, 256, 64, 64) float32 (None for a
    blank image), the squashed model-frame image (3, 1024, 1024) float32 (kept for automatic
    mode) and the original height and width in pixels."""

    embedding: np.ndarray | None
    squashed: np.ndarray
    height: int
    width: int


@dataclass
class Prompts:
    """Prompts for one image of ``segment_many`` (original pixels; see ``CellSAMPipeline.segment``)."""

    boxes: Any = None
    points: Any = None
    point_labels: Any = None


@dataclass
class ItemResult:
    """Outcome of one image of ``segment_many``: the segmentation, or the exception it raised."""

    index: int
    source: Any
    segmentation: Segmentation | None
    error: BaseException | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class _SerializedBackend:
    """A backend whose calls take a lock: pipelined workers overlap their CPU pre/post-processing
    with one another's inference without oversubscribing the cores or the device."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self.name, self.adv_mode, self.has_detector = backend.name, backend.adv_mode, backend.has_detector

    def encode(self, image):
        with self._lock:
            return self._backend.encode(image)

    def detect(self, image):
        with self._lock:
            return self._backend.detect(image)

    def decode(self, embedding, boxes=None, points=None, point_labels=None):
        with self._lock:
            return self._backend.decode(embedding, boxes=boxes, points=points, point_labels=point_labels)


class CellSAMEngine:
    """Segmentation with any backend; ``load`` builds one from an export directory."""

    def __init__(self, backend: Backend, settings: SegmentSettings | None = None, keep_logits: bool = False) -> None:
        self.backend = backend
        self.pipeline = CellSAMPipeline(backend, settings, keep_logits=keep_logits)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        backend: str = "ort",
        *,
        settings: SegmentSettings | None = None,
        precision: str = "fp32",
        providers="auto",
        threads: int = 0,
        decode_chunk: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        device: str = "cpu",
        verify_checkpoint: bool = True,
    ) -> "CellSAMEngine":
        """An engine for the export directory ``model_dir``.

        backend "ort": ONNX Runtime on the exported graphs (precision "fp32" or "int8";
        providers "auto" = TensorRT, CUDA, CPU as available). backend "torch": the PyTorch
        reference on the checkpoint the export was made from (``checkpoint`` or the manifest's
        path / synthetic seed), checked against the manifest's sha256 when ``verify_checkpoint``.
        """
        if backend == "ort":
            from .ort_backend import OrtBackend, OrtConfig

            cfg = OrtConfig(providers=providers, threads=threads, precision=precision)
            if decode_chunk:
                cfg.decode_chunk = decode_chunk
            return cls(OrtBackend(model_dir, cfg), settings)
        if backend == "torch":
            return cls(_torch_backend(model_dir, checkpoint, device, threads, decode_chunk, verify_checkpoint), settings)
        raise ValueError(f"unknown backend {backend!r} (use 'ort' or 'torch')")

    # -- one image -----------------------------------------------------------------------------
    def segment(self, image: np.ndarray, boxes=None, points=None, point_labels=None) -> Segmentation:
        """Segment one image ((H, W) or (H, W, C<=3), any numeric dtype); prompts in original pixels."""
        return self.pipeline.segment(image, boxes=boxes, points=points, point_labels=point_labels)

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Preprocess and encode one image once, for any number of ``decode`` calls."""
        norm, sq = self.pipeline.preprocess(image)
        return ImageEmbedding(self.pipeline._embed(sq), sq, norm.shape[0], norm.shape[1])

    def decode(self, emb: ImageEmbedding, boxes=None, points=None, point_labels=None) -> Segmentation:
        """Masks for prompts on an embedded image (no prompts: automatic mode on that image)."""
        return self.pipeline.segment_prepared(emb.squashed, emb.height, emb.width, boxes, points, point_labels,
                                              embedding=emb.embedding)

    # -- many images ---------------------------------------------------------------------------
    def segment_many(
        self,
        images: Iterable,
        prompts: Iterable | None = None,
        preprocess_workers: int = 1,
        inference_workers: int = 2,
        max_in_flight: int = 4,
    ) -> Iterator[ItemResult]:
        """Segment a stream of images (arrays, paths read with ``cellsam_trt.io``, or zero-argument
        callables returning an array), yielding one ``ItemResult`` per image in input order.

        Reading and preprocessing run in ``preprocess_workers`` threads; ``inference_workers``
        threads run the rest of each image with the backend calls serialized, so one image's
        label assembly overlaps the next one's inference. At most ``max_in_flight`` images are
        held at once (bounded memory). An exception in one image is returned in its result and
        the other images go on. ``prompts``: one ``Prompts`` (or None = automatic) per image.
        """
        if max_in_flight < 1 or preprocess_workers < 1 or inference_workers < 1:
            raise ValueError("workers and max_in_flight must be >= 1")
        pipe = CellSAMPipeline(_SerializedBackend(self.backend), self.pipeline.settings, self.pipeline.keep_logits)
        prompt_iter = iter(prompts) if prompts is not None else None

        def prepare(source):
            image = _read(source)
            norm, sq = pipe.preprocess(image)
            return sq, norm.shape[0], norm.shape[1]

        def finish(index, source, prepared, prompt, t0):
            try:
                sq, h, w = prepared.result()
                p = prompt or Prompts()
                seg = pipe.segment_prepared(sq, h, w, p.boxes, p.points, p.point_labels)
                return ItemResult(index, source, seg, None, time.perf_counter() - t0)
            except Exception as e:  # reported for this image; the others go on
                return ItemResult(index, source, None, e, time.perf_counter() - t0)

        pre_pool = ThreadPoolExecutor(preprocess_workers, thread_name_prefix="cellsam-pre")
        run_pool = ThreadPoolExecutor(inference_workers, thread_name_prefix="cellsam-run")
        window: deque = deque()
        try:
            for index, source in enumerate(images):
                prompt = next(prompt_iter, None) if prompt_iter is not None else None
                t0 = time.perf_counter()
                prepared = pre_pool.submit(prepare, source)
                window.append(run_pool.submit(finish, index, source, prepared, prompt, t0))
                if len(window) >= max_in_flight:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()
            pre_pool.shutdown(wait=True, cancel_futures=True)
            run_pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class EngineSpec:
    """A picklable recipe for an engine, so that each process (a Dask worker) loads its own.

    model_dir: an export directory (``cellsam-trt export``; backend "auto" / "ort" / "torch") or
    a TensorRT engine directory (backend "trt"). Without model_dir: ``checkpoint``, or the
    synthetic checkpoint of ``synthetic_seed``, on the PyTorch reference (backend "auto" /
    "torch") or exported on the fly for ONNX Runtime (backend "ort"; cached in
    ``export_cache``, default ``~/.cache/cellsam-trt/exports``). threads: CPU threads (0 =
    library default); device: "cpu", "cuda" or "cuda:N" (torch backend).
    """

    model_dir: str | None = None
    backend: str = "auto"
    checkpoint: str | None = None
    synthetic_seed: int = 0
    settings: SegmentSettings = SegmentSettings()
    precision: str = "fp32"
    threads: int = 0
    device: str = "cpu"
    export_cache: str | None = None

    def build(self) -> tuple["CellSAMEngine", dict]:
        """-> (engine, description for run summaries: model, backend, adv_mode).

        backend "ort" without model_dir exports the checkpoint first (once: the export is
        cached under ``export_cache`` by the checkpoint's sha256); "trt" needs model_dir = an
        engine directory (``cellsam-trt build``)."""
        if self.backend == "trt":
            if self.model_dir is None:
                raise ValueError("backend 'trt' needs an engine directory (made by cellsam-trt build)")
            from .trt_backend import TrtBackend

            engine = CellSAMEngine(TrtBackend(self.model_dir), self.settings)
            return engine, {"model": str(self.model_dir), "backend": "trt", "adv_mode": engine.backend.adv_mode}
        model_dir = self.model_dir
        if model_dir is None and self.backend == "ort":
            model_dir = str(export_on_the_fly(self.checkpoint, self.synthetic_seed, self.export_cache, self.threads))
        if model_dir is not None:
            backend = "ort" if self.backend == "auto" else self.backend
            engine = CellSAMEngine.load(model_dir, backend=backend, settings=self.settings, precision=self.precision,
                                        threads=self.threads, device=self.device, checkpoint=self.checkpoint)
            return engine, {"model": str(model_dir), "backend": backend, "adv_mode": engine.backend.adv_mode}
        if self.backend not in ("auto", "torch"):
            raise ValueError(f"unknown backend {self.backend!r} (use auto, ort, torch or trt)")
        import torch

        from ..model.checkpoint import load_checkpoint
        from ..model.synthetic import synthetic_checkpoint
        from .torch_backend import TorchBackend

        if self.threads:
            torch.set_num_threads(self.threads)
        path = self.checkpoint if self.checkpoint else synthetic_checkpoint(self.synthetic_seed)
        ck = load_checkpoint(path)
        engine = CellSAMEngine(TorchBackend(ck.model, device=self.device), self.settings)
        return engine, {"checkpoint": str(ck.path), "backend": "torch", "adv_mode": ck.adv_mode,
                        "mode": ck.mode_description}

    def with_device(self, device: str) -> "EngineSpec":
        from dataclasses import replace

        return replace(self, device=device)


def export_on_the_fly(checkpoint, synthetic_seed: int = 0, cache=None, threads: int = 0) -> Path:
    """The export directory of a checkpoint (FP32 graphs, validated at batch 1 and 1 / 5
    prompts), made once under ``cache``/<sha256 prefix>-v<export format>; concurrent callers each export to a
    temporary folder and the first rename wins."""
    import shutil
    import tempfile

    from ..export.onnx_export import FORMAT_VERSION, MANIFEST, export_model
    from ..model.checkpoint import load_checkpoint, sha256_file
    from ..model.synthetic import default_cache_dir, synthetic_checkpoint

    path = Path(checkpoint) if checkpoint else synthetic_checkpoint(synthetic_seed)
    sha = sha256_file(path)
    root = Path(cache) if cache is not None else default_cache_dir() / "exports"
    dest = root / f"{sha[:16]}-v{FORMAT_VERSION}"  # a newer export format gets a fresh export
    if (dest / MANIFEST).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{sha[:16]}."))
    try:
        ck = load_checkpoint(path)
        export_model(ck.model, tmp, checkpoint_sha256=sha, checkpoint_path=str(path.resolve()),
                     synthetic_seed=None if checkpoint else synthetic_seed, image_batches=(1,), decoder_prompts=(1, 5),
                     threads=threads)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read(source) -> np.ndarray:
    if callable(source):  # a loader: read (and arrange) the image in the preprocessing thread
        return np.asarray(source())
    if isinstance(source, (str, os.PathLike)):
        from .. import io as cio

        return cio.read_image(source)
    return np.asarray(source)


def _torch_backend(model_dir, checkpoint, device, threads, decode_chunk, verify):
    import torch

    from ..export.onnx_export import read_manifest
    from ..model.checkpoint import load_checkpoint, sha256_file
    from ..model.synthetic import synthetic_checkpoint
    from .torch_backend import TorchBackend

    manifest = read_manifest(model_dir)
    ck = manifest.get("checkpoint", {})
    if checkpoint is None:
        if ck.get("path") and Path(ck["path"]).is_file():
            checkpoint = ck["path"]
        elif ck.get("synthetic_seed") is not None:
            checkpoint = synthetic_checkpoint(int(ck["synthetic_seed"]))
        else:
            raise ValueError(f"{model_dir}: the manifest names no checkpoint file; pass checkpoint=")
    if verify and ck.get("sha256") and sha256_file(checkpoint) != ck["sha256"]:
        raise ValueError(f"{checkpoint}: sha256 differs from the export's checkpoint ({ck['sha256'][:12]}...)")
    if threads:
        torch.set_num_threads(threads)
    from ..model.cellsam import CellSAMConfig

    loaded = load_checkpoint(checkpoint, cfg=CellSAMConfig.from_dict(manifest["config"]))
    model = loaded.model
    if bool(manifest["adv_mode"]) != model.adv_mode:
        raise ValueError(f"{checkpoint}: adv_mode {model.adv_mode} but the export has {manifest['adv_mode']}")
    kwargs = {"decode_chunk": decode_chunk} if decode_chunk else {}
    return TorchBackend(model, device=device, **kwargs)
