"""Whole-slide path: tiling, prompt routing, streaming IO, stitching, resume, failures, Dask.

Stitching is judged on synthetic slides with known ground truth (``slide.synthetic``): the
threshold segmenter is exact inside a tile, so every difference from the ground truth is the
tiling's. The CellSAM engine itself (tiny export, ONNX Runtime) runs the CLI, Dask and
failure tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsam_trt import pipeline as P
from cellsam_trt.metrics import StreamedInstanceMatch, match_instances
from cellsam_trt.scheduler import ItemResult
from cellsam_trt.slide import stitch
from cellsam_trt.slide.grid import TileGrid, TileSettings, axis_tiles, route_prompts
from cellsam_trt.slide.io import OmeZarrLabelWriter, SlideError, open_slide, read_labels
from cellsam_trt.slide.run import SlideOutput, finish_slide, prepare_slide, segment_slide, segment_tile_batch
from cellsam_trt.slide.synthetic import SyntheticSlide, ThresholdSegmenter


# ------------------------------------------------------------------------------ the grid
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(16, 1200), st.data())
def test_axis_tiles_cover_overlap_and_partition(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts, bounds = axis_tiles(length, tile, overlap)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length  # the tiles cover the axis, all the same size
    assert (np.diff(starts) > 0).all()
    if len(starts) > 1:
        assert (starts[:-1] + t - starts[1:] >= overlap).all()  # neighbours overlap by at least `overlap`
    assert bounds[0] == 0 and bounds[-1] == length and (np.diff(bounds) > 0).all()  # cores partition
    for i, s in enumerate(starts):  # each core lies inside its tile, >= overlap // 2 from an inner edge
        assert s <= bounds[i] and bounds[i + 1] <= s + t
        if i > 0:
            assert bounds[i] - s >= overlap // 2
        if i + 1 < len(starts):
            assert s + t - bounds[i + 1] >= overlap // 2


def test_grid_cores_owner_and_scale():
    g = TileGrid(2500, 1800, TileSettings(tile_size=1024, overlap=128, scale=2.0))
    assert g.tile == 512 and g.overlap == 64  # a scale of 2 reads tiles of half the size
    owned = np.zeros((2500, 1800), np.int32)
    for t in g:
        y0, y1, x0, x1 = t.core
        owned[y0:y1, x0:x1] += 1
        assert g.owner((y0 + y1) / 2, (x0 + x1) / 2).index == t.index
    assert (owned == 1).all()
    region = list(g.cores_in(300, 900, 100, 1100))
    cover = sum((y1 - y0) * (x1 - x0) for _, (y0, y1, x0, x1) in region)
    assert cover == 600 * 1000
    with pytest.raises(ValueError, match="overlap"):
        TileSettings(tile_size=256, overlap=256)
    assert TileSettings.scale_for_pixel_size(0.25, 0.5) == 0.5


def test_prompts_go_to_one_tile_that_holds_them_in_local_pixels():
    g = TileGrid(1000, 1000, TileSettings(tile_size=512, overlap=96))
    boxes = np.array(
        [[10, 10, 40, 40], [470, 300, 520, 340], [990, 990, 999, 999], [0, 0, 900, 900], [2000, 2000, 2010, 2010]],
        np.float32,
    )
    r = route_prompts(g, boxes=boxes)
    seen = {}
    for ti, e in r.per_tile.items():
        t = g[ti]
        for pid, b in zip(e["ids"], e["boxes"]):
            seen[int(pid)] = ti
            np.testing.assert_allclose(b, boxes[pid] - [t.x0, t.y0, t.x0, t.y0])
            assert 0 <= b[0] and b[2] <= t.x1 - t.x0 and 0 <= b[1] and b[3] <= t.y1 - t.y0
    assert sorted(seen) == [0, 1, 2]
    assert [i for i, _ in r.unrouted] == [3, 4]
    assert "larger than a tile" in r.unrouted[0][1] and "outside" in r.unrouted[1][1]
    pts = route_prompts(g, points=[[[500, 500], [510, 505]]], point_labels=[[1, 0]])
    [(ti, e)] = pts.per_tile.items()
    np.testing.assert_allclose(e["points"][0], np.array([[500, 500], [510, 505]]) - [g[ti].x0, g[ti].y0])
    assert e["point_labels"].tolist() == [[1, 0]]


# ------------------------------------------------------------------------------ streaming IO
def test_ome_tiff_pyramid_regions_and_pixel_size(tmp_path):
    s = SyntheticSlide(700, 900, seed=4)
    s.write_ome_tiff(tmp_path / "s.ome.tif", tile=256, levels=3, pixel_size_um=0.25)
    full = s.image(0, 700, 0, 900)
    src = open_slide(tmp_path / "s.ome.tif")
    assert src.shape == (700, 900) and src.channels == 0 and src.pixel_size_um == (0.25, 0.25)
    np.testing.assert_array_equal(src.read(123, 456, 300, 899), full[123:456, 300:899])
    lvl = open_slide(tmp_path / "s.ome.tif", level=2)
    assert lvl.shape == (175, 225) and lvl.pixel_size_um == (1.0, 1.0)
    np.testing.assert_array_equal(lvl.read(0, 175, 0, 225), full[::4, ::4])
    with pytest.raises(SlideError, match="s.ome.tif: pyramid level 3 does not exist"):
        open_slide(tmp_path / "s.ome.tif", level=3)


def test_multichannel_and_bad_slides(tmp_path):
    cyx = np.random.default_rng(0).integers(0, 1000, (2, 300, 400)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.ome.tif", cyx, ome=True, metadata={"axes": "CYX"}, tile=(128, 128))
    src = open_slide(tmp_path / "c.ome.tif")
    assert src.channels == 2
    np.testing.assert_array_equal(src.read(10, 20, 30, 50), np.moveaxis(cyx[:, 10:20, 30:50], 0, -1))
    np.save(tmp_path / "a.npy", cyx[0])
    np.testing.assert_array_equal(open_slide(tmp_path / "a.npy").read(5, 9, 0, 4), cyx[0, 5:9, :4])
    tifffile.imwrite(tmp_path / "t.ome.tif", np.zeros((3, 64, 64), np.uint8), ome=True, metadata={"axes": "TYX"})
    with pytest.raises(SlideError, match="t.ome.tif: axis T has 3 planes"):
        open_slide(tmp_path / "t.ome.tif")
    with pytest.raises(SlideError, match="missing.tif: no such file"):
        open_slide(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(SlideError, match="junk.tif: cannot be read"):
        open_slide(tmp_path / "junk.tif")


def test_channel_problems_are_named_before_any_tile_runs(tmp_path):
    from cellsam_trt.slide.run import ChannelMap

    five = np.zeros((5, 64, 64), np.uint16)
    tifffile.imwrite(tmp_path / "five.ome.tif", five, ome=True, metadata={"axes": "CYX"})
    src = open_slide(tmp_path / "five.ome.tif")
    with pytest.raises(SlideError, match="five.ome.tif: 5 channels; name the nuclear"):
        segment_slide(src, ThresholdSegmenter(1.0), SlideOutput(tmp_path / "o.ome.zarr"))
    with pytest.raises(SlideError, match="five.ome.tif: whole-cell channel 7 does not exist"):
        segment_slide(src, ThresholdSegmenter(1.0), SlideOutput(tmp_path / "o.ome.zarr"), channels=ChannelMap(0, 7))
    res = segment_slide(src, ThresholdSegmenter(1.0), SlideOutput(tmp_path / "o.ome.zarr"), channels=ChannelMap(1, 3))
    assert res.ok and res.cells == 0 and not list(tmp_path.glob(".*work"))


def test_ome_zarr_writer_metadata_pyramid_and_atomic_replace(tmp_path):
    lab = np.random.default_rng(1).integers(0, 70000, (300, 500)).astype(np.uint32)
    dest = tmp_path / "l.ome.zarr"
    w = OmeZarrLabelWriter(dest, lab.shape, np.uint32, chunk=128, levels=3, pixel_size_um=(0.5, 0.5)).create()
    for y in range(0, 300, 128):
        for x in range(0, 500, 128):
            w.write(y, x, lab[y : y + 128, x : x + 128])
    assert not dest.exists()  # nothing under the final name before finish
    w.finish()
    attrs = json.loads((dest / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [[0.5, 0.5], [1, 1], [2, 2]]
    assert "image-label" in attrs
    np.testing.assert_array_equal(read_labels(dest), lab)
    np.testing.assert_array_equal(open_slide(dest, level=2).read(0, 75, 0, 125), lab[::4, ::4])
    assert open_slide(dest).pixel_size_um == (0.5, 0.5)
    # a failed second write leaves the first store in place
    w2 = OmeZarrLabelWriter(dest, lab.shape, np.uint32, chunk=128).create()
    w2.write(0, 0, np.ones((128, 128), np.uint32))
    w2.abort()
    np.testing.assert_array_equal(read_labels(dest), lab)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------ stitching
def _slide_file(tmp_path, h=1300, w=1500, seed=1, **kw) -> tuple[SyntheticSlide, Path]:
    s = SyntheticSlide(h, w, seed=seed, **kw)
    path = tmp_path / f"slide{seed}.ome.tif"
    if not path.exists():
        s.write_ome_tiff(path, tile=256)
    return s, path


@pytest.mark.parametrize("fmt", ["ome-zarr", "bigtiff"])
def test_cells_cut_by_tile_borders_come_out_whole(tmp_path, fmt):
    s, path = _slide_file(tmp_path)
    src = open_slide(path)
    tiles = TileSettings(tile_size=400, overlap=48)  # cells are at most 33 px across
    dest = tmp_path / ("l.ome.zarr" if fmt == "ome-zarr" else "l.ome.tif")
    table = tmp_path / "cells.csv"
    res = segment_slide(
        src, ThresholdSegmenter(s.threshold()), SlideOutput(dest, fmt=fmt, chunk=256, table=table), tiles
    )
    assert res.ok and res.grid["tiles"] == 4 * 5
    out = read_labels(dest)
    # the streamed per-cell table equals the in-memory one of the whole label map
    from cellsam_trt.outputs import TABLE_COLUMNS, cell_table

    labels = out.astype(np.int32)
    n = int(labels.max())
    seg = P.Segmentation(
        labels,
        np.zeros((0, 4), np.float32),
        None,
        np.zeros(n),
        P.Details(labels, np.arange(1, n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)),
    )
    want = cell_table(seg, 0)
    got = np.genfromtxt(table, delimiter=",", names=True)
    assert list(got.dtype.names) == list(TABLE_COLUMNS) and len(got) == res.cells
    for k in TABLE_COLUMNS[:8]:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5)
    gt = s.labels(0, s.height, 0, s.width)
    m = match_instances(gt.astype(np.int64), out.astype(np.int64))
    assert m.n_reference == m.n_test == res.cells and m.mean_iou == 1.0
    border, interior = s.cells_cut_by(TileGrid(s.height, s.width, tiles))
    assert len(border) > 100 and len(interior) > 100
    assert not (tmp_path / f".{dest.name}.work").exists()  # the work folder is removed


@pytest.mark.parametrize("overlap", [8, 48])
def test_a_model_that_misses_cut_cells_needs_an_overlap_of_a_cell(overlap, tmp_path):
    """With a segmenter that drops every cell touching its tile edge, cells crossing a tile
    border survive only through the neighbour that sees them whole: with an overlap of at least
    the largest cell (31 px) all of them come out whole (the owner's core is filled in from the
    neighbour's whole cell); with 8 px many are lost."""
    from cellsam_trt.slide.io import SlideSource

    n = 3 * (400 - overlap) + overlap  # 3 tiles per side, overlapping by exactly `overlap`
    s = SyntheticSlide(n, n, seed=1, pitch=37)  # tile edges do not line up with the cell pitch
    tiles = TileSettings(tile_size=400, overlap=overlap)
    dest = tmp_path / "l.ome.zarr"
    segment_slide(
        SlideSource(array=s.image(0, n, 0, n)),
        ThresholdSegmenter(s.threshold(), drop_edge_cells=True),
        SlideOutput(dest),
        tiles,
    )
    m = StreamedInstanceMatch()
    m.add(s.labels(0, n, 0, n), read_labels(dest))
    border, interior = s.cells_cut_by(TileGrid(n, n, tiles))
    assert len(border) > 50 and m.result(interior)["mean_iou"] == 1.0
    if overlap >= 31:
        assert m.result(border)["mean_iou"] == 1.0
    else:
        assert m.result(border)["mean_iou"] < 0.9


def test_without_links_border_cells_split(tmp_path):
    """The same run with the overlap links dropped: the cells the tile cores cut come out twice."""
    s, path = _slide_file(tmp_path)
    src = open_slide(path)
    out = tmp_path / "l.ome.zarr"
    grid, routed, store, ch = prepare_slide(
        src, SlideOutput(out), TileSettings(tile_size=400, overlap=48), None, None, None, None, {}
    )
    segment_tile_batch(ThresholdSegmenter(s.threshold()), src, store, range(len(grid)), None, ch)
    done = store.done()
    offsets = stitch.offsets_for(grid, done)
    linked, _ = stitch.global_lut(int(offsets[-1]), stitch.link_tiles(store, done, offsets))
    unlinked, _ = stitch.global_lut(int(offsets[-1]), np.zeros((0, 2), np.int64))
    gt = s.labels(0, s.height, 0, s.width).astype(np.int64)
    acc = {}
    for name, lut in (("linked", linked), ("unlinked", unlinked)):
        m = StreamedInstanceMatch()
        m.add(gt, stitch.render_region(store, done, offsets, lut, 0, s.height, 0, s.width))
        acc[name] = m.result()
    assert acc["linked"]["split"] == 0 and acc["linked"]["mean_iou"] == 1.0
    assert acc["unlinked"]["split"] > 50 and acc["unlinked"]["mean_iou"] < 0.99


def test_labels_do_not_depend_on_tile_order(tmp_path):
    s, path = _slide_file(tmp_path, 900, 1000, seed=2)
    src = open_slide(path)
    maps = []
    for order in (lambda n: range(n), lambda n: reversed(range(n))):
        out = tmp_path / f"l{len(maps)}.ome.zarr"
        grid, _, store, ch = prepare_slide(
            src, SlideOutput(out), TileSettings(tile_size=300, overlap=40), None, None, None, None, {}
        )
        for i in order(len(grid)):  # one tile at a time, in this order
            segment_tile_batch(ThresholdSegmenter(s.threshold()), src, store, [i], None, ch)
        finish_slide(store, src, SlideOutput(out))
        maps.append(read_labels(out))
    np.testing.assert_array_equal(maps[0], maps[1])
    assert maps[0].max() == len(np.unique(maps[0])) - 1  # labels 1..K, no gaps


class _FailOn:
    """An engine that fails on the tiles whose indices are listed (by call order), else thresholds."""

    def __init__(self, threshold, fail_calls=(), interrupt_after=None):
        self.inner = ThresholdSegmenter(threshold)
        self.fail_calls, self.interrupt_after, self.calls = set(fail_calls), interrupt_after, 0

    def segment_many(self, images, prompts=None, max_in_flight=1, **_):
        for i, img in enumerate(images):
            self.calls += 1
            if self.interrupt_after is not None and self.calls > self.interrupt_after:
                raise KeyboardInterrupt
            if self.calls in self.fail_calls:
                yield ItemResult(i, None, None, RuntimeError("device lost"), 0.0)
            else:
                yield ItemResult(i, None, self.inner.segment(img), None, 0.0)


def test_interrupted_slide_resumes_and_failed_tiles_are_reported(tmp_path):
    s, path = _slide_file(tmp_path, 900, 1000, seed=3)
    src = open_slide(path)
    tiles = TileSettings(tile_size=300, overlap=40)
    clean = tmp_path / "clean.ome.zarr"
    segment_slide(src, ThresholdSegmenter(s.threshold()), SlideOutput(clean), tiles)
    dest = tmp_path / "l.ome.zarr"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(src, _FailOn(s.threshold(), interrupt_after=5), SlideOutput(dest), tiles, batch=2)
    assert not dest.exists()
    # resumed: the 5 finished tiles are not redone; the tile of call 2 fails on its first try and
    # on its retry (call n - 5 + 1)
    n = len(TileGrid(900, 1000, tiles))
    eng = _FailOn(s.threshold(), fail_calls=(2, n - 5 + 1))
    res = segment_slide(src, eng, SlideOutput(dest), tiles, retries=1)
    assert res.tiles_resumed == 5
    assert len(res.failed) == 1 and eng.calls == n - 5 + 1
    i, region, msg = res.failed[0]
    assert "slide3.ome.tif: tile" in msg and "device lost" in msg
    y0, y1, x0, x1 = region
    out = read_labels(dest)
    grid = TileGrid(900, 1000, tiles)
    only = np.zeros(out.shape, bool)  # pixels of the failed core that no other tile covers
    only[y0:y1, x0:x1] = True
    for t in grid:
        if t.index != i:
            only[t.y0 : t.y1, t.x0 : t.x1] = False
    assert only.sum() > 1000 and not out[only].any()  # empty there, not stale
    assert (tmp_path / ".l.ome.zarr.work").exists()  # kept for the next run
    res = segment_slide(src, ThresholdSegmenter(s.threshold()), SlideOutput(dest), tiles)
    assert res.ok and res.tiles_segmented == 1 and res.tiles_resumed == n - 1
    np.testing.assert_array_equal(read_labels(dest), read_labels(clean))
    assert not (tmp_path / ".l.ome.zarr.work").exists()


class _BoxFill:
    """Fills each prompt box it receives (tile pixels) with its own label: shows where prompts land."""

    def segment_many(self, images, prompts=None, max_in_flight=1, **_):
        for i, (img, p) in enumerate(zip(images, prompts)):
            seg = P.empty(P.Prepared(None, *img.shape[:2]))
            for k, (x0, y0, x1, y1) in enumerate(np.round(p.boxes).astype(int)):
                seg.labels[y0:y1, x0:x1] = k + 1
            yield ItemResult(i, None, seg, None, 0.0)


def test_box_prompts_in_slide_pixels(tmp_path):
    s, path = _slide_file(tmp_path, 900, 1000, seed=5)
    c = s.cells()
    boxes = np.stack([c["cx"] - c["r"], c["cy"] - c["r"], c["cx"] + c["r"], c["cy"] + c["r"]], 1).astype(np.float32)
    boxes = boxes[::3]
    dest = tmp_path / "l.ome.zarr"
    res = segment_slide(
        open_slide(path), _BoxFill(), SlideOutput(dest), TileSettings(tile_size=256, overlap=48), boxes=boxes
    )
    out = read_labels(dest)
    expect = np.zeros_like(out, dtype=np.int64)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        expect[y0:y1, x0:x1] = k + 1
    m = match_instances(expect, out.astype(np.int64))
    assert res.cells == len(boxes) and m.mean_iou == 1.0 and not res.unrouted


def test_streamed_match_equals_in_memory_match():
    rng = np.random.default_rng(0)
    s = SyntheticSlide(300, 400, seed=6)
    gt = s.labels(0, 300, 0, 400).astype(np.int64)
    pred = np.where(rng.random(gt.shape) < 0.1, 0, gt)  # holes
    pred[:, 200:] = np.where(pred[:, 200:] > 0, pred[:, 200:] + 100000, 0)  # cells cut at column 200
    m = StreamedInstanceMatch()
    for y in range(0, 300, 128):
        for x in range(0, 400, 96):
            m.add(gt[y : y + 128, x : x + 96], pred[y : y + 128, x : x + 96])
    r = m.result()
    ref = match_instances(gt, pred)
    assert r["n_reference"] == ref.n_reference
    assert abs(r["mean_iou"] - ref.mean_iou) < 1e-12 and r["frac_matched_50"] == ref.frac_matched_50
    cut = np.unique(gt[:, 199][gt[:, 199] > 0])
    assert r["split"] == len(np.intersect1d(cut, np.unique(gt[:, 200])))
