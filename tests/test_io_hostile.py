"""Hostile inputs: no file can crash a job, exhaust memory or pass silently.

A corpus of bad files built here (decompression bomb, declared sizes a file cannot hold,
truncated files, files that are not what their name says, unsupported dtypes, images too
small), property-based tests of the readers and prompt parsers (hypothesis), and `cellsam-trt
run` on a folder of them: one line per bad file, no traceback, the good images written, peak
memory low.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cellsam_trt import cli
from cellsam_trt import io as cio
from cellsam_trt import pipeline as P
from cellsam_trt import preprocess as pre

BOMB_SIDE = 100_000  # 10^10 pixels: 10 GB of uint8 once decoded, 240 GB as the pipeline's float64 copy


# --------------------------------------------------------------------------- the corpus


def write_bomb(path: Path, side: int = BOMB_SIDE, tile: int = 1024) -> Path:
    """A ~80 KB zlib TIFF declaring side x side uint8 pixels: one compressed all-zero tile that
    every tile entry points at (legal TIFF; decodes to side^2 bytes)."""
    tifffile.imwrite(path, np.zeros((tile, tile), np.uint8), tile=(tile, tile), compression="zlib", metadata=None)
    n = (-(-side // tile)) ** 2
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tags = tf.pages[0].tags
        offset, count = tags["TileOffsets"].value[0], tags["TileByteCounts"].value[0]
        tags["ImageWidth"].overwrite(side)
        tags["ImageLength"].overwrite(side)
        tags["TileOffsets"].overwrite([offset] * n)
        tags["TileByteCounts"].overwrite([count] * n)
    return path


def write_lying_tiff(path: Path, side: int, compression=None) -> Path:
    """A one-strip 64 x 64 TIFF whose header is rewritten to declare side x side pixels."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression=compression, metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tags = tf.pages[0].tags
        tags["ImageWidth"].overwrite(side)
        tags["ImageLength"].overwrite(side)
        tags["RowsPerStrip"].overwrite(side)
    return path


