"""What a selection draws on its image, without Qt: the explorer computes these arrays off the
GUI thread and only hands the finished ones to napari layers.

Per image of the selection: the selected patches' footprints (patch level), the selected cells
(their own label ids, so napari can draw each outline), and optionally the cells' attention,
smoothly upsampled, normalised per cell and limited to the cell's mask, so neighbouring crops
never overlap into a quilt.
"""

from __future__ import annotations

import numpy as np

from napari_maeprobe.pl.linking import ExplorerData, highlight_image

#: overlay kinds, in the order they are stacked on the image (last on top)
OVERLAY_KINDS = ("attention", "selected cells", "selected patches")


def cells_of_image(data: ExplorerData, rows: np.ndarray, image: str) -> np.ndarray:
    """The distinct cell ids of an image behind some rows."""
    sel = data.obs.iloc[np.asarray(rows, dtype=np.int64)]
    sel = sel[(sel["image"].astype(str) == image).to_numpy()]
    return sel["cell_id"].dropna().astype(np.int64).unique()


def selected_cell_labels(labels: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The label image with only the given cells kept (each keeps its id: napari draws one
    outline per cell with ``contour``)."""
    dtype = np.int32 if labels.size == 0 or labels.max() < 2**31 else labels.dtype
    return np.where(np.isin(labels, cells), labels, 0).astype(dtype, copy=False)


def cell_attention(
    data: ExplorerData,
    image: str,
    cells: np.ndarray,
    shape: tuple[int, ...],
    labels: np.ndarray | None,
) -> np.ndarray | None:
    """The stored attention of some cells as one float32 image of ``shape``: per cell the map
    (mean over heads, and channels for channel-agnostic models) upsampled bilinearly to its
    crop, scaled to [0, 1] within the cell, drawn only on the cell's own pixels (its crop window
    when there are no labels). 0 elsewhere. ``None`` when the store has no attention maps."""
    from skimage.transform import resize

    store = data.store
    if store is None or image not in data.image_index:
        return None
    i = data.image_index[image]
    stored = store.read_cells("attention", i)
    if stored is None:
        return None
    ids, maps = stored
    origin_ids, origins = store.read_cells("origins", i)
    origin_of = {int(c): k for k, c in enumerate(origin_ids)}
    nd = len(data.patch_size)
    crop = tuple(int(g) * int(p) for g, p in zip(maps.shape[-nd:], data.patch_size))
    out = np.zeros(shape, dtype=np.float32)
    use_labels = labels is not None and labels.shape == tuple(shape)
    for k in np.flatnonzero(np.isin(ids, np.asarray(cells, dtype=np.int64))):
        cell = int(ids[k])
        if cell not in origin_of:
            continue
        grid = maps[k].astype(np.float32).reshape((-1, *maps.shape[-nd:])).mean(axis=0)
        m = resize(grid, crop, order=1, mode="edge", anti_aliasing=False)
        o = origins[origin_of[cell]]
        dst, src = [], []
        for ax in range(nd):
            start = int(o[ax])
            lo, hi = max(0, start), min(shape[ax - nd], start + crop[ax])
            if hi <= lo:
                break
            dst.append(slice(lo, hi))
            src.append(slice(lo - start, hi - start))
        else:
            window = m[tuple(src)]
            inside = labels[tuple(dst)] == cell if use_labels else np.ones(window.shape, bool)
            if not inside.any():
                continue
            lo_v, hi_v = float(window[inside].min()), float(window[inside].max())
            scaled = (window - lo_v) / max(hi_v - lo_v, 1e-12)
            region = out[tuple(dst)]
            region[inside] = scaled[inside]
    return out


def selection_overlays(
    data: ExplorerData,
    rows: np.ndarray,
    image: str,
    shape: tuple[int, ...],
    labels: np.ndarray | None,
    attention: bool = False,
) -> dict[str, np.ndarray]:
    """The overlays of one image for selected rows: ``selected patches`` (patch level, uint8
    footprints), ``selected cells`` (the cells' labels, or their crop windows without labels)
    and, when asked and stored, ``attention`` (see :func:`cell_attention`)."""
    rows = np.asarray(rows, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    cells = cells_of_image(data, rows, image)
    if data.level == "patch":
        out["selected patches"] = highlight_image(data, rows, image, shape, None)
    if labels is not None and labels.shape == tuple(shape):
        out["selected cells"] = selected_cell_labels(labels, cells)
    elif data.level != "patch":
        out["selected cells"] = highlight_image(data, rows, image, shape, None)
    if attention and len(cells):
        att = cell_attention(data, image, cells, shape, labels)
        if att is not None:
            out["attention"] = att
    return out
