"""Stitching: per-tile label maps -> one slide label map with global, deterministic labels.

1. ``TileStore``: each tile's local label map (int32, labels 1..n) in a Zarr array (one row
   per tile, 256 x 256 chunks), plus a small marker file per finished tile (written after its chunk), so
   an interrupted job resumes at the first unfinished tile and Dask workers write tiles
   independently.
2. ``link_tiles``: in the overlap of every pair of neighbouring tiles, labels are matched one
   to one by IoU (``labels.link_labels_by_iou``, native). Tile t's label l is the pre-label
   offset[t] + l, offsets counted in raster order.
3. ``global_lut``: the links are a graph over pre-labels; its connected components
   (scipy.sparse.csgraph) are the cells, numbered 1..K in order of their smallest pre-label:
   the same numbers whatever order the tiles were segmented in.
4. ``render_region``: every pixel takes its label from the tile whose core holds it, mapped
   through the table; cells cut by a core boundary are whole because both sides carry the
   same global label. Where the owner has background, a neighbour's cell that the neighbour
   sees whole fills in (a model that misses cells cut by its tile edge loses none of them
   when the overlap is at least a cell diameter). With prompts (``windows=True``) each prompt is segmented by one tile
   only, which holds it whole: there is nothing to link, and each tile's masks are pasted over
   its whole window in raster order (a later tile wins an overlap, as a later prompt does
   inside a tile), so a mask that reaches into a neighbour's core is not cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .. import labels as label_ops
from .grid import TileGrid

STORE_VERSION = 1


class TileStore:
    """Local label maps of a slide's tiles on disk (see the module docstring).

    root: a folder (made if needed). fingerprint: what the tiles depend on (slide, grid,
    model, settings); a store made for another fingerprint is discarded, not reused.
    """

    def __init__(self, root, grid: TileGrid, fingerprint: dict) -> None:
        self.root = Path(root)
        self.grid = grid
        self.fingerprint = {"store_version": STORE_VERSION, **fingerprint, "grid": grid.describe()}
        self.key = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self, resume: bool = True) -> TileStore:
        """Reuse a matching store (resume) or make a new one."""
        import zarr

        meta = self.root / "store.json"
        if resume and meta.is_file():
            try:
                if json.loads(meta.read_text()).get("key") == self.key:
                    return self
            except (OSError, ValueError):
                pass
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "done").mkdir(parents=True)
        # sub-tile chunks: linking reads only the overlap strips, rendering only the cores
        zarr.create_array(
            str(self.root / "tiles.zarr"),
            shape=(len(self.grid), self.grid.th, self.grid.tw),
            chunks=(1, min(256, self.grid.th), min(256, self.grid.tw)),
            dtype="int32",
            fill_value=0,
        )
        _atomic_text(meta, json.dumps({"key": self.key, "fingerprint": self.fingerprint}, indent=1, default=str))
        return self

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- tiles -------------------------------------------------------------------------------
    def _array(self, mode="r"):
        import zarr

        return zarr.open_array(str(self.root / "tiles.zarr"), mode=mode)

    def put(self, index: int, labels: np.ndarray, info: dict | None = None) -> int:
        """Store tile ``index``'s label map (its tile shape); labels renumbered 1..n. -> n."""
        t = self.grid[index]
        if labels.shape != t.shape:
            raise ValueError(f"tile {index}: label map {labels.shape}, expected {t.shape}")
        uniq, inv = np.unique(labels, return_inverse=True)
        if uniq[0] != 0:
            uniq, inv = np.concatenate([[0], uniq]), inv + 1
        local = inv.reshape(labels.shape).astype(np.int32)
        n = len(uniq) - 1
        if n:
            self._array("r+")[index] = local
        marker = {"n": int(n), "cut": cut_labels(local, t, self.grid), **(info or {})}
        _atomic_text(self.root / "done" / f"{index}.json", json.dumps(marker))
        return n

    def mark_empty(self, index: int, info: dict | None = None) -> None:
        """A tile with nothing to segment (no prompts routed to it): no labels."""
        _atomic_text(self.root / "done" / f"{index}.json", json.dumps({"n": 0, **(info or {})}))

    def is_done(self, index: int) -> bool:
        return (self.root / "done" / f"{index}.json").is_file()

    def done(self) -> dict[int, dict]:
        """Finished tiles: index -> marker ({"n": label count, ...})."""
        out = {}
        for f in (self.root / "done").glob("*.json"):
            try:
                out[int(f.stem)] = json.loads(f.read_text())
            except (ValueError, OSError):
                continue  # a marker being written by another process: not finished yet
        return out

    def region(self, index: int, y0: int, y1: int, x0: int, x1: int, arr=None) -> np.ndarray:
        """Tile ``index``'s local labels over the slide region (inside the tile) -> int32."""
        t = self.grid[index]
        arr = arr if arr is not None else self._array()
        return np.asarray(arr[index, y0 - t.y0 : y1 - t.y0, x0 - t.x0 : x1 - t.x0])


