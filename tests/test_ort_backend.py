"""The ONNX Runtime backend on the tiny export: same results as the PyTorch backend through the
pipeline, spec-driven input checks, chunking, providers and precision options."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam_trt import pipeline as P
from cellsam_trt.engine.base import Backend, BackendError
from cellsam_trt.engine.ort_backend import OrtBackend, OrtConfig, ProviderError, resolve_providers, trt_provider_options
from cellsam_trt.engine.torch_backend import TorchBackend
from cellsam_trt.pipeline import Prompts, SegmentSettings
from cellsam_trt.runtime import specs as S
from test_pipeline import cells_image

KEEP_ALL = SegmentSettings(iou_threshold=-1e9)  # the tiny random model predicts low IoUs: keep every mask


@pytest.fixture(scope="module")
def ort_backend(tiny_export):
    return OrtBackend(tiny_export, threads=2)


def test_is_a_backend(ort_backend):
    assert isinstance(ort_backend, Backend)
    assert ort_backend.adv_mode is True and ort_backend.has_detector is True
    assert ort_backend.providers == ["CPUExecutionProvider"]


def test_box_prompts_match_torch(ort_backend, tiny_model):
    img, boxes = cells_image()
    a = P.segment(
        TorchBackend(tiny_model), img, Prompts(boxes=boxes), KEEP_ALL, return_embedding=True, keep_logits=True
    )
    b = P.segment(ort_backend, img, Prompts(boxes=boxes), KEEP_ALL, return_embedding=True, keep_logits=True)
    da, db = a.details, b.details
    assert np.abs(da.embedding - db.embedding).max() <= 1e-4
    assert np.abs(da.lowres_logits - db.lowres_logits).max() <= 1e-5 * max(1.0, np.abs(da.lowres_logits).max())
    np.testing.assert_allclose(da.all_iou_predictions, db.all_iou_predictions, atol=1e-5)
    np.testing.assert_array_equal(da.prompt_index, db.prompt_index)
    assert a.n_cells > 0 and (a.labels == b.labels).mean() >= 0.999


def test_point_prompts_match_torch(ort_backend, tiny_model):
    img, boxes = cells_image(seed=1)
    pts = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :]
    a = P.segment(TorchBackend(tiny_model), img, Prompts(points=pts), KEEP_ALL, keep_logits=True)
    b = P.segment(ort_backend, img, Prompts(points=pts), KEEP_ALL, keep_logits=True)
    lr_a, lr_b = a.details.lowres_logits, b.details.lowres_logits
    assert np.abs(lr_a - lr_b).max() <= 1e-5 * max(1.0, np.abs(lr_a).max())
    assert a.n_cells > 0 and (a.labels == b.labels).mean() >= 0.999


def test_automatic_mode_matches_torch(ort_backend, tiny_model):
    img, _ = cells_image(seed=2)
    a = P.segment(TorchBackend(tiny_model), img, keep_logits=True)
    b = P.segment(ort_backend, img, keep_logits=True)
    for x, y in zip(a.details.detections, b.details.detections, strict=True):
        assert np.abs(x - y).max() <= 1e-4
    assert a.details.threshold == pytest.approx(b.details.threshold, abs=1e-6)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_decode_chunks_equal_one_call(tiny_export):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    xy = rng.uniform(0, 900, (23, 2))
    boxes = np.concatenate([xy, xy + 40], 1).astype(np.float32)
    lr1, iou1 = OrtBackend(tiny_export, decode_chunk=5).decode(emb, boxes=boxes)
    lr2, iou2 = OrtBackend(tiny_export, decode_chunk=64).decode(emb, boxes=boxes)
    assert lr1.shape == (23, 256, 256) and iou1.shape == (23,)
    assert np.abs(lr1 - lr2).max() <= 1e-4 and np.abs(iou1 - iou2).max() <= 1e-6
    lr0, iou0 = OrtBackend(tiny_export).decode(emb, boxes=np.zeros((0, 4), np.float32))
    assert lr0.shape == (0, 256, 256) and iou0.shape == (0,)


def test_split_decoder_is_the_cpu_default_and_equals_the_whole_decoder(tiny_export):
    """On the CPU the decoder runs as prompt_context (once per call) + context_decoder (one prompt
    per call); its outputs equal the whole prompt_decoder's for boxes, points and both."""
    split, whole = OrtBackend(tiny_export), OrtBackend(tiny_export, split_decoder=False)
    assert split.split_decoder and split.decode_chunk == 1
    assert not whole.split_decoder and whole.decode_chunk == 16
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    xy = rng.uniform(0, 900, (6, 2))
    boxes = np.concatenate([xy, xy + 60], 1).astype(np.float32)
    pts = rng.uniform(0, 1000, (6, 3, 2)).astype(np.float32)
    lab = rng.integers(0, 2, (6, 3))
    for kw in (
        {"boxes": boxes},
        {"points": pts, "point_labels": lab},
        {"boxes": boxes, "points": pts[:, :1], "point_labels": lab[:, :1]},
    ):
        a, b = split.decode(emb, **kw), whole.decode(emb, **kw)
        assert a[0].shape == (6, 256, 256)
        assert np.abs(a[0] - b[0]).max() <= 1e-5 * max(1.0, np.abs(b[0]).max())
        assert np.abs(a[1] - b[1]).max() <= 1e-5
    assert set(whole._runners) == {(S.DECODER, None)}  # one runner (session) per graph used
    assert (S.PROMPT_CONTEXT, None) in split._runners and not any(g == S.DECODER for g, _ in split._runners)
    lr, _ = OrtBackend(tiny_export, decode_chunk=4).decode(emb, boxes=boxes)
    assert np.abs(lr - split.decode(emb, boxes=boxes)[0]).max() <= 1e-5 * max(1.0, np.abs(lr).max())


