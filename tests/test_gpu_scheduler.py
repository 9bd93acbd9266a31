"""Device label assembly and the GPU scheduler (``cellsam_trt.gpu_scheduler``), on the CPU.

* ``assemble_labels_torch`` equals ``labels.assemble_labels`` on random logits, except at
  pixels where an interpolated logit is within 1e-5 of the threshold;
* ``GpuScheduler`` returns results in input order with per-stage timings, overlaps the encoder
  of image i+1 with the decoder of image i, isolates a failing image, stops its threads when
  closed early, and gives the same results as the sequential pipeline (``pipeline.segment``)
  and the CPU scheduler (``scheduler.CpuScheduler``) with the torch backend on the CPU device
  (tiny model), for box, point and automatic prompts with a failing image in the middle.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cellsam_trt import pipeline as P
from cellsam_trt.engine.torch_backend import TorchBackend
from cellsam_trt.gpu_scheduler import GpuScheduler, assemble_labels_torch, upsample_logits
from cellsam_trt.labels import assemble_labels
from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.model.checkpoint import load_state_dict
from cellsam_trt.model.synthetic import synthetic_state_dict
from cellsam_trt.pipeline import Prompts, SegmentSettings
from cellsam_trt.scheduler import CpuScheduler, ItemResult
from test_pipeline import cells_image

TINY = CellSAMConfig.tiny()
THRESHOLD_LOGIT = math.log(0.4 / 0.6)
GPU_STAGES = {"prepare", "front", "back", "post"}


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_state_dict(synthetic_state_dict(0, TINY), cfg=TINY)
    return model


def random_logits(k, seed):
    """Smooth blobs (like mask logits) plus fine noise, around the threshold."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.standard_normal((k, 256, 256)), sigma=(0, 6, 6))
    x = x / x.std() * 8 - 2 + 0.3 * rng.standard_normal((k, 256, 256))
    return x.astype(np.float32)


def near_threshold(logits, h, w, tol=1e-5):
    """Pixels where some mask's interpolated logit (float64 reference) is within tol of the threshold."""
    up = upsample_logits(torch.from_numpy(logits).double(), h, w).numpy()
    return (np.abs(up - THRESHOLD_LOGIT) < tol).any(0)


@pytest.mark.parametrize("h, w, k", [(97, 131, 6), (300, 417, 5), (1024, 1024, 3), (1300, 900, 2), (256, 256, 4)])
def test_device_assembly_equals_numpy(h, w, k):
    logits = random_logits(k, seed=h + w)
    want = assemble_labels(logits, h, w)
    got = assemble_labels_torch(torch.from_numpy(logits), h, w).numpy()
    assert got.dtype == np.int32 and got.shape == (h, w)
    diff = got != want
    assert not (diff & ~near_threshold(logits, h, w)).any(), f"{diff.sum()} pixels differ away from the threshold"
    assert want.any() and (want == 0).any()  # the case is not trivial
    # chunking does not change the result (later masks still win across chunks)
    small = assemble_labels_torch(torch.from_numpy(logits), h, w, max_bytes=1).numpy()
    np.testing.assert_array_equal(small, got)


def test_device_assembly_later_mask_wins_and_empty():
    big = np.full((1, 256, 256), 10.0, np.float32)
    box = np.full((1, 256, 256), -10.0, np.float32)
    box[0, 100:150, 100:150] = 10.0
    lab = assemble_labels_torch(torch.from_numpy(np.concatenate([big, box])), 64, 64).numpy()
    assert set(np.unique(lab)) == {1, 2} and (lab == 2).sum() > 0
    np.testing.assert_array_equal(lab, assemble_labels(np.concatenate([big, box]), 64, 64))
    z = assemble_labels_torch(torch.zeros((0, 256, 256)), 10, 12)
    assert z.shape == (10, 12) and not z.any()


# --------------------------------------------------------------------------- scheduling


