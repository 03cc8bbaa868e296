"""Preprocessing that every model shares: normalisation, z handling, single-cell crops, tiles,
and the patch grid of a crop with its per-patch table.

Plain functions over NumPy arrays in canonical axes (``C, [Z,] Y, X``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from napari_maeprobe.errors import MaeprobeInputError, NoCellsFoundError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.pp.boundaries import boundary_map, patch_fractions
from napari_maeprobe.schema import OBS_COLUMNS

NormMethod = Literal["percentile", "zscore", "none"]
ZMode = Literal["max", "slice", "keep"]
#: z-stacks: maximum projection, one slice, or native 3D
Z_MODES: tuple[str, ...] = ("max", "slice", "keep")


# --------------------------------------------------------------------------- intensities


def check_finite(data: np.ndarray, name: str, channel_names: list[str] | None = None) -> None:
    """Raise one clear error if any pixel is NaN or infinite, naming the channels affected."""
    if data.dtype.kind != "f":
        return
    bad = ~np.isfinite(data.reshape(data.shape[0], -1)).all(axis=1)
    if bad.any():
        chans = [channel_names[i] if channel_names else str(i) for i in np.flatnonzero(bad)]
        count = int((~np.isfinite(data)).sum())
        raise MaeprobeInputError(
            f"{name}: {count} pixel(s) are NaN or infinite in channel(s) {', '.join(chans)}",
            "replace them and save the image again (e.g. numpy.nan_to_num); in Python, "
            "napari_maeprobe.pp.preprocessing.normalize(..., nan_policy='zero') sets them to 0",
        )


#: a channel is sparse (an IMC / MIBI marker) when more than this fraction of its pixels is
#: exactly zero: its median pixel is then the empty background, not the marker
SPARSE_ZERO_FRACTION = 0.5


def channel_stats(
    data: np.ndarray,
    method: NormMethod = "percentile",
    low: float = 1.0,
    high: float = 99.8,
) -> np.ndarray:
    """Per-channel normalisation statistics of ``(C, ...)`` data, shape (C, 2).

    ``percentile``: the [low, high] percentiles (from up to 2 M pixels per channel), for a
    sparse channel with the upper one taken over its non-zero pixels
    (:func:`normalization_stats`); ``zscore``: mean and standard deviation; ``none``: (0, 1).
    Kept apart from :func:`apply_normalization` so that crops cut from one image share its
    statistics.
    """
    return normalization_stats(data, method, low, high)[0]


def normalization_stats(
    data: np.ndarray,
    method: NormMethod = "percentile",
    low: float = 1.0,
    high: float = 99.8,
) -> tuple[np.ndarray, list[str]]:
    """:func:`channel_stats` and, per channel, a note saying how its statistics were chosen.

    Sparse channels (more than :data:`SPARSE_ZERO_FRACTION` of the pixels exactly zero, as IMC
    and MIBI markers are) keep their signal: their ``high`` percentile over all pixels may
    be zero (the channel would become all zeros) or fall among the first few counts (the
    bright pixels would all clip to 1), so the upper statistic is the ``high`` percentile of
    the non-zero pixels (their maximum if that is not above the lower one); the lower one
    stays the ``low`` percentile of all pixels (0 for non-negative data). Dense channels get
    the plain percentiles. The notes go into the store's image info so a user can see which
    rule each channel got.
    """
    if method not in ("percentile", "zscore", "none"):
        raise MaeprobeInputError(
            f"unknown normalisation {method!r}", "use 'percentile', 'zscore' or 'none'"
        )
    out = np.zeros((data.shape[0], 2), dtype=np.float64)
    notes: list[str] = []
    for c in range(data.shape[0]):
        ch = np.asarray(data[c])
        if method == "none":
            out[c] = (0.0, 1.0)
            notes.append("none: raw intensities")
            continue
        if method == "zscore":
            sample = ch.astype(np.float64)
            out[c] = (float(sample.mean()), float(sample.std()))
            notes.append("zscore: mean and standard deviation of all pixels")
            continue
        sample = ch.ravel()[:: max(1, ch.size // 2_000_000)].astype(np.float32)
        out[c] = np.percentile(sample, [low, high])
        nonzero = sample[sample != 0]
        zero_fraction = 1.0 - nonzero.size / max(sample.size, 1)
        if zero_fraction > SPARSE_ZERO_FRACTION and nonzero.size:
            top = float(np.percentile(nonzero, high))
            if top <= out[c, 0]:
                top = float(nonzero.max())
            if top > out[c, 0]:
                out[c, 1] = top
                notes.append(
                    f"sparse ({100 * zero_fraction:.1f}% of pixels are zero): {low:g}th "
                    f"percentile of all pixels to the {high:g}th percentile of the non-zero "
                    "pixels"
                )
                continue
        if out[c, 1] > out[c, 0]:
            notes.append(f"percentile: {low:g}th to {high:g}th percentile of all pixels")
        else:
            notes.append("constant: no intensity range, normalised to all zeros")
    return out, notes


def apply_normalization(
    data: np.ndarray, stats: np.ndarray, method: NormMethod = "percentile"
) -> np.ndarray:
    """Normalise ``(N, C, ...)`` crops (or a ``(1, C, ...)`` image) to float32 with the
    statistics of :func:`channel_stats`. ``percentile`` clips to [0, 1]; a constant channel
    becomes all zeros."""
    x = np.asarray(data, dtype=np.float32)
    shape = [1] * x.ndim
    shape[1] = len(stats)
    a = stats[:, 0].astype(np.float32).reshape(shape)
    b = stats[:, 1].astype(np.float32).reshape(shape)
    if method == "none":
        return x.copy()
    if method == "zscore":
        return np.where(b > 0, (x - a) / np.where(b > 0, b, 1), 0.0).astype(np.float32)
    span = b - a
    out = np.clip((x - a) / np.where(span > 0, span, 1), 0.0, 1.0)
    return np.where(span > 0, out, 0.0).astype(np.float32)


def normalize(
    data: np.ndarray,
    method: NormMethod = "percentile",
    low: float = 1.0,
    high: float = 99.8,
    nan_policy: Literal["raise", "zero"] = "raise",
    name: str = "image",
    channel_names: list[str] | None = None,
) -> np.ndarray:
    """Normalise each channel of ``(C, ...)`` data to float32.

    ``percentile``: clip to the [low, high] percentiles and rescale to [0, 1] (robust to hot
    pixels); ``zscore``: zero mean, unit variance. A constant channel becomes all zeros.
    """
    data = np.asarray(data)
    if nan_policy == "raise":
        check_finite(data, name, channel_names)
    elif nan_policy == "zero":
        data = np.nan_to_num(data.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    stats = channel_stats(data, method, low, high)
    return apply_normalization(data[None], stats, method)[0]


def project_z(
    image: MicroscopyImage, mode: ZMode = "max", z_index: int | None = None
) -> MicroscopyImage:
    """Make a 2D image from a z-stack (maximum-intensity projection or one slice), or keep 3D."""
    if not image.is_3d or mode == "keep":
        return image
    scale = image.scale[1:] if image.scale else None
    if mode == "max":
        return image.with_data(image.data.max(axis=1), scale=scale)
    if mode == "slice":
        n_z = image.data.shape[1]
        z = n_z // 2 if z_index is None else z_index
        if not 0 <= z < n_z:
            raise MaeprobeInputError(
                f"{image.name}: slice {z} requested but the stack has {n_z} slices (0..{n_z - 1})",
                "pick a slice inside the stack",
            )
        return image.with_data(image.data[:, z], scale=scale)
    raise MaeprobeInputError(f"unknown z handling {mode!r}", f"use one of {', '.join(Z_MODES)}")


# --------------------------------------------------------------------------- crops and tiles


@dataclass
class CropSet:
    """Fixed-size windows cut from one image, centred on cells or tiling it.

    ``crops`` is ``(N, C, [Z,] *size)``; ``cell_masks`` marks each window's own cell (all True
    for tiles); ``boundary`` is the boundary map of the label image under each window (``None``
    without segmentation); ``origins`` are the windows' first pixels in source coordinates
    (negative where the window sticks out of the image: those pixels are zero).
    """

    crops: np.ndarray
    cell_masks: np.ndarray
    boundary: np.ndarray | None
    cell_ids: np.ndarray
    origins: np.ndarray
    centroids: np.ndarray
    size: tuple[int, ...]
    kind: Literal["cell", "tile"]
    image_name: str = ""
    channel_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.crops.shape[0])


def _as_size(size: int | tuple[int, ...], nd: int) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size,) * nd
    size = tuple(int(s) for s in size)
    if len(size) != nd:
        raise MaeprobeInputError(
            f"crop size {size} has {len(size)} axes but the image has {nd} spatial axes",
            f"give {nd} sizes ({'Z, Y, X' if nd == 3 else 'Y, X'}) or one number",
        )
    return size


def extract_windows(array: np.ndarray, origins: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Cut windows of ``size`` at ``origins`` from the last ``len(size)`` axes, zero-padded."""
    nd = len(size)
    lead = array.shape[:-nd]
    spatial = array.shape[-nd:]
    out = np.zeros((len(origins), *lead, *size), dtype=array.dtype)
    for i, origin in enumerate(origins):
        src, dst = [], []
        for o, s, full in zip(origin, size, spatial):
            a, b = max(o, 0), min(o + s, full)
            if b <= a:
                break
            src.append(slice(a, b))
            dst.append(slice(a - o, b - o))
        else:
            out[(i, *[slice(None)] * len(lead), *dst)] = array[(..., *src)]
    return out