def write_png_header(path: Path, height: int, width: int) -> Path:
    """A PNG whose IHDR declares height x width 8-bit grey pixels, with a few bytes of IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def write_npy_header(path: Path, header: dict, data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(data)
    return path


def good_images(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    img = (rng.random((48, 56)) * 4000).astype(np.uint16)
    out = {
        "good.tif": d / "good.tif",
        "good.png": d / "good.png",
        "good_f16.npy": d / "good_f16.npy",
        "good_bool.npy": d / "good_bool.npy",
    }
    tifffile.imwrite(out["good.tif"], img)
    iio.imwrite(out["good.png"], (img // 16).astype(np.uint8))
    np.save(out["good_f16.npy"], img.astype(np.float16))
    np.save(out["good_bool.npy"], img > 2000)
    return out


def bad_files(d: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (path, phrases the error must contain)."""
    bad: dict[str, tuple[Path, list[str]]] = {}

    def add(name, phrases):
        bad[name] = (d / name, phrases)
        return d / name

    write_bomb(add("bomb.tif", ["over the whole-image budget", "--tile-size 1024"]))
    write_lying_tiff(add("lying_raw.tif", ["corrupt TIFF", "cannot be held"]), 20_000)
    write_lying_tiff(add("lying_zlib.tif", ["corrupt TIFF", "deflate", "1032:1"]), 4_000, compression="zlib")
    tifffile.imwrite(d / "whole.tif", np.ones((256, 256), np.uint16))
    add("truncated.tif", ["truncated", "past the end of the file"]).write_bytes((d / "whole.tif").read_bytes()[:60_000])
    (d / "whole.tif").unlink()
    add("junk.tif", ["no image data"]).write_bytes(b"II*\x00garbage")
    add("text.tif", ["not a TIFF"]).write_text("hello, I am text\n")
    tifffile.imwrite(
        add("complex.tif", ["unsupported dtype complex64", "complex-valued"]), np.ones((40, 40), np.complex64)
    )
    tifffile.imwrite(add("line.tif", ["1 x 5000 pixels", "minimum image size is 2 x 2"]), np.ones((1, 5000), np.uint8))
    np.save(add("complex.npy", ["unsupported dtype complex128", "complex-valued"]), np.ones((40, 40), complex))
    add("text.npy", ["not a NumPy .npy file"]).write_text("1 2 3\n4 5 6\n")
    np.save(add("object.npy", ["unsupported dtype object"]), np.array([[None, 1], [2, 3]], object), allow_pickle=True)
    np.save(add("strings.npy", ["unsupported dtype <U1", "strings"]), np.array([["a", "b"], ["c", "d"]]))
    np.save(add("datetime.npy", ["unsupported dtype datetime64[s]"]), np.zeros((4, 4), "datetime64[s]"))
    np.save(add("one_pixel.npy", ["1 x 1 pixels", "shape (1, 1)", "minimum image size is 2 x 2"]), np.ones((1, 1)))
    np.save(add("line.npy", ["1 x 5000 pixels", "shape (1, 5000)"]), np.ones((1, 5000)))
    np.save(add("empty.npy", ["no image data"]), np.zeros((0, 5)))
    np.save(add("four_axes.npy", ["4 axes longer than 1"]), np.ones((2, 3, 8, 8), np.uint8))
    np.save(d / "whole.npy", np.ones((64, 64), np.float32))
    add("truncated.npy", ["corrupt or truncated .npy", "(64, 64) float32"]).write_bytes(
        (d / "whole.npy").read_bytes()[:4000]
    )
    (d / "whole.npy").unlink()
    write_npy_header(
        add("huge_header.npy", ["corrupt or truncated .npy", "(100000, 100000)"]),
        {"descr": "|u1", "fortran_order": False, "shape": (100_000, 100_000)},
        b"\0" * 100,
    )
    write_npy_header(
        add("negative.npy", ["negative dimension"]),
        {"descr": "<f4", "fortran_order": False, "shape": (-4, 5)},
        b"\0" * 100,
    )
    write_png_header(add("png_lie.png", ["corrupt PNG", "100000 x 100000", "cannot be held"]), 100_000, 100_000)
    iio.imwrite(add("line.png", ["1 x 300 pixels"]), np.ones((1, 300, 3), np.uint8))
    add("text.png", ["not an image Pillow can read"]).write_text("not a png")
    iio.imwrite(d / "whole.jpg", (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    add("truncated.jpg", ["corrupt or truncated"]).write_bytes((d / "whole.jpg").read_bytes()[:300])
    (d / "whole.jpg").unlink()
    if np.dtype(np.longdouble).itemsize > 8:
        np.save(add("float128.npy", ["unsupported dtype float128"]), np.ones((8, 8), np.longdouble))
    return bad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    return d, good_images(d), bad_files(d)


def test_each_bad_file_is_one_input_error_naming_it(corpus):
    _, good, bad = corpus
    for name, (path, phrases) in bad.items():
        with pytest.raises(cio.InputError) as e:
            cio.read_image(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        for phrase in phrases:
            assert phrase in msg, (name, msg)
        assert "pickle" not in msg, msg  # never points at unsafe loading
    for name, path in good.items():
        assert cio.read_image(path).shape[:2] == (48, 56), name


def test_header_before_pixels(corpus, monkeypatch):
    """The bomb is refused from its header: the decoder is never called."""
    _, _, bad = corpus
    monkeypatch.setattr(tifffile, "imread", lambda *a, **k: pytest.fail("decoded"))
    info = cio.inspect_image(bad["bomb.tif"][0])
    assert info.shape == (BOMB_SIDE, BOMB_SIDE) and info.dtype == np.uint8 and info.pixels == BOMB_SIDE**2
    with pytest.raises(cio.InputError, match="whole-image budget"):
        cio.read_image(bad["bomb.tif"][0])


def test_pixel_budget(tmp_path):
    img = np.ones((100, 80), np.uint8)
    for suffix in (".tif", ".png", ".npy"):
        path = tmp_path / f"x{suffix}"
        np.save(path, img) if suffix == ".npy" else iio.imwrite(path, img)
        assert cio.read_image(path, max_pixels=8000).shape == (100, 80)
        with pytest.raises(cio.InputError, match=r"100 x 80 = 8000 pixels is over the whole-image budget of 7999"):
            cio.read_image(path, max_pixels=7999)
    # many channels: the decoded array is bounded too, not only the image pixels
    np.save(tmp_path / "deep.npy", np.ones((64, 64, 20), np.float64))  # 4096 pixels, 160 B each
    assert cio.inspect_image(tmp_path / "deep.npy").pixels == 4096
    with pytest.raises(cio.InputError, match=r"decoding \(64, 64, 20\) float64 takes 640.0 KiB|decoding"):
        cio.read_image(tmp_path / "deep.npy", max_pixels=4096)


def test_default_budget_is_sized_to_memory():
    budget = cio.default_max_pixels()
    assert budget == int(cio.memory_bytes() * cio.MEMORY_SHARE) // cio.PIPELINE_BYTES_PER_PIXEL
    assert 10**6 < budget < BOMB_SIDE**2  # a machine of 256 MB .. 2.5 TB


def test_the_budget_is_for_the_machine_the_pipeline_really_runs():
    """The measured factor: prepare's peak is at most PIPELINE_BYTES_PER_PIXEL per pixel."""
    # tracemalloc sees NumPy's buffers (the peak RSS mark can be set by anything before)
    code = (
        "import tracemalloc, numpy as np\n"
        "from cellsam_trt import pipeline as P\n"
        "img = (np.random.default_rng(0).random((2048, 2048)) * 4000).astype(np.uint16)\n"
        "tracemalloc.start()\n"
        "P.prepare(img, P.SegmentSettings())\n"
        "print(tracemalloc.get_traced_memory()[1] / img.size)\n"
    )
    per_pixel = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    )
    assert 40 < per_pixel <= cio.PIPELINE_BYTES_PER_PIXEL


# --------------------------------------------------------------------------- arrays (the API)


@pytest.mark.parametrize(
    "dtype, phrase",
    [
        (np.complex64, "unsupported dtype complex64"),
        (object, "unsupported dtype object"),
        ("U3", "unsupported dtype <U3"),
        ("S3", "unsupported dtype |S3"),
        ("datetime64[ns]", "datetime64[ns]"),
        ("timedelta64[s]", "timedelta64[s]"),
        ([("a", "u1"), ("b", "f4")], "structured"),
    ],
)
def test_arrays_refused_by_dtype_name_before_any_cast(dtype, phrase):
    img = np.zeros((20, 20), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ComplexWarning (or any cast warning) fails the test
        with pytest.raises(ValueError, match=phrase.replace("[", r"\[").replace("|", r"\|")):
            P.prepare(img, P.SegmentSettings())


@pytest.mark.parametrize(
    "dtype",
    [
        bool,
        np.uint8,
        np.int8,
        np.uint16,
        np.int16,
        np.uint32,
        np.int32,
        np.uint64,
        np.int64,
        np.float16,
        np.float32,
        np.float64,
    ],
)
def test_supported_dtypes_prepare(dtype):
    img = (np.random.default_rng(0).random((24, 30)) * 100).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = P.prepare(img, P.SegmentSettings())
    assert (prepared.height, prepared.width) == (24, 30)


@pytest.mark.parametrize(
    "shape, phrase",
    [
        ((1, 1), "1 x 1 pixels"),
        ((1, 5000), "1 x 5000 pixels"),
        ((5000, 1), "5000 x 1 pixels"),
        ((1, 1, 3), "shape (1, 1, 3), a side of 1 pixel"),
        ((5,), "1-D shape (5,)"),
        ((), "0-D shape ()"),
        ((1, 1, 30, 30), "4-D shape (1, 1, 30, 30); np.squeeze"),
    ],
)
def test_array_shape_messages_are_accurate(shape, phrase):
    with pytest.raises(ValueError) as e:
        P.prepare(np.ones(shape, np.float32), P.SegmentSettings())
    assert phrase in str(e.value), str(e.value)


def test_minimum_size_is_what_the_pipeline_runs():
    """2 x 2 is accepted (and prepared); the channel axis taken is named for 3-D images."""
    assert pre.MIN_IMAGE_SIDE == 2
    assert P.prepare(np.arange(4.0).reshape(2, 2), P.SegmentSettings()).height == 2
    with pytest.raises(ValueError, match=r"the image is 1 x 3 pixels \(shape \(1, 3, 3\), channel axis 2"):
        pre.to_three_channels(np.ones((1, 3, 3)), channel_axis=-1)
    with pytest.raises(ValueError, match=r"at most 3 channels .* channel axis 0 \(the smallest axis\)"):
        pre.to_three_channels(np.ones((5, 40, 40)))


# --------------------------------------------------------------------------- property-based: readers


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the property tests' files (hypothesis runs many examples per test)."""
    return tmp_path_factory.mktemp("fuzz")


def read_or_refuse(path: Path, max_pixels: int = 10**6):
    """read_image's contract on any file: an image the pipeline takes, or one InputError naming it."""
    try:
        image = cio.read_image(path, max_pixels=max_pixels)
    except cio.InputError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
        assert "allow_pickle" not in str(e)
        return None
    assert isinstance(image, np.ndarray) and 2 <= image.ndim <= 3 and pre.unsupported_dtype(image.dtype) is None
    return image


def _valid_bytes(scratch: Path, suffix: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
    path = scratch / f"valid{seed}{suffix}"
    if suffix == ".npy":
        np.save(path, img.astype(np.float32))
    elif suffix == ".tif":
        tifffile.imwrite(path, img, compression="zlib" if seed % 2 else None, tile=(16, 16) if seed % 3 == 0 else None)
    else:
        iio.imwrite(path, img)
    return path.read_bytes()


SUFFIXES = [".tif", ".npy", ".png", ".jpg"]
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=2048))
def test_arbitrary_bytes(scratch, suffix, data):
    path = scratch / f"any{suffix}"
    path.write_bytes(data)
    read_or_refuse(path)


@FUZZ
@given(
    suffix=st.sampled_from(SUFFIXES),
    seed=st.integers(0, 5),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_valid_files(scratch, suffix, seed, edits, cut):
    """A valid file with bytes overwritten (headers included) and maybe truncated."""
    data = bytearray(_valid_bytes(scratch, suffix, seed))
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = scratch / f"mutated{suffix}"
    path.write_bytes(bytes(data))
    read_or_refuse(path)


DTYPES = [
    "|u1",
    "<u2",
    ">u2",
    "<i4",
    "<f2",
    "<f4",
    "<f8",
    "|b1",
    "<c8",
    "|O",
    "<U4",
    "|S2",
    "<M8[s]",
    "<m8[s]",
    "|V3",
    "<u8",
]


@FUZZ
@given(
    descr=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(-2, 300_000), max_size=4).map(tuple),
    fortran=st.booleans(),
    extra=st.integers(0, 3000),
)
def test_npy_headers(scratch, descr, shape, fortran, extra):
    """Any shape / dtype a header can declare, with any amount of data behind it."""
    path = scratch / "header.npy"
    write_npy_header(path, {"descr": descr, "fortran_order": fortran, "shape": shape}, b"\x01" * extra)
    image = read_or_refuse(path)
    declared = np.dtype(descr)
    if image is not None:
        assert image.dtype == declared and image.size == int(np.prod(shape))
    try:
        info = cio.inspect_image(path)
    except cio.InputError as e:
        assert "pickle" not in str(e)
        return
    assert info.shape == shape and info.dtype == declared


@FUZZ
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    channels=st.sampled_from([0, 1, 2, 3, 4]),
    dtype=st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, bool]),
    suffix=st.sampled_from([".tif", ".npy", ".png"]),
)
def test_header_agrees_with_the_pixels(scratch, height, width, channels, dtype, suffix):
    """For valid files inspect_image declares exactly what is decoded; tiny sides are refused."""
    shape = (height, width) if not channels else (height, width, channels)
    if suffix == ".png":
        assume(dtype in (np.uint8, np.uint16) and channels in (0, 3, 4))
        assume(not (dtype == np.uint16 and channels))
    if suffix == ".tif":  # tifffile stores other 3-D shapes as planes or pages (then its axes say so)
        assume(channels == 0 or channels == 3 and dtype in (np.uint8, np.uint16, np.float32))  # RGB: 8+ bits
    if suffix == ".npy":  # no axes in the file: the channel axis is the smallest (the pipeline's rule)
        assume(channels <= 1 or channels < min(height, width))
    img = (np.random.default_rng(height * width).random(shape) * 100).astype(dtype)
    path = scratch / f"valid{suffix}"
    if suffix == ".npy":
        np.save(path, img)
    elif suffix == ".tif":
        tifffile.imwrite(path, img, photometric="rgb" if channels else "minisblack")
    else:
        iio.imwrite(path, img)
    info = cio.inspect_image(path)
    image = read_or_refuse(path)
    if min(height, width) < pre.MIN_IMAGE_SIDE:
        assert image is None
        return
    assert image is not None and info.sides == (height, width)
    np.testing.assert_array_equal(image, np.squeeze(img))


