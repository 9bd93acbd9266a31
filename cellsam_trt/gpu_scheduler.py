"""The GPU scheduler: the pipeline's stages (``cellsam_trt.pipeline``) overlapped on a device.

``GpuScheduler(backend, settings).run(sources, prompts)`` runs four stages in their own
threads, joined by bounded queues (``queue_size`` images in flight between stages):

    prepare (CPU) -> front: find_prompts + embed (device) -> back: decode + label assembly
    (device) -> post: finish (hole filling, small-object removal, result; CPU)

so the encoder and CellFinder of image i+1 run while the decoder of image i and the CPU work
of images i-1 / i+2 proceed. On a device-resident backend (torch on CUDA) each device stage
thread issues its work on its own CUDA stream and the embedding and mask logits stay on the
device, with an event ordering the two streams; the TensorRT backend has a stream per engine.
Results come back in input order as ``scheduler.ItemResult``; an image that fails yields one
with ``error`` set and the other images go on.

Label assembly on the device (``assemble_labels_torch``): the kept masks' low-res logits are
upsampled bilinearly (align_corners=False) 256 -> 1024 -> H x W, thresholded at sigmoid > 0.4
and combined so that a later mask wins an overlap (label = the largest 1-based index of the
masks covering a pixel); only the (H, W) int32 label map crosses to the host. It equals
``cellsam_trt.labels.assemble_labels`` except where an interpolated logit lies within float
rounding (~1e-5) of the threshold. Works on CPU tensors too.

The stages are the pipeline's own functions; only the label assembly differs (on the device).
``tests/test_gpu_scheduler.py`` checks that both schedulers give the same labels.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import labels as label_ops
from . import pipeline as P
from .engine.base import Backend
from .scheduler import ItemResult, prompt_stream, read_source

LOWRES = label_ops.LOWRES
MODEL_SIZE = label_ops.MODEL_SIZE
MASK_THRESHOLD = label_ops.MASK_THRESHOLD


# --------------------------------------------------------------------------- device post-processing


def upsample_logits(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(K, 256, 256) float32 logits -> (K, height, width) float32: bilinear 256 -> 1024, then
    bilinear 1024 -> (height, width), align_corners=False, no antialiasing (the official steps)."""
    x = logits.float()[:, None]
    x = F.interpolate(x, size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x[:, 0]


def assemble_labels_torch(logits: torch.Tensor, height: int, width: int, max_bytes: int = 256 << 20) -> torch.Tensor:
    """Kept masks' low-res logits (K, 256, 256) -> label map (height, width) int32 on the same device.

    Mask k (0-based) gets label k + 1 where sigmoid(upsampled logit) > 0.4; a later mask wins.
    Masks are processed in chunks so that the upsampled logits stay under ``max_bytes``.
    """
    k = int(logits.shape[0])
    labels = torch.zeros((height, width), dtype=torch.int32, device=logits.device)
    if k == 0:
        return labels
    per_mask = 4 * max(height * width, MODEL_SIZE * MODEL_SIZE) * 2
    chunk = max(1, min(k, max_bytes // per_mask))
    for s in range(0, k, chunk):
        e = min(k, s + chunk)
        on = torch.sigmoid(upsample_logits(logits[s:e], height, width)) > MASK_THRESHOLD
        ids = torch.arange(s + 1, e + 1, dtype=torch.int32, device=logits.device)[:, None, None]
        labels = torch.maximum(labels, (on.to(torch.int32) * ids).amax(0))
    return labels


@dataclass
class _Item:
    index: int
    source: Any
    prompts: P.Prompts | None
    t0: float
    timings: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    state: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # (stage, t_start, t_end) perf_counter seconds


_DONE = object()


class GpuScheduler:
    """Segments many images with overlapped stages on a device (see the module doc).

    backend: any ``engine.base.Backend``; a ``device_resident`` one (torch) keeps the embedding
      and the mask logits on its device.
    settings: ``pipeline.SegmentSettings``; queue_size: images buffered between stages.
    post_device: torch device of the label assembly (default: the backend's device when it is
      a CUDA device, else CUDA when available, else the CPU).
    """

    STAGES = ("prepare", "front", "back", "post")

    def __init__(
        self,
        backend: Backend,
        settings: P.SegmentSettings,
        queue_size: int = 2,
        post_device: str | None = None,
        keep_logits: bool = False,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.backend, self.settings, self.queue_size = backend, settings, queue_size
        dev = str(getattr(backend, "device", "cpu"))
        if post_device is not None:
            self.post_device = torch.device(post_device)
        elif dev.startswith("cuda") or not torch.cuda.is_available():
            self.post_device = torch.device(dev if dev.startswith("cuda") else "cpu")
        else:
            self.post_device = torch.device("cuda")
        self.device_resident = bool(getattr(backend, "device_resident", False))
        self.keep_logits = keep_logits

    # -- public --------------------------------------------------------------------------------
    def run(
        self,
        sources: Iterable,
        prompts=None,
        settings: P.SegmentSettings | None = None,
        max_in_flight: int | None = None,
    ) -> Iterator[ItemResult]:
        """One ``ItemResult`` per source, in input order (sources and prompts as
        ``scheduler.CpuScheduler.run``; ``max_in_flight`` is accepted for that signature and not
        used: this scheduler's bound is ``queue_size`` images per stage).
        Closing the iterator early stops the worker threads."""
        settings = settings or self.settings
        stop = threading.Event()
        q_pre: queue.Queue = queue.Queue(self.queue_size)
        q_front: queue.Queue = queue.Queue(self.queue_size)
        q_back: queue.Queue = queue.Queue(self.queue_size)
        q_out: queue.Queue = queue.Queue()
        prompt_it = prompt_stream(prompts)

        def feed():
            for i, src in enumerate(sources):
                if stop.is_set():
                    break
                yield _Item(i, src, next(prompt_it), time.perf_counter())

        stages = [
            ("prepare", feed(), q_pre, False),
            ("front", q_pre, q_front, True),
            ("back", q_front, q_back, True),
            ("post", q_back, q_out, False),
        ]
        threads = [
            threading.Thread(
                target=self._worker, name=f"cellsam-{name}", daemon=True, args=(name, src, sink, stop, dev, settings)
            )
            for name, src, sink, dev in stages
        ]
        for t in threads:
            t.start()
        pending: dict[int, ItemResult] = {}
        nxt = 0
        try:
            while True:
                item = q_out.get()
                if item is _DONE:
                    break
                if item.index < 0:  # the source iterator itself failed
                    raise item.error
                pending[item.index] = ItemResult(
                    item.index,
                    item.source,
                    item.state.get("result"),
                    item.error,
                    time.perf_counter() - item.t0,
                    item.timings,
                )
                while nxt in pending:
                    yield pending.pop(nxt)
                    nxt += 1
            for i in sorted(pending):
                yield pending.pop(i)
        finally:
            stop.set()
            for q in (q_pre, q_front, q_back):
                _drain(q)
            for t in threads:
                t.join(timeout=5)

    # -- threads -------------------------------------------------------------------------------
    def _stream_context(self, device_stage: bool):
        dev = torch.device(str(getattr(self.backend, "device", "cpu")))
        if device_stage and self.device_resident and dev.type == "cuda":
            torch.cuda.set_device(dev)  # per thread
            return torch.cuda.stream(torch.cuda.Stream(dev))
        return nullcontext()

    def _worker(
        self,
        stage: str,
        source,
        sink: queue.Queue,
        stop: threading.Event,
        device_stage: bool,
        settings: P.SegmentSettings,
    ) -> None:
        fn = getattr(self, f"_{stage}")
        try:
            with self._stream_context(device_stage):
                it = source if not isinstance(source, queue.Queue) else iter(source.get, _DONE)
                for item in it:
                    if stop.is_set():
                        break
                    if item.error is None and "result" not in item.state:
                        t0 = time.perf_counter()
                        try:
                            fn(item, settings)
                        except Exception as e:  # one image's failure must not stop the others
                            item.error = e
                        t1 = time.perf_counter()
                        item.timings[stage] = t1 - t0
                        item.events.append((stage, t0, t1))
                    if not _put(sink, item, stop):
                        break
        except Exception as e:  # the source iterator itself failed
            _put(sink, _Item(-1, None, None, 0.0, error=e), stop)
        finally:
            _put(sink, _DONE, stop)

    # -- stages (the pipeline's functions) -----------------------------------------------------
    def _prepare(self, item: _Item, settings: P.SegmentSettings) -> None:
        item.state["prepared"] = P.prepare(read_source(item.source), settings)

    def _front(self, item: _Item, settings: P.SegmentSettings) -> None:
        st = item.state
        prepared = st["prepared"]
        ps = P.find_prompts(self.backend, prepared, item.prompts, settings)
        if ps is None:  # automatic mode on a blank image
            st["result"] = P.empty(prepared)
            return
        embedding = P.embed(self.backend, prepared, on_device=self.device_resident) if ps.n > 0 else None
        if ps.n == 0 or embedding is None:
            st["result"] = P.empty(prepared, ps, keep_logits=self.keep_logits)
            return
        if torch.is_tensor(embedding) and embedding.is_cuda:
            # the back stage runs on another stream: it waits for this event before reading
            ready = torch.cuda.Event()
            ready.record()
            st["ready"] = ready
        st.update(embedding=embedding, prompt_set=ps)

    def _back(self, item: _Item, settings: P.SegmentSettings) -> None:
        st = item.state
        prepared, ps = st["prepared"], st["prompt_set"]
        ready = st.pop("ready", None)
        if ready is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(ready)
            st["embedding"].record_stream(stream)  # its memory is not reused before this stream is done
        args = dict(boxes=ps.boxes, points=ps.points, point_labels=ps.point_labels)
        if self.device_resident:
            lowres, iou_t = self.backend.decode(st.pop("embedding"), on_device=True, **args)
            iou = iou_t.float().cpu().numpy()
        else:
            lowres, iou = self.backend.decode(st.pop("embedding"), **args)
        keep = P.kept(iou, settings)
        lowres_t = lowres if torch.is_tensor(lowres) else torch.from_numpy(np.ascontiguousarray(lowres))
        kept_t = lowres_t[torch.as_tensor(keep, device=lowres_t.device)].to(self.post_device)
        st["labels_raw"] = assemble_labels_torch(kept_t, prepared.height, prepared.width).cpu().numpy()
        st.update(keep=keep, iou=iou)
        if self.keep_logits:
            st["lowres"] = lowres_t.cpu().numpy()

    def _post(self, item: _Item, settings: P.SegmentSettings) -> None:
        st = item.state
        st["result"] = P.finish(
            st["prepared"],
            st["prompt_set"],
            st["keep"],
            st["iou"],
            st["labels_raw"],
            settings,
            lowres=st.get("lowres"),
            keep_logits=self.keep_logits,
        )
        for k in ("prepared", "labels_raw", "lowres"):
            st.pop(k, None)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put with a timeout loop so that a stopped consumer cannot deadlock a producer."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if stop.is_set():
                return False


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
