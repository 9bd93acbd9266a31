"""The CPU scheduler: many images through the pipeline's stages, overlapped with threads.

Readers run ahead (``readers`` threads read each source and ``pipeline.prepare`` it), ``workers``
threads run the rest of each image (``pipeline.segment_prepared``) and the caller consumes
the results behind them, in input order, while later images are still in flight. Backend
calls are serialised per graph by the backend's runners (``engine.base.Runner``), not by one
global lock: one image's decoder runs while the next one's encoder does. At most
``max_in_flight`` images are held at once, so memory is bounded whatever the stream's length.
An image that fails (unreadable file, bad prompts, a backend error) gives an ``ItemResult``
with ``error`` set and the other images go on.

``gpu_scheduler.GpuScheduler`` runs the same stages with CUDA streams and label assembly on
the device; both yield ``ItemResult``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import pipeline as P
from .engine.base import Backend


@dataclass
class ItemResult:
    """One image's outcome: ``segmentation`` or the exception (``error``) it raised, its
    position and source, wall seconds from submission to result, and seconds per stage."""

    index: int
    source: Any
    segmentation: P.Segmentation | None
    error: BaseException | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def read_source(source, reader: Callable | None = None) -> np.ndarray:
    """An array, a zero-argument callable returning one, or a path (read with ``reader``,
    default ``cellsam_trt.io.read_image``)."""
    if callable(source):
        return np.asarray(source())
    if isinstance(source, (str, os.PathLike)):
        if reader is None:
            from .io import read_image as reader
        return reader(source)
    return np.asarray(source)


def prompt_stream(prompts, n_hint: int | None = None) -> Iterator[P.Prompts | None]:
    """None (automatic mode for every image), one ``Prompts`` for every image, or an iterable
    of ``Prompts`` / None, one per image."""
    if prompts is None or isinstance(prompts, P.Prompts):
        while True:
            yield prompts
    yield from prompts
    while True:  # fewer prompts than images: the rest are automatic
        yield None


class CpuScheduler:
    """Segments a stream of images on the CPU (see the module doc).

    readers: threads reading and preparing images ahead; workers: threads running the model
    stages; max_in_flight: images held at once.
    """

    def __init__(
        self,
        backend: Backend,
        settings: P.SegmentSettings,
        readers: int = 1,
        workers: int = 2,
        max_in_flight: int = 4,
        keep_logits: bool = False,
    ) -> None:
        if readers < 1 or workers < 1 or max_in_flight < 1:
            raise ValueError("readers, workers and max_in_flight must be >= 1")
        self.backend, self.settings = backend, settings
        self.readers, self.workers, self.max_in_flight = readers, workers, max_in_flight
        self.keep_logits = keep_logits

    def run(
        self,
        sources: Iterable,
        prompts=None,
        settings: P.SegmentSettings | None = None,
        max_in_flight: int | None = None,
    ) -> Iterator[ItemResult]:
        """One ``ItemResult`` per source, in input order (see ``read_source``, ``prompt_stream``);
        max_in_flight: this call's bound on images held (default: the scheduler's)."""
        settings = settings or self.settings
        bound = max_in_flight or self.max_in_flight
        prompt_it = prompt_stream(prompts)

        def prepare(source):
            t0 = time.perf_counter()
            prepared = P.prepare(read_source(source), settings)
            return prepared, time.perf_counter() - t0

        def work(index, source, prepared_f, prompt, t0):
            timings = {}
            try:
                prepared, timings["prepare"] = prepared_f.result()
                t1 = time.perf_counter()
                seg = P.segment_prepared(self.backend, prepared, prompt, settings, keep_logits=self.keep_logits)
                timings["model"] = time.perf_counter() - t1
                return ItemResult(index, source, seg, None, time.perf_counter() - t0, timings)
            except Exception as e:  # reported for this image; the others go on
                return ItemResult(index, source, None, e, time.perf_counter() - t0, timings)

        pre_pool = ThreadPoolExecutor(self.readers, thread_name_prefix="cellsam-read")
        run_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cellsam-run")
        window: deque = deque()
        try:
            for index, source in enumerate(sources):
                prompt = next(prompt_it)
                t0 = time.perf_counter()
                prepared_f = pre_pool.submit(prepare, source)
                window.append(run_pool.submit(work, index, source, prepared_f, prompt, t0))
                if len(window) >= bound:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()
            pre_pool.shutdown(wait=True, cancel_futures=True)
            run_pool.shutdown(wait=True, cancel_futures=True)
