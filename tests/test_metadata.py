"""Metadata joined on the user's own columns (image name, file path, plate/well/site), per-cell
tables, bad tables, bad label files, and the confounding flag of "what drives these clusters".

Inputs are the real LINCS Cell Painting fields (2 plates x 4 wells x 2 sites, file names that
repeat across plates), the real IMC regions with their DeepCell masks, and the real HPA field
with its per-cell label table.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE, SHARED, maeprobe
from napari_maeprobe.embed.metadata import join_cell_metadata, join_metadata, read_table
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.reading import read_images

LINCS = SHARED / "lincs_cellpainting_a549_dev"
IMC = SAMPLE / "imc_bodenmiller_5ch"
PLATES = ("SQ00015198", "SQ00015230")
# Phenix row/column -> well, from the data set's README (A01, J18 DMSO; A13 orantinib;
# P13 lonafarnib)
WELLS = {"r01c01": "A01", "r10c18": "J18", "r01c13": "A13", "r16c13": "P13"}


def lincs_images(with_pws: bool = True, well_form: str = "A01") -> list:
    """The 16 LINCS fields as helper A's plate-tree reader names them: ``<plate>/r01c01f03p01``
    with plate / well / site in ``metadata["obs"]`` (read here one plate folder at a time)."""
    out = []
    for plate in PLATES:
        for im in read_images(LINCS / "images" / plate):
            stem = Path(im.source[0]).name.split("-")[0]  # r01c01f03p01
            rc, site = stem[:6], int(stem[7:9])
            obs = {}
            if with_pws:
                obs = {"plate": plate, "well": WELLS[rc] if well_form == "A01" else rc,
                       "site": str(site)}  # fmt: skip
            out.append(im.with_data(im.data, name=f"{plate}/{stem}", metadata={"obs": obs}))
    return out


def fov_rows() -> dict[str, dict]:
    """The table's rows keyed by the DNA file's absolute path (read with the csv module)."""
    with open(LINCS / "fov_metadata.csv", newline="") as fh:
        return {str((LINCS / r["file_DNA"]).resolve()): r for r in csv.DictReader(fh)}


needs_lincs = pytest.mark.skipif(not LINCS.is_dir(), reason="shared LINCS data not here")


# ------------------------------------------------------------------------------ joins


@needs_lincs
def test_join_on_file_path_matches_every_field():
    images = lincs_images(with_pws=False)
    out, join = join_metadata(images, LINCS / "fov_metadata.csv")
    assert join.key == "file path"
    assert set(join.columns) == {"file_DNA", "file_ER", "file_RNA", "file_AGP", "file_Mito"}
    assert (join.n_matched, join.n_images) == (16, 16)
    assert join.unmatched_rows == [] and join.unmatched_images == []
    assert join.summary().startswith("metadata: joined on file path (")
    assert "16 of 16 images matched" in join.summary()
    rows = fov_rows()
    for im in out:
        want = rows[str(Path(im.source[0]).resolve())]
        obs = im.metadata["obs"]
        assert (obs["plate"], obs["well"], obs["site"]) == (want["plate"], want["well"],
                                                            want["site"])  # fmt: skip
        assert obs["compound"] == want["compound"]
        assert "file_DNA" not in obs  # the key's path columns are not copied


@needs_lincs
@pytest.mark.parametrize("well_form", ["A01", "r01c01"])
def test_join_on_plate_well_site(tmp_path, well_form):
    table = pd.read_csv(LINCS / "fov_metadata.csv", dtype=str)
    table = table.drop(columns=[c for c in table if c.startswith("file_")])
    table.to_csv(tmp_path / "meta.csv", index=False)
    out, join = join_metadata(lincs_images(well_form=well_form), tmp_path / "meta.csv")
    assert join.key == "plate/well/site" and join.n_matched == 16
    rows = fov_rows()
    for im in out:
        assert im.metadata["obs"]["compound"] == rows[str(Path(im.source[0]).resolve())][
            "compound"]  # fmt: skip


@needs_lincs
def test_join_on_image_name_names_leftovers(tmp_path):
    images = lincs_images(with_pws=False)
    names = [im.name for im in images]
    table = pd.DataFrame({"image": names[:10] + ["SQ00099999/r01c01f01p01"],
                          "condition": [f"c{i}" for i in range(11)]})  # fmt: skip
    table.to_csv(tmp_path / "meta.csv", index=False)
    out, join = join_metadata(images, tmp_path / "meta.csv")
    assert join.key == "image name" and join.n_matched == 10
    assert join.unmatched_images == names[10:]
    assert join.unmatched_rows == ["row 12 (SQ00099999/r01c01f01p01)"]
    assert "no row for" in join.summary() and "SQ00099999/r01c01f01p01" in join.summary()
    assert out[3].metadata["obs"]["condition"] == "c3"
    assert "condition" not in out[12].metadata["obs"]


def test_join_on_file_names_of_the_imc_table():
    """IMC's own images.csv names each region by its file name ('..._001.tiff'), not by the
    image name: the join finds that column by its values."""
    images = read_images(IMC / "img")
    out, join = join_metadata(images, IMC / "images.csv")
    assert join.key == "file path" and join.columns == ["image"]
    assert join.n_matched == len(images) == 15
    table = pd.read_csv(IMC / "images.csv", dtype=str).set_index("image")
    for im in out:
        assert im.metadata["obs"]["acquisition_description"] == table.loc[
            Path(im.source[0]).name, "acquisition_description"]  # fmt: skip


@needs_lincs
def test_nothing_matches_is_refused_with_this_datas_forms(tmp_path):
    """The old hint offered the image name only; the refusal now shows every form with this
    data's own values (image name, a relative file path, plate/well/site)."""
    table = pd.DataFrame({"sample": ["r01c01f03p01.tiff", "r01c01f04p01.tiff"], "dose": [1, 2]})
    path = tmp_path / "meta.csv"
    table.to_csv(path, index=False)
    with pytest.raises(MaeprobeInputError) as err:
        join_metadata(lincs_images(), path)
    fix = err.value.fix
    assert "'SQ00015198/r01c01f03p01'" in fix
    assert "plate 'SQ00015198', well 'A01', site '3'" in fix
    assert "r01c01f03p01-ch1sk1fk1fl1.png" in fix