ARRAY_DTYPES = [
    np.uint8,
    np.int16,
    np.float16,
    np.float32,
    np.float64,
    bool,
    np.complex64,
    np.complex128,
    object,
    "U2",
    "datetime64[D]",
    "timedelta64[s]",
]


@FUZZ
@given(dtype=st.sampled_from(ARRAY_DTYPES), shape=st.lists(st.integers(0, 6), max_size=4).map(tuple))
def test_validate_image_never_warns_and_names_the_problem(dtype, shape):
    img = np.zeros(shape, dtype=dtype)
    refused = pre.unsupported_dtype(img.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            P.validate_image(img)
        except ValueError as e:
            if refused:
                assert "unsupported dtype" in str(e) and str(img.dtype) in str(e)
            return
    assert refused is None and img.ndim in (2, 3)


# --------------------------------------------------------------------------- property-based: prompt files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=30,
)
coordinate = st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-(10**6), 10**6)


def _prompt_file(scratch: Path, value, key: str | None) -> Path:
    path = scratch / "prompts.json"
    path.write_text(json.dumps(value if key is None else {key: value}))
    return path


def _refused(fn, path):
    try:
        return fn(path)
    except cio.InputError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
        return None


@FUZZ
@given(value=json_values, key=st.sampled_from([None, "boxes", "points"]))
def test_prompt_parsers_on_any_json(scratch, value, key):
    path = _prompt_file(scratch, value, key)
    boxes = _refused(cio.read_boxes, path)
    if boxes is not None:
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and np.isfinite(boxes).all()
    points = _refused(cio.read_points, path)
    if points is not None:
        pts, labels = points
        assert pts.dtype == np.float32 and pts.ndim == 3 and pts.shape[2] == 2 and np.isfinite(pts).all()
        assert labels.shape == pts.shape[:2] and np.isin(labels, (-1, 0, 1)).all()


