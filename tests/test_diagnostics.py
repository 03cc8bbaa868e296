"""``what_drives`` on controls built from a real patch table: embeddings planted to depend only
on patch position, only on channel, or on nothing; the clusters come from our own Leiden and
k-means on those embeddings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import Cancelled
from napari_maeprobe.tl.analysis import kmeans, leiden
from napari_maeprobe.tl.diagnostics import AMI_THRESHOLD, DriversReport, what_drives


@pytest.fixture(scope="module")
def patch_obs() -> pd.DataFrame:
    """The real per-channel patch table of the Cell Painting field (64-px crops, 16-px
    patches: 40 cells x 6 channels x 4 x 4 patches = 3840 rows)."""
    from napari_maeprobe.io.samples import load_sample
    from napari_maeprobe.pp.preprocessing import cell_crops, normalize, patch_table
    from napari_maeprobe.pp.segmentation import segment

    image, labels = load_sample("cellpainting")
    if labels is None:
        labels = segment(image).labels
    crops = cell_crops(normalize(image.to_numpy()), labels, 64, "field", image.channel_names)
    return patch_table(crops, 16, per_channel=True, dataset="alsf_cellpainting_6ch")


def one_hot(values: pd.Series) -> np.ndarray:
    codes, uniques = pd.factorize(values, sort=True)
    return np.eye(len(uniques), dtype=np.float32)[codes]


def noise(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, d)) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def position_control(patch_obs):
    """Embeddings that depend only on where the patch is in its crop."""
    n = len(patch_obs)
    X = np.hstack(
        [one_hot(patch_obs["patch_row"]) * 2, one_hot(patch_obs["patch_col"]) * 2, noise(n, 8, 1)]
    )
    X[:, :8] += noise(n, 8, 2, 0.2)
    labels = leiden(X, resolution=1.0)
    return X, labels, what_drives(X, patch_obs, labels)


def row(report: DriversReport, column: str) -> pd.Series:
    return report.table.set_index("column").loc[column]


def test_position_control_names_position(position_control, patch_obs):
    X, labels, report = position_control
    assert len(np.unique(labels)) >= 4
    top = report.table.iloc[0]
    assert top["column"] in ("patch_row", "patch_col")
    assert report.verdict.startswith("clusters follow patch_")
    for col in ("patch_row", "patch_col"):
        r = row(report, col)
        assert r["ami"] > 0.3 and r["purity_gain"] > 0.5 and r["position_r2"] > 0.8
        assert r["kind"] == "position" and r["n_values"] == 4
    ch = row(report, "channel")
    assert abs(ch["ami"]) < 0.02 and abs(ch["purity_gain"]) < 0.05
    assert np.isnan(ch["position_r2"])
    assert report.skipped["cell_id"].startswith("an identifier")  # names cells, groups nothing
    # constant, empty and bookkeeping columns are left out, with the reason
    assert report.skipped["dataset"] == "one value only"
    assert report.skipped["patch_z"] == "all values missing"
    assert "crop_index" not in set(report.table["column"]) | set(report.skipped)
    assert row(report, "patch_intensity")["kind"] == "continuous"


def test_channel_control_names_channel(patch_obs):
    n = len(patch_obs)
    X = np.hstack([one_hot(patch_obs["channel"]) * 2, noise(n, 10, 3)])
    labels = kmeans(X, 6)
    report = what_drives(X, patch_obs, labels, n_permutations=3)
    top = report.table.iloc[0]
    assert top["column"] == "channel" and top["ami"] > 0.9 and top["purity_gain"] > 0.9
    assert report.verdict.startswith("clusters follow channel (AMI")
    for col in ("patch_row", "patch_col"):
        r = row(report, col)
        assert abs(r["ami"]) < 0.02 and abs(r["purity_gain"]) < 0.05 and r["position_r2"] < 0.05


def test_noise_control_explains_nothing(patch_obs):
    X = noise(len(patch_obs), 16, 4)
    labels = kmeans(X, 8)
    report = what_drives(X, patch_obs, labels, n_permutations=3)
    assert report.verdict.startswith("no metadata column explains the clusters")
    assert (report.table["ami"] < AMI_THRESHOLD).all()
    assert (report.table["purity_gain"].abs() < 0.05).all()
    assert (report.table["position_r2"].dropna() < 0.05).all()


def test_selection_and_label_column(position_control, patch_obs):
    X, labels, _ = position_control
    obs = patch_obs.assign(leiden=labels)
    report = what_drives(X, obs, "leiden", max_rows=1500)
    assert report.labels_name == "leiden" and "leiden" not in set(report.table["column"])
    assert report.table["n_rows"].max() <= 1500
    assert report.table.iloc[0]["column"] in ("patch_row", "patch_col")
    selection = (patch_obs["patch_row"] == 0).to_numpy()
    report = what_drives(X, patch_obs, selection)
    assert report.labels_name == "selection"
    assert report.verdict.startswith("the selection follows patch_row")


def test_report_round_trip(position_control):
    report = position_control[2]
    data = json.loads(json.dumps(report.to_dict()))
    back = DriversReport.from_dict(data)
    pd.testing.assert_frame_equal(back.table, report.table)
    assert back.verdict == report.verdict and back.skipped == report.skipped
    assert report.verdict in str(report)


def test_bad_input(patch_obs):
    X = noise(len(patch_obs), 4, 0)
    labels = np.zeros(len(patch_obs), dtype=int)
    with pytest.raises(MaeprobeInputError, match="single value"):
        what_drives(X, patch_obs, labels)
    labels[::2] = 1
    with pytest.raises(MaeprobeInputError, match="rows but the embeddings"):
        what_drives(X[:-1], patch_obs, labels)
    with pytest.raises(MaeprobeInputError, match="no column"):
        what_drives(X, patch_obs, labels, columns=["plate"])
    X[3, 1] = np.nan
    with pytest.raises(MaeprobeInputError, match="NaN"):
        what_drives(X, patch_obs, labels)
    with pytest.raises(Cancelled):
        what_drives(noise(len(patch_obs), 4, 0), patch_obs, labels, progress=lambda *a: False)