def test_decode_streams_keep_prompt_order_and_values(tiny_export):
    """2 single-threaded context_decoder sessions take alternate prompts; the result is in prompt
    order and equals one stream's; one prompt runs on the main session."""
    two = OrtBackend(tiny_export, threads=2, decode_streams=2)
    one = OrtBackend(tiny_export, threads=2, decode_streams=1)
    assert two.decode_streams == 2 and two._stream_threads == 1 and one.decode_streams == 1
    assert OrtBackend(tiny_export, threads=2).decode_streams == 2  # the CPU default
    assert OrtBackend(tiny_export, threads=1).decode_streams == 1
    assert OrtBackend(tiny_export, threads=2, split_decoder=False).decode_streams == 1
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    xy = rng.uniform(0, 900, (7, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 90, (7, 2))], 1).astype(np.float32)
    a, b = two.decode(emb, boxes=boxes), one.decode(emb, boxes=boxes)
    tol = 1e-6 * max(1.0, float(np.abs(b[0]).max()))  # 1 vs 2 intra-op threads: same arithmetic
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=tol)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-6)
    assert {(S.CONTEXT_DECODER, 0), (S.CONTEXT_DECODER, 1)} <= set(two._runners)
    import onnxruntime as ort

    for stream in (0, 1):  # each stream its own single-threaded InferenceSession
        r = two.runner(S.CONTEXT_DECODER, stream)
        assert isinstance(r.session, ort.InferenceSession)
        assert r.session.get_session_options().intra_op_num_threads == 1
    assert two.runner(S.CONTEXT_DECODER, 0).session is not two.runner(S.CONTEXT_DECODER, 1).session
    for i in range(7):  # prompt order: each row is that box decoded alone
        np.testing.assert_allclose(a[0][i], one.decode(emb, boxes=boxes[i : i + 1])[0][0], rtol=0, atol=tol)
    with pytest.raises(S.InputSpecError):  # bad prompts are refused before any stream runs
        two.decode(emb, points=np.zeros((3, 40, 2), np.float32))
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("cellsam-decode")]  # none outlive a call
    two.close()
    assert not two._runners
    np.testing.assert_allclose(two.decode(emb, boxes=boxes)[0], b[0], rtol=0, atol=tol)