class SlowBackend:
    """A fake backend (host arrays only) whose stages take a fixed time and record when they ran."""

    name = "slow"
    adv_mode = False
    has_detector = False
    device = "cpu"
    device_resident = False

    def __init__(self, delay=0.15, fail_on_decode_call=None):
        self.delay = delay
        self.log = []
        self.lock = threading.Lock()
        self.fail_on = fail_on_decode_call
        self.decode_calls = 0

    def _mark(self, what, t0):
        with self.lock:
            self.log.append((what, t0, time.perf_counter()))

    def encode(self, image):
        t0 = time.perf_counter()
        time.sleep(self.delay)
        self._mark("encode", t0)
        return np.full((1, 256, 64, 64), float(image.mean()), np.float32)

    def detect(self, image):
        raise AssertionError("not used")

    def decode(self, embedding, boxes=None, points=None, point_labels=None):
        t0 = time.perf_counter()
        self.decode_calls += 1
        if self.fail_on is not None and self.decode_calls == self.fail_on:
            raise RuntimeError("decoder exploded")
        time.sleep(self.delay)
        n = len(boxes)
        logits = np.full((n, 256, 256), -10.0, np.float32)
        for i, b in enumerate(boxes):
            x0, y0, x1, y1 = (np.asarray(b) / 4).astype(int)
            logits[i, y0:y1, x0:x1] = 10.0
        self._mark("decode", t0)
        return logits, np.ones(n, np.float32)


def blob_image(seed, h=120, w=140):
    rng = np.random.default_rng(seed)
    img = rng.normal(10, 2, (h, w))
    img[30:60, 40:90] += 100
    return img.astype(np.float32)


def host_seconds(image):
    """Seconds of the host work of one image's front stage (prepare + encoder input)."""
    from cellsam_trt import preprocess as pre

    t0 = time.perf_counter()
    pre.sam_encoder_input(P.prepare(image, SegmentSettings()).squashed, False)
    return time.perf_counter() - t0


def test_results_in_order_with_overlap():
    images = [blob_image(i, 100 + 10 * i, 120) for i in range(5)]
    # the fake device stages must outlast the host work of a stage for the overlap to be visible
    # (~0.02 s on an idle core, seconds on a loaded 2-core machine)
    be = SlowBackend(delay=min(3.0, max(0.15, 2 * host_seconds(images[0]))))
    prompts = [Prompts(boxes=[[40, 30, 90, 60]]) for _ in images]
    gs = GpuScheduler(be, SegmentSettings(), queue_size=2, post_device="cpu")
    assert not gs.device_resident and gs.post_device == torch.device("cpu")
    results = list(gs.run(images, prompts))
    assert all(isinstance(r, ItemResult) for r in results)
    assert [r.index for r in results] == list(range(5))
    assert all(r.ok for r in results), [r.error for r in results]
    for r, img in zip(results, images):
        assert r.source is img
        assert r.segmentation.labels.shape == img.shape and r.segmentation.labels.max() == 1
        assert set(r.timings) == GPU_STAGES
        assert all(t >= 0 for t in r.timings.values()) and sum(r.timings.values()) <= r.seconds + 1e-6
        assert r.timings["front"] >= be.delay * 0.9 and r.timings["back"] >= be.delay * 0.9  # encode / decode
    enc = sorted((t0, t1) for w, t0, t1 in be.log if w == "encode")
    dec = sorted((t0, t1) for w, t0, t1 in be.log if w == "decode")
    # the encoder of image i+1 runs while the decoder of image i runs
    overlaps = sum(1 for i in range(4) if enc[i + 1][0] < dec[i][1] and dec[i][0] < enc[i + 1][1])
    assert overlaps >= 3, (enc, dec)


