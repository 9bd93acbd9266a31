"""Synthetic slides with known ground truth, and a classical segmenter that is exact on them.

``SyntheticSlide``: bright discs (cells) of random radius and brightness on noise, one cell at
most per ``pitch`` x ``pitch`` grid cell, never touching. Every region of the image and of its
ground-truth labels is a pure function of (seed, region), so slides of any size are written
and checked chunk by chunk in bounded memory. Cell ids are 1 + grid row * grid columns + grid
column (uint32), stable across regions.

``ThresholdSegmenter``: intensity threshold + connected components, with the engine's
``segment_many`` interface. On these slides it reproduces the ground truth exactly inside a
tile, so any error it shows after tiling is the tiling's and stitching's own. With
``drop_edge_cells`` it also misses every cell cut by the tile edge (the pessimistic model of a
network that cannot segment a half-seen cell): then only the overlap can make them whole. It
measures the slide machinery (border handling, IO, memory, Dask); it is not a cell
segmentation model.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..pipeline import Details, Segmentation
from ..scheduler import ItemResult

NOISE_TILE = 512


class SyntheticSlide:
    """A (height, width) uint16 slide of non-touching discs on noise; see the module docstring.

    pitch: grid spacing in pixels (>= 2 * max radius + 4); radius: (min, max) cell radius in
    pixels; occupancy: fraction of grid cells holding a cell; background / noise / brightness:
    intensities (mean, std, (min, max)) of the uint16 image.
    """

    def __init__(
        self,
        height: int,
        width: int,
        seed: int = 0,
        pitch: int = 40,
        radius=(6, 16),
        occupancy: float = 0.8,
        background: float = 200.0,
        noise: float = 30.0,
        brightness=(1500.0, 4000.0),
    ) -> None:
        if pitch < 2 * radius[1] + 4:
            raise ValueError(f"pitch {pitch} is too small for radius {radius[1]}")
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        self.pitch, self.radius, self.occupancy = int(pitch), (int(radius[0]), int(radius[1])), float(occupancy)
        self.background, self.noise, self.brightness = background, noise, brightness
        self.grid_rows, self.grid_cols = math.ceil(self.height / pitch), math.ceil(self.width / pitch)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def threshold(self) -> float:
        """An intensity that separates every cell pixel from the background."""
        return self.background + self.brightness[0] / 2

    def _row(self, gy: int):
        """Cells of grid row gy -> (ids, cy, cx, r, brightness) of the present ones."""
        rng = np.random.default_rng([self.seed, 1, gy])
        n = self.grid_cols
        present = rng.random(n) < self.occupancy
        r = rng.integers(self.radius[0], self.radius[1] + 1, n)
        free = self.pitch - 2 * r - 2
        cy = gy * self.pitch + 1 + r + np.floor(rng.random(n) * free).astype(np.int64)
        cx = np.arange(n) * self.pitch + 1 + r + np.floor(rng.random(n) * free).astype(np.int64)
        val = rng.uniform(*self.brightness, n)
        present &= (cy + r < self.height) & (cx + r < self.width)
        ids = 1 + gy * n + np.arange(n)
        return ids[present], cy[present], cx[present], r[present], val[present]

    def cells(self):
        """All cells -> dict of arrays id, cy, cx, r (pixels)."""
        parts = [self._row(gy) for gy in range(self.grid_rows)]
        return {k: np.concatenate([p[i] for p in parts]) for i, k in enumerate(("id", "cy", "cx", "r"))}

    def cells_cut_by(self, grid) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the cells some tile of ``grid`` (``slide.grid.TileGrid``) sees cut (they cross
        a tile's edge: only stitching makes them whole), and of the other cells."""
        c = self.cells()
        cut = np.zeros(len(c["id"]), bool)
        for starts, size, centre in ((grid.ystarts, grid.th, c["cy"]), (grid.xstarts, grid.tw, c["cx"])):
            for edge in np.concatenate([starts[1:], starts[:-1] + size]):
                cut |= (centre - c["r"] < edge) & (centre + c["r"] >= edge)
        return c["id"][cut], c["id"][~cut]

    def _render(self, y0, y1, x0, x1, what: str) -> np.ndarray:
        if what == "labels":
            out = np.zeros((y1 - y0, x1 - x0), np.uint32)
        else:
            out = self._noise(y0, y1, x0, x1)
        g0, g1 = max(0, y0 // self.pitch - 1), min(self.grid_rows, (y1 - 1) // self.pitch + 2)
        for gy in range(g0, g1):
            ids, cy, cx, r, val = self._row(gy)
            sel = (cx + r >= x0) & (cx - r < x1) & (cy + r >= y0) & (cy - r < y1)
            for i, yc, xc, rr, v in zip(ids[sel], cy[sel], cx[sel], r[sel], val[sel]):
                ya, yb, xa, xb = max(yc - rr, y0), min(yc + rr + 1, y1), max(xc - rr, x0), min(xc + rr + 1, x1)
                yy, xx = np.ogrid[ya:yb, xa:xb]
                disc = (yy - yc) ** 2 + (xx - xc) ** 2 < rr * rr
                view = out[ya - y0 : yb - y0, xa - x0 : xb - x0]
                if what == "labels":
                    view[disc] = i
                else:
                    view[disc] += v
        return out if what == "labels" else np.clip(out, 0, 65535).astype(np.uint16)

    def _noise(self, y0, y1, x0, x1) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0), np.float64)
        for ty in range(y0 // NOISE_TILE, (y1 - 1) // NOISE_TILE + 1):
            for tx in range(x0 // NOISE_TILE, (x1 - 1) // NOISE_TILE + 1):
                tile = np.random.default_rng([self.seed, 2, ty, tx]).normal(
                    self.background, self.noise, (NOISE_TILE, NOISE_TILE)
                )
                ya, yb = max(y0, ty * NOISE_TILE), min(y1, (ty + 1) * NOISE_TILE)
                xa, xb = max(x0, tx * NOISE_TILE), min(x1, (tx + 1) * NOISE_TILE)
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = tile[
                    ya - ty * NOISE_TILE : yb - ty * NOISE_TILE, xa - tx * NOISE_TILE : xb - tx * NOISE_TILE
                ]
        return out

    def image(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The image region [y0, y1) x [x0, x1) -> (h, w) uint16."""
        return self._render(y0, y1, x0, x1, "image")

    def labels(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The ground-truth labels of the region -> (h, w) uint32 (0 = background)."""
        return self._render(y0, y1, x0, x1, "labels")

    def write_ome_tiff(self, path, tile: int = 512, levels: int = 1, pixel_size_um: float = 0.5) -> None:
        """Write the slide as a tiled, zlib-compressed OME-BigTIFF, tile by tile (bounded memory);
        ``levels`` > 1 adds 2x-downsampled pyramid levels (SubIFDs, every other pixel)."""
        import tifffile

        def tiles(k):
            f = 2**k
            h, w = math.ceil(self.height / f), math.ceil(self.width / f)
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    block = self.image(y * f, min((y + tile) * f, self.height), x * f, min((x + tile) * f, self.width))
                    block = block[::f, ::f]
                    full = np.zeros((tile, tile), np.uint16)
                    full[: block.shape[0], : block.shape[1]] = block
                    yield full

        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            meta = {"axes": "YX", "PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um}
            tw.write(
                tiles(0),
                shape=self.shape,
                dtype=np.uint16,
                tile=(tile, tile),
                compression="zlib",
                subifds=levels - 1,
                metadata=meta,
            )
            for k in range(1, levels):
                f = 2**k
                tw.write(
                    tiles(k),
                    shape=(math.ceil(self.height / f), math.ceil(self.width / f)),
                    dtype=np.uint16,
                    tile=(tile, tile),
                    compression="zlib",
                    subfiletype=1,
                )


class ThresholdSegmenter:
    """Intensity > threshold, then 4-connected components (scipy.ndimage.label), as an engine.

    ``segment_many(images, prompts=None, ...)`` yields ``scheduler.ItemResult`` per image in
    order (prompts are ignored); see the module docstring for what it is for.
    """

    def __init__(self, threshold: float, drop_edge_cells: bool = False) -> None:
        self.threshold = float(threshold)
        self.drop_edge_cells = bool(drop_edge_cells)

    def segment(self, image: np.ndarray):
        from scipy import ndimage

        img = np.asarray(image)
        if img.ndim == 3:
            img = img.max(axis=-1)
        lab, _ = ndimage.label(img > self.threshold)
        if self.drop_edge_cells:  # like a model that misses every cell cut by the image edge
            edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
            lab[np.isin(lab, edge[edge > 0])] = 0
        labels = lab.astype(np.int32)
        z = np.zeros(0, np.float32)
        n = int(labels.max(initial=0))
        return Segmentation(
            labels,
            np.zeros((0, 4), np.float32),
            None,
            z,
            Details(labels, np.arange(1, n + 1, dtype=np.int64), np.zeros(0, np.int64)),
        )

    def segment_many(self, images, prompts=None, **_):
        for i, img in enumerate(images):
            t0 = time.perf_counter()
            try:
                yield ItemResult(i, None, self.segment(img), None, time.perf_counter() - t0)
            except Exception as e:
                yield ItemResult(i, None, None, e, time.perf_counter() - t0)
