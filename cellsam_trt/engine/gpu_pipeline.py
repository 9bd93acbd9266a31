"""Overlapped multi-image pipeline and mask post-processing on the device.

``GpuPipeline(backend).run(images)`` segments a stream of images with four stages in their
own threads, joined by bounded queues (``queue_size`` images in flight between stages):

    preprocess (CPU) -> front: CellFinder + image encoder (GPU) -> back: mask decoder + label
    assembly (GPU) -> post: hole filling, small-object removal, result (CPU)

so the encoder and CellFinder of image i+1 run while the decoder of image i and the CPU work
of images i-1 / i+2 proceed. On a CUDA torch backend each GPU stage thread issues its work
on its own CUDA stream; the TensorRT backend has a stream per engine. Results come back in
input order as ``ImageResult``; an image that fails (unreadable file, bad prompts, a backend
error) yields an ``ImageResult`` with ``error`` set and the other images go on.

Label assembly on the device (``assemble_labels_torch``): the kept masks' low-res logits are
upsampled bilinearly (align_corners=False) 256 -> 1024 -> H x W, thresholded at sigmoid > 0.4
and combined so that a later mask wins an overlap (label = the largest 1-based index of the
masks covering a pixel); only the (H, W) int32 label map crosses to the host. It equals
``cellsam_trt.labels.assemble_labels`` except where an interpolated logit lies within float
rounding (~1e-5) of the threshold. Works on CPU tensors too.

The stage logic mirrors ``CellSAMPipeline.segment_prepared`` (official thresholds, dynamic
threshold, IoU filter, post-processing); ``tests/test_gpu_pipeline.py`` checks that both give
the same results.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import labels as label_ops
from .. import preprocess as pre
from .. import prompts as prompt_ops
from ..pipeline import CellSAMPipeline, Segmentation, SegmentSettings, _empty

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


# --------------------------------------------------------------------------- results


@dataclass
class ImageResult:
    """One image's outcome: ``result`` (a ``Segmentation``) or ``error`` (the exception), the
    input's position and name, and seconds spent per stage ("preprocess", "front", "back",
    "post"), and the (stage, start, end) ``time.perf_counter`` intervals."""

    index: int
    name: str | None
    result: Segmentation | None = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)
    events: list = field(default_factory=list, repr=False)  # (stage, start, end) perf_counter seconds

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Item:
    index: int
    name: str | None
    source: Any
    prompts: dict | None
    timings: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    state: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # (stage, t_start, t_end), for tests / profiling


_DONE = object()


class GpuPipeline:
    """Segments many images with overlapped stages (see the module doc).

    backend: any ``engine.base.Backend``; with ``encode_tensor`` / ``decode_tensors`` (the
      torch CUDA backend) the embedding and the mask logits stay on the device.
    settings: ``pipeline.SegmentSettings`` (the official defaults).
    queue_size: images buffered between consecutive stages.
    post_device: torch device of the label assembly (default: the backend's torch device,
      else CUDA when available, else CPU); post_on_device=False uses the NumPy assembly.
    """

    STAGES = ("preprocess", "front", "back", "post")

    def __init__(self, backend, settings: SegmentSettings | None = None, queue_size: int = 2,
                 post_device: str | torch.device | None = None, post_on_device: bool = True) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.backend = backend
        self.pipe = CellSAMPipeline(backend, settings)
        self.settings = self.pipe.settings
        self.queue_size = queue_size
        self.post_on_device = post_on_device
        dev = getattr(backend, "device", None)
        if post_device is not None:
            self.post_device = torch.device(post_device)
        elif isinstance(dev, torch.device):
            self.post_device = dev
        else:
            self.post_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._device_tensors = hasattr(backend, "decode_tensors") and hasattr(backend, "encode_tensor")

    # -- public --------------------------------------------------------------------------------
    def run(self, images: Iterable, prompts: Iterable[dict | None] | None = None,
            names: Sequence[str] | None = None) -> Iterator[ImageResult]:
        """Yield one ``ImageResult`` per image, in input order.

        images: arrays ((H, W) or (H, W, C)) or file paths (read with ``cellsam_trt.io``).
        prompts: per image None (automatic mode) or a dict with any of "boxes" (N, 4) XYXY,
          "points" (N, P, 2) XY and "point_labels" (N, P), in original pixels.
        names: optional display names (default: the path, or None for arrays).
        Closing the iterator early stops the worker threads.
        """
        stop = threading.Event()
        q_pre: queue.Queue = queue.Queue(self.queue_size)
        q_front: queue.Queue = queue.Queue(self.queue_size)
        q_back: queue.Queue = queue.Queue(self.queue_size)
        q_out: queue.Queue = queue.Queue()
        prompts_it = iter(prompts) if prompts is not None else None

        def feed():
            for i, src in enumerate(images):
                if stop.is_set():
                    break
                p = next(prompts_it, None) if prompts_it is not None else None
                name = names[i] if names is not None and i < len(names) else (
                    None if isinstance(src, np.ndarray) else str(src))
                yield _Item(i, name, src, p)

        threads = [
            threading.Thread(target=self._worker, name="cellsam-preprocess", daemon=True,
                             args=("preprocess", feed(), q_pre, stop, False)),
            threading.Thread(target=self._worker, name="cellsam-front", daemon=True,
                             args=("front", q_pre, q_front, stop, True)),
            threading.Thread(target=self._worker, name="cellsam-back", daemon=True,
                             args=("back", q_front, q_back, stop, True)),
            threading.Thread(target=self._worker, name="cellsam-post", daemon=True,
                             args=("post", q_back, q_out, stop, False)),
        ]
        for t in threads:
            t.start()
        pending: dict[int, ImageResult] = {}
        nxt = 0
        try:
            while True:
                item = q_out.get()
                if item is _DONE:
                    break
                pending[item.index] = ImageResult(item.index, item.name, item.state.get("result"), item.error,
                                                  item.timings, item.events)
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

    def segment_many(self, images: Iterable, prompts=None, names=None) -> list[ImageResult]:
        """``run`` collected into a list."""
        return list(self.run(images, prompts, names))

    # -- threads -------------------------------------------------------------------------------
    def _stream_context(self, gpu_stage: bool):
        dev = getattr(self.backend, "device", None)
        if gpu_stage and isinstance(dev, torch.device) and dev.type == "cuda":
            return torch.cuda.stream(torch.cuda.Stream(dev))
        return nullcontext()

    def _worker(self, stage: str, source, sink: queue.Queue, stop: threading.Event, gpu_stage: bool) -> None:
        fn = getattr(self, f"_{stage}")
        try:
            with self._stream_context(gpu_stage):
                it = source if not isinstance(source, queue.Queue) else iter(source.get, _DONE)
                for item in it:
                    if stop.is_set():
                        break
                    if item.error is None:
                        t0 = time.perf_counter()
                        try:
                            fn(item)
                        except Exception as e:  # one image's failure must not stop the others
                            item.error = e
                        t1 = time.perf_counter()
                        item.timings[stage] = t1 - t0
                        item.events.append((stage, t0, t1))
                    if not _put(sink, item, stop):
                        break
        except Exception as e:  # the source itself failed (e.g. a broken image iterator)
            _put(sink, _Item(-1, None, None, None, error=e), stop)
        finally:
            _put(sink, _DONE, stop)

    # -- stages --------------------------------------------------------------------------------
    def _preprocess(self, item: _Item) -> None:
        src = item.source
        if not isinstance(src, np.ndarray):
            from ..io import read_image

            src = read_image(src)
        norm, sq = self.pipe.preprocess(src)
        h, w = norm.shape[:2]
        item.state.update(sq=sq, h=h, w=w)
        item.source = None

    def _front(self, item: _Item) -> None:
        st = item.state
        sq, h, w = st["sq"], st["h"], st["w"]
        p = item.prompts or {}
        prompts = self.pipe.prompts_1024(sq, h, w, p.get("boxes"), p.get("points"), p.get("point_labels"))
        if prompts is None:  # automatic mode on a blank image
            st["result"] = _empty(h, w)
            return
        boxes_1024, pts, lab, scores, threshold, _ = prompts
        n = len(boxes_1024) if boxes_1024 is not None else len(pts)
        embedding = None
        if n > 0:
            try:
                enc_in = pre.sam_encoder_input(sq, self.backend.adv_mode)
            except pre.BlankImageError:
                enc_in = None
            if enc_in is not None:
                embedding = (self.backend.encode_tensor(enc_in) if self._device_tensors
                             else self.backend.encode(enc_in))
        if n == 0 or embedding is None:
            st["result"] = _empty(h, w, None, threshold)
            return
        if torch.is_tensor(embedding) and embedding.is_cuda:
            # the back stage runs on another stream: it waits for this event before reading
            ready = torch.cuda.Event()
            ready.record()
            st["ready"] = ready
        st.update(embedding=embedding, boxes_1024=boxes_1024, pts=pts, lab=lab, scores=scores, threshold=threshold)
        del st["sq"]

    def _back(self, item: _Item) -> None:
        st = item.state
        if "result" in st:
            return
        h, w = st["h"], st["w"]
        ready = st.pop("ready", None)
        if ready is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(ready)
            st["embedding"].record_stream(stream)  # its memory is not reused before this stream is done
        args = dict(boxes=st["boxes_1024"], points=st["pts"], point_labels=st["lab"])
        if self._device_tensors:
            lowres_t, iou_t = self.backend.decode_tensors(st["embedding"], **args)
            iou = iou_t.float().cpu().numpy()
            keep = np.flatnonzero(iou >= self.settings.iou_threshold)
            kept = lowres_t[torch.as_tensor(keep, device=lowres_t.device)]
            labels_raw = assemble_labels_torch(kept.to(self.post_device), h, w).cpu().numpy()
        else:
            lowres, iou = self.backend.decode(st["embedding"], **args)
            keep = np.flatnonzero(iou >= self.settings.iou_threshold)
            if self.post_on_device:
                labels_raw = assemble_labels_torch(torch.from_numpy(np.ascontiguousarray(lowres[keep])).to(
                    self.post_device), h, w).cpu().numpy()
            else:
                labels_raw = label_ops.assemble_labels(lowres[keep], h, w)
        st.update(labels_raw=labels_raw, keep=keep, iou=iou)
        del st["embedding"]

    def _post(self, item: _Item) -> None:
        st = item.state
        if "result" in st:
            return
        keep, iou, boxes_1024, scores = st["keep"], st["iou"], st["boxes_1024"], st["scores"]
        h, w = st["h"], st["w"]
        labels_raw = st["labels_raw"]
        st["result"] = Segmentation(
            labels=label_ops.fill_holes_and_remove_small_masks(labels_raw, self.settings.min_size),
            labels_raw=labels_raw,
            boxes=(prompt_ops.scale_boxes_to_image(boxes_1024[keep], h, w) if boxes_1024 is not None
                   else np.zeros((0, 4), np.float32)),
            scores=None if scores is None else scores[keep],
            iou_predictions=iou[keep],
            prompt_index=keep.astype(np.int64),
            threshold=st["threshold"],
            prompts_1024=boxes_1024,
            all_iou_predictions=iou,
        )


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
