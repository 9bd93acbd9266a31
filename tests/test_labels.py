"""The pipeline's label assembly and hole filling (cellsam_trt.labels, native) against the
official per-mask PyTorch route and the plain NumPy/SciPy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reference_postprocess as ref
from cellsam_trt.labels import assemble_labels, fill_holes_and_remove_small_masks

ROOT = Path(__file__).resolve().parents[1]


def blobs(rng, n, size=256):
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, size, size), -12.0, np.float32)
    for i in range(n):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, 40))]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        out[i] += (24.0 * disc + rng.normal(0, 2, (size, size))).astype(np.float32)
    return out


@pytest.mark.parametrize("hw", [(470, 486), (512, 512), (1024, 1024), (300, 1500), (2000, 700), (7, 9)])
def test_assembly_matches_official_route(hw):
    pytest.importorskip("torch")
    rng = np.random.default_rng(hw[0])
    lowres = blobs(rng, 12)
    ours = assemble_labels(lowres, *hw)
    official, logits = ref.torch_assemble_labels(lowres, *hw, return_logits=True)
    diff = ours != official
    # wherever a pixel differs, the deciding mask's interpolated logit sits on the threshold
    if diff.any():
        thr = np.log(0.4 / 0.6)
        for y, x in zip(*np.nonzero(diff)):
            k = max(ours[y, x], official[y, x]) - 1
            assert abs(logits[k, y, x] - thr) <= 1e-5
    assert diff.mean() < 1e-4
    # and the NumPy reference gives the same map on these inputs (no logit near the threshold)
    np.testing.assert_array_equal(ours, ref.assemble_labels(lowres, *hw))


def test_empty_and_all_off():
    assert not assemble_labels(np.zeros((0, 256, 256), np.float32), 20, 30).any()
    assert not assemble_labels(np.full((3, 256, 256), -5, np.float32), 20, 30).any()


def test_later_mask_wins_and_border_masks():
    lowres = np.full((2, 256, 256), -10, np.float32)
    lowres[0, :128, :128] = 10  # touches the top-left border
    lowres[1, 64:192, 64:192] = 10
    out = assemble_labels(lowres, 512, 512)
    assert out[0, 0] == 1 and out[200, 200] == 2 and out[300, 300] == 2 and out[511, 511] == 0


def test_fill_holes_semantics():
    m = np.zeros((20, 20), np.int32)
    m[2:9, 2:9] = 1
    m[5, 5] = 0  # a hole
    m[12:14, 12:14] = 2  # 4 px: removed
    m[10:19, 10:19][m[10:19, 10:19] == 0] = 3
    m[14, 16] = 0
    out = fill_holes_and_remove_small_masks(m, min_size=25)
    np.testing.assert_array_equal(out, ref.fill_holes_and_remove_small_masks(m, 25))
    assert out[5, 5] == 1  # hole filled
    assert out[12, 12] == 2  # label 2 was removed, so label 3 became 2 and filled its holes over it


@pytest.mark.parametrize("seed", range(20))
def test_fill_holes_random(seed):
    rng = np.random.default_rng(seed)
    lowres = blobs(rng, int(rng.integers(1, 15)))
    labels = assemble_labels(lowres, int(rng.integers(20, 400)), int(rng.integers(20, 400)))
    np.testing.assert_array_equal(
        fill_holes_and_remove_small_masks(labels, 25),
        ref.fill_holes_and_remove_small_masks(labels.astype(np.int64), 25),
    )


# ---------------------------------------------------------------------------- without the native build
FALLBACK_SCRIPT = r'''
import importlib.abc, json, sys, warnings

class BlockNative(importlib.abc.MetaPathFinder):
    """As if the extension were not built: importing cellsam_trt._native raises ImportError."""
    def find_spec(self, name, path=None, target=None):
        if name == "cellsam_trt._native":
            raise ImportError("No module named 'cellsam_trt._native' (blocked by the test)")
        return None

sys.meta_path.insert(0, BlockNative())
warnings.simplefilter("always")  # count every warning, not only the first per place

import numpy as np

with warnings.catch_warnings(record=True) as at_import:
    from cellsam_trt import labels
    import cellsam_trt.outputs  # noqa: F401
lowres, h, w, raw, a, b = (np.load(sys.argv[1])[k] for k in ("lowres", "h", "w", "raw", "a", "b"))
with warnings.catch_warnings(record=True) as caught:
    assembled = labels.assemble_labels(lowres, int(h), int(w))
    filled = labels.fill_holes_and_remove_small_masks(raw, 25)
    filled_s, sources = labels.fill_holes_and_remove_small_masks_with_sources(raw, 25)
    linked = labels.link_labels_by_iou(a, b, 0.3)
    assembled_again = labels.assemble_labels(lowres, int(h), int(w))
np.savez(sys.argv[2], assembled=assembled, filled=filled, filled_s=filled_s, sources=sources, linked=linked,
         assembled_again=assembled_again)
print(json.dumps({"at_import": [str(x.message) for x in at_import],
                  "warnings": [[x.category.__name__, str(x.message), x.filename] for x in caught],
                  "native": labels.is_native(), "threshold": labels.LOGIT_THRESHOLD}))
'''


def test_numpy_fallback_without_the_native_build(tmp_path):
    """With cellsam_trt._native unimportable, cellsam_trt.labels gives the native results with the
    NumPy implementation and warns once, at the first call (not at import), naming the cost and the fix."""
    import json
    import os
    import subprocess
    import sys

    from cellsam_trt import _native, labels

    rng = np.random.default_rng(7)
    lowres = blobs(rng, 10)
    h, w = 300, 420
    raw = assemble_labels(lowres, h, w)
    raw[:90, :90] = 0  # a corner free of other masks (so that no blob's hole filling covers the ring)
    raw[40:80, 40:80] = 11  # a ring holding a later mask: the sources skip it
    raw[50:70, 50:70] = 0
    raw[55:65, 55:65] = 12
    a = raw
    b = np.roll(raw, (3, -2), (0, 1))
    np.savez(tmp_path / "in.npz", lowres=lowres, h=h, w=w, raw=raw, a=a, b=b)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["at_import"] == []  # no import-time side effects
    assert not info["native"]
    assert info["threshold"] == labels.LOGIT_THRESHOLD == float(_native.LOGIT_THRESHOLD)
    fallback = [m for m in info["warnings"] if "cellsam_trt._native" in m[1]]
    assert len(fallback) == 1, info["warnings"]  # once, for five calls
    category, message, filename = fallback[0]
    assert category == "RuntimeWarning"
    assert filename == "<string>"  # attributed to the caller
    for words in ("17.3x", "48.9x", "benchmarks/results/labels.json", "C++17 compiler", "reinstall"):
        assert words in message, (words, message)
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["assembled"], _native.assemble_labels(lowres, h, w))
        np.testing.assert_array_equal(out["assembled_again"], out["assembled"])
        np.testing.assert_array_equal(out["filled"], _native.fill_holes_and_remove_small_masks(raw, 25))
        final, sources = _native.fill_holes_and_remove_small_masks_with_sources(raw, 25)
        np.testing.assert_array_equal(out["filled_s"], final)
        np.testing.assert_array_equal(out["sources"], sources)
        assert 12 not in sources.tolist() and 11 in sources.tolist()
        np.testing.assert_array_equal(out["linked"], _native.link_labels_by_iou(a, b, 0.3))
        assert len(out["linked"]) > 3


def test_native_is_used_where_built():
    from cellsam_trt import _native, labels

    assert labels.is_native() and labels.implementation() is _native