def cell_crops(
    data: np.ndarray,
    labels: np.ndarray,
    size: int | tuple[int, ...] = 128,
    image_name: str = "",
    channel_names: tuple[str, ...] | list[str] = (),
    min_pixels: int = 1,
    ids: np.ndarray | None = None,
    boundary: np.ndarray | None = None,
) -> CropSet:
    """One window of ``size`` centred on each labelled cell, zero-padded at the image border.

    ``ids``: only these cells (a chunk of a large image); ``boundary``: the image's boundary
    map when already computed.
    """
    nd = labels.ndim
    if data.shape[-nd:] != labels.shape:
        raise MaeprobeInputError(
            f"{image_name}: labels of shape {labels.shape} do not match the image "
            f"{data.shape[-nd:]}",
            "segment this image (or pass its own label image)",
        )
    size = _as_size(size, nd)
    if ids is None:
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        ids = ids[counts >= min_pixels]
    ids = np.asarray(ids)
    if ids.size == 0:
        raise NoCellsFoundError(
            f"{image_name}: the label image has no cells",
            "segment with other settings, or tile the image instead (tile_image)",
        )
    centroids = np.asarray(ndimage.center_of_mass(labels > 0, labels, ids), dtype=np.float64)
    centroids = centroids.reshape(len(ids), nd)
    origins = np.round(centroids).astype(int) - np.asarray(size) // 2
    crops = extract_windows(np.asarray(data), origins, size)
    label_windows = extract_windows(labels, origins, size)
    masks = label_windows == ids.reshape((-1,) + (1,) * nd)
    if boundary is None:
        boundary = boundary_map(labels)
    boundary = extract_windows(boundary, origins, size)
    return CropSet(
        crops=crops,
        cell_masks=masks,
        boundary=boundary,
        cell_ids=ids.astype(np.int64),
        origins=origins,
        centroids=centroids,
        size=size,
        kind="cell",
        image_name=image_name,
        channel_names=tuple(channel_names),
    )


