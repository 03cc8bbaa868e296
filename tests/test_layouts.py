"""Folders as instruments write them, and bad pixels said plainly (issue 10, items 1 and 7).

Every input is built from real planes (the LINCS Cell Painting plates, the ALSF Cell Painting
field, the Bodenmiller IMC regions, the HPA and ExampleHuman images), renamed, re-saved or
restacked in ``tmp_path`` into the layouts that instruments and pipelines write.
"""

from __future__ import annotations

import shutil
import warnings

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import maeprobe
from napari_maeprobe import read_image, read_images
from napari_maeprobe.errors import MaeprobeInputError

LINCS_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]  # channels.csv, column 'channel'
IMC = ["Ag107", "Cytokeratin 5", "Laminin", "YBX1", "H3K27Ac"]


@pytest.fixture(scope="module")
def lincs(shared_dir):
    return shared_dir / "lincs_cellpainting_a549_dev"


# --------------------------------------------------------------------------- plate trees


def test_plate_tree_is_one_job_with_plate_well_site(lincs):
    """images/<plate>/r01c01f03p01-ch1sk1fk1fl1.png, the same names in both plates."""
    images = read_images(lincs / "images")
    fov = pd.read_csv(lincs / "fov_metadata.csv")
    assert len(images) == len(fov) == 16
    names = {im.name for im in images}
    assert len(names) == 16  # repeated file names in two plates are two images
    assert "SQ00015198/r01c01f03p01" in names and "SQ00015230/r01c01f03p01" in names
    # plate, well and site from folder and Phenix name agree with the screen's own table
    got = {(im.metadata["obs"]["plate"], im.metadata["obs"]["well"], im.metadata["obs"]["site"])
           for im in images}  # fmt: skip
    assert got == {(p, w, int(s)) for p, w, s in zip(fov.plate, fov.well, fov.site)}
    im = next(i for i in images if i.name == "SQ00015230/r16c13f04p01")
    assert im.metadata["obs"] == {"plate": "SQ00015230", "well": "P13", "site": 4}
    assert im.channel_names == LINCS_CHANNELS  # the 'channel' column, not 'target'
    assert im.data.shape == (5, 1080, 1080)
    assert {i.dataset for i in images} == {"lincs_cellpainting_a549_dev"}
    mito = iio.imread(lincs / "images/SQ00015230/r16c13f04p01-ch5sk1fk1fl1.png")
    np.testing.assert_array_equal(im.data[4].compute(), mito)


def test_plate_tree_from_the_command_line(lincs, tmp_path):
    """`maeprobe embed ROOT` reads the tree; two inputs that give one name are refused."""
    from napari_maeprobe.cli import _load_inputs, build_parser

    args = build_parser().parse_args(
        ["embed", str(lincs / "images"), "--channels", "DNA,AGP", "--out", str(tmp_path / "s")]
    )
    images = _load_inputs(args)
    assert len(images) == 16 and all(im.channel_names == ["DNA", "AGP"] for im in images)
    assert images[0].metadata["obs"]["plate"] in ("SQ00015198", "SQ00015230")
    args = build_parser().parse_args(
        ["embed", str(lincs / "images/SQ00015198"), str(lincs / "images/SQ00015230"),
         "--out", str(tmp_path / "s")]
    )  # fmt: skip
    with pytest.raises(MaeprobeInputError, match="two images are named 'r01c01f03p01'"):
        _load_inputs(args)


