"""One unit of work: its crops, its observation rows and the writes of each batch the engine
returns."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from napari_maeprobe.embed.engine import (
    BatchResult,
    InferenceEngine,
    ModelInfo,
)
from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.plan import PlannedImage
from napari_maeprobe.embed.store import UnitSpec
from napari_maeprobe.pp.boundaries import patch_fractions
from napari_maeprobe.pp.measure import crop_padding
from napari_maeprobe.pp.preprocessing import (
    CropSet,
    apply_normalization,
    cell_crops,
    patch_table,
    tile_image,
)
from napari_maeprobe.progress import ProgressCallback
from napari_maeprobe.schema import channel_column, conform

#: a channel whose normalised values within the cell's mask span less than this is empty
EMPTY_RANGE = 1e-3


def unit_crops(
    p: PlannedImage,
    unit: UnitSpec,
    crop_size: tuple[int, ...],
    boundary: np.ndarray | None,
    normalization: str = "percentile",
) -> CropSet:
    """The normalised crops of one unit's cells (tiles without segmentation)."""
    if p.crop_fit is not None:
        return _stack_crops(p, unit, crop_size, normalization)
    data = p.image.to_numpy()
    img = p.image
    if p.labels is None:
        tiles = tile_image(data, crop_size, image_name=img.name, channel_names=img.channel_names)
        sel = unit.cell_ids
        crops = CropSet(
            tiles.crops[sel], tiles.cell_masks[sel], None, tiles.cell_ids[sel],
            tiles.origins[sel], tiles.centroids[sel], tiles.size, "tile", img.name,
            tiles.channel_names,
        )  # fmt: skip
    else:
        crops = cell_crops(data, p.labels, crop_size, img.name, img.channel_names,
                           ids=unit.cell_ids, boundary=boundary)  # fmt: skip
    crops.crops = apply_normalization(crops.crops, p.stats, normalization)
    return crops


def _stack_crops(
    p: PlannedImage, unit: UnitSpec, crop_size: tuple[int, ...], normalization: str
) -> CropSet:
    """A crop stack's crops for one unit: each one cell, fitted to ``crop_size`` (pad |
    resize), centroids at the crop's own centre, in the crop's own pixel coordinates."""
    from napari_maeprobe.io.crops import fit_crops

    stack = p.image
    ids = np.asarray(unit.cell_ids, dtype=np.int64)
    fitted, masks, origins = fit_crops(np.asarray(stack.data[ids]), crop_size, p.crop_fit)
    centre = (np.asarray(stack.spatial_shape, dtype=np.float64) - 1) / 2.0
    crops = CropSet(fitted, masks, None, ids, origins, np.tile(centre, (len(ids), 1)),
                    tuple(crop_size), "cell", stack.name, tuple(stack.channel_names))  # fmt: skip
    crops.crops = apply_normalization(crops.crops, p.stats, normalization)
    return crops


def _with_cell_obs(frame: pd.DataFrame, cell_obs: pd.DataFrame | None) -> pd.DataFrame:
    """The per-cell columns of ``cell_obs`` (indexed by cell id) added to each row by its
    ``cell_id`` (cells without a row: NA)."""
    if cell_obs is None or not len(cell_obs.columns):
        return frame
    ids = frame["cell_id"].astype("int64").to_numpy()
    looked = cell_obs.reindex(ids)
    for col in cell_obs.columns:
        if col not in frame:
            frame[col] = pd.Categorical(looked[col].astype("string").to_numpy())
    return frame


def channel_empty(crops: CropSet, spatial_shape: Sequence[int] | None) -> np.ndarray:
    """Per crop and channel, whether the normalised channel is constant within the cell's mask
    (max - min below :data:`EMPTY_RANGE`), (N, C) bool (a cell with no pixel in its crop: True,
    nothing of it is seen).

    ``spatial_shape``: the source image's, so that padding outside the image (tiles' masks
    cover their whole window) is left out; None for crop stacks (their masks say it)."""
    x = crops.crops
    mask = np.asarray(crops.cell_masks, dtype=bool)
    if spatial_shape is not None:  # pixels of the window that lie inside the image
        for axis, (size, full) in enumerate(zip(crops.size, spatial_shape)):
            pos = crops.origins[:, axis : axis + 1] + np.arange(size)[None, :]
            inside = (pos >= 0) & (pos < full)
            shape = [len(x)] + [1] * len(crops.size)
            shape[1 + axis] = size
            mask = mask & inside.reshape(shape)
    m = mask[:, None]
    high = np.where(m, x, -np.inf).reshape(*x.shape[:2], -1).max(axis=2)
    low = np.where(m, x, np.inf).reshape(*x.shape[:2], -1).min(axis=2)
    return ~((high - low) >= EMPTY_RANGE)  # no pixel: -inf - inf, empty


