"""What the linked explorer shows, without Qt: one level's points, and how points map to pixels.

The GUI keeps one table of observations per level (the store's ``obs``, or an ``.h5ad``'s) as the
single source of truth; these functions turn a selection of its rows into pixels on the image
(patch footprints, cells) and a click on the image into rows. What a selection draws is
:mod:`napari_maeprobe.pl.overlays`; the per-cell gallery is :mod:`napari_maeprobe.pl.gallery`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError

if TYPE_CHECKING:
    import anndata as ad

    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.tl.diagnostics import DriversReport


@dataclass
class ExplorerData:
    """One level's table (an AnnData, see :mod:`napari_maeprobe.table`) as the explorer shows
    it, with the geometry that maps its rows to pixels and the store its per-cell maps are in."""

    adata: ad.AnnData
    patch_size: tuple[int, ...]
    crop_size: tuple[int, ...]
    source: Path | None = None
    store: EmbeddingStore | None = None

    @cached_property
    def level(self) -> str:
        from napari_maeprobe.table import level_of

        return level_of(self.adata)

    @property
    def obs(self) -> pd.DataFrame:
        return self.adata.obs

    @property
    def X(self) -> np.ndarray:
        """The embeddings (float32), for diagnostics of selections."""
        return np.asarray(self.adata.X, dtype=np.float32)

    @property
    def coords(self) -> dict[str, np.ndarray]:
        """``"UMAP"``, ``"PCA"``: (n, 2), NaN where not computed."""
        return _coords(self.adata.obsm, self.adata.n_obs)

    @cached_property
    def drivers(self) -> DriversReport | None:
        """The stored "what drives these clusters" report of this level, if analysed."""
        from napari_maeprobe.table import drivers

        return drivers(self.adata, self.level)

    @cached_property
    def image_index(self) -> dict[str, int]:
        """Image name -> the store's image index (empty without a store)."""
        if self.store is None:
            return {}
        return {name: i for i, name in enumerate(self.store.image_names())}

    @property
    def n(self) -> int:
        return self.adata.n_obs


def available_levels(path: str | Path) -> list[str]:
    """The levels a store or ``.h5ad`` holds."""
    path = Path(path)
    if path.suffix == ".h5ad":
        import anndata as ad

        obs = ad.read_h5ad(path, backed="r").obs
        return [lvl for lvl in ("global", "channel", "patch") if (obs["level"] == lvl).any()]
    from napari_maeprobe.embed.store import EmbeddingStore

    return EmbeddingStore(path).levels()


def load_level(path: str | Path, level: str = "patch") -> ExplorerData:
    """Read one level of a store (``.zarr``) or an exported ``.h5ad`` for the explorer."""
    path = Path(path)
    if path.suffix == ".h5ad":
        return _from_h5ad(path, level)
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.table import read_level

    store = EmbeddingStore(path)
    adata = read_level(store, level)
    facts = store.facts
    data = ExplorerData(
        adata,
        patch_size=tuple(facts.get("patch_size", (16, 16))),
        crop_size=tuple(facts.get("crop_size", (96, 96))),
        source=path,
        store=store,
    )
    _coords(adata.obsm, adata.n_obs)  # refuses a level without coordinates, with the fix
    return data


def _coords(obsm, n: int) -> dict[str, np.ndarray]:
    out = {}
    if "X_umap" in obsm:
        out["UMAP"] = np.asarray(obsm["X_umap"], dtype=np.float32)[:, :2]
    if "X_pca" in obsm:
        out["PCA"] = np.asarray(obsm["X_pca"], dtype=np.float32)[:, :2]
    if not out:
        raise MaeprobeInputError(
            f"no UMAP or PCA coordinates for this level ({n} rows)",
            "run `maeprobe analyze STORE` first (or Analyse in the explorer's Analyse tab)",
        )
    return out


def _from_h5ad(path: Path, level: str) -> ExplorerData:
    import anndata as ad

    adata = ad.read_h5ad(path)
    if "level" not in adata.obs:
        raise MaeprobeInputError(f"{path} has no 'level' column", "open a maeprobe export")
    sub = adata[(adata.obs["level"] == level).to_numpy()].copy()
    if sub.n_obs == 0:
        raise MaeprobeInputError(
            f"{path} has no {level!r} rows", "pick another level, or export that level"
        )
    meta = dict(adata.uns.get("maeprobe", {}))
    data = ExplorerData(
        sub,
        patch_size=tuple(int(v) for v in np.atleast_1d(meta.get("patch_size", (16, 16)))),
        crop_size=tuple(int(v) for v in np.atleast_1d(meta.get("crop_size", (96, 96)))),
        source=path,
    )
    _coords(sub.obsm, sub.n_obs)
    return data


# --------------------------------------------------------------------------- rows -> pixels


def patch_boxes(obs: pd.DataFrame, patch_size: tuple[int, ...]) -> np.ndarray:
    """Footprints of patch rows in source-image pixels: (n, 2*nd) as ([z0,] y0, x0, [z1,] y1, x1),
    from each patch's centre (``centroid_*``) and the patch size."""
    nd = len(patch_size)
    cols = ["centroid_z", "centroid_y", "centroid_x"][-nd:]
    centres = obs[cols].to_numpy(dtype=np.float64)
    half = np.asarray(patch_size, dtype=np.float64) / 2.0
    lo = np.floor(centres - half + 0.5).astype(np.int64)
    return np.concatenate([lo, lo + np.asarray(patch_size)], axis=1)


