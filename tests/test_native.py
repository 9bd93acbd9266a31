"""The native post-processing (cellsam_trt._native) against the NumPy/SciPy implementations
(cellsam_trt._postprocess_numpy, re-exported by reference_postprocess), which define the
semantics and are the fallback where the extension is not built.

* interpolation: ``upsample_logits`` is bit-identical to the NumPy arithmetic;
* label assembly: identical to a full-frame oracle with the same threshold (this checks the
  "compute only where a mask can be on" logic exactly) and to the NumPy implementation (which
  computes on bounding rectangles); and equal to a NumPy-float32-sigmoid route except where the
  deciding mask's logit lies within 1e-5 of the threshold logit (float32 sigmoids differ by a
  few float32 steps there);
* hole filling, with and without the label sources: identical to the SciPy loop on every input;
* link_labels_by_iou: constructed cases, a brute-force Python matcher and the NumPy version;
* golden: the official label maps.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_postprocess as ref
from cellsam_trt import _native
from cellsam_trt import labels as label_ops
from conftest import BOX_CASES, load_golden, record

THR_EXACT = math.log(0.4 / 0.6)
NEAR = 1e-5  # disagreements with another float32 sigmoid must lie this close to the threshold logit
T = np.float32(_native.LOGIT_THRESHOLD)
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- helpers
def blobs(rng, n, size=256, noise=2.0):
    """n masks of noisy discs (hot inside, about -12 outside)."""
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, size, size), -12.0, np.float32)
    for i in range(n):
        cy, cx, r = int(rng.integers(0, size)), int(rng.integers(0, size)), int(rng.integers(2, 40))
        out[i] += (24.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) + rng.normal(0, noise, (size, size))).astype(
            np.float32
        )
    return out


def oracle_labels(lowres, h, w):
    """Every pixel of every mask interpolated (NumPy), on = logit >= the native threshold."""
    out = np.zeros((h, w), np.int32)
    for k, lg in enumerate(lowres):
        out[ref.upsample_logits(lg, h, w) >= T] = k + 1
    return out


def numpy_sigmoid_labels(lowres, h, w):
    """Every pixel of every mask interpolated, on = NumPy's float32 sigmoid > 0.4 (the former
    reference; not correctly rounded, it flips a few float32 steps above the threshold logit)."""
    out = np.zeros((h, w), np.int32)
    for k, lg in enumerate(lowres):
        up = ref.upsample_logits(lg, h, w)
        out[np.float32(1) / (np.float32(1) + np.exp(-up, dtype=np.float32)) > np.float32(0.4)] = k + 1
    return out


def assert_equals_reference(ours, lowres, h, w):
    """Identical to the NumPy implementation (the fallback)."""
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(ours, ref.assemble_labels(lowres, h, w))


def assert_labels_match_reference(ours, theirs, lowres, h, w):
    """Equal, except where the deciding mask's interpolated logit is within NEAR of the threshold."""
    diff = ours != theirs
    deciding = np.maximum(ours, theirs)[diff] - 1
    ys, xs = np.nonzero(diff)
    for k in np.unique(deciding):
        sel = deciding == k
        v = ref.upsample_logits(lowres[k], h, w)[ys[sel], xs[sel]].astype(np.float64)
        assert np.abs(v - THR_EXACT).max() <= NEAR, (k, v[np.argmax(np.abs(v - THR_EXACT))])
    return int(diff.sum())


# ---------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize(
    "hw", [(470, 486), (512, 512), (1024, 1024), (7, 9), (2000, 700), (1, 1), (300, 1500), (1025, 1023)]
)
def test_upsample_logits_bit_identical(hw):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    x = (rng.standard_normal((256, 256)) * rng.choice([0.01, 1.0, 1e4], (256, 256))).astype(np.float32)
    got = _native.upsample_logits(x, *hw)
    assert got.dtype == np.float32 and got.shape == hw
    np.testing.assert_array_equal(got, ref.upsample_logits(x, *hw))


def test_upsample_logits_special_values():
    x = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    x[10, 10], x[100, 200], x[255, 0], x[0, 255] = np.inf, -np.inf, np.nan, 3e38
    with np.errstate(invalid="ignore", over="ignore"):
        want = ref.upsample_logits(x, 333, 444)
    np.testing.assert_array_equal(_native.upsample_logits(x, 333, 444), want)  # NaNs at the same places


