"""Readers (dask DataFrames over files) and sinks (writers that run on workers)."""
