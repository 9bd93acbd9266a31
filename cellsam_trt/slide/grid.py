"""Overlapping tiles over a slide, the core each tile owns, and prompts routed to tiles.

All coordinates are slide pixels (of the pyramid level read), y = row, x = column, half-open
ranges. Tiles have the same size (the slide's size along an axis shorter than a tile) and are
spread evenly so that neighbours overlap by at least the requested overlap. The cores partition
the slide: the boundary between two neighbours lies in the middle of their overlap, so a cell
no wider than the overlap that crosses the boundary is whole in both tiles.

Rescaling: the engine squashes every tile to the 1024 x 1024 model frame, so a tile of
``tile_size / scale`` slide pixels is seen at ``scale`` model pixels per slide pixel. ``scale``
> 1 enlarges small cells, < 1 shrinks large ones; labels come back at slide resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..pipeline import box_prompts, point_prompts  # the pipeline's own prompt checks, up front


@dataclass(frozen=True)
class TileSettings:
    """How a slide is cut.

    tile_size: tile side in model-frame pixels (1024: the model sees the slide at scale).
    overlap: minimum overlap of neighbouring tiles in model-frame pixels; cells up to this
      diameter (times 1 / scale in slide pixels) that cross a tile border come out whole.
    scale: model-frame pixels per slide pixel (see the module docstring).
    link_iou: two tiles' labels in their overlap are the same cell when their IoU there is at
      least this (one-to-one, greedy by IoU; ``labels.link_labels_by_iou``).
    """

    tile_size: int = 1024
    overlap: int = 128
    scale: float = 1.0
    link_iou: float = 0.5

    def __post_init__(self):
        if self.tile_size < 16:
            raise ValueError(f"tile_size must be >= 16 pixels, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), got {self.overlap} (tile {self.tile_size})")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        if not 0 < self.link_iou <= 1:
            raise ValueError(f"link_iou must be in (0, 1], got {self.link_iou}")

    @staticmethod
    def scale_for_pixel_size(pixel_size_um: float, target_pixel_size_um: float) -> float:
        """The scale that resamples a slide of ``pixel_size_um`` to ``target_pixel_size_um``."""
        if not (pixel_size_um > 0 and target_pixel_size_um > 0):
            raise ValueError("pixel sizes must be positive")
        return float(pixel_size_um) / float(target_pixel_size_um)


def axis_tiles(length: int, tile: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile starts and core boundaries along one axis of ``length`` pixels.

    -> (starts (k,) int64, bounds (k + 1,) int64): tile i spans [starts[i], starts[i] + t) with
    t = min(tile, length); its core spans [bounds[i], bounds[i + 1]).
    """
    if length < 1:
        raise ValueError(f"axis length must be >= 1, got {length}")
    t = min(tile, length)
    if t == length:
        return np.zeros(1, np.int64), np.array([0, length], np.int64)
    step = tile - overlap
    k = math.ceil((length - t) / step) + 1
    starts = np.array([round(i * (length - t) / (k - 1)) for i in range(k)], np.int64)
    ends = starts + t
    bounds = np.empty(k + 1, np.int64)
    bounds[0], bounds[-1] = 0, length
    bounds[1:-1] = (starts[1:] + ends[:-1]) // 2
    return starts, bounds


@dataclass(frozen=True)
class Tile:
    """One tile: index in raster order, grid row / column, its window and its core."""

    index: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int
    core: tuple[int, int, int, int]  # (y0, y1, x0, x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


class TileGrid:
    """The tiles of a (height, width) slide under ``TileSettings``."""

    def __init__(self, height: int, width: int, settings: TileSettings | None = None) -> None:
        self.settings = settings or TileSettings()
        self.height, self.width = int(height), int(width)
        s = self.settings
        self.tile = max(16, round(s.tile_size / s.scale))
        self.overlap = min(self.tile - 1, round(s.overlap / s.scale))
        self.ystarts, self.ybounds = axis_tiles(self.height, self.tile, self.overlap)
        self.xstarts, self.xbounds = axis_tiles(self.width, self.tile, self.overlap)
        self.th, self.tw = min(self.tile, self.height), min(self.tile, self.width)

    @property
    def rows(self) -> int:
        return len(self.ystarts)

    @property
    def cols(self) -> int:
        return len(self.xstarts)

    def __len__(self) -> int:
        return self.rows * self.cols

    def __getitem__(self, index: int) -> Tile:
        if not 0 <= index < len(self):
            raise IndexError(index)
        r, c = divmod(index, self.cols)
        y0, x0 = int(self.ystarts[r]), int(self.xstarts[c])
        core = (int(self.ybounds[r]), int(self.ybounds[r + 1]), int(self.xbounds[c]), int(self.xbounds[c + 1]))
        return Tile(index, r, c, y0, y0 + self.th, x0, x0 + self.tw, core)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def neighbour_pairs(self):
        """(a, b) tile pairs that share an overlap: right and lower neighbours, raster order."""
        for r in range(self.rows):
            for c in range(self.cols):
                i = r * self.cols + c
                if c + 1 < self.cols:
                    yield i, i + 1
                if r + 1 < self.rows:
                    yield i, i + self.cols

    def cores_in(self, y0: int, y1: int, x0: int, x1: int):
        """Tiles whose cores intersect the region, with the intersection: (tile, (y0, y1, x0, x1))."""
        rs = range(
            max(0, int(np.searchsorted(self.ybounds, y0, "right")) - 1),
            min(self.rows, int(np.searchsorted(self.ybounds, y1, "left"))),
        )
        cs = range(
            max(0, int(np.searchsorted(self.xbounds, x0, "right")) - 1),
            min(self.cols, int(np.searchsorted(self.xbounds, x1, "left"))),
        )
        for r in rs:
            for c in cs:
                t = self[r * self.cols + c]
                cy0, cy1, cx0, cx1 = t.core
                iy0, iy1, ix0, ix1 = max(cy0, y0), min(cy1, y1), max(cx0, x0), min(cx1, x1)
                if iy0 < iy1 and ix0 < ix1:
                    yield t, (iy0, iy1, ix0, ix1)

    def windows_in(self, y0: int, y1: int, x0: int, x1: int):
        """Tiles whose windows intersect the region, raster order, with the intersection."""
        rs = np.flatnonzero((self.ystarts < y1) & (self.ystarts + self.th > y0))
        cs = np.flatnonzero((self.xstarts < x1) & (self.xstarts + self.tw > x0))
        for r in rs:
            for c in cs:
                t = self[int(r) * self.cols + int(c)]
                yield t, (max(t.y0, y0), min(t.y1, y1), max(t.x0, x0), min(t.x1, x1))

    def owner(self, y: float, x: float) -> Tile:
        """The tile whose core holds the slide point (y, x) (clamped to the slide)."""
        r = int(np.clip(np.searchsorted(self.ybounds, y, "right") - 1, 0, self.rows - 1))
        c = int(np.clip(np.searchsorted(self.xbounds, x, "right") - 1, 0, self.cols - 1))
        return self[r * self.cols + c]

    def describe(self) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "tile": self.tile,
            "overlap": self.overlap,
            "rows": self.rows,
            "cols": self.cols,
            "tiles": len(self),
            "scale": self.settings.scale,
            "tile_size": self.settings.tile_size,
            "link_iou": self.settings.link_iou,
        }


