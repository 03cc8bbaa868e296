"""A gallery of what the model saw: small panels of a selection's cells, without Qt.

For a selection of rows (a cluster, a lasso, a clicked cell) :func:`order_cells` lists the
cells behind it, most typical first, and :func:`cell_tiles` draws, per cell, in the style of
the MAE papers' figures:

- ``input``: the input channels as a composite (each channel's colour scaled by its
  contrast-limited value, added up), cut to the cell's crop window;
- ``attention``: the input dimmed, with the last layer's CLS attention (mean over heads, and
  over channels for channel-agnostic models) upsampled smoothly to pixels, scaled to [0, 1]
  within the cell and drawn through a perceptual colour map (inferno) over the cell only;
- ``masked``: the input with the masked patches greyed out (for per-channel masks, the masked
  channels are left out and the patch is greyed by the share of channels masked);
- ``reconstruction``: the stored masked reconstruction, with the same channel colours and
  contrast as the input. It is in the model's normalised input space, whose visible patches are
  the input's: per channel, the affine map from that space back to raw intensities is fitted on
  the visible patches (least squares), so the reconstruction is shown in the input's own units
  and the two panels compare directly. Without enough visible pixels (or a map that does not
  rise), the channel is stretched to its own 1st-99.5th percentile within the crop.

Every panel is an ``(size, size, 3)`` uint8 RGB image; a panel that cannot be drawn (no maps
stored, a ``.h5ad`` without its store, no image layer) is absent and the tile's ``notes`` say
why and how to get it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from napari_maeprobe.pl.linking import ExplorerData

#: the panels of a tile, in display order
PANELS = ("input", "attention", "masked", "reconstruction")
#: grey of masked patches (as in the MAE papers' figures), in [0, 1]
GREY = 0.4
#: how much the input is dimmed under the attention map
DIM = 0.35
#: opacity of the attention colours over the dimmed input
ALPHA = 0.7
#: the cell's outline on the attention panel
OUTLINE = 0.9
#: per-tile contrast: these percentiles of a channel's pixels in the crop
PERCENTILES = (1.0, 99.5)

_EMBED = "in the Embed dock"
NOTES = {
    "no_store": "no embedding store: an exported .h5ad holds no per-cell maps; open the "
    "store (.zarr) it was exported from",
    "attention": "no attention maps stored: tick 'attention maps' " + _EMBED + " and embed again",
    "mask": "no masks stored: embed with Masking 'random' or 'boundary' " + _EMBED,
    "reconstruction": "no reconstructions stored: tick 'reconstructions' with Masking 'random' "
    "or 'boundary' " + _EMBED + " and embed again (models with a decoder only)",
    "no_layer": "no image layer for this image: open the image in napari to see its channels",
}


@dataclass
class ChannelView:
    """How one input channel is shown: its pixels and its display colour (from the napari
    layer)."""

    name: str
    data: Any  # the channel's pixels, numpy or dask, spatial axes ([Z,] Y, X) of the image
    rgb: tuple[float, float, float]  # the channel's colour (the colormap's brightest colour)
    limits: tuple[float, float] | None = None  # None: per-tile 1st/99.5th percentiles


@dataclass
class CellTile:
    """The panels of one cell."""

    image: str
    cell_id: int
    centre: tuple[float, ...]  # the cell's centre in image pixels ([z,] y, x)
    panels: dict[str, np.ndarray]  # name -> (size, size, 3) uint8, in PANELS order
    notes: dict[str, str] = field(default_factory=dict)  # panel name -> why it is missing
    plane: str = ""  # which z plane is shown ("" for 2D images), e.g. "max projection over z"


# --------------------------------------------------------------------------- ordering


def _rows_x(data: ExplorerData, rows: np.ndarray) -> np.ndarray:
    """The embeddings of some rows only (float32), whatever holds ``X``."""
    x = data.adata.X
    sub = x[rows] if isinstance(x, np.ndarray) else x[np.sort(rows)][np.argsort(np.argsort(rows))]
    if hasattr(sub, "toarray"):
        sub = sub.toarray()
    if hasattr(sub, "compute"):
        sub = sub.compute()
    return np.asarray(sub, dtype=np.float32).reshape(len(rows), -1)


def order_cells(data: ExplorerData, rows: np.ndarray, seed: int | None = None) -> pd.DataFrame:
    """The distinct (image, cell_id) behind the selected rows, most typical first.

    Each cell's embedding is the mean of its selected rows' finite embeddings; cells are ordered
    by the Euclidean distance of that to the mean of all the selection's finite embeddings (the
    selection's centre in embedding space). ``seed`` not None gives a random order instead
    (resample). Cells without any finite embedding go last. Columns: ``image``, ``cell_id``,
    ``n_rows`` (selected rows of the cell), ``distance`` (NaN without embedding)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    empty = pd.DataFrame({"image": pd.Series(dtype=str), "cell_id": pd.Series(dtype=np.int64),
                          "n_rows": pd.Series(dtype=np.int64),
                          "distance": pd.Series(dtype=np.float64)})  # fmt: skip
    if rows.size == 0:
        return empty
    obs = data.obs
    cell = obs["cell_id"].iloc[rows].to_numpy(dtype=np.float64, na_value=np.nan)
    keep = np.isfinite(cell)
    rows, cell = rows[keep], cell[keep]
    if rows.size == 0:
        return empty
    image = obs["image"].iloc[rows].astype(str).to_numpy()
    frame = pd.DataFrame({"image": image, "cell_id": cell.astype(np.int64)})
    group = frame.groupby(["image", "cell_id"], sort=False).ngroup().to_numpy()
    n_groups = int(group.max()) + 1
    first = np.unique(group, return_index=True)[1]
    cells = frame.iloc[first].reset_index(drop=True)
    cells["n_rows"] = np.bincount(group, minlength=n_groups).astype(np.int64)
    x = _rows_x(data, rows)
    finite = np.isfinite(x).all(axis=1)
    distance = np.full(n_groups, np.nan)
    if finite.any():
        xf = x[finite].astype(np.float64)
        means = pd.DataFrame(xf).groupby(group[finite]).mean()
        centre = xf.mean(axis=0)
        distance[means.index.to_numpy()] = np.linalg.norm(means.to_numpy() - centre, axis=1)
    cells["distance"] = distance
    has = np.flatnonzero(np.isfinite(distance))
    rest = np.flatnonzero(~np.isfinite(distance))
    if seed is None:
        has = has[np.argsort(distance[has], kind="stable")]
    else:
        has = np.random.default_rng(seed).permutation(has)
    return cells.iloc[np.concatenate([has, rest])].reset_index(drop=True)


