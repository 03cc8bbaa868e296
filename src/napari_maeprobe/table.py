"""The observation table: one AnnData object per level, the one shape rows travel in.

``read_level`` turns one level of a store into an AnnData (the scverse convention the export
follows): ``obs`` with every schema column plus the analysis columns and the user's metadata,
``X`` the embeddings (float32; a dask array with ``lazy=True``), ``obsm`` every analysis
coordinate at full width, and ``uns``:

- ``uns["maeprobe"]``: the run facts (model, weights sha256, preprocessing, masking), the job's
  parameters, its inputs, the levels, and per level the analysis summary and settings;
- ``uns["maeprobe_drivers"][level]``: "what drives these clusters" (verdict, labels, table,
  skipped columns);
- ``uns[f"{column}_colors"]``: the colours of categorical columns, as scanpy keeps them.

Analysis (:mod:`.tl.analyze`) writes its results into this object, scanpy-style, and
:func:`save_analysis` persists them; the explorer, both exports, the report and ``evaluate``
read it. Per-cell arrays (crop origin, attention, mask, reconstruction) are not rows of any
level: they live in the store keyed by cell (``EmbeddingStore.cell_table``/``read_cells``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.schema import ANALYSIS_COLUMNS, LEVELS

if TYPE_CHECKING:
    import anndata as ad

    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.tl.diagnostics import DriversReport

#: the uns key of the run facts, and of the diagnostics tables
UNS_KEY = "maeprobe"
DRIVERS_KEY = "maeprobe_drivers"
#: the obsm key of the per-cell baseline features (pp.measure), global level; the store's own
#: per-cell array, never written back as an analysis result
FEATURES_KEY = "X_features"


def run_facts(store: EmbeddingStore, levels: Sequence[str]) -> dict:
    """``uns["maeprobe"]`` of a store's rows: facts, job parameters, inputs and levels."""
    facts = {
        **store.facts,
        "signature": store.signature.get("params", {}),
        "inputs": [i.get("name") for i in store.signature.get("inputs", [])],
        "levels": list(levels),
        "analysis": {},
    }
    facts.update(store.progress().as_dict())  # complete, and units / cells done of planned
    return facts


