"""The front door, ``from cellsam_trt import CellSAM``: load, segment, prompt once / segment many,
``segment_many`` (input order, per-image errors, bounded in-flight work, per-graph locks),
thread safety, channels as a library setting, and the load rules (``api.resolve``)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cellsam_trt import CellSAM, Channels, LoadError, Prompts, SegmentSettings, api
from cellsam_trt import pipeline as P
from cellsam_trt.runtime import specs as S
from test_pipeline import cells_image

KEEP_ALL = SegmentSettings(iou_threshold=-1e9)  # the tiny random model predicts low IoUs: keep every mask


@pytest.fixture(scope="module")
def model(tiny_export):
    with CellSAM.load(tiny_export, settings=KEEP_ALL, threads=2) as m:
        yield m


def test_load_picks_the_cpu_default_for_an_export(model, tiny_export):
    d = model.description
    default = "openvino" if api._has("openvino") else "ort"  # OpenVINO where installed (api.resolve)
    assert (d["backend"], d["device"], d["precision"], d["scheduler"]) == (default, "cpu", "fp32", "cpu")
    assert "export directory" in d["reason"] and d["model"] == str(tiny_export)


def test_segment_equals_the_pipeline_stages(model):
    img, boxes = cells_image()
    res = model.segment(img, boxes=boxes)
    ref = P.segment(model.backend, img, Prompts(boxes=boxes), KEEP_ALL)
    np.testing.assert_array_equal(res.labels, ref.labels)
    assert res.n_cells > 0 and res.boxes.shape == (len(boxes), 4) and res.iou_predictions.shape == (len(boxes),)
    assert res.scores is None and res.details.prompt_index.tolist() == list(range(len(boxes)))


def test_prompt_embeds_once_and_segments_many(model):
    img, boxes = cells_image(seed=3)
    calls = []
    real = model.backend.encode
    model.backend.encode = lambda x, **k: calls.append(1) or real(x, **k)
    try:
        view = model.prompt(img)
        a = view.segment(boxes=boxes)
        b = view.segment(boxes=boxes[:3])
        c = view.segment(points=((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None])
        auto = view.segment()  # automatic mode on the embedded image
    finally:
        model.backend.encode = real
    assert len(calls) == 1  # the image was encoded once, by prompt()
    assert view.embedding.shape == (1, 256, 64, 64) and view.shape == img.shape
    np.testing.assert_array_equal(a.labels, model.segment(img, boxes=boxes).labels)
    assert b.n_cells <= 3 and c.labels.shape == img.shape
    np.testing.assert_array_equal(auto.labels, model.segment(img).labels)


def test_blank_image_prompts_to_nothing(model):
    view = model.prompt(np.zeros((50, 60), np.uint8))
    assert view.embedding is None
    res = view.segment(boxes=[[1, 1, 20, 20]])
    assert res.labels.shape == (50, 60) and not res.labels.any()
    with pytest.raises(ValueError, match="boxes must be"):
        view.segment(boxes=[[1, 2, 3]])


def test_segment_many_order_errors_and_paths(model, tmp_path):
    imgs = [cells_image(seed=s)[0] for s in range(4)]
    boxes = [cells_image(seed=s)[1] for s in range(4)]
    np.save(tmp_path / "img2.npy", imgs[2])
    sources = [imgs[0], np.full((10, 10), np.nan), tmp_path / "img2.npy", tmp_path / "missing.png", imgs[3]]
    prompts = [Prompts(boxes=boxes[0]), None, Prompts(boxes=boxes[2]), None, Prompts(boxes=boxes[3])]
    out = list(model.segment_many(sources, prompts, max_in_flight=2))
    assert [r.index for r in out] == [0, 1, 2, 3, 4]
    assert [r.ok for r in out] == [True, False, True, False, True]
    assert "NaN" in str(out[1].error) and "missing.png" in str(out[3].error)
    for r, i in ((out[0], 0), (out[2], 2), (out[4], 3)):
        np.testing.assert_array_equal(r.segmentation.labels, model.segment(imgs[i], boxes=boxes[i]).labels)
        assert set(r.timings) == {"prepare", "model"}


class _Probe:
    """Wraps a backend's runners: records how many calls of each graph run at once."""

    def __init__(self, backend, delay=0.03):
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.overlap = 0  # calls that started while another graph was running
        self.lock = threading.Lock()
        self.delay = delay
        self.backend = backend
        self.real = backend.runner

    def runner(self, graph, stream=None):
        r = self.real(graph, stream)
        probe, infer = self, r.infer_impl

        class Wrapped:
            spec = r.spec

            def infer(self, feeds):
                r.spec.check_inputs(feeds)
                with r.lock:
                    with probe.lock:
                        probe.active[graph] = probe.active.get(graph, 0) + 1
                        probe.peak[graph] = max(probe.peak.get(graph, 0), probe.active[graph])
                        if any(v for g, v in probe.active.items() if g != graph):
                            probe.overlap += 1
                    time.sleep(probe.delay)
                    try:
                        return infer(feeds)
                    finally:
                        with probe.lock:
                            probe.active[graph] -= 1

        return Wrapped()