def test_threshold_is_float32_sigmoid_test():
    """T is the smallest float32 whose correctly rounded sigmoid is > 0.4f, 1e-7 from log(2/3)."""

    def on(x):
        return np.float32(1.0 / (1.0 + math.exp(-float(x)))) > np.float32(0.4)

    assert on(T) and not on(np.nextafter(T, np.float32(-1)))
    assert abs(float(T) - THR_EXACT) < 2e-7
    assert label_ops.LOGIT_THRESHOLD == float(T) == ref.LOGIT_THRESHOLD  # the NumPy module computes the same
    # torch's and NumPy's float32 sigmoids flip within a few float32 steps of it
    grid = np.sort((np.arange(-50, 50, dtype=np.int32) + np.array([T]).view(np.int32)[0]).view(np.float32))
    numpy_on = np.float32(1) / (np.float32(1) + np.exp(-grid, dtype=np.float32)) > np.float32(0.4)
    assert abs(float(grid[np.argmax(numpy_on)]) - float(T)) < 1e-6


def test_threshold_against_torch():
    torch = pytest.importorskip("torch")
    grid = np.sort((np.arange(-50, 50, dtype=np.int32) + np.array([T]).view(np.int32)[0]).view(np.float32))
    on = (torch.sigmoid(torch.from_numpy(grid)) > 0.4).numpy()
    assert on[-1] and not on[0]
    assert abs(float(grid[np.argmax(on)]) - float(T)) < 1e-6


# ---------------------------------------------------------------------------- label assembly
@pytest.mark.parametrize("hw", [(470, 486), (512, 512), (1024, 1024), (300, 1500), (2000, 700), (7, 9), (1, 1)])
def test_assemble_matches_oracle_and_reference(hw):
    rng = np.random.default_rng(hw[0] + hw[1])
    lowres = blobs(rng, 12)
    ours = _native.assemble_labels(lowres, *hw)
    assert ours.dtype == np.int32 and ours.shape == hw
    np.testing.assert_array_equal(ours, oracle_labels(lowres, *hw))
    assert_equals_reference(ours, lowres, *hw)
    np.testing.assert_array_equal(label_ops.assemble_labels(lowres, *hw), ours)


@pytest.mark.parametrize("hw", [(1024, 1024), (470, 486), (2000, 700), (7, 9)])
def test_assemble_near_threshold_values(hw):
    """Logits a few float32 steps from the threshold: every pixel is decided by the exact
    arithmetic (the fast path's error bound sends them there). Equal to the oracle and the NumPy
    implementation; NumPy's float32 sigmoid flips a few steps away, so a route thresholding it
    differs on many pixels, all within 1e-5."""
    rng = np.random.default_rng(5)
    steps = (np.array([T]).view(np.int32)[0] + rng.integers(-6, 7, (4, 256, 256))).astype(np.int32)
    lowres = steps.view(np.float32)
    ours = _native.assemble_labels(lowres, *hw)
    np.testing.assert_array_equal(ours, oracle_labels(lowres, *hw))
    assert_equals_reference(ours, lowres, *hw)
    n = assert_labels_match_reference(ours, numpy_sigmoid_labels(lowres, *hw), lowres, *hw)
    assert 0 < (ours > 0).mean() < 1
    record(f"native_near_threshold_{hw[0]}x{hw[1]}", pixels_differing_from_numpy_sigmoid=n)


def test_assemble_empty_and_all_off():
    assert _native.assemble_labels(np.zeros((0, 256, 256), np.float32), 20, 30).shape == (20, 30)
    assert not _native.assemble_labels(np.zeros((0, 256, 256), np.float32), 20, 30).any()
    assert not _native.assemble_labels(np.full((3, 256, 256), -5, np.float32), 20, 30).any()
    assert _native.assemble_labels(np.full((2, 256, 256), 5, np.float32), 0, 30).shape == (0, 30)
    np.testing.assert_array_equal(
        _native.assemble_labels(np.full((2, 256, 256), 5, np.float32), 3, 4), np.full((3, 4), 2, np.int32)
    )


