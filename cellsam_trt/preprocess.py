"""Image preprocessing of the official CellSAM pipeline, in NumPy (no torch needed).

Stages (PIPELINE.md, "Input handling", "(a) SAM image-encoder input", "(b) CellFinder input"):

1. ``to_three_channels``: (H, W) or (H, W, C)/(C, H, W) -> (H, W, 3) float64, the C channels in
   the LAST slots (grayscale -> channel 2; nuclear + whole-cell -> channels 1, 2).
2. ``normalize_image``: per channel, clip above the 99.9th percentile of its nonzero values,
   then min-max to [0, 1] and CLAHE (constant channels become 0).
3. ``sam_encoder_input`` / ``cellfinder_input``: squash to 1024 x 1024 (bilinear, antialiased)
   and the branch-specific intensity steps -> (1, 3, 1024, 1024) float32.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from skimage.exposure import equalize_adapthist, rescale_intensity

MODEL_SIZE = 1024
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SAM_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
SAM_PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


class BlankImageError(ValueError):
    """The image has no nonzero value after normalisation: there is nothing to segment."""


MIN_IMAGE_SIDE = 2
"""The smallest image side, in pixels. Every stage runs on a 1 x 1 image (tried: ``prepare`` and
``segment`` give an all-zero label map), but a side of 1 cannot be told from a singleton channel
or stack axis, which readers squeeze away (a stored (1, 5000) image would become (5000,)); so a
side of 1 is refused, and 2 x 2 is the smallest image accepted."""


def unsupported_dtype(dtype) -> str | None:
    """Why pixels of ``dtype`` cannot be segmented (a message naming the dtype), or None.

    Accepted: bool, signed and unsigned integers, float16 / float32 / float64. Refused by name:
    complex (the imaginary part would be dropped), object, strings, datetime / timedelta,
    structured / raw bytes and extended-precision floats.
    """
    dt = np.dtype(dtype)
    why = {
        "c": "complex-valued pixels cannot be segmented (the imaginary part would be dropped); "
        "pass the magnitude (np.abs) or the real part",
        "O": "Python objects, not pixel values",
        "S": "byte strings (text), not pixel values",
        "U": "strings (text), not pixel values",
        "M": "dates and times, not pixel values",
        "m": "time differences, not pixel values",
        "V": "structured records or raw bytes, not pixel values",
    }.get(dt.kind)
    if why is None and dt.kind == "f" and dt.itemsize > 8:
        why = "extended-precision floats are not supported; convert to float64"
    if why is None and dt.kind not in "biuf":
        why = "not a numeric pixel type"
    return None if why is None else f"unsupported dtype {dt}: {why} (supported: bool, integers, float16/32/64)"


def to_three_channels(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """(H, W) or 3-D image -> (H, W, 3) float64 with the input channels in the last slots.

    channel_axis: axis of the channels of a 3-D image. None (default) takes the official
    rule, the smallest axis, which is wrong for tiny images (e.g. 2 x 2 x 3): pass the axis
    explicitly when it is known. More than 3 channels, or a side under ``MIN_IMAGE_SIDE``
    pixels, is an error (ValueError) that names the shape and the channel axis taken.
    """
    image = np.asarray(image)
    shape = image.shape
    if image.ndim == 2:
        image = image[..., None]
        where = "a 2-D image"
    elif image.ndim == 3:
        axis = int(np.argmin(image.shape)) if channel_axis is None else channel_axis % 3
        image = np.moveaxis(image, axis, -1)
        where = f"channel axis {axis} ({'the smallest axis' if channel_axis is None else 'as given'})"
    else:
        raise ValueError(
            f"expected a 2-D image (H, W) or a 3-D image with channels ((H, W, C) or (C, H, W)), "
            f"got {image.ndim}-D shape {shape}"
        )
    h, w, c = image.shape
    if c > 3:
        raise ValueError(
            f"at most 3 channels are supported, got {c} (shape {shape}, {where}); name the nuclear / "
            "whole-cell channels or the channel axis (--nuclear-channel / --wholecell-channel / "
            "--channel-axis; in Python Channels(nuclear=, wholecell=, axis=))"
        )
    if h == 0 or w == 0:
        raise ValueError(f"empty image (shape {shape})")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"the image is {h} x {w} pixels (shape {shape}, {where}); the minimum image size is "
            f"{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}"
        )
    out = np.zeros((h, w, 3), dtype=np.float64)
    out[:, :, 3 - c :] = image
    return out


def normalize_image(image: np.ndarray, percentile: float = 99.9, kernel_size: int = 128) -> np.ndarray:
    """(H, W, 3) float64 -> (H, W, 3) float64 in [0, 1]: percentile clip + CLAHE per channel."""
    out = np.zeros_like(image, dtype=np.float64)
    for ch in range(image.shape[-1]):
        x = np.array(image[..., ch], dtype=np.float64)
        nonzero = x[np.nonzero(x)]
        if nonzero.size == 0:
            continue  # blank channel stays zero
        top = np.percentile(nonzero, percentile)
        x[x > top] = top
        if (x == x.flat[0]).all():
            continue  # constant channel -> zeros
        x = rescale_intensity(x, out_range=(0.0, 1.0))
        out[..., ch] = equalize_adapthist(x, kernel_size=kernel_size)
    return out


@lru_cache(maxsize=32)
def _aa_bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of antialiased bilinear resampling along one axis: (n_out, K) int64 source indices
    and (n_out, K) float32 weights (zero-padded to a common K).

    The kernel, the float32 weight arithmetic and the tap order are those of
    ``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``
    (PIL's triangle filter, widened by the scale when shrinking; plain bilinear when enlarging).
    """
    f = np.float32
    scale = f(n_in) / f(n_out)
    support = scale if scale >= 1.0 else f(1.0)
    inv = f(1.0) / scale if scale >= 1.0 else f(1.0)
    rows = []
    for i in range(n_out):
        center = scale * f(i + 0.5)
        lo = max(int(center - support + f(0.5)), 0)
        hi = min(int(center + support + f(0.5)), n_in)
        x = np.abs((np.arange(lo, hi, dtype=f) - center + f(0.5)) * inv)
        w = np.where(x < 1.0, f(1.0) - x, f(0.0)).astype(f)
        total = f(0.0)
        for v in w:  # sequential float32 sum, as torch
            total = f(total + v)
        rows.append((lo, w / total if total != 0 else w))
    k = max(len(w) for _, w in rows)
    idx = np.zeros((n_out, k), dtype=np.int64)
    wts = np.zeros((n_out, k), dtype=f)
    for i, (lo, w) in enumerate(rows):
        idx[i] = np.minimum(lo + np.arange(k), n_in - 1)
        wts[i, : len(w)] = w
    return idx, wts


