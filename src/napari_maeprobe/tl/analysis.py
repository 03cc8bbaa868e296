"""Scanpy-like tools over an embedding matrix ``X`` (n, d): PCA, UMAP, a kNN graph, Leiden and
k-means clusters, the effective rank, and row filters over the observation table.

Plain functions over NumPy arrays and a pandas ``obs`` table (one row per row of ``X``), so the
CLI, the napari widgets and notebooks share them. Heavy libraries (umap, pynndescent, igraph)
are imported inside the functions that need them: umap's first import compiles with numba for
about 15 s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy import sparse

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import ProgressCallback, report

#: above this many rows the kNN graph uses pynndescent (approximate) instead of exact search
EXACT_KNN_MAX = 20_000
#: above this many rows k-means uses MiniBatchKMeans
KMEANS_FULL_MAX = 50_000
#: rows per ``transform`` call when UMAP maps the rows it was not fitted on
TRANSFORM_CHUNK = 50_000
#: RankMe's epsilon (Garrido et al. 2023)
RANKME_EPS = 1e-7


# --------------------------------------------------------------------------- input checks


def check_embeddings(X: np.ndarray, min_rows: int = 2, name: str = "embeddings") -> np.ndarray:
    """``X`` as a 2D float32 array; one clear error for NaNs, a wrong shape or too few rows."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise MaeprobeInputError(
            f"{name} must be a 2D (rows, features) array, got shape {X.shape}",
            "pass one row per crop or patch (reshape to (n, d))",
        )
    if X.dtype.kind not in "fiub":
        raise MaeprobeInputError(f"{name} have dtype {X.dtype}", "pass numeric embeddings")
    X = X.astype(np.float32, copy=False)
    if X.shape[0] < min_rows:
        raise MaeprobeInputError(
            f"{name} have {X.shape[0]} row(s) but this needs at least {min_rows}",
            "embed more crops (or relax the filters)",
        )
    if X.shape[1] < 1:
        raise MaeprobeInputError(f"{name} have no features (shape {X.shape})", "pass embeddings")
    step = 100_000  # in blocks: no (n, d) temporary for a million rows
    bad = np.concatenate(
        [~np.isfinite(X[i : i + step]).all(axis=1) for i in range(0, X.shape[0], step)]
    )
    if bad.any():
        raise MaeprobeInputError(
            f"{name}: {int(bad.sum())} row(s) contain NaN or infinite values "
            f"(first: row {int(np.flatnonzero(bad)[0])})",
            "drop those rows first (masked patches are NaN: filter them out) or embed without "
            "masking",
        )
    return X


