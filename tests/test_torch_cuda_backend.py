"""The PyTorch fast path (autocast FP16/BF16, SDPA, CUDA graphs) on the tiny model.

On the CPU: SDPA in FP32 equals the eager reference; BF16 label maps agree with FP32 by
matched-instance IoU; the caller's model is not modified. CUDA tests are marked ``gpu`` and
skipped without a CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsam_trt.engine.torch_backend import TorchBackend
from cellsam_trt.engine.torch_cuda_backend import TorchCudaBackend
from cellsam_trt.metrics import match_instances
from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.model.checkpoint import load_state_dict
from cellsam_trt.model.synthetic import synthetic_state_dict
from cellsam_trt.pipeline import CellSAMPipeline, SegmentSettings

from conftest import record
from test_pipeline import cells_image

TINY = CellSAMConfig.tiny()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_state_dict(synthetic_state_dict(0, TINY), cfg=TINY)
    return model




def _scaled(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def test_sdpa_fp32_equals_eager(tiny_model):
    ref = TorchBackend(tiny_model)
    fast = TorchCudaBackend(tiny_model, device="cpu", dtype="float32", sdpa=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    e_ref, e_fast = ref.encode(x), fast.encode(x)
    assert _scaled(e_fast, e_ref) < 1e-5
    xy = rng.uniform(0, 900, (23, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 120, (23, 2))], 1).astype(np.float32)
    l_ref, i_ref = ref.decode(e_ref, boxes=boxes)
    l_fast, i_fast = fast.decode(e_ref, boxes=boxes)
    assert _scaled(l_fast, l_ref) < 1e-5 and _scaled(i_fast, i_ref) < 1e-5
    pts = rng.uniform(0, 1000, (5, 3, 2)).astype(np.float32)
    lab = rng.integers(-1, 2, (5, 3))
    a, _ = ref.decode(e_ref, points=pts, point_labels=lab)
    b, _ = fast.decode(e_ref, points=pts, point_labels=lab)
    assert _scaled(b, a) < 1e-5
    d_ref, d_fast = ref.detect(x), fast.detect(x)
    assert _scaled(d_fast[0], d_ref[0]) < 1e-5 and _scaled(d_fast[1], d_ref[1]) < 1e-5
    record("torch_sdpa_fp32_vs_eager", embedding=_scaled(e_fast, e_ref), lowres=_scaled(l_fast, l_ref))


@pytest.mark.parametrize("dtype, floor", [
    ("bfloat16", 0.9),
    pytest.param("float16", 0.95, marks=pytest.mark.slow),  # CPU fp16 matmuls are emulated: ~1 min
])
def test_reduced_precision_labels_agree_with_fp32(tiny_model, dtype, floor):
    """BF16 / FP16 (autocast with FP32 islands) vs FP32 label maps on box prompts, judged by
    matched-instance IoU, on the CPU (torch runs bf16 and fp16 autocast there).

    The synthetic tiny model predicts low IoUs, so the IoU filter is off to keep every mask;
    it also makes fragments of a few pixels, whose IoU is decided by single pixels: the
    figure asserted ignores instances under 50 pixels, the one for all instances is recorded.
    """
    keep_all = SegmentSettings(iou_threshold=-1e9)
    ref = CellSAMPipeline(TorchBackend(tiny_model), keep_all)
    fast = CellSAMPipeline(TorchCudaBackend(tiny_model, device="cpu", dtype=dtype), keep_all)
    figs = {"mean_iou": [], "frac_matched": [], "mean_iou_all": [], "frac_matched_all": []}
    for seed in (0, 1):
        img, boxes = cells_image(seed)
        a = ref.segment(img, boxes=boxes)
        b = fast.segment(img, boxes=boxes)
        assert a.labels_raw.any()
        m = match_instances(a.labels_raw, b.labels_raw, min_area=50)
        m_all = match_instances(a.labels_raw, b.labels_raw)
        for k, attr in (("mean_iou", "mean_iou"), ("frac_matched", "frac_matched_50")):
            figs[k].append(getattr(m, attr))
            figs[k + "_all"].append(getattr(m_all, attr))
    record(f"{dtype}_vs_fp32_tiny_cpu", **{k: min(v) for k, v in figs.items()})
    assert min(figs["mean_iou"]) > floor and min(figs["frac_matched"]) == 1.0


def test_caller_model_is_not_modified(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    forwards = {n: m.forward for n, m in tiny_model.named_modules()}
    TorchCudaBackend(tiny_model, device="cpu", dtype="bfloat16")
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(v.dtype == before[k].dtype for k, v in tiny_model.state_dict().items())
    # no instance-level forward was installed on the caller's modules
    assert all("forward" not in vars(m) for m in tiny_model.modules())
    assert set(forwards) == {n for n, _ in tiny_model.named_modules()}


def test_fp32_islands_under_reduced_precision(tiny_model):
    b = TorchCudaBackend(tiny_model, device="cpu", dtype="bfloat16")
    ln = b.model.mask_sam.image_encoder.blocks[0].norm1
    with torch.no_grad(), b.autocast():
        y = ln(torch.randn(1, 4, 4, ln.normalized_shape[0], dtype=torch.bfloat16))
        pe = b.model.mask_sam.prompt_encoder.pe_layer.encode(torch.rand(3, 2))
        head = b.model.finder.transformer.class_embed(torch.randn(2, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.float32 and pe.dtype == torch.float32 and head.dtype == torch.float32
    with torch.no_grad(), b.autocast():
        mm = b.model.mask_sam.image_encoder.blocks[0].attn.qkv(torch.randn(2, 64))
    assert mm.dtype == torch.bfloat16  # the matmuls do run in BF16


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="dtype"):
        TorchCudaBackend(tiny_model, device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            TorchCudaBackend(tiny_model, device="cuda")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_reduced_precision_and_graphs(tiny_model, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no BF16")
    keep_all = SegmentSettings(iou_threshold=-1e9)
    ref = CellSAMPipeline(TorchBackend(tiny_model, device="cuda"), keep_all)
    fast_backend = TorchCudaBackend(tiny_model, device="cuda", dtype=dtype, cuda_graphs=True)
    fast = CellSAMPipeline(fast_backend, keep_all)
    img, boxes = cells_image(0)
    a = ref.segment(img, boxes=boxes)
    b = fast.segment(img, boxes=boxes)
    c = fast.segment(img, boxes=boxes)  # CUDA-graph replay
    np.testing.assert_array_equal(b.labels, c.labels)
    m = match_instances(a.labels_raw, b.labels_raw)
    assert m.mean_iou > 0.9 and m.frac_matched_50 >= 0.9