# --------------------------------------------------------------------------- pixels


def _window(arr, starts, sizes, fill) -> np.ndarray:
    """A window of the last ``len(starts)`` axes of ``arr`` (leading axes whole), ``fill``
    outside the array; only the window is read (dask or zarr slicing, then numpy)."""
    k = len(starts)
    lead = tuple(arr.shape[:-k]) if k < arr.ndim else ()
    dtype = np.float32 if isinstance(fill, float) else arr.dtype
    out = np.full(lead + tuple(int(s) for s in sizes), fill, dtype=dtype)
    src, dst = [], []
    for st, sz, full in zip(starts, sizes, arr.shape[-k:]):
        st, sz = int(st), int(sz)
        lo, hi = max(0, st), min(int(full), st + sz)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[(Ellipsis, *dst)] = np.asarray(arr[(Ellipsis, *src)])
    return out


def _plane_of(arr, nd: int, origin, crop, z_index: int | None, fill):
    """The shown 2D window of one channel (or label image) at a crop window.

    2D embeddings (``nd == 2``) of a z-stack (``arr`` with a z axis): plane ``z_index``, else
    the maximum over z (labels: the cell where any plane has it, see ``reduce``); native 3D
    (``nd == 3``): the middle plane of the crop."""
    while arr.ndim > 3:
        arr = arr[0]  # leading axes beyond ([Z,] Y, X), e.g. time: the first
    yx0, yx = origin[-2:], crop[-2:]
    if nd == 3 and arr.ndim == 3:
        z = int(origin[0]) + int(crop[0]) // 2
        if not 0 <= z < arr.shape[0]:
            return np.full(tuple(yx), fill, dtype=np.float32 if isinstance(fill, float) else
                           arr.dtype), None  # fmt: skip
        return _window(arr[z], yx0, yx, fill), None
    if arr.ndim == 3:  # a z-stack behind a 2D embedding
        if z_index is not None:
            z = int(np.clip(z_index, 0, arr.shape[0] - 1))
            return _window(arr[z], yx0, yx, fill), None
        return None, _window(arr, yx0, yx, fill)  # (z, h, w): reduced by the caller
    return _window(arr, yx0, yx, fill), None