def _covariates(p: PlannedImage, crops: CropSet) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The technical covariates of a unit's cells (schema: crop_padding, touches_border,
    cell_area, cells_in_image) in crop order, and the per-channel ones as (N, C) arrays by
    family (mean_intensity, norm_low, norm_high, channel_empty)."""
    n, n_c = len(crops), p.image.n_channels
    ids = np.asarray(crops.cell_ids, dtype=np.int64)
    measures = p.measures.reindex(ids) if p.measures is not None else pd.DataFrame(index=ids)
    stack = p.crop_fit is not None  # a crop stack: no source image, no padding or border
    cells = pd.DataFrame({
        "crop_padding": (np.full(n, np.nan) if stack else
                         crop_padding(crops.origins, crops.size, p.image.spatial_shape)),
        "touches_border": (measures["touches_border"].to_numpy() if "touches_border" in
                           measures else pd.array([pd.NA] * n, dtype="boolean")),
        "cell_area": measures["area"].to_numpy() if "area" in measures else np.nan,
        "cells_in_image": float(len(p.cell_ids)),
    })  # fmt: skip
    names = list(p.image.channel_names)
    mean = np.full((n, n_c), np.nan)
    for c, ch in enumerate(names):
        if f"intensity_mean_{ch}" in measures:
            mean[:, c] = measures[f"intensity_mean_{ch}"].to_numpy(np.float64, na_value=np.nan)
    stats = np.asarray(p.stats, dtype=np.float64)
    families = {
        "mean_intensity": mean,
        "norm_low": np.broadcast_to(stats[:, 0], (n, n_c)),
        "norm_high": np.broadcast_to(stats[:, 1], (n, n_c)),
        "channel_empty": channel_empty(crops, None if stack else p.image.spatial_shape),
    }
    return cells, families


def _per_channel_columns(families: dict, names: Sequence[str], rows: np.ndarray) -> dict:
    """One column per channel of each per-channel family, for rows of crop index ``rows``."""
    return {channel_column(fam, ch): np.asarray(families[fam])[rows, c]
            for fam in ("mean_intensity", "norm_low", "norm_high")
            for c, ch in enumerate(names)}  # fmt: skip


def _with_columns(frame: pd.DataFrame, columns: dict) -> pd.DataFrame:
    """``frame`` with many new columns at once (one concat, not one insert per column)."""
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1)


def _row_channel_columns(families: dict, rows: np.ndarray, channels: np.ndarray) -> dict:
    """The row's own channel of each per-channel family (channel rows), plus channel_empty."""
    return {fam: np.asarray(families[fam])[rows, channels]
            for fam in ("mean_intensity", "norm_low", "norm_high", "channel_empty")}  # fmt: skip