def test_one_failing_image_does_not_stop_the_others(tmp_path):
    be = SlowBackend(delay=0.01, fail_on_decode_call=2)
    missing = tmp_path / "missing.tif"
    np.save(tmp_path / "ok.npy", blob_image(9))
    images = [
        blob_image(0),
        str(missing),
        blob_image(1),
        np.full((5, 5, 7), 1.0),
        blob_image(2),
        str(tmp_path / "ok.npy"),
        blob_image(3),
    ]
    prompts = [Prompts(boxes=[[40, 30, 90, 60]])] * 7
    prompts = list(prompts)
    prompts[4] = Prompts(boxes=[[1, 2, 3]])  # bad prompts
    results = list(GpuScheduler(be, SegmentSettings(), post_device="cpu").run(images, prompts))
    assert [r.index for r in results] == list(range(7))
    assert results[1].source == str(missing) and "missing.tif" in str(results[1].error)
    assert "decoder exploded" in str(results[2].error)  # the 2nd decode call is image 2
    assert "3 channels" in str(results[3].error)
    assert "XYXY" in str(results[4].error)
    assert [i for i, r in enumerate(results) if r.ok] == [0, 5, 6]
    assert all(r.segmentation is None for r in results if not r.ok)
    assert results[5].segmentation.labels.shape == (120, 140)
    # a failed image has the timings of the stages it went through, up to the one that failed
    assert set(results[1].timings) == {"prepare"} and set(results[3].timings) == {"prepare"}
    assert set(results[4].timings) == {"prepare", "front"}
    assert set(results[2].timings) == {"prepare", "front", "back"}


def test_closing_early_stops_the_workers():
    be = SlowBackend(delay=0.02)
    gen = GpuScheduler(be, SegmentSettings(), queue_size=1, post_device="cpu").run(
        (blob_image(i) for i in range(50)), (Prompts(boxes=[[40, 30, 90, 60]]) for _ in range(50))
    )
    first = next(gen)
    assert first.index == 0 and first.ok
    gen.close()
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name.startswith("cellsam-")]
    assert be.decode_calls < 50


# --------------------------------------------------------------------------- faithfulness


def _same(a, b, exact=True):
    if exact:
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.details.labels_raw, b.details.labels_raw)
        np.testing.assert_array_equal(a.details.label_sources, b.details.label_sources)
    np.testing.assert_array_equal(a.details.prompt_index, b.details.prompt_index)
    np.testing.assert_allclose(a.iou_predictions, b.iou_predictions, atol=1e-5)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
    assert (a.details.threshold is None) == (b.details.threshold is None)
    if a.details.threshold is not None:
        assert a.details.threshold == pytest.approx(b.details.threshold, abs=1e-6)
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None:
        np.testing.assert_allclose(a.scores, b.scores)


def _cases():
    """Images and prompts: boxes, points (with a background point), automatic mode, a failing
    image in the middle (NaN pixels), more boxes, and a blank image (boxes and automatic)."""
    imgs = [cells_image(s, h, w) for s, h, w in ((0, 200, 240), (1, 150, 300), (2, 256, 256))]
    (img0, b0), (img1, b1), (img2, b2) = imgs
    centres = ((b1[:, :2] + b1[:, 2:]) / 2)[:, None, :]
    pts = np.concatenate([centres, np.broadcast_to([[[2.0, 2.0]]], centres.shape)], 1)  # + a background point
    bad = img0.astype(np.float32)
    bad[5, 5] = np.nan
    images = [img0, img1, cells_image(3)[0], bad, img2, np.zeros((50, 60), np.uint8), np.zeros((40, 30), np.uint8)]
    prompts = [
        Prompts(boxes=b0),
        Prompts(points=pts, point_labels=np.tile([1, 0], (len(pts), 1))),
        None,
        Prompts(boxes=b0),
        Prompts(boxes=b2),
        Prompts(boxes=[[1, 1, 10, 10]]),
        None,
    ]
    return images, prompts, 3


