"""Slides read region by region, and label maps written chunk by chunk.

Readers (``open_slide``): OME-TIFF / BigTIFF / TIFF (tifffile's Zarr view of the file: only
the tiles or strips a region touches are decoded; pyramid levels by index), OME-Zarr (NGFF
0.4 / 0.5 multiscales, level by index), NPY (memory-mapped). A ``SlideSource`` pickles as its
path, so Dask workers open the file themselves.

Writers: ``OmeZarrLabelWriter`` (NGFF 0.4 image-label group, zarr v2 layout, chunks written
independently, so many processes can write disjoint chunks; optional 2x pyramid levels) and
``write_bigtiff_labels`` (tiled, zlib-compressed BigTIFF from a raster-order chunk stream).
Both write under a temporary name beside the destination and rename at the end, so an
interrupted job never leaves a half-written label store under the final name.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ZARR_SUFFIXES = (".zarr",)
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")


class SlideError(ValueError):
    """A slide that cannot be read as asked; the message names the file and the problem."""


def is_zarr(path) -> bool:
    p = Path(path)
    return p.suffix.lower() in ZARR_SUFFIXES or (
        p.is_dir() and ((p / ".zattrs").is_file() or (p / "zarr.json").is_file())
    )


class SlideSource:
    """A 2-D (optionally multichannel) slide read by region.

    height, width: pixels of the level read; channels: 0 for a 2-D slide, else C;
    dtype: the stored dtype; pixel_size_um: (y, x) micrometres per pixel when the file says.
    ``read(y0, y1, x0, x1)`` -> (h, w) or (h, w, C) array, channel last, stored dtype.
    """

    def __init__(
        self, path=None, level: int = 0, series: int = 0, array: np.ndarray | None = None, axes: str | None = None
    ) -> None:
        self.path = None if path is None else str(path)
        self.level, self.series = int(level), int(series)
        self._array, self._axes, self._handle = None, None, None
        self.pixel_size_um: tuple[float, float] | None = None
        if array is not None:
            array = np.asarray(array)
            self._array, self._axes = array, axes or _guess_axes(array.shape)
        elif self.path is None:
            raise ValueError("SlideSource needs a path or an array")
        self._open()

    # -- opening -----------------------------------------------------------------------------
    def _open(self) -> None:
        if self._array is not None and self.path is None:
            self._set_geometry()
            return
        p = Path(self.path)
        if not p.exists():
            raise SlideError(f"{p}: no such file or folder")
        try:
            if is_zarr(p):
                self._open_zarr(p)
            elif p.suffix.lower() in TIFF_SUFFIXES:
                self._open_tiff(p)
            elif p.suffix.lower() == ".npy":
                self._array = np.load(p, mmap_mode="r", allow_pickle=False)
                self._axes = _guess_axes(self._array.shape)
            else:
                raise SlideError(f"{p}: unsupported slide type {p.suffix!r} (OME-TIFF/TIFF, OME-Zarr or NPY)")
        except SlideError:
            raise
        except Exception as e:
            raise SlideError(f"{p}: cannot be read as a slide: {type(e).__name__}: {e}") from e
        self._set_geometry()

    def _open_tiff(self, p: Path) -> None:
        import tifffile
        import zarr

        tf = tifffile.TiffFile(p)
        self._handle = tf
        if not 0 <= self.series < len(tf.series):
            raise SlideError(f"{p}: series {self.series} does not exist ({len(tf.series)} series)")
        s = tf.series[self.series]
        if not 0 <= self.level < len(s.levels):
            raise SlideError(f"{p}: pyramid level {self.level} does not exist ({len(s.levels)} levels)")
        lvl = s.levels[self.level]
        self._array = zarr.open(s.aszarr(level=self.level), mode="r")
        self._axes = lvl.axes.replace("S", "C")
        if tf.is_ome and tf.ome_metadata:
            xi = lvl.axes.index("X")
            self.pixel_size_um = _ome_pixel_size(tf.ome_metadata, self.series, s.shape[xi] / lvl.shape[xi])

    def _open_zarr(self, p: Path) -> None:
        import zarr

        root = zarr.open(str(p), mode="r")
        if isinstance(root, zarr.Array):
            self._array, self._axes = root, _guess_axes(root.shape)
            return
        attrs = dict(root.attrs)
        ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not ms:
            raise SlideError(f"{p}: a Zarr group without OME-NGFF 'multiscales' metadata")
        ds = ms[0]["datasets"]
        if not 0 <= self.level < len(ds):
            raise SlideError(f"{p}: pyramid level {self.level} does not exist ({len(ds)} levels)")
        self._array = root[ds[self.level]["path"]]
        self._axes = "".join(
            a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])
        ).upper() or _guess_axes(self._array.shape)
        for tr in ds[self.level].get("coordinateTransformations", []):
            if tr.get("type") == "scale":
                sc = dict(zip(self._axes, tr["scale"]))
                if "Y" in sc and "X" in sc:
                    self.pixel_size_um = (float(sc["Y"]), float(sc["X"]))

    def _set_geometry(self) -> None:
        axes, shape = self._axes, tuple(self._array.shape)
        if len(axes) != len(shape) or "Y" not in axes or "X" not in axes:
            raise SlideError(f"{self.name}: cannot find the Y and X axes (axes {axes!r}, shape {shape})")
        for a, n in zip(axes, shape):
            if a not in "YXC" and n != 1:
                raise SlideError(f"{self.name}: axis {a} has {n} planes; only 2-D slides (with channels) are supported")
        self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
        self.channels = shape[axes.index("C")] if "C" in axes else 0
        self.dtype = np.dtype(self._array.dtype)
        if self.height < 1 or self.width < 1:
            raise SlideError(f"{self.name}: empty slide (shape {shape})")

    @property
    def name(self) -> str:
        return self.path or "<array>"

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    # -- reading -----------------------------------------------------------------------------
    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The region [y0, y1) x [x0, x1) -> (h, w) or (h, w, C), stored dtype."""
        idx = tuple(
            slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == "C" else 0
            for a in self._axes
        )
        block = np.asarray(self._array[idx])
        kept = [a for a in self._axes if a in "YXC"]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index("C")] if "C" in kept else [])
        return np.ascontiguousarray(np.transpose(block, order))

    def __getstate__(self):
        if self.path is None:
            return {"path": None, "array": np.asarray(self._array), "axes": self._axes}
        return {"path": self.path, "level": self.level, "series": self.series}

    def __setstate__(self, state):
        if state["path"] is None:
            self.__init__(array=state["array"], axes=state["axes"])
        else:
            self.__init__(state["path"], level=state["level"], series=state["series"])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def open_slide(path, level: int = 0, series: int = 0) -> SlideSource:
    """Open a slide file lazily (see the module docstring); raises ``SlideError`` naming the file."""
    return SlideSource(path, level=level, series=series)