@needs_lincs
def test_duplicate_rows_for_one_image_are_refused(tmp_path):
    """Before, the last of two rows for one image silently won."""
    table = pd.read_csv(LINCS / "fov_metadata.csv", dtype=str)
    table = pd.concat([table, table.iloc[[4]].assign(compound="other")], ignore_index=True)
    table.to_csv(tmp_path / "dup.csv", index=False)
    dna = table.iloc[4]["file_DNA"]  # images/<plate>/<field>-ch1sk1fk1fl1.png
    name = f"{dna.split('/')[1]}/{dna.split('/')[2].split('-')[0]}"
    with pytest.raises(MaeprobeInputError, match=f"2 rows for image '{name}' .row 6 ") as err:
        join_metadata(lincs_images(), _beside_lincs(tmp_path / "dup.csv", tmp_path))
    assert "row 18 (" in err.value.problem


def _beside_lincs(table: Path, tmp_path: Path) -> Path:
    """The table with its file paths made absolute (it is written in tmp_path, away from the
    real images its relative paths point at)."""
    frame = pd.read_csv(table, dtype=str)
    for col in [c for c in frame if c.startswith("file_")]:
        frame[col] = [str(LINCS / v) for v in frame[col]]
    out = tmp_path / f"abs_{table.name}"
    frame.to_csv(out, index=False)
    return out


@needs_lincs
def test_reserved_columns_are_refused(tmp_path):
    frame = pd.read_csv(LINCS / "fov_metadata.csv", dtype=str).rename(columns={"dose": "x"})
    frame["cell_id"] = "1"
    frame.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(MaeprobeInputError, match="already defines: cell_id"):
        join_metadata(lincs_images(), _beside_lincs(tmp_path / "m.csv", tmp_path))


# ------------------------------------------------------------------------------ bad tables