@FUZZ
@given(data=st.binary(max_size=200))
def test_prompt_parsers_on_any_bytes(scratch, data):
    path = scratch / "prompts.json"
    path.write_bytes(data)
    _refused(cio.read_boxes, path)
    _refused(cio.read_points, path)


@FUZZ
@given(boxes=st.lists(st.lists(coordinate, min_size=4, max_size=4), max_size=20))
def test_well_formed_boxes_round_trip(scratch, boxes):
    got = cio.read_boxes(_prompt_file(scratch, boxes, "boxes"))
    np.testing.assert_array_equal(got, np.asarray(boxes, np.float64).astype(np.float32).reshape(-1, 4))


@FUZZ
@given(n=st.integers(1, 6), p=st.integers(1, 4), data=st.data())
def test_well_formed_points_round_trip(scratch, n, p, data):
    pts = data.draw(
        st.lists(st.lists(st.lists(coordinate, min_size=2, max_size=2), min_size=p, max_size=p), min_size=n, max_size=n)
    )
    labels = data.draw(st.lists(st.lists(st.sampled_from([-1, 0, 1]), min_size=p, max_size=p), min_size=n, max_size=n))
    path = scratch / "points.json"
    path.write_text(json.dumps({"points": pts, "point_labels": labels}))
    got, got_labels = cio.read_points(path)
    np.testing.assert_array_equal(got, np.asarray(pts, np.float64).astype(np.float32))
    np.testing.assert_array_equal(got_labels, np.asarray(labels))


