"""Tiled mode of ``cellsam-trt run`` with the CellSAM engine (tiny export, ONNX Runtime), in one
process and on a local Dask cluster (worker processes on loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from cellsam_trt import cli
from cellsam_trt.slide.grid import TileSettings
from cellsam_trt.slide.io import open_slide, read_labels
from cellsam_trt.slide.run import SlideOutput, segment_slide
from cellsam_trt.slide.synthetic import SyntheticSlide, ThresholdSegmenter

pytest.importorskip("distributed")


def run(*args):
    # the tiny random model predicts low IoUs: keep every mask so that outputs have cells
    return cli.main(["run", *map(str, args), "--quiet", "--iou-threshold=-100", "--threads", "1"])


def box_file(s: SyntheticSlide, path, every=1):
    """The slide's cell boxes as a --boxes file (the random tiny model finds no cells itself)."""
    c = s.cells()
    boxes = np.stack([c["cx"] - c["r"], c["cy"] - c["r"], c["cx"] + c["r"], c["cy"] + c["r"]], 1)[::every]
    path.write_text(json.dumps({"boxes": boxes.tolist()}))
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("slide")
    SyntheticSlide(560, 620, seed=7).write_ome_tiff(d / "s.ome.tif", tile=256)
    return d / "s.ome.tif"


def test_one_tile_equals_the_plain_run(tiny_export, tmp_path):
    """A slide no larger than a tile is one tile: the tiled path gives the plain path's labels."""
    s = SyntheticSlide(300, 340, seed=8)
    tifffile.imwrite(tmp_path / "a.tif", s.image(0, 300, 0, 340))
    boxes = box_file(s, tmp_path / "boxes.json")
    assert (
        run(
            tmp_path / "a.tif", "--out", tmp_path / "plain", "--model", tiny_export, "--format", "npy", "--boxes", boxes
        )
        == 0
    )
    assert (
        run(
            tmp_path / "a.tif",
            "--out",
            tmp_path / "tiled",
            "--model",
            tiny_export,
            "--tile-size",
            "1024",
            "--boxes",
            boxes,
        )
        == 0
    )
    plain = np.load(tmp_path / "plain" / "a_labels.npy")
    tiled = read_labels(tmp_path / "tiled" / "a_labels.ome.zarr")
    assert plain.max() > 0
    np.testing.assert_array_equal(tiled, plain)


def test_dask_local_cluster_gives_the_single_process_labels(tiny_export, slide, tmp_path, capsys):
    boxes = box_file(SyntheticSlide(560, 620, seed=7), tmp_path / "boxes.json", every=2)
    common = ["--model", tiny_export, "--tile-size", "384", "--overlap", "64", "--chunk", "256", "--boxes", boxes]
    assert run(slide, "--out", tmp_path / "one", *common, "--table", "csv") == 0
    assert (
        run(
            slide,
            "--out",
            tmp_path / "dask",
            *common,
            "--dask-local",
            "2",
            "--slide-format",
            "bigtiff",
            "--table",
            "csv",
        )
        == 0
    )
    assert (tmp_path / "one" / "s.ome_cells.csv").read_text() == (tmp_path / "dask" / "s.ome_cells.csv").read_text()
    one = read_labels(tmp_path / "one" / "s.ome_labels.ome.zarr")
    dask = read_labels(tmp_path / "dask" / "s.ome_labels.ome.tif")
    assert one.max() > 0 and len(np.unique(one)) - 1 == one.max()
    np.testing.assert_array_equal(dask, one)
    summary = json.loads((tmp_path / "dask" / "run_summary.json").read_text())
    entry = summary["files"][0]
    assert entry["status"] == "ok" and entry["slide"]["grid"]["tiles"] == 4 and entry["cells"] == one.max()
    # an existing scheduler (--dask ADDRESS) gives the same labels
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        assert (
            run(slide, "--out", tmp_path / "addr", *common, "--dask", cluster.scheduler_address, "--table", "csv") == 0
        )
    np.testing.assert_array_equal(read_labels(tmp_path / "addr" / "s.ome_labels.ome.zarr"), one)
    assert (tmp_path / "addr" / "s.ome_cells.csv").read_text() == (tmp_path / "one" / "s.ome_cells.csv").read_text()
    # a second run skips the finished slide
    assert run(slide, "--out", tmp_path / "one", *common) == 0
    assert json.loads((tmp_path / "one" / "run_summary.json").read_text())["files"][0]["status"].startswith("skipped")


