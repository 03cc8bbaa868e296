"""`maeprobe demo` on the bundled samples: what it writes, and its napari view."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_maeprobe.demo import run_demo, show_demo
from napari_maeprobe.preprocessing import PATCH_COLUMNS

OBS_COLUMNS = [c for c in PATCH_COLUMNS if c != "crop_index"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), method="builtin")


def test_demo_writes_labels_boundaries_and_patch_table(demo):
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
    patches = pd.read_parquet(out / "patches.parquet")
    assert set(OBS_COLUMNS) <= set(patches.columns)
    assert len(patches) == len(pd.read_csv(out / "patches.csv"))
    # 3D patches only for the z-stack, one row per cell x channel x patch elsewhere
    z = patches[patches.dataset == "cells3d_nuclei_3d_labels"]
    assert (
        z.patch_z.notna().all()
        and patches[patches.dataset != z.dataset.iloc[0]].patch_z.isna().all()
    )
    cp = patches[patches.dataset == "alsf_cellpainting_6ch"]
    assert set(cp.channel) == {"Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"}
    n_cells = summary.set_index("dataset").n_cells["alsf_cellpainting_6ch"]
    assert len(cp) == n_cells * 6 * 64  # 96-px crops, 12-px patches (the default model's grid)
    assert 0 < patches.boundary_fraction.mean() < 1
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temporary files left


def test_demo_embeds_every_2d_cell_at_three_levels(demo):
    out = demo.out_dir
    n2d = demo.summary[demo.summary.dataset != "cells3d_nuclei_3d_labels"].n_cells.sum()
    glob = pd.read_parquet(out / "embeddings_global.parquet")
    chan = pd.read_parquet(out / "embeddings_channel.parquet")
    patch = pd.read_parquet(out / "embeddings_patch.parquet")
    assert len(glob) == n2d and set(glob.level) == {"global"}
    assert len(chan) == 40 * 6 + 346 * 3 + len(glob[glob.dataset == "imc_bodenmiller_5ch"]) * 5
    assert len(patch) == len(chan) * 64
    emb = [f"e{i}" for i in range(144)]
    for table in (glob, chan, patch):
        assert set(OBS_COLUMNS) | {"level"} <= set(table.columns)
        assert np.isfinite(table[emb].to_numpy()).all()
    assert glob.channel.isna().all() and patch.patch_row.between(0, 7).all()
    # the patch rows line up with the patch table: same cells, channels and positions
    key = ["image", "cell_id", "channel", "patch_row", "patch_col"]
    cp_patches = demo.patches[demo.patches.dataset != "cells3d_nuclei_3d_labels"]
    pd.testing.assert_frame_equal(
        patch[key].reset_index(drop=True), cp_patches[key].reset_index(drop=True), check_dtype=False
    )
    # the same cell's global embedding is the mean of its patch tokens over channels and grid
    first = patch[(patch.image == glob.image[0]) & (patch.cell_id == glob.cell_id[0])]
    np.testing.assert_allclose(first[emb].mean().to_numpy(), glob.loc[0, emb].to_numpy(), atol=1e-4)
    info = demo.model
    assert info["model"] == "default" and len(info["weights_sha256"]) == 64


@pytest.mark.gui
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (scripts/test.sh)")
def test_demo_gui_shows_images_labels_and_boundaries(demo, monkeypatch):
    import napari

    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    show_demo(demo)
    viewer = napari.current_viewer()
    try:
        names = [ly.name for ly in viewer.layers]
        assert names[:6] == ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]
        cells = viewer.layers[names[6]]
        assert (
            isinstance(cells, napari.layers.Labels)
            and cells.data.max() == demo.segmented[0].segmentation.n_cells
        )
        assert np.array_equal(viewer.layers[names[7]].data > 0, demo.segmented[0].boundary)
    finally:
        viewer.close()