def test_segment_many_locks_per_graph_not_globally(tiny_export):
    """One graph runs one call at a time, but different graphs of different images overlap."""
    m = CellSAM.load(tiny_export, settings=KEEP_ALL, threads=1, workers=3, max_in_flight=4)
    probe = _Probe(m.backend)
    m.backend.runner = probe.runner
    imgs = [cells_image(seed=s) for s in range(4)]
    out = list(m.segment_many([i for i, _ in imgs], [Prompts(boxes=b) for _, b in imgs]))
    assert all(r.ok for r in out)
    assert all(v == 1 for v in probe.peak.values()), probe.peak
    assert probe.overlap > 0  # e.g. one image's encoder while another's decoder runs


def test_threads_calling_segment_give_the_sequential_results(model):
    imgs = [cells_image(seed=s) for s in range(6)]
    want = [model.segment(i, boxes=b).labels for i, b in imgs]
    got: dict[int, np.ndarray] = {}
    errors = []

    def work(k):
        try:
            img, b = imgs[k]
            got[k] = model.segment(img, boxes=b).labels
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(imgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, w in enumerate(want):
        np.testing.assert_array_equal(got[k], w)


def test_channels_are_a_library_setting(tiny_export):
    img, boxes = cells_image(seed=2)
    other = np.roll(img, 4, 0)
    chw = np.stack([img, other, np.zeros_like(img)])  # (3, H, W): nuclear, whole-cell, unused
    hwc2 = np.stack([img, other], -1)
    with CellSAM.load(tiny_export, settings=KEEP_ALL, channels=Channels(nuclear=0, wholecell=1, axis=0)) as m:
        a = m.segment(chw, boxes=boxes)
        b = m.segment(hwc2, boxes=boxes, channels=Channels(axis=-1))  # per-call override
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.shape == img.shape and a.n_cells > 0


def test_warmup_close_and_reuse(tiny_export):
    m = CellSAM.load(tiny_export, settings=KEEP_ALL).warmup()
    graphs = {g for g, _ in m.backend._runners}
    assert {S.ENCODER, S.CELLFINDER, S.PROMPT_CONTEXT, S.CONTEXT_DECODER} <= graphs
    img, boxes = cells_image(seed=1)
    a = m.segment(img, boxes=boxes).labels
    m.close()
    assert not m.backend._runners
    np.testing.assert_array_equal(m.segment(img, boxes=boxes).labels, a)  # made again on use


def test_torch_backend_on_an_export_gives_the_same_labels(tiny_export):
    img, boxes = cells_image(seed=5)
    t = CellSAM.load(tiny_export, backend="torch", device="cpu", settings=KEEP_ALL)
    o = CellSAM.load(tiny_export, settings=KEEP_ALL)
    assert t.backend.name == "torch" and t.backend.adv_mode == o.backend.adv_mode
    a, b = t.segment(img, boxes=boxes), o.segment(img, boxes=boxes)
    assert a.n_cells > 0 and (a.labels == b.labels).mean() >= 0.999


# --------------------------------------------------------------------------- load rules


def test_resolve_rules(tiny_export, tmp_path):
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"x")
    # the CPU default: OpenVINO where installed, else ONNX Runtime
    cpu_default = "openvino" if api._has("openvino") else "ort"
    c = api.resolve(tiny_export)
    assert (c.kind, c.backend, c.device, c.precision, c.scheduler) == ("export", cpu_default, "cpu", "fp32", "cpu")
    c = api.resolve(ck, device="cpu")
    assert (c.kind, c.backend) == ("checkpoint", cpu_default) and "exported once" in c.reason
    c = api.resolve(ck, backend="torch", device="cpu", precision="bf16")
    assert (c.backend, c.precision, c.scheduler) == ("torch", "bf16", "cpu")
    c = api.resolve(ck, device="cpu", precision="bf16")  # no native bf16 for the CPU default: torch, said so
    if cpu_default == "openvino" and api._openvino_precision_problem("bf16") is None:
        assert c.backend == "openvino" and c.precision == "bf16"
    else:
        assert c.backend == "torch" and "bf16 on the CPU" in c.reason
    for kwargs, message in [
        (dict(backend="tflite"), "backend must be one of"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(backend="trt"), "backend trt needs an engine directory"),
        (dict(backend="ort", precision="bf16"), "ONNX Runtime on the CPU runs fp32 or int8"),
        (dict(device="gpu"), "device must be"),
    ]:
        with pytest.raises(LoadError, match=message):
            api.resolve(tiny_export, **kwargs)
    with pytest.raises(LoadError, match="no such model"):
        api.resolve(tmp_path / "nothing")
    with pytest.raises(LoadError, match="neither an export directory"):
        api.resolve(tmp_path)