# --------------------------------------------------------------------------- the command line

BAD_PROMPTS = {
    "malformed.json": ('{"boxes": [[1, 2, 3, 4]', "not valid JSON"),
    "three.json": ('{"boxes": [[1, 2, 3], [4, 5, 6]]}', "boxes must be [x1, y1, x2, y2] (4 numbers); box 0 is [1, 2"),
    "strings.json": ('{"boxes": [["1", "2", "3", "4"]]}', "box 0 is"),
    "nan.json": ('{"boxes": [[NaN, 2, 3, 4]]}', "box 0 has a NaN"),
    "huge.json": ('{"boxes": [[1e999, 2, 3, 4]]}', "box 0 has a NaN, infinite"),
    "list.json": ("[[1, 2, 3, 4]]", "found a JSON list"),
    "key.json": ('{"box": [[1, 2, 3, 4]]}', "found an object with keys ['box']"),
    "binary.json": (b"\xff\xfe\x00garbage", "not"),
    "empty.json": ("", "not valid JSON"),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
}
BAD_POINTS = {
    "ragged.json": ('{"points": [[[1, 2]], [[1, 2], [3, 4]]]}', "prompt 1 has 2 points, prompt 0 has 1"),
    "labels.json": ('{"points": [[[1, 2]]], "point_labels": [[7]]}', "point labels must be 1"),
    "mismatch.json": ('{"points": [[[1, 2]], [[3, 4]]], "point_labels": [[1]]}', "point_labels must be 2 lists"),
    "three.json": ('{"points": [[[1, 2, 3]]]}', "points must be [x, y] (2 numbers); prompt 0 point 0 is [1, 2, 3]"),
}