def tile_origins(
    spatial: tuple[int, ...],
    size: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None = None,
) -> np.ndarray:
    """The first pixel of every tile that covers an image of ``spatial`` shape, (n, nd) in
    row-major order: tiles of ``size`` every ``stride`` (default: ``size``), the last row and
    column of tiles running over the edge (their crops are zero-padded), so every pixel is in
    a tile."""
    nd = len(spatial)
    size = _as_size(size, nd)
    stride = size if stride is None else _as_size(stride, nd)
    starts = [np.arange(0, max(full - s, 0) + st, st) for full, s, st in zip(spatial, size, stride)]
    starts = [st[(st < full) | (st == 0)] for st, full in zip(starts, spatial)]
    return np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1).reshape(-1, nd)


def tile_image(
    data: np.ndarray,
    size: int | tuple[int, ...] = 224,
    stride: int | tuple[int, ...] | None = None,
    labels: np.ndarray | None = None,
    image_name: str = "",
    channel_names: tuple[str, ...] | list[str] = (),
) -> CropSet:
    """Tile a whole image (no segmentation needed), zero-padding the last row/column of tiles."""
    nd = data.ndim - 1
    size = _as_size(size, nd)
    grid = tile_origins(data.shape[1:], size, stride)
    crops = extract_windows(np.asarray(data), grid, size)
    boundary = extract_windows(boundary_map(labels), grid, size) if labels is not None else None
    return CropSet(
        crops=crops,
        cell_masks=np.ones((len(grid), *size), dtype=bool),
        boundary=boundary,
        cell_ids=np.arange(len(grid), dtype=np.int64),
        origins=grid,
        centroids=grid + (np.asarray(size) - 1) / 2.0,
        size=size,
        kind="tile",
        image_name=image_name,
        channel_names=tuple(channel_names),
    )


