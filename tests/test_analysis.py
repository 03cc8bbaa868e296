"""The analysis tools: PCA, UMAP (full and sample+transform), the kNN graph, Leiden, k-means,
the row filters on a real patch table, and the effective rank."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import Cancelled
from napari_maeprobe.tl import analysis
from napari_maeprobe.tl.analysis import (
    apply_filters,
    balanced_sample,
    central_mask,
    effective_rank,
    foreground_mask,
    kmeans,
    knn_graph,
    leiden,
    nearest_neighbors,
    pca,
    umap_embed,
)


@pytest.fixture(scope="module")
def patch_obs() -> pd.DataFrame:
    """The real per-channel patch table of the Cell Painting field (64-px crops, 16-px
    patches: 40 cells x 6 channels x 16 patches)."""
    from napari_maeprobe.io.samples import load_sample
    from napari_maeprobe.pp.preprocessing import cell_crops, normalize, patch_table
    from napari_maeprobe.pp.segmentation import segment

    image, labels = load_sample("cellpainting")
    if labels is None:
        labels = segment(image).labels
    crops = cell_crops(normalize(image.to_numpy()), labels, 64, "field", image.channel_names)
    return patch_table(crops, 16, per_channel=True, dataset="alsf_cellpainting_6ch")


def blobs(n=600, centers=4, d=16, seed=0, std=1.0):
    X, y = make_blobs(
        n, d, centers=centers, cluster_std=std, center_box=(-20, 20), random_state=seed
    )
    return X.astype(np.float32), y


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "X, match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]), "NaN"),
        (np.zeros(10), "2D"),
        (np.zeros((1, 4)), "at least"),
    ],
)
def test_bad_embeddings_raise_clear_errors(X, match):
    with pytest.raises(MaeprobeInputError, match=match):
        pca(X)


def test_pca_shape_dtype_and_order():
    X, _ = blobs(200, d=20)
    Z = pca(X, 50)
    assert Z.shape == (200, 20) and Z.dtype == np.float32
    assert pca(X[:10], 50).shape == (10, 9)
    var = Z.var(axis=0)
    assert np.all(np.diff(var) <= 1e-3)  # components in decreasing variance


# --------------------------------------------------------------------------- effective rank


def test_effective_rank_known_spectra():
    assert effective_rank(np.eye(64)) == pytest.approx(64, rel=1e-4)
    rng = np.random.default_rng(0)
    rank1 = np.outer(rng.normal(size=300), rng.normal(size=40))
    assert 1.0 <= effective_rank(rank1) < 1.01
    two = np.zeros((100, 10))
    two[:50, 0] = 1.0
    two[50:, 1] = 1.0  # two equal singular values
    assert effective_rank(two) == pytest.approx(2.0, rel=1e-4)


def test_effective_rank_gram_path_equals_svd():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2000, 12)) * np.linspace(0.1, 3, 12)
    s = np.linalg.svd(X, compute_uv=False)
    p = s / s.sum() + analysis.RANKME_EPS
    assert effective_rank(X) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


# --------------------------------------------------------------------------- kNN, clusters


def test_nearest_neighbors_exclude_self_and_duplicates():
    X = np.array([[0.0], [0.0], [1.0], [3.0]], dtype=np.float32)
    idx, dist = nearest_neighbors(X, 2)
    assert idx.shape == (4, 2)
    assert not (idx == np.arange(4)[:, None]).any()
    assert idx[0, 0] == 1 and dist[0, 0] == 0


@pytest.mark.skipif(
    not os.environ.get("MAEPROBE_SLOW_TESTS"),
    reason="pynndescent's first call compiles for ~25 s; set MAEPROBE_SLOW_TESTS=1",
)
def test_approximate_neighbors_match_exact(monkeypatch):
    X, _ = blobs(800, centers=6, d=8)
    exact, _ = nearest_neighbors(X, 10)
    monkeypatch.setattr(analysis, "EXACT_KNN_MAX", 100)
    approx, _ = nearest_neighbors(X, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert recall > 0.95
    assert np.array_equal(approx, nearest_neighbors(X, 10)[0])  # seeded: the same graph


def test_connectivities_match_umap():
    from umap.umap_ import fuzzy_simplicial_set

    X, _ = blobs(300, d=8)
    ours = knn_graph(X, 15)
    idx, dist = nearest_neighbors(X, 14)
    n = len(X)
    knn_i = np.hstack([np.arange(n)[:, None], idx])
    knn_d = np.hstack([np.zeros((n, 1), np.float32), dist])
    ref = fuzzy_simplicial_set(X, 15, 0, "euclidean", knn_indices=knn_i, knn_dists=knn_d)[0]
    assert abs(ours - ours.T).max() < 1e-12
    assert abs(ours - ref.tocsr()).max() < 1e-4
    dist_graph = knn_graph(X, 15, mode="distance")
    assert dist_graph.nnz == n * 14


def test_leiden_recovers_separated_blobs_deterministically():
    X, y = blobs(600, centers=5)
    labels = leiden(X, resolution=0.5)
    assert adjusted_rand_score(y, labels) == pytest.approx(1.0)
    assert np.array_equal(labels, leiden(X, resolution=0.5))
    sizes = np.bincount(labels)
    assert np.all(np.diff(sizes) <= 0)  # 0 is the largest cluster
    assert np.array_equal(leiden(None, graph=knn_graph(X), resolution=0.5), labels)


def test_kmeans_recovers_blobs_and_minibatch_path(monkeypatch):
    X, y = blobs(600, centers=4)
    assert adjusted_rand_score(y, kmeans(X, 4)) == pytest.approx(1.0)
    monkeypatch.setattr(analysis, "KMEANS_FULL_MAX", 100)
    assert adjusted_rand_score(y, kmeans(X, 4)) == pytest.approx(1.0)
    with pytest.raises(MaeprobeInputError, match="k=0"):
        kmeans(X, 0)


# --------------------------------------------------------------------------- UMAP


def _separation(coords: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose 5 nearest 2D neighbours are mostly of their own blob."""
    idx, _ = nearest_neighbors(coords, 5)
    return float(np.mean((y[idx] == y[:, None]).mean(axis=1) > 0.5))


