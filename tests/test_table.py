"""The observation table (one AnnData per level) and the defects of the glue it replaced: per-cell
maps keyed by cell (not by another level's rows), tiles that cover the image, one foreground
rule, per-crop mask seeds, a partly analysed store that exports, one colour policy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.schema import BY_NAME, COLUMNS, OBS_COLUMNS, column_kind
from napari_maeprobe.table import read_level, read_levels


@pytest.fixture(scope="module")
def patch_only_store(imc, tmp_path_factory):
    """A store embedded with the patch level only, with attention maps and random masks."""
    image, labels = imc
    out = tmp_path_factory.mktemp("patch_only") / "p.zarr"
    job = EmbedJob(levels=("patch",), attention=True, masking="random", mask_ratio=0.5)
    return run_embedding([image], out, job, [labels], per_unit=16).store


def test_per_cell_maps_are_keyed_by_cell_without_a_global_level(patch_only_store, imc):
    """Before: attention, masks and origins found their cell ids through the global level's
    rows, so a patch-only store had no attention overlays and no attention IoU."""
    from napari_maeprobe.pl.linking import ExplorerData
    from napari_maeprobe.pl.overlays import cell_attention
    from napari_maeprobe.tl.evaluate import evaluate_store

    image, labels = imc
    store = patch_only_store
    assert store.levels() == ["patch"]
    cells = store.cell_table()
    expected = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(np.sort(cells["cell_id"].to_numpy()), expected)
    ids, att = store.read_cells("attention", 0)
    assert len(ids) == len(att) == len(expected)

    adata = read_level(store, "patch")
    adata.obsm["X_umap"] = np.zeros((adata.n_obs, 2), np.float32)
    data = ExplorerData(adata, tuple(store.facts["patch_size"]),
                        tuple(store.facts["crop_size"]), store=store)  # fmt: skip
    cell = int(expected[10])
    pasted = cell_attention(data, image.name, np.array([cell]), labels.shape, labels)
    assert pasted is not None
    # the map lands on the cell itself (found through its crop origin), nowhere else
    assert pasted[labels == cell].max() == 1.0
    assert not pasted[labels != cell].any()

    res = evaluate_store(store)
    assert res["cells"]["attention_iou"]["cells"] == len(expected)


def test_masks_are_seeded_per_crop_whatever_the_unit_layout(patch_only_store, imc, tmp_path):
    """Each crop's mask depends on its index in the job only: another unit layout gives the
    same mask per cell, masks differ between cells, and the stored mask is the one the
    masking function gives for that crop's seed."""
    from napari_maeprobe.pp.masking import make_mask

    image, labels = imc
    job = EmbedJob(levels=("patch",), attention=True, masking="random", mask_ratio=0.5)
    other = run_embedding([image], tmp_path / "o.zarr", job, [labels], per_unit=40).store
    ids_a, masks_a = patch_only_store.read_cells("mask", 0)
    ids_b, masks_b = other.read_cells("mask", 0)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(masks_a, masks_b)
    assert len({m.tobytes() for m in masks_a}) > len(masks_a) // 2
    grid = masks_a.shape[1:]
    assert masks_a.reshape(len(masks_a), -1).sum(axis=1).tolist() == [
        int(np.prod(grid)) // 2
    ] * len(masks_a)
    for k in (0, 7, len(masks_a) - 1):
        want = make_mask("random", grid, 1, 0.5, seed=job.seed * 1_000_003 + k)[0].numpy()
        np.testing.assert_array_equal(masks_a[k], want)