# --------------------------------------------------------------------------- patch grid


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of some values (NaNs ignored); ``inf`` when they are empty or constant,
    so that nothing is above it."""
    from skimage.filters import threshold_otsu

    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float("inf")
    return float(threshold_otsu(values))


def foreground_thresholds(normalised: np.ndarray, patch_size: int | tuple[int, ...]) -> np.ndarray:
    """The one rule for a patch's ``foreground`` flag: its mean normalised intensity is above
    Otsu's threshold of the image's patch-sized block means (the same quantity over the whole
    image), per channel (channels kept apart) and of the mean over channels.

    ``normalised``: (C, *spatial) pixels; returns (C + 1,) thresholds, per channel then of the
    channel mean. Comparing patch means with a threshold on block means, not on pixels, keeps
    sparse markers (bright spots in dark patches) from having no foreground at all.
    """
    x = np.asarray(normalised, dtype=np.float32)
    nd = x.ndim - 1
    size = _as_size(patch_size, nd)
    if any(s > full for s, full in zip(size, x.shape[1:])):
        size = tuple(min(s, full) for s, full in zip(size, x.shape[1:]))
    blocks = block_means(x, size)  # (C, n_blocks)
    return np.array([otsu_threshold(b) for b in blocks] + [otsu_threshold(blocks.mean(axis=0))])


def block_means(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Means of the whole ``size`` blocks of (C, *spatial) pixels, as (C, n_blocks)."""
    nd = len(size)
    crop = tuple(slice(0, (full // s) * s) for full, s in zip(x.shape[1:], size))
    x = x[(slice(None), *crop)]
    shape = [x.shape[0]]
    for full, s in zip(x.shape[1:], size):
        shape += [full // s, s]
    axes = tuple(2 + 2 * k for k in range(nd))
    return x.reshape(shape).mean(axis=axes).reshape(x.shape[0], -1)


def patch_table(
    crops: CropSet,
    patch_size: int | tuple[int, ...] = 16,
    per_channel: bool = False,
    dataset: str = "",
    thresholds: np.ndarray | None = None,
) -> pd.DataFrame:
    """The patch grid of every crop as a table, one row per crop and patch (and channel), in
    the store's cell-major order: crop, then channel, then patch in row-major order.

    Columns follow the observation table of the export: ``image``, ``cell_id``, ``channel``,
    ``patch_row``, ``patch_col``, ``patch_z``, ``centroid_y/x/z`` (patch centre in source-image
    pixels), ``patch_intensity`` (mean normalised intensity), ``foreground`` (above
    ``thresholds``, see :func:`foreground_thresholds`; default: Otsu over these crops' patch
    intensities), ``central`` (patch centre within the middle half of the crop) and
    ``boundary_fraction``.
    """
    nd = crops.crops.ndim - 2
    psize = _as_size(patch_size, nd)
    intens = patch_fractions(crops.crops, psize)  # (N, C, [gz,] gy, gx)
    grid = intens.shape[2:]
    n, n_c = intens.shape[:2]
    bfrac = patch_fractions(crops.boundary, psize) if crops.boundary is not None else None

    idx = np.indices(grid).reshape(nd, -1).T  # (P, nd): ([z,] row, col)
    centres_local = idx * np.asarray(psize) + (np.asarray(psize) - 1) / 2.0
    half = np.asarray(crops.size) / 2.0
    central = (np.abs(centres_local + 0.5 - half) < half / 2.0).all(axis=1)
    n_p = idx.shape[0]

    cell = np.repeat(np.arange(n), n_p)
    centres = (crops.origins[cell] + np.tile(centres_local, (n, 1))).astype(np.float64)
    base = {
        "dataset": dataset,
        "image": crops.image_name,
        "cell_id": crops.cell_ids[cell],
        "crop_index": cell,
        "patch_row": np.tile(idx[:, -2], n),
        "patch_col": np.tile(idx[:, -1], n),
        "patch_z": np.tile(idx[:, 0], n) if nd == 3 else pd.NA,
        "centroid_y": centres[:, -2],
        "centroid_x": centres[:, -1],
        "centroid_z": centres[:, 0] if nd == 3 else np.nan,
        "central": np.tile(central, n),
        "boundary_fraction": bfrac.reshape(-1) if bfrac is not None else np.nan,
    }
    if thresholds is None:  # the rule of foreground_thresholds, over these crops' patches
        flat = intens.reshape(n, n_c, -1).transpose(1, 0, 2).reshape(n_c, -1)
        thresholds = np.array([otsu_threshold(v) for v in flat]
                              + [otsu_threshold(flat.mean(axis=0))])  # fmt: skip
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if per_channel:
        names = list(crops.channel_names) or [str(c) for c in range(n_c)]
        # rows: cell, channel, patch (each cell's per-patch values repeated per channel)
        table = pd.DataFrame({k: (np.repeat(np.asarray(v).reshape(n, n_p), n_c, axis=0).ravel()
                                  if np.ndim(v) and len(v) == n * n_p else v)
                              for k, v in base.items()})  # fmt: skip
        table.insert(3, "channel", np.tile(np.repeat(names, n_p), n))
        vals = intens.reshape(n, n_c, n_p)
        table["patch_intensity"] = vals.reshape(-1)
        table["foreground"] = (vals > thresholds[:n_c][None, :, None]).reshape(-1)
    else:
        table = pd.DataFrame(base)
        table.insert(3, "channel", pd.NA)
        table["patch_intensity"] = intens.mean(axis=1).reshape(-1)
        table["foreground"] = table["patch_intensity"].to_numpy() > thresholds[-1]
    table["channel"] = table["channel"].astype("string")
    table["patch_z"] = table["patch_z"].astype("Int64")
    return table[list(PATCH_COLUMNS)]


#: the patch table's columns, in order: the schema's observation columns (without ``level``),
#: with the working column ``crop_index`` (the row of the crop in its CropSet) after ``cell_id``
PATCH_COLUMNS: tuple[str, ...] = tuple(
    c for name in OBS_COLUMNS[1:] for c in ((name, "crop_index") if name == "cell_id" else (name,))
)
