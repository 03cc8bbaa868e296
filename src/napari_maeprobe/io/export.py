"""Export the observation table to AnnData (``.h5ad``), Parquet or CSV, as docs/contract.md says.

One function writes every export, the command line's and the explorer's: :func:`write_table`
takes the AnnData of :mod:`napari_maeprobe.table` (a store's levels, or a selection of rows).

- ``.h5ad``: ``X`` float32 embeddings, ``obs`` with every contract column (NA where missing)
  plus the analysis columns (``leiden``, ``kmeans``, ``analysed``) and user metadata, ``obsm``
  every analysis coordinate at full width (``X_pca``, ``X_umap``), ``uns["maeprobe"]`` with the
  model, weights sha256, preprocessing, masking, package version and analysis settings,
  ``uns["maeprobe_drivers"]`` with the diagnostics tables, ``uns[f"{column}_colors"]``.
- Parquet / CSV: the same ``obs`` columns plus ``e0``, ``e1``, ... (and ``umap_1``/``umap_2``
  when computed).

Several levels in one file are stacked (the ``level`` column tells them apart); PCA and UMAP
coordinates are computed per level, so compare them within a level only. Every write is atomic:
a killed export leaves no half-written file under the target name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.files import atomic_write

if TYPE_CHECKING:
    import anndata as ad

    from napari_maeprobe.embed.store import EmbeddingStore

FORMATS = ("h5ad", "parquet", "csv")


def _uns_safe(value):
    """Values h5py can store: drop None, lists of scalars as arrays, the rest as JSON text."""
    if isinstance(value, dict):
        return {str(k): _uns_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, pd.DataFrame):
        return value
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return np.array(value, dtype=object)
        if value and all(isinstance(v, (int, float, bool, np.number)) for v in value):
            return np.asarray(value)
        return json.dumps(value, default=str)
    if isinstance(value, (str, int, float, bool, np.number, np.ndarray)):
        return value
    return str(value)


def for_h5ad(adata: ad.AnnData) -> ad.AnnData:
    """A copy of the table that h5py can write (uns made safe, X float32, string index)."""
    out = adata.copy()
    out.X = np.asarray(out.X, dtype=np.float32)
    out.obs.index = out.obs.index.astype(str)
    out.uns = _uns_safe(dict(out.uns))
    return out


def flat_table(adata: ad.AnnData) -> pd.DataFrame:
    """The rows as one flat table: obs columns, ``umap_1``/``umap_2``, ``e0``, ``e1``, ..."""
    table = adata.obs.reset_index(drop=True).copy()
    if "X_umap" in adata.obsm:
        umap = np.asarray(adata.obsm["X_umap"])
        table["umap_1"], table["umap_2"] = umap[:, 0], umap[:, 1]
    X = np.asarray(adata.X, dtype=np.float32)
    emb = pd.DataFrame(X, columns=[f"e{i}" for i in range(X.shape[1])])
    return pd.concat([table, emb], axis=1)


def write_table(adata: ad.AnnData, fmt: str, out: str | Path) -> Path:
    """Write a table of rows (a store's levels or a selection) as h5ad, parquet or csv,
    atomically."""
    if fmt not in FORMATS:
        raise MaeprobeInputError(f"unknown export format {fmt!r}", "use h5ad, parquet or csv")
    out = Path(out)
    if fmt == "h5ad":
        safe = for_h5ad(adata)
        atomic_write(out, lambda p: safe.write_h5ad(p))
        return out
    table = flat_table(adata)
    if fmt == "parquet":
        atomic_write(out, lambda p: table.to_parquet(p, index=False))
    else:
        atomic_write(out, lambda p: table.to_csv(p, index=False))
    return out


def export_store(
    store: EmbeddingStore | str | Path,
    fmt: str,
    out: str | Path,
    level: str | Sequence[str] | None = None,
    allow_incomplete: bool = False,
) -> Path:
    """Write the store (one level, some, or all) to ``out`` as h5ad, parquet or csv, atomically.

    An incomplete store (an interrupted ``maeprobe embed``) is refused unless
    ``allow_incomplete``; ``uns["maeprobe"]`` records ``complete`` and the unit and cell counts."""
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.table import read_levels

    if not isinstance(store, EmbeddingStore):
        store = EmbeddingStore(store)
    store.require_complete(allow_incomplete)
    if fmt not in FORMATS:
        raise MaeprobeInputError(f"unknown export format {fmt!r}", "use h5ad, parquet or csv")
    levels = [level] if isinstance(level, str) else level
    return write_table(read_levels(store, levels), fmt, out)  # uns records complete + counts