def test_tiling_without_segmentation_covers_every_pixel(tmp_path):
    """Before: the plan counted tiles at 224 px and the cutter used the model's 96 px, so the
    1080x1080 Cell Painting field gave 25 of its 144 tiles (nothing below y = 240)."""
    image, _ = load_sample("cellpainting")
    assert tuple(image.spatial_shape) == (1080, 1080)
    job = EmbedJob(segmentation="none", levels=("global",))
    store = run_embedding([image], tmp_path / "tiles.zarr", job).store
    table = read_level(store, "global")
    size = tuple(store.facts["crop_size"])
    _, origins = store.read_cells("origins", 0)
    assert size == (96, 96) and table.n_obs == 144 == (-(-1080 // 96)) ** 2
    covered = np.zeros((1080, 1080), dtype=bool)
    for y, x in origins:
        covered[y : y + size[0], x : x + size[1]] = True
    assert covered.all()
    assert table.obs["centroid_y"].max() > 1000


def test_foreground_is_the_image_otsu_rule(patch_only_store, imc):
    """One definition: a patch is foreground when its mean normalised intensity is above
    Otsu's threshold of the image's patch-sized block means for its channel (checked with
    scikit-image's block_reduce and Otsu, on pixels normalised here from the recorded
    statistics). Before, the crop set's own Otsu was overwritten by an image-level one."""
    from skimage.filters import threshold_otsu
    from skimage.measure import block_reduce

    image, _ = imc
    store = patch_only_store
    info = store.image_info()[0]
    stats = np.asarray(info["normalization_stats"], dtype=np.float64)
    data = image.to_numpy().astype(np.float64)
    lo, hi = stats[:, 0, None, None], stats[:, 1, None, None]
    norm = np.clip((data - lo) / (hi - lo), 0, 1)
    adata = read_level(store, "patch")
    obs = adata.obs
    for c, name in enumerate(image.channel_names):
        p = tuple(store.facts["patch_size"])
        h, w = (s - s % q for s, q in zip(norm[c].shape, p))
        t = threshold_otsu(block_reduce(norm[c][:h, :w], p, np.mean).ravel())
        rows = (obs["channel"] == name).to_numpy()
        intensity = obs["patch_intensity"].to_numpy()[rows]
        flags = obs["foreground"].to_numpy(dtype=bool)[rows]
        clear = np.abs(intensity - t) > 1e-4  # away from float32 rounding at the threshold
        assert clear.sum() > 0.95 * rows.sum()
        np.testing.assert_array_equal(flags[clear], intensity[clear] > t)
        assert 0 < flags.mean() < 1


def test_partly_analysed_store_exports_every_level(tmp_path, imc):
    """Before: `analyze --levels patch` then an h5ad export of every level crashed in h5py
    (the `analysed` column held booleans at one level and nothing at the others)."""
    import anndata as ad

    from napari_maeprobe.io.export import export_store
    from napari_maeprobe.tl.analyze import AnalysisSettings, analyze_store

    image, labels = imc
    store = run_embedding([image], tmp_path / "s.zarr", EmbedJob(), [labels]).store
    analyze_store(store, ["channel"], AnalysisSettings(umap_max_fit=500))
    path = export_store(store, "h5ad", tmp_path / "x.h5ad")
    back = ad.read_h5ad(path)
    levels = back.obs["level"].astype(str)
    assert set(levels) == {"global", "channel", "patch"}
    analysed = back.obs["analysed"]
    assert analysed[(levels == "channel").to_numpy()].notna().all()
    assert analysed[(levels != "channel").to_numpy()].isna().all()
    assert back.obsm["X_umap"].shape == (back.n_obs, 2)
    assert np.isnan(back.obsm["X_umap"][(levels == "patch").to_numpy()]).all()
    assert back.uns["maeprobe"]["complete"]


def test_read_levels_keeps_every_schema_column_in_order(patch_only_store):
    adata = read_levels(patch_only_store)
    assert list(adata.obs.columns[: len(OBS_COLUMNS)]) == list(OBS_COLUMNS)
    for col in OBS_COLUMNS:
        want = BY_NAME[col].dtype
        got = adata.obs[col].dtype
        assert (str(got) == want) or (want == "category" and isinstance(got, pd.CategoricalDtype))
    assert adata.uns["maeprobe"]["model"] == "default"
    assert len(adata.uns["image_colors"]) == len(adata.obs["image"].cat.categories)


def test_schema_kinds_drive_diagnostics_and_colours():
    """The schema's kind of a column is what the diagnostics and the colour policy use."""
    from napari_maeprobe.pl.colors import color_kind
    from napari_maeprobe.tl.diagnostics import column_kind_of

    assert {c.kind for c in COLUMNS} <= {"identifier", "categorical", "ordinal", "continuous",
                                         "flag"}  # fmt: skip
    row = pd.Series(np.arange(12).repeat(3))
    assert column_kind("patch_row", row) == "ordinal"
    assert color_kind("patch_row", row) == "ordinal"
    assert column_kind_of("patch_row", row) == "position"
    ids = pd.Series(np.arange(500))
    assert column_kind("cell_id", ids) == "identifier" == column_kind_of("cell_id", ids)
    # user metadata: inferred from the values
    assert column_kind("condition", pd.Series(["DMSO", "drug"] * 5)) == "categorical"
    assert column_kind("dose_um", pd.Series(np.linspace(0, 1, 50))) == "continuous"