def read_level(store: EmbeddingStore, level: str, lazy: bool = False) -> ad.AnnData:
    """One level of a store as an AnnData (see the module docstring)."""
    import anndata as ad

    obs = store.read_obs(level)
    X = store.read_embeddings(level, lazy=lazy)
    obs.index = [f"{level[0]}{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=X, obs=obs)
    adata.var_names = [f"e{i}" for i in range(adata.n_vars)]
    adata.uns[UNS_KEY] = run_facts(store, [level])
    if level == "global":
        features = read_features(store, obs)
        if features is not None:
            adata.obsm[FEATURES_KEY], adata.uns[UNS_KEY]["feature_names"] = features
    analysis = store.read_analysis(level)
    if analysis is not None:
        arrays, cols, attrs = analysis
        if len(cols) and len(cols) != adata.n_obs:
            raise MaeprobeInputError(
                f"the {level} analysis in {store.path} covers {len(cols)} rows but the level has "
                f"{adata.n_obs} (the store changed after `maeprobe analyze`)",
                f"re-run `maeprobe analyze {store.path}`",
            )
        for name in cols.columns:
            adata.obs[name] = _analysis_column(name, cols[name])
        for name, values in arrays.items():
            if name.startswith("X_"):
                adata.obsm[name] = np.asarray(values)
        attrs = dict(attrs)
        drivers = attrs.pop("drivers", None)
        attrs.pop("columns", None)
        adata.uns[UNS_KEY]["analysis"] = {level: attrs}
        if drivers:
            from napari_maeprobe.tl.diagnostics import DriversReport

            adata.uns[DRIVERS_KEY] = {level: DriversReport.from_dict(drivers).to_uns()}
    drop_unused_categories(adata)
    set_colors(adata)
    return adata


def read_features(store: EmbeddingStore, obs: pd.DataFrame) -> tuple[np.ndarray, list[str]] | None:
    """The baseline features of the cells of ``obs`` (rows with ``image`` and ``cell_id``),
    ``(n, F)`` float32 aligned with its rows (NaN for a cell with none) and the feature names
    (union over images, in order of first appearance); None for a store without features
    (written before they were measured)."""
    infos = store.image_info()
    names = list(dict.fromkeys(n for info in infos for n in info.get("feature_names", [])))
    if not names or not len(obs):
        return None
    column = {n: j for j, n in enumerate(names)}
    out = np.full((len(obs), len(names)), np.nan, dtype=np.float32)
    images = obs["image"].astype(str).to_numpy()
    cells = obs["cell_id"].to_numpy(dtype=np.float64, na_value=np.nan)
    found = False
    for index, info in enumerate(infos):
        rows = np.flatnonzero(images == str(info.get("name")))
        got = store.read_cells("features", index) if len(rows) else None
        if got is None:
            continue
        ids, values = got
        pos = pd.Index(ids).get_indexer(cells[rows])
        ok = pos >= 0
        cols = [column[n] for n in info.get("feature_names", [])]
        out[np.ix_(rows[ok], cols)] = values[pos[ok]]
        found = True
    return (out, names) if found else None


def drop_unused_categories(adata: ad.AnnData) -> None:
    """Categorical columns keep only the values their rows hold (as anndata does when it
    subsets), so a table read whole and the same rows selected elsewhere are equal."""
    for col in adata.obs.columns:
        values = adata.obs[col]
        if isinstance(values.dtype, pd.CategoricalDtype):
            adata.obs[col] = values.cat.remove_unused_categories()


def _analysis_column(name: str, values: pd.Series):
    """An analysis column with its schema dtype (clusters categorical, flags nullable), as an
    array (assigning an array does not align on the index)."""
    from napari_maeprobe.schema import BY_NAME

    values = values.reset_index(drop=True)
    dtype = BY_NAME[name].dtype if name in BY_NAME else None
    if dtype == "category":
        return values.astype("string").astype("category").array
    if dtype == "boolean":
        return values.astype("boolean").array
    return values.array


def read_levels(store: EmbeddingStore, levels: Sequence[str] | None = None) -> ad.AnnData:
    """Some levels (default: all) stacked into one AnnData; ``level`` tells them apart.

    Columns missing at a level are NA there; obsm arrays of different widths (PCA fitted per
    level) are padded with NaN; PCA and UMAP coordinates are comparable within a level only.
    """
    levels = list(levels) if levels else store.levels()
    parts = [read_level(store, lvl) for lvl in levels]
    return stack_levels(parts)


def stack_levels(parts: Sequence[ad.AnnData]) -> ad.AnnData:
    """Stack per-level AnnData objects (obs union, obsm NaN-padded, uns merged)."""
    import anndata as ad

    from napari_maeprobe.embed.store import combine_categoricals

    if len(parts) == 1:
        return parts[0]
    obs = combine_categoricals([p.obs.reset_index(drop=True) for p in parts])
    for col in ANALYSIS_COLUMNS:
        if col in obs:
            obs[col] = _analysis_column(col, obs[col])
    obs.index = [name for p in parts for name in p.obs_names]
    X = np.concatenate([np.asarray(p.X, dtype=np.float32) for p in parts])
    out = ad.AnnData(X=X, obs=obs)
    out.var_names = parts[0].var_names
    keys = sorted({k for p in parts for k in p.obsm})
    for key in keys:
        width = max(p.obsm[key].shape[1] for p in parts if key in p.obsm)
        blocks = []
        for p in parts:
            block = np.full((p.n_obs, width), np.nan, dtype=np.float32)
            if key in p.obsm:
                block[:, : p.obsm[key].shape[1]] = p.obsm[key]
            blocks.append(block)
        out.obsm[key] = np.concatenate(blocks)
    uns = dict(parts[0].uns.get(UNS_KEY, {}))
    uns["levels"] = [lvl for p in parts for lvl in p.uns[UNS_KEY]["levels"]]
    uns["analysis"] = {k: v for p in parts for k, v in p.uns[UNS_KEY].get("analysis", {}).items()}
    out.uns[UNS_KEY] = uns
    drivers = {k: v for p in parts for k, v in p.uns.get(DRIVERS_KEY, {}).items()}
    if drivers:
        out.uns[DRIVERS_KEY] = drivers
    set_colors(out)
    return out


def set_colors(adata: ad.AnnData) -> None:
    """``uns[f"{column}_colors"]`` for every categorical column (scanpy's convention), from
    the shared colour policy."""
    from napari_maeprobe.pl.colors import category_hex

    for col in adata.obs.columns:
        values = adata.obs[col]
        if isinstance(values.dtype, pd.CategoricalDtype) and 0 < len(values.cat.categories):
            adata.uns[f"{col}_colors"] = category_hex(len(values.cat.categories))


def drivers(adata: ad.AnnData, level: str | None = None) -> DriversReport | None:
    """The stored "what drives these clusters" report of a level (default: the only one)."""
    from napari_maeprobe.tl.diagnostics import DriversReport

    stored = adata.uns.get(DRIVERS_KEY, {})
    if level is None:
        if len(stored) != 1:
            return None
        level = next(iter(stored))
    d = stored.get(level)
    return DriversReport.from_uns(d) if d is not None else None


def level_of(adata: ad.AnnData) -> str:
    """The level of a one-level table."""
    levels = [str(v) for v in pd.unique(adata.obs["level"].astype(str))]
    if len(levels) != 1 or levels[0] not in LEVELS:
        raise MaeprobeInputError(
            f"expected the rows of one level, got {', '.join(levels) or 'none'}",
            "pass one level's table (read_level)",
        )
    return levels[0]


def save_analysis(store: EmbeddingStore, adata: ad.AnnData) -> None:
    """Persist the analysis results held by a one-level table into the store: its obsm
    coordinates, analysis columns, summary and drivers."""
    level = level_of(adata)
    arrays = {  # X_features is the store's own per-cell array, not a result
        k: np.asarray(v, dtype=np.float32) for k, v in adata.obsm.items() if k != FEATURES_KEY
    }
    columns = {c: adata.obs[c].reset_index(drop=True) for c in ANALYSIS_COLUMNS if c in adata.obs}
    attrs = dict(adata.uns.get(UNS_KEY, {}).get("analysis", {}).get(level, {}))
    report = drivers(adata, level)
    if report is not None:
        attrs["drivers"] = report.to_dict()
    store.write_analysis(level, arrays, columns, json.loads(json.dumps(attrs, default=str)))