def unit_obs(
    p: PlannedImage, crops: CropSet, info: ModelInfo, levels: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """The observation table of each level for one unit, in the store's cell-major row order.

    Every level carries the technical covariates of its cells (:func:`_covariates`); the
    per-channel families are one column per channel (``mean_intensity_DNA``) on rows that are
    not per channel, and the row's own channel (``mean_intensity``, with ``channel_empty``) on
    channel rows and per-channel patch rows."""
    img = p.image
    n, n_c = len(crops), img.n_channels
    nd = len(crops.size)
    names = list(img.channel_names)
    cells = pd.DataFrame({
        "dataset": img.dataset, "image": img.name, "cell_id": crops.cell_ids,
        "centroid_y": crops.centroids[:, -2], "centroid_x": crops.centroids[:, -1],
    })  # fmt: skip
    if nd == 3:
        cells["centroid_z"] = crops.centroids[:, 0]
    covariates, families = _covariates(p, crops)
    for col in covariates.columns:
        cells[col] = covariates[col].to_numpy()
    every = np.arange(n)
    out: dict[str, pd.DataFrame] = {}
    if "global" in levels:
        frame = _with_columns(cells, _per_channel_columns(families, names, every))
        out["global"] = _with_cell_obs(conform(frame, "global", p.metadata), p.cell_obs)
    if "channel" in levels and info.channel_agnostic:
        per_channel = cells.loc[cells.index.repeat(n_c)].reset_index(drop=True)
        per_channel["channel"] = names * n
        own = _row_channel_columns(families, np.repeat(every, n_c), np.tile(np.arange(n_c), n))
        per_channel = per_channel.assign(**own)
        out["channel"] = _with_cell_obs(conform(per_channel, "channel", p.metadata),
                                        p.cell_obs)  # fmt: skip
    if "patch" in levels:
        table = patch_table(crops, info.patch_size, per_channel=info.channel_agnostic,
                            dataset=img.dataset, thresholds=p.thresholds)  # fmt: skip
        rows = table["crop_index"].to_numpy(np.int64)
        for col in covariates.columns:
            table[col] = covariates[col].to_numpy()[rows]
        if info.channel_agnostic:  # rows per channel: the row's own channel
            channels = pd.Index(names).get_indexer(table["channel"].astype(str))
            table = table.assign(**_row_channel_columns(families, rows, channels))
        else:
            table = _with_columns(table, _per_channel_columns(families, names, rows))
        out["patch"] = _with_cell_obs(conform(table, "patch", p.metadata), p.cell_obs)
    return out


def batch_rows(
    res: BatchResult, unit: UnitSpec, info: ModelInfo, levels: Sequence[str]
) -> list[tuple[str, int, np.ndarray]]:
    """(array name, first row, values) writes of one batch into its unit."""
    start = int(res.index[0]) - unit.first_index
    n = len(res.index)
    writes = []
    if "global" in levels:
        writes.append(("global/X", start, res.global_embedding))
    if "channel" in levels and info.channel_agnostic and res.channel_embeddings is not None:
        ch = res.channel_embeddings
        writes.append(("channel/X", start * ch.shape[1], ch.reshape(-1, ch.shape[-1])))
    if "patch" in levels:
        pe = res.patch_embeddings.reshape(n, -1, res.patch_embeddings.shape[-1])
        writes.append(("patch/X", start * pe.shape[1], pe.reshape(-1, pe.shape[-1])))
    if res.attention is not None:
        att = res.attention
        if not info.channel_agnostic and att.ndim == 3 + len(info.patch_size) and att.shape[2] == 1:
            att = att[:, :, 0]  # a single-channel axis (mae3d) the store's layout does not have
        writes.append(("attention", start, att))
    if res.reconstruction is not None:
        writes.append(("reconstruction", start, res.reconstruction))
    if res.mask is not None:
        writes.append(("mask", start, res.mask))
    return writes


def unit_extras(
    job: EmbedJob, info: ModelInfo, unit: UnitSpec, crop_shape, n_heads_grid, n_features: int = 0
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The per-cell arrays of a unit: (shape, dtype) by name (``features``: the baseline
    features of :mod:`napari_maeprobe.pp.measure`, when ``n_features``)."""
    n = len(unit.cell_ids)
    nd = len(info.patch_size)
    # the unit's cells in row order: the key of every per-cell array (crop origin, features,
    # attention, mask, reconstruction), whichever levels were embedded
    extras = {"cell_id": ((n,), "int64"), "origins": ((n, nd), "int64")}
    if n_features:
        extras["features"] = ((n, n_features), "float32")
    grid = tuple(s // p for s, p in zip(crop_shape[1:], info.patch_size))
    token_grid = ((crop_shape[0],) if info.channel_agnostic else ()) + grid
    if job.attention:
        extras["attention"] = ((n, n_heads_grid, *token_grid), "float16")
    if job.reconstruction:
        extras["reconstruction"] = ((n, *crop_shape), "float16")
    if job.masking != "none":
        extras["mask"] = ((n, *token_grid), "bool")
    return extras


def embed_unit(
    p: PlannedImage,
    unit: UnitSpec,
    engine: InferenceEngine,
    job: EmbedJob,
    crop_size: tuple[int, ...],
    boundary: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
):
    """Embed one unit: yields ``("begin", obs, extras)`` once, then the writes of each batch."""
    info = engine.info
    crops = unit_crops(p, unit, crop_size, boundary, job.normalization)
    obs = unit_obs(p, crops, info, job.levels)
    bfrac = None
    if job.masking == "boundary":
        bfrac = patch_fractions(crops.boundary, info.patch_size).astype(np.float32)
    n_heads = None
    names = p.feature_names()
    per_cell = [("cell_id", 0, np.asarray(crops.cell_ids, dtype=np.int64)),
                ("origins", 0, crops.origins.astype(np.int64))]  # fmt: skip
    if names:  # the baseline features, rows in the unit's cell order
        feats = p.measures.reindex(np.asarray(crops.cell_ids, dtype=np.int64))[names]
        per_cell.append(("features", 0, feats.to_numpy(np.float32, na_value=np.nan)))
    writes_iter = engine.embed(crops.crops, bfrac, progress=progress,
                               first_index=unit.first_index)  # fmt: skip
    first = True
    for res in writes_iter:
        if first:
            n_heads = res.attention.shape[1] if res.attention is not None else 0
            yield ("begin", obs, unit_extras(job, info, unit, crops.crops.shape[1:], n_heads,
                                             len(names)))  # fmt: skip
            yield ("rows", per_cell)
            first = False
        yield ("rows", batch_rows(res, unit, info, job.levels))