def _channel_window(view: ChannelView, nd, origin, crop, z_index) -> np.ndarray:
    """One channel's shown pixels at a crop window, float32 (h, w), NaN outside the image."""
    plane, stack = _plane_of(view.data, nd, origin, crop, z_index, np.nan)
    if plane is None:
        with np.errstate(invalid="ignore"):
            plane = np.max(stack, axis=0)  # NaN outside the image stays NaN
    return plane.astype(np.float32, copy=False)


def _cell_window(labels, cell: int, nd, origin, crop, z_index) -> np.ndarray | None:
    """The cell's mask at a crop window (h, w) bool: for a z-stack behind a 2D embedding,
    where any plane (or plane ``z_index``) holds the cell."""
    if labels is None:
        return None
    plane, stack = _plane_of(labels, nd, origin, crop, z_index, 0)
    if plane is None:
        return (stack == cell).any(axis=0)
    return plane == cell


def _scale(plane: np.ndarray, limits: tuple[float, float] | None) -> np.ndarray:
    """A channel scaled to [0, 1] by its contrast limits (default: the tile's percentiles),
    0 outside the image."""
    finite = np.isfinite(plane)
    if limits is None:
        if not finite.any():
            return np.zeros(plane.shape, dtype=np.float32)
        lo, hi = np.percentile(plane[finite], PERCENTILES)
    else:
        lo, hi = limits
    lo, hi = float(lo), float(hi)
    span = hi - lo if hi > lo else 1.0
    out = np.clip((plane - lo) / span, 0.0, 1.0)
    out[~finite] = 0.0
    return out.astype(np.float32, copy=False)