def test_assemble_single_pixel_and_corners():
    for r, c in [(0, 0), (0, 255), (255, 0), (255, 255), (128, 3), (17, 240)]:
        lowres = np.full((1, 256, 256), -20, np.float32)
        lowres[0, r, c] = 20
        for hw in [(512, 512), (7, 9), (2000, 700), (1024, 1024)]:
            ours = _native.assemble_labels(lowres, *hw)
            np.testing.assert_array_equal(ours, oracle_labels(lowres, *hw))
            assert_equals_reference(ours, lowres, *hw)


def test_assemble_special_values_take_the_exact_path():
    """NaN, +-inf and huge logits (> 1e30) send a mask through the four exact passes."""
    rng = np.random.default_rng(4)
    lowres = blobs(rng, 5)
    lowres[0, 50, 50] = np.nan
    lowres[1, 60:70, 60:70] = np.inf
    lowres[2, 0, 0] = -np.inf
    lowres[3, 128, 128] = 3e38
    lowres[4, 200:205, 10:15] = -2e31
    for hw in [(512, 512), (470, 486), (2000, 700), (7, 9)]:
        with np.errstate(invalid="ignore", over="ignore"):
            want = oracle_labels(lowres, *hw)
        ours = _native.assemble_labels(lowres, *hw)
        np.testing.assert_array_equal(ours, want)
        assert_equals_reference(ours, lowres, *hw)


def test_assemble_later_mask_wins_and_border_masks():
    lowres = np.full((2, 256, 256), -10, np.float32)
    lowres[0, :128, :128] = 10  # touches the top-left border
    lowres[1, 64:192, 64:192] = 10
    out = _native.assemble_labels(lowres, 512, 512)
    assert out[0, 0] == 1 and out[200, 200] == 2 and out[300, 300] == 2 and out[511, 511] == 0
    assert out[100, 100] == 1 or out[100, 100] == 2
    assert out[140, 140] == 2  # inside both: the later one


def test_assemble_many_labels():
    rng = np.random.default_rng(9)
    lowres = blobs(rng, 400, noise=0.5)
    ours = _native.assemble_labels(lowres, 333, 517)
    assert ours.max() > 255  # not truncated to a small dtype
    assert_equals_reference(ours, lowres, 333, 517)


def test_assemble_two_distant_hot_regions():
    """Hot regions far apart in the same mask (per-row spans must still cover both)."""
    lowres = np.full((1, 256, 256), -30, np.float32)
    lowres[0, 5:9, 5:9] = 8
    lowres[0, 240:250, 200:230] = 8
    lowres[0, 5:7, 250:256] = 8
    hw = (600, 900)
    ours = _native.assemble_labels(lowres, *hw)
    np.testing.assert_array_equal(ours, oracle_labels(lowres, *hw))


def test_assemble_threads_do_not_change_the_result():
    rng = np.random.default_rng(11)
    lowres = blobs(rng, 40, noise=3.0)
    lowres[3, 100:110, 100:110] = np.inf  # one mask on the exact (non-finite) path
    for hw in [(512, 512), (2000, 700), (40, 900), (7, 9)]:
        one = _native.assemble_labels(lowres, *hw, threads=1)
        for threads in (2, 3, 5, 0):
            np.testing.assert_array_equal(_native.assemble_labels(lowres, *hw, threads=threads), one)


def test_assemble_input_checks():
    with pytest.raises(ValueError):
        _native.assemble_labels(np.zeros((2, 128, 256), np.float32), 10, 10)
    with pytest.raises(ValueError):
        _native.assemble_labels(np.zeros((2, 256, 256), np.float32), -1, 10)
    # float64 is cast, and labels.assemble_labels accepts (N, 1, 256, 256)
    lowres = blobs(np.random.default_rng(3), 3)
    np.testing.assert_array_equal(
        _native.assemble_labels(lowres.astype(np.float64), 50, 60), _native.assemble_labels(lowres, 50, 60)
    )
    np.testing.assert_array_equal(
        label_ops.assemble_labels(lowres[:, None], 50, 60), _native.assemble_labels(lowres, 50, 60)
    )


