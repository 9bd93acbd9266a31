"""Device label assembly and the overlapped multi-image pipeline, on the CPU.

* ``assemble_labels_torch`` equals ``labels.assemble_labels`` on random logits, except at
  pixels where an interpolated logit is within 1e-5 of the threshold;
* ``GpuPipeline`` returns results in input order, overlaps the encoder of image i+1 with the
  decoder of image i, isolates a failing image, and gives the same results as
  ``CellSAMPipeline`` (torch CPU backend of the tiny model).
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cellsam_trt.engine.gpu_pipeline import GpuPipeline, assemble_labels_torch, upsample_logits
from cellsam_trt.engine.torch_backend import TorchBackend
from cellsam_trt.engine.torch_cuda_backend import TorchCudaBackend
from cellsam_trt.labels import assemble_labels
from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.model.checkpoint import load_state_dict
from cellsam_trt.model.synthetic import synthetic_state_dict
from cellsam_trt.pipeline import CellSAMPipeline, SegmentSettings
from test_pipeline import cells_image

TINY = CellSAMConfig.tiny()
THRESHOLD_LOGIT = math.log(0.4 / 0.6)


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
    """A fake backend whose stages take a fixed time and record when they ran."""

    name = "slow"
    adv_mode = False
    has_detector = False

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


def test_results_in_order_with_overlap():
    be = SlowBackend()
    images = [blob_image(i, 100 + 10 * i, 120) for i in range(5)]
    prompts = [{"boxes": [[40, 30, 90, 60]]} for _ in images]
    gp = GpuPipeline(be, queue_size=2, post_device="cpu")
    results = gp.segment_many(images, prompts)
    assert [r.index for r in results] == list(range(5))
    assert all(r.ok for r in results), [r.error for r in results]
    for r, img in zip(results, images):
        assert r.result.labels.shape == img.shape and r.result.labels.max() == 1
        assert set(r.timings) == {"preprocess", "front", "back", "post"}
    enc = sorted((t0, t1) for w, t0, t1 in be.log if w == "encode")
    dec = sorted((t0, t1) for w, t0, t1 in be.log if w == "decode")
    # the encoder of image i+1 runs while the decoder of image i runs
    overlaps = sum(1 for i in range(4) if enc[i + 1][0] < dec[i][1] and dec[i][0] < enc[i + 1][1])
    assert overlaps >= 3, (enc, dec)


def test_one_failing_image_does_not_stop_the_others(tmp_path):
    be = SlowBackend(delay=0.01, fail_on_decode_call=2)
    missing = tmp_path / "missing.tif"
    np.save(tmp_path / "ok.npy", blob_image(9))
    images = [blob_image(0), str(missing), blob_image(1), np.full((5, 5, 7), 1.0), blob_image(2),
              str(tmp_path / "ok.npy"), blob_image(3)]
    prompts = [{"boxes": [[40, 30, 90, 60]]}] * 7
    prompts = list(prompts)
    prompts[4] = {"boxes": [[1, 2, 3]]}  # bad prompts
    results = list(GpuPipeline(be, post_device="cpu").run(images, prompts))
    assert [r.index for r in results] == list(range(7))
    assert results[1].name == str(missing) and "missing.tif" in str(results[1].error)
    assert "decoder exploded" in str(results[2].error)  # the 2nd decode call is image 2
    assert "3 channels" in str(results[3].error)
    assert "XYXY" in str(results[4].error)
    assert [i for i, r in enumerate(results) if r.ok] == [0, 5, 6]
    assert results[5].result.labels.shape == (120, 140)


def test_closing_early_stops_the_workers():
    be = SlowBackend(delay=0.02)
    gen = GpuPipeline(be, queue_size=1, post_device="cpu").run(
        (blob_image(i) for i in range(50)), ({"boxes": [[40, 30, 90, 60]]} for _ in range(50)))
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
        np.testing.assert_array_equal(a.labels_raw, b.labels_raw)
    np.testing.assert_array_equal(a.prompt_index, b.prompt_index)
    np.testing.assert_allclose(a.iou_predictions, b.iou_predictions, atol=1e-5)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
    assert (a.threshold is None) == (b.threshold is None)
    if a.scores is not None:
        np.testing.assert_allclose(a.scores, b.scores)


@pytest.mark.parametrize("post_on_device", [False, True])
def test_same_results_as_the_sequential_pipeline(tiny_model, post_on_device):
    settings = SegmentSettings(iou_threshold=-1e9)  # keep every mask of the synthetic model
    backend = TorchBackend(tiny_model)
    seq = CellSAMPipeline(backend, settings, keep_logits=True)
    imgs = [cells_image(s, h, w) for s, h, w in ((0, 200, 240), (1, 150, 300), (2, 256, 256))]
    images = [i for i, _ in imgs] + [cells_image(3)[0], np.zeros((50, 60), np.uint8)]
    prompts = [{"boxes": b} for _, b in imgs] + [None, {"boxes": [[1, 1, 10, 10]]}]
    got = GpuPipeline(backend, settings, post_device="cpu", post_on_device=post_on_device).segment_many(images, prompts)
    assert all(r.ok for r in got), [r.error for r in got]
    for img, p, r in zip(images, prompts, got):
        want = seq.segment(img, **(p or {}))
        _same(r.result, want, exact=not post_on_device)
        if post_on_device and want.lowres_logits is not None:
            h, w = img.shape
            diff = r.result.labels_raw != want.labels_raw
            kept = want.lowres_logits[want.prompt_index]
            assert not (diff & ~near_threshold(kept, h, w)).any()
    assert got[3].result.threshold is not None  # automatic mode ran CellFinder
    assert not got[4].result.labels.any()  # blank image


def test_device_tensor_path_matches(tiny_model):
    """The torch fast backend keeps embedding and logits as tensors through the pipeline."""
    settings = SegmentSettings(iou_threshold=-1e9)
    ref = CellSAMPipeline(TorchBackend(tiny_model), settings)
    fast = TorchCudaBackend(tiny_model, device="cpu", dtype="float32")
    gp = GpuPipeline(fast, settings)
    assert gp.post_device == torch.device("cpu") and gp._device_tensors
    img, boxes = cells_image(4)
    (r,) = gp.segment_many([img], [{"boxes": boxes}])
    want = ref.segment(img, boxes=boxes)
    _same(r.result, want, exact=False)
    from cellsam_trt.metrics import match_instances

    m = match_instances(want.labels_raw, r.result.labels_raw)
    assert m.mean_iou > 0.99 and m.frac_matched_50 == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_pipeline(tiny_model):
    settings = SegmentSettings(iou_threshold=-1e9)
    fast = TorchCudaBackend(tiny_model, device="cuda", dtype="float32")
    ref = CellSAMPipeline(TorchBackend(tiny_model), settings)
    images = [cells_image(s) for s in range(3)]
    got = GpuPipeline(fast, settings).segment_many([i for i, _ in images], [{"boxes": b} for _, b in images])
    from cellsam_trt.metrics import match_instances

    for (img, b), r in zip(images, got):
        m = match_instances(ref.segment(img, boxes=b).labels_raw, r.result.labels_raw)
        assert m.mean_iou > 0.99
