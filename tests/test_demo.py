"""`maeprobe demo` on the bundled samples: segmentation, the store, the analysis, the .h5ad
export, the report, and its napari view."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_maeprobe.demo import run_demo, show_demo
from napari_maeprobe.schema import OBS_COLUMNS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), method="builtin")


def test_demo_writes_labels_boundaries_and_overlays(demo):
    out = demo.out_dir
    summary = pd.read_csv(out / "segmentation" / "segmentation_summary.csv")
    assert list(summary.dataset) == [
        "alsf_cellpainting_6ch",
        "cellprofiler_examplehuman_3ch",
        "imc_bodenmiller_5ch",
        "cells3d_nuclei_3d_labels",
    ]
    for _, row in summary.iterrows():
        labels = tifffile.imread(out / "segmentation" / f"{row['image']}_labels.tif")
        assert labels.max() == row.n_cells > 0
        boundary = tifffile.imread(out / "segmentation" / f"{row['image']}_boundary.tif")
        assert boundary.shape == labels.shape
        assert (out / f"overlay_{row['image']}.png").is_file()
    assert not any(p.name.startswith(".") for p in out.glob("*"))  # no temporary files left


def test_demo_h5ad_has_every_level_and_contract_column_and_clusters_in_scanpy(demo):
    import scanpy as sc

    adata = sc.read_h5ad(demo.out_dir / "embeddings.h5ad")
    n2d = demo.summary[demo.summary.dataset != "cells3d_nuclei_3d_labels"].n_cells.sum()
    counts = adata.obs["level"].value_counts()
    assert counts["global"] == n2d
    n_imc = (adata.obs.query("level == 'global'").dataset == "imc_bodenmiller_5ch").sum()
    n_cells = dict(zip(demo.summary.dataset, demo.summary.n_cells))
    channels = {"alsf_cellpainting_6ch": 6, "cellprofiler_examplehuman_3ch": 3}
    assert counts["channel"] == sum(n_cells[d] * c for d, c in channels.items()) + n_imc * 5
    assert counts["patch"] == counts["channel"] * 64  # 96-px crops, 12-px patches
    assert set(OBS_COLUMNS) | {"leiden"} <= set(adata.obs.columns)
    assert adata.X.dtype == np.float32 and np.isfinite(adata.X).all()
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["X_umap"]).all()  # every row analysed in the demo
    meta = adata.uns["maeprobe"]
    assert meta["model"] == "default" and len(meta["weights_sha256"]) == 64
    assert "crop_size" in meta and "masking" in meta and meta["package_version"]
    glob = adata[adata.obs.level == "global"].copy()
    assert glob.obs.channel.isna().all() and glob.obs.patch_row.isna().all()
    sc.pp.neighbors(glob, use_rep="X")
    sc.tl.leiden(glob, flavor="igraph", n_iterations=2, key_added="leiden_scanpy")
    assert glob.obs["leiden_scanpy"].nunique() > 1
    patch = adata[adata.obs.level == "patch"]
    assert patch.obs.patch_row.between(0, 7).all() and patch.obs.foreground.any()


def test_demo_report_shows_umaps_by_channel_position_dataset_cluster_and_diagnostics(demo):
    html = (demo.out_dir / "report.html").read_text()
    pngs = set(re.findall(r'src="([^"]+\.png)"', html))
    for column in ("channel", "patch_row", "patch_col", "dataset", "leiden"):
        assert f"umap_patch_{column}.png" in pngs
    assert "umap_global_dataset.png" in pngs and "drivers_patch.png" in pngs
    for png in pngs:
        assert (demo.out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for a in demo.analysis.values():
        assert a["verdict"] in html.replace("&#x27;", "'")
        assert a["effective_rank"] > 1
    # on the bundled data, patch clusters follow position within the crop (what the report
    # must tell the user) more than anything biological
    assert re.match(r"clusters (weakly )?follow patch_(row|col) \(patch position",
                    demo.analysis["patch"]["verdict"])  # fmt: skip


@pytest.mark.regression
def test_regression_demo_cell_counts(demo):
    """Regression test: the cell counts of the last accepted run of the built-in segmentation
    on the bundled samples (a change shows up here; agreement with reference masks is
    tested in test_segmentation.py)."""
    n_cells = dict(zip(demo.summary.dataset, demo.summary.n_cells))
    assert n_cells["alsf_cellpainting_6ch"] == 40
    assert n_cells["cellprofiler_examplehuman_3ch"] == 346


@pytest.mark.gui
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (scripts/test.sh)")
def test_demo_gui_opens_images_cells_and_the_linked_explorer(demo, qtbot):
    from napari_maeprobe._napari.hub import hub_for

    viewer = show_demo(demo, run=False)
    try:
        names = [ly.name for ly in viewer.layers]
        assert names[:6] == ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]
        first = demo.segmented[0]
        cells = viewer.layers[f"{first.image.name} cells"]
        assert cells.data.max() == first.segmentation.n_cells
        np.testing.assert_array_equal(
            viewer.layers[f"{first.image.name} boundaries"].data > 0, first.boundary
        )
        explorer = hub_for(viewer).explorer
        qtbot.waitUntil(lambda: explorer.data is not None, timeout=60_000)
        assert explorer.data.n == demo.rows["patch"]
        # linked: selecting one cell's patch rows lights them up on the Cell Painting field
        obs = explorer.data.obs
        rows = np.flatnonzero(((obs.image == first.image.name) & (obs.cell_id == 1)).to_numpy())
        explorer.scatter.select(rows)
        qtbot.waitUntil(lambda: f"{first.image.name} selected patches" in viewer.layers)
        assert viewer.layers[f"{first.image.name} selected patches"].data.any()
    finally:
        viewer.close()