@st.composite
def mask_stacks(draw):
    """A few masks of hot rectangles / single pixels on a noisy cold background, any output size."""
    n = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out = (rng.normal(0, 1.0, (n, 256, 256)) - draw(st.sampled_from([3.0, 8.0, 30.0]))).astype(np.float32)
    for k in range(n):
        for _ in range(draw(st.integers(0, 3))):
            r0 = draw(st.integers(0, 255))
            c0 = draw(st.integers(0, 255))
            r1 = draw(st.integers(r0, min(255, r0 + draw(st.sampled_from([0, 3, 40, 255])))))
            c1 = draw(st.integers(c0, min(255, c0 + draw(st.sampled_from([0, 3, 40, 255])))))
            out[k, r0 : r1 + 1, c0 : c1 + 1] = draw(st.sampled_from([0.0, 2.0, 15.0, float(T), -0.4]))
    h = draw(st.one_of(st.integers(1, 40), st.integers(200, 1100), st.just(2000)))
    w = draw(st.one_of(st.integers(1, 40), st.integers(200, 1100), st.just(700)))
    return out, h, w


@HYP
@given(mask_stacks())
def test_assemble_property(case):
    lowres, h, w = case
    ours = _native.assemble_labels(lowres, h, w)
    np.testing.assert_array_equal(ours, oracle_labels(lowres, h, w))
    assert_equals_reference(ours, lowres, h, w)


# ---------------------------------------------------------------------------- fill holes
def assert_fill_matches_reference(m, min_size):
    """Native == SciPy loop, the map and the sources; the sources variant's map == the plain one's.
    Returns the sources."""
    out, sources = _native.fill_holes_and_remove_small_masks_with_sources(m, min_size)
    want, want_sources = ref.fill_holes_and_remove_small_masks_with_sources(m, min_size)
    np.testing.assert_array_equal(out, want)
    assert sources.dtype == np.int64 and want_sources.dtype == np.int64
    np.testing.assert_array_equal(sources, want_sources)
    np.testing.assert_array_equal(out, _native.fill_holes_and_remove_small_masks(m, min_size))
    if m.size:
        np.testing.assert_array_equal(out, ref.fill_holes_and_remove_small_masks(m, min_size))
    assert len(sources) >= out.max(initial=0)
    return sources


def test_fill_holes_sources_when_a_mask_lies_in_an_earlier_masks_hole():
    """Mask 2 lies wholly inside mask 1's hole (36 px >= min_size): mask 1's filling covers it,
    so it gets no final label and mask 3 becomes final label 2."""
    m = np.zeros((40, 40), np.int32)
    m[2:16, 2:16] = 1
    m[4:14, 4:14] = 0
    m[6:12, 6:12] = 2
    m[24:32, 24:32] = 3
    for fill in (
        _native.fill_holes_and_remove_small_masks_with_sources,
        ref.fill_holes_and_remove_small_masks_with_sources,
        label_ops.fill_holes_and_remove_small_masks_with_sources,
    ):
        out, sources = fill(m, 25)
        assert sources.tolist() == [1, 3]
        assert (out[2:16, 2:16] == 1).all() and (out[24:32, 24:32] == 2).all() and out.max() == 2
    # a final label covered by a later label's filling keeps its entry: labels 1..K stay aligned
    m = np.zeros((20, 20), np.int32)
    m[2:16, 2:16] = 2
    m[4:14, 4:14] = 0
    m[6:12, 6:12] = 1
    out, sources = _native.fill_holes_and_remove_small_masks_with_sources(m, 25)
    assert sources.tolist() == [1, 2] and np.unique(out).tolist() == [0, 2]
    assert_fill_matches_reference(m, 25)


def test_fill_holes_semantics():
    m = np.zeros((20, 20), np.int32)
    m[2:9, 2:9] = 1
    m[5, 5] = 0  # a hole
    m[12:14, 12:14] = 2  # 4 px: removed
    m[10:19, 10:19][m[10:19, 10:19] == 0] = 3
    m[14, 16] = 0
    out = _native.fill_holes_and_remove_small_masks(m, 25)
    np.testing.assert_array_equal(out, ref.fill_holes_and_remove_small_masks(m, 25))
    assert out[5, 5] == 1  # hole filled
    assert out[12, 12] == 2  # label 2 was removed, so label 3 became 2 and filled its holes over it
    assert out[14, 16] == 2
    assert m[5, 5] == 0  # the input is not modified


