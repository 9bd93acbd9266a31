"""The PyTorch backend (``engine.torch_backend.TorchBackend``) on the tiny model.

On the CPU: the FP32 default is the eager reference (bit-identical to the model's modules);
``Sam.decode_layout`` gives ``Sam.decode``'s results for boxes, points and both; SDPA in FP32
equals the eager model; the SDPA operands are 4-D (a fused kernel takes them); BF16 / FP16
masks agree with FP32 by matched-instance IoU; the caller's model is not modified; TF32 flags
are restored; bad requests raise ``BackendError``. CUDA tests are marked ``gpu`` and skipped
without a CUDA device.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from cellsam_trt import preprocess as pre
from cellsam_trt import prompts as prompt_ops
from cellsam_trt.engine.base import BackendError
from cellsam_trt.engine.torch_backend import TorchBackend, no_tf32
from cellsam_trt.labels import assemble_labels
from cellsam_trt.metrics import match_instances
from cellsam_trt.runtime import specs as S
from cellsam_trt.runtime.prompt_layout import prompt_tokens
from cellsam_trt.runtime.specs import InputSpecError
from conftest import record

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def cells_image(seed=0, h=200, w=240, n=12):
    """(h, w) uint8 image of n bright discs on noise and their (n, 4) XYXY boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(20, 5, (h, w))
    boxes = []
    for _ in range(n):
        cy, cx, r = int(rng.integers(15, h - 15)), int(rng.integers(15, w - 15)), int(rng.integers(6, 14))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 150
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    return np.clip(img, 0, 255).astype(np.uint8), np.array(boxes, np.float32)


def encoder_input(img, adv_mode):
    """The SAM encoder input of an image and its box prompts scaled to the model frame."""
    return pre.sam_encoder_input(pre.squashed(pre.normalize_image(pre.to_three_channels(img))), adv_mode)


def _scaled(a, b):
    a, b = (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x) for x in (a, b))
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def _prompts(seed=0, n=7, p=3):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 900, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 120, (n, 2))], 1).astype(np.float32)
    pts = rng.uniform(0, 1000, (n, p, 2)).astype(np.float32)
    lab = rng.integers(-1, 2, (n, p))
    return boxes, pts, lab


@pytest.fixture(scope="module")
def embedding(tiny_model):
    x = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    with torch.no_grad():
        return tiny_model.mask_sam.image_encoder(torch.from_numpy(x))


# --------------------------------------------------------------------------- decode_layout


@torch.no_grad()
def _both_ways(sam, emb, boxes, pts, lab):
    def t(a):
        return None if a is None else torch.from_numpy(np.asarray(a))

    a = sam.decode(emb, boxes=t(boxes), points=t(pts), labels=t(lab))
    coords, labels = prompt_tokens(boxes, pts, lab)
    b = sam.decode_layout(emb, torch.from_numpy(coords), torch.from_numpy(labels))
    tok_a = sam.prompt_encoder(boxes=t(boxes), points=t(pts), labels=t(lab))
    tok_b = sam.prompt_encoder.embed_layout(torch.from_numpy(coords), torch.from_numpy(labels))
    return a, b, tok_a, tok_b


@pytest.mark.parametrize("case", ["boxes", "points", "both"])
def test_decode_layout_equals_decode(tiny_model, embedding, case):
    boxes, pts, lab = _prompts(1)
    if case == "boxes":
        pts = lab = None
    elif case == "points":
        boxes = None
    sam = tiny_model.mask_sam
    (lr_a, iou_a), (lr_b, iou_b), tok_a, tok_b = _both_ways(sam, embedding, boxes, pts, lab)
    assert tok_a.shape == tok_b.shape and lr_a.shape == lr_b.shape == (7, 1, 256, 256)
    d_tok, d_lr, d_iou = (float((x - y).abs().max()) for x, y in ((tok_a, tok_b), (lr_a, lr_b), (iou_a, iou_b)))
    record(f"decode_layout_vs_decode_{case}", tokens=d_tok, lowres=d_lr, lowres_scaled=_scaled(lr_b, lr_a), iou=d_iou)
    assert d_tok <= 1e-5
    if case == "both":
        # points and box corners go through one (N, P + 2, 2) @ (2, 128) product here and two
        # separate ones in ``decode``: BLAS rounds a K = 2 product differently by row count (1
        # ulp in the tokens, see below), which the decoder carries to the logits' last digits
        assert _scaled(lr_b, lr_a) <= 1e-5 and d_iou <= 1e-5
    else:
        assert d_lr <= 1e-6 and d_iou <= 1e-6  # the same products: bit-identical in practice


