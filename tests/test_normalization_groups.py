"""Normalisation as a choice the store records: per image, per plate, or from the control
images of each plate (issue 11, item 4), on the real LINCS Cell Painting plates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import maeprobe
from napari_maeprobe import read_images
from napari_maeprobe.embed.metadata import join_metadata
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.pp.normalization_groups import (
    describe_normalization,
    pool_statistics,
)
from napari_maeprobe.pp.preprocessing import normalization_stats


@pytest.fixture(scope="module")
def lincs(shared_dir):
    return shared_dir / "lincs_cellpainting_a549_dev"


@pytest.fixture(scope="module")
def fields(lincs):
    """Two DMSO fields and one lonafarnib field of each plate, DNA and Mito only."""
    images, _ = join_metadata(read_images(lincs / "images"), lincs / "fov_metadata.csv")
    chosen = []
    for plate in ("SQ00015198", "SQ00015230"):
        mine = [i for i in images if i.metadata["obs"]["plate"] == plate]
        dmso = [i for i in mine if i.metadata["obs"]["compound"] == "DMSO"][:2]
        lona = [i for i in mine if i.metadata["obs"]["compound"] == "lonafarnib"][:1]
        chosen += dmso + lona
    return chosen


def test_reference_statistics_are_the_median_of_each_plates_controls(fields):
    stats = [normalization_stats(im.to_numpy())[0] for im in fields]
    meta = [im.metadata["obs"] for im in fields]
    pooled, notes = pool_statistics(
        stats, meta, [im.dataset for im in fields], [im.name for im in fields],
        by="plate", reference="compound=DMSO",
    )  # fmt: skip
    # independently: a pandas groupby over the DMSO images of each plate
    rows = [
        {"plate": m["plate"], "compound": m["compound"], "c": c, "k": k, "v": s[c, k]}
        for m, s in zip(meta, stats) for c in range(s.shape[0]) for k in range(2)
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    want = frame[frame["compound"] == "DMSO"].groupby(["plate", "c", "k"])["v"].median()
    for m, got in zip(meta, pooled):
        for c in range(got.shape[0]):
            for k in range(2):
                assert got[c, k] == pytest.approx(want[(m["plate"], c, k)])
    assert all("2 reference images of plate" in n for n in notes)
    # the lonafarnib field now shares its plate's DMSO statistics, not its own
    lona = [i for i, m in enumerate(meta) if m["compound"] == "lonafarnib"]
    assert not np.allclose(pooled[lona[0]], stats[lona[0]])


def test_per_image_is_unchanged_and_bad_scopes_are_refused(fields):
    stats = [normalization_stats(im.to_numpy())[0] for im in fields]
    meta = [im.metadata["obs"] for im in fields]
    names = [im.name for im in fields]
    same, _ = pool_statistics(stats, meta, ["d"] * len(fields), names)
    assert all(np.array_equal(a, b) for a, b in zip(same, stats))
    with pytest.raises(MaeprobeInputError, match="no value of 'genotype'"):
        pool_statistics(stats, meta, ["d"] * len(fields), names, by="genotype")
    with pytest.raises(MaeprobeInputError, match="has no image with compound=staurosporine"):
        pool_statistics(stats, meta, ["d"] * len(fields), names, by="plate",
                        reference="compound=staurosporine")  # fmt: skip
    with pytest.raises(MaeprobeInputError, match="needs images to share statistics"):
        pool_statistics(stats, meta, ["d"] * len(fields), names, reference="compound=DMSO")
    # a numeric reference matches however the table wrote the number (0 and 0.0)
    dose, _ = pool_statistics(stats, meta, ["d"] * len(fields), names, by="plate",
                              reference="mmoles_per_liter=0")  # fmt: skip
    ref, _ = pool_statistics(stats, meta, ["d"] * len(fields), names, by="plate",
                             reference="compound=DMSO")  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(dose, ref))  # DMSO is the 0.0 dose here
    assert "removed before the model sees them" in describe_normalization("percentile")
    assert "differences from DMSO are kept" in describe_normalization(
        "percentile", "plate", "compound=DMSO"
    )


def test_embed_records_the_plate_reference_normalisation(lincs, tmp_path):
    """The store's image info holds the statistics applied: one set per plate, from DMSO."""
    import shutil

    from napari_maeprobe.embed.store import EmbeddingStore

    out = tmp_path / "ref.zarr"
    # one DMSO field (A01, r01c01) and one lonafarnib field (P13, r16c13) of each plate
    for plate in ("SQ00015198", "SQ00015230"):
        (tmp_path / "images" / plate).mkdir(parents=True)
        for f in (lincs / "images" / plate).glob("r*c*f03p01-ch[15]*.png"):
            if f.name.startswith(("r01c01", "r16c13")):
                shutil.copy(f, tmp_path / "images" / plate / f.name)
    r = maeprobe(
        "embed", str(tmp_path / "images"), "--metadata", str(lincs / "fov_metadata.csv"),
        "--levels", "global", "--normalize-by", "plate", "--normalize-reference",
        "compound=DMSO", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "shared by plate: 2 group(s), from the compound=DMSO images" in r.stdout + r.stderr
    store = EmbeddingStore(out)
    by_plate: dict[str, set] = {}
    for info in store.image_info():
        plate = info["name"].split("/")[0]
        by_plate.setdefault(plate, set()).add(str(np.round(info["normalization_stats"], 6)))
    assert set(by_plate) == {"SQ00015198", "SQ00015230"}
    assert all(len(v) == 1 for v in by_plate.values())  # one set of statistics per plate
    assert store.facts["normalize_by"] == "plate"
    assert "differences from DMSO are kept" in store.facts["normalization_hides"]
    bad = maeprobe("embed", str(tmp_path / "images"), "--normalize-reference", "compound=DMSO",
                   "--out", str(tmp_path / "bad.zarr"))  # fmt: skip
    assert bad.returncode == 2 and "--normalize-by plate" in bad.stderr
