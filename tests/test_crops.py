"""Crop stacks as an input: (N, C, [Z,] Y, X) arrays of single-cell crops, embedded without
segmentation (one crop, one cell), from .npy, .zarr and multi-page TIFF.

Inputs: the 13 real HPA single-cell crops (224x224x4 uint8, channels red, green, blue, yellow)
stacked into one array, and 32x32 crops cut around the cells of a real IMC region with its
shipped DeepCell mask, with a per-cell table in row order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE, SHARED, maeprobe
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.crops import fit_crops, read_crops, resolve_fit

HPA_CELLS = SHARED / "hpa_if_4ch_localization" / "cells"
HPA_CHANNELS = ["red", "green", "blue", "yellow"]  # the crops' order, from the data's README
IMC = SAMPLE / "imc_bodenmiller_5ch"


def hpa_stack() -> np.ndarray:
    """(13, 4, 224, 224) uint8: the 13 HPA crops, channel axis moved first."""
    if not HPA_CELLS.is_dir():
        pytest.skip("shared HPA data not here")
    cells = [np.load(HPA_CELLS / f"56_F11_1_{i}.npy") for i in range(13)]
    return np.stack([c.transpose(2, 0, 1) for c in cells])


def imc_crops(size: int = 32) -> tuple[np.ndarray, pd.DataFrame, str]:
    """Crops of ``size`` px around each cell of one IMC region (zero outside the region) and a
    per-cell table (label value, area in px) in the same order."""
    import tifffile
    from skimage.measure import regionprops

    name = "20210305_NE_mockData2_001"
    img = tifffile.imread(IMC / "img" / f"{name}.tiff")  # CYX float32
    mask = tifffile.imread(IMC / "masks_deepcell" / f"{name}.tiff")
    h = size // 2
    padded = np.pad(img, ((0, 0), (h, h), (h, h)))
    crops, rows = [], []
    for r in regionprops(mask):
        y, x = (int(round(v)) for v in r.centroid)
        crops.append(padded[:, y : y + size, x : x + size])
        rows.append({"mask_label": str(r.label), "area_px": str(int(r.area))})
    return np.stack(crops), pd.DataFrame(rows), name


def _facts(store) -> dict:
    from napari_maeprobe.embed.store import EmbeddingStore

    return EmbeddingStore(store).facts


# ------------------------------------------------------------------------------ reading


def test_read_crops_axes_given_in_any_order(tmp_path):
    stack = hpa_stack()
    np.save(tmp_path / "nyxc.npy", stack.transpose(0, 2, 3, 1))
    got = read_crops(tmp_path / "nyxc.npy", axes="NYXC", channel_names=HPA_CHANNELS)
    assert got.axes == "NCYX" and got.n_crops == 13 and got.spatial_shape == (224, 224)
    np.testing.assert_array_equal(got.to_numpy(), stack)
    assert got.channel_names == HPA_CHANNELS


def test_read_crops_axes_from_the_files_own_metadata(tmp_path):
    import tifffile
    import zarr

    stack = hpa_stack()
    tifffile.imwrite(tmp_path / "crops.tif", stack, imagej=True, metadata={"axes": "TCYX"})
    got = read_crops(tmp_path / "crops.tif")
    assert got.source_axes == "NCYX"
    np.testing.assert_array_equal(got.to_numpy(), stack)
    arr = zarr.open_array(str(tmp_path / "crops.zarr"), mode="w", shape=stack.shape,
                          dtype=stack.dtype, zarr_format=2)  # fmt: skip
    arr[...] = stack
    arr.attrs["_ARRAY_DIMENSIONS"] = ["n", "c", "y", "x"]
    np.testing.assert_array_equal(read_crops(tmp_path / "crops.zarr").to_numpy(), stack)


def test_read_crops_refuses_to_guess(tmp_path):
    np.save(tmp_path / "crops.npy", hpa_stack())
    with pytest.raises(MaeprobeInputError, match="does not record its axes") as err:
        read_crops(tmp_path / "crops.npy")
    assert "--axes NCYX" in err.value.fix
    with pytest.raises(MaeprobeInputError, match="do not fit a 4D crop stack"):
        read_crops(tmp_path / "crops.npy", axes="ZCYX")


def test_fit_pads_smaller_and_resizes_larger_crops():
    crops, _, _ = imc_crops(32)
    assert resolve_fit((32, 32), (96, 96)) == "pad"
    assert resolve_fit((224, 224), (96, 96)) == "resize"
    out, mask, origins = fit_crops(crops, (96, 96), "pad")
    assert out.shape == (len(crops), 5, 96, 96)
    np.testing.assert_array_equal(out[:, :, 32:64, 32:64], crops)  # centred in zeros
    assert out[:, :, :32].max() == 0 and mask[:, 32:64, 32:64].all() and mask.sum() == (
        len(crops) * 32 * 32)  # fmt: skip
    assert (origins == -32).all()
    big = hpa_stack()[:2]
    small, mask, _ = fit_crops(big, (112, 112), "resize")
    # a 2x downsizing by linear interpolation keeps the mean intensity of each channel
    np.testing.assert_allclose(small.mean(axis=(2, 3)), big.mean(axis=(2, 3)), rtol=0.02)
    with pytest.raises(MaeprobeInputError, match="--crop-fit resize"):
        resolve_fit((224, 224), (96, 96), "pad")


# ------------------------------------------------------------------------------ embedding


def test_cli_npy_stack_without_axes_is_no_longer_one_z_stack(tmp_path):
    """Before, a (13, 4, 224, 224) .npy was read as a z-stack, max-projected and embedded as
    ONE cell with exit 0."""
    np.save(tmp_path / "hpa.npy", hpa_stack())
    res = maeprobe("embed", str(tmp_path / "hpa.npy"), "--out", str(tmp_path / "s.zarr"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--axes NCYX" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


def test_cli_embeds_every_hpa_crop_as_one_cell(tmp_path):
    np.save(tmp_path / "hpa.npy", hpa_stack())
    store, out = tmp_path / "hpa.zarr", tmp_path / "hpa.parquet"
    res = maeprobe("embed", str(tmp_path / "hpa.npy"), "--axes", "NCYX", "--channel-names",
                   ",".join(HPA_CHANNELS), "--levels", "global,channel",
                   "--out", str(store))  # fmt: skip
    assert res.returncode == 0, res.stderr
    facts = _facts(store)
    assert facts["crop_fit"] == "resize" and facts["segmentation"] == "crops"  # 224 > 96
    res = maeprobe("export", str(store), "--format", "parquet", "--level", "global",
                   "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    obs = pd.read_parquet(out)
    assert obs["cell_id"].tolist() == list(range(13))
    assert set(obs["segmentation"]) == {"crops"} and set(obs["image"]) == {"hpa"}
    emb = obs[[c for c in obs if c.startswith("e") and c[1:].isdigit()]].to_numpy()
    assert np.isfinite(emb).all() and len(np.unique(emb.round(3), axis=0)) == 13


def test_cli_crops_with_cell_table_in_row_order(tmp_path):
    crops, table, _ = imc_crops(32)
    np.save(tmp_path / "imc_crops.npy", crops)
    table.to_csv(tmp_path / "cells.csv", index=False)
    store, out = tmp_path / "imc.zarr", tmp_path / "imc.csv"
    res = maeprobe("embed", str(tmp_path / "imc_crops.npy"), "--axes", "NCYX",
                   "--cell-metadata", str(tmp_path / "cells.csv"), "--levels", "global",
                   "--out", str(store))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"cell metadata: joined on row order ({len(crops)} of {len(crops)} crops" in res.stdout
    assert _facts(store)["crop_fit"] == "pad"
    assert maeprobe("export", str(store), "--format", "csv", "--out", str(out)).returncode == 0
    obs = pd.read_csv(out, dtype={"mask_label": str, "area_px": str})
    assert obs["mask_label"].tolist() == table["mask_label"].tolist()
    assert obs["area_px"].tolist() == table["area_px"].tolist()


def test_cell_table_of_the_wrong_length_and_boundary_masking_are_refused(tmp_path):
    crops, table, _ = imc_crops(32)
    np.save(tmp_path / "c.npy", crops)
    table.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    res = maeprobe("embed", str(tmp_path / "c.npy"), "--axes", "NCYX", "--cell-metadata",
                   str(tmp_path / "short.csv"), "--out", str(tmp_path / "a.zarr"))  # fmt: skip
    assert res.returncode == 2 and f"has {len(crops)} crops" in res.stderr
    res = maeprobe("embed", str(tmp_path / "c.npy"), "--axes", "NCYX", "--masking", "boundary",
                   "--out", str(tmp_path / "b.zarr"))  # fmt: skip
    assert res.returncode == 2 and "--masking random" in res.stderr
    res = maeprobe("embed", str(tmp_path / "c.npy"), "--axes", "NCYX", "--crop-size", "24",
                   "--crop-fit", "pad", "--out", str(tmp_path / "c.zarr"))  # fmt: skip
    assert res.returncode == 2 and "--crop-fit resize" in res.stderr


def test_library_run_embedding_accepts_a_crop_stack(tmp_path):
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.table import read_level

    crops, table, _ = imc_crops(32)
    np.save(tmp_path / "c.npy", crops)
    stack = read_crops(tmp_path / "c.npy", axes="NCYX").with_fit("resize")
    res = run_embedding([stack], tmp_path / "s.zarr", EmbedJob(levels=("global",)))
    assert res.rows == {"global": len(crops)} and res.facts["crop_fit"] == "resize"
    adata = read_level(res.store, "global")
    assert adata.obs["cell_id"].tolist() == list(range(len(crops)))


# ------------------------------------------------------------------------------ GUI


@pytest.mark.gui
def test_gui_embeds_a_crop_stack_layer(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """The Embed dock embeds the selected (N, C, Y, X) layer: 13 HPA crops, 13 cells."""
    import os

    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display: run under xvfb-run")
    from qtpy.QtCore import Qt

    from napari_maeprobe._napari import widgets
    from napari_maeprobe.embed.store import EmbeddingStore

    shown: list[str] = []
    monkeypatch.setattr(widgets, "show_error", shown.append)
    viewer = make_napari_viewer()
    stack = hpa_stack()
    viewer.add_image(stack, name="hpa crops", metadata={"channel_names": HPA_CHANNELS})
    data, embed = widgets.DataWidget(viewer), widgets.EmbedWidget(viewer)
    viewer.window.add_dock_widget(data, name="Data and segmentation")
    viewer.window.add_dock_widget(embed, name="Embed")
    for lvl in ("channel", "patch"):
        embed.level_checks[lvl].setChecked(False)
    embed.out_edit.setText(str(tmp_path / "gui.zarr"))
    embed.crops_check.setChecked(True)
    viewer.layers.selection.active = viewer.layers["hpa crops"]
    with qtbot.waitSignal(embed.store_ready, timeout=180_000):
        qtbot.mouseClick(embed.run_button, Qt.MouseButton.LeftButton)
    assert not shown, shown
    store = EmbeddingStore(tmp_path / "gui.zarr")
    assert store.n_rows("global") == 13 and store.facts["crop_fit"] == "resize"
    assert store.read_obs("global")["cell_id"].tolist() == list(range(13))
    # a 2D layer selected: one line that says what to select
    viewer.add_image(stack[0, 0], name="one plane")
    viewer.layers.selection.active = viewer.layers["one plane"]
    embed.run()
    assert shown and "no crop stack is selected" in shown[-1]


def test_cli_crop_fit_without_a_crop_stack_is_refused(tmp_path):
    image = IMC / "img" / "20210305_NE_mockData2_001.tiff"
    res = maeprobe("embed", str(image), "--crop-fit", "pad", "--out", str(tmp_path / "s.zarr"))
    assert res.returncode == 2 and "--axes NCYX" in res.stderr
