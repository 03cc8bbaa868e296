"""Per-cell measurements (pp.measure): the baseline features and technical covariates of every
embedded cell, checked against direct numpy computations on real images, and their way into the
store (obs columns, obsm X_features) and border exclusion."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.plan import plan_image
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.embed.store import EmbeddingStore
from napari_maeprobe.errors import NoCellsFoundError
from napari_maeprobe.pp.measure import (
    baseline_features,
    crop_padding,
    measure_cells,
    measure_crops,
    tile_labels,
)
from napari_maeprobe.pp.preprocessing import cell_crops, tile_origins
from napari_maeprobe.schema import channel_column
from napari_maeprobe.table import FEATURES_KEY, read_level, save_analysis


@pytest.fixture(scope="module")
def nuclei3d():
    """The 3D nuclei sample (skimage cells3d) with its shipped labels."""
    from napari_maeprobe.io.samples import load_sample

    return load_sample("nuclei3d")


def _border_ids(labels: np.ndarray) -> set[int]:
    """Labels with a pixel on the first or last row / column, read off the label image."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return {int(v) for v in np.unique(edge) if v > 0}


def test_measure_cells_matches_numpy(imc):
    image, labels = imc
    data = image.to_numpy()
    names = list(image.channel_names)
    table = measure_cells(data, labels, names)
    ids = np.unique(labels[labels > 0])
    assert list(table.index) == list(ids)
    assert list(table.columns) == baseline_features(names) + ["touches_border"]
    for cell in ids[[0, 7, 20, -1]]:
        inside = labels == cell
        row = table.loc[cell]
        assert row["area"] == inside.sum()
        # major axis: 4 sqrt of the covariance's largest eigenvalue of the pixel coordinates
        coords = np.argwhere(inside).astype(np.float64)
        eig = np.linalg.eigvalsh(np.cov(coords.T, bias=True))
        assert row["major_axis_length"] == pytest.approx(4 * np.sqrt(eig[-1]), rel=1e-6)
        for c, ch in enumerate(names):
            px = data[c][inside].astype(np.float64)
            assert row[f"intensity_mean_{ch}"] == pytest.approx(px.mean(), rel=1e-5, abs=1e-6)
            assert row[f"intensity_std_{ch}"] == pytest.approx(px.std(), rel=1e-4, abs=1e-6)
            for q in (10, 50, 90):
                assert row[f"intensity_p{q}_{ch}"] == pytest.approx(np.percentile(px, q),
                                                                    rel=1e-5, abs=1e-6)  # fmt: skip
    # a subset, in the order asked, with a missing cell as NaN
    sub = measure_cells(data, labels, names, ids=[ids[3], 10_000, ids[1]])
    assert list(sub.index) == [ids[3], 10_000, ids[1]]
    assert np.isnan(sub.loc[10_000, "area"])
    assert sub.loc[ids[1], "area"] == table.loc[ids[1], "area"]


def test_touches_border_is_the_labels_on_the_edge(imc, nuclei3d):
    _, labels = imc
    table = measure_cells(imc[0].to_numpy(), labels, imc[0].channel_names)
    assert set(table.index[table["touches_border"].to_numpy(bool)]) == _border_ids(labels)
    assert 0 < len(_border_ids(labels)) < len(table)
    # 3D: area is the voxel count; the border is the four sides in y and x (as CellProfiler),
    # not the first and last plane, which most cells of a thin stack reach
    image, labels3 = nuclei3d
    t3 = measure_cells(image.to_numpy(), labels3, image.channel_names)
    assert "perimeter" not in t3 and list(t3.columns[:1]) == ["area"]
    faces = np.concatenate(
        [np.take(labels3, end, ax).ravel() for ax in (1, 2) for end in (0, -1)]
    )
    border3 = {int(v) for v in np.unique(faces) if v > 0}
    assert set(t3.index[t3["touches_border"].to_numpy(bool)]) == border3
    cell = int(t3.index[0])
    assert t3.loc[cell, "area"] == (labels3 == cell).sum()


def test_crop_padding_is_the_zero_border_of_a_corner_crop(imc):
    image, labels = imc
    data = image.to_numpy().astype(np.float32) + 1.0  # no zero inside the image
    ids = np.unique(labels[labels > 0])
    crops = cell_crops(data, labels, 96, ids=ids)
    fractions = crop_padding(crops.origins, (96, 96), labels.shape)
    zeros = (crops.crops[:, 0] == 0).mean(axis=(1, 2))  # the padded pixels of each crop
    np.testing.assert_allclose(fractions, zeros)
    corner = (crops.origins < 0).all(axis=1)  # crops cut at the top-left corner
    assert corner.any() and (fractions[corner] > 0).all()
    inside = crop_padding([[10, 10]], (64, 64), (200, 200))
    assert inside[0] == 0.0


