"""Hand-crafted measurements of every cell: technical covariates and a feature baseline.

Measured on the RAW intensities (before normalisation), once per image at planning time, so
that each embedded cell carries what simple features see (size, shape, brightness per
channel) and its technical properties (does its mask touch the image border, how much of its
crop lies outside the image). The covariates go into the observation tables
(:mod:`napari_maeprobe.schema`: ``cell_area``, ``touches_border``, ``mean_intensity_<ch>``,
``crop_padding``); the features (:func:`baseline_features`) are stored per cell beside the
embeddings as a baseline a model must beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: shape measurements of 2D cells (3D cells: ``area`` only, their volume in voxels)
SHAPE_FEATURES_2D: tuple[str, ...] = (
    "area", "perimeter", "eccentricity", "solidity", "major_axis_length", "minor_axis_length",
)  # fmt: skip
SHAPE_FEATURES_3D: tuple[str, ...] = ("area",)
#: per-channel intensity statistics within the cell's mask, raw units
INTENSITY_STATS: tuple[str, ...] = ("mean", "std", "p10", "p50", "p90")
#: the quantiles behind p10 / p50 / p90
_QUANTILES = (10.0, 50.0, 90.0)
#: skimage's names of the 2D shape properties
_SKIMAGE_SHAPE = {"major_axis_length": "axis_major_length",
                  "minor_axis_length": "axis_minor_length"}  # fmt: skip


def baseline_features(channel_names: Sequence[str], ndim: int = 2) -> list[str]:
    """The baseline feature columns of :func:`measure_cells`, in order: the shape features,
    then per channel ``intensity_<stat>_<channel>``; every column but ``touches_border``."""
    shape = SHAPE_FEATURES_2D if ndim == 2 else SHAPE_FEATURES_3D
    return list(shape) + [
        f"intensity_{stat}_{ch}" for ch in channel_names for stat in INTENSITY_STATS
    ]


def _std(regionmask: np.ndarray, intensity: np.ndarray) -> np.ndarray:
    return np.std(intensity[regionmask], axis=0)


def _quantiles(regionmask: np.ndarray, intensity: np.ndarray) -> np.ndarray:
    return np.percentile(intensity[regionmask], _QUANTILES, axis=0)


def measure_cells(
    data: np.ndarray,
    labels: np.ndarray,
    channel_names: Sequence[str],
    ids: np.ndarray | None = None,
) -> pd.DataFrame:
    """Shape and raw-intensity features of every labelled cell, indexed by cell id.

    ``data`` is ``(C, Y, X)`` or ``(C, Z, Y, X)`` in raw units, ``labels`` the label image of
    its spatial shape. One :func:`skimage.measure.regionprops_table` call per image. Columns:
    :func:`baseline_features` (``area`` in pixels/voxels, the 2D shape features, per channel
    the mean, standard deviation and 10/50/90th percentiles within the mask) and
    ``touches_border`` (the cell's bounding box reaches the first or last pixel of a spatial
    axis). ``ids``: only these cells, in this order (a cell with no pixels gets NaN).
    """
    from skimage.measure import regionprops_table

    data = np.asarray(data)
    labels = np.asarray(labels)
    nd = labels.ndim
    if data.shape[1:] != labels.shape or data.ndim != nd + 1:
        raise ValueError(f"data {data.shape} and labels {labels.shape} do not match")
    names = list(channel_names)
    shape_cols = SHAPE_FEATURES_2D if nd == 2 else SHAPE_FEATURES_3D
    props = ["label", "bbox", "intensity_mean"]
    props += [_SKIMAGE_SHAPE.get(c, c) for c in shape_cols]
    intensity = np.moveaxis(data, 0, -1)  # channels last, as skimage takes them (a view)
    lab = labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64)
    table = regionprops_table(lab, intensity_image=intensity, properties=props,
                              extra_properties=(_std, _quantiles))  # fmt: skip
    out = {col: np.asarray(table[_SKIMAGE_SHAPE.get(col, col)], dtype=np.float64)
           for col in shape_cols}  # fmt: skip
    for c, ch in enumerate(names):  # skimage names channel c of a property "<prop>-<c>"
        out[f"intensity_mean_{ch}"] = table[f"intensity_mean-{c}"]
        out[f"intensity_std_{ch}"] = table[f"_std-{c}"]
        for q, stat in enumerate(("p10", "p50", "p90")):
            out[f"intensity_{stat}_{ch}"] = table[f"_quantiles-{q}-{c}"]
    lo = np.stack([table[f"bbox-{k}"] for k in range(nd)], axis=1)
    hi = np.stack([table[f"bbox-{k + nd}"] for k in range(nd)], axis=1)
    # the image border is its sides in y and x (as CellProfiler): in a z-stack most cells
    # reach the first or last plane, which cuts nothing off in the plane of the image
    yx = slice(nd - 2, nd)
    border = (lo[:, yx] <= 0).any(axis=1) | (hi[:, yx] >= np.asarray(labels.shape)[yx]).any(axis=1)
    frame = pd.DataFrame(out, index=pd.Index(np.asarray(table["label"], dtype=np.int64),
                                             name="cell_id"))  # fmt: skip
    frame = frame[baseline_features(names, nd)].astype(np.float64)
    frame["touches_border"] = pd.array(border, dtype="boolean")
    if ids is not None:
        frame = frame.reindex(np.asarray(ids, dtype=np.int64))
        frame.index.name = "cell_id"
    return frame


def crop_padding(
    origins: np.ndarray, crop_size: Sequence[int], spatial_shape: Sequence[int]
) -> np.ndarray:
    """The fraction of each crop window outside the image (its zero padding), ``(n,)``.

    ``origins`` are the windows' first pixels, ``(n, nd)``, negative where a window sticks out
    (as :func:`napari_maeprobe.pp.preprocessing.cell_crops` cuts them)."""
    o = np.asarray(origins, dtype=np.int64).reshape(-1, len(crop_size))
    size = np.asarray(crop_size, dtype=np.int64)
    full = np.asarray(spatial_shape, dtype=np.int64)
    inside = np.clip(np.minimum(o + size, full) - np.maximum(o, 0), 0, None)
    return 1.0 - inside.prod(axis=1) / float(size.prod())


def tile_labels(spatial_shape: Sequence[int], crop_size: Sequence[int]) -> np.ndarray:
    """A label image of the tiles that :func:`~napari_maeprobe.pp.preprocessing.tile_origins`
    cuts (tile ``i`` is label ``i + 1``, its window clipped to the image), so tiles are
    measured like cells. Tiles at the stride of their size never overlap; checked."""
    from napari_maeprobe.pp.preprocessing import tile_origins

    origins = tile_origins(tuple(spatial_shape), tuple(crop_size))
    out = np.zeros(tuple(spatial_shape), dtype=np.int32)
    for i, o in enumerate(origins):
        window = tuple(slice(a, a + s) for a, s in zip(o, crop_size))
        if np.any(out[window]):
            raise ValueError("tiles overlap: they cannot be measured as one label image")
        out[window] = i + 1
    return out


def measure_crops(crops: np.ndarray, channel_names: Sequence[str]) -> pd.DataFrame:
    """:func:`measure_cells` for a stack of single-cell crops ``(N, C, *spatial)``: each crop
    measured whole (its own pixels are its mask), indexed by crop index;
    ``touches_border`` is NA (a crop has no source image)."""
    x = np.asarray(crops)
    n, n_c = x.shape[:2]
    nd = x.ndim - 2
    spatial = x.shape[2:]
    shape = measure_cells(np.zeros((1, *spatial), dtype=np.float32),
                          np.ones(spatial, dtype=np.int32), ["_"])  # fmt: skip
    out = {col: np.full(n, float(shape[col].iloc[0])) for col in
           (SHAPE_FEATURES_2D if nd == 2 else SHAPE_FEATURES_3D)}  # fmt: skip
    flat = x.reshape(n, n_c, -1).astype(np.float64)
    mean, std = flat.mean(axis=2), flat.std(axis=2)
    q = np.percentile(flat, _QUANTILES, axis=2)  # (3, n, C)
    for c, ch in enumerate(channel_names):
        out[f"intensity_mean_{ch}"] = mean[:, c]
        out[f"intensity_std_{ch}"] = std[:, c]
        for k, stat in enumerate(("p10", "p50", "p90")):
            out[f"intensity_{stat}_{ch}"] = q[k, :, c]
    frame = pd.DataFrame(out, index=pd.Index(np.arange(n, dtype=np.int64), name="cell_id"))
    frame = frame[baseline_features(channel_names, nd)]
    frame["touches_border"] = pd.array([pd.NA] * n, dtype="boolean")
    return frame
