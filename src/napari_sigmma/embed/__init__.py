"""A trained model over whole slides: the per-tile result type, embedding in memory,
streamed to a SpatialData `.zarr`, and a folder of slides on dask.
"""
