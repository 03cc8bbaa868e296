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

Rows without an embedding are left out of every format: with masking on, the encoder never saw
the masked patches (75 % of patch rows at the usual ratio), so their ``X`` is NaN, and NaN rows
in ``X`` break ``scanpy.pp.pca`` and any tool downstream. The h5ad records how many were left
out and why in ``uns["maeprobe"]["masked_rows_dropped"]`` / ``["masked_rows_note"]``; every
export returns an :class:`Exported` path that carries the count (the CLI prints it).

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


class Exported(type(Path())):
    """The path of a written export, with what it left out: ``rows`` written,
    ``masked_rows_dropped`` (rows without an embedding) and ``note`` (why)."""

    rows: int = 0
    masked_rows_dropped: int = 0
    note: str = ""

    def left_out(self) -> str | None:
        """One line for the user, e.g. "left out 49,824 masked patch rows (no embedding:
        masking hid them from the encoder)", or None when nothing was left out."""
        if not self.masked_rows_dropped:
            return None
        return f"left out {self.masked_rows_dropped:,} {self.note}"


def embedded_rows(adata: ad.AnnData) -> np.ndarray:
    """Which rows have an embedding (every value of ``X`` finite); masked patches have none."""
    if adata.X is None:
        return np.ones(adata.n_obs, dtype=bool)
    X = np.asarray(adata.X, dtype=np.float32)
    if X.ndim != 2 or not X.shape[1]:
        return np.ones(adata.n_obs, dtype=bool)
    out = np.empty(len(X), dtype=bool)
    for start in range(0, len(X), 65_536):  # in blocks: no temporary the size of X
        out[start : start + 65_536] = np.isfinite(X[start : start + 65_536]).all(axis=1)
    return out


def _left_out_note(adata: ad.AnnData, dropped: np.ndarray) -> str:
    """Why rows have no embedding, for the record and the CLI's line."""
    masking = adata.uns.get("maeprobe", {}).get("masking")
    kind = masking.get("kind") if isinstance(masking, dict) else masking
    levels = adata.obs["level"].astype(str)[dropped].unique() if "level" in adata.obs else []
    what = f"{'/'.join(map(str, levels))} rows" if len(levels) else "rows"
    if kind and str(kind) != "none":
        what = "masked " + what
        return f"{what} (no embedding: {kind} masking hid them from the encoder)"
    return f"{what} (no embedding: NaN in X)"


def write_table(adata: ad.AnnData, fmt: str, out: str | Path) -> Exported:
    """Write a table of rows (a store's levels or a selection) as h5ad, parquet or csv,
    atomically, leaving out rows without an embedding (masked patches); the returned path
    says how many."""
    if fmt not in FORMATS:
        raise MaeprobeInputError(f"unknown export format {fmt!r}", "use h5ad, parquet or csv")
    out = Exported(out)
    keep = embedded_rows(adata)
    out.masked_rows_dropped = int((~keep).sum())
    out.note = _left_out_note(adata, ~keep) if out.masked_rows_dropped else ""
    out.rows = int(keep.sum())
    table = adata[keep] if out.masked_rows_dropped else adata
    if fmt == "h5ad":
        safe = for_h5ad(table)  # a copy: the caller's table is left as it was
        facts = dict(safe.uns.get("maeprobe", {}))
        facts["masked_rows_dropped"] = out.masked_rows_dropped
        if out.masked_rows_dropped:
            facts["masked_rows_note"] = (
                f"{out.masked_rows_dropped} {out.note} are left out of this file: NaN rows in X "
                "would break scanpy; the store keeps them (the explorer shows their positions "
                "and reconstructions)"
            )
        safe.uns["maeprobe"] = facts
        atomic_write(out, lambda p: safe.write_h5ad(p))
        return out
    flat = flat_table(table)
    if fmt == "parquet":
        atomic_write(out, lambda p: flat.to_parquet(p, index=False))
    else:
        atomic_write(out, lambda p: flat.to_csv(p, index=False))
    return out


def export_store(
    store: EmbeddingStore | str | Path,
    fmt: str,
    out: str | Path,
    level: str | Sequence[str] | None = None,
    allow_incomplete: bool = False,
) -> Exported:
    """Write the store (one level, some, or all) to ``out`` as h5ad, parquet or csv, atomically;
    rows without an embedding (masked patches) are left out and counted (see :func:`write_table`).

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