def test_tiles_are_measured_as_a_label_image(imc):
    image, _ = imc
    spatial = tuple(image.spatial_shape)
    tiles = tile_labels(spatial, (32, 32))
    origins = tile_origins(spatial, (32, 32))
    # every pixel in exactly one tile, each tile its window clipped to the image
    assert tiles.min() == 1 and tiles.max() == len(origins)
    for i, o in enumerate(origins):
        window = tiles[o[0] : o[0] + 32, o[1] : o[1] + 32]
        assert (window == i + 1).all()
    table = measure_cells(image.to_numpy(), tiles, image.channel_names)
    on_edge = {
        i + 1
        for i, o in enumerate(origins)
        if o[0] == 0 or o[1] == 0 or o[0] + 32 >= spatial[0] or o[1] + 32 >= spatial[1]
    }
    assert set(table.index[table["touches_border"].to_numpy(bool)]) == on_edge


def test_crop_stack_measures_each_crop_whole(imc):
    image, labels = imc
    crops = cell_crops(image.to_numpy(), labels, 24, ids=np.unique(labels[labels > 0])[:6]).crops
    table = measure_crops(crops, image.channel_names)
    assert (table["area"] == 24 * 24).all() and table["touches_border"].isna().all()
    ch = image.channel_names[2]
    np.testing.assert_allclose(table[f"intensity_p90_{ch}"],
                               np.percentile(crops[:, 2].reshape(6, -1), 90, axis=1))  # fmt: skip


@pytest.fixture(scope="module")
def imc_store(imc, tmp_path_factory):
    """The IMC sample embedded with the default model on CPU (every level)."""
    image, labels = imc
    out = tmp_path_factory.mktemp("measure") / "imc.zarr"
    return run_embedding([image], out, EmbedJob(dtype="float32", device="cpu"), [labels])


def test_store_round_trip(imc_store, imc):
    image, labels = imc
    names = list(image.channel_names)
    store = imc_store.store
    g = read_level(store, "global")
    feats = g.uns["maeprobe"]["feature_names"]
    assert feats == baseline_features(names)
    X = g.obsm[FEATURES_KEY]
    assert X.shape == (g.n_obs, len(feats)) and not np.isnan(X).any()
    ids = g.obs["cell_id"].to_numpy(np.int64)
    areas = np.array([(labels == i).sum() for i in ids])
    np.testing.assert_array_equal(X[:, feats.index("area")], areas)
    np.testing.assert_array_equal(g.obs["cell_area"], areas)
    ch = names[1]
    means = np.array([image.to_numpy()[1][labels == i].mean() for i in ids])
    np.testing.assert_allclose(g.obs[channel_column("mean_intensity", ch)], means, rtol=1e-5)
    np.testing.assert_allclose(X[:, feats.index(f"intensity_mean_{ch}")], means, rtol=1e-5)
    border = g.obs["touches_border"].to_numpy(bool)
    assert set(ids[border]) == _border_ids(labels)
    assert (g.obs["cells_in_image"] == len(ids)).all()
    stats = np.asarray(store.image_info()[0]["normalization_stats"])
    assert (g.obs[channel_column("norm_high", ch)] == stats[1, 1]).all()
    # the channel level: the row's own channel
    c = read_level(store, "channel")
    first = c.obs[c.obs["cell_id"] == ids[0]]
    np.testing.assert_allclose(first["mean_intensity"], [X[0, feats.index(f"intensity_mean_{n}")]
                                                         for n in names], rtol=1e-6)  # fmt: skip
    assert c.obs["channel_empty"].notna().all()
    # a channel with no pixel above zero in a cell's mask is empty there (raw data: the crop's
    # normalised values are then all zero)
    raw_max = {(i, n): image.to_numpy()[k][labels == i].max() for i in ids
               for k, n in enumerate(names)}  # fmt: skip
    dark = np.array([raw_max[(i, n)] == 0 for i, n in zip(c.obs["cell_id"], c.obs["channel"])])
    assert dark.any() and c.obs["channel_empty"].to_numpy(bool)[dark].all()
    # the patch level: crop padding, the fraction of the crop outside the image
    p = read_level(store, "patch")
    origins = store.read_cells("origins", 0)
    size = store.facts["crop_size"]
    ones = np.ones((1, *labels.shape), dtype=np.float32)
    cut = cell_crops(ones, labels, tuple(size), ids=origins[0]).crops[:, 0]
    expected = dict(zip(origins[0], 1.0 - cut.mean(axis=(1, 2))))
    got = p.obs.groupby("cell_id", observed=True)["crop_padding"].first()
    np.testing.assert_allclose(got.to_numpy(), [expected[i] for i in got.index], rtol=1e-6)
    assert {"mean_intensity", "channel_empty", "touches_border"} <= set(p.obs.columns)


def test_save_analysis_keeps_features_out(imc_store):
    store = EmbeddingStore(imc_store.store.path, mode="a")
    g = read_level(store, "global")
    g.obsm["X_pca"] = np.zeros((g.n_obs, 2), dtype=np.float32)
    with store.lock():
        save_analysis(store, g)
    arrays, _, _ = store.read_analysis("global")
    assert "X_pca" in arrays and FEATURES_KEY not in arrays
    again = read_level(store, "global")
    np.testing.assert_array_equal(again.obsm[FEATURES_KEY], g.obsm[FEATURES_KEY])