def test_ort_reduced_precision_on_a_gpu_is_the_tensorrt_provider(tiny_export, tmp_path):
    """backend ort on a CUDA device: fp16 / bf16 / int8 are the export's annotated graphs on
    ONNX Runtime's TensorRT provider; this CPU onnxruntime has none, and the load says so."""
    c = api.resolve(tiny_export, backend="ort", device="cuda", precision="fp16")
    assert (c.backend, c.device, c.precision) == ("ort", "cuda:0", "fp16") and "TensorRT provider" in c.reason
    c = api.resolve(tiny_export, backend="ort", device="cuda")
    assert (c.backend, c.precision) == ("ort", "fp32") and "TensorRT" not in c.reason
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"x")
    with pytest.raises(LoadError, match="--precision bf16"):
        api.resolve(ck, backend="ort", device="cuda", precision="bf16")
    with pytest.raises(LoadError, match="TensorrtExecutionProvider|TensorRT"):
        CellSAM.load(tiny_export, backend="ort", device="cuda", precision="fp16")


def test_cuda_requests_without_cuda_are_refused(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "cuda_available", lambda: False)
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"x")
    with pytest.raises(LoadError, match="no CUDA device"):
        api.resolve(ck, device="cuda")
    assert api.resolve(ck).device == "cpu"  # auto: the CPU, said so in the reason
    monkeypatch.setattr(api, "cuda_available", lambda: True)
    c = api.resolve(ck)
    assert (c.backend, c.device, c.scheduler) == ("torch", "cuda:0", "gpu")


def test_engine_directories_run_on_tensorrt_only(tmp_path):
    from cellsam_trt.runtime import engine_file as EF

    d = tmp_path / "engines"
    d.mkdir()
    EF.write_engine_file(d / "image_encoder.engine", {"model": S.ENCODER, "precision": "fp16"}, b"plan")
    c = api.resolve(d)
    assert (c.kind, c.backend, c.device, c.precision) == ("engines", "trt", "cuda:0", "fp16")
    with pytest.raises(LoadError, match="built for fp16, not fp32"):
        api.resolve(d, precision="fp32")
    with pytest.raises(LoadError, match="run on backend trt, not ort"):
        api.resolve(d, backend="ort")
    with pytest.raises(LoadError, match="not the CPU"):
        api.resolve(d, device="cpu")