def check_obs(obs: pd.DataFrame, columns: Sequence[str]) -> None:
    """Refuse column names that the observation table does not have, naming those it has."""
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise MaeprobeInputError(
            f"the observation table has no column(s) {', '.join(map(repr, missing))}",
            f"use one of: {', '.join(map(str, obs.columns))}",
        )


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Labels 0..k-1 with 0 the largest cluster (ties: the cluster seen first)."""
    labels = np.asarray(labels)
    uniq, first, inverse, counts = np.unique(
        labels, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq))
    return rank[inverse.reshape(-1)]


# --------------------------------------------------------------------------- PCA


def pca(X: np.ndarray, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """Principal components of ``X`` (centred), float32 ``(n, min(n_components, n-1, d))``.

    Up to 2048 dimensions: the exact eigendecomposition of the d x d covariance (one pass
    over the rows, a second to project: 100x faster than sklearn's SVD on 100k x 144);
    wider inputs use sklearn's randomized solver. Signs follow sklearn's convention (the
    largest loading of each component is positive) so results do not flip between runs.
    """
    X = check_embeddings(X, min_rows=2)
    n, d = X.shape
    k = max(1, min(int(n_components), n - 1, d))
    if d <= 2048:
        mean = X.mean(axis=0, dtype=np.float64)
        Xc = X.astype(np.float64) - mean
        cov = Xc.T @ Xc / max(n - 1, 1)
        vals, vecs = np.linalg.eigh(cov)
        comps = vecs[:, ::-1][:, :k]
        signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(k)])
        comps = comps * np.where(signs == 0, 1, signs)
        return (Xc @ comps).astype(np.float32)
    from sklearn.decomposition import PCA

    model = PCA(n_components=k, svd_solver="randomized", random_state=seed)
    return model.fit_transform(X).astype(np.float32)


def _gpu_available() -> bool:
    """Whether a CUDA GPU is usable (via CuPy, which cuML needs, or else torch)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _cuml_umap():
    """cuML's UMAP class when cuML imports and a GPU is present, else ``None``."""
    try:
        from cuml.manifold import UMAP
    except Exception:
        return None
    return UMAP if _gpu_available() else None


def umap_embed(
    X: np.ndarray,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    max_fit: int = 20_000,
    balance_by: np.ndarray | None = None,
    backend: Literal["auto", "umap-learn", "cuml"] = "auto",
    progress: ProgressCallback | None = None,
    deterministic: bool = True,
) -> tuple[np.ndarray, dict]:
    """2D UMAP coordinates (float32 ``(n, 2)``) and how they were made.

    Up to ``max_fit`` rows: one umap-learn fit on every row. Beyond: fit on ``max_fit`` rows
    (equal counts per value of ``balance_by`` when given, e.g. per channel or dataset, else a
    uniform sample) and place the other rows with ``transform`` in chunks of
    ``TRANSFORM_CHUNK`` (progress per chunk; the callback can cancel). umap-learn's time grows
    with the rows it optimises: on 2 cores 1M 384-d rows took about 4 min this way, where a
    plain fit had not finished after 40 min, and 100k rows 23 s against 70 s, with the same
    trustworthiness (0.90 vs 0.89; docs/benchmarks.md).

    Deterministic by default: umap-learn runs with ``random_state=seed``, which makes it
    single-threaded, so the same rows give the same map (the napari view does not reshuffle
    on a re-run, and results can be cited). Measured on 20k ca-mae patch embeddings (384-d,
    2 cores): fit 8.7 s seeded vs 5.5 s parallel, ``transform`` of 50k rows 7.5 s vs 5.4 s,
    the same trustworthiness (0.892 vs 0.893): about 1.4x for 1M rows on 2 cores, more with
    more cores. ``deterministic=False`` drops the seed and uses every core (results then
    change from run to run). ``info`` holds ``strategy`` ("full" or "sample+transform"),
    ``fit_rows``, ``backend`` and ``seconds``.

    ``backend="auto"`` uses cuML's UMAP when cuML imports and a CUDA GPU is present; cuML fits
    every row (1M rows take seconds on a GPU), so ``max_fit`` applies to umap-learn only.
    """
    t0 = time.perf_counter()
    X = check_embeddings(X, min_rows=4)  # umap's spectral start fails on 3 rows
    n = X.shape[0]
    if n_neighbors < 2:
        raise MaeprobeInputError(f"n_neighbors={n_neighbors} is too small", "use 2 or more")
    k = int(min(n_neighbors, n - 1))
    if backend not in ("auto", "umap-learn", "cuml"):
        raise MaeprobeInputError(
            f"unknown UMAP backend {backend!r}", "use 'auto', 'umap-learn' or 'cuml'"
        )
    cuml_cls = _cuml_umap() if backend in ("auto", "cuml") else None
    if backend == "cuml" and cuml_cls is None:
        raise MaeprobeInputError(
            "cuML's UMAP is not usable here (cuml does not import or no CUDA GPU)",
            "install RAPIDS cuML on a machine with an NVIDIA GPU, or use backend='umap-learn'",
        )
    if balance_by is not None and len(balance_by) != n:
        raise MaeprobeInputError(
            f"balance_by has {len(balance_by)} values for {n} rows", "pass one value per row"
        )

    if cuml_cls is not None:
        report(progress, 0, n, "UMAP (cuML): fitting")
        model = cuml_cls(n_neighbors=k, min_dist=min_dist, n_components=2, random_state=seed)
        coords = np.asarray(_to_numpy(model.fit_transform(X)), dtype=np.float32)
        report(progress, n, n, "UMAP (cuML): fitting")
        info = {"strategy": "full", "fit_rows": n, "backend": "cuml"}
        return coords, info | {"seconds": time.perf_counter() - t0}

    import umap  # slow first import (numba)

    def make():
        seeding = {"random_state": seed, "n_jobs": 1} if deterministic else {"n_jobs": -1}
        return umap.UMAP(n_neighbors=k, min_dist=min_dist, n_components=2, **seeding)

    if n <= max_fit:
        report(progress, 0, n, "UMAP: fitting")
        coords = make().fit_transform(X).astype(np.float32)
        report(progress, n, n, "UMAP: fitting")
        info = {"strategy": "full", "fit_rows": n, "backend": "umap-learn"}
        return coords, info | {"seconds": time.perf_counter() - t0}

    if max_fit < k + 2:
        raise MaeprobeInputError(f"max_fit={max_fit} is too small", f"use at least {k + 2}")
    if balance_by is not None:
        fit_idx = balanced_indices(group_codes(pd.Series(balance_by)), max_fit, None, seed)
    else:
        fit_idx = np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))
    report(progress, 0, n, "UMAP: fitting on a sample")
    model = make()
    coords = np.empty((n, 2), dtype=np.float32)
    coords[fit_idx] = model.fit_transform(X[fit_idx])
    rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
    done = len(fit_idx)
    report(progress, done, n, "UMAP: mapping the other rows")
    for start in range(0, len(rest), TRANSFORM_CHUNK):
        chunk = rest[start : start + TRANSFORM_CHUNK]
        coords[chunk] = model.transform(X[chunk])
        done += len(chunk)
        report(progress, done, n, "UMAP: mapping the other rows")
    info = {"strategy": "sample+transform", "fit_rows": int(len(fit_idx)), "backend": "umap-learn"}
    return coords, info | {"seconds": time.perf_counter() - t0}


