"""Slides on a Dask cluster: tiles segmented by workers, each loading its engine once.

``segment_slide_dask(client, source, spec, output, tiles)`` runs the passes of
``slide.run.segment_slide`` as Dask tasks: pass 1 (batches of tiles, ``retries`` times on
failure; a retry redoes only the tiles of its batch that are not yet stored), pass 2 (links,
on the client, reading the overlaps from the tile store) and pass 3 (output chunks rendered
and written by the workers into the OME-Zarr store; a BigTIFF is written by the client, in
raster order, as TIFF requires). The tile store and the output live on a filesystem
that the client and every worker see (one machine, or a shared volume). The labels equal the
single-process run's: the numbering depends only on the tiles, not on which worker ran them.

``EnginePlugin`` is the worker plugin: it builds the engine from an ``api.EngineSpec``
(or any picklable zero-argument factory) when a worker starts. With ``device="cuda"`` each
worker takes GPU ``worker index % GPU count``.
"""

from __future__ import annotations

import time

from .grid import RoutedPrompts, TileSettings
from .run import (
    ChannelMap,
    SlideOutput,
    SlideResult,
    conclude,
    finish_slide,
    prepare_slide,
    segment_tile_batch,
    write_chunks,
)

PLUGIN = "cellsam-trt-engine"


class TileBatchError(RuntimeError):
    """Tiles of a batch that failed: args[0] = [(tile index, message), ...]."""

    def __str__(self) -> str:
        return "; ".join(m for _, m in self.args[0])


def _worker_index(worker) -> int:
    name = getattr(worker, "name", 0)
    try:
        return int(name)
    except (TypeError, ValueError):
        return abs(hash(str(name)))


def _engine_plugin_base():
    from distributed.diagnostics.plugin import WorkerPlugin

    return WorkerPlugin


def make_engine_plugin(factory):
    """A ``distributed`` WorkerPlugin that builds ``factory`` (an ``EngineSpec`` or a picklable
    zero-argument callable returning an engine) once per worker."""

    class EnginePlugin(_engine_plugin_base()):
        name = PLUGIN

        def __init__(self, factory):
            self.factory = factory
            self.engine = None

        def setup(self, worker):
            f = self.factory
            if hasattr(f, "build"):
                if str(getattr(f, "device", "cpu")).startswith("cuda") and ":" not in f.device:
                    import torch

                    n = torch.cuda.device_count()
                    if n:
                        f = f.with_device(f"cuda:{_worker_index(worker) % n}")
                self.engine, self.info = f.build()
            else:
                self.engine, self.info = f(), {}

    return EnginePlugin(factory)


def _engine():
    from distributed import get_worker

    return get_worker().plugins[PLUGIN].engine


def _segment_task(indices, source, store, routed, channels, max_in_flight):
    stored, errors = segment_tile_batch(_engine(), source, store, indices, routed, channels, max_in_flight)
    if errors:
        raise TileBatchError(errors)
    return stored


def _write_task(chunks, store, done, offsets, lut, writer, stats):
    return write_chunks(store, done, offsets, lut, writer, chunks, stats)


def _subset(routed: RoutedPrompts | None, indices):
    if routed is None:
        return None
    return RoutedPrompts({i: routed.per_tile[i] for i in indices if i in routed.per_tile}, [])


def local_cluster(n_workers: int, threads_per_worker: int = 1):
    """A local Dask cluster on loopback: ``n_workers`` processes (one per GPU, or CPU workers)."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )


def segment_slide_dask(
    client,
    source,
    spec,
    output: SlideOutput,
    tiles: TileSettings | None = None,
    *,
    boxes=None,
    points=None,
    point_labels=None,
    channels: ChannelMap | None = None,
    fingerprint: dict | None = None,
    retries: int = 2,
    batch: int = 4,
    max_in_flight: int = 2,
    progress=None,
    register_plugin: bool = True,
) -> SlideResult:
    """``slide.run.segment_slide`` on the cluster of ``client`` (see the module docstring).

    spec: the engine every worker loads (``EngineSpec``); it is registered as a worker plugin
    unless ``register_plugin`` is False (already registered). A batch that still fails after
    ``retries`` retries is reported tile by tile in ``SlideResult.failed``.
    """
    from distributed import as_completed

    grid, routed, store, channels = prepare_slide(
        source, output, tiles, boxes, points, point_labels, channels, fingerprint
    )
    done = store.done()
    if register_plugin:
        client.register_plugin(make_engine_plugin(spec), name=PLUGIN)
    t0 = time.perf_counter()
    todo = [i for i in range(len(grid)) if i not in done]
    batches = [todo[k : k + batch] for k in range(0, len(todo), batch)]
    futures = [
        client.submit(
            _segment_task,
            b,
            source,
            store,
            _subset(routed, b),
            channels,
            max_in_flight,
            retries=retries,
            pure=False,
            key=f"cellsam-tiles-{store.key}-{b[0]}",
        )
        for b in batches
    ]
    by_key = {f.key: b for f, b in zip(futures, batches)}
    failed: dict[int, str] = {}
    finished = 0
    for fut in as_completed(futures):
        b = by_key[fut.key]
        if fut.status == "error":
            exc = fut.exception()
            errs = (
                exc.args[0]
                if isinstance(exc, TileBatchError)
                else [(i, f"{source.name}: tile {i}: {type(exc).__name__}: {exc}") for i in b]
            )
            failed.update(errs)
        else:
            finished += len(fut.result())
        if progress is not None:
            progress(len(grid) - len(todo) + finished + len(failed), len(grid))
    # a batch that failed part-way stored its good tiles: they count as done
    done_now = store.done()
    failed = {i: m for i, m in failed.items() if i not in done_now}
    segmented = len(done_now) - len(done)
    seconds = {"segment": time.perf_counter() - t0}

    def write(writer, chunks, done, offsets, lut, stats):
        done_f, offsets_f, lut_f = client.scatter([done, offsets, lut], broadcast=True)
        rows = {}
        for c in chunks:
            rows.setdefault(c[0], []).append(c)
        fs = [
            client.submit(
                _write_task, group, store, done_f, offsets_f, lut_f, writer, stats, pure=False, retries=retries
            )
            for group in rows.values()
        ]
        return [p for part in client.gather(fs) for p in part]

    result = finish_slide(store, source, output, write=write if output.fmt == "ome-zarr" else None)
    return conclude(result, store, routed, failed, segmented, len(done), seconds)
