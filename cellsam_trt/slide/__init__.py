"""Whole-slide and large images: tiled, streamed, stitched, optionally spread over Dask.

read (``slide.io``: lazy OME-TIFF / BigTIFF / OME-Zarr / NPY regions) -> tile (``slide.grid``:
overlapping tiles, cores, prompt routing) -> segment (any engine's ``segment_many``) ->
stitch (``slide.stitch``: per-tile label store, IoU links across overlaps, global labels) ->
write (``slide.io``: OME-Zarr or tiled BigTIFF, chunk by chunk). ``slide.run`` drives the
passes in one process, ``slide.distributed`` on a Dask cluster; both give the same labels.
"""