def test_decode_layout_is_the_same_arithmetic(tiny_model, embedding):
    """With a positional encoding whose rounding does not depend on the row count (the K = 2
    product written elementwise), the layout path and ``decode`` are bit-identical for boxes,
    points and both: the tokens are the same numbers in the same order."""
    sam = copy.deepcopy(tiny_model.mask_sam)
    pe = sam.prompt_encoder.pe_layer
    g = pe.positional_encoding_gaussian_matrix

    def encode(coords):
        c = 2 * coords - 1
        c = 2 * np.pi * (c[..., :1] * g[0] + c[..., 1:] * g[1])
        return torch.cat([torch.sin(c), torch.cos(c)], dim=-1)

    pe.encode = encode
    boxes, pts, lab = _prompts(2)
    for bx, pt, lb in ((boxes, None, None), (None, pts, lab), (boxes, pts, lab)):
        (lr_a, iou_a), (lr_b, iou_b), tok_a, tok_b = _both_ways(sam, embedding, bx, pt, lb)
        assert torch.equal(tok_a, tok_b) and torch.equal(lr_a, lr_b) and torch.equal(iou_a, iou_b)


# --------------------------------------------------------------------------- FP32 reference


def test_fp32_cpu_is_the_eager_reference(tiny_model, embedding):
    b = TorchBackend(tiny_model)
    assert (b.name, b.device, b.precision, b.sdpa, b.cuda_graphs) == ("torch", "cpu", "fp32", False, False)
    assert b.device_resident and b.adv_mode == tiny_model.adv_mode and b.has_detector
    assert b.sam is tiny_model.mask_sam and b.finder is tiny_model.finder  # nothing to change: shared
    x = np.random.default_rng(3).standard_normal((2, 3, 1024, 1024)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(b.encode(x), tiny_model.mask_sam.image_encoder(torch.from_numpy(x)).numpy())
        logits, boxes_ = tiny_model.finder(torch.from_numpy(x[:1]))
    d = b.detect(x[:1])
    np.testing.assert_array_equal(d[0], logits.numpy())
    np.testing.assert_array_equal(d[1], boxes_.numpy())
    boxes, pts, lab = _prompts(4, n=23)
    emb = embedding.numpy()
    lr, iou = b.decode(emb, boxes=boxes)
    ref_lr, ref_iou = tiny_model.mask_sam.decode(embedding, boxes=torch.from_numpy(boxes))
    np.testing.assert_array_equal(lr, ref_lr[:, 0].numpy())
    np.testing.assert_array_equal(iou, ref_iou[:, 0].numpy())
    lr, _ = b.decode(emb, points=pts, point_labels=lab)
    ref_lr, _ = tiny_model.mask_sam.decode(embedding, points=torch.from_numpy(pts), labels=torch.from_numpy(lab))
    np.testing.assert_array_equal(lr, ref_lr[:, 0].numpy())


def test_chunks_on_device_results_and_empty(tiny_model, embedding):
    emb = embedding.numpy()
    boxes, _, _ = _prompts(5, n=13)
    one = TorchBackend(tiny_model, decode_chunk=1000)
    small = TorchBackend(tiny_model, decode_chunk=5)
    lr1, iou1 = one.decode(emb, boxes=boxes)
    lr5, iou5 = small.decode(emb, boxes=boxes)
    assert _scaled(lr5, lr1) <= 1e-5 and _scaled(iou5, iou1) <= 1e-5
    lr_t, iou_t = small.decode(embedding, boxes=boxes, on_device=True)
    assert torch.is_tensor(lr_t) and lr_t.dtype == torch.float32 and lr_t.shape == (13, 256, 256)
    assert iou_t.shape == (13,) and iou_t.dtype == torch.float32
    np.testing.assert_array_equal(lr_t.numpy(), lr5)
    np.testing.assert_array_equal(iou_t.numpy(), iou5)
    for emb_in in (emb, embedding):  # decode_chunks takes an array or a (device) tensor
        chunks = list(small.decode_chunks(emb_in, boxes=boxes))
        assert [len(c[1]) for c in chunks] == [5, 5, 3] and all(isinstance(c[0], np.ndarray) for c in chunks)
        np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), lr5)
    z, zi = small.decode(emb, boxes=np.zeros((0, 4), np.float32))
    assert z.shape == (0, 256, 256) and zi.shape == (0,)
    z, zi = small.decode(embedding, boxes=np.zeros((0, 4), np.float32), on_device=True)
    assert torch.is_tensor(z) and z.shape == (0, 256, 256) and zi.shape == (0,)
    x = np.random.default_rng(6).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    e_t = small.encode(x, on_device=True)
    assert torch.is_tensor(e_t) and e_t.shape == (1, 256, 64, 64) and e_t.dtype == torch.float32
    np.testing.assert_array_equal(e_t.numpy(), small.encode(x))


