"""`cellsam-trt run` end to end on a small model: formats, bad inputs, resume, atomic writes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from cellsam_trt import cli
from cellsam_trt import io as cio
from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.model.synthetic import synthetic_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return synthetic_checkpoint(0, cache_dir=tmp_path_factory.mktemp("ck"), cfg=CellSAMConfig.tiny())


@pytest.fixture
def images(tmp_path):
    img, boxes = cli.synthetic_cells(1, 160, 176, 8)
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "a.tif", img)
    np.save(d / "b.npy", img.astype(np.float32) / 7.0)
    import imageio.v3 as iio

    iio.imwrite(d / "c.png", (img // 256).astype(np.uint8))
    two = np.stack([img, np.roll(img, 5, 0)])  # (C, Y, X) OME-TIFF
    tifffile.imwrite(d / "d.ome.tif", two, ome=True, metadata={"axes": "CYX"})
    (tmp_path / "boxes.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    return d, tmp_path / "boxes.json"


def run(*args):
    # the small random model predicts low IoUs: keep every mask so that outputs have cells;
    # a checkpoint runs on the PyTorch reference unless a test names a backend
    args = [str(a) for a in args]
    if "--checkpoint" in args and "--backend" not in args:
        args += ["--backend", "torch"]
    return cli.main(["run", *args, "--quiet", "--iou-threshold=-100"])


def test_all_formats_and_outputs(tiny_checkpoint, images, tmp_path):
    d, boxes = images
    out = tmp_path / "out"
    rc = run(d, "--out", out, "--checkpoint", tiny_checkpoint, "--boxes", boxes, "--table", "csv", "--geojson")
    assert rc == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert [f["status"] for f in summary["files"]] == ["ok"] * 4
    for stem in ("a", "b", "c", "d.ome"):
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        assert labels.shape == (160, 176) and labels.dtype == np.uint16
        rows = (out / f"{stem}_cells.csv").read_text().splitlines()
        assert rows[0].startswith("label,bbox_min_row")
        assert len(rows) - 1 == len(np.unique(labels)) - 1
        gj = json.loads((out / f"{stem}_cells.geojson").read_text())
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(rows) - 1
    # table rows describe the label image
    labels = tifffile.imread(out / "a_labels.tif")
    table = (out / "a_cells.csv").read_text().splitlines()
    assert len(table) > 1
    first = table[1].split(",")
    lab, r0, c0, r1, c1, area = (int(v) for v in first[:6])
    assert (labels == lab).sum() == area
    ys, xs = np.nonzero(labels == lab)
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (r0, c0, r1, c1)


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_other_label_formats(tiny_checkpoint, images, tmp_path, fmt):
    d, boxes = images
    out = tmp_path / "out"
    assert run(d / "a.tif", "--out", out, "--checkpoint", tiny_checkpoint, "--boxes", boxes, "--format", fmt) == 0
    labels = cio.read_image(out / f"a_labels.{fmt}")
    ref = tifffile.imread(d / "a.tif")
    assert labels.shape == ref.shape and labels.dtype == np.uint16


def test_parquet_table(tiny_checkpoint, images, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    d, boxes = images
    out = tmp_path / "out"
    assert run(d / "a.tif", "--out", out, "--checkpoint", tiny_checkpoint, "--boxes", boxes, "--table", "parquet") == 0
    t = pq.read_table(out / "a_cells.parquet")
    assert t.column_names[:2] == ["label", "bbox_min_row"]
    labels = tifffile.imread(out / "a_labels.tif")
    assert t.num_rows == len(np.unique(labels)) - 1


def test_bad_files_are_named_and_the_job_goes_on(tiny_checkpoint, images, tmp_path, capsys):
    d, boxes = images
    (d / "corrupt.tif").write_bytes(b"II*\x00garbage")
    np.save(d / "empty.npy", np.zeros((0, 5)))
    np.save(d / "nan.npy", np.full((40, 40), np.nan, np.float32))
    np.save(d / "five.npy", np.zeros((5, 40, 40), np.uint8))
    out = tmp_path / "out"
    rc = run(d, "--out", out, "--checkpoint", tiny_checkpoint, "--boxes", boxes)
    assert rc == 1
    err = capsys.readouterr().err
    summary = json.loads((out / "run_summary.json").read_text())
    status = {f["input"].rsplit("/", 1)[-1]: f for f in summary["files"]}
    for name, problem in [
        ("corrupt.tif", "no image data"),
        ("empty.npy", "no image data"),
        ("nan.npy", "NaN"),
        ("five.npy", "channels"),
    ]:
        assert status[name]["status"] == "error" and problem in status[name]["error"]
        assert name in status[name]["error"] and name in err
        assert not (out / f"{name.rsplit('.', 1)[0]}_labels.tif").exists()
    assert status["a.tif"]["status"] == "ok" and (out / "a_labels.tif").exists()
    assert summary["failed"] == 4


def test_resume_skips_done_files(tiny_checkpoint, images, tmp_path):
    d, boxes = images
    out = tmp_path / "out"
    assert run(d, "--out", out, "--checkpoint", tiny_checkpoint, "--boxes", boxes) == 0
    (out / "b_labels.tif").unlink()  # as if the job had been interrupted before b
    before = (out / "a_labels.tif").stat().st_mtime_ns
    assert run(d, "--out", out, "--checkpoint", tiny_checkpoint, "--boxes", boxes) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    status = {f["input"].rsplit("/", 1)[-1]: f["status"] for f in summary["files"]}
    assert status["b.npy"] == "ok" and status["a.tif"].startswith("skipped")
    assert (out / "a_labels.tif").stat().st_mtime_ns == before
    assert run(d, "--out", out, "--checkpoint", tiny_checkpoint, "--boxes", boxes, "--overwrite") == 0
    assert (out / "a_labels.tif").stat().st_mtime_ns != before


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    dest = tmp_path / "x_labels.tif"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(KeyboardInterrupt):
        cio.write_labels(np.ones((4, 4), np.int32), dest)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_replaced_by_a_failed_write(tmp_path, monkeypatch):
    dest = tmp_path / "x_labels.npy"
    cio.write_labels(np.full((4, 4), 3), dest, "npy")
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        cio.write_labels(np.ones((4, 4)), dest, "npy")
    assert np.load(dest).max() == 3 and len(list(tmp_path.iterdir())) == 1


def test_label_dtype_grows_with_count(tmp_path):
    big = np.arange(70000, dtype=np.int64).reshape(280, 250)
    cio.write_labels(big, tmp_path / "big.tif")
    back = tifffile.imread(tmp_path / "big.tif")
    assert back.dtype == np.uint32 and np.array_equal(back, big)
    with pytest.raises(ValueError, match="16-bit PNG"):
        cio.write_labels(big, tmp_path / "big.png", "png")


def test_channel_mapping(tiny_checkpoint, images, tmp_path):
    d, boxes = images
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert run(d / "d.ome.tif", "--out", out1, "--checkpoint", tiny_checkpoint, "--boxes", boxes) == 0
    # explicit mapping: channel 0 nuclear, channel 1 whole-cell == the default (channels fill slots 1, 2)
    assert (
        run(
            d / "d.ome.tif",
            "--out",
            out2,
            "--checkpoint",
            tiny_checkpoint,
            "--boxes",
            boxes,
            "--nuclear-channel",
            "0",
            "--wholecell-channel",
            "1",
        )
        == 0
    )
    a, b = tifffile.imread(out1 / "d.ome_labels.tif"), tifffile.imread(out2 / "d.ome_labels.tif")
    np.testing.assert_array_equal(a, b)
    assert (
        run(
            d / "d.ome.tif",
            "--out",
            tmp_path / "o3",
            "--checkpoint",
            tiny_checkpoint,
            "--boxes",
            boxes,
            "--wholecell-channel",
            "7",
        )
        == 1
    )


def test_no_inputs(tmp_path):
    assert cli.main(["run", str(tmp_path / "nothing*.tif"), "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_console_script_info():
    out = subprocess.run([sys.executable, "-m", "cellsam_trt.cli", "info"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__ and "cuda_devices" in info


def test_run_on_an_export_uses_onnx_runtime(tiny_checkpoint, tiny_export, images, tmp_path):
    """--model DIR --backend ort runs ONNX Runtime; its labels match the PyTorch reference run."""
    d, boxes = images
    out_ort, out_torch = tmp_path / "ort", tmp_path / "torch"
    assert run(d / "a.tif", "--out", out_ort, "--model", tiny_export, "--boxes", boxes, "--backend", "ort") == 0
    summary = json.loads((out_ort / "run_summary.json").read_text())
    assert summary["backend"] == "ort" and summary["files"][0]["status"] == "ok"
    ckpt = json.loads((tiny_export / "manifest.json").read_text())["checkpoint"]["path"]
    assert run(d / "a.tif", "--out", out_torch, "--checkpoint", ckpt, "--boxes", boxes) == 0
    a, b = tifffile.imread(out_ort / "a_labels.tif"), tifffile.imread(out_torch / "a_labels.tif")
    assert a.max() > 0 and (a == b).mean() >= 0.999


def test_trt_backend_needs_engines_and_tensorrt(tiny_export, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((20, 20), np.uint8))
    assert (
        cli.main(
            [
                "run",
                str(tmp_path / "x.npy"),
                "--out",
                str(tmp_path / "o"),
                "--backend",
                "trt",
                "--model",
                str(tiny_export),
                "--quiet",
            ]
        )
        == 2
    )
    assert "backend trt needs an engine directory" in capsys.readouterr().err
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "image_encoder.engine").write_bytes(b"not an engine")
    assert (
        cli.main(
            [
                "run",
                str(tmp_path / "x.npy"),
                "--out",
                str(tmp_path / "o"),
                "--model",
                str(engines),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 2
    )
    assert "CUDA device, not the CPU" in capsys.readouterr().err


def test_a_run_without_a_model_says_how_to_name_one(images, tmp_path, capsys, monkeypatch):
    """No model flag: the official cellsam_general from ~/.deepcell/models; where it is not
    installed, one line with both ways to get it and the other ways to name a model."""
    d, _ = images
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty home: no official weights
    assert cli.main(["run", str(d / "a.tif"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model given and the default model cellsam_general" in err
    assert str(tmp_path / "home" / ".deepcell" / "models" / "cellsam_v1.2" / "cellsam_general.pt") in err
    assert "DEEPCELL_ACCESS_TOKEN=<token> cellsam-trt fetch" in err and "cellsam-trt fetch --archive" in err
    assert "--model" in err and "--synthetic-seed" in err
    assert not (tmp_path / "o" / "a_labels.tif").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--backend", "ort", "--precision", "fp16"], "ONNX Runtime on the CPU runs fp32 or int8"),
        (["--backend", "torch", "--precision", "int8"], "torch backend runs fp32, fp16 or bf16"),
        (["--device", "tpu"], "device must be"),
    ],
)
def test_requests_that_cannot_be_met_are_one_line(tiny_checkpoint, images, tmp_path, flags, message):
    """No traceback and no silent fallback: the CLI exits with one line naming the reason."""
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d, boxes = images
    cmd = [
        sys.executable,
        "-m",
        "cellsam_trt.cli",
        "run",
        str(d / "a.tif"),
        "--out",
        str(tmp_path / "o"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--boxes",
        str(boxes),
        "--quiet",
        *flags,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "a_labels.tif").exists()


def test_channel_flags_with_a_leading_channel_axis(tiny_checkpoint, tmp_path):
    """--channel-axis 0 with --nuclear-channel / --wholecell-channel on a (C, H, W) stack: the
    chosen planes reach the model (this failed every image before: the axis was dropped)."""
    img, boxes = cli.synthetic_cells(2, 80, 64, 4)
    stack = np.stack([img, np.roll(img, 3, 1)])  # (2, 80, 64)
    np.save(tmp_path / "chw.npy", stack)
    np.save(tmp_path / "hwc.npy", np.moveaxis(stack, 0, -1))
    (tmp_path / "b.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    common = [
        "--checkpoint",
        tiny_checkpoint,
        "--boxes",
        tmp_path / "b.json",
        "--format",
        "npy",
        "--nuclear-channel",
        "0",
        "--wholecell-channel",
        "1",
    ]
    assert run(tmp_path / "chw.npy", "--out", tmp_path / "o1", "--channel-axis", "0", *common) == 0
    assert run(tmp_path / "hwc.npy", "--out", tmp_path / "o2", "--channel-axis", "-1", *common) == 0
    a, b = np.load(tmp_path / "o1" / "chw_labels.npy"), np.load(tmp_path / "o2" / "hwc_labels.npy")
    assert a.shape == (80, 64) and a.max() > 0
    np.testing.assert_array_equal(a, b)


def test_auto_backend_runs_a_checkpoint_on_onnx_runtime_on_the_cpu(tiny_checkpoint, images, tmp_path):
    d, boxes = images
    cache = tmp_path / "exports"
    assert (
        cli.main(
            [
                "run",
                str(d / "a.tif"),
                "--out",
                str(tmp_path / "o"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--boxes",
                str(boxes),
                "--export-cache",
                str(cache),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    # the CPU default: OpenVINO where installed (tests/test_openvino_backend.py), else ONNX Runtime
    default, name = ("openvino", "OpenVINO") if importlib.util.find_spec("openvino") else ("ort", "ONNX Runtime")
    assert summary["backend"] == default and summary["scheduler"] == "cpu" and name in summary["reason"]


def test_ort_backend_exports_a_checkpoint_on_the_fly(tiny_checkpoint, images, tmp_path):
    """--backend ort --checkpoint FILE: exported once into the cache, then ONNX Runtime; same
    labels as the PyTorch reference on the checkpoint."""
    d, boxes = images
    cache = tmp_path / "exports"
    common = ["--checkpoint", tiny_checkpoint, "--boxes", boxes, "--export-cache", cache]
    assert run(d / "a.tif", "--out", tmp_path / "ort", "--backend", "ort", *common) == 0
    [export] = list(cache.iterdir())
    assert (export / "manifest.json").is_file() and (export / "image_encoder.onnx").is_file()
    mtime = (export / "manifest.json").stat().st_mtime_ns
    assert run(d / "b.npy", "--out", tmp_path / "ort", "--backend", "ort", *common) == 0
    assert (export / "manifest.json").stat().st_mtime_ns == mtime  # reused, not exported again
    summary = json.loads((tmp_path / "ort" / "run_summary.json").read_text())
    assert summary["backend"] == "ort" and summary["export"] == str(export)
    assert summary["model"] == str(tiny_checkpoint)
    assert run(d / "a.tif", "--out", tmp_path / "torch", "--checkpoint", tiny_checkpoint, "--boxes", boxes) == 0
    a, b = tifffile.imread(tmp_path / "ort" / "a_labels.tif"), tifffile.imread(tmp_path / "torch" / "a_labels.tif")
    assert a.max() > 0 and (a == b).mean() >= 0.999


def test_point_prompts_from_a_file(tiny_export, tmp_path):
    """--points: one prompt per row; the labels equal the engine's on the same points."""
    from cellsam_trt import CellSAM
    from cellsam_trt.pipeline import SegmentSettings

    img, boxes = cli.synthetic_cells(3, 160, 176, 6)
    tifffile.imwrite(tmp_path / "p.tif", img)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    points = [[[float(x), float(y)]] for x, y in centres]
    (tmp_path / "points.json").write_text(json.dumps({"points": points, "point_labels": [[1]] * len(points)}))
    assert (
        run(
            tmp_path / "p.tif",
            "--out",
            tmp_path / "o",
            "--model",
            tiny_export,
            "--points",
            tmp_path / "points.json",
            "--format",
            "npy",
        )
        == 0
    )
    got = np.load(tmp_path / "o" / "p_labels.npy")
    engine = CellSAM.load(tiny_export, settings=SegmentSettings(iou_threshold=-100))
    want = engine.segment(img, points=np.array(points, np.float32), point_labels=np.ones((len(points), 1)))
    assert want.labels.max() > 0
    np.testing.assert_array_equal(got, want.labels)
    (tmp_path / "bad.json").write_text(json.dumps({"points": [[1, 2, 3]]}))
    with pytest.raises(cio.InputError, match="bad.json: points must be"):
        cio.read_points(tmp_path / "bad.json")


def test_bench_reports_rates_and_machine(tiny_export, tmp_path):
    out = tmp_path / "bench.json"
    assert (
        cli.main(
            [
                "bench",
                "--model",
                str(tiny_export),
                "--backend",
                "ort",
                "--images",
                "2",
                "--size",
                "128",
                "160",
                "--cells",
                "5",
                "--iou-threshold=-100",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert len(r["seconds_per_image"]) == 2 and all(t > 0 for t in r["seconds_per_image"])
    assert r["images_per_s_sequential"] > 0 and r["images_per_s_segment_many"] > 0 and r["failed"] == []
    assert r["backend"] == "ort" and r["machine"]["cpu_count"] >= 1 and min(r["cells"]) > 0


def test_progress_bar_shows_images_per_second(tiny_checkpoint, images, tmp_path, capsys):
    d, boxes = images
    rc = cli.main(
        [
            "run",
            str(d / "a.tif"),
            str(d / "b.npy"),
            "--out",
            str(tmp_path / "o"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--backend",
            "torch",
            "--boxes",
            str(boxes),
            "--iou-threshold=-100",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "images/s" in err
