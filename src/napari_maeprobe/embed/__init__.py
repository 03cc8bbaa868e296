"""Embedding jobs: images -> cells -> crops -> model -> the embedding store.

A job is planned on the caller's side (images read, channels picked, cells segmented or label
images loaded, cells split into units of work) and each unit is then embedded either here, by
the inference engine's worker process, or as one task on a dask.distributed cluster. Every
unit's rows land in the same store (:mod:`.store`); a re-run of the same job skips the
finished units, so an interrupted job resumes and ends with the same store as a clean run.

Rows are cell-major: for each cell, each channel (models that keep channels apart), each
patch in row-major order, so one batch of cells fills one contiguous block of rows.
"""