@dataclass
class RoutedPrompts:
    """Prompts routed to tiles, in tile-local pixels.

    per_tile: tile index -> {"boxes": (n, 4) float32 | None, "points": (n, P, 2) | None,
      "point_labels": (n, P) | None, "ids": (n,) int64 prompt numbers in the input order}.
    unrouted: (prompt number, reason) for prompts no tile holds whole (larger than a tile).
    """

    per_tile: dict
    unrouted: list


def _contained(t: Tile, x0, y0, x1, y1) -> bool:
    return t.x0 <= x0 and x1 <= t.x1 and t.y0 <= y0 and y1 <= t.y1


def _home(grid: TileGrid, x0, y0, x1, y1) -> Tile | None:
    """The owner of the centre when it holds the extent, else the tile holding it whose centre is nearest."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    t = grid.owner(cy, cx)
    if _contained(t, x0, y0, x1, y1):
        return t
    best, dist = None, None
    for r in range(max(0, t.row - 1), min(grid.rows, t.row + 2)):
        for c in range(max(0, t.col - 1), min(grid.cols, t.col + 2)):
            u = grid[r * grid.cols + c]
            if _contained(u, x0, y0, x1, y1):
                d = ((u.x0 + u.x1) / 2 - cx) ** 2 + ((u.y0 + u.y1) / 2 - cy) ** 2
                if dist is None or d < dist:
                    best, dist = u, d
    return best


def route_prompts(grid: TileGrid, boxes=None, points=None, point_labels=None) -> RoutedPrompts:
    """Send each prompt, in slide pixels, to one tile that holds it whole.

    boxes: (N, 4) XYXY (x = column); points: (N, P, 2) XY with point_labels (N, P) (1 cell,
    0 background, -1 padding); a point prompt's extent is that of its labelled points. When
    both are given, row i of each is one prompt. The home tile is the owner of the prompt's
    centre when it holds the prompt whole, else the neighbour that does with its centre
    nearest; a prompt larger than any tile is reported in ``unrouted``, never dropped silently.
    """

    b = None if boxes is None else box_prompts(boxes)
    p = lab = None
    if points is not None:
        p, lab = point_prompts(points, point_labels)
        if b is not None and len(b) != len(p):
            raise ValueError(f"{len(b)} boxes but {len(p)} point prompts")
    n = len(b) if b is not None else (len(p) if p is not None else 0)
    groups: dict[int, list[int]] = {}
    unrouted = []
    for i in range(n):
        xs, ys = [], []
        if b is not None:
            xs += [b[i, 0], b[i, 2]]
            ys += [b[i, 1], b[i, 3]]
        if p is not None:
            m = lab[i] >= 0
            xs += list(p[i, m, 0])
            ys += list(p[i, m, 1])
        if not xs or not np.isfinite(xs).all() or not np.isfinite(ys).all():
            unrouted.append((i, "prompt has no finite coordinates"))
            continue
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        if x1 < 0 or y1 < 0 or x0 > grid.width or y0 > grid.height:
            unrouted.append((i, f"prompt ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) lies outside the slide"))
            continue
        t = _home(grid, max(x0, 0), max(y0, 0), min(x1, grid.width), min(y1, grid.height))
        if t is None:
            unrouted.append(
                (
                    i,
                    f"prompt ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) is larger than a tile "
                    f"({grid.tile} px); use a larger tile_size or a smaller scale",
                )
            )
            continue
        groups.setdefault(t.index, []).append(i)
    per_tile = {}
    for ti, ids in groups.items():
        t = grid[ti]
        ids = np.asarray(ids, np.int64)
        off = np.array([t.x0, t.y0], np.float32)
        entry = {"ids": ids, "boxes": None, "points": None, "point_labels": None}
        if b is not None:
            entry["boxes"] = b[ids] - np.tile(off, 2)
        if p is not None:
            entry["points"] = p[ids] - off
            entry["point_labels"] = lab[ids]
        per_tile[ti] = entry
    return RoutedPrompts(per_tile, unrouted)