def test_umap_full_and_sample_transform(monkeypatch):
    X, y = blobs(500, centers=4)
    coords, info = umap_embed(X, n_neighbors=10, seed=0)
    assert coords.shape == (500, 2) and coords.dtype == np.float32
    assert info["strategy"] == "full" and info["fit_rows"] == 500
    assert info["backend"] == "umap-learn" and info["seconds"] > 0
    assert _separation(coords, y) > 0.98

    monkeypatch.setattr(analysis, "TRANSFORM_CHUNK", 120)
    calls = []
    coords2, info2 = umap_embed(
        X, n_neighbors=10, max_fit=150, progress=lambda d, t, s: calls.append((d, t))
    )
    assert info2["strategy"] == "sample+transform" and info2["fit_rows"] == 150
    assert np.isfinite(coords2).all()
    assert _separation(coords2, y) > 0.98
    done = [d for d, _ in calls]
    assert done[-1] == 500 and done == sorted(done) and len(done) >= 4  # 3 chunks of the rest
    again, _ = umap_embed(X, n_neighbors=10, max_fit=150)
    assert np.array_equal(coords2, again)  # seeded: the same map every time

    groups = np.where(np.arange(500) < 450, "a", "b")
    coords3, info3 = umap_embed(X, n_neighbors=10, max_fit=150, balance_by=groups)
    assert info3["fit_rows"] == 150 and np.isfinite(coords3).all()

    with pytest.raises(Cancelled):
        umap_embed(X, n_neighbors=10, max_fit=150, progress=lambda d, t, s: d < 200)


