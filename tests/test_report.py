"""The demo report: ``report.html`` and its PNG figures, built from real sample-data tables."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pl.report import ami_series, write_report
from napari_maeprobe.pp.preprocessing import cell_crops, normalize, patch_table
from napari_maeprobe.pp.segmentation import segment

PNG = b"\x89PNG\r\n\x1a\n"
EVIL = "<b>x</b>"


@dataclass
class FakeDrivers:
    table: pd.DataFrame
    verdict: str
    labels_name: str = "leiden"
    skipped: dict[str, str] = field(default_factory=dict)


def _pcs(features: np.ndarray) -> np.ndarray:
    """The first two principal components (numpy SVD), a fast stand-in for UMAP."""
    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return (u[:, :2] * s[:2]).astype(np.float32)


def _clusters(xy: np.ndarray, n: int) -> pd.Categorical:
    """Quantile bins of the first coordinate as string cluster labels (NA where xy is NaN)."""
    labels = np.full(len(xy), None, dtype=object)
    ok = np.isfinite(xy).all(axis=1)
    edges = np.quantile(xy[ok, 0], np.linspace(0, 1, n + 1)[1:-1])
    labels[ok] = np.searchsorted(edges, xy[ok, 0]).astype(str)
    return pd.Categorical(labels, categories=[str(i) for i in range(n)])


@pytest.fixture(scope="module")
def real_tables() -> dict:
    """Crops and the per-channel patch table of the bundled Cell Painting image."""
    image, labels = load_sample("cellpainting")
    if labels is None:
        labels = segment(image, "builtin").labels
    data = normalize(image.to_numpy(), name=image.name, channel_names=image.channel_names)
    crops = cell_crops(data, labels, 96, image.name, image.channel_names)
    patches = patch_table(crops, 12, per_channel=True, dataset=image.dataset)
    return {"image": image, "crops": crops, "patches": patches}


def _levels(real: dict, single_channel: bool = False) -> dict[str, ad.AnnData]:
    image, crops, patches = real["image"], real["crops"], real["patches"]
    n, n_c = crops.crops.shape[:2]
    datasets = np.where(np.arange(n) % 3 == 0, EVIL, image.dataset)
    cells = pd.DataFrame(
        {
            "level": "global",
            "dataset": datasets,
            "image": image.name,
            "cell_id": pd.array(crops.cell_ids, dtype="Int64"),
            "channel": pd.array([pd.NA] * n, dtype="string"),
            "centroid_y": crops.centroids[:, 0],
            "centroid_x": crops.centroids[:, 1],
        }
    )
    # global: per-cell mean intensity of each channel; channel: each channel's 8x8 patch profile
    means = crops.crops.mean(axis=(2, 3))
    g = ad.AnnData(X=means.astype(np.float32), obs=cells.set_axis(cells.index.astype(str)))
    g.obsm["X_umap"] = _pcs(means)
    g.obs["leiden"] = _clusters(g.obsm["X_umap"], 3)
    g.uns["effective_rank"] = 3.7
    g.uns["maeprobe"] = {"model": "from-uns", "embed_dim": 384}

    profile = crops.crops.reshape(n, n_c, 8, 12, 8, 12).mean(axis=(3, 5)).reshape(n * n_c, 64)
    ch = cells.loc[cells.index.repeat(n_c)].reset_index(drop=True)
    ch["level"] = "channel"
    ch["channel"] = pd.array(list(image.channel_names) * n, dtype="string")
    c = ad.AnnData(X=profile.astype(np.float32), obs=ch.set_axis(ch.index.astype(str)))
    c.obsm["X_umap"] = _pcs(profile)
    c.obs["leiden"] = _clusters(c.obsm["X_umap"], 4)

    p_obs = patches.drop(columns="crop_index").copy()
    p_obs.insert(0, "level", "patch")
    if single_channel:
        p_obs = p_obs[p_obs["channel"] == "DNA"].reset_index(drop=True)
    codes = pd.get_dummies(p_obs["channel"]).to_numpy(dtype=np.float64)
    feats = np.column_stack(
        [p_obs["patch_intensity"], p_obs["patch_row"], p_obs["patch_col"], codes * 0.5]
    )
    feats = feats + np.random.default_rng(1).normal(0, 0.05, feats.shape)
    xy = _pcs(feats)
    xy[::9] = np.nan  # rows not analysed
    p = ad.AnnData(X=feats.astype(np.float32), obs=p_obs.set_axis(p_obs.index.astype(str)))
    p.obsm["X_umap"] = xy
    p.obs["leiden"] = _clusters(xy, 25)  # more than a legend holds
    p.uns["effective_rank"] = np.float64(12.25)
    return {"global": g, "channel": c, "patch": p}


def _drivers() -> dict[str, FakeDrivers]:
    cols = ["channel", "patch_row", "patch_col", "dataset", "foreground"]
    return {
        "global": FakeDrivers(
            pd.DataFrame({"ami": [0.41234567, 0.0123]}, index=["dataset", "image"]),
            "Clusters follow the dataset (AMI 0.41) & not the image",
        ),
        "channel": FakeDrivers(
            pd.DataFrame({"column": ["channel", "dataset"], "ami": [0.8765432, 0.05]}),
            "Clusters follow the marker channel (AMI 0.88): technical, not biology",
        ),
        "patch": FakeDrivers(
            pd.DataFrame(
                {
                    "column": cols,
                    "kind": ["categorical", "position", "position", "categorical", "categorical"],
                    "n_values": [6, 8, 8, 2, 2],
                    "ami": [0.1, 0.62345, 0.6, np.nan, 0.3],
                    "knn_purity": [0.9, 0.5, 0.5, 1.0, 0.7],
                    "position_r2": [np.nan, 0.91, 0.88, np.nan, np.nan],
                }
            ),
            "Clusters follow patch position (patch_row AMI 0.62)",
            skipped={"cell_id": "too many values <100>"},
        ),
    }


def job_facts() -> dict:
    return {
        "model": "default",
        "weights": "maeprobe_default_vits.safetensors",
        "weights_sha256": "0123456789abcdef" * 4,
        "embed_dim": 384,
        "device": "cpu",
        "precision": "float32",
        "crop_size": 96,
        "patch_size": [12, 12],
        "seconds": {"segment": 2.61, "embed": 10.4, "analyse": 3.2},
        "version": "0.1.0",
    }


def _segmentation(real: dict) -> pd.DataFrame:
    image = real["image"]
    return pd.DataFrame(
        {
            "dataset": [image.dataset, EVIL],
            "image": [image.name, "fake"],
            "shape": ["1080x1080", "10x10"],
            "channels": [",".join(image.channel_names), "a"],
            "n_cells": [len(real["crops"]), 0],
            "method": ["builtin", "builtin"],
        }
    )


def _referenced(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_writes_page_and_figures(tmp_path: Path, real_tables: dict) -> None:
    pyplot_before = "matplotlib.pyplot" in sys.modules
    levels = _levels(real_tables)
    path = write_report(tmp_path, levels, _drivers(), job_facts(), _segmentation(real_tables))

    assert path == tmp_path / "report.html" and path.is_file()
    page = path.read_text(encoding="utf-8")
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    referenced = _referenced(page)
    assert sorted(set(referenced)) == written
    for name in referenced:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left

    # every colouring with >= 2 values, none for an all-NA or absent column, plus the drivers
    # each level's diagnostics found
    expected = {
        "umap_global_dataset.png",
        "umap_global_leiden.png",
        "umap_channel_channel.png",
        "umap_channel_dataset.png",
        "umap_channel_leiden.png",
        "umap_patch_channel.png",
        "umap_patch_patch_row.png",
        "umap_patch_patch_col.png",
        "umap_patch_leiden.png",
        "umap_patch_foreground.png",  # a driver the patch diagnostics found (AMI 0.3)
        "drivers_global.png",
        "drivers_channel.png",
        "drivers_patch.png",
    }
    assert set(written) == expected
    assert "umap_global_channel.png" not in written  # channel is NA at the global level
    assert "umap_patch_dataset.png" not in written  # one dataset only

    # verdicts in bold, escaped; facts; formatted floats
    assert "<strong>Clusters follow the dataset (AMI 0.41) &amp; not the image</strong>" in page
    assert "Clusters follow patch position (patch_row AMI 0.62)" in page
    assert "0.412" in page and "0.41234567" not in page
    assert "0.623" in page and "0.62345" not in page
    assert "0123456789ab" in page and "maeprobe_default_vits.safetensors" in page
    assert "float32" in page and "384" in page and "12 × 12" in page
    assert "global 3.7" in page and "patch 12.2" in page  # effective ranks
    assert "embed 10.4 s" in page
    n_patch = levels["patch"].n_obs
    assert f"patch {n_patch:,}" in page

    # user strings are escaped everywhere
    assert EVIL not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page

    # NaN UMAP rows are skipped and said so; too many clusters get no legend
    n_nan = int(np.isnan(levels["patch"].obsm["X_umap"][:, 0]).sum())
    assert n_nan > 0 and f"{n_nan:,} rows not analysed" in page
    assert "25 categories (too many for a legend)" in page
    assert "horizontal position within the crop" in page
    assert "linear model reads the patch position" in page  # column help under the table
    assert "cell_id (too many values &lt;100&gt;)" in page

    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules


def test_single_channel_level_has_no_channel_map(tmp_path: Path, real_tables: dict) -> None:
    levels = {"patch": _levels(real_tables, single_channel=True)["patch"]}
    drivers = {"patch": FakeDrivers(pd.DataFrame({"x": [1.0]}), "")}  # no AMI column
    path = write_report(tmp_path, levels, drivers, {}, colour_by=("channel", "patch_row", "nope"))
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["umap_patch_patch_row.png"]
    page = path.read_text(encoding="utf-8")
    assert _referenced(page) == written


def test_rewrite_replaces_files(tmp_path: Path, real_tables: dict) -> None:
    levels = {"global": _levels(real_tables)["global"]}
    first = write_report(tmp_path, levels, {}, {"model": "a"})
    write_report(tmp_path, levels, {}, {"model": "b"})
    assert "maeprobe report — b" in first.read_text(encoding="utf-8")
    assert "No diagnostics for this level." in first.read_text(encoding="utf-8")
    # uns facts fill in what the facts leave out
    assert "384" in first.read_text(encoding="utf-8")


def test_ami_series_reads_common_layouts() -> None:
    by_index = ami_series(pd.DataFrame({"AMI": [0.5, np.nan]}, index=["channel", "dataset"]))
    assert by_index.to_dict() == {"channel": 0.5}
    by_column = ami_series(pd.DataFrame({"covariate": ["patch_row"], "ami_leiden": [0.25]}))
    assert by_column.to_dict() == {"patch_row": 0.25}
    assert ami_series(pd.DataFrame({"nmi": [0.1]})) is None