def test_exclude_border_drops_exactly_the_border_cells(imc, tmp_path, capsys):
    from napari_maeprobe.cli import main

    image, labels = imc
    root = Path(image.source[0]).parent.parent
    out = tmp_path / "border.zarr"
    rc = main(["embed", str(root / "img" / Path(image.source[0]).name), "--labels",
               str(root / "masks_deepcell"), "--levels", "global", "--exclude-border",
               "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert rc == 0
    border = _border_ids(labels)
    kept = set(np.unique(labels[labels > 0]).tolist()) - border
    g = read_level(EmbeddingStore(out), "global")
    assert set(g.obs["cell_id"].astype(int)) == kept
    assert not g.obs["touches_border"].to_numpy(bool).any()
    err = capsys.readouterr().err
    assert f"{len(border)} of {len(kept) + len(border)} cells touch the image border" in err


def test_an_image_of_border_cells_only_is_a_one_line_skip(imc):
    image, labels = imc
    only_border = np.where(np.isin(labels, list(_border_ids(labels))), labels, 0)
    job = EmbedJob(exclude_border=True)
    with pytest.raises(NoCellsFoundError) as err:
        plan_image(image, job, only_border, (128, 128), (16, 16))
    assert "touch the image border" in str(err.value) and "\n" not in str(err.value)
    kept = plan_image(image, EmbedJob(), only_border, (128, 128), (16, 16))
    assert len(kept.cell_ids) == len(_border_ids(labels)) and kept.excluded_border == 0


def test_a_store_without_features_still_reads(sample_dir):
    store = EmbeddingStore(sample_dir / "embeddings" / "imc_default.zarr")
    g = read_level(store, "global")
    assert FEATURES_KEY not in g.obsm and "feature_names" not in g.uns["maeprobe"]
    assert g.n_obs > 0


def test_tiles_and_crop_stacks_through_the_pipeline(imc, tmp_path):
    from napari_maeprobe.io.crops import CropStack
    from napari_maeprobe.io.samples import load_sample

    tiled, _ = load_sample("examplehuman")  # 512 x 512: 6 x 6 tiles of 96, the last ones padded
    job = EmbedJob(levels=("global", "channel"), segmentation="none", crop_size=96,
                   device="cpu")  # fmt: skip
    tiles = read_level(run_embedding([tiled], tmp_path / "t.zarr", job).store, "global")
    spatial = np.asarray(tiled.spatial_shape)
    origins = tile_origins(tuple(spatial), (96, 96))
    inside = np.minimum(origins + 96, spatial) - origins
    np.testing.assert_array_equal(tiles.obs["cell_area"], inside.prod(axis=1))
    np.testing.assert_allclose(tiles.obs["crop_padding"], 1 - inside.prod(axis=1) / 96**2)
    on_edge = (origins == 0).any(axis=1) | (origins + 96 >= spatial).any(axis=1)
    np.testing.assert_array_equal(tiles.obs["touches_border"].to_numpy(bool), on_edge)
    assert tiles.obsm[FEATURES_KEY].shape == (
        len(origins),
        len(baseline_features(tiled.channel_names)),
    )
    assert 0 < on_edge.sum() < len(origins)
    # a crop stack: each crop one cell, measured whole; no source image, so no padding/border
    image, labels = imc
    ids = np.unique(labels[labels > 0])[:5]
    crops = cell_crops(image.to_numpy(), labels, 24, ids=ids).crops
    stack = CropStack(crops, list(image.channel_names), "imc_crops")
    job = EmbedJob(levels=("global", "channel"), device="cpu")
    crop_store = run_embedding([stack], tmp_path / "c.zarr", job).store
    g = read_level(crop_store, "global")
    assert g.obs["crop_padding"].isna().all() and g.obs["touches_border"].isna().all()
    assert (g.obs["cell_area"] == 24 * 24).all()
    ch = image.channel_names[0]
    np.testing.assert_allclose(g.obs[channel_column("mean_intensity", ch)],
                               crops[:, 0].mean(axis=(1, 2)), rtol=1e-5)  # fmt: skip
    c = read_level(crop_store, "channel")
    assert c.obs["channel_empty"].notna().all() and "mean_intensity" in c.obs


@pytest.mark.gui
@pytest.mark.skipif(
    not os.environ.get("DISPLAY") and sys.platform.startswith("linux"),
    reason="needs a display: run the tests with scripts/test.sh (Xvfb)",
)
def test_embed_dock_border_checkbox(make_napari_viewer):
    from napari_maeprobe._napari import widgets

    embed = widgets.EmbedWidget(make_napari_viewer())
    assert embed.border_check.isChecked() is False
    assert embed.current_job().exclude_border is False
    embed.border_check.setChecked(True)
    assert embed.current_job().exclude_border is True
    assert "border" in embed.border_check.text() and "--" not in embed.border_check.text()
