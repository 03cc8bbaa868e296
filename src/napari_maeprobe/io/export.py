"""Export an embedding store to AnnData (``.h5ad``), Parquet or CSV, as docs/contract.md says.

- ``.h5ad``: ``X`` float32 embeddings, ``obs`` with every contract column (NA where missing)
  plus the analysis columns (``leiden``, ``kmeans``, ``analysed``) and user metadata, ``obsm``
  ``X_pca`` / ``X_umap`` once computed, ``uns["maeprobe"]`` with the model, weights sha256,
  preprocessing, masking and package version, and ``uns["maeprobe_drivers"]`` with the
  diagnostics tables.
- Parquet / CSV: the same ``obs`` columns plus ``e0``, ``e1``, ... (and ``umap_1``/``umap_2``
  when computed).

Several levels in one file are stacked (the ``level`` column tells them apart); PCA and UMAP
coordinates are computed per level, so compare them within a level only. Every write is atomic:
a killed export leaves no half-written file under the target name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from napari_maeprobe.embed.store import EmbeddingStore, combine_categoricals
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.files import atomic_write

FORMATS = ("h5ad", "parquet", "csv")


def level_table(
    store: EmbeddingStore, level: str
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray], dict]:
    """(obs with analysis columns, X, obsm arrays, analysis attrs) of one level."""
    obs, X = store.read_level(level)
    obsm: dict[str, np.ndarray] = {}
    attrs: dict = {}
    analysis = store.read_analysis(level)
    if analysis is not None:
        arrays, cols, attrs = analysis
        if len(cols) and len(cols) != len(obs):
            raise MaeprobeInputError(
                f"the {level} analysis in {store.path} covers {len(cols)} rows but the level has "
                f"{len(obs)} (the store changed after `maeprobe analyze`)",
                f"re-run `maeprobe analyze {store.path}`",
            )
        for name in cols.columns:
            obs[name] = cols[name].to_numpy() if cols[name].dtype != "category" else cols[name]
        obsm = {k: v for k, v in arrays.items() if k.startswith("X_")}
    return obs, X, obsm, attrs


def _pad(arrays: list[np.ndarray | None], rows: list[int]) -> np.ndarray | None:
    if all(a is None for a in arrays):
        return None
    width = max(a.shape[1] for a in arrays if a is not None)
    out = []
    for a, n in zip(arrays, rows):
        block = np.full((n, width), np.nan, dtype=np.float32)
        if a is not None:
            block[:, : a.shape[1]] = a
        out.append(block)
    return np.concatenate(out)


def _uns_safe(value):
    """Values h5py can store: drop None, lists of scalars as arrays, the rest as JSON text."""
    import json

    if isinstance(value, dict):
        return {str(k): _uns_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return np.array(value, dtype=object)
        if value and all(isinstance(v, (int, float, bool, np.number)) for v in value):
            return np.asarray(value)
        return json.dumps(value, default=str)
    if isinstance(value, (str, int, float, bool, np.number)):
        return value
    return str(value)


def collect(
    store: EmbeddingStore, levels: Sequence[str] | None = None
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray], dict]:
    """The rows of some levels (default: all) stacked: (obs, X, obsm, uns)."""
    levels = list(levels) if levels else store.levels()
    frames, xs, obsms, per_level = [], [], [], {}
    for level in levels:
        obs, X, obsm, attrs = level_table(store, level)
        frames.append(obs)
        xs.append(X)
        obsms.append(obsm)
        per_level[level] = attrs
    obs = combine_categoricals(frames) if len(frames) > 1 else frames[0]
    X = np.concatenate(xs).astype(np.float32)
    rows = [len(f) for f in frames]
    keys = sorted({k for m in obsms for k in m})
    obsm = {k: _pad([m.get(k) for m in obsms], rows) for k in keys}
    obs.index = [f"{lvl[0]}{i}" for lvl, n in zip(levels, rows) for i in range(n)]
    for col in ("leiden", "kmeans"):
        if col in obs and not isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = obs[col].astype("string").astype("category")
    uns = {
        "maeprobe": {
            **store.facts,
            "signature": store.signature.get("params", {}),
            "inputs": [i.get("name") for i in store.signature.get("inputs", [])],
            "levels": levels,
            "analysis": {
                lvl: {k: v for k, v in a.items() if k != "drivers"}
                for lvl, a in per_level.items()
                if a
            },  # fmt: skip
        },
    }
    drivers = {lvl: a["drivers"] for lvl, a in per_level.items() if a and a.get("drivers")}
    if drivers:
        uns["maeprobe_drivers"] = drivers
    return obs, X, obsm, uns


def to_anndata(store: EmbeddingStore, levels: Sequence[str] | None = None):
    """The store (some levels, default all) as an AnnData object (see the module docstring)."""
    return make_anndata(*collect(store, levels))


def make_anndata(obs: pd.DataFrame, X: np.ndarray, obsm: dict, uns: dict):
    """An AnnData from the pieces :func:`collect` returns (or a selection of their rows)."""
    import anndata as ad

    from napari_maeprobe.tl.diagnostics import DriversReport

    obs = obs.copy()
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs)
    adata.var_names = [f"e{i}" for i in range(adata.n_vars)]
    for k, v in obsm.items():
        adata.obsm[k] = np.asarray(v)
    adata.uns["maeprobe"] = _uns_safe(uns.get("maeprobe", {}))
    for level, d in uns.get("maeprobe_drivers", {}).items():
        drivers = DriversReport.from_dict(d)
        adata.uns.setdefault("maeprobe_drivers", {})[level] = {
            "verdict": drivers.verdict,
            "labels": drivers.labels_name,
            "table": drivers.table,
        }
    return adata


def write_rows(
    obs: pd.DataFrame,
    X: np.ndarray,
    obsm: dict[str, np.ndarray],
    uns: dict,
    fmt: str,
    out: str | Path,
) -> Path:
    """Write rows (a whole store's or a selection's) as h5ad, parquet or csv, atomically."""
    if fmt not in FORMATS:
        raise MaeprobeInputError(f"unknown export format {fmt!r}", "use h5ad, parquet or csv")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "h5ad":
        adata = make_anndata(obs, X, obsm, uns)
        atomic_write(out, lambda p: adata.write_h5ad(p))
        return out
    table = obs.reset_index(drop=True)
    if "X_umap" in obsm:
        table["umap_1"], table["umap_2"] = obsm["X_umap"][:, 0], obsm["X_umap"][:, 1]
    emb = pd.DataFrame(np.asarray(X, dtype=np.float32),
                       columns=[f"e{i}" for i in range(X.shape[1])])  # fmt: skip
    table = pd.concat([table, emb], axis=1)
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
) -> Path:
    """Write the store (one level, some, or all) to ``out`` as h5ad, parquet or csv, atomically."""
    if not isinstance(store, EmbeddingStore):
        store = EmbeddingStore(store)
    if fmt not in FORMATS:
        raise MaeprobeInputError(f"unknown export format {fmt!r}", "use h5ad, parquet or csv")
    levels = [level] if isinstance(level, str) else level
    return write_rows(*collect(store, levels), fmt, out)
