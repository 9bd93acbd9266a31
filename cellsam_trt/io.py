"""Reading images and prompt files, writing label maps atomically.

Readers: TIFF / OME-TIFF (tifffile), PNG / JPEG (imageio on Pillow), NPY. Every image file is
inspected first (``inspect_image``: the shape and dtype its header declares, read with the
library's own header API; nothing decoded) and checked (``check_image``: dtype, shape, the
whole-image pixel budget ``default_max_pixels``) before a pixel is decoded; a file that is
corrupt, unsupported or too large is one ``InputError`` that names it and the problem.

Writers: compressed TIFF (uint16 or uint32 by label count), NPY, 16-bit PNG. Every write goes
to a temporary file in the destination folder and is renamed into place, so an interrupted job
never leaves a half-written output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .preprocess import MIN_IMAGE_SIDE, unsupported_dtype

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy"}

# Peak memory of the whole-image pipeline per image pixel, in bytes. Measured (peak RSS over the
# decoded image, ``pipeline.prepare`` and a full ``segment``): 96-99 B/px for 4096 x 4096 uint16,
# 4096 x 4096 x 3 uint8 and 8192 x 4096 float32 images. It is the (H, W, 3) float64 copy of the
# channels (24 B), the normalised (H, W, 3) float64 image (24 B) and one channel's percentile clip
# and CLAHE temporaries (float64 copy, nonzero indices and values, rescaled copy, CLAHE's padded
# float image: ~50 B). Rounded up to 128 for the decoded input (up to 3 x 8 B) and the label maps.
PIPELINE_BYTES_PER_PIXEL = 128
# Share of the machine's memory one whole image may take: the rest is for the model, the other
# images in flight (``--batch-size``) and everything else on the machine.
MEMORY_SHARE = 0.5
FALLBACK_MEMORY = 8 << 30  # where the memory size cannot be read (Windows): assume 8 GiB
TILE_HINT = "segment it in tiles instead (--tile-size 1024)"

# Largest expansion of a compressed chunk, for a declared size that a file cannot hold:
# deflate codes at most 258 bytes in 2 bits (1032:1, zlib's documented limit); PackBits repeats
# a byte at most 128 times in a 2-byte packet (64:1); uncompressed data is stored as is (1:1).
# Other codecs (LZW, JPEG, ZSTD, ...) have no such bound that could be justified: only the
# pixel budget applies to them.
DEFLATE_MAX_RATIO = 1032
_MAX_RATIO = {1: 1, 8: DEFLATE_MAX_RATIO, 32946: DEFLATE_MAX_RATIO, 32773: 64}  # TIFF Compression tag -> ratio

_PIL_LOCK = threading.Lock()  # Pillow's decompression-bomb limit is a module global: set per call under it


class InputError(ValueError):
    """An input file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- pixel budget