def test_umap_backends(monkeypatch):
    X, _ = blobs(50)
    monkeypatch.setattr(analysis, "_cuml_umap", lambda: None)
    with pytest.raises(MaeprobeInputError, match="cuML"):
        umap_embed(X, backend="cuml")

    class FakeCuml:
        def __init__(self, **kw):
            self.kw = kw

        def fit_transform(self, X):
            return np.zeros((len(X), 2))

    monkeypatch.setattr(analysis, "_cuml_umap", lambda: FakeCuml)
    coords, info = umap_embed(X, max_fit=10)
    assert info["backend"] == "cuml" and info["strategy"] == "full" and coords.shape == (50, 2)
    with pytest.raises(MaeprobeInputError, match="backend"):
        umap_embed(X, backend="tsne")
    with pytest.raises(MaeprobeInputError, match="at least 4"):
        umap_embed(X[:3])


# --------------------------------------------------------------------------- filters


def test_foreground_and_central_masks(patch_obs):
    fg = foreground_mask(patch_obs)
    assert fg.dtype == bool and np.array_equal(fg, patch_obs["foreground"].to_numpy())
    assert 0 < fg.sum() < len(fg)
    obs = patch_obs.copy()
    obs["foreground"] = obs["foreground"].astype(object)
    obs.loc[obs.index[:5], "foreground"] = None
    assert not foreground_mask(obs)[:5].any()
    central = central_mask(patch_obs)
    assert np.array_equal(central, patch_obs["central"].to_numpy())
    # 4 x 4 grid: the middle 2 x 2 patches are central
    rows = patch_obs.loc[central, "patch_row"]
    assert set(rows) == {1, 2} and central.mean() == pytest.approx(0.25)
    with pytest.raises(MaeprobeInputError, match="no column"):
        foreground_mask(patch_obs.drop(columns="foreground"))


def test_balanced_sample_counts(patch_obs):
    idx = balanced_sample(patch_obs, "channel", n_total=600)
    counts = patch_obs.iloc[idx]["channel"].value_counts()
    assert len(idx) == 600 and set(counts) == {100} and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, balanced_sample(patch_obs, "channel", n_total=600))

    # a small group gives all its rows; the others split the rest equally
    small = patch_obs[(patch_obs["channel"] != "DNA") | (patch_obs["cell_id"] <= 3)]
    n_dna = int((small["channel"] == "DNA").sum())
    idx = balanced_sample(small, "channel", n_total=1000)
    counts = small.iloc[idx]["channel"].value_counts()
    assert counts["DNA"] == n_dna and len(idx) == 1000
    others = counts.drop("DNA")
    assert others.max() - others.min() <= 1

    default = small.iloc[balanced_sample(small, "channel")]["channel"].value_counts()
    assert set(default) == {n_dna}
    per = patch_obs.iloc[balanced_sample(patch_obs, ["channel", "central"], n_per_group=50)]
    assert set(per.groupby(["channel", "central"]).size()) == {50}
    with pytest.raises(MaeprobeInputError, match="no column"):
        balanced_sample(patch_obs, "plate")


def test_apply_filters(patch_obs):
    idx = apply_filters(patch_obs, foreground=True, central=True)
    sel = patch_obs.iloc[idx]
    assert sel["foreground"].all() and sel["central"].all()
    assert len(idx) == int((patch_obs["foreground"] & patch_obs["central"]).sum())
    idx = apply_filters(patch_obs, foreground=True, balance_by="channel", max_rows=300)
    sel = patch_obs.iloc[idx]
    assert sel["foreground"].all() and len(idx) <= 300
    counts = sel["channel"].value_counts()
    assert counts.max() - counts.min() <= 1 or len(idx) < 300
    idx = apply_filters(patch_obs, max_rows=100, seed=3)
    assert len(idx) == 100 and np.array_equal(idx, apply_filters(patch_obs, max_rows=100, seed=3))
