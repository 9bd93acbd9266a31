"""One small base for every inference backend: a runner per graph, and the shared work.

A backend runs the exported graphs (``runtime.specs``); it knows nothing of images, thresholds
or label maps (that is ``cellsam_trt.pipeline``). A backend file implements two things:

* ``make_runner(graph, stream)`` -> a ``Runner`` for one graph, whose ``infer_impl(feeds)`` runs
  it: feeds {input name: NumPy array} -> outputs in the spec's order, NumPy on the host.
* optionally ``on_device_runner`` support (``device_resident``: ``encode`` / ``decode`` can leave
  their results on the device for the GPU scheduler).

The base does the rest once for all backends: inputs checked against the graph's spec in
``Runner.infer`` (``InputSpecError`` names the input), batching of the image graphs up to the
spec's largest batch, the decoder's prompt layout (``runtime.prompt_layout``) and its chunking,
the split decoder (``prompt_context`` once per image, then ``context_decoder`` per chunk) where
a backend asks for it, and a lock per runner: one graph runs one call at a time, different
graphs (the encoder of one image and the decoder of another) run concurrently.

Arrays cross the boundary as NumPy float32, in the 1024 x 1024 model frame:

* ``encode``: (B, 3, 1024, 1024) SAM encoder input -> (B, 256, 64, 64) image embedding.
* ``detect``: (B, 3, 1024, 1024) CellFinder input -> pred_logits (B, Q, 2), pred_boxes (B, Q, 4)
  as (cx, cy, w, h) in [0, 1].
* ``decode``: one embedding (1, 256, 64, 64) and N prompts -> low-res mask logits
  (N, 256, 256) and IoU predictions (N,). Boxes (N, 4) XYXY, points (N, P, 2) XY with labels
  (N, P) (1 foreground, 0 background, -1 padding).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import numpy as np

from ..runtime import specs as S
from ..runtime.prompt_layout import prompt_tokens

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class BackendError(RuntimeError):
    """A backend that cannot be made as asked (missing library, device, graph or precision)."""


class Runner:
    """One graph of a backend. ``infer`` checks the feeds against ``spec`` and runs ``infer_impl``
    under the runner's lock (one call at a time per runner)."""

    def __init__(self, spec: S.ModelSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """{input name: array} -> the outputs (NumPy) in ``spec.output_names`` order."""
        self.spec.check_inputs(feeds)
        with self.lock:
            return self.infer_impl(feeds)

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the runner holds (sessions, engines, buffers)."""


class Backend:
    """The shared part of every backend (see the module doc).

    Subclasses set ``name``, ``precision``, ``device`` ("cpu", "cuda:0", ...), ``adv_mode``,
    ``specs`` ({graph: ModelSpec} of the graphs they can run) and ``decode_chunk`` (prompts per
    decoder call), and implement ``make_runner``. ``split_decoder``: run ``prompt_context`` once
    per ``decode`` and ``context_decoder`` per chunk instead of ``prompt_decoder``;
    ``decode_streams``: context-decoder runners the chunks of one ``decode`` are spread over
    (each its own runner, so they run concurrently).
    """

    name = "base"
    precision = "fp32"
    device = "cpu"
    adv_mode = True
    device_resident = False  # encode / decode can return device arrays (``on_device=True``)
    split_decoder = False
    decode_streams = 1
    decode_chunk = 16

    def __init__(self, specs: Mapping[str, S.ModelSpec]) -> None:
        self.specs = dict(specs)
        self._runners: dict[tuple[str, int | None], Runner] = {}
        self._runners_lock = threading.Lock()

    # -- runners -------------------------------------------------------------------------------
    @property
    def has_detector(self) -> bool:
        return S.CELLFINDER in self.specs

    def make_runner(self, graph: str, stream: int | None) -> Runner:
        """A new runner of ``graph`` (``stream`` i: the i-th decode stream's own runner)."""
        raise NotImplementedError

    def runner(self, graph: str, stream: int | None = None) -> Runner:
        """The runner of ``graph`` (made on first use, then reused)."""
        key = (graph, stream)
        r = self._runners.get(key)
        if r is not None:
            return r
        if graph not in self.specs:
            raise BackendError(f"{self.name}: this model has no {graph} graph")
        with self._runners_lock:
            if key not in self._runners:
                self._runners[key] = self.make_runner(graph, stream)
            return self._runners[key]

    def warmup(self) -> None:
        """Make every runner now (sessions built, engines loaded) instead of on first use."""
        for g in (S.ENCODER, S.CELLFINDER) if self.has_detector else (S.ENCODER,):
            self.runner(g)
        for g, stream in self._decoder_runner_keys():
            self.runner(g, stream)

    def _decoder_runner_keys(self) -> list[tuple[str, int | None]]:
        if not self.split_decoder:
            return [(S.DECODER, None)]
        streams = [None] if self.decode_streams <= 1 else list(range(self.decode_streams))
        return [(S.PROMPT_CONTEXT, None)] + [(S.CONTEXT_DECODER, s) for s in streams]

    def close(self) -> None:
        """Release every runner (they are made again on the next call)."""
        with self._runners_lock:
            runners, self._runners = list(self._runners.values()), {}
        for r in runners:
            r.close()

    # -- image graphs --------------------------------------------------------------------------
    def _batched(self, graph: str, image: np.ndarray) -> list[np.ndarray]:
        """Run an image graph on (B, 3, 1024, 1024) in calls of at most the spec's largest batch."""
        spec = self.specs.get(graph)
        if spec is None:
            raise BackendError(f"{self.name}: this model has no {graph} graph")
        x = np.ascontiguousarray(image, dtype=np.float32)
        b = spec.inputs[0].shape[0]
        max_b = b.max if isinstance(b, S.Dim) else b
        runner = self.runner(graph)
        name = spec.input_names[0]
        if x.ndim != 4 or x.shape[0] <= max_b:
            return runner.infer({name: x})
        parts = [runner.infer({name: x[s : s + max_b]}) for s in range(0, x.shape[0], max_b)]
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    def encode(self, image: np.ndarray) -> np.ndarray:
        """(B, 3, 1024, 1024) float32 SAM input -> (B, 256, 64, 64) float32 embedding."""
        return self._batched(S.ENCODER, image)[0]

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, 1024, 1024) float32 CellFinder input -> pred_logits (B, Q, 2), pred_boxes (B, Q, 4)."""
        if not self.has_detector:
            raise BackendError("this model has no CellFinder (plain SAM): give box or point prompts")
        logits, boxes = self._batched(S.CELLFINDER, image)
        return logits, boxes

    # -- decoder -------------------------------------------------------------------------------
    def decode(self, embedding, boxes=None, points=None, point_labels=None) -> tuple[np.ndarray, np.ndarray]:
        """One embedding (1, 256, 64, 64) and N prompts (1024 frame) -> low-res logits
        (N, 256, 256) float32 and IoU predictions (N,) float32, in prompt order."""
        parts = list(self.decode_chunks(embedding, boxes, points, point_labels))
        if not parts:
            return np.zeros((0, 256, 256), np.float32), np.zeros((0,), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def decode_chunks(
        self, embedding, boxes=None, points=None, point_labels=None, chunk: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``decode`` as a stream of (logits (n, 256, 256), IoU (n,)) for consecutive chunks of
        at most ``chunk`` prompts (default ``decode_chunk``), in prompt order."""
        coords, labels = prompt_tokens(boxes, points, point_labels)
        n = coords.shape[0]
        if n == 0:
            return
        emb = np.ascontiguousarray(embedding, dtype=np.float32)
        self.specs[S.DECODER].check_inputs(
            {"image_embeddings": emb, "point_coords": coords[:1], "point_labels": labels[:1]}
        )
        if self.split_decoder:
            graph = S.CONTEXT_DECODER
            context = self.runner(S.PROMPT_CONTEXT).infer({"image_embeddings": emb})
            base = dict(zip(self.specs[graph].input_names, context, strict=False))
        else:
            graph, base = S.DECODER, {"image_embeddings": emb}
        step = min(chunk or self.decode_chunk, self.specs[graph].dims()["N"].max)
        starts = list(range(0, n, step))

        def run(s: int, stream: int | None) -> tuple[np.ndarray, np.ndarray]:
            lr, iou = self.runner(graph, stream).infer(
                {**base, "point_coords": coords[s : s + step], "point_labels": labels[s : s + step]}
            )
            return lr[:, 0], iou[:, 0]

        streams = min(self.decode_streams, len(starts)) if self.split_decoder else 1
        if streams <= 1:
            for s in starts:
                yield run(s, None)
            return
        yield from _over_streams(run, starts, streams)


def _over_streams(run, starts: list[int], streams: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run chunk ``starts`` on ``streams`` threads (stream k takes chunks k, k + streams, ...),
    yielding results in chunk order; the threads live for this call only."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(streams, thread_name_prefix="cellsam-decode") as pool:
        window = streams * 2
        futures = {}
        for i, s in enumerate(starts):
            futures[i] = pool.submit(run, s, i % streams)
            if i >= window:
                yield futures.pop(i - window).result()
        for i in sorted(futures):
            yield futures[i].result()
