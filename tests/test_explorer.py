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
    paste_cells,
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
    att = paste_cells(data, "attention", IMAGE, np.array([cell]), labels.shape)
    assert np.isfinite(att).any() and np.nanmax(att) == pytest.approx(1.0)
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