def test_latin1_table_is_read_with_a_note(tmp_path):
    images = read_images(IMC / "img")
    frame = pd.read_csv(IMC / "images.csv", dtype=str)[["image", "acquisition_description"]]
    frame["operator"] = "Zoë Müller"
    path = tmp_path / "latin1.csv"
    path.write_bytes(frame.to_csv(index=False).encode("latin-1"))
    out, join = join_metadata(images, path)
    assert out[0].metadata["obs"]["operator"] == "Zoë Müller"
    assert any("read as Latin-1" in n for n in join.notes)
    assert "read as Latin-1" in join.summary()


def test_utf16_table_is_refused_naming_the_encoding(tmp_path):
    frame = pd.read_csv(IMC / "images.csv", dtype=str)[["image"]]
    path = tmp_path / "utf16.csv"
    path.write_bytes(frame.to_csv(index=False).encode("utf-16"))
    with pytest.raises(MaeprobeInputError, match="neither UTF-8 nor Latin-1") as err:
        read_table(path)
    assert "UTF-8" in err.value.fix


@pytest.mark.parametrize("content", [b"", b"image,condition\n"])
def test_empty_table_is_refused(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(MaeprobeInputError, match="empty|no rows"):
        read_table(path)


def test_tsv_and_parquet_read_like_csv(tmp_path):
    frame = pd.read_csv(IMC / "images.csv", dtype=str)
    frame.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.tsv", "t.parquet"):
        got, _ = read_table(tmp_path / name)
        assert list(got.columns) == list(frame.columns)
        assert got["image"].tolist() == frame["image"].tolist()
    with pytest.raises(MaeprobeInputError, match="unknown table format .xlsx"):
        read_table(_touch(tmp_path / "t.xlsx"))


def _touch(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


# ------------------------------------------------------------------------------ per-cell


def test_cell_table_joined_on_image_and_cell_id(tmp_path):
    """HPA's per-cell localisation labels (Cell_index = the mask's label value) onto the real
    two-channel field; the cells the table leaves out get NA."""
    hpa = SHARED / "hpa_if_4ch_localization" / "fov_partial"
    if not hpa.is_dir():
        pytest.skip("shared HPA data not here")
    images = read_images(hpa)
    images = [im for im in images if im.n_channels == 2]
    assert len(images) == 1
    out, join = join_cell_metadata(images, hpa / "383_D2_1_cell_labels.csv")
    cells = out[0].metadata["cell_obs"]
    table = pd.read_csv(hpa / "383_D2_1_cell_labels.csv", dtype=str)
    assert join.columns[-1] == "Cell_index" and len(cells) == len(table) == 17
    assert cells.loc[4, "cell_label_names"] == "Nucleoli;Nuclear Bodies;Cytosol"


def test_cli_cell_table_reaches_every_row_of_its_cell(tmp_path):
    """A per-cell table of one IMC region (label value, area measured from its DeepCell mask)
    joined on cell id; a cell left out of the table gets NA."""
    import tifffile
    from skimage.measure import regionprops

    name = "20210305_NE_mockData2_001"
    mask = tifffile.imread(IMC / "masks_deepcell" / f"{name}.tiff")
    table = pd.DataFrame([{"label": r.label, "area_px": int(r.area)} for r in regionprops(mask)])
    table.iloc[1:].to_csv(tmp_path / "cells.csv", index=False)  # the first cell has no row
    store, out = tmp_path / "s.zarr", tmp_path / "s.csv"
    res = maeprobe("embed", str(IMC / "img" / f"{name}.tiff"), "--labels",
                   str(IMC / "masks_deepcell"), "--cell-metadata", str(tmp_path / "cells.csv"),
                   "--levels", "global", "--out", str(store))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "cell metadata: joined on label" in res.stdout
    assert maeprobe("export", str(store), "--format", "csv", "--out", str(out)).returncode == 0
    obs = pd.read_csv(out).set_index("cell_id")
    want = table.set_index("label")["area_px"]
    assert pd.isna(obs.loc[want.index[0], "area_px"])
    assert (obs.loc[want.index[1:], "area_px"].astype(int) == want.iloc[1:]).all()


# ------------------------------------------------------------------------------ labels


def test_label_file_that_is_not_an_image(tmp_path):
    from napari_maeprobe.embed.labels import find_labels

    images = read_images(IMC / "img")[:1]
    (tmp_path / f"{images[0].name}.tiff").write_text("image,cells\n")  # a CSV saved as .tiff
    with pytest.raises(MaeprobeInputError, match="is not a readable image") as err:
        find_labels(images, tmp_path)
    assert f"{images[0].name}.tiff" in err.value.problem and "\n" not in str(err.value)


def test_negative_labels_are_refused_naming_the_file(tmp_path):
    """Before, cells with negative labels were silently dropped (labels > 0)."""
    import tifffile

    from napari_maeprobe.embed.labels import find_labels

    images = read_images(IMC / "img")[:1]
    mask = tifffile.imread(IMC / "masks_deepcell" / f"{images[0].name}.tiff").astype(np.int32)
    mask[mask == mask.max()] = -1
    tifffile.imwrite(tmp_path / f"{images[0].name}_labels.tif", mask)
    with pytest.raises(MaeprobeInputError, match="negative labels") as err:
        find_labels(images, tmp_path)
    assert f"{images[0].name}_labels.tif" in err.value.problem


# ------------------------------------------------------------------------------ confounding


def test_confounded_column_is_flagged_and_named_in_the_verdict():
    """One 'genotype' per field (IMC regions 1-3 of each mock slide, a made-up label per
    region) is perfectly confounded with the image; 'slide' (three regions each) is not."""
    from napari_maeprobe.tl.diagnostics import confounded_with, what_drives

    rng = np.random.default_rng(0)
    images = [f"r{i}" for i in range(6)]
    obs = pd.DataFrame({"image": np.repeat(images, 20)})
    obs["genotype"] = obs["image"].map({im: f"g{i}" for i, im in enumerate(images)})
    obs["slide"] = obs["image"].map({im: f"s{i // 3}" for i, im in enumerate(images)})
    # embeddings that follow the image (independent of the code under test: built by hand)
    X = np.repeat(rng.normal(size=(6, 8)), 20, axis=0) + 0.05 * rng.normal(size=(120, 8))
    assert confounded_with(obs, "genotype") == "image"
    assert confounded_with(obs, "slide") is None
    rep = what_drives(X, obs, obs["image"].astype(str).to_numpy(), columns=["genotype", "slide"])
    flags = dict(zip(rep.table["column"], rep.table["confounded_with"]))
    assert flags == {"genotype": "image", "slide": ""}
    assert "genotype has one value per image and one image per value" in rep.verdict
    assert "cannot be separated from the field" in rep.verdict


# ------------------------------------------------------------------------------ end to end


@needs_lincs
def test_cli_embed_lincs_with_fov_metadata_as_typed(tmp_path):
    """The check of issue 10 as a user types it (plus `--levels global` and `--segmentation
    builtin`, which keep the test quick: the full command, every level, was run by hand);
    plate, well and compound reach the export."""
    store, h5 = tmp_path / "dev.zarr", tmp_path / "dev.h5ad"
    res = maeprobe("embed", str(LINCS / "images"), "--metadata", str(LINCS / "fov_metadata.csv"),
                   "--out", str(store), "--levels", "global", "--segmentation", "builtin",
                   timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "metadata: joined on file path" in res.stdout
    assert "16 of 16 images matched" in res.stdout
    res = maeprobe("export", str(store), "--format", "h5ad", "--level", "global",
                   "--out", str(h5))  # fmt: skip
    assert res.returncode == 0, res.stderr
    import anndata

    obs = anndata.read_h5ad(h5).obs
    want = {(r["plate"], r["well"], r["compound"]) for r in fov_rows().values()}
    got = set(map(tuple, obs[["plate", "well", "compound"]].astype(str).drop_duplicates()
                  .to_numpy()))  # fmt: skip
    assert got == want


def test_cli_refuses_a_table_that_matches_nothing_in_one_line(tmp_path):
    """The IMC table with extensionless names of other regions: one line, exit 2, the fix
    shows this image's own name."""
    path = tmp_path / "meta.csv"
    path.write_text("image,condition\n20210305_NE_mockData9_001,mock\n")
    image = IMC / "img" / "20210305_NE_mockData2_001.tiff"
    res = maeprobe("embed", str(image), "--metadata", str(path), "--out", str(tmp_path / "s.zarr"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "'20210305_NE_mockData2_001'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s.zarr").exists()