def test_same_results_as_the_sequential_pipeline_and_the_cpu_scheduler(tiny_model):
    settings = SegmentSettings(iou_threshold=-1e9)  # keep every mask of the synthetic model
    backend = TorchBackend(tiny_model)
    images, prompts, failing = _cases()
    gs = GpuScheduler(backend, settings, post_device="cpu", keep_logits=True)
    assert gs.device_resident and gs.post_device == torch.device("cpu")  # embedding and logits as tensors
    got = list(gs.run(images, prompts))
    cpu = list(CpuScheduler(backend, settings).run(images, prompts))  # the default path: logits not kept
    for results, stages in ((got, GPU_STAGES), (cpu, {"prepare", "model"})):
        assert [r.index for r in results] == list(range(len(images)))
        assert all(r.source is img for r, img in zip(results, images))
        assert [i for i, r in enumerate(results) if not r.ok] == [failing], [r.error for r in results]
        assert isinstance(results[failing].error, ValueError) and "NaN" in str(results[failing].error)
        assert results[failing].segmentation is None
        for r in results:
            assert all(t >= 0 for t in r.timings.values()) and sum(r.timings.values()) <= r.seconds + 1e-6
            if r.ok and r.segmentation.details.prompt_index.size:  # went through every stage
                assert set(r.timings) == stages, r.timings
    assert set(got[failing].timings) == {"prepare"}
    assert set(got[-1].timings) == {"prepare", "front"}  # blank, automatic: the result is known after front
    for i, (img, p) in enumerate(zip(images, prompts)):
        if i == failing:
            with pytest.raises(ValueError, match="NaN"):
                P.segment(backend, img, p, settings, keep_logits=True)
            continue
        want = P.segment(backend, img, p, settings, keep_logits=True)
        for r in (got[i], cpu[i]):
            _same(r.segmentation, want)
        assert cpu[i].segmentation.details.lowres_logits is None
        if want.details.lowres_logits is not None:  # the same decoder outputs, kept on the device
            np.testing.assert_array_equal(got[i].segmentation.details.lowres_logits, want.details.lowres_logits)
    assert got[0].segmentation.n_cells > 0 and got[1].segmentation.n_cells > 0 and got[4].segmentation.n_cells > 0
    assert got[1].segmentation.boxes.shape == (0, 4)  # point prompts
    assert len(got[1].segmentation.details.all_iou_predictions) == len(prompts[1].points)
    assert got[2].segmentation.details.threshold is not None  # automatic mode ran CellFinder
    assert got[2].segmentation.details.detections is not None
    assert not got[5].segmentation.labels.any() and got[5].segmentation.labels.shape == (50, 60)  # blank image
    assert not got[6].segmentation.labels.any() and got[6].segmentation.labels.shape == (40, 30)


def test_device_tensor_path_matches(tiny_model):
    """The torch backend with SDPA attentions (the fast path) keeps embedding and logits as
    tensors through the scheduler; it matches the eager FP32 reference."""
    settings = SegmentSettings(iou_threshold=-1e9)
    ref = TorchBackend(tiny_model)
    fast = TorchBackend(tiny_model, device="cpu", precision="fp32", sdpa=True)
    gs = GpuScheduler(fast, settings)
    assert gs.post_device == torch.device("cpu") and gs.device_resident
    img, boxes = cells_image(4)
    (r,) = gs.run([img], [Prompts(boxes=boxes)])
    assert r.ok, r.error
    want = P.segment(ref, img, Prompts(boxes=boxes), settings)
    _same(r.segmentation, want, exact=False)
    from cellsam_trt.metrics import match_instances

    m = match_instances(want.details.labels_raw, r.segmentation.details.labels_raw)
    assert m.mean_iou > 0.99 and m.frac_matched_50 == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_scheduler(tiny_model):
    settings = SegmentSettings(iou_threshold=-1e9)
    fast = TorchBackend(tiny_model, device="cuda", precision="fp32")
    ref = TorchBackend(tiny_model)
    images = [cells_image(s) for s in range(3)]
    gs = GpuScheduler(fast, settings)
    assert gs.post_device.type == "cuda" and gs.device_resident
    got = list(gs.run([i for i, _ in images], [Prompts(boxes=b) for _, b in images]))
    from cellsam_trt.metrics import match_instances

    assert [r.index for r in got] == [0, 1, 2]
    for (img, b), r in zip(images, got):
        assert r.ok, r.error
        assert set(r.timings) == GPU_STAGES
        m = match_instances(
            P.segment(ref, img, Prompts(boxes=b), settings).details.labels_raw, r.segmentation.details.labels_raw
        )
        assert m.mean_iou > 0.99