def test_embed_root_of_a_plate_tree_end_to_end(sample_dir, tmp_path):
    """`maeprobe embed ROOT`: two plate folders with the same Phenix file names (two real IMC
    regions re-saved one marker per file) are one job; rows carry image, plate, well, site."""
    regions = {"PlateA": "20210305_NE_mockData2_001", "PlateB": "20210305_NE_mockData3_001"}
    root = tmp_path / "tree"
    for plate, region in regions.items():
        arr = tifffile.imread(sample_dir / f"imc_bodenmiller_5ch/img/{region}.tiff")
        (root / plate).mkdir(parents=True)
        for c, plane in enumerate(arr[[4, 2, 3]], start=1):
            tifffile.imwrite(root / plate / f"r02c05f01p01-ch{c}sk1fk1fl1.tiff", plane)
    store, csv = tmp_path / "tree.zarr", tmp_path / "tree.csv"
    r = maeprobe("embed", str(root), "--segmentation", "none", "--levels", "global",
                 "--out", str(store), timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = maeprobe("export", str(store), "--format", "csv", "--out", str(csv))
    assert r.returncode == 0, r.stderr
    obs = pd.read_csv(csv)
    got = obs[["image", "plate", "well", "site"]].drop_duplicates()
    assert sorted(map(tuple, got.to_numpy().tolist())) == [
        ("PlateA/r02c05f01p01", "PlateA", "B05", 1),
        ("PlateB/r02c05f01p01", "PlateB", "B05", 1),
    ]


def test_plate_obs_become_observation_columns(lincs):
    from napari_maeprobe.schema import conform

    im = read_images(lincs / "images")[0]
    frame = pd.DataFrame({"image": [im.name] * 3, "cell_id": [1, 2, 3]})
    obs = conform(frame, "global", im.metadata["obs"])
    assert list(obs["plate"]) == [im.name.split("/")[0]] * 3
    assert list(obs["well"]) == [im.metadata["obs"]["well"]] * 3


def test_imagexpress_names_give_well_and_site(tmp_path, sample_dir):
    """ImageXpress <plate>_<well>_s<site>_w<channel>, here the ExampleHuman planes re-saved."""
    src = sorted((sample_dir / "cellprofiler_examplehuman_3ch").glob("*.tif"))
    plate = tmp_path / "Plate7"
    plate.mkdir()
    for w, f in enumerate(src, start=1):
        shutil.copy(f, plate / f"Plate7_B05_s2_w{w}.tif")
    (im,) = read_images(tmp_path)
    assert im.name == "Plate7/Plate7_B05_s2" and im.n_channels == 3
    assert im.metadata["obs"] == {"plate": "Plate7", "well": "B05", "site": 2}
    single = read_image(plate / "Plate7_B05_s2_w1.tif")  # a file given alone: no plate
    assert single.metadata["obs"] == {"well": "B05", "site": 2}


# --------------------------------------------------------------------------- channel spellings


def test_channel_number_and_stain_that_vary_together(lincs, tmp_path):
    """A Cell Painting plate named {well}_01_{channel index}_{site}_{stain}_001.tif: 3 sites x
    5 channels are 3 five-channel images, in channel-index order (not 15 one-channel images)."""
    fields = ["r01c01f03p01", "r01c01f04p01", "r01c13f03p01"]  # real fields standing for sites
    for site, field in enumerate(fields, start=1):
        for ci, stain in enumerate(LINCS_CHANNELS, start=1):
            plane = iio.imread(lincs / f"images/SQ00015198/{field}-ch{ci}sk1fk1fl1.png")
            tifffile.imwrite(tmp_path / f"B02_01_{ci}_{site}_{stain}_001.tif", plane)
    images = read_images(tmp_path)
    assert sorted(im.name for im in images) == ["B02_01_1_001", "B02_01_2_001", "B02_01_3_001"]
    im = next(i for i in images if i.name == "B02_01_2_001")
    assert im.channel_names == LINCS_CHANNELS
    er = iio.imread(lincs / "images/SQ00015198/r01c01f04p01-ch2sk1fk1fl1.png")
    np.testing.assert_array_equal(im.data[1].compute(), er)


def test_whole_file_name_is_the_marker(sample_dir, tmp_path):
    """Multiplexed ion-beam imaging: one folder per field, one file per marker (AR.tif, ...).
    Two IMC regions split into one file per marker stand for two MIBI fields."""
    regions = {"Point1": "20210305_NE_mockData2_001", "Point2": "20210305_NE_mockData3_002"}
    for field, region in regions.items():
        arr = tifffile.imread(sample_dir / f"imc_bodenmiller_5ch/img/{region}.tiff")
        (tmp_path / field).mkdir()
        for marker, plane in zip(IMC, arr):
            tifffile.imwrite(tmp_path / field / f"{marker}.tif", plane)
    images = {im.name: im for im in read_images(tmp_path)}
    assert set(images) == {"Point1", "Point2"}  # named by the field's folder: no collision
    for field, region in regions.items():
        arr = tifffile.imread(sample_dir / f"imc_bodenmiller_5ch/img/{region}.tiff")
        im = images[field]
        order = [IMC.index(n) for n in im.channel_names]
        assert sorted(im.channel_names) == sorted(IMC)
        np.testing.assert_array_equal(im.to_numpy(), arr[order])
    (alone,) = read_images(tmp_path / "Point1")
    assert alone.name == "Point1" and alone.n_channels == 5


def test_unrecognised_channel_files_are_refused_with_a_pattern(sample_dir, tmp_path):
    """Four Cell Painting planes saved under dye names the reader does not know (AF405, ...):
    refused with a --channel-pattern that groups them, not read as four images."""
    orig = sample_dir / "alsf_cellpainting_6ch/images/orig"
    dyes = {"AF405": 5, "AF488": 2, "AF568": 3, "AF647": 4}
    for dye, ch in dyes.items():
        shutil.copy(orig / f"r03c03f03p01-ch{ch}sk1fk1fl1.tiff", tmp_path / f"C03_s3_{dye}.tif")
    with pytest.raises(MaeprobeInputError, match="--channel-pattern") as err:
        read_images(tmp_path)
    assert "look like the channels of 1 image" in str(err.value)
    pattern = str(err.value).split("--channel-pattern '")[1].split("'")[0]
    (im,) = read_images(tmp_path, channel_pattern=pattern)  # the advice works as given
    assert im.n_channels == 4 and sorted(im.channel_names) == sorted(dyes)


def test_same_size_images_that_are_not_channels_stay_apart(lincs, tmp_path):
    """Same-size single-plane images named as a numbered series or by tile / sample index are
    separate images: neither grouped as channels nor refused (real LINCS DNA planes)."""
    planes = sorted((lincs / "images/SQ00015198").glob("*-ch1sk1fk1fl1.png"))[:4]
    layouts = {
        "series": [f"DSC{34 + k:04d}.png" for k in range(4)],
        "samples": [f"sample{k}_{r}.png" for k in (1, 2) for r in (1, 2)],
        "tiles": [f"scan_x{x}_y{y}.png" for x in (0, 1) for y in (0, 1)],
    }
    for layout, names in layouts.items():
        folder = tmp_path / layout
        folder.mkdir()
        for src, name in zip(planes, names):
            shutil.copy(src, folder / name)
        images = read_images(folder)
        assert len(images) == 4 and all(im.n_channels == 1 for im in images), layout


def test_channel_table_channel_column_over_target(lincs, tmp_path):
    from napari_maeprobe.io.channels import read_channel_table

    table = read_channel_table(lincs / "channels.csv")
    assert list(table["name"]) == list(pd.read_csv(lincs / "channels.csv")["channel"])


# --------------------------------------------------------------------------- bad pixels


def _flip_strip_bytes(path):
    """Invert 64 bytes in the middle of every strip of a real LZW TIFF (headers intact)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == 5  # LZW
        spans = list(zip(page.dataoffsets, page.databytecounts))
    raw = bytearray(path.read_bytes())
    for off, cnt in spans:
        for k in range(off + cnt // 2, off + cnt // 2 + 64):
            raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_lzw_tiff_is_one_line_naming_the_file(sample_dir, tmp_path):
    folder = tmp_path / "orig"
    shutil.copytree(sample_dir / "alsf_cellpainting_6ch/images/orig", folder)
    bad = folder / "r03c03f03p01-ch5sk1fk1fl1.tiff"
    _flip_strip_bytes(bad)
    im = read_image(folder)  # headers are fine: found when pixels are read
    with pytest.raises(MaeprobeInputError, match="r03c03f03p01-ch5sk1fk1fl1.tiff: the pixel data"):
        im.to_numpy()
    single = tmp_path / "single.tiff"
    shutil.copy(bad, single)
    with pytest.raises(MaeprobeInputError, match="single.tiff: the pixel data cannot be decoded"):
        read_image(single).to_numpy()
    r = maeprobe("segment", str(folder), "--out", str(tmp_path / "seg"), timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "ch5sk1fk1fl1.tiff" in ln]
    assert len(lines) == 1 and "pixel data cannot be decoded" in lines[0]


def test_corrupt_tile_of_a_large_tiff_is_one_line(sample_dir, tmp_path, monkeypatch):
    """TIFFs over the size limit are read tile by tile: a damaged tile is found there."""
    from napari_maeprobe.io import reading

    arr = read_image(sample_dir / "cellprofiler_examplehuman_3ch").to_numpy()
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, arr, metadata={"axes": "CYX"}, tile=(128, 128), compression="lzw")
    with tifffile.TiffFile(path) as tif:
        off, cnt = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    raw = bytearray(path.read_bytes())
    for k in range(off + cnt // 3, off + cnt // 3 + 40):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(reading, "LAZY_CHUNKED_BYTES", 1024)
    im = read_image(path)
    assert len(im.data.chunks[1]) == 4  # tile by tile
    np.testing.assert_array_equal(im.data[1:, :128].compute(), arr[1:, :128])  # intact tiles
    with pytest.raises(MaeprobeInputError, match="tiled.tif: the pixel data cannot be decoded"):
        im.to_numpy()


def test_truncated_png_is_one_line_naming_the_file(lincs, tmp_path):
    for f in (lincs / "images/SQ00015198").glob("r01c01f03p01-*.png"):
        shutil.copy(f, tmp_path / f.name)
    cut = tmp_path / "r01c01f03p01-ch3sk1fk1fl1.png"
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    im = read_image(tmp_path)
    with pytest.raises(MaeprobeInputError, match="ch3sk1fk1fl1.png: the pixel data"):
        im.to_numpy()


def test_boolean_arrays_are_0_1_images(sample_dir, tmp_path):
    from napari_maeprobe.pp.preprocessing import channel_stats

    labels = tifffile.imread(sample_dir / "imc_bodenmiller_5ch/masks_deepcell/"
                             "20210305_NE_mockData2_001.tiff")  # fmt: skip
    mask = labels > 0
    np.save(tmp_path / "mask.npy", mask)
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    for name in ("mask.npy", "mask.tif"):
        im = read_image(tmp_path / name)
        assert im.data.dtype == np.uint8
        np.testing.assert_array_equal(im.to_numpy()[0], mask.astype(np.uint8))
        channel_stats(im.to_numpy(), "percentile")  # numpy refuses '-' on booleans


def test_rgb_file_keeps_three_planes(sample_dir, tmp_path):
    """A real three-colour composite (ExampleHuman DNA, PH3, cell body as R, G, B)."""
    rgb = np.stack(
        [tifffile.imread(f) for f in sorted((sample_dir / "cellprofiler_examplehuman_3ch")
                                            .glob("*.tif"))], axis=-1
    )  # fmt: skip
    iio.imwrite(tmp_path / "composite.png", rgb)
    im = read_image(tmp_path / "composite.png")
    assert im.channel_names == ["R", "G", "B"]
    np.testing.assert_array_equal(im.to_numpy(), np.moveaxis(rgb, -1, 0))


def test_grey_or_one_colour_saved_as_rgb_keeps_one_channel(lincs, shared_dir, tmp_path):
    grey = iio.imread(lincs / "images/SQ00015198/r01c01f03p01-ch1sk1fk1fl1.png")
    iio.imwrite(tmp_path / "grey.png", np.stack([grey] * 3, axis=-1))
    iio.imwrite(tmp_path / "grey.jpg", np.stack([grey] * 3, axis=-1), quality=95)
    with pytest.warns(UserWarning, match="identical"):
        png = read_image(tmp_path / "grey.png")
    np.testing.assert_array_equal(png.to_numpy()[0], grey)
    with pytest.warns(UserWarning, match="identical"):
        assert read_image(tmp_path / "grey.jpg").n_channels == 1
    hpa = shared_dir / "hpa_if_4ch_localization/fov"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        blue = read_image(hpa / "89_B5_1_blue.jpg")
    assert len(said) == 1 and "kept the B plane" in str(said[0].message)
    np.testing.assert_array_equal(blue.to_numpy()[0], iio.imread(hpa / "89_B5_1_blue.jpg")[..., 2])
    # the HPA jpg groups still open as one 4-channel image each
    fovs = {im.name: im for im in read_images(hpa)}
    assert fovs["89_B5_1"].n_channels == 4 and fovs["800_A6_1"].n_channels == 4


def test_duplicate_channel_names_are_refused_naming_them(sample_dir, tmp_path):
    path = sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff"
    with pytest.raises(MaeprobeInputError, match="'DNA' given to more than one channel"):
        read_image(path, channel_names=["DNA", "a", "DNA", "b", "c"])
    arr = tifffile.imread(path)
    ome = tmp_path / "region.ome.tif"
    tifffile.imwrite(ome, arr, ome=True, metadata={
        "axes": "CYX", "Channel": {"Name": ["Ag", "CK5", "CK5", "YBX", "H3"]}})  # fmt: skip
    with pytest.raises(MaeprobeInputError, match="'CK5' given to more than one channel"):
        read_image(ome)
    (tmp_path / "img").mkdir()
    shutil.copy(path, tmp_path / "img/region.tiff")
    (tmp_path / "panel.csv").write_text("channel,name\nAg107,Ag\nPr141,H3\nSm147,L\nEu153,Y\n"
                                        "Yb172,H3\n")  # fmt: skip
    with pytest.raises(MaeprobeInputError, match="'H3' given to more than one channel"):
        read_image(tmp_path / "img/region.tiff")


@pytest.mark.parametrize("fmt", ["v04", "v05"])
def test_ome_zarr_with_missing_chunks_is_refused_or_warned(sample_dir, tmp_path, fmt):
    """Zarr 2 (OME-Zarr 0.4) stores every chunk: a gap is an incomplete copy, refused. Zarr 3
    (OME-Zarr 0.5) leaves out all-fill chunks by default: a gap is said (a warning naming the
    count), since it may be empty image."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    im = read_image(sample_dir / "alsf_cellpainting_6ch/images/orig")
    arr = im.to_numpy()[[4, 2]]  # DNA, AGP
    path = tmp_path / "field.ome.zarr"
    ome_fmt = FormatV04() if fmt == "v04" else FormatV05()
    store = parse_url(path, mode="w", fmt=ome_fmt).store
    root = zarr.group(store=store, zarr_format=2 if fmt == "v04" else 3)
    write_image(arr, root, axes="cyx", scaler=None, fmt=ome_fmt,
                storage_options={"chunks": (1, 270, 270)})  # fmt: skip
    ok = read_image(path)
    np.testing.assert_array_equal(ok.to_numpy(), arr)
    first = sorted(d.name for d in path.iterdir() if d.is_dir())[0]  # "0" or "s0": the full size
    chunk_files = sorted(
        p for p in (path / first).rglob("*")
        if p.is_file() and p.name not in (".zarray", ".zattrs", "zarr.json")
    )  # fmt: skip
    assert len(chunk_files) == 2 * 4 * 4
    for p in chunk_files[3:11]:
        p.unlink()
    said = f"array '{first}' has 8 of its 32 chunks missing"
    if fmt == "v04":
        with pytest.raises(MaeprobeInputError, match=said):
            read_image(path)
    else:
        with pytest.warns(UserWarning, match=said):
            read_image(path)


def test_phenix_two_wells_two_channels_group_by_channel(lincs, tmp_path):
    """Two wells (r01c01, r16c13) with two of the five channels each: the column token c01/c13
    varies exactly as often as ch1/ch5, but an Opera Phenix name's r..c..f..p.. is the well."""
    plate = tmp_path / "SQ00015198"
    plate.mkdir()
    for f in (lincs / "images/SQ00015198").glob("r*f03p01-ch[15]*.png"):
        if f.name.startswith(("r01c01", "r16c13")):
            shutil.copy(f, plate / f.name)
    images = read_images(tmp_path)
    assert sorted(i.name for i in images) == ["SQ00015198/r01c01f03p01", "SQ00015198/r16c13f03p01"]
    assert all(i.channel_names == ["ch1", "ch5"] for i in images)
    dna = iio.imread(lincs / "images/SQ00015198/r16c13f03p01-ch1sk1fk1fl1.png")
    p13 = next(i for i in images if i.name.endswith("r16c13f03p01"))
    assert np.array_equal(p13.to_numpy()[0], dna) and p13.metadata["obs"]["well"] == "P13"