def _guess_axes(shape) -> str:
    """YX for 2-D; for 3-D the smallest axis is the channel axis (the official rule)."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        axes = ["Y", "X"]
        axes.insert(int(np.argmin(shape)), "C")
        return "".join(axes)
    raise SlideError(f"cannot guess the axes of shape {tuple(shape)}; give them")


def _ome_pixel_size(xml: str, series: int, factor: float) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
        ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
        pixels = root.findall(f"{ns}Image/{ns}Pixels")[series]
        sy, sx = pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeX")
        units = (pixels.get("PhysicalSizeYUnit", "µm"), pixels.get("PhysicalSizeXUnit", "µm"))
        if sx is None or sy is None or any(u not in ("µm", "um", "micron") for u in units):
            return None
        return float(sy) * factor, float(sx) * factor
    except (ET.ParseError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------------- writers
def _partial(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.partial"


def _replace_dir(src: Path, dest: Path) -> None:
    """Move the finished store ``src`` onto ``dest`` (replacing an old one only now)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


class OmeZarrLabelWriter:
    """A label map (H, W) as an OME-NGFF 0.4 image-label group (zarr v2 layout).

    The group holds array ``0`` (full resolution, chunks (chunk, chunk), Blosc-zstd) and, with
    ``levels`` > 1, arrays ``1`` ... (each 2x smaller, nearest-neighbour: every other pixel, so
    labels stay labels). ``create`` makes the store under a temporary name; ``write`` puts
    chunk-aligned blocks (any process may write any chunk); ``finish`` writes the pyramid and
    the metadata and renames the store onto ``dest``.
    """

    def __init__(
        self,
        dest,
        shape,
        dtype,
        chunk: int = 1024,
        levels: int = 1,
        pixel_size_um: tuple[float, float] | None = None,
        source_image: str | None = None,
    ) -> None:
        self.dest = Path(dest)
        self.tmp = _partial(self.dest)
        self.shape, self.dtype, self.chunk, self.levels = (
            tuple(int(s) for s in shape),
            np.dtype(dtype),
            int(chunk),
            int(levels),
        )
        self.pixel_size_um, self.source_image = pixel_size_um, source_image

    def create(self) -> OmeZarrLabelWriter:
        import numcodecs
        import zarr

        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        g = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        shape = self.shape
        for k in range(self.levels):
            g.create_array(
                str(k),
                shape=shape,
                chunks=(min(self.chunk, shape[0]), min(self.chunk, shape[1])),
                dtype=self.dtype,
                fill_value=0,
                compressors=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE),
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )
            shape = ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
        return self

    def array(self, level: int = 0):
        import zarr

        return zarr.open_array(str(self.tmp / str(level)), mode="r+")

    def write(self, y0: int, x0: int, block: np.ndarray, arr=None) -> None:
        arr = arr if arr is not None else self.array(0)
        arr[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block.astype(self.dtype, copy=False)

    def finish(self) -> Path:
        import zarr

        c = self.chunk
        for k in range(1, self.levels):  # level k from level k - 1, one output chunk at a time
            src, dst = self.array(k - 1), self.array(k)
            for y in range(0, dst.shape[0], c):
                for x in range(0, dst.shape[1], c):
                    dst[y : y + c, x : x + c] = src[2 * y : 2 * (y + c) : 2, 2 * x : 2 * (x + c) : 2]
        sy, sx = self.pixel_size_um or (1.0, 1.0)
        unit = {"unit": "micrometer"} if self.pixel_size_um else {}
        g = zarr.open_group(str(self.tmp), mode="r+")
        g.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": self.dest.name,
                "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
                "datasets": [
                    {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [sy * 2**k, sx * 2**k]}]}
                    for k in range(self.levels)
                ],
                "metadata": {"method": "numpy stride [::2, ::2] (nearest)"} if self.levels > 1 else {},
            }
        ]
        g.attrs["image-label"] = {
            "version": "0.4",
            **({"source": {"image": self.source_image}} if self.source_image else {}),
        }
        _replace_dir(self.tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_bigtiff_labels(dest, shape, dtype, chunk: int, chunks, pixel_size_um=None) -> Path:
    """Write a tiled, zlib-compressed BigTIFF label map from ``chunks``: an iterator of the
    (chunk, chunk) blocks in raster order (edge blocks may be smaller). Atomic (temp + rename)."""
    import tifffile

    from ..io import atomic_path

    if chunk % 16:
        raise ValueError(f"TIFF tiles must be a multiple of 16 pixels, got {chunk}")
    dtype = np.dtype(dtype)

    def padded():
        for block in chunks:
            if block.shape != (chunk, chunk):
                full = np.zeros((chunk, chunk), dtype)
                full[: block.shape[0], : block.shape[1]] = block
                block = full
            yield block.astype(dtype, copy=False)

    meta = {"axes": "YX"}
    if pixel_size_um:
        meta.update(PhysicalSizeY=pixel_size_um[0], PhysicalSizeX=pixel_size_um[1])
    with atomic_path(dest) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
            tw.write(padded(), shape=tuple(shape), dtype=dtype, tile=(chunk, chunk), compression="zlib", metadata=meta)
    return Path(dest)


def read_labels(path) -> np.ndarray:
    """A whole label map from an OME-Zarr label store or a TIFF (level 0), for tests and small slides."""
    src = open_slide(path)
    try:
        return src.read(0, src.height, 0, src.width)
    finally:
        src.close()
