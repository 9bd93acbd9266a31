"""Channel handling and resampling, beyond the golden images."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam_trt import preprocess as pre


def test_channels_fill_the_last_slots():
    g = np.arange(12.0).reshape(3, 4)
    out = pre.to_three_channels(g)
    assert out.shape == (3, 4, 3) and not out[..., :2].any()
    np.testing.assert_array_equal(out[..., 2], g)
    two = np.stack([g, 2 * g], axis=-1)
    out = pre.to_three_channels(two)
    assert not out[..., 0].any()
    np.testing.assert_array_equal(out[..., 1:], two)


def test_channel_axis_first_or_explicit():
    rng = np.random.default_rng(0)
    hwc = rng.random((20, 30, 2))
    chw = np.moveaxis(hwc, -1, 0)
    np.testing.assert_array_equal(pre.to_three_channels(chw), pre.to_three_channels(hwc))
    tiny = rng.random((2, 2, 3))  # the smallest-axis rule picks axis 0 here
    np.testing.assert_array_equal(pre.to_three_channels(tiny, channel_axis=-1), tiny)


@pytest.mark.parametrize("shape", [(10, 10, 4), (2, 3, 4, 5)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError):
        pre.to_three_channels(np.zeros(shape))


def test_blank_and_constant_channels_become_zero():
    img = np.zeros((40, 50, 3))
    img[..., 1] = 7.0
    img[..., 2] = np.random.default_rng(1).random((40, 50))
    out = pre.normalize_image(img)
    assert not out[..., 0].any() and not out[..., 1].any()
    assert 0 <= out[..., 2].min() and out[..., 2].max() <= 1


def test_blank_image_is_reported():
    with pytest.raises(pre.BlankImageError):
        pre.sam_encoder_input(np.zeros((3, 1024, 1024), np.float32), adv_mode=True)


@pytest.mark.parametrize("shape", [(3, 470, 486), (3, 2000, 1500), (3, 100, 37), (3, 1024, 1024), (1, 5, 3000)])
def test_resize_matches_torch(shape):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).random(shape).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None], size=(1024, 1024), mode="bilinear", antialias=True, align_corners=False
    )[0].numpy()
    out = pre.resize_to_model(x)
    assert np.abs(out - ref).max() <= 1e-6