@lru_cache(maxsize=1)
def memory_bytes() -> int:
    """This machine's memory in bytes: physical memory (``sysconf``), or the container's limit
    (cgroup v2 / v1) where that is lower; ``FALLBACK_MEMORY`` where neither can be read."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0:
            sizes.append(int(text))
    sizes = [v for v in sizes if v > 0]
    return min(sizes) if sizes else FALLBACK_MEMORY


def default_max_pixels() -> int:
    """The whole-image pixel budget: ``MEMORY_SHARE`` of ``memory_bytes()`` divided by
    ``PIPELINE_BYTES_PER_PIXEL`` (memory / 256: 98 megapixels on a 23.5 GiB machine)."""
    return max(1, int(memory_bytes() * MEMORY_SHARE) // PIPELINE_BYTES_PER_PIXEL)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- header inspection


@dataclass(frozen=True)
class ImageInfo:
    """What an image file declares, read from its header without decoding a pixel.

    format: "tiff", "npy", "png" or "jpeg". shape / dtype: the array the reader decodes (before
    ``read_image`` squeezes axes of length 1). axes: a letter per axis where the format says
    (tifffile's: Y, X rows and columns, S samples, C channels, ...; Pillow images: [I]YX[S]),
    None for NPY. series: (shape, dtype) of every series of a TIFF (the first is read).
    """

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str | None = None
    series: tuple[tuple[tuple[int, ...], np.dtype], ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded array."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def sides(self) -> tuple[int, int]:
        """(height, width) in pixels: the Y and X axes where the format names them, else from
        the squeezed shape (2-D: both axes; 3-D: all but the smallest axis, the channel axis by
        the pipeline's default rule; fewer than 2 axes: sides of 1)."""
        if self.axes and "Y" in self.axes and "X" in self.axes and len(self.axes) == len(self.shape):
            return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]
        sq = tuple(s for s in self.shape if s != 1)
        if len(sq) < 2:
            return ((1, 1) + sq)[-2:]
        if len(sq) == 3:
            c = int(np.argmin(sq))
            sq = sq[:c] + sq[c + 1 :]
        return sq[0], sq[1]

    @property
    def pixels(self) -> int:
        h, w = self.sides
        return h * w


def inspect_image(path: str | os.PathLike) -> ImageInfo:
    """The shape and dtype an image file declares, from its header only (``ImageInfo``).

    TIFF / OME-TIFF: tifffile's series and pages; every page of every series is checked against
    the file: a chunk (strip or tile) past the end of the file, or smaller than its declared
    pixels can be at the codec's largest ratio (uncompressed 1:1, deflate 1032:1, PackBits
    64:1), is a corrupt file. NPY: NumPy's header reader (never unpickling); data shorter than
    the header's shape and dtype is a corrupt file. PNG / JPEG: Pillow's header (through
    imageio, as ``read_image`` decodes it); a PNG smaller than its pixels at deflate's largest
    ratio is a corrupt file. Raises ``InputError`` naming the file and the problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix!r} (supported: {', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(f"{path}: not a file")
        if size == 0:
            raise InputError(f"{path}: no image data (empty file)")
        if suffix in (".tif", ".tiff"):
            return _inspect_tiff(path)
        if suffix == ".npy":
            return _inspect_npy(path, size)
        return _inspect_pillow(path, size)
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read the file's header (corrupt file?)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read: {e.strerror or e}") from e
    except Exception as e:  # the libraries' own errors on a malformed header
        raise InputError(f"{path}: cannot be read (corrupt or not {_kind(suffix)}): {type(e).__name__}: {e}") from e


def _kind(suffix: str) -> str:
    return {".npy": "a NumPy .npy file", ".png": "a PNG file", ".jpg": "a JPEG file", ".jpeg": "a JPEG file"}.get(
        suffix, "a TIFF file"
    )


class _QuietInThisThread(logging.Filter):
    """Drops the records of a logger while the current thread is inside ``quiet()``: the header
    pass reports a bad file in one InputError; tifffile's own warnings about it would be more
    lines without the file's name. (Decoding a file that passed logs them as usual.)"""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)

    @contextmanager
    def quiet(self):
        self.local.depth = getattr(self.local, "depth", 0) + 1
        try:
            yield
        finally:
            self.local.depth -= 1


_TIFF_LOG = _QuietInThisThread()
logging.getLogger("tifffile").addFilter(_TIFF_LOG)


def _inspect_tiff(path: Path) -> ImageInfo:
    import tifffile

    with _TIFF_LOG.quiet(), tifffile.TiffFile(path) as tf:
        series = list(tf.series)
        if not series or not len(tf.pages):
            raise InputError(f"{path}: no image data (empty or corrupt TIFF: no image in the file)")
        for s in series:
            for page in s.pages:
                if page is not None:
                    _check_tiff_page(path, page)
        first = series[0]
        return ImageInfo(
            path,
            "tiff",
            tuple(int(v) for v in first.shape),
            np.dtype(first.dtype),
            first.axes,
            tuple((tuple(int(v) for v in s.shape), np.dtype(s.dtype)) for s in series),
        )


def _check_tiff_page(path: Path, page) -> None:
    """A page whose chunks lie past the end of its file, or hold fewer bytes than their pixels
    need at the codec's largest ratio, is corrupt (InputError)."""
    key = page.keyframe
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if not len(counts):
        return
    file_size = page.parent.filehandle.size
    ends = offsets + counts
    if (counts < 0).any() or ((counts > 0) & (ends > file_size)).any():
        raise InputError(
            f"{path}: corrupt or truncated TIFF: image data declared past the end of the file "
            f"(up to byte {int(ends.max())}, the file has {file_size} bytes; page {page.index})"
        )
    ratio = _MAX_RATIO.get(int(key.compression))
    if ratio is None or key.imagedepth > 1 or key.bitspersample <= 0:
        return
    chunks = tuple(int(v) for v in key.chunks)
    contig = int(key.planarconfig) == 1 and key.samplesperpixel > 1
    row_values = chunks[-1] * (chunks[-2] if contig else 1)
    rows = math.prod(chunks[:-2] if contig else chunks[:-1])
    row_bytes = -(-row_values * key.bitspersample // 8)
    need = np.full(len(counts), rows * row_bytes, dtype=np.int64)
    if not key.is_tiled and key.rowsperstrip:  # the last strip of each plane may be shorter
        rps = min(int(key.rowsperstrip), int(key.imagelength))
        per_plane = max(1, -(-key.imagelength // rps))
        need[:] = rps * row_bytes
        need[per_plane - 1 :: per_plane] = (key.imagelength - rps * (per_plane - 1)) * row_bytes
    short = (counts > 0) & (counts * ratio < need)
    if short.any():
        i = int(np.flatnonzero(short)[0])
        codec = {1: "uncompressed", 32773: "PackBits"}.get(int(key.compression), "deflate")
        raise InputError(
            f"{path}: corrupt TIFF: a chunk of {key.shape} {key.dtype} pixels declares {int(need[i])} "
            f"bytes but holds {int(counts[i])} ({codec}, at most {ratio}:1; page {page.index}, "
            f"chunk {i}): the declared size cannot be held by the file"
        )


def _inspect_npy(path: Path, file_size: int) -> ImageInfo:
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
        except ValueError:
            raise InputError(
                f"{path}: not a NumPy .npy file (it does not start with NumPy's magic string \\x93NUMPY)"
            ) from None
        if version == (3, 0):  # written only for structured arrays with non-Latin-1 field names
            raise InputError(
                f"{path}: NumPy .npy format version 3.0 (structured records, not an image) is not supported"
            )
        if version not in ((1, 0), (2, 0)):
            raise InputError(f"{path}: corrupt NumPy .npy header: unknown format version {version[0]}.{version[1]}")
        try:
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as e:
            raise InputError(f"{path}: corrupt NumPy .npy header: {e}") from None
        data_offset = f.tell()
    if any(v < 0 for v in shape):
        raise InputError(f"{path}: corrupt NumPy .npy header: negative dimension in shape {shape}")
    info = ImageInfo(path, "npy", tuple(int(v) for v in shape), np.dtype(dtype))
    if info.dtype.kind != "O" and info.nbytes > file_size - data_offset:
        raise InputError(
            f"{path}: corrupt or truncated .npy file: its header declares {info.shape} {info.dtype} "
            f"({info.nbytes} bytes of data) but the file holds {file_size - data_offset}"
        )
    return info


@contextmanager
def _pillow(path: Path, max_pixels: int | None):
    """imageio's Pillow reader on ``path``, opened (header only) with Pillow's decompression-bomb
    limit set to ``max_pixels`` for this call (None: no limit; the caller checks the size)."""
    import imageio.v3 as iio
    from PIL import Image

    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                reader = iio.imopen(path, "r", plugin="pillow")
        except OSError as e:  # imageio wraps Pillow's error: name the innermost one
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, Image.DecompressionBombError):
                raise InputError(
                    f"{path}: over the whole-image budget of {max_pixels} pixels ({cause}); {TILE_HINT}"
                ) from None
            if type(cause).__name__ == "InitializationError":  # Pillow found no format that reads it
                raise InputError(
                    f"{path}: not an image Pillow can read (corrupt, or not the PNG / JPEG its name says)"
                ) from None
            raise InputError(
                f"{path}: cannot be read (corrupt or truncated): {type(cause).__name__}: {cause}"
            ) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    try:
        yield reader
    finally:
        reader.close()


def _inspect_pillow(path: Path, file_size: int) -> ImageInfo:
    with _pillow(path, None) as reader:
        props = reader.properties()
        image = reader._image  # the PIL image imageio opened (header only)
        fmt = str(image.format or "").lower()
        mode, (width, height) = image.mode, image.size
        bands = len(image.getbands())
    shape = tuple(int(v) for v in props.shape)
    axes = ("I" if props.is_batch else "") + "YX" + "S" * (len(shape) - 2 - bool(props.is_batch))
    info = ImageInfo(path, "jpeg" if fmt in ("jpeg", "mpo") else fmt or "png", shape, np.dtype(props.dtype), axes)
    if info.format == "png":
        bits = 1 if mode in ("1", "P", "L") else 8 * bands  # the fewest bits per pixel a PNG of this mode has
        least = height * width * bits // 8  # the fewest bytes of pixel data the header's size needs
        if least > file_size * DEFLATE_MAX_RATIO:
            raise InputError(
                f"{path}: corrupt PNG: it declares {height} x {width} pixels ({mode}), at least "
                f"{least} bytes, but the file has {file_size} bytes (deflate expands at most "
                f"{DEFLATE_MAX_RATIO}:1): the declared size cannot be held by the file"
            )
    return info


# --------------------------------------------------------------------------- checks and reading


def check_image(info: ImageInfo, max_pixels: int | None = None) -> ImageInfo:
    """Refuse (``InputError``, naming the file) what the pipeline cannot segment, from the header.

    dtype: ``preprocess.unsupported_dtype`` (bool, integers, float16/32/64 accepted). shape: data
    present; at most 3 axes longer than 1 ((H, W), (H, W, C) or (C, H, W)); both image sides at
    least ``MIN_IMAGE_SIDE``, judged before axes of length 1 are squeezed. size: at most
    ``max_pixels`` image pixels (None: ``default_max_pixels()``), and a decoded array no larger
    than the memory that budget stands for (``max_pixels * PIPELINE_BYTES_PER_PIXEL``).
    """
    path, shape = info.path, info.shape
    why = unsupported_dtype(info.dtype)
    if why is not None:
        raise InputError(f"{path}: {why}")
    if math.prod(shape) == 0:
        raise InputError(f"{path}: no image data (empty or corrupt file; shape {shape})")
    long_axes = [s for s in shape if s != 1]
    if len(long_axes) > 3:
        raise InputError(
            f"{path}: shape {shape}{f' ({info.axes})' if info.axes else ''} has {len(long_axes)} axes "
            "longer than 1; an image is (H, W), (H, W, C) or (C, H, W)"
        )
    h, w = info.sides
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InputError(
            f"{path}: the image is {h} x {w} pixels (shape {shape}); the minimum image size is "
            f"{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}"
        )
    budget = default_max_pixels() if max_pixels is None else int(max_pixels)
    if h * w > budget:
        raise InputError(
            f"{path}: {h} x {w} = {h * w} pixels is over the whole-image budget of {budget} pixels "
            f"(--max-pixels; the default is sized to this machine's memory); {TILE_HINT}"
        )
    if info.nbytes > budget * PIPELINE_BYTES_PER_PIXEL:
        raise InputError(
            f"{path}: decoding {shape} {info.dtype} takes {_gib(info.nbytes)}, over the "
            f"{_gib(budget * PIPELINE_BYTES_PER_PIXEL)} a whole image may use (--max-pixels {budget}); "
            f"{TILE_HINT}"
        )
    return info


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Image file -> ndarray as stored ((H, W), (H, W, C) or (C, H, W); axes of length 1 squeezed).

    The header is inspected and checked first (``inspect_image``, ``check_image``: dtype, shape,
    at most ``max_pixels`` pixels, None = ``default_max_pixels()``); only then is the file
    decoded. Every problem is an ``InputError`` naming the file.
    """
    path = Path(path)
    budget = default_max_pixels() if max_pixels is None else int(max_pixels)
    info = check_image(inspect_image(path), budget)
    try:
        if info.format == "tiff":
            import tifffile

            image = tifffile.imread(path)
        elif info.format == "npy":
            with open(path, "rb") as f:
                image = np.lib.format.read_array(f, allow_pickle=False)
        else:
            with _pillow(path, budget) as reader:  # Pillow's own bomb check, at this call's budget
                image = reader.read()
        image = np.asarray(image)
    except MemoryError:
        raise InputError(
            f"{path}: not enough memory to decode {info.shape} {info.dtype} ({_gib(info.nbytes)}); "
            f"lower --max-pixels or {TILE_HINT}"
        ) from None
    except Exception as e:
        raise InputError(f"{path}: cannot be decoded: {type(e).__name__}: {e}") from e
    if image.shape != info.shape or image.dtype != info.dtype:  # what was decoded, checked as the header was
        check_image(
            ImageInfo(path, info.format, image.shape, image.dtype, info.axes if image.shape == info.shape else None),
            budget,
        )
    return np.squeeze(image)


# --------------------------------------------------------------------------- prompt files


def _read_json(path: Path, key: str, example: str):
    """The value of ``key`` in the JSON object in ``path``, or InputError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON file (not UTF-8 text); expected {example}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); expected {example}") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply; expected {example}") from None
    if not isinstance(data, dict) or key not in data:
        found = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else f"a JSON {_json_kind(data)}"
        raise InputError(f"{path}: expected {example}, found {found}")
    return data


def _json_kind(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(path: Path, values, n: int, what: str, rule: str) -> list:
    """``values`` as a list of ``n`` numbers, or InputError naming ``what`` and the ``rule``."""
    if not isinstance(values, list) or len(values) != n or not all(_is_number(v) for v in values):
        shown = json.dumps(values)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputError(f"{path}: {rule}; {what} is {shown}")
    return values


def _coordinates(path: Path, values: list, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Checked JSON numbers -> float32 array of ``shape``; a NaN, infinite or out-of-range
    (float32) coordinate is an InputError naming the prompt (``what`` and its index)."""

    def finite(v) -> bool:
        try:
            return math.isfinite(v) and abs(float(v)) <= np.finfo(np.float32).max
        except OverflowError:  # an integer too large for a float
            return False

    for i, item in enumerate(values):
        if not all(finite(v) for v in np.ravel(np.asarray(item, dtype=object))):
            raise InputError(f"{path}: {what} {i} has a NaN, infinite or out-of-range (float32) coordinate")
    return np.asarray(values, dtype=np.float64).astype(np.float32).reshape(shape)


BOX_EXAMPLE = '{"boxes": [[x1, y1, x2, y2], ...]}'
POINT_EXAMPLE = '{"points": [[[x, y], ...], ...], "point_labels": [[1, ...], ...]}'


def read_boxes(path: str | os.PathLike) -> np.ndarray:
    """``{"boxes": [[x1, y1, x2, y2], ...]}`` (original pixels, x = column) -> (N, 4) float32.

    Anything else (not JSON, no "boxes", a box that is not 4 finite numbers) is an InputError
    naming the file and the problem."""
    path = Path(path)
    boxes = _read_json(path, "boxes", BOX_EXAMPLE)["boxes"]
    if not isinstance(boxes, list):
        raise InputError(f'{path}: "boxes" is a JSON {_json_kind(boxes)}; expected {BOX_EXAMPLE}')
    for i, b in enumerate(boxes):
        _numbers(path, b, 4, f"box {i}", "boxes must be [x1, y1, x2, y2] (4 numbers)")
    return _coordinates(path, boxes, (len(boxes), 4), "box")


def read_points(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``{"points": [[[x, y], ...], ...], "point_labels": [[1, ...], ...]}`` -> ((N, P, 2) float32,
    (N, P) int64); one prompt of P points per row (a flat [[x, y], ...] list is one prompt);
    labels default to 1 (cell); 0 = background, -1 = padding.

    Anything else (not JSON, no "points", prompts of different lengths, labels that do not match
    the points or are not 1 / 0 / -1) is an InputError naming the file and the problem."""
    path = Path(path)
    data = _read_json(path, "points", POINT_EXAMPLE)
    pts = data["points"]
    if not isinstance(pts, list):
        raise InputError(f'{path}: "points" is a JSON {_json_kind(pts)}; expected {POINT_EXAMPLE}')
    if pts and all(isinstance(p, list) and p and _is_number(p[0]) for p in pts):
        pts = [pts]  # [[x, y], ...]: one prompt
    for i, prompt in enumerate(pts):
        if not isinstance(prompt, list) or not prompt:
            raise InputError(f"{path}: prompt {i} is not a list of [x, y] points; expected {POINT_EXAMPLE}")
        for j, pt in enumerate(prompt):
            _numbers(path, pt, 2, f"prompt {i} point {j}", "points must be [x, y] (2 numbers)")
        if len(prompt) != len(pts[0]):
            raise InputError(
                f"{path}: prompt {i} has {len(prompt)} points, prompt 0 has {len(pts[0])}: every prompt "
                "needs the same number of points (pad with label -1)"
            )
    n, p = len(pts), len(pts[0]) if pts else 1
    points = _coordinates(path, pts, (n, p, 2), "prompt")
    labels = data.get("point_labels")
    if labels is None:
        return points, np.ones((n, p), dtype=np.int64)
    if n == 1 and isinstance(labels, list) and labels and all(_is_number(v) for v in labels):
        labels = [labels]
    if (
        not isinstance(labels, list)
        or len(labels) != n
        or not all(isinstance(row, list) and len(row) == p for row in labels)
    ):
        raise InputError(f"{path}: point_labels must be {n} lists of {p} labels (one per point), matching the points")
    flat = [v for row in labels for v in row]
    if not all(_is_number(v) and v in (-1, 0, 1) for v in flat):
        raise InputError(f"{path}: point labels must be 1 (cell), 0 (background) or -1 (padding)")
    return points, np.asarray(flat, dtype=np.int64).reshape(n, p)


@contextmanager
def atomic_path(dest: str | os.PathLike):
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def label_dtype_for(max_label: int) -> np.dtype:
    """uint16 when the labels fit, else uint32."""
    return np.dtype(np.uint16) if int(max_label) <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def label_dtype(labels: np.ndarray) -> np.dtype:
    return label_dtype_for(labels.max(initial=0))


def write_labels(labels: np.ndarray, dest: str | os.PathLike, fmt: str = "tif") -> Path:
    """Write a label map (H, W) atomically as compressed TIFF, NPY or 16-bit PNG."""
    dest = Path(dest)
    out = labels.astype(label_dtype(labels))
    with atomic_path(dest) as tmp:
        if fmt == "tif":
            import tifffile

            tifffile.imwrite(tmp, out, compression="zlib")
        elif fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, out)
        elif fmt == "png":
            if out.dtype != np.uint16:
                raise ValueError(f"{dest}: {int(labels.max())} labels do not fit a 16-bit PNG; use tif or npy")
            import imageio.v3 as iio

            iio.imwrite(tmp, out, extension=".png")
        else:
            raise ValueError(f"unknown label format {fmt!r}")
    return dest


def write_json(data, dest: str | os.PathLike) -> Path:
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=str))
    return Path(dest)