def composite(values: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Additive blending: channels ``values`` (C, h, w) in [0, 1] with colours ``rgb`` (C, 3)
    -> (h, w, 3) in [0, 1], clipped."""
    if len(values) == 0:
        return np.zeros((*values.shape[1:], 3), dtype=np.float32)
    out = np.tensordot(values, np.asarray(rgb, dtype=np.float32), axes=([0], [0]))
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _upsample(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2D map resized smoothly to ``shape`` (bilinear between patch centres)."""
    wy, wx = _resize_matrix(grid.shape[0], shape[0]), _resize_matrix(grid.shape[1], shape[1])
    return wy @ grid.astype(np.float32) @ wx.T


@lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: bilinear between pixel centres when enlarging (the identity at
    equal sizes), area averaging when shrinking."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    if n_out >= n_in:
        c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(c).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = (c - i0).astype(np.float32)
        np.add.at(m, (np.arange(n_out), i0), 1 - w)
        np.add.at(m, (np.arange(n_out), i1), w)
        return m
    r = n_in / n_out
    edges = np.arange(n_in + 1, dtype=np.float64)
    for j in range(n_out):
        lo, hi = j * r, (j + 1) * r
        m[j] = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None) / r
    return m


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """An (h, w, 3) image in [0, 1] resized to fit ``size`` x ``size`` (aspect kept, centred on
    black), as uint8."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    if (nh, nw) != (h, w):
        wy, wx = _resize_matrix(h, nh), _resize_matrix(w, nw)
        img = np.einsum("yh,hwk,xw->yxk", wy, img, wx, optimize=True)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


@lru_cache(maxsize=1)
def _inferno() -> np.ndarray:
    """The inferno colour map as a (256, 3) float32 table."""
    from matplotlib import colormaps

    return np.asarray(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3], dtype=np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The cell's own pixels on its border (4-connected), one pixel thin."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _patch_share(mask: np.ndarray, nd: int, patch, crop, hw) -> np.ndarray:
    """A stored mask ([C,] [gz,] gy, gx) as the shown plane's per-pixel share masked ([C,] h, w)
    float32 (per channel when the mask is)."""
    m = np.asarray(mask, dtype=np.float32)
    if nd == 3:
        m = m[..., (int(crop[0]) // 2) // int(patch[0]), :, :]
    m = np.repeat(np.repeat(m, int(patch[-2]), axis=-2), int(patch[-1]), axis=-1)
    return m[..., : hw[0], : hw[1]]


# --------------------------------------------------------------------------- stored maps

_MAPS = ("attention", "mask", "reconstruction", "origins")


def _read_maps(store, index: int, ids: np.ndarray) -> dict[str, dict[int, np.ndarray] | None]:
    """The stored per-cell arrays of some cells of one image (only their rows are read):
    name -> {cell id: array}, None where the store has no such array."""
    out: dict[str, dict[int, np.ndarray] | None] = {name: None for name in _MAPS}
    for key in store.units(images=[index]):
        unit_ids = store.unit_cell_ids(key)
        pos = np.flatnonzero(np.isin(unit_ids, ids))
        for name in _MAPS:
            path = f"units/{key}/{name}"
            if path not in store.root:
                continue
            got = out[name] if out[name] is not None else {}
            out[name] = got
            if pos.size:
                values = store.root[path].oindex[pos]
                got.update(zip(unit_ids[pos].tolist(), values))
    return out


def _channel_map(views: list[ChannelView], embedded: list[str]) -> list[int]:
    """For each embedded channel, the index of its view (by name; by position when the names
    differ but the counts agree), -1 without one."""
    by_name = {v.name: i for i, v in enumerate(views)}
    found = [by_name.get(name, -1) for name in embedded]
    if any(i < 0 for i in found) and len(views) == len(embedded):
        return list(range(len(views)))
    return found


def _obs_centres(data: ExplorerData, cells: pd.DataFrame) -> dict[tuple[str, int], np.ndarray]:
    """Each cell's centre from the table: its centroid (the mean of its patches' centres at
    the patch level), ([z,] y, x)."""
    nd = len(data.patch_size)
    cols = ["centroid_z", "centroid_y", "centroid_x"][-nd:]
    obs = data.obs
    ids = obs["cell_id"].to_numpy(dtype=np.float64, na_value=np.nan)
    keep = np.isin(ids, cells["cell_id"].to_numpy(np.float64))
    sub = obs.loc[keep, ["image", "cell_id", *cols]].copy()
    sub["image"] = sub["image"].astype(str)
    sub["cell_id"] = sub["cell_id"].astype(np.int64)
    mean = sub.groupby(["image", "cell_id"], sort=False)[cols].mean()
    return {(str(i), int(c)): v for (i, c), v in zip(mean.index, mean.to_numpy(np.float64))}


# --------------------------------------------------------------------------- tiles


def cell_tiles(
    data: ExplorerData,
    cells: pd.DataFrame,
    channels: dict[str, list[ChannelView]],
    labels: dict[str, np.ndarray | None] | None = None,
    z_index: int | None = None,
    size: int = 96,
    cancelled: Callable[[], bool] | None = None,
) -> list[CellTile]:
    """Tiles of the given cells (rows of :func:`order_cells`, already paged by the caller).

    ``channels``: per image, the channels to show (the napari layers' pixels and colours);
    ``labels``: per image, its label image (the attention is drawn within the cell only, with
    its outline); ``z_index``: for a z-stack embedded in 2D, the plane to show (default: the
    maximum projection over z, as embedded by default); native 3D embeddings show the middle
    plane of each cell's crop. Each image's stored maps are read once, for these cells only.
    ``cancelled()`` is asked between cells: what is done so far is returned."""
    nd = len(data.patch_size)
    patch = tuple(int(p) for p in data.patch_size)
    crop = tuple(int(c) for c in data.crop_size)
    hw = crop[-2:]
    labels = labels or {}
    store = data.store
    info = {i["name"]: i for i in store.image_info()} if store is not None else {}
    level = data.level
    centres = None
    per_image: dict[str, tuple] = {}  # each image's stored maps, notes and views, read once
    for image, group in cells.groupby(cells["image"].astype(str), sort=False):
        if cancelled is not None and cancelled():
            return []
        ids = group["cell_id"].to_numpy(np.int64)
        maps: dict[str, dict | None] = {name: None for name in _MAPS}
        base_notes: dict[str, str] = {}
        if store is None:
            base_notes.update(dict.fromkeys(PANELS[1:], NOTES["no_store"]))
        elif image not in data.image_index:
            base_notes.update(dict.fromkeys(PANELS[1:], f"image {image} is not in the store"))
        else:
            maps = _read_maps(store, data.image_index[image], ids)
            for panel, name in (("attention", "attention"), ("masked", "mask"),
                                ("reconstruction", "reconstruction")):  # fmt: skip
                if maps[name] is None:
                    base_notes[panel] = NOTES[name]
        views = list(channels.get(image) or [])
        if not views:
            base_notes["input"] = NOTES["no_layer"]
        embedded = list(info.get(image, {}).get("channels") or [v.name for v in views])
        per_image[image] = (maps, base_notes, views, _channel_map(views, embedded))
    tiles: list[CellTile] = []
    for image, cell in zip(cells["image"].astype(str), cells["cell_id"].astype(np.int64)):
        if cancelled is not None and cancelled():
            return tiles
        cell = int(cell)
        maps, base_notes, views, view_of = per_image[image]
        notes = dict(base_notes)
        origin = found = None
        if maps["origins"] is not None and cell in maps["origins"]:
            origin = np.asarray(maps["origins"][cell], dtype=np.int64)
        if origin is None or level != "patch":
            if centres is None:
                centres = _obs_centres(data, cells)
            found = centres.get((image, cell))
        if origin is None:
            c = found if found is not None else np.zeros(nd)
            origin = np.round(np.nan_to_num(c)).astype(np.int64) - np.asarray(crop) // 2
        if level != "patch" and found is not None:
            centre = tuple(float(v) for v in found)
        else:
            centre = tuple(float(v) for v in origin + np.asarray(crop) // 2)
        panels, more = _draw(views, view_of, maps, cell, labels.get(image), nd, patch, crop,
                             hw, origin, z_index)  # fmt: skip
        for k, v in more.items():
            notes.setdefault(k, v)
        plane = ""
        if nd == 3:
            plane = f"z {int(origin[0]) + crop[0] // 2} (middle plane of the 3D crop)"
        elif any(np.ndim(v.data) > 2 for v in views):
            plane = "max projection over z" if z_index is None else f"z {z_index}"
        tiles.append(CellTile(
            image, cell, centre,
            {k: _fit(panels[k], size) for k in PANELS if k in panels},
            {k: notes[k] for k in PANELS if k in notes and k not in panels}, plane,
        ))  # fmt: skip
    return tiles


def _draw(views, view_of, maps, cell, lab, nd, patch, crop, hw, origin, z_index):
    """The float panels (h, w, 3) of one cell, and notes on panels it could not draw."""
    notes: dict[str, str] = {}
    panels: dict[str, np.ndarray] = {}
    raws = [_channel_window(v, nd, origin, crop, z_index) for v in views]
    values = np.stack([_scale(raw, v.limits) for raw, v in zip(raws, views)]) if views else (
        np.zeros((0, *hw), np.float32)
    )  # fmt: skip
    rgb = np.asarray([v.rgb for v in views], dtype=np.float32).reshape(-1, 3)
    shown = composite(values, rgb)
    if views:
        panels["input"] = shown
    mask = _cell_window(lab, cell, nd, origin, crop, z_index)

    def stored(name):
        table = maps[name]
        if table is None:
            return None
        if cell not in table:
            notes.setdefault(_PANEL_OF[name], f"cell {cell} has no stored {name}")
            return None
        return table[cell]

    att = stored("attention")
    if att is not None:
        a = np.asarray(att, dtype=np.float32).mean(axis=0)  # heads
        while a.ndim > nd:
            a = a.mean(axis=0)  # channels
        if nd == 3:
            a = a[(crop[0] // 2) // patch[0]]
        a = _upsample(a, hw)
        inside = mask if mask is not None and mask.any() else np.ones(hw, dtype=bool)
        lo, hi = float(a[inside].min()), float(a[inside].max())
        a = np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)
        colour = _inferno()[np.round(a * 255).astype(np.intp)]
        out = shown * DIM
        out[inside] = (1 - ALPHA) * out[inside] + ALPHA * colour[inside]
        if mask is not None:
            out[_outline(mask)] = OUTLINE
        panels["attention"] = out
    m = stored("mask")
    share = None
    if m is not None:
        share = _patch_share(m, nd, patch, crop, hw)
        if share.ndim == 3:  # per channel: the masked channels are not seen
            idx = np.asarray(view_of[: len(share)])
            visible = np.ones_like(values)
            for c, v in enumerate(idx.tolist()):
                if v >= 0 and v < len(values):
                    visible[v] = 1.0 - share[c]
            seen = composite(values * visible, rgb)
            grey = share.mean(axis=0)
        else:
            seen = shown * (1.0 - share)[..., None]
            grey = share
        panels["masked"] = np.clip(seen + GREY * grey[..., None], 0, 1)
    rec = stored("reconstruction")
    if rec is not None:
        r = np.asarray(rec, dtype=np.float32)
        if nd == 3:
            r = r[:, crop[0] // 2]
        chans = [c for c in range(len(r)) if c < len(view_of) and view_of[c] >= 0]
        if not chans:
            notes["reconstruction"] = (
                "no channel colours: the image layers' channels are not the embedded ones"
            )
        else:
            vals = []
            for c in chans:
                view = views[view_of[c]]
                if share is None:
                    seen_px = None
                else:
                    seen_px = (share[c] if share.ndim == 3 and c < len(share) else share) < 0.5
                raw = _to_raw(r[c], raws[view_of[c]], seen_px)
                vals.append(_scale(raw, view.limits) if raw is not None else _scale(r[c], None))
            panels["reconstruction"] = composite(np.stack(vals), rgb[[view_of[c] for c in chans]])
    return panels, notes


def _to_raw(rec: np.ndarray, raw: np.ndarray, seen: np.ndarray | None) -> np.ndarray | None:
    """The reconstruction of one channel in the input's raw units: ``a * rec + b`` fitted on
    the visible pixels, where the reconstruction is the model's normalised input. ``None``
    when that cannot be fitted (too few visible pixels, or a map that does not rise)."""
    if seen is None or rec.shape != raw.shape:
        return None
    use = seen & np.isfinite(rec) & np.isfinite(raw)
    if use.sum() < 16 or np.ptp(rec[use]) <= 0:
        return None
    a, b = np.polyfit(rec[use].astype(np.float64), raw[use].astype(np.float64), 1)
    if not np.isfinite(a) or a <= 0:
        return None
    return (a * rec + b).astype(np.float32)


_PANEL_OF = {"attention": "attention", "mask": "masked", "reconstruction": "reconstruction"}