def test_dask_reports_a_bad_tile_and_keeps_the_rest(tiny_export, tmp_path, capsys):
    s = SyntheticSlide(560, 620, seed=9)
    img = s.image(0, 560, 0, 620).astype(np.float32)
    img[20:40, 20:40] = np.nan  # inside the first tile only
    np.save(tmp_path / "bad.npy", img)
    rc = run(
        tmp_path / "bad.npy",
        "--out",
        tmp_path / "out",
        "--model",
        tiny_export,
        "--tile-size",
        "384",
        "--overlap",
        "64",
        "--dask-local",
        "2",
        "--boxes",
        box_file(s, tmp_path / "boxes.json"),
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "bad.npy: tile 0 (rows 0:384, cols 0:384)" in err and "NaN" in err
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    entry = summary["files"][0]
    assert entry["status"] == "error" and [t["tile"] for t in entry["slide"]["failed_tiles"]] == [0]
    assert (tmp_path / "out" / ".bad_labels.ome.zarr.work").is_dir()  # the next run redoes tile 0 only
    # the other tiles are there, as in a single-process run of the same slide
    rc = run(
        tmp_path / "bad.npy",
        "--out",
        tmp_path / "one",
        "--model",
        tiny_export,
        "--tile-size",
        "384",
        "--overlap",
        "64",
        "--boxes",
        tmp_path / "boxes.json",
    )
    assert rc == 1
    one = json.loads((tmp_path / "one" / "run_summary.json").read_text())["files"][0]
    assert one["slide"]["failed_tiles"] == entry["slide"]["failed_tiles"]
    labels = read_labels(tmp_path / "out" / "bad_labels.ome.zarr")
    assert labels.any()
    np.testing.assert_array_equal(labels, read_labels(tmp_path / "one" / "bad_labels.ome.zarr"))


def test_scale_from_pixel_sizes(slide):
    """--target-pixel-size resamples by the file's pixel size (0.5 um here): tiles of 2x the pixels."""
    args = cli.build_parser().parse_args(
        ["run", str(slide), "--out", "x", "--tile-size", "512", "--target-pixel-size", "1.0"]
    )
    src = open_slide(slide)
    t = cli._tile_settings(args, src)
    assert t.scale == 0.5 and t.tile_size == 512
    from cellsam_trt.slide.grid import TileGrid

    assert TileGrid(src.height, src.width, t).tile == 1024
    args = cli.build_parser().parse_args(
        ["run", "a.npy", "--out", "x", "--tile-size", "512", "--target-pixel-size", "1"]
    )
    with pytest.raises(ValueError, match="states no pixel size"):
        cli._tile_settings(args, _no_pixel_size())


def _no_pixel_size():
    from cellsam_trt.slide.io import SlideSource

    return SlideSource(array=np.zeros((64, 64), np.uint8))


class FlakyThreshold:
    """Engine factory for the workers: the first tile each worker process sees fails once."""

    def __init__(self, threshold):
        self.threshold = threshold

    def __call__(self):
        return _Flaky(ThresholdSegmenter(self.threshold))


class _Flaky:
    failed = False

    def __init__(self, inner):
        self.inner = inner

    def segment_many(self, images, prompts=None, **kw):
        from cellsam_trt.scheduler import ItemResult

        for i, img in enumerate(images):
            if not _Flaky.failed:
                _Flaky.failed = True
                yield ItemResult(i, None, None, RuntimeError("transient worker fault"), 0.0)
            else:
                yield ItemResult(i, None, self.inner.segment(img), None, 0.0)


def test_dask_retries_failed_tiles(slide, tmp_path):
    from distributed import Client

    from cellsam_trt.slide.distributed import local_cluster, segment_slide_dask

    s = SyntheticSlide(560, 620, seed=7)
    src = open_slide(slide)
    tiles = TileSettings(tile_size=256, overlap=48)
    ref = segment_slide(src, ThresholdSegmenter(s.threshold()), SlideOutput(tmp_path / "ref.ome.zarr"), tiles)
    with local_cluster(2) as cluster, Client(cluster) as client:
        no_retry = segment_slide_dask(
            client, src, FlakyThreshold(s.threshold()), SlideOutput(tmp_path / "a.ome.zarr"), tiles, retries=0, batch=2
        )
        assert 1 <= len(no_retry.failed) <= 2 and "transient worker fault" in no_retry.failed[0][2]
        client.restart()
        res = segment_slide_dask(
            client, src, FlakyThreshold(s.threshold()), SlideOutput(tmp_path / "b.ome.zarr"), tiles, retries=2, batch=2
        )
    assert res.ok and res.cells == ref.cells
    np.testing.assert_array_equal(read_labels(tmp_path / "b.ome.zarr"), read_labels(tmp_path / "ref.ome.zarr"))