def test_an_export_without_the_split_decoder_still_runs(tiny_export, tmp_path):
    """A format-1 export (no prompt_context / context_decoder) runs the whole decoder."""
    import json

    from cellsam_trt.runtime.manifest import MANIFEST

    manifest = json.loads((tiny_export / MANIFEST).read_text())
    for name in S.CONTEXT_GRAPHS:
        del manifest["models"][name]
    manifest["format_version"] = 1
    for entry in manifest["models"].values():
        for f in [entry["file"]] + ([entry["int8"]["file"]] if "int8" in entry else []):
            (tmp_path / f).symlink_to(tiny_export / f)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    old = OrtBackend(tmp_path)
    assert not old.split_decoder and old.decode_chunk == 16
    emb = np.random.default_rng(5).standard_normal((1, 256, 64, 64)).astype(np.float32)
    boxes = np.array([[100, 100, 180, 170], [400, 500, 460, 590]], np.float32)
    a, b = old.decode(emb, boxes=boxes), OrtBackend(tiny_export).decode(emb, boxes=boxes)
    assert np.abs(a[0] - b[0]).max() <= 1e-5 * max(1.0, np.abs(b[0]).max())
    with pytest.raises(BackendError, match="no split decoder"):
        OrtBackend(tmp_path, split_decoder=True)


def test_image_batches_beyond_the_spec_are_split(tiny_export):
    be = OrtBackend(tiny_export)
    max_b = be.specs[S.CELLFINDER].dims()["B"].max
    x = np.random.default_rng(1).standard_normal((max_b + 1, 3, 1024, 1024)).astype(np.float32)
    logits, boxes = be.detect(x)
    assert logits.shape[0] == max_b + 1
    l1, b1 = be.detect(x[-1:])
    assert np.abs(logits[-1:] - l1).max() <= 1e-5 and np.abs(boxes[-1:] - b1).max() <= 1e-6


def test_inputs_are_checked_against_the_spec(ort_backend):
    with pytest.raises(S.InputSpecError, match="image_embeddings") as e:
        ort_backend.decode(np.zeros((1, 256, 32, 32), np.float32), boxes=np.zeros((2, 4), np.float32))
    assert e.value.input == "image_embeddings"
    with pytest.raises(S.InputSpecError) as e:
        ort_backend.decode(np.zeros((1, 256, 64, 64), np.float32), points=np.zeros((2, 40, 2), np.float32))
    assert e.value.input == "point_coords" and "outside [1, 16]" in str(e.value)
    with pytest.raises(S.InputSpecError) as e:
        ort_backend.encode(np.zeros((1, 3, 512, 512), np.float32))
    assert e.value.input == "image" and e.value.model == S.ENCODER


def test_int8_precision_runs_and_agrees_roughly(tiny_export):
    fp = OrtBackend(tiny_export)
    q = OrtBackend(tiny_export, precision="int8")
    assert q._file(S.ENCODER).name.endswith(".int8.onnx") and q._file(S.DECODER).name == "prompt_decoder.onnx"
    x = np.random.default_rng(2).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    a, b = fp.encode(x), q.encode(x)
    assert a.shape == b.shape and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    with pytest.raises(BackendError, match="fp32, fp16, bf16, int8, not 'fp8'"):
        OrtBackend(tiny_export, precision="fp8")
    # annotated FP16 / BF16 graphs run only through the TensorRT provider, never silently as FP32
    for p in ("fp16", "bf16"):
        with pytest.raises(BackendError, match=f"{p} runs on ONNX Runtime only through its TensorRT execution"):
            OrtBackend(tiny_export, precision=p, providers=["cpu"])


def test_provider_resolution():
    avail = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", avail) == ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", gpu) == gpu
    assert resolve_providers(["cuda"], gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="'cuda' is not available"):
        resolve_providers(["cuda"], avail)


def test_tensorrt_profiles_come_from_the_spec():
    spec = S.model_specs()[S.DECODER]
    opts = trt_provider_options(spec, OrtConfig(trt_cache_dir="/tmp/trt"))
    b = S.Bounds()
    assert opts["trt_profile_min_shapes"] == "image_embeddings:1x256x64x64,point_coords:1x1x2,point_labels:1x1"
    assert opts["trt_profile_max_shapes"] == (
        f"image_embeddings:1x256x64x64,point_coords:{b.max_prompts}x"
        f"{b.max_points}x2,point_labels:{b.max_prompts}x{b.max_points}"
    )
    # the precision is in the graph: the provider's own FP16 / INT8 switches stay off (strongly typed)
    assert opts["trt_fp16_enable"] is False and opts["trt_int8_enable"] is False
    assert opts["trt_engine_cache_enable"] is True


def test_bad_options(tiny_export):
    with pytest.raises(TypeError, match="unknown OrtBackend option"):
        OrtBackend(tiny_export, nonsense=1)
    with pytest.raises(ValueError, match="graph_optimization"):
        OrtBackend(tiny_export, graph_optimization="max")