def _to_numpy(a) -> np.ndarray:
    """cuML may return CuPy arrays."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


# --------------------------------------------------------------------------- kNN graph


def nearest_neighbors(X: np.ndarray, k: int = 15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row, itself excluded: indices and Euclidean
    distances, ``(n, k)`` each, nearest first. Exact below ``EXACT_KNN_MAX`` rows,
    pynndescent (approximate, seeded) above."""
    X = check_embeddings(X, min_rows=2)
    n = X.shape[0]
    k = int(min(k, n - 1))
    if k < 1:
        raise MaeprobeInputError("k must be at least 1", "ask for one or more neighbours")
    if n <= EXACT_KNN_MAX:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X)
        dist, idx = nn.kneighbors(X)
    else:
        from pynndescent import NNDescent

        index = NNDescent(X, n_neighbors=k + 1, random_state=seed, n_jobs=-1)
        idx, dist = index.neighbor_graph
    return _drop_self(idx, dist, k)


def _drop_self(idx: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index (or, with duplicates, the last neighbour) -> (n, k)."""
    n = idx.shape[0]
    is_self = idx == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), idx.shape[1] - 1)
    keep = np.ones(idx.shape, dtype=bool)
    keep[np.arange(n), drop] = False
    idx = idx[keep].reshape(n, -1)[:, :k]
    dist = dist[keep].reshape(n, -1)[:, :k]
    return idx.astype(np.int64), dist.astype(np.float32)


def fuzzy_connectivities(idx: np.ndarray, dist: np.ndarray) -> sparse.csr_matrix:
    """UMAP's fuzzy simplicial set (``local_connectivity=1``, fuzzy union), as scanpy's
    ``connectivities``, from neighbours that exclude each row itself.

    The same numbers as ``umap.umap_.fuzzy_simplicial_set`` with ``n_neighbors = k + 1``
    (self included there), vectorised in NumPy so that clustering needs no umap import.
    """
    n, k = idx.shape
    d = dist.astype(np.float64)
    target = np.log2(k + 1)
    pos = d > 0
    rho = np.where(pos.any(axis=1), np.where(pos, d, np.inf).min(axis=1), 0.0)
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    active = np.ones(n, dtype=bool)  # rows still searching (umap stops each row on its own)
    for _ in range(64):
        a = np.flatnonzero(active)
        if a.size == 0:
            break
        shifted = np.maximum(d[a] - rho[a, None], 0) / mid[a, None]
        psum = np.where(pos[a], np.exp(-shifted), 1.0).sum(axis=1)
        done = np.abs(psum - target) < 1e-5
        big = psum > target
        hi[a] = np.where(big, mid[a], hi[a])
        lo[a] = np.where(big, lo[a], mid[a])
        step = np.where(np.isinf(hi[a]), mid[a] * 2, (lo[a] + hi[a]) / 2)
        mid[a] = np.where(done, mid[a], step)
        active[a[done]] = False
    mean_all = d.mean() * k / (k + 1)  # umap averages over neighbours incl. self (distance 0)
    mean_row = d.mean(axis=1) * k / (k + 1)
    sigma = np.where(rho > 0, np.maximum(mid, 1e-3 * mean_row), np.maximum(mid, 1e-3 * mean_all))
    val = np.exp(-(d - rho[:, None]) / sigma[:, None])
    val[(d - rho[:, None] <= 0) | (sigma[:, None] == 0)] = 1.0
    val[idx == np.arange(n)[:, None]] = 0.0
    P = sparse.csr_matrix((val.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), (n, n))
    P.eliminate_zeros()
    Pt = P.T.tocsr()
    G = (P + Pt - P.multiply(Pt)).tocsr()
    G.eliminate_zeros()
    return G


def knn_graph(
    X: np.ndarray,
    n_neighbors: int = 15,
    seed: int = 0,
    mode: Literal["connectivity", "distance"] = "connectivity",
) -> sparse.csr_matrix:
    """The kNN graph of the rows of ``X`` as a CSR matrix ``(n, n)``.

    ``n_neighbors`` counts the row itself, as in scanpy and umap (15 -> 14 other rows).
    ``connectivity``: symmetric fuzzy weights in (0, 1] (scanpy's ``connectivities``);
    ``distance``: the directed Euclidean distances to each row's neighbours.
    Exact search below ``EXACT_KNN_MAX`` rows, pynndescent above.
    """
    if n_neighbors < 2:
        raise MaeprobeInputError(f"n_neighbors={n_neighbors} is too small", "use 2 or more")
    idx, dist = nearest_neighbors(X, n_neighbors - 1, seed)
    n, k = idx.shape
    if mode == "distance":
        rows = np.repeat(np.arange(n), k)
        return sparse.csr_matrix((dist.ravel().astype(np.float64), (rows, idx.ravel())), (n, n))
    if mode != "connectivity":
        raise MaeprobeInputError(f"unknown graph mode {mode!r}", "use 'connectivity' or 'distance'")
    return fuzzy_connectivities(idx, dist)


# --------------------------------------------------------------------------- clustering


def leiden(
    X: np.ndarray | None,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    seed: int = 0,
    graph: sparse.spmatrix | None = None,
) -> np.ndarray:
    """Leiden clusters (as scanpy: RBConfiguration partition of the fuzzy kNN connectivities).

    Labels are 0..k-1 with 0 the largest cluster. ``graph`` (symmetric, weighted) skips the
    kNN search; otherwise it is :func:`knn_graph` of ``X``.
    """
    import igraph as ig

    if graph is None:
        if X is None:
            raise MaeprobeInputError("leiden needs embeddings or a graph", "pass X or graph")
        graph = knn_graph(X, n_neighbors, seed)
    graph = sparse.csr_matrix(graph)
    if graph.shape[0] != graph.shape[1]:
        raise MaeprobeInputError(f"the graph has shape {graph.shape}", "pass a square matrix")
    if (graph - graph.T).count_nonzero():
        graph = (graph + graph.T) / 2  # an undirected graph: symmetrise a directed one
    n = graph.shape[0]
    upper = sparse.triu(graph, k=1).tocoo()
    g = ig.Graph(n=n, edges=np.column_stack([upper.row, upper.col]), directed=False)
    g.es["weight"] = upper.data.astype(float)
    # igraph's own Leiden (C): the same RB-configuration/modularity objective as leidenalg
    # with resolution, 2 iterations as scanpy's igraph flavour; ~50x faster than leidenalg
    # run to convergence (0.3 s vs 16 s on 17,600 patch rows here). Seeded through igraph's RNG.
    import random

    state = random.getstate()
    random.seed(int(seed))
    ig.set_random_number_generator(random)
    try:
        part = g.community_leiden(
            objective_function="modularity", weights="weight",
            resolution=float(resolution), n_iterations=2,
        )  # fmt: skip
    finally:
        random.setstate(state)
    return _relabel_by_size(np.asarray(part.membership))


def kmeans(X: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels 0..k-1 (0 the largest cluster); MiniBatchKMeans above
    ``KMEANS_FULL_MAX`` rows."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    X = check_embeddings(X, min_rows=2)
    if not 1 <= int(k) <= X.shape[0]:
        raise MaeprobeInputError(
            f"k={k} clusters for {X.shape[0]} rows", f"use 1 <= k <= {X.shape[0]}"
        )
    if X.shape[0] > KMEANS_FULL_MAX:
        model = MiniBatchKMeans(n_clusters=int(k), random_state=seed, batch_size=4096, n_init=3)
    else:
        model = KMeans(n_clusters=int(k), random_state=seed, n_init=4)
    return _relabel_by_size(model.fit_predict(X))


# --------------------------------------------------------------------------- row filters


def _bool_column(obs: pd.DataFrame, column: str) -> np.ndarray:
    check_obs(obs, [column])
    col = obs[column]
    try:
        return col.astype("boolean").fillna(False).to_numpy(dtype=bool)
    except (TypeError, ValueError) as exc:
        raise MaeprobeInputError(
            f"column {column!r} is not boolean (dtype {col.dtype})", "pass True/False values"
        ) from exc


def foreground_mask(obs: pd.DataFrame) -> np.ndarray:
    """Rows whose patch is foreground (column ``foreground``; missing values count as not)."""
    return _bool_column(obs, "foreground")


def central_mask(obs: pd.DataFrame) -> np.ndarray:
    """Rows whose patch lies in the middle of its crop (column ``central``; NA -> False)."""
    return _bool_column(obs, "central")


def group_codes(values: pd.Series | pd.DataFrame) -> np.ndarray:
    """One integer per row for each distinct value (combination); NA is a group of its own."""
    if isinstance(values, pd.DataFrame):
        return values.groupby(list(values.columns), dropna=False, sort=True).ngroup().to_numpy()
    codes, _ = pd.factorize(values, use_na_sentinel=False, sort=True)
    return np.asarray(codes)


def _quotas(sizes: np.ndarray, n_total: int, rng: np.random.Generator) -> np.ndarray:
    """Rows to take per group: as equal as possible, small groups give all their rows."""
    quota = np.zeros(len(sizes), dtype=np.int64)
    remaining = int(min(n_total, sizes.sum()))
    order = np.argsort(sizes, kind="stable")
    for pos, g in enumerate(order):
        left = len(order) - pos
        share = remaining // left
        if sizes[g] <= share:
            quota[g] = sizes[g]
            remaining -= sizes[g]
            continue
        rest = order[pos:]  # every remaining group is at least this large
        quota[rest] = share
        extra = remaining - share * left
        if extra:
            quota[rng.choice(rest, extra, replace=False)] += 1
        break
    return quota


def balanced_indices(
    codes: np.ndarray, n_total: int | None, n_per_group: int | None, seed: int
) -> np.ndarray:
    """Row indices with as many rows per group (``codes``) as the groups allow: at most
    ``n_per_group`` each, or ``n_total`` in all, sorted."""
    rng = np.random.default_rng(seed)
    groups, inverse, sizes = np.unique(codes, return_inverse=True, return_counts=True)
    if n_per_group is None and n_total is None:
        quota = np.full(len(groups), sizes.min())
    else:
        quota = sizes.copy()
    if n_per_group is not None:
        quota = np.minimum(quota, int(n_per_group))
    if n_total is not None and quota.sum() > n_total:
        quota = _quotas(quota, int(n_total), rng)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    picked = [
        rng.choice(order[starts[g] : starts[g + 1]], quota[g], replace=False)
        for g in range(len(groups))
        if quota[g] > 0
    ]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def balanced_sample(
    obs: pd.DataFrame,
    by: str | list[str],
    n_total: int | None = None,
    n_per_group: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted positional row indices with equal counts per group of ``by`` (one column or a
    combination; NA is a group).

    ``n_per_group`` caps each group; ``n_total`` splits that many rows as equally as possible
    (groups smaller than their share give all their rows, the others split the rest). With
    neither, every group is cut to the size of the smallest one.
    """
    by = [by] if isinstance(by, str) else list(by)
    check_obs(obs, by)
    for name, value in (("n_total", n_total), ("n_per_group", n_per_group)):
        if value is not None and int(value) < 1:
            raise MaeprobeInputError(f"{name}={value}", f"use a positive {name} (or None)")
    if len(obs) == 0:
        return np.zeros(0, dtype=np.int64)
    codes = group_codes(obs[by[0]] if len(by) == 1 else obs[by])
    return balanced_indices(codes, n_total, n_per_group, seed).astype(np.int64)


def apply_filters(
    obs: pd.DataFrame,
    foreground: bool = False,
    central: bool = False,
    balance_by: str | list[str] | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted positional indices of the rows that pass the filters: foreground patches only,
    central patches only, equal counts per ``balance_by`` group (``max_rows`` in all, or the
    smallest group's size per group), or a uniform sample of ``max_rows``."""
    keep = np.ones(len(obs), dtype=bool)
    if foreground:
        keep &= foreground_mask(obs)
    if central:
        keep &= central_mask(obs)
    idx = np.flatnonzero(keep)
    if max_rows is not None and int(max_rows) < 1:
        raise MaeprobeInputError(f"max_rows={max_rows}", "use a positive number (or None)")
    if balance_by is not None:
        sub = balanced_sample(obs.iloc[idx], balance_by, n_total=max_rows, seed=seed)
        return idx[sub]
    if max_rows is not None and len(idx) > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(idx, int(max_rows), replace=False))
    return idx.astype(np.int64)


# --------------------------------------------------------------------------- effective rank


def effective_rank(X: np.ndarray) -> float:
    """RankMe (Garrido et al. 2023): ``exp(-sum p_k log p_k)`` with ``p_k = s_k / sum(s) + eps``
    over the singular values ``s`` of ``X``.

    As in the paper, ``X`` is used as it is, without centring (a large mean adds one strong
    direction; centre ``X`` yourself to ignore it). From the Gram matrix when ``n >> d``, so
    1M rows cost one pass.
    """
    X = check_embeddings(X, min_rows=1)
    n, d = X.shape
    if n > 4 * d:
        gram = np.zeros((d, d))
        for start in range(0, n, 100_000):
            block = X[start : start + 100_000].astype(np.float64)
            gram += block.T @ block
        s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None))
    else:
        s = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + RANKME_EPS
    return float(np.exp(-(p * np.log(p)).sum()))