def test_fill_holes_diagonal_background_is_a_hole():
    """4-connectivity for the background: a gap closed only diagonally is still a hole."""
    m = np.zeros((7, 7), np.int32)
    m[1:6, 1:6] = 1
    m[3, 3] = 0
    m[2, 2] = 0
    m[1, 1] = 0  # corner notch: 4-connected to the border? (1,1) touches (0,1) -> outside
    out = _native.fill_holes_and_remove_small_masks(m, 0)
    np.testing.assert_array_equal(out, ref.fill_holes_and_remove_small_masks(m, 0))
    assert out[3, 3] == 1 and out[2, 2] == 1 and out[1, 1] == 0


def random_label_map(rng, h, w, n_labels, max_label=None):
    """Overlapping random rectangles and discs, some with holes, some tiny; optional big label values."""
    m = np.zeros((h, w), np.int32)
    values = (
        np.arange(1, n_labels + 1)
        if max_label is None
        else np.sort(rng.choice(np.arange(1, max_label + 1), n_labels, replace=False))
    )
    yy, xx = np.mgrid[:h, :w]
    for v in rng.permutation(values):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = rng.integers(1, max(2, min(h, w) // 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            sel = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            sel &= ~((yy - cy) ** 2 + (xx - cx) ** 2 < (r // 2) ** 2) if rng.random() < 0.5 else True
        elif shape == 1:
            sel = (abs(yy - cy) < r) & (abs(xx - cx) < rng.integers(1, r + 1))
        else:
            sel = rng.random((h, w)) < 0.05
        m[sel] = v
    return m


@pytest.mark.parametrize("seed", range(30))
def test_fill_holes_random(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 120)), int(rng.integers(1, 120))
    m = random_label_map(rng, h, w, int(rng.integers(1, 40)))
    if seed % 3 == 0:
        m[rng.random((h, w)) < 0.05] = -int(rng.integers(1, 5))  # negative values: background
    for min_size in [25, 0, 1, 5, -3]:
        assert_fill_matches_reference(m, min_size)


def test_fill_holes_sparse_large_label_values():
    rng = np.random.default_rng(0)
    m = random_label_map(rng, 60, 70, 30, max_label=2_000_000)  # > max(H*W, 65536): the sparse path
    assert m.max() > 65536
    sources = assert_fill_matches_reference(m, 10)
    assert sources.max() > 65536  # the input's label values


def test_fill_holes_from_assembled_labels():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        lowres = blobs(rng, int(rng.integers(1, 15)))
        labels = _native.assemble_labels(lowres, int(rng.integers(20, 400)), int(rng.integers(20, 400)))
        np.testing.assert_array_equal(
            label_ops.fill_holes_and_remove_small_masks(labels, 25),
            ref.fill_holes_and_remove_small_masks(labels.astype(np.int64), 25),
        )
        assert_fill_matches_reference(labels, 25)


def test_fill_holes_edge_shapes_and_dtypes():
    for shape in [(0, 5), (5, 0)]:  # (SciPy's loop fails on empty maps: the NumPy module checks)
        assert _native.fill_holes_and_remove_small_masks(np.zeros(shape, np.int32), 2).shape == shape
        assert assert_fill_matches_reference(np.zeros(shape, np.int32), 2).shape == (0,)
    for shape in [(1, 1), (1, 50), (50, 1), (2, 2)]:
        m = (np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.int32)
        np.testing.assert_array_equal(
            _native.fill_holes_and_remove_small_masks(m, 2), ref.fill_holes_and_remove_small_masks(m, 2)
        )
    m = np.zeros((10, 10), np.uint16)
    m[2:8, 2:8] = 7
    m[4, 4] = 0
    out = _native.fill_holes_and_remove_small_masks(m, 25)  # uint16 converts safely
    assert out.dtype == np.int32 and out[4, 4] == 1 and (out > 0).sum() == 36
    with pytest.raises(ValueError):
        _native.fill_holes_and_remove_small_masks(np.zeros((2, 3, 4), np.int32), 25)
    out, sources = _native.fill_holes_and_remove_small_masks_with_sources(m, 25)
    assert out.dtype == np.int32 and sources.dtype == np.int64 and sources.tolist() == [7]
    with pytest.raises(ValueError):
        _native.fill_holes_and_remove_small_masks_with_sources(np.zeros((2, 3, 4), np.int32), 25)


@HYP
@given(
    st.integers(1, 48),
    st.integers(1, 48),
    st.integers(1, 12),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 4, 25]),
)
def test_fill_holes_property(h, w, n, seed, min_size):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, n + 1, (h, w)).astype(np.int32)
    # grow blocks so that labels have interiors and holes
    m = np.repeat(np.repeat(m, 2, 0), 2, 1)[:h, :w] if seed % 2 else m
    assert_fill_matches_reference(m, min_size)