def test_runners_check_feeds(tiny_model, embedding):
    b = TorchBackend(tiny_model)
    r = b.runner(S.DECODER)
    coords, labels = prompt_tokens(np.array([[10, 10, 50, 50]], np.float32))
    out = r.infer_tensors({"image_embeddings": embedding, "point_coords": coords, "point_labels": labels})
    assert [tuple(o.shape) for o in out] == [(1, 1, 256, 256), (1, 1)]
    with pytest.raises(InputSpecError, match="image_embeddings"):
        r.infer_tensors({"image_embeddings": embedding[:, :8], "point_coords": coords, "point_labels": labels})
    with pytest.raises(InputSpecError, match="point_labels"):
        r.infer_tensors(
            {"image_embeddings": embedding, "point_coords": coords, "point_labels": torch.from_numpy(labels).long()}
        )
    with pytest.raises(InputSpecError, match="image"):
        b.runner(S.ENCODER).infer({"image": np.zeros((1, 3, 512, 512), np.float32)})


def test_plain_sam_has_no_cellfinder(tiny_model):
    from cellsam_trt.model.cellsam import CellSAM

    sam_only = CellSAM(tiny_model.cfg, with_model_cp=False, with_cellfinder=False)
    sam_only.model.load_state_dict(tiny_model.mask_sam.state_dict())
    b = TorchBackend(sam_only)
    assert set(b.specs) == {S.ENCODER, S.DECODER} and not b.has_detector and not b.adv_mode
    with pytest.raises(BackendError, match="no CellFinder"):
        b.detect(np.zeros((1, 3, 1024, 1024), np.float32))


# --------------------------------------------------------------------------- SDPA


def test_sdpa_fp32_equals_eager(tiny_model):
    ref = TorchBackend(tiny_model)
    fast = TorchBackend(tiny_model, sdpa=True)
    assert fast.sdpa and fast.sam is not tiny_model.mask_sam
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    e_ref, e_fast = ref.encode(x), fast.encode(x)
    assert _scaled(e_fast, e_ref) < 1e-5
    boxes, pts, lab = _prompts(0, n=23)
    l_ref, i_ref = ref.decode(e_ref, boxes=boxes)
    l_fast, i_fast = fast.decode(e_ref, boxes=boxes)
    assert _scaled(l_fast, l_ref) < 1e-5 and _scaled(i_fast, i_ref) < 1e-5
    a, _ = ref.decode(e_ref, points=pts[:5], point_labels=lab[:5])
    b, _ = fast.decode(e_ref, points=pts[:5], point_labels=lab[:5])
    assert _scaled(b, a) < 1e-5
    d_ref, d_fast = ref.detect(x), fast.detect(x)
    assert _scaled(d_fast[0], d_ref[0]) < 1e-5 and _scaled(d_fast[1], d_ref[1]) < 1e-5
    record("torch_sdpa_fp32_vs_eager", embedding=_scaled(e_fast, e_ref), lowres=_scaled(l_fast, l_ref))