def cut_labels(local: np.ndarray, tile, grid: TileGrid) -> list[int]:
    """Local labels touching an edge of the tile that lies inside the slide (cells the tile
    may see cut), sorted."""
    edges = []
    if tile.y0 > 0:
        edges.append(local[0])
    if tile.y1 < grid.height:
        edges.append(local[-1])
    if tile.x0 > 0:
        edges.append(local[:, 0])
    if tile.x1 < grid.width:
        edges.append(local[:, -1])
    if not edges:
        return []
    ids = np.unique(np.concatenate(edges))
    return [int(i) for i in ids if i > 0]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.part"
    tmp.write_text(text)
    os.replace(tmp, path)


def offsets_for(grid: TileGrid, done: dict[int, dict]) -> np.ndarray:
    """(n_tiles + 1,) int64: tile t's label l is pre-label offsets[t] + l; offsets[-1] = N.
    Unfinished tiles count 0 labels."""
    counts = np.array([int(done.get(i, {}).get("n", 0)) for i in range(len(grid))], np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


def link_pair(store: TileStore, a: int, b: int, min_iou: float, arr=None) -> np.ndarray:
    """(M, 2) local (label in a, label in b) matched in the overlap of tiles a and b."""
    ta, tb = store.grid[a], store.grid[b]
    y0, y1, x0, x1 = max(ta.y0, tb.y0), min(ta.y1, tb.y1), max(ta.x0, tb.x0), min(ta.x1, tb.x1)
    if y0 >= y1 or x0 >= x1:
        return np.zeros((0, 2), np.int64)
    la, lb = store.region(a, y0, y1, x0, x1, arr), store.region(b, y0, y1, x0, x1, arr)
    return label_ops.link_labels_by_iou(la, lb, min_iou)


def link_tiles(store: TileStore, done: dict[int, dict], offsets: np.ndarray, pairs=None) -> np.ndarray:
    """All links between finished neighbouring tiles -> (M, 2) int64 pre-label pairs."""
    arr = store._array()
    out = []
    for a, b in pairs if pairs is not None else store.grid.neighbour_pairs():
        if done.get(a, {}).get("n", 0) == 0 or done.get(b, {}).get("n", 0) == 0:
            continue
        m = link_pair(store, a, b, store.grid.settings.link_iou, arr)
        if len(m):
            out.append(np.stack([m[:, 0] + offsets[a], m[:, 1] + offsets[b]], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def global_lut(n_pre: int, links: np.ndarray) -> tuple[np.ndarray, int]:
    """Pre-labels 0..N and their links -> (lut (N + 1,) uint32 with lut[0] = 0, K cells).

    Linked pre-labels share a cell; cells are numbered 1..K by their smallest pre-label."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = int(n_pre) + 1
    if links.size:
        g = coo_matrix((np.ones(len(links), np.int8), (links[:, 0], links[:, 1])), shape=(n, n)).tocsr()
        _, comp = connected_components(g, directed=False)
    else:
        comp = np.arange(n)
    comp = comp[1:]
    uniq, first = np.unique(comp, return_index=True)
    rank = np.empty(int(comp.max(initial=0)) + 1, np.int64)
    rank[uniq[np.argsort(first)]] = np.arange(1, len(uniq) + 1)
    if len(uniq) >= 2**32:
        raise OverflowError(f"{len(uniq)} cells do not fit uint32 labels")
    lut = np.zeros(n, np.uint32)
    lut[1:] = rank[comp]
    return lut, int(len(uniq))


def _table(lut, offsets, index: int, n: int, dtype) -> np.ndarray:
    table = lut[offsets[index] : offsets[index] + n + 1].astype(dtype)
    table[0] = 0
    return table


def render_region(
    store: TileStore,
    done: dict[int, dict],
    offsets: np.ndarray,
    lut: np.ndarray,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    dtype=np.uint32,
    arr=None,
    windows: bool = False,
) -> np.ndarray:
    """The final labels of the slide region [y0, y1) x [x0, x1) -> (h, w) ``dtype``.

    Automatic runs: each pixel takes the label of the tile whose core holds it; where that
    tile has background, a neighbour's cell that the neighbour sees whole (not touching its
    tile edge) fills in, so a cell that only one tile segmented (a model may miss or misshape a
    cell cut by its tile edge) is written whole. Prompted runs (``windows``): each tile's
    labels over its whole window, raster order (see the module docstring)."""
    arr = arr if arr is not None else store._array()
    out = np.zeros((y1 - y0, x1 - x0), dtype)
    grid = store.grid
    for t, (ry0, ry1, rx0, rx1) in (grid.windows_in if windows else grid.cores_in)(y0, y1, x0, x1):
        n = int(done.get(t.index, {}).get("n", 0))
        if n == 0:
            continue
        local = store.region(t.index, ry0, ry1, rx0, rx1, arr)
        view = out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0]
        if windows:
            np.copyto(view, _table(lut, offsets, t.index, n, dtype)[local], where=local > 0)
        else:
            view[...] = _table(lut, offsets, t.index, n, dtype)[local]
    if windows:
        return out
    for t, (ry0, ry1, rx0, rx1) in grid.windows_in(y0, y1, x0, x1):  # the fill-in pass
        n = int(done.get(t.index, {}).get("n", 0))
        if n == 0:
            continue
        view = out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0]
        if view.all():
            continue
        table = _table(lut, offsets, t.index, n, dtype)
        table[done[t.index].get("cut", [])] = 0
        local = store.region(t.index, ry0, ry1, rx0, rx1, arr)
        np.copyto(view, table[local], where=view == 0)
    return out


def chunk_grid(height: int, width: int, chunk: int):
    """Raster-order (y0, y1, x0, x1) output chunks of ``chunk`` pixels."""
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            yield y, min(y + chunk, height), x, min(x + chunk, width)


def block_stats(block: np.ndarray, y0: int, x0: int) -> dict[str, np.ndarray]:
    """Per-label pixel count, coordinate sums and bounding box of one output block at slide
    offset (y0, x0) -> arrays over the labels present (``label`` sorted)."""
    rows, cols = np.nonzero(block)
    lab = block[rows, cols].astype(np.int64)
    u, first, inv, count = np.unique(lab, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(count)[:-1]]) if len(u) else np.zeros(0, np.int64)
    c_sorted, r_sorted = cols[order], rows[order]
    return {
        "label": u,
        "area": count.astype(np.int64),
        "sum_row": np.bincount(inv, weights=rows + y0, minlength=len(u)),
        "sum_col": np.bincount(inv, weights=cols + x0, minlength=len(u)),
        "min_row": rows[first] + y0 if len(u) else np.zeros(0, np.int64),  # rows come sorted
        "max_row": (np.maximum.reduceat(r_sorted, starts) if len(u) else np.zeros(0, np.int64)) + y0,
        "min_col": (np.minimum.reduceat(c_sorted, starts) if len(u) else np.zeros(0, np.int64)) + x0,
        "max_col": (np.maximum.reduceat(c_sorted, starts) if len(u) else np.zeros(0, np.int64)) + x0,
    }


class CellStats:
    """Area, centroid and bounding box of cells 1..K accumulated over the output blocks."""

    def __init__(self, cells: int) -> None:
        n = int(cells) + 1
        self.area = np.zeros(n, np.int64)
        self.sum_row, self.sum_col = np.zeros(n), np.zeros(n)
        big = np.iinfo(np.int64).max
        self.min_row, self.min_col = np.full(n, big), np.full(n, big)
        self.max_row, self.max_col = np.full(n, -1), np.full(n, -1)

    def add(self, s: dict[str, np.ndarray]) -> None:
        u = s["label"]  # unique within a block
        self.area[u] += s["area"]
        self.sum_row[u] += s["sum_row"]
        self.sum_col[u] += s["sum_col"]
        for k, f in (
            ("min_row", np.minimum),
            ("min_col", np.minimum),
            ("max_row", np.maximum),
            ("max_col", np.maximum),
        ):
            arr = getattr(self, k)
            arr[u] = f(arr[u], s[k])

    def table(self) -> dict[str, np.ndarray]:
        """Columns of ``outputs.TABLE_COLUMNS`` (bbox max exclusive; no score / IoU: NaN)."""
        idx = np.flatnonzero(self.area)
        idx = idx[idx > 0]
        a = self.area[idx]
        nan = np.full(len(idx), np.nan)
        return {
            "label": idx.astype(np.int64),
            "bbox_min_row": self.min_row[idx],
            "bbox_min_col": self.min_col[idx],
            "bbox_max_row": self.max_row[idx] + 1,
            "bbox_max_col": self.max_col[idx] + 1,
            "area": a,
            "centroid_row": self.sum_row[idx] / a,
            "centroid_col": self.sum_col[idx] / a,
            "detection_score": nan,
            "iou_prediction": nan.copy(),
        }
