"""Channel picking, normalisation, z handling, crops, tiles and the patch table on real images."""

from __future__ import annotations

import numpy as np
import pytest

from napari_maeprobe import read_image
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.channels import select_channels
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.boundaries import boundary_map, patch_fractions
from napari_maeprobe.pp.preprocessing import (
    cell_crops,
    normalization_stats,
    normalize,
    patch_table,
    project_z,
    tile_image,
)


@pytest.fixture(scope="module")
def cellpainting():
    return load_sample("cellpainting")[0]


def test_select_channels_orders_by_name(cellpainting):
    sub = select_channels(cellpainting, ["dna", "RNA", "ER"])  # case-insensitive
    assert sub.channel_names == ["DNA", "RNA", "ER"]
    np.testing.assert_array_equal(sub.data[1].compute(), cellpainting.data[5].compute())


def test_select_channels_reports_every_missing_name(cellpainting):
    with pytest.raises(MaeprobeInputError) as err:
        select_channels(cellpainting, ["DNA", "Tubulin", "GFP"])
    msg = str(err.value)
    assert "'Tubulin', 'GFP' not found" in msg and "Brightfield, ER, AGP, Mito, DNA, RNA" in msg


def test_percentile_and_zscore(cellpainting):
    raw = cellpainting.data[:, :256, :256].compute()
    p = normalize(raw, "percentile", 1, 99)
    assert p.dtype == np.float32 and p.min() == 0 and p.max() == 1
    for c in range(raw.shape[0]):  # 1% of pixels at or below the low percentile clip to 0
        assert 0.005 < (p[c] == 0).mean() < 0.05
    z = normalize(raw, "zscore")
    np.testing.assert_allclose(z.reshape(6, -1).mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(z.reshape(6, -1).std(axis=1), 1, atol=1e-3)


def test_nan_is_refused_or_zeroed(sample_dir):
    arr = read_image(
        sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff"
    ).to_numpy()
    arr[3, 10, 10] = np.nan
    with pytest.raises(MaeprobeInputError, match="1 pixel.*NaN.*channel.*YBX1"):
        normalize(arr, channel_names=["Ag107", "Cytokeratin 5", "Laminin", "YBX1", "H3K27Ac"])
    assert np.isfinite(normalize(arr, nan_policy="zero")).all()


def test_nan_advice_names_what_exists(sample_dir):
    """The fix names numpy.nan_to_num and normalize's nan_policy (both exist), not a command-line
    flag that does not (before: ``--nan-to-zero``)."""
    import inspect

    from napari_maeprobe.cli import build_parser

    arr = read_image(
        sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff"
    ).to_numpy()
    arr[1, 5, 5] = np.inf
    with pytest.raises(MaeprobeInputError) as err:
        normalize(arr)
    msg = str(err.value)
    assert "\n" not in msg and "--" not in msg
    assert "numpy.nan_to_num" in msg and hasattr(np, "nan_to_num")
    assert "nan_policy='zero'" in msg and "nan_policy" in inspect.signature(normalize).parameters
    import argparse

    (verbs,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert not any("--nan" in sub.format_help() for sub in verbs.choices.values())


# ------------------------------------------------------------------------ sparse channels

IMC_SPARSE = "20210305_NE_mockData1_002.tiff"  # Laminin (Sm147): 79 % of pixels are zero
IMC_DENSE = "20210305_NE_mockData1_003.tiff"  # every channel: 30-47 % zero


def _imc(sample_dir, name: str) -> np.ndarray:
    return read_image(sample_dir / "imc_bodenmiller_5ch" / "img" / name).to_numpy()


def test_sparse_imc_marker_keeps_its_bright_pixels(sample_dir):
    """A real IMC marker with most pixels zero: the bright pixels (above the 99.8th percentile of
    all pixels, where the old rule clipped every one to 1) keep distinct values, in their order."""
    raw = _imc(sample_dir, IMC_SPARSE)[2]
    assert (raw == 0).mean() > 0.5
    out = normalize(raw[None])[0]
    bright = raw >= np.percentile(raw, 99.8)
    assert bright.sum() >= 5
    vals = out[bright]
    assert (vals < 1).sum() >= bright.sum() - 2  # not all saturated
    order = np.argsort(raw[bright], kind="stable")
    assert (np.diff(vals[order]) >= 0).all() and len(np.unique(vals)) >= len(vals) - 2
    # the weakest non-zero counts stay above the zero background
    assert (out[raw > 0] > 0).all() and (out[raw == 0] == 0).all()


def test_sparse_marker_in_a_large_empty_field_is_not_zeroed(sample_dir):
    """The same real IMC region inside a 1080 x 1080 acquisition with no tissue elsewhere (zero
    counts): 99.95 % of the pixels are zero, so the 1st and 99.8th percentiles of all pixels are
    both 0, which used to normalise the channel to all zeros."""
    region = _imc(sample_dir, IMC_SPARSE)[2]
    field = np.zeros((1, 1080, 1080), np.float32)
    field[0, 500 : 500 + region.shape[0], 400 : 400 + region.shape[1]] = region
    assert np.percentile(field, 99.8) == np.percentile(field, 1.0) == 0
    stats, notes = normalization_stats(field)
    assert notes[0].startswith("sparse (99.9")
    out = normalize(field)[0]
    assert (out[field[0] > 0] > 0).all()
    assert out.max() == 1.0 and len(np.unique(out)) > 100


def test_dense_channels_are_unchanged(sample_dir, cellpainting):
    """Channels with at most half their pixels zero keep the plain [1, 99.8] percentiles
    (computed here with numpy): IMC regions with dense markers and the Cell Painting field."""
    for raw in (_imc(sample_dir, IMC_DENSE), cellpainting.data[:, :300, :300].compute()):
        assert ((raw == 0).reshape(len(raw), -1).mean(axis=1) <= 0.5).all()
        stats, notes = normalization_stats(raw)
        want = np.percentile(raw.reshape(len(raw), -1).astype(np.float32), [1, 99.8], axis=1).T
        np.testing.assert_allclose(stats, want, rtol=1e-6)
        assert all(n.startswith("percentile") for n in notes)
        lo, hi = want[:, 0, None, None], want[:, 1, None, None]
        np.testing.assert_allclose(normalize(raw), np.clip((raw - lo) / (hi - lo), 0, 1),
                                   atol=1e-6)  # fmt: skip


def test_z_projection_and_slice(sample_dir):
    im = read_image(sample_dir / "neubias_small_multichannel/xyzc_16bit__spots.tif")
    mip = project_z(im, "max")
    assert mip.axes == "CYX" and mip.data.shape == (2, 88, 89)
    np.testing.assert_array_equal(mip.to_numpy(), im.to_numpy().max(axis=1))
    sl = project_z(im, "slice", 3)
    np.testing.assert_array_equal(sl.to_numpy(), im.to_numpy()[:, 3])
    assert project_z(im, "keep") is im
    with pytest.raises(MaeprobeInputError, match="slice 40 requested but the stack has 17"):
        project_z(im, "slice", 40)


def test_cell_crops_are_centred_and_zero_padded(sample_dir):
    im, labels = load_sample("imc")
    data = normalize(im.to_numpy())
    crops = cell_crops(data, labels, 32, im.name, im.channel_names)
    assert len(crops) == len(np.unique(labels)) - 1
    assert crops.crops.shape == (len(crops), 5, 32, 32)
    for i in range(len(crops)):
        # the crop centre is on (or next to) the cell's centroid, and the mask is that cell
        ys, xs = np.nonzero(crops.cell_masks[i])
        assert abs(ys.mean() - 16) <= 1.5 and abs(xs.mean() - 16) <= 1.5
    # windows sticking out of the 87x103 image are zero there
    edge = np.flatnonzero((crops.origins < 0).any(axis=1))
    assert edge.size > 0
    i = edge[0]
    oy, ox = crops.origins[i]
    if oy < 0:
        assert not crops.crops[i, :, :-oy].any()
    else:
        assert not crops.crops[i, :, :, :-ox].any()


def test_tiles_cover_the_image(cellpainting):
    data = cellpainting.data[:2].compute()
    tiles = tile_image(data, 256)
    assert len(tiles) == 25  # ceil(1080 / 256) ** 2
    np.testing.assert_array_equal(tiles.crops[0], data[:, :256, :256])
    last = tiles.crops[-1]
    assert last[:, : 1080 - 1024, : 1080 - 1024].any() and not last[:, 56:, :].any()


def test_patch_table_2d(sample_dir):
    im, labels = load_sample("imc")
    data = normalize(im.to_numpy())
    crops = cell_crops(data, labels, 32, im.name, im.channel_names)
    table = patch_table(crops, 8, per_channel=True, dataset="imc")
    assert len(table) == len(crops) * 5 * 16
    first = table[(table.crop_index == 0) & (table.channel == "YBX1")]
    assert list(first.patch_row[:5]) == [0, 0, 0, 0, 1]
    # patch centre in source coordinates, and its mean intensity equals a direct computation
    row = first[(first.patch_row == 2) & (first.patch_col == 1)].iloc[0]
    oy, ox = crops.origins[0]
    assert (row.centroid_y, row.centroid_x) == (oy + 2 * 8 + 3.5, ox + 8 + 3.5)
    assert row.patch_intensity == pytest.approx(crops.crops[0, 3, 16:24, 8:16].mean(), rel=1e-5)
    # central: the 2x2 patches in the middle of a 4x4 grid
    centre = table[(table.crop_index == 0) & (table.channel == "YBX1") & table.central]
    assert sorted(zip(centre.patch_row, centre.patch_col)) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # foreground by Otsu: background patches are darker than foreground ones
    ch = table[table.channel == "H3K27Ac"]
    assert 0 < ch.foreground.mean() < 1
    assert ch[ch.foreground].patch_intensity.min() > ch[~ch.foreground].patch_intensity.max()
    assert table.patch_z.isna().all() and table.centroid_z.isna().all()


def test_patch_table_3d(sample_dir):
    im, labels = load_sample("nuclei3d")
    data = normalize(im.to_numpy())
    crops = cell_crops(data, labels, (20, 48, 48), im.name, im.channel_names)
    table = patch_table(crops, (10, 8, 8))
    assert len(table) == len(crops) * 2 * 6 * 6
    assert set(table.patch_z) == {0, 1}
    assert table.centroid_z.notna().all()


def test_patch_size_must_divide_crop(cellpainting):
    data = cellpainting.data[:1, :100, :100].compute().astype(np.float32)
    with pytest.raises(MaeprobeInputError, match="not a multiple of the patch size"):
        patch_table(tile_image(data, 100), 16)


def test_boundary_fractions(sample_dir):
    im, labels = load_sample("imc")
    b = boundary_map(labels)
    # 0 in the background far from cells, > 0 on the cells' borders
    from scipy import ndimage

    far = ndimage.distance_transform_edt(labels == 0) > 2
    assert not b[far].any()
    inner = ndimage.binary_erosion(
        labels > 0, np.ones((3, 3)), border_value=1
    )  # the image edge is no border
    border = (labels > 0) & ~inner
    assert b[border].all()
    # patch fractions average to the direct pixel count
    data = normalize(im.to_numpy())
    crops = cell_crops(data, labels, 32)
    frac = patch_fractions(crops.boundary, (8, 8))
    np.testing.assert_allclose(frac.mean(axis=(1, 2)), crops.boundary.mean(axis=(1, 2)), rtol=1e-6)
    table = patch_table(crops, 8)
    empty = table[table.patch_intensity == 0]
    assert (empty.boundary_fraction == 0).all()
    assert (table.boundary_fraction > 0).any()


def test_boundary_3d_touching_cells(sample_dir):
    _, labels = load_sample("nuclei3d")
    b = boundary_map(labels)
    assert b.shape == labels.shape and b.any()
    assert not b[labels == 0][:1000].all()
    crops = cell_crops(np.zeros((1, *labels.shape), np.float32), labels, (20, 40, 40))
    frac = patch_fractions(crops.boundary, (10, 8, 8))
    np.testing.assert_allclose(
        frac.mean(axis=(1, 2, 3)), crops.boundary.mean(axis=(1, 2, 3)), rtol=1e-6
    )
