"""napari-maeprobe: explore what masked-autoencoder microscopy models see in your cells.

The pipeline, room by room: ``io`` (open data, export) -> ``pp`` (normalise, segment, crop,
mask) -> ``embed`` (plan a job, run the model in a worker, write the store) -> ``table`` (one
AnnData per level, columns defined in ``schema``) -> ``tl`` (analysis, diagnostics,
evaluation) -> ``pl`` (colours, report, linking rows to pixels); ``models`` holds the registry
and the models, ``progress`` the job layer, ``cli`` and ``demo`` the command line.

The core library (this package minus ``_napari``) has no Qt import; napari only loads
``napari_maeprobe._napari`` through the manifest ``napari.yaml``. Top-level names are imported
lazily so that ``import napari_maeprobe.models`` stays light (no dask, no napari).
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

_LAZY = {
    "MaeprobeInputError": "errors",
    "NoCellsFoundError": "errors",
    "WeightsNotFoundError": "errors",
    "MicroscopyImage": "io.image",
    "read_image": "io.reading",
    "read_images": "io.reading",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'napari_maeprobe' has no attribute {name!r}")
