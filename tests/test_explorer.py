"""The explorer's Qt-free core: rows -> exact patch footprints (2D and 3D), cells, stored maps;
pixels -> rows; loading a level from the store and from an exported .h5ad."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pl.linking import (
    ExplorerData,
    highlight_image,
    load_level,
    patch_boxes,
    rows_at,
)
from napari_maeprobe.pp.preprocessing import cell_crops, normalize, patch_table
from napari_maeprobe.schema import conform

IMAGE = "20210305_NE_mockData2_001"


@pytest.fixture(scope="module")
def sample_store(sample_dir):
    return sample_dir / "embeddings" / "imc_default.zarr"


def _data_3d():
    """A real 3D patch table: the nuclei z-stack with its shipped labels, 3D crops of
    (40, 64, 64) cut into (10, 8, 8) patches."""
    image, labels = load_sample("nuclei3d")
    crops = cell_crops(normalize(image.to_numpy()), labels, (40, 64, 64), image.name,
                       image.channel_names)  # fmt: skip
    table = patch_table(crops, (10, 8, 8), per_channel=True, dataset=image.dataset)
    obs = conform(table, "patch")
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=np.zeros((len(obs), 4), np.float32), obs=obs)
    adata.obsm["X_umap"] = np.zeros((len(obs), 2), dtype=np.float32)
    data = ExplorerData(adata, (10, 8, 8), (40, 64, 64))
    return data, labels, image


def test_3d_patch_rows_paint_their_exact_3d_footprints():
    data, labels, image = _data_3d()
    all_boxes = patch_boxes(data.obs, data.patch_size)
    inside = ((all_boxes[:, :3] >= 0) & (all_boxes[:, 3:] <= labels.shape)).all(axis=1)
    rows = np.flatnonzero(inside)[[0, 17, 123]]
    hl = highlight_image(data, rows, image.name, labels.shape)
    boxes = patch_boxes(data.obs.iloc[rows], data.patch_size)
    expected = np.zeros(labels.shape, dtype=np.uint8)
    for b in boxes:
        sl = tuple(slice(max(0, b[i]), max(0, b[3 + i])) for i in range(3))
        expected[sl] = 1
    np.testing.assert_array_equal(hl, expected)
    assert 0 < hl.sum() <= 3 * 10 * 8 * 8
    # a click inside the first box finds that patch (and others of overlapping crops there)
    z0, y0, x0 = boxes[0][:3]
    found = rows_at(data, image.name, (z0 + 1, y0 + 1, x0 + 1))
    assert rows[0] in found


def test_store_level_links_rows_cells_and_attention(sample_store):
    data = load_level(sample_store, "patch")
    assert data.n == 17600 and data.patch_size == (12, 12) and data.crop_size == (96, 96)
    labels = data.store.labels(0)
    cell = int(np.bincount(labels.ravel())[1:].argmax() + 1)
    rows = np.flatnonzero(((data.obs.image == IMAGE) & (data.obs.cell_id == cell)).to_numpy())
    hl = highlight_image(data, rows, IMAGE, labels.shape)
    assert hl[labels == cell].mean() > 0.9  # the cell's patches cover the cell
    from napari_maeprobe.pl.overlays import cell_attention

    att = cell_attention(data, IMAGE, np.array([cell]), labels.shape, labels)
    assert att[labels == cell].max() == pytest.approx(1.0) and not att[labels != cell].any()
    glob = load_level(sample_store, "global")
    cells = highlight_image(glob, np.flatnonzero((glob.obs.cell_id == cell).to_numpy()),
                            IMAGE, labels.shape, labels)  # fmt: skip
    np.testing.assert_array_equal(cells.astype(bool), labels == cell)
    y, x = np.argwhere(labels == cell)[0]
    assert set(rows_at(glob, IMAGE, (y, x), labels)) == set(
        np.flatnonzero((glob.obs.cell_id == cell).to_numpy())
    )


def test_h5ad_export_loads_in_the_explorer(sample_store, tmp_path):
    from napari_maeprobe.io.export import export_store

    path = export_store(sample_store, "h5ad", tmp_path / "imc.h5ad")
    data = load_level(path, "channel")
    assert data.n == 275 and set(data.coords) == {"UMAP", "PCA"}
    assert data.X.shape == (275, 144) and data.drivers is not None


def test_z_stack_embedded_in_2d_paints_every_plane_of_its_3d_layer():
    """A z-stack embedded as its 2D maximum projection, shown as its 3D layer: the 2D patch
    footprints and the cells of the 2D labels cover every plane, clipped along y and x."""
    image, labels3d = load_sample("nuclei3d")
    flat = image.to_numpy().max(axis=1)  # (1, 256, 256)
    labels = labels3d.max(axis=0)
    crops = cell_crops(normalize(flat), labels, (64, 64), image.name, image.channel_names)
    obs = conform(patch_table(crops, (8, 8), dataset=image.dataset), "patch")
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=np.zeros((len(obs), 4), np.float32), obs=obs)
    data = ExplorerData(adata, (8, 8), (64, 64))
    rows = np.arange(0, len(obs), 97)
    flat_hl = highlight_image(data, rows, image.name, labels.shape)
    stack_hl = highlight_image(data, rows, image.name, labels3d.shape)
    assert stack_hl.shape == labels3d.shape and flat_hl.sum() > 0
    np.testing.assert_array_equal(stack_hl, np.broadcast_to(flat_hl, labels3d.shape))
    # a click on the 3D layer (z, y, x) finds the patch under (y, x)
    y0, x0 = patch_boxes(data.obs.iloc[rows[:1]], (8, 8))[0][:2]
    assert rows[0] in rows_at(data, image.name, (30, y0 + 1, x0 + 1))
    # the cell level, with the 2D labels, on the 3D layer
    cell_obs = conform(obs.drop_duplicates("cell_id")[["image", "cell_id"]].reset_index(
        drop=True), "global")  # fmt: skip
    cell_obs.index = cell_obs.index.astype(str)
    cells = ExplorerData(ad.AnnData(X=np.zeros((len(cell_obs), 4), np.float32), obs=cell_obs),
                         (8, 8), (64, 64))  # fmt: skip
    hl = highlight_image(cells, np.array([0]), image.name, labels3d.shape, labels)
    one = labels == int(cell_obs["cell_id"].iloc[0])
    np.testing.assert_array_equal(hl, np.broadcast_to(one, labels3d.shape).astype(np.uint8))


def test_native_3d_cell_rows_without_labels_paint_their_3d_crop_window():
    data3d, labels, image = _data_3d()
    obs = data3d.obs.drop_duplicates("cell_id")[["image", "cell_id"]].reset_index(drop=True)
    centres = data3d.obs.groupby("cell_id", observed=True)[
        ["centroid_z", "centroid_y", "centroid_x"]].mean()  # fmt: skip
    obs = obs.join(centres, on="cell_id")
    obs = conform(obs, "global")
    obs.index = obs.index.astype(str)
    data = ExplorerData(ad.AnnData(X=np.zeros((len(obs), 4), np.float32), obs=obs),
                        (10, 8, 8), (40, 64, 64))  # fmt: skip
    hl = highlight_image(data, np.array([3]), image.name, labels.shape)
    c = obs[["centroid_z", "centroid_y", "centroid_x"]].iloc[3].to_numpy(np.float64)
    lo = np.floor(c - np.array([20, 32, 32]) + 0.5).astype(int)
    expected = np.zeros(labels.shape, np.uint8)
    expected[tuple(slice(max(0, a), max(0, a + s)) for a, s in zip(lo, (40, 64, 64)))] = 1
    np.testing.assert_array_equal(hl, expected)
