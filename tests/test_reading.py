"""Every bundled dataset opens with the right shape, axes and channel names."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_maeprobe import read_image, read_images
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.reading import group_channel_files

CELLPAINTING = ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]
IMC = ["Ag107", "Cytokeratin 5", "Laminin", "YBX1", "H3K27Ac"]


def test_cellpainting_folder_groups_six_channels(sample_dir):
    im = read_image(sample_dir / "alsf_cellpainting_6ch/images/orig")
    assert im.data.shape == (6, 1080, 1080)
    assert im.axes == "CYX" and im.data.dtype == np.uint16
    assert im.channel_names == CELLPAINTING  # from channels.csv two folders up, by file suffix
    assert [p.name for p in im.source] == [f"r03c03f03p01-ch{c}sk1fk1fl1.tiff" for c in range(1, 7)]
    # lazy until asked, and the pixels are the files' pixels
    assert im.data.chunks[0] == (1,) * 6
    dna = tifffile.imread(
        sample_dir / "alsf_cellpainting_6ch/images/orig/r03c03f03p01-ch5sk1fk1fl1.tiff"
    )
    np.testing.assert_array_equal(im.data[4].compute(), dna)


def test_examplehuman_folder(sample_dir):
    im = read_image(sample_dir / "cellprofiler_examplehuman_3ch")
    assert im.data.shape == (3, 512, 512) and im.data.dtype == np.uint8
    assert im.channel_names == ["DNA", "PH3", "cellbody"]  # matched by the 'file' column


def test_imc_file_names_from_panel(sample_dir):
    im = read_image(sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff")
    assert im.data.shape == (5, 87, 103) and im.data.dtype == np.float32
    assert im.axes == "CYX"
    assert im.channel_names == IMC  # panel.csv one folder up, rows with keep == 1


def test_imc_folder_opens_each_region_alone(sample_dir):
    images = read_images(sample_dir / "imc_bodenmiller_5ch/img")
    assert len(images) == 15
    assert all(im.n_channels == 5 and im.channel_names == IMC for im in images)
    masks = read_images(sample_dir / "imc_bodenmiller_5ch/masks_deepcell")
    assert len(masks) == 15 and all(m.n_channels == 1 for m in masks)  # not grouped as channels


def test_3d_nuclei_zyx_is_detected_from_the_data(sample_dir):
    # tifffile reports the axes as QYX (unknown first axis): consecutive planes are alike -> Z
    im = read_image(sample_dir / "cells3d_nuclei_3d_labels/nuclei.tif")
    assert im.data.shape == (1, 60, 256, 256) and im.axes == "CZYX"
    assert im.source_axes == "ZYX"


def test_neubias_zcyx_and_cyx(sample_dir):
    d = sample_dir / "neubias_small_multichannel"
    spots = read_image(d / "xyzc_16bit__spots.tif")
    assert spots.source_axes == "ZCYX" and spots.data.shape == (2, 17, 88, 89)
    assert spots.scale == pytest.approx((0.4, 0.0941, 0.0941), rel=1e-3)  # ImageJ calibration
    cell = read_image(d / "xyc_16bit__cell_dna_mts_actin.tif")
    assert cell.data.shape == (3, 350, 350) and cell.axes == "CYX"
    nup = read_image(d / "xyc_16bit__nup_nuclei.tif")
    assert nup.data.shape == (2, 420, 476)
    labels = read_image(d / "xyc_16bit__nup_nuclei__xy_8bit_labels__nuclei.tif")
    assert labels.data.shape == (1, 420, 476)
    assert set(np.unique(labels.to_numpy())) == {0, 1, 2}


def test_axes_override(sample_dir):
    im = read_image(sample_dir / "neubias_small_multichannel/xyzc_16bit__spots.tif", axes="CZYX")
    assert im.data.shape == (17, 2, 88, 89)  # the user's word wins over the metadata
    with pytest.raises(MaeprobeInputError, match="4 dimensions"):
        read_image(sample_dir / "neubias_small_multichannel/xyzc_16bit__spots.tif", axes="CYX")


def test_channel_names_by_hand(sample_dir):
    im = read_image(
        sample_dir / "neubias_small_multichannel/xyc_16bit__cell_dna_mts_actin.tif",
        channel_names=["DNA", "microtubules", "actin"],
    )
    assert im.channel_names == ["DNA", "microtubules", "actin"]
    with pytest.raises(MaeprobeInputError, match="2 channel names given for 3 channels"):
        read_image(
            sample_dir / "neubias_small_multichannel/xyc_16bit__cell_dna_mts_actin.tif",
            channel_names=["a", "b"],
        )


def test_hpa_per_channel_folder_and_yxc_crops(shared_dir):
    d = shared_dir / "hpa_if_4ch_localization"
    fovs = {im.name: im for im in read_images(d / "fov")}
    assert set(fovs) == {"57_F11_1", "800_A6_1", "89_B5_1"}
    assert fovs["800_A6_1"].data.shape == (4, 2048, 2048)
    assert fovs["57_F11_1"].channel_names == [
        "nucleus",
        "microtubules",
        "protein of interest",
        "endoplasmic reticulum",
    ]
    # JPEG 'blue' file: the signal is in its B plane
    blue = fovs["89_B5_1"].data[0].compute()
    assert blue.max() > 0 and blue.ndim == 2
    crop = read_image(d / "cells/56_F11_1_0.npy")
    assert crop.source_axes == "YXC" and crop.data.shape == (4, 224, 224)
    partial = read_images(d / "fov_partial")
    names = sorted(im.name for im in partial)
    assert names == ["383_D2_1", "383_D2_1_mask"]  # the mask is not taken for a channel
    two = next(im for im in partial if im.name == "383_D2_1")
    assert two.channel_names == ["nucleus", "protein of interest"]


def test_group_channel_files_patterns(tmp_path):
    names = [
        "plate1_A01_DAPI_001.tif",
        "plate1_A01_GFP_001.tif",
        "plate1_A01_DAPI_002.tif",
        "plate1_A01_GFP_002.tif",
    ]
    groups = group_channel_files([tmp_path / n for n in names])
    assert sorted((g[0], tuple(g[2])) for g in groups) == [
        ("plate1_A01_001", ("DAPI", "GFP")),
        ("plate1_A01_002", ("DAPI", "GFP")),
    ]
    explicit = group_channel_files([tmp_path / n for n in names], r"_(?P<channel>[A-Z]+)_")
    assert len(explicit) == 2


def test_ome_tiff_names_and_pixel_size(tmp_path, sample_dir):
    src = read_image(sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData3_001.tiff")
    path = tmp_path / "region.ome.tif"
    tifffile.imwrite(
        path,
        src.to_numpy(),
        ome=True,
        metadata={
            "axes": "CYX",
            "Channel": {"Name": ["Ag", "CK5", "LAM", "YBX", "H3"]},
            "PhysicalSizeX": 1.0,
            "PhysicalSizeY": 1.0,
        },
    )
    im = read_image(path)
    assert im.channel_names == ["Ag", "CK5", "LAM", "YBX", "H3"]
    assert im.scale == (1.0, 1.0) and im.name == "region"
    np.testing.assert_array_equal(im.to_numpy(), src.to_numpy())


def test_ome_zarr(tmp_path, sample_dir):
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    spots = read_image(sample_dir / "neubias_small_multichannel/xyzc_16bit__spots.tif")
    path = tmp_path / "spots.ome.zarr"
    store = parse_url(path, mode="w").store
    root = zarr.group(store=store)
    write_image(
        spots.to_numpy(),
        root,
        axes="czyx",
        metadata={"omero": {"channels": [{"label": "spots_a"}, {"label": "spots_b"}]}},
    )
    im = read_image(path)
    assert im.data.shape == (2, 17, 88, 89) and im.axes == "CZYX"
    np.testing.assert_array_equal(im.to_numpy(), spots.to_numpy())


def test_npy(tmp_path, sample_dir):
    arr = read_image(sample_dir / "cellprofiler_examplehuman_3ch").to_numpy()
    np.save(tmp_path / "yxc.npy", np.moveaxis(arr, 0, -1))
    im = read_image(tmp_path / "yxc.npy")
    assert im.source_axes == "YXC"
    np.testing.assert_array_equal(im.to_numpy(), arr)


def test_large_tiff_is_read_in_chunks(tmp_path, sample_dir, monkeypatch):
    from napari_maeprobe.io import reading

    arr = read_image(sample_dir / "alsf_cellpainting_6ch/images/orig").to_numpy()
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, arr, metadata={"axes": "CYX"}, tile=(256, 256))
    monkeypatch.setattr(reading, "LAZY_CHUNKED_BYTES", 1024)
    im = read_image(path)
    assert len(im.data.chunks[1]) > 1  # tiles, not one piece
    np.testing.assert_array_equal(im.data[4, 300:400, 500:700].compute(), arr[4, 300:400, 500:700])