def test_sdpa_operands_take_a_fused_kernel(tiny_model):
    """Restricted to the fused (flash) kernel, the SDPA model still runs: its operands are 4-D
    (B, heads, L, D), which fused kernels need (3-D operands leave only the math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = TorchBackend(tiny_model, sdpa=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        emb = fast.encode(x)
        lr, _ = fast.decode(emb, boxes=np.array([[10, 10, 100, 120]], np.float32))
    assert emb.shape == (1, 256, 64, 64) and lr.shape == (1, 256, 256)
    q = torch.randn(4, 49, 32)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(4, 49, 49))


# --------------------------------------------------------------------------- reduced precision


def _masks_and_labels(backend, img, boxes):
    h, w = img.shape
    emb = backend.encode(encoder_input(img, backend.adv_mode))
    lr, iou = backend.decode(emb, boxes=prompt_ops.scale_boxes_to_model(boxes, h, w))
    return lr, iou, assemble_labels(lr, h, w)


def _mask_iou(a, b):
    """Per prompt IoU of the low-res masks (logits > 0)."""
    ma, mb = a > 0, b > 0
    inter = (ma & mb).sum((1, 2))
    union = (ma | mb).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@pytest.mark.parametrize(
    "precision, floor",
    [
        ("bf16", 0.9),
        pytest.param("fp16", 0.95, marks=pytest.mark.slow),  # CPU fp16 convolutions are emulated: ~1 min
    ],
)
def test_reduced_precision_agrees_with_fp32(tiny_model, precision, floor):
    """BF16 / FP16 (autocast with FP32 islands, SDPA) vs the FP32 reference on box prompts, on
    the CPU (torch runs bf16 and fp16 autocast there): the low-res masks (logits > 0) by IoU per
    prompt, and the label maps (``assemble_labels``, every mask kept) by matched-instance IoU.

    The synthetic tiny model makes fragments of a few pixels, whose IoU is decided by single
    pixels: the asserted label figure ignores instances under 50 pixels, the one for all
    instances is recorded. One image (CPU BF16 convolutions are slow without native BF16)."""
    ref = TorchBackend(tiny_model)
    fast = TorchBackend(tiny_model, precision=precision)
    assert fast.reduced and fast.sdpa and fast.precision == precision
    img, boxes = cells_image(0, n=16)
    lr_a, iou_a, lab_a = _masks_and_labels(ref, img, boxes)
    lr_b, iou_b, lab_b = _masks_and_labels(fast, img, boxes)
    assert lr_b.dtype == np.float32 and iou_b.dtype == np.float32 and lab_a.any()
    mask_iou = _mask_iou(lr_a, lr_b)
    m = match_instances(lab_a, lab_b, min_area=50)
    m_all = match_instances(lab_a, lab_b)
    record(
        f"{precision}_vs_fp32_tiny_cpu",
        mask_iou_mean=mask_iou.mean(),
        mask_iou_min=mask_iou.min(),
        mean_iou=m.mean_iou,
        frac_matched=m.frac_matched_50,
        mean_iou_all=m_all.mean_iou,
        frac_matched_all=m_all.frac_matched_50,
        iou_pred_maxabs=np.abs(iou_a - iou_b).max(),
    )
    assert mask_iou.mean() > floor
    assert m.mean_iou > floor and m.frac_matched_50 == 1.0


def test_caller_model_is_not_modified(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    forwards = {n: m.forward for n, m in tiny_model.named_modules()}
    b = TorchBackend(tiny_model, precision="bf16")
    assert b.sam is not tiny_model.mask_sam and b.finder is not tiny_model.finder
    TorchBackend(tiny_model, sdpa=True)
    TorchBackend(tiny_model)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(v.dtype == before[k].dtype for k, v in tiny_model.state_dict().items())
    # no instance-level forward / encode was installed on the caller's modules
    assert all("forward" not in vars(m) and "encode" not in vars(m) for m in tiny_model.modules())
    assert set(forwards) == {n for n, _ in tiny_model.named_modules()}


def test_fp32_islands_under_reduced_precision(tiny_model):
    b = TorchBackend(tiny_model, precision="bf16")
    ln = b.sam.image_encoder.blocks[0].norm1
    with torch.no_grad(), b.autocast():
        y = ln(torch.randn(1, 4, 4, ln.normalized_shape[0], dtype=torch.bfloat16))
        pe = b.sam.prompt_encoder.pe_layer.encode(torch.rand(3, 2))
        head = b.finder.transformer.class_embed(torch.randn(2, 256, dtype=torch.bfloat16))
        box = b.finder.transformer.bbox_embed(torch.randn(2, 256, dtype=torch.bfloat16))
        gn = b.finder.input_proj[0][1]
        g = gn(torch.randn(1, gn.num_channels, 4, 4, dtype=torch.bfloat16))
        ln2d = b.sam.image_encoder.neck[1](torch.randn(1, 256, 4, 4, dtype=torch.bfloat16))
        mm = b.sam.image_encoder.blocks[0].attn.qkv(torch.randn(2, 64))
    assert y.dtype == pe.dtype == head.dtype == box.dtype == g.dtype == ln2d.dtype == torch.float32
    assert mm.dtype == torch.bfloat16  # the matmuls do run in BF16


# --------------------------------------------------------------------------- errors, TF32


def test_bad_arguments(tiny_model):
    with pytest.raises(BackendError, match="ort backend.*trt backend"):
        TorchBackend(tiny_model, precision="int8")
    with pytest.raises(BackendError, match="fp32, fp16 or bf16"):
        TorchBackend(tiny_model, precision="fp8")
    with pytest.raises(BackendError, match="'cpu' or 'cuda"):
        TorchBackend(tiny_model, device="mps")
    with pytest.raises(ValueError, match="decode_chunk"):
        TorchBackend(tiny_model, decode_chunk=0)
    if not torch.cuda.is_available():
        for dev in ("cuda", "cuda:1"):
            with pytest.raises(BackendError, match="no CUDA device") as e:
                TorchBackend(tiny_model, device=dev)
            assert "\n" not in str(e.value)


def _tf32_flags():
    b = torch.backends
    return b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision


def test_no_tf32_context_restores_the_callers_flags():
    """``no_tf32`` (around every CUDA call) turns TF32 off and restores the caller's settings
    exactly, also when calls overlap on several threads. The flags are settable without CUDA."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = _tf32_flags()
    b = torch.backends
    try:
        b.cuda.matmul.fp32_precision = "tf32"
        before = _tf32_flags()
        with no_tf32():
            assert _tf32_flags() == ("ieee", "ieee", "ieee")
            with no_tf32():
                assert _tf32_flags() == ("ieee", "ieee", "ieee")
            assert _tf32_flags() == ("ieee", "ieee", "ieee")
        assert _tf32_flags() == before
        inside, go = threading.Barrier(4), threading.Event()
        seen = []

        def call():
            with no_tf32():
                inside.wait()
                go.wait()
                seen.append(_tf32_flags())

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        inside.wait()
        go.set()
        for t in threads:
            t.join()
        assert seen == [("ieee", "ieee", "ieee")] * 3 and _tf32_flags() == before
    finally:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved


