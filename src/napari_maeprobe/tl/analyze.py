"""The analyze step: PCA, UMAP, Leiden (and k-means), the "what drives these clusters" diagnostics
and the effective rank of each level, written back into the level table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import ProgressCallback, report

if TYPE_CHECKING:
    import anndata as ad

    from napari_maeprobe.embed.store import EmbeddingStore


@dataclass
class AnalysisSettings:
    """How ``maeprobe analyze`` treats a level (defaults follow scanpy's usual choices)."""

    foreground: bool = False  # only foreground patches (Otsu on patch intensity)
    central: bool = False  # only patches in the middle half of the crop
    balance_by: str | None = None  # equal rows per value of this column
    max_rows: int | None = None  # analyse at most this many rows (balanced or uniform)
    n_pcs: int = 50
    n_neighbors: int = 15
    umap_max_fit: int = 20_000  # UMAP fit on a sample this big, the rest mapped by transform
    min_dist: float = 0.1
    resolution: float = 1.0  # Leiden
    kmeans: int | None = None  # k for k-means (None: no k-means)
    seed: int = 0
    condition: str | None = None  # treatment column: condition vs control, grouped by batch
    batch: str | None = None  # batch column (plate, imaging date)
    control: str | None = None  # the control value of ``condition`` (None: guessed)


def analyze(
    adata: ad.AnnData,
    settings: AnalysisSettings | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """PCA, UMAP, Leiden (and k-means), "what drives these clusters" and the effective rank of
    one level's table, written into it scanpy-style: ``obsm["X_pca"]``, ``obsm["X_umap"]``,
    ``obs["leiden"]`` (``obs["kmeans"]``), ``obs["analysed"]``,
    ``uns["maeprobe"]["analysis"][level]`` and ``uns["maeprobe_drivers"][level]``. Rows whose
    embedding is missing (masked patches) or that fail the filters get NA. Returns the
    summary."""
    import time

    from napari_maeprobe.table import DRIVERS_KEY, UNS_KEY, level_of, set_colors
    from napari_maeprobe.tl.analysis import (
        apply_filters,
        effective_rank,
        kmeans,
        leiden,
        pca,
        umap_embed,
    )
    from napari_maeprobe.tl.diagnostics import what_drives

    settings = settings or AnalysisSettings()
    level = level_of(adata)
    t0 = time.perf_counter()
    obs = adata.obs.reset_index(drop=True)
    _check_roles(settings, obs)
    report(progress, 0, 5, f"analysing {level}")
    X = np.asarray(adata.X, dtype=np.float32)
    n = len(obs)
    valid = np.isfinite(X).all(axis=1)
    keep = apply_filters(
        obs, settings.foreground, settings.central, settings.balance_by,
        settings.max_rows, settings.seed,
    )  # fmt: skip
    rows = keep[valid[keep]]
    if len(rows) < 10:
        raise MaeprobeInputError(
            f"only {len(rows)} {level} rows are left to analyse after the filters",
            "loosen the filters (--foreground/--central/--max-rows) or embed more cells",
        )
    P = pca(X[rows], settings.n_pcs, seed=settings.seed)
    report(progress, 1, 5, f"analysing {level}")
    balance = None
    if settings.balance_by:
        balance = obs[settings.balance_by].astype(str).to_numpy()[rows]
    U, umap_info = umap_embed(
        P, settings.n_neighbors, settings.min_dist, seed=settings.seed,
        max_fit=settings.umap_max_fit, balance_by=balance, progress=progress,
    )  # fmt: skip
    report(progress, 2, 5, f"analysing {level}")
    clusters = leiden(P, settings.n_neighbors, settings.resolution, seed=settings.seed)
    adata.obs["leiden"] = _labels_column(clusters, rows, n).array
    if settings.kmeans:
        k_labels = kmeans(P, settings.kmeans, seed=settings.seed)
        adata.obs["kmeans"] = _labels_column(k_labels, rows, n).array
    elif "kmeans" in adata.obs:
        del adata.obs["kmeans"]  # a k-means of an earlier analysis no longer matches
    analysed = np.zeros(n, dtype=bool)
    analysed[rows] = True
    adata.obs["analysed"] = pd.array(analysed, dtype="boolean")
    report(progress, 3, 5, f"analysing {level}")
    drivers = what_drives(P, obs.iloc[rows].reset_index(drop=True), clusters,
                          n_neighbors=settings.n_neighbors, seed=settings.seed,
                          labels_name="leiden", **_roles(what_drives, settings))  # fmt: skip
    report(progress, 4, 5, f"analysing {level}")
    rank = effective_rank(X[valid])
    adata.obsm["X_pca"] = _scatter_rows(P, rows, n)
    adata.obsm["X_umap"] = _scatter_rows(U, rows, n)
    summary = {
        "level": level, "rows": int(n), "analysed_rows": int(len(rows)),
        "n_pcs": int(P.shape[1]), "n_leiden": int(clusters.max() + 1),
        "effective_rank": float(rank), "umap": umap_info,
        "settings": {k: v for k, v in vars(settings).items()},
        "verdict": drivers.verdict, "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    if level == "channel":  # do per-channel embeddings describe the channel or the cell?
        from napari_maeprobe.tl.channel_content import channel_content

        content = channel_content(X[rows], obs.iloc[rows])
        if content is not None:
            summary["channel_content"] = content
    if level == "global" and settings.condition and settings.batch:
        from napari_maeprobe.tl.condition_batch import compare_condition_batch

        summary["condition_batch"] = compare_condition_batch(
            adata, settings.condition, settings.batch, settings.control,
            n_neighbors=settings.n_neighbors, seed=settings.seed, progress=progress,
        )  # fmt: skip
        summary["seconds"] = round(time.perf_counter() - t0, 2)
    adata.uns.setdefault(UNS_KEY, {}).setdefault("analysis", {})[level] = summary
    adata.uns.setdefault(DRIVERS_KEY, {})[level] = drivers.to_uns()
    set_colors(adata)
    report(progress, 5, 5, f"analysing {level}")
    return summary


def analyze_store(
    store: EmbeddingStore,
    levels: list[str] | None = None,
    settings: AnalysisSettings | None = None,
    progress: ProgressCallback | None = None,
    allow_incomplete: bool = False,
) -> dict[str, dict]:
    """:func:`analyze` each level of a store (default: all) and save the results into it.
    Returns the summary per level. An incomplete store (an interrupted ``maeprobe embed``) is
    refused unless ``allow_incomplete``; the store's write lock is held meanwhile."""
    from napari_maeprobe.table import read_level, save_analysis

    store.require_complete(allow_incomplete)
    out = {}
    with store.lock("analyze"):  # one writer at a time, whoever calls (CLI, GUI, demo)
        for level in levels or store.levels():
            adata = read_level(store, level)
            out[level] = analyze(adata, settings, progress)
            save_analysis(store, adata)
    return out


def _check_roles(settings: AnalysisSettings, obs: pd.DataFrame) -> None:
    """Refuse, before any work, a condition without a batch (or the reverse) and a column the
    table lacks."""
    if settings.control and not settings.condition:
        raise MaeprobeInputError(
            "--control names the control of --condition, which is not given",
            "pass --condition COL --batch COL with it, or leave --control out",
        )
    if bool(settings.condition) != bool(settings.batch):
        given, other = ("--condition", "--batch")[:: 1 if settings.condition else -1]
        raise MaeprobeInputError(
            f"{given} needs {other}: condition vs control is scored with folds grouped by batch",
            "pass both, e.g. --condition compound --batch plate",
        )
    for col, opt in ((settings.condition, "--condition"), (settings.batch, "--batch")):
        if col and col not in obs:
            raise MaeprobeInputError(
                f"no column {col!r} in the store's table",
                f"pass {opt} one of: {', '.join(map(str, obs.columns))}",
            )


def _roles(what_drives, settings: AnalysisSettings) -> dict:
    """The condition and batch columns for ``what_drives``, when it takes them."""
    import inspect

    params = inspect.signature(what_drives).parameters
    return {k: getattr(settings, k) for k in ("condition", "batch") if k in params}


def _scatter_rows(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    full = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
    full[rows] = values
    return full


def _labels_column(labels: np.ndarray, rows: np.ndarray, n: int) -> pd.Series:
    codes = np.full(n, -1, dtype=np.int64)
    codes[rows] = labels
    cats = [str(c) for c in range(int(labels.max()) + 1)]
    return pd.Series(pd.Categorical.from_codes(codes, categories=cats))