@pytest.mark.parametrize("option, name", [("--boxes", n) for n in BAD_PROMPTS] + [("--points", n) for n in BAD_POINTS])
def test_bad_prompt_file_is_one_line_and_exit_2(tmp_path, capsys, option, name):
    text, phrase = (BAD_PROMPTS if option == "--boxes" else BAD_POINTS)[name]
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    tifffile.imwrite(tmp_path / "a.tif", np.ones((20, 20), np.uint8))
    rc = cli.main(
        [
            "run",
            str(tmp_path / "a.tif"),
            "--out",
            str(tmp_path / "out"),
            "--checkpoint",
            str(tmp_path / "never-loaded.pt"),
            option,
            str(path),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"cellsam-trt: {path}: ") and phrase in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was made


def _run_measured(args: list[str], limit: int, timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cellsam-trt args`` in a child of a wrapper process; -> (the wrapper's result, the CLI's
    peak RSS in bytes, from getrusage(RUSAGE_CHILDREN) in the wrapper, which has no other child).
    The CLI is killed if its resident memory passes ``limit`` (then its peak is reported as such)."""
    import psutil

    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'cellsam_trt.cli', *sys.argv[1:]])\n"
        "sys.stdout.write(f'\\nRC={r.returncode} MAXRSS={resource.getrusage(resource.RUSAGE_CHILDREN)"
        ".ru_maxrss * 1024}\\n')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed, t0 = False, time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                if child.memory_info().rss > limit:
                    child.kill()
                    killed = True
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    assert not killed, f"the CLI passed {limit} bytes of memory and was killed; stderr:\n{err[-3000:]}"
    assert tail.startswith("RC="), (out, err[-3000:])
    rc, rss = (int(v.split("=")[1]) for v in tail.split())
    result.returncode = rc
    return result, rss


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from cellsam_trt.model.cellsam import CellSAMConfig
    from cellsam_trt.model.synthetic import synthetic_checkpoint

    return synthetic_checkpoint(0, cache_dir=tmp_path_factory.mktemp("ck"), cfg=CellSAMConfig.tiny())


def test_folder_job_with_bomb_and_bad_files(corpus, tiny_checkpoint, tmp_path):
    """`cellsam-trt run folder/`: the bomb and every bad file are one line each, named; every good
    image is written; exit code 1; no traceback; peak memory of the whole job under 2 GiB."""
    d, good, bad = corpus
    out = tmp_path / "out"
    args = [
        "run",
        str(d),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--quiet",
        "--iou-threshold=-100",
        "--format",
        "npy",
    ]
    if cio.default_max_pixels() >= BOMB_SIDE**2:  # a machine of 2.5 TB would decode it: give a budget
        args += ["--max-pixels", str(10**8)]
    result, peak = _run_measured(args, limit=3 << 30)
    err = result.stderr
    assert "Traceback" not in err, err
    assert result.returncode == 1, err
    assert peak < 2 << 30, f"peak RSS {peak / 2**30:.2f} GiB"
    lines = err.splitlines()
    for name, (_, phrases) in bad.items():
        mine = [ln for ln in lines if name in ln]
        assert len(mine) == 1, (name, mine)
        assert mine[0].startswith("error: ") and all(p in mine[0] for p in phrases), mine[0]
        assert not (out / f"{Path(name).stem}_labels.npy").exists()
    for name in good:
        labels = np.load(out / f"{Path(name).stem}_labels.npy")
        assert labels.shape == (48, 56), name
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["failed"] == len(bad)
    assert f"{len(good)} segmented, 0 skipped, {len(bad)} failed" in err


def test_bad_prompt_file_in_a_real_process(tmp_path):
    """The installed entry point: one stderr line, exit code 2, no traceback."""
    (tmp_path / "b.json").write_text('{"boxes": [[1, 2, 3]]}')
    tifffile.imwrite(tmp_path / "a.tif", np.ones((20, 20), np.uint8))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellsam_trt.cli",
            "run",
            str(tmp_path / "a.tif"),
            "--out",
            str(tmp_path / "o"),
            "--synthetic-seed",
            "0",
            "--boxes",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "b.json: boxes must be [x1, y1, x2, y2] (4 numbers); box 0 is [1, 2, 3]" in r.stderr


def test_max_pixels_option_and_tiled_mode(corpus, tiny_checkpoint, tmp_path, capsys):
    """--max-pixels refuses a larger image by name with the tiled-mode hint; tiled mode (lazy
    reads) is not held to the whole-image budget."""
    _, good, _ = corpus
    common = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--quiet",
        "--iou-threshold=-100",
        "--max-pixels",
        "1000",
    ]
    rc = cli.main(["run", str(good["good.tif"]), "--out", str(tmp_path / "whole"), *common])
    err = capsys.readouterr().err
    assert rc == 1 and f"error: {good['good.tif']}: 48 x 56 = 2688 pixels is over the whole-image budget of 1000" in err
    assert "--tile-size 1024" in err
    pytest.importorskip("zarr")
    rc = cli.main(["run", str(good["good.tif"]), "--out", str(tmp_path / "tiled"), "--tile-size", "1024", *common])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "tiled" / "good_labels.ome.zarr").exists()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "x.tif", "--out", "o", "--max-pixels", "0"])