# --------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.gpu
def test_cuda_fp32_matches_cpu_without_tf32(tiny_model):
    cpu = TorchBackend(tiny_model)
    b = torch.backends
    saved = b.cuda.matmul.fp32_precision
    try:
        b.cuda.matmul.fp32_precision = "tf32"  # the backend must not use it, and must restore it
        gpu = TorchBackend(tiny_model, device="cuda")
        assert gpu.cuda_graphs and gpu.sdpa and gpu.device.startswith("cuda:")
        img, boxes = cells_image(0)
        lr_c, iou_c, _ = _masks_and_labels(cpu, img, boxes)
        lr_g, iou_g, _ = _masks_and_labels(gpu, img, boxes)
        assert b.cuda.matmul.fp32_precision == "tf32"
    finally:
        b.cuda.matmul.fp32_precision = saved
    record("torch_cuda_fp32_vs_cpu", lowres=_scaled(lr_g, lr_c), iou=_scaled(iou_g, iou_c))
    assert _scaled(lr_g, lr_c) < 1e-3 and _scaled(iou_g, iou_c) < 1e-3


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision, floor", [("fp16", 0.95), ("bf16", 0.9)])
def test_cuda_reduced_precision_and_graphs(tiny_model, precision, floor):
    if precision == "bf16":
        try:
            TorchBackend(tiny_model, device="cuda", precision="bf16")
        except BackendError as e:
            pytest.skip(str(e))
    ref = TorchBackend(tiny_model, device="cuda")
    fast = TorchBackend(tiny_model, device="cuda", precision=precision, cuda_graphs=True)
    img, boxes = cells_image(0)
    x = encoder_input(img, fast.adv_mode)
    lr_a, iou_a, lab_a = _masks_and_labels(ref, img, boxes)
    lr_b, iou_b, lab_b = _masks_and_labels(fast, img, boxes)
    e1, e2 = fast.encode(x), fast.encode(x)  # CUDA-graph replays
    eager = fast.runner(S.ENCODER).infer_tensors({"image": x}, eager=True)[0].cpu().numpy()
    np.testing.assert_array_equal(e1, e2)
    assert _scaled(e1, eager) < 1e-3
    # the label maps are at the image's resolution; fragments smaller than half the smallest
    # cell of the image are the random model's, decided by single pixels whatever the device
    r_min = float((boxes[:, 2] - boxes[:, 0]).min()) / 2
    min_area = int(np.pi * r_min**2 / 2)
    m = match_instances(lab_a, lab_b, min_area=min_area)
    m_all = match_instances(lab_a, lab_b)
    mask_iou = _mask_iou(lr_a, lr_b)
    record(
        f"{precision}_vs_fp32_tiny_cuda",
        min_area=min_area,
        mask_iou_mean=mask_iou.mean(),
        mean_iou=m.mean_iou,
        frac_matched=m.frac_matched_50,
        mean_iou_all=m_all.mean_iou,
        frac_matched_all=m_all.frac_matched_50,
    )
    assert mask_iou.mean() > floor
    assert m.mean_iou > floor and m.frac_matched_50 >= 0.9


@needs_cuda
@pytest.mark.gpu
def test_cuda_on_device_results(tiny_model):
    b = TorchBackend(tiny_model, device="cuda", precision="fp16")
    img, boxes = cells_image(1)
    h, w = img.shape
    x = encoder_input(img, b.adv_mode)
    emb = b.encode(x, on_device=True)
    assert emb.is_cuda and emb.dtype == torch.float32 and emb.shape == (1, 256, 64, 64)
    lr, iou = b.decode(emb, boxes=prompt_ops.scale_boxes_to_model(boxes, h, w), on_device=True)
    assert lr.is_cuda and lr.dtype == torch.float32 and lr.shape == (len(boxes), 256, 256)
    assert iou.is_cuda and iou.shape == (len(boxes),)
    lr_np, iou_np = b.decode(emb.cpu().numpy(), boxes=prompt_ops.scale_boxes_to_model(boxes, h, w))
    np.testing.assert_array_equal(lr.cpu().numpy(), lr_np)