# ---------------------------------------------------------------------------- tile linking
LINKS = pytest.mark.parametrize("link", [_native.link_labels_by_iou, ref.link_labels_by_iou], ids=["native", "numpy"])


def brute_force_link(a, b, min_iou):
    """Python matcher with exact fractions: greedy by descending IoU, ties by (label_a, label_b)."""
    cands = []
    for la in np.unique(a[a > 0]):
        for lb in np.unique(b[(a == la) & (b > 0)]):
            inter = int(((a == la) & (b == lb)).sum())
            union = int(((a == la) | (b == lb)).sum())
            if inter / union >= min_iou:
                cands.append((-Fraction(inter, union), int(la), int(lb)))
    used_a, used_b, out = set(), set(), []
    for _, la, lb in sorted(cands):
        if la not in used_a and lb not in used_b:
            used_a.add(la)
            used_b.add(lb)
            out.append((la, lb))
    return np.array(out, np.int64).reshape(-1, 2)


@LINKS
def test_link_identical_and_permuted(link):
    rng = np.random.default_rng(0)
    a = random_label_map(rng, 80, 90, 25)
    present = np.unique(a[a > 0])
    pairs = link(a, a, 0.5)
    assert pairs.dtype == np.int64 and pairs.shape == (len(present), 2)
    np.testing.assert_array_equal(pairs[:, 0], pairs[:, 1])
    assert set(pairs[:, 0]) == set(present)
    perm = np.zeros(a.max() + 1, np.int32)
    perm[1:] = rng.permutation(np.arange(1, a.max() + 1)) + 100
    b = np.where(a > 0, perm[a], 0)
    pairs = link(a, b, 0.99)
    assert len(pairs) == len(present)
    assert all(perm[la] == lb for la, lb in pairs)


@LINKS
def test_link_threshold_exact(link):
    a = np.zeros((10, 10), np.int32)
    b = np.zeros((10, 10), np.int32)
    a[0:4, 0:6] = 1  # 24 px
    b[0:4, 2:8] = 5  # 24 px, 16 shared -> IoU = 16 / 32 = 0.5
    assert link(a, b, 0.5).tolist() == [[1, 5]]
    assert link(a, b, 0.5000001).shape == (0, 2)
    assert link(a, np.zeros_like(b), 0.0).shape == (0, 2)  # no overlap, no pair


@LINKS
def test_link_one_to_one_greedy_and_ties(link):
    a = np.zeros((4, 12), np.int32)
    b = np.zeros((4, 12), np.int32)
    a[:, 0:6] = 1
    b[:, 0:4] = 2  # IoU(1, 2) = 16 / 24
    b[:, 4:6] = 3  # IoU(1, 3) = 8 / 24
    assert link(a, b, 0.2).tolist() == [[1, 2]]  # label 1 only once
    # a tie: labels 7 and 8 of a each cover b's label 9 equally -> the smaller label_a wins
    a2 = np.zeros((2, 8), np.int32)
    b2 = np.zeros((2, 8), np.int32)
    a2[:, 0:4] = 8
    a2[:, 4:8] = 7
    b2[:, :] = 9
    assert link(a2, b2, 0.1).tolist() == [[7, 9]]
    # swapped roles: ties by label_b
    assert link(b2, a2, 0.1).tolist() == [[9, 7]]


@LINKS
def test_link_input_checks(link):
    with pytest.raises(ValueError):
        link(np.zeros((3, 4), np.int32), np.zeros((4, 3), np.int32), 0.5)