def _resample_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Resample float32 ``x`` along ``axis``; each tap is a fused multiply-add in float32
    (emulated exactly in float64), which reproduces torch's CPU kernel bit for bit."""
    idx, wts = _aa_bilinear_taps(x.shape[axis], n_out)
    x = np.moveaxis(x, axis, -1)
    acc = np.zeros(x.shape[:-1] + (n_out,), dtype=np.float32)
    for k in range(idx.shape[1]):
        acc = (x[..., idx[:, k]].astype(np.float64) * wts[:, k].astype(np.float64) + acc).astype(np.float32)
    return np.moveaxis(acc, -1, axis)


def resize_to_model(chw: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """(C, H, W) float32 -> (C, size, size) float32, aspect ratio ignored (the official squash).

    Width first, then height, as torch's separable kernel does.
    """
    x = np.asarray(chw, dtype=np.float32)
    return _resample_axis(_resample_axis(x, 2, size), 1, size)


def _imagenet_then_minmax(x: np.ndarray) -> np.ndarray:
    """[adv] ImageNet normalise, then per-channel min-max (kornia normalize_min_max, eps 1e-6)."""
    x = (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    lo = x.reshape(3, -1).min(axis=1)[:, None, None]
    hi = x.reshape(3, -1).max(axis=1)[:, None, None]
    return ((x - lo) / (hi - lo + np.float32(1e-6))).astype(np.float32)


def squashed(normalized_hwc: np.ndarray) -> np.ndarray:
    """The normalised (H, W, 3) image as (3, 1024, 1024) float32, shared by both branches."""
    chw = np.ascontiguousarray(normalized_hwc.transpose(2, 0, 1), dtype=np.float32)
    return resize_to_model(chw)


def sam_encoder_input(squashed_chw: np.ndarray, adv_mode: bool) -> np.ndarray:
    """(3, 1024, 1024) float32 -> (1, 3, 1024, 1024) float32 input of the SAM image encoder.

    Raises BlankImageError for an all-zero image (the official code crashes there).
    """
    x = squashed_chw
    nonzero = x[np.nonzero(x)]
    if nonzero.size == 0:
        raise BlankImageError("the image is blank (all zero after normalisation)")
    lo, hi = np.percentile(nonzero, [0.0, 99.5])
    x = rescale_intensity(x, in_range=(lo, hi), out_range="float32")
    if adv_mode:
        x = _imagenet_then_minmax(x)
    x = (x - SAM_PIXEL_MEAN[:, None, None] / np.float32(255)) / (SAM_PIXEL_STD[:, None, None] / np.float32(255))
    return x[None].astype(np.float32)


def cellfinder_input(squashed_chw: np.ndarray, adv_mode: bool) -> np.ndarray:
    """(3, 1024, 1024) float32 -> (1, 3, 1024, 1024) float32 input of CellFinder."""
    as_uint8 = (squashed_chw * np.float32(255)).astype(np.uint8)  # ToPILImage: x*255, truncated
    x = (as_uint8.astype(np.float32) - SAM_PIXEL_MEAN[:, None, None]) / SAM_PIXEL_STD[:, None, None]
    if adv_mode:
        x = _imagenet_then_minmax(x)
        if x[1].max() == 0:
            x[1] = x[2]
        if x[2].max() == 0:
            x[2] = x[1]
    return x[None].astype(np.float32)


def select_channels(image: np.ndarray, channel_axis: int | None, nuclear: int | None, wholecell: int | None):
    """Pick the nuclear and whole-cell channels: -> (H, W, 2) [nuclear, whole-cell], (H, W, 1) or
    the image unchanged when no channel is named (the pipeline then applies the official rule)."""
    if nuclear is None and wholecell is None:
        return image, channel_axis
    if image.ndim == 2:
        raise ValueError(f"--nuclear-channel/--wholecell-channel given, but the image is 2-D {image.shape}")
    axis = int(np.argmin(image.shape)) if channel_axis is None else channel_axis % image.ndim
    planes = np.moveaxis(image, axis, -1)
    for name, idx in (("nuclear", nuclear), ("whole-cell", wholecell)):
        if idx is not None and not 0 <= idx < planes.shape[-1]:
            raise ValueError(f"{name} channel {idx} does not exist (image has {planes.shape[-1]} channels)")
    if wholecell is None:  # nuclear only: (blank, nuclear, blank)
        out = np.zeros(planes.shape[:2] + (2,), planes.dtype)
        out[..., 0] = planes[..., nuclear]
        return out, -1
    if nuclear is None:
        return planes[..., wholecell], None
    return np.stack([planes[..., nuclear], planes[..., wholecell]], -1), -1