def highlight_image(
    data: ExplorerData,
    rows: np.ndarray,
    image: str,
    shape: tuple[int, ...],
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """A label image (uint8, 1 = highlighted) of the selected rows of one image.

    Patch rows paint their exact footprints (2D, or 3D for 3D patches); cell and channel rows
    paint their cell's mask (``labels``; without labels, the crop window around its centroid).
    ``shape`` may have more axes than the embedding (a z-stack embedded in 2D shown as its 3D
    layer): 2D footprints and 2D labels then cover every plane; 3D labels behind a 2D embedding
    on a 2D ``shape`` paint where any plane holds the cell.
    """
    out = np.zeros(shape, dtype=np.uint8)
    sel = data.obs.iloc[np.asarray(rows, dtype=np.int64)]
    sel = sel[sel["image"].astype(str) == image]
    if sel.empty:
        return out
    if data.level == "patch":
        boxes = np.unique(patch_boxes(sel, data.patch_size), axis=0)
        _paint_boxes(out, boxes)
        return out
    cells = sel["cell_id"].dropna().astype(np.int64).unique()
    if labels is not None:
        hit = np.isin(labels, cells)
        while hit.ndim > out.ndim:
            hit = hit.any(axis=0)
        out[...] = np.broadcast_to(hit, out.shape)
        return out
    boxes = patch_boxes(sel.drop_duplicates("cell_id"), data.crop_size)
    _paint_boxes(out, boxes)
    return out


def _paint_boxes(out: np.ndarray, boxes: np.ndarray) -> None:
    """Paint boxes ([z0,] y0, x0, [z1,] y1, x1) on the last axes of ``out``: 2D boxes on every
    leading plane, 3D boxes on the last three axes (clipped to ``out``)."""
    nd = boxes.shape[1] // 2
    if nd == 2 and out.ndim >= 2:
        _paint_boxes_2d(out, boxes)
        return
    if out.ndim < nd:  # 3D boxes on a 2D image: their footprints in y, x
        _paint_boxes_2d(out, boxes[:, [1, 2, 4, 5]])
        return
    lead = out.ndim - nd
    for b in boxes:
        sl = tuple(
            slice(max(0, b[i]), max(0, min(out.shape[lead + i], b[nd + i]))) for i in range(nd)
        )
        out[(Ellipsis, *sl)] = 1


def _paint_boxes_2d(out: np.ndarray, boxes: np.ndarray) -> None:
    """Paint many axis-aligned boxes at once with a 2D difference image and cumulative sums."""
    h, w = out.shape[-2:]
    y0 = np.clip(boxes[:, 0], 0, h)
    x0 = np.clip(boxes[:, 1], 0, w)
    y1 = np.clip(boxes[:, 2], 0, h)
    x1 = np.clip(boxes[:, 3], 0, w)
    keep = (y1 > y0) & (x1 > x0)
    diff = np.zeros((h + 1, w + 1), dtype=np.int32)
    np.add.at(diff, (y0[keep], x0[keep]), 1)
    np.add.at(diff, (y0[keep], x1[keep]), -1)
    np.add.at(diff, (y1[keep], x0[keep]), -1)
    np.add.at(diff, (y1[keep], x1[keep]), 1)
    cover = diff.cumsum(axis=0).cumsum(axis=1)[:h, :w]
    out[...] = np.maximum(out, (cover > 0).astype(np.uint8))  # every leading plane


def selected_cells(data: ExplorerData, rows: np.ndarray) -> pd.DataFrame:
    """The distinct (image, cell_id) pairs behind some rows."""
    sel = data.obs.iloc[np.asarray(rows, dtype=np.int64)][["image", "cell_id"]].dropna()
    return sel.drop_duplicates().reset_index(drop=True)


# --------------------------------------------------------------------------- pixels -> rows


def rows_at(
    data: ExplorerData,
    image: str,
    point: tuple[float, ...],
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Rows under a clicked pixel of an image: at the patch level the patches whose footprint
    holds it; at the cell levels (and for patches, when the click is on a cell of ``labels``)
    every row of the clicked cell."""
    obs = data.obs
    in_image = (obs["image"].astype(str) == image).to_numpy()
    point = np.asarray(point, dtype=np.float64)
    if labels is not None and len(point) >= labels.ndim:
        idx = tuple(int(round(v)) for v in point[-labels.ndim :])
        if all(0 <= i < s for i, s in zip(idx, labels.shape)) and labels[idx] > 0:
            cell = int(labels[idx])
            return np.flatnonzero(in_image & (obs["cell_id"] == cell).fillna(False).to_numpy())
    if data.level != "patch":
        return np.zeros(0, dtype=np.int64)
    nd = len(data.patch_size)
    boxes = patch_boxes(obs, data.patch_size)
    p = point[-nd:]
    inside = ((boxes[:, :nd] <= p) & (p < boxes[:, nd:])).all(axis=1)
    return np.flatnonzero(inside & in_image)
