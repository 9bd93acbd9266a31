"""Segment a slide in one process: tiles -> tile store -> links -> label store.

``segment_slide(source, engine, dest)`` runs the three passes of ``slide.stitch`` with any
engine that has ``segment_many(images, prompts)`` (``cellsam_trt.CellSAM``: tiles are
read lazily and pipelined, at most ``max_in_flight`` held). ``slide.distributed`` runs the
same functions (``segment_tile_batch``, ``write_chunks``) as Dask tasks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import preprocess as pre
from ..io import label_dtype_for
from ..pipeline import Channels, Prompts
from .grid import RoutedPrompts, TileGrid, TileSettings, route_prompts
from .io import OmeZarrLabelWriter, SlideError, SlideSource, write_bigtiff_labels
from .stitch import CellStats, TileStore, block_stats, chunk_grid, global_lut, link_tiles, offsets_for, render_region

OUTPUT_FORMATS = ("ome-zarr", "bigtiff")


@dataclass(frozen=True)
class SlideOutput:
    """Where and how the label map is written.

    dest: the label store (``.ome.zarr`` folder or ``.ome.tif`` file); fmt: "ome-zarr" or
    "bigtiff"; chunk: output chunk / TIFF tile side in pixels (a multiple of 16);
    levels: pyramid levels of an OME-Zarr store (1 = full resolution only); table: optional
    per-cell table (``.csv`` or ``.parquet``: label, bounding box, area, centroid in slide pixels).
    """

    dest: Path
    fmt: str = "ome-zarr"
    chunk: int = 1024
    levels: int = 1
    table: Path | None = None

    def __post_init__(self):
        if self.fmt not in OUTPUT_FORMATS:
            raise ValueError(f"unknown slide output format {self.fmt!r} (use one of {OUTPUT_FORMATS})")
        if self.chunk < 16 or self.chunk % 16:
            raise ValueError(f"chunk must be a positive multiple of 16, got {self.chunk}")
        if self.levels < 1:
            raise ValueError("levels must be >= 1")


@dataclass
class SlideResult:
    """What a slide run did. failed: (tile index, (y0, y1, x0, x1), error) of tiles whose
    regions are empty in the output; unrouted: (prompt number, reason)."""

    dest: Path
    cells: int
    grid: dict
    tiles_segmented: int
    tiles_resumed: int
    failed: list = field(default_factory=list)
    unrouted: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> dict:
        return {
            "dest": str(self.dest),
            "cells": self.cells,
            "grid": self.grid,
            "tiles_segmented": self.tiles_segmented,
            "tiles_resumed": self.tiles_resumed,
            "failed_tiles": [{"tile": i, "region_yyxx": list(r), "error": e} for i, r, e in self.failed],
            "unrouted_prompts": [{"prompt": i, "reason": r} for i, r in self.unrouted],
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class ChannelMap:
    """Which slide channels are nuclear / whole-cell (None: the official rule on the tile)."""

    nuclear: int | None = None
    wholecell: int | None = None

    def apply(self, tile: np.ndarray) -> np.ndarray:
        if tile.ndim == 3 and tile.shape[-1] == 1:
            tile = tile[..., 0]
        if self.nuclear is None and self.wholecell is None:
            return tile
        out, _ = pre.select_channels(tile, -1, self.nuclear, self.wholecell)
        return out

    @property
    def engine_channels(self) -> Channels | None:
        """What the engine is told of a tile after ``apply``: channels last (None: its own rule)."""
        return None if self.nuclear is None and self.wholecell is None else Channels(axis=-1)


def read_tile(source: SlideSource, grid: TileGrid, index: int, channels: ChannelMap) -> np.ndarray:
    t = grid[index]
    return channels.apply(source.read(t.y0, t.y1, t.x0, t.x1))


def _prompts_for(routed: RoutedPrompts | None, index: int):
    if routed is None:
        return None
    e = routed.per_tile.get(index)
    return Prompts(e["boxes"], e["points"], e["point_labels"]) if e is not None else None


def segment_tile_batch(
    engine,
    source: SlideSource,
    store: TileStore,
    indices,
    routed: RoutedPrompts | None,
    channels: ChannelMap,
    max_in_flight: int = 2,
) -> tuple[list[int], list[tuple[int, str]]]:
    """Segment tiles ``indices`` into ``store`` (tiles already done are skipped).

    -> (indices stored, [(index, error message)]). In prompted mode a tile without prompts is
    stored empty without calling the engine. A failing tile is reported, the others go on.
    """
    todo, stored = [], []
    for i in indices:
        if store.is_done(i):
            continue
        if routed is not None and i not in routed.per_tile:
            store.mark_empty(i, {"prompts": 0})
            stored.append(i)
        else:
            todo.append(i)
    errors: list[tuple[int, str]] = []
    read_errors: dict[int, str] = {}

    def tiles():
        for i in todo:
            try:
                yield read_tile(source, store.grid, i, channels)
            except Exception as e:  # reported as the tile's error below
                read_errors[i] = f"cannot read tile: {type(e).__name__}: {e}"
                yield np.zeros(store.grid[i].shape, np.uint8)

    prompts = (_prompts_for(routed, i) for i in todo)
    for item in engine.segment_many(tiles(), prompts, channels=channels.engine_channels, max_in_flight=max_in_flight):
        i = todo[item.index]
        t = store.grid[i]
        where = f"tile {i} (rows {t.y0}:{t.y1}, cols {t.x0}:{t.x1})"
        if i in read_errors:
            errors.append((i, f"{source.name}: {where}: {read_errors[i]}"))
        elif item.error is not None:
            errors.append((i, f"{source.name}: {where}: {type(item.error).__name__}: {item.error}"))
        else:
            seg = item.segmentation
            store.put(i, seg.labels, {"prompts": 0 if routed is None else int(len(routed.per_tile[i]["ids"]))})
            stored.append(i)
    return stored, errors


def prompted(store: TileStore) -> bool:
    """Was the store made by a prompted run (each prompt in one tile: paste whole windows)?"""
    return store.fingerprint.get("prompts") is not None


def write_chunks(
    store: TileStore,
    done: dict,
    offsets: np.ndarray,
    lut: np.ndarray,
    writer: OmeZarrLabelWriter,
    chunks,
    stats: bool = False,
) -> list:
    """Render and write output chunks [(y0, y1, x0, x1)] into the (partial) OME-Zarr store.
    -> per-chunk cell statistics (``stitch.block_stats``) when ``stats``, else []."""
    arr, tiles = writer.array(0), store._array()
    out = []
    for y0, y1, x0, x1 in chunks:
        block = render_region(store, done, offsets, lut, y0, y1, x0, x1, writer.dtype, tiles, prompted(store))
        writer.write(y0, x0, block, arr)
        if stats:
            out.append(block_stats(block, y0, x0))
    return out


def stitch(store: TileStore):
    """Pass 2: -> (done markers, offsets, lut, cells). Prompted runs have no links: each
    prompt was segmented by one tile."""
    done = store.done()
    offsets = offsets_for(store.grid, done)
    links = np.zeros((0, 2), np.int64) if prompted(store) else link_tiles(store, done, offsets)
    lut, cells = global_lut(int(offsets[-1]), links)
    return done, offsets, lut, cells


def work_dir_for(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.work"


def segment_slide(
    source: SlideSource,
    engine,
    output: SlideOutput,
    tiles: TileSettings | None = None,
    *,
    boxes=None,
    points=None,
    point_labels=None,
    channels: ChannelMap | None = None,
    fingerprint: dict | None = None,
    retries: int = 1,
    batch: int = 8,
    max_in_flight: int = 2,
    progress=None,
) -> SlideResult:
    """Segment a slide into a label store.

    source: ``slide.io.SlideSource``; engine: anything with ``segment_many`` (a
    ``CellSAM``); boxes / points / point_labels: prompts in slide pixels (then only
    tiles holding prompts are segmented; see ``grid.route_prompts``); fingerprint: what the
    tiles depend on besides the slide and grid (model, settings), for resuming. A failing tile
    is retried ``retries`` times, then reported in ``SlideResult.failed`` (its region is
    empty) and the work folder is kept so that the next run redoes only the failed tiles.
    progress: optional callable(tiles finished, tiles in all).
    """
    grid, routed, store, channels = prepare_slide(
        source, output, tiles, boxes, points, point_labels, channels, fingerprint
    )
    finished = store.done()
    resumed = len(finished)
    seconds = {}
    t0 = time.perf_counter()
    failed: dict[int, str] = {}
    todo = [i for i in range(len(grid)) if i not in finished]
    segmented = 0
    for _ in range(retries + 1):
        failed = {}
        for k in range(0, len(todo), batch):
            stored, errors = segment_tile_batch(
                engine, source, store, todo[k : k + batch], routed, channels, max_in_flight
            )
            segmented += len(stored)
            failed.update(errors)
            if progress is not None:
                progress(resumed + segmented, len(grid))
        todo = sorted(failed)
        if not todo:
            break
    seconds["segment"] = time.perf_counter() - t0
    return conclude(finish_slide(store, source, output), store, routed, failed, segmented, resumed, seconds)


def conclude(
    result: SlideResult, store: TileStore, routed, failed: dict[int, str], segmented: int, resumed: int, seconds: dict
) -> SlideResult:
    """Fill in the run's counts, failures and prompts not routed; remove the work folder when
    every tile succeeded (else keep it for the next run)."""
    result.tiles_segmented, result.tiles_resumed = segmented, resumed
    result.failed = [(i, store.grid[i].core, failed[i]) for i in sorted(failed)]
    result.unrouted = routed.unrouted if routed is not None else []
    result.seconds = {**seconds, **result.seconds}
    if result.ok:
        store.remove()
    return result


def prepare_slide(source, output, tiles, boxes, points, point_labels, channels, fingerprint):
    """-> (grid, routed prompts or None, opened tile store (resumed when it matches), channels)."""
    channels = channels or ChannelMap()
    for what, idx in (("nuclear", channels.nuclear), ("whole-cell", channels.wholecell)):
        if idx is not None and not 0 <= idx < max(source.channels, 1):
            raise SlideError(f"{source.name}: {what} channel {idx} does not exist ({source.channels or 1} channels)")
    if source.channels > 3 and channels.nuclear is None and channels.wholecell is None:
        raise SlideError(
            f"{source.name}: {source.channels} channels; name the nuclear and / or whole-cell channel "
            "(CellSAM takes at most 3)"
        )
    grid = TileGrid(source.height, source.width, tiles or TileSettings())
    routed = route_prompts(grid, boxes, points, point_labels) if (boxes is not None or points is not None) else None
    fp = {
        "slide": source.name,
        "level": source.level,
        "series": source.series,
        "channels": vars(channels),
        **(fingerprint or {}),
        "prompts": _prompt_digest(boxes, points, point_labels),
    }
    return grid, routed, TileStore(work_dir_for(Path(output.dest)), grid, fp).open(), channels


def finish_slide(store: TileStore, source: SlideSource, output: SlideOutput, write=None) -> SlideResult:
    """Passes 2 and 3: link the stored tiles and write the label store (and ``output.table``).
    ``write``: optional callable(writer, chunk list, done, offsets, lut, stats) -> per-chunk
    statistics, that writes the OME-Zarr chunks elsewhere (Dask)."""
    t0 = time.perf_counter()
    done, offsets, lut, cells = stitch(store)
    t1 = time.perf_counter()
    dtype = label_dtype_for(cells)
    chunks = list(chunk_grid(source.height, source.width, output.chunk))
    dest = Path(output.dest)
    want = output.table is not None
    stats = CellStats(cells) if want else None
    if output.fmt == "ome-zarr":
        writer = OmeZarrLabelWriter(
            dest, source.shape, dtype, output.chunk, output.levels, source.pixel_size_um, source_image=source.name
        ).create()
        try:
            parts = (
                write_chunks(store, done, offsets, lut, writer, chunks, want)
                if write is None
                else write(writer, chunks, done, offsets, lut, want)
            )
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        for p in parts:
            stats.add(p)
    else:

        def blocks():
            for c in chunks:
                block = render_region(store, done, offsets, lut, *c, dtype=dtype, windows=prompted(store))
                if want:
                    stats.add(block_stats(block, c[0], c[2]))
                yield block

        write_bigtiff_labels(dest, source.shape, dtype, output.chunk, blocks(), source.pixel_size_um)
    if want:
        from ..outputs import write_table

        write_table(stats.table(), output.table)
    t2 = time.perf_counter()
    return SlideResult(dest, cells, store.grid.describe(), 0, 0, seconds={"link": t1 - t0, "write": t2 - t1})


def _prompt_digest(boxes, points, point_labels) -> str | None:
    if boxes is None and points is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for a in (boxes, points, point_labels):
        h.update(b"-" if a is None else np.ascontiguousarray(np.asarray(a, np.float64)).tobytes())
    return h.hexdigest()[:16]