@HYP
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9]))
def test_link_matches_brute_force(h, w, seed, min_iou):
    rng = np.random.default_rng(seed)
    a = random_label_map(rng, h, w, int(rng.integers(1, 12)))
    # b: a shifted copy with relabelling and noise, so that IoUs vary and ties happen
    b = np.roll(a, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), (0, 1))
    b = np.where(b > 0, b * 3 + 1, 0).astype(np.int32)
    b[rng.random((h, w)) < 0.1] = int(rng.integers(0, 50))
    want = brute_force_link(a, b, min_iou)
    got = _native.link_labels_by_iou(a, b, min_iou)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(label_ops.link_labels_by_iou(a, b, min_iou), got)  # deterministic
    np.testing.assert_array_equal(ref.link_labels_by_iou(a, b, min_iou), got)  # the NumPy version
    assert len(set(got[:, 0])) == len(got) and len(set(got[:, 1])) == len(got)


# ---------------------------------------------------------------------------- golden
@pytest.mark.parametrize("case", BOX_CASES)
def test_golden_fill_holes(reference, case):
    g = load_golden(reference, case)
    out = label_ops.fill_holes_and_remove_small_masks(g["labels_raw"], min_size=25)
    np.testing.assert_array_equal(out, g["mask"])
    np.testing.assert_array_equal(out, ref.fill_holes_and_remove_small_masks(g["labels_raw"], 25))
    sources = assert_fill_matches_reference(g["labels_raw"].astype(np.int32), 25)
    # every final label of the official map came from the kept mask its sources entry names
    assert len(sources) >= g["mask"].max() and (np.diff(sources) > 0).all()
    record(case, final_labels=len(sources), kept_masks_without_a_final_label=int(g["labels_raw"].max()) - len(sources))


@pytest.mark.parametrize("case", BOX_CASES)
def test_golden_first16_logits_assembly(reference, case):
    """The golden low-res logits of the first prompts: native == NumPy implementation (and oracle);
    pixels where a NumPy-float32-sigmoid route differs lie within 1e-5 of the threshold."""
    g = load_golden(reference, case)
    lowres = g["lowres_mask_logits_first16"]
    h, w = g["labels_raw"].shape
    ours = label_ops.assemble_labels(lowres, h, w)
    np.testing.assert_array_equal(ours, oracle_labels(lowres, h, w))
    assert_equals_reference(ours, lowres, h, w)
    n = assert_labels_match_reference(ours, numpy_sigmoid_labels(lowres, h, w), lowres, h, w)
    record(case, first16_pixels_differing_from_numpy_sigmoid=n)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tissuenet_boxes", "YeaZ_boxes"])
def test_golden_full_label_maps(reference, full_exports, case):
    """All prompts through the exported model (ONNX Runtime FP32, within 1.5e-4 of the official
    logits), kept ones assembled natively vs the official labels. The run is shared with
    test_ort_golden (one run per case, engine and session)."""
    from test_ort_golden import run_case

    g, res, _ = run_case(reference, full_exports, case, engine="ort")
    lowres, iou = res.details.lowres_logits, res.details.all_iou_predictions
    keep = iou >= 0.5
    np.testing.assert_array_equal(keep, g["kept"])
    kept = np.ascontiguousarray(lowres[keep])
    h, w = g["labels_raw"].shape
    ours = label_ops.assemble_labels(kept, h, w)
    agree = float((ours == g["labels_raw"]).mean())
    assert_equals_reference(ours, kept, h, w)
    n_numpy = assert_labels_match_reference(ours, numpy_sigmoid_labels(kept, h, w), kept, h, w)
    final = label_ops.fill_holes_and_remove_small_masks(ours, 25)
    final_s, sources = label_ops.fill_holes_and_remove_small_masks_with_sources(ours, 25)
    want_s, want_sources = ref.fill_holes_and_remove_small_masks_with_sources(ours, 25)
    np.testing.assert_array_equal(final_s, final)
    np.testing.assert_array_equal(want_s, final)
    np.testing.assert_array_equal(sources, want_sources)
    final_agree = float((final == g["mask"]).mean())
    record(
        case,
        native_raw_label_agreement=agree,
        native_raw_differing_pixels=int((ours != g["labels_raw"]).sum()),
        native_final_label_agreement=final_agree,
        native_final_differing_pixels=int((final != g["mask"]).sum()),
        native_vs_numpy_sigmoid_differing_pixels=n_numpy,
        kept=int(keep.sum()),
    )
    assert agree >= 0.999
    assert final_agree >= 0.999
