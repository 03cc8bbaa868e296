"""What drives these clusters: which metadata column (channel, patch position, cell, image,
plate, treatment, intensity, crop padding, ...) the clusters of an embedding follow, and how
much the embedding itself is organised by it.

For each column of the observation table :func:`what_drives` measures the adjusted mutual
information (AMI) between the clusters and the column against a permutation null, a bootstrap
interval of it, the kNN purity of the column in the embedding (against the same permutations)
and, for patch position columns, how well a linear model reads the position out of the
embedding. Every column is compared on the same rows (a missing value is a value of its own).
The verdict names what a driver is (batch, condition, patch position, a crop artefact,
brightness, ...), separates strong, weak and absent effects, and never ranks two columns whose
AMIs are within noise of each other. A model whose patch clusters follow ``patch_row`` has
learnt where a patch is more than what is in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import ProgressCallback, report
from napari_maeprobe.schema import ANALYSIS_COLUMNS, column_kind, column_role
from napari_maeprobe.tl.analysis import (
    balanced_indices,
    check_embeddings,
    check_obs,
    group_codes,
    nearest_neighbors,
)

#: columns that are never candidates: clusterings, bookkeeping, coordinates of maps
SKIP_COLUMNS = frozenset({"level", *ANALYSIS_COLUMNS, "crop_index", "row", "index"})
SKIP_PREFIXES = ("umap", "pca", "tsne", "x_umap", "x_pca", "x_tsne", "embedding")
#: continuous columns are cut into this many quantile bins
N_BINS = 10
#: the AMI scale's usual "little" level, kept for callers (the verdict uses the null instead)
AMI_THRESHOLD = 0.05
#: family-wise level of the permutation test: on pure noise, no column is called an effect in
#: 99 of 100 analyses, however many columns are tested
NULL_LEVEL = 0.01
#: the bootstrap interval (two-sided 95 %) inside which two AMIs are not told apart
TIE_LEVEL = 0.05
#: at or above this strength (see :func:`what_drives`) an effect is ``strong``
STRONG_STRENGTH = 0.5
#: kNN purity's null uses this many of the permutations (it costs n x k per permutation)
PURITY_PERMUTATIONS = 20

TABLE_COLUMNS = (
    "column",
    "kind",
    "role",
    "effect",
    "n_values",
    "n_rows",
    "missing",
    "ami",
    "ami_low",
    "ami_high",
    "ami_null",
    "p_value",
    "strength",
    "tier",
    "knn_purity",
    "purity_baseline",
    "purity_gain",
    "purity_z",
    "position_r2",
    "confounded_with",
    "null_unit",
)
#: table columns by type (h5ad keeps str / int / float columns as they are)
TEXT_COLUMNS = ("column", "kind", "role", "effect", "confounded_with", "null_unit")
INT_COLUMNS = ("n_values", "n_rows", "tier")
#: the column a metadata column can be perfectly confounded with (one value per image and one
#: image per value): the clusters cannot tell such a column from the field it was imaged in
CONFOUND_KEY = "image"


@dataclass
class DriversReport:
    """The ranked table (one row per metadata column, :data:`TABLE_COLUMNS`: AMI with its
    permutation null, p-value, bootstrap interval, effect class and tier, kNN purity with its
    z-score, role, missing fraction, the columns it cannot be told apart from), a one-line
    verdict, the name of the labels it explains, and the columns left out with the reason."""

    table: pd.DataFrame
    verdict: str
    labels_name: str
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (NaN as ``None``), for storing next to the embeddings."""
        records = [
            {k: _json_value(v) for k, v in row.items()} for row in self.table.to_dict("records")
        ]
        return {
            "verdict": self.verdict,
            "labels_name": self.labels_name,
            "columns": list(self.table.columns),
            "records": records,
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict) -> DriversReport:
        """Inverse of :meth:`to_dict` (tables written before a column existed get it empty)."""
        table = pd.DataFrame.from_records(data["records"], columns=data["columns"])
        return cls(
            _coerce_table(table), data["verdict"], data["labels_name"],
            dict(data.get("skipped", {})),
        )  # fmt: skip

    def to_uns(self) -> dict:
        """The form kept in ``AnnData.uns["maeprobe_drivers"][level]`` (and written to h5ad)."""
        return {
            "verdict": self.verdict,
            "labels": self.labels_name,
            "table": self.table.copy(),
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_uns(cls, data: dict) -> DriversReport:
        """Inverse of :meth:`to_uns` (also reads what an h5ad gives back)."""
        table = _coerce_table(pd.DataFrame(data["table"]))
        skipped = {str(k): str(v) for k, v in dict(data.get("skipped", {}) or {}).items()}
        return cls(table, str(data.get("verdict", "")), str(data.get("labels", "")), skipped)

    def __str__(self) -> str:
        return f"{self.verdict}\n{self.table.to_string(index=False, float_format='%.3f')}"


def _coerce_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the types of :data:`TABLE_COLUMNS` (text str, counts int64, measures
    float64; None and NA as "" or NaN), so that JSON, the store and h5ad give the same table."""
    table = table.reset_index(drop=True)
    for col in table.columns:
        if col in TEXT_COLUMNS:
            values = table[col].astype(object)
            table[col] = values.where(values.notna(), "").astype(str)
        elif col in INT_COLUMNS:
            values = pd.to_numeric(table[col], errors="coerce")
            table[col] = values.fillna(0).astype("int64")
        else:
            table[col] = pd.to_numeric(table[col], errors="coerce").astype("float64")
    return table


def _json_value(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    return v


# --------------------------------------------------------------------------- column handling


def column_kind_of(name: str, col: pd.Series) -> str:
    """``categorical``, ``continuous``, ``position`` (an ordinal patch grid coordinate) or
    ``identifier``, from the schema's kind of the column (:mod:`napari_maeprobe.schema`)."""
    kind = column_kind(name, col)
    if kind == "ordinal":
        return "position"
    if kind == "identifier":
        return "identifier"
    if kind == "continuous" and col.nunique(dropna=True) > N_BINS:
        return "continuous"
    return "categorical"


def _codes(col: pd.Series, kind: str) -> np.ndarray:
    """Integer codes per row (-1 for missing); continuous columns in quantile bins."""
    if kind == "continuous":
        values = pd.to_numeric(col, errors="coerce").astype("float64")
        bins = pd.qcut(values, N_BINS, labels=False, duplicates="drop")
        return np.asarray(bins.fillna(-1), dtype=np.int64)
    codes, _ = pd.factorize(col, use_na_sentinel=True, sort=True)
    return np.asarray(codes, dtype=np.int64)


def _skip_reason(name: str, col: pd.Series, kind: str, labels_col: str | None) -> str | None:
    if name == labels_col:
        return "the labels themselves"
    if kind == "identifier":
        return "an identifier (it names things, it does not group them)"
    non_na = col.dropna()
    if len(non_na) == 0:
        return "all values missing"
    n_unique = non_na.nunique()
    if n_unique < 2:
        return "one value only"
    if kind == "categorical" and n_unique == len(non_na):
        return "a different value on every row (an identifier)"
    return None


def confounded_with(obs: pd.DataFrame, name: str, key: str = CONFOUND_KEY) -> str | None:
    """``key`` when column ``name`` is perfectly confounded with it: at least two values, one
    value per ``key`` value and one ``key`` value per value (e.g. one genotype per field), so
    no analysis can separate the two; otherwise None. Rows missing either are left out."""
    if name == key or key not in obs.columns or name not in obs.columns:
        return None
    k = pd.factorize(obs[key], use_na_sentinel=True)[0]
    v = pd.factorize(obs[name], use_na_sentinel=True)[0]
    both = (k >= 0) & (v >= 0)
    k, v = k[both], v[both]
    if len(np.unique(v)) < 2:
        return None
    return key if same_partition(k, v) else None


def _default_columns(obs: pd.DataFrame, labels_col: str | None) -> list[str]:
    out = []
    for name in obs.columns:
        low = str(name).lower()
        if low in SKIP_COLUMNS or low.startswith(SKIP_PREFIXES) or name == labels_col:
            continue
        out.append(name)
    return out


# --------------------------------------------------------------------------- measures


def knn_purity(codes: np.ndarray, neighbors: np.ndarray) -> float:
    """Mean fraction of each row's neighbours with the row's value (rows with a missing value,
    code -1, are left out; a missing neighbour never matches)."""
    valid = codes >= 0
    if not valid.any():
        return float("nan")
    same = codes[neighbors[valid]] == codes[valid][:, None]
    return float(same.mean())


def purity_with_baseline(
    codes: np.ndarray, neighbors: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> tuple[float, float, float]:
    """kNN purity, its mean under permutations of the column, and the gain over chance
    ``(purity - baseline) / (1 - baseline)`` (1: neighbours always agree, 0: chance)."""
    purity = knn_purity(codes, neighbors)
    base = [knn_purity(rng.permutation(codes), neighbors) for _ in range(max(1, n_permutations))]
    baseline = float(np.mean(base))
    gain = (purity - baseline) / (1 - baseline) if baseline < 1 else float("nan")
    return purity, baseline, float(gain)


def position_r2(X: np.ndarray, y: np.ndarray, seed: int = 0, cv: int = 5) -> float:
    """Cross-validated R² of a ridge regression (standardised features, alpha chosen inside
    each training fold) predicting a patch position from the embedding.

    A regression rather than a classifier: the grid position is ordinal, and R² reads the
    same for 4 or 32 positions (0: no linear read-out, 1: exact).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    folds = KFold(n_splits=cv, shuffle=True, random_state=seed)
    scores = cross_val_score(model, X, y.astype(np.float64), cv=folds, scoring="r2")
    return float(np.mean(scores))


def _full_codes(codes: np.ndarray) -> np.ndarray:
    """Codes 0..K-1 with a missing value (-1) as a value of its own (the last code), so that
    every column is compared on the same rows."""
    codes = np.asarray(codes, dtype=np.int64).copy()
    missing = codes < 0
    if missing.any():
        codes[missing] = codes.max() + 1 if (~missing).any() else 0
    return codes


def _xlogx(counts: np.ndarray, axis=None) -> np.ndarray:
    """Sum of ``c log c`` (0 log 0 = 0)."""
    from scipy.special import xlogy

    return xlogy(counts, counts).sum(axis=axis)


class _LabelNull:
    """The clusters, the permutations and the bootstrap resamples shared by every column, so
    that every column's null and interval come from the same draws (a paired comparison)."""

    def __init__(self, labels: np.ndarray, n_permutations: int, n_bootstrap: int,
                 rng: np.random.Generator) -> None:  # fmt: skip
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n = n = len(self.labels)
        self.R = int(self.labels.max()) + 1
        self.a = np.bincount(self.labels, minlength=self.R).astype(np.float64)
        self.h_labels = float(np.log(n) - _xlogx(self.a) / n)
        base = np.arange(n, dtype=np.int64)
        self.perms = rng.permuted(np.tile(base, (max(1, n_permutations), 1)), axis=1)
        # bootstrap: row weights of resamples with replacement (multinomial counts)
        self.weights = rng.multinomial(n, np.full(n, 1.0 / n), size=max(1, n_bootstrap)).astype(
            np.float64
        )
        wa = np.stack([np.bincount(self.labels, w, minlength=self.R) for w in self.weights])
        self.boot_xlogx_a = _xlogx(wa, axis=1)

    def _chunk(self, K: int, total: int) -> int:
        return max(1, min(total, (1 << 22) // max(1, self.R * K)))

    def ami_parts(self, codes: np.ndarray, shuffled: np.ndarray | None = None) -> dict:
        """AMI (sklearn's arithmetic normalisation, with its expected MI), the strength (the
        same adjusted MI over the smaller entropy) and the null MI of each permutation
        (``shuffled``: the column's values shuffled by whole blocks, one row per draw, instead
        of the shared row permutations; see :func:`block_shuffles`)."""
        from sklearn.metrics.cluster._expected_mutual_info_fast import (
            expected_mutual_information,
        )

        n, R = self.n, self.R
        K = int(codes.max()) + 1
        b = np.bincount(codes, minlength=K).astype(np.float64)
        table = np.bincount(self.labels * K + codes, minlength=R * K).reshape(R, K)
        emi = float(expected_mutual_information(table[:, b > 0][self.a > 0], n))
        h_col = float(np.log(n) - _xlogx(b) / n)
        const = np.log(n) - (_xlogx(self.a) + _xlogx(b)) / n

        def mi_of(xlogx_ij: np.ndarray) -> np.ndarray:
            return np.maximum(xlogx_ij / n + const, 0.0)

        mi = float(mi_of(_xlogx(table.astype(np.float64))))
        if shuffled is not None:  # block shuffles change the column's marginal: its own
            null = np.array([
                max(np.log(n) + (_xlogx(np.bincount(self.labels * K + c, minlength=R * K)
                                        .astype(np.float64))
                                 - _xlogx(self.a) - _xlogx(np.bincount(c, minlength=K)
                                                           .astype(np.float64))) / n, 0.0)
                for c in shuffled
            ])  # fmt: skip
            return {"mi": mi, "emi": emi, "h_col": h_col, "null_mi": null, "K": K}
        null = np.empty(len(self.perms))
        lab_k = self.labels * K
        step = self._chunk(K, len(self.perms))
        for s in range(0, len(self.perms), step):
            idx = self.perms[s : s + step]
            flat = (lab_k[None, :] + codes[idx]) + (np.arange(len(idx)) * R * K)[:, None]
            counts = np.bincount(flat.ravel(), minlength=len(idx) * R * K).astype(np.float64)
            null[s : s + step] = mi_of(_xlogx(counts.reshape(len(idx), -1), axis=1))
        return {"mi": mi, "emi": emi, "h_col": h_col, "null_mi": null, "K": K}

    def adjusted(self, mi, emi: float, h_col: float, average: str = "arithmetic"):
        """(MI - EMI) / (normaliser - EMI) as sklearn computes it (guarding 0 / 0)."""
        norm = (self.h_labels + h_col) / 2 if average == "arithmetic" else min(self.h_labels, h_col)
        eps = np.finfo("float64").eps
        den = norm - emi
        den = min(den, -eps) if den < 0 else max(den, eps)
        num = np.asarray(mi, dtype=np.float64) - emi
        num = np.where(num < 0, np.minimum(num, -eps), np.maximum(num, eps))
        return num / den

    def bootstrap_ami(self, codes: np.ndarray, emi: float) -> np.ndarray:
        """The column's AMI in every bootstrap resample (the expected MI held fixed)."""
        n, R = self.n, self.R
        K = int(codes.max()) + 1
        out = np.empty(len(self.weights))
        lab_k = self.labels * K + codes
        step = self._chunk(K, len(self.weights))
        for s in range(0, len(self.weights), step):
            w = self.weights[s : s + step]
            m = len(w)
            flat = (lab_k[None, :] + (np.arange(m) * R * K)[:, None]).ravel()
            tab = np.bincount(flat, weights=w.ravel(), minlength=m * R * K).reshape(m, R, K)
            xb = _xlogx(tab.sum(axis=1), axis=1)
            mi = np.log(n) + (_xlogx(tab, axis=(1, 2)) - self.boot_xlogx_a[s : s + m] - xb) / n
            h_l = np.log(n) - self.boot_xlogx_a[s : s + m] / n
            h_c = np.log(n) - xb / n
            den = np.maximum((h_l + h_c) / 2 - emi, np.finfo("float64").eps)
            out[s : s + m] = (np.maximum(mi, 0.0) - emi) / den
        return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two code arrays split the rows the same way (a one-to-one map between their
    values), e.g. plate and imaging date when each plate was imaged on its own date."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    n_a, n_b = len(np.unique(a)), len(np.unique(b))
    if n_a != n_b:
        return False
    return len(np.unique(a * (int(b.max()) + 1) + b)) == n_a


def block_shuffles(
    obs: pd.DataFrame, codes: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray | None, str]:
    """The null draws of a column that is constant within a block of rows: its values
    shuffled between whole images (a column such as plate or compound, fixed per field) or
    between whole cells (a cell's covariate repeated on its channel or patch rows). Cells of
    one field are not independent, so shuffling such a column over single rows would call
    any field-to-field difference an effect of the column. Returns (draws, block name), or
    (None, "") for a column that varies within cells (rows are then the units)."""
    for block in (["image"], ["image", "cell_id"]):
        if not set(block) <= set(obs.columns):
            continue
        key = pd.factorize(pd.MultiIndex.from_frame(obs[block].astype(str)))[0]
        n_blocks = int(key.max()) + 1
        if n_blocks >= len(codes) or n_blocks < 2:
            continue
        first = np.full(n_blocks, -1, dtype=np.int64)
        first[key[::-1]] = codes[::-1]  # one value per block (the first row's)
        if not np.array_equal(first[key], codes):
            continue  # varies within a block
        draws = np.stack([rng.permutation(first)[key] for _ in range(max(1, n))])
        return draws, "image" if block == ["image"] else "cell"
    return None, ""


# --------------------------------------------------------------------------- roles


#: what a driver is, by role (column-specific wording in :data:`ROLE_WORDS_BY_COLUMN`)
ROLE_WORDS = {
    "position": "position",
    "artefact": "an artefact",
    "intensity": "brightness",
    "channel": "marker channel",
    "batch": "batch",
    "condition": "condition",
    "structure": "patch content",
}
ROLE_WORDS_BY_COLUMN = {
    "patch_row": "patch position",
    "patch_col": "patch position",
    "patch_z": "patch position",
    "central": "patch position",
    "centroid_y": "position in the image",
    "centroid_x": "position in the image",
    "centroid_z": "position in the image",
    "crop_padding": "a crop artefact: cells at the image edge, zero-padded crops",
    "touches_border": "a crop artefact: cells cut by the image border",
    "channel_empty": "an artefact: empty channels",
    "cell_area": "cell size",
    "cells_in_image": "cell density",
    "norm_low": "the image's normalisation",
    "norm_high": "the image's normalisation",
}


def role_words(name: str, condition: str | None = None, batch: str | None = None) -> str:
    """What a driver is, in words a biologist reads ("batch", "condition", "patch position",
    "a crop artefact: ...", "brightness"), from :func:`napari_maeprobe.schema.column_role`;
    "" for a column whose role is not known."""
    from napari_maeprobe.schema import schema_column

    role = column_role(name, condition, batch)
    if role in ("batch", "condition"):
        return ROLE_WORDS[role]
    entry = schema_column(name)
    key = entry.name if entry is not None else name
    return ROLE_WORDS_BY_COLUMN.get(key, ROLE_WORDS.get(role, ""))


# --------------------------------------------------------------------------- the report


def what_drives(
    X: np.ndarray,
    obs: pd.DataFrame,
    labels: np.ndarray | pd.Series | str,
    columns: list[str] | None = None,
    n_neighbors: int = 15,
    n_permutations: int = 100,
    max_rows: int = 20_000,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    labels_name: str | None = None,
    condition: str | None = None,
    batch: str | None = None,
    n_bootstrap: int = 100,
) -> DriversReport:
    """Rank the metadata columns by how much the clusters (or a selection) follow them, and say
    which effects are strong, weak or within noise.

    ``labels``: one cluster label per row, a boolean selection (selected vs the rest), or the
    name of an ``obs`` column (e.g. ``"leiden"``). Rows with a missing label are left out;
    above ``max_rows`` rows a sample balanced by label is used. ``condition`` / ``batch``: the
    user's treatment and batch columns, so the verdict calls them so (other columns get their
    role from :func:`napari_maeprobe.schema.column_role`). Identifiers are never candidates.

    Every column is compared on the same rows: a missing value is a value of its own
    (continuous columns, in 10 quantile bins, get a bin of their own); ``missing`` is the
    fraction of rows missing. Per column:

    - ``ami``: adjusted mutual information with the labels (sklearn's, arithmetic
      normalisation); ``ami_low`` / ``ami_high``: its 95 % paired bootstrap interval over rows
      (the same resamples for every column, the expected MI held fixed);
    - ``p_value``: ``(1 + #null >= observed) / (1 + n_permutations)`` against the AMIs of the
      column's values shuffled over the rows (the same permutations for every column; the
      marginals do not change, so the expected MI and the normaliser are computed once);
      ``ami_null``: the level an AMI must exceed to count, family-wise over all columns tested
      (the 99th percentile of the largest standardised null AMI over the columns, scaled back
      to the column's own null), so that on pure noise no column is called an effect in 99 of
      100 analyses however many columns there are;
    - ``strength``: the same adjusted MI over the *smaller* of the two entropies (sklearn's
      ``average_method="min"``): 1 when one split nests in the other (clusters that are all of
      one plate, or plates that are whole clusters), 0 at chance, whatever the numbers of
      clusters and values. ``effect`` is ``none`` when the AMI does not exceed ``ami_null``,
      else ``strong`` at ``strength >= 0.5`` (the clusters carry at least half of what they
      could share with the column beyond chance: the midpoint of a bounded scale that does
      not depend on the numbers of clusters, values or rows, not fitted to any data set) and
      ``weak`` below;
    - ``tier``: 1 for the effects not separable from the top one (the bootstrap interval of
      the AMI difference covers 0), 2 for those not separable from the best of the rest, ...;
      0 for no effect. The verdict names the first tier together and says "more than" only
      across a gap beyond noise;
    - ``knn_purity`` / ``purity_baseline`` / ``purity_gain`` / ``purity_z``: how often a
      row's ``n_neighbors`` nearest neighbours in ``X`` share its value, against the same
      permutations (the first 20) as mean, gain over chance and z-score;
    - ``position_r2`` for patch_row / patch_col / patch_z (see :func:`position_r2`);
    - ``confounded_with``: the other columns that split the rows the same way (one-to-one
      values, e.g. plate and imaging date), and ``image`` for a column with one value per
      image and one image per value. The verdict names such a group once.

    Sorted by AMI, then purity gain.
    """
    X = check_embeddings(X, min_rows=3)
    if len(obs) != X.shape[0]:
        raise MaeprobeInputError(
            f"the observation table has {len(obs)} rows but the embeddings have {X.shape[0]}",
            "pass the table that belongs to these embeddings (one row per embedding)",
        )
    labels_col = None
    if isinstance(labels, str):
        check_obs(obs, [labels])
        labels_col, labels = labels, obs[labels]
    lab = pd.Series(np.asarray(labels) if not isinstance(labels, pd.Series) else labels.values)
    if len(lab) != X.shape[0]:
        raise MaeprobeInputError(
            f"{len(lab)} labels for {X.shape[0]} rows", "pass one label per row of the embeddings"
        )
    is_selection = pd.api.types.is_bool_dtype(lab)
    name = labels_name or labels_col or ("selection" if is_selection else "clusters")
    subject = "the selection" if is_selection else "clusters"

    if columns is None:
        columns = _default_columns(obs, labels_col)
    else:
        check_obs(obs, columns)

    keep = np.flatnonzero(lab.notna().to_numpy())
    lab_codes = group_codes(lab.iloc[keep])
    if len(np.unique(lab_codes)) < 2:
        raise MaeprobeInputError(
            f"the {name} have a single value, so there is nothing to explain",
            "cluster with a higher resolution, or select part of the cells",
        )
    if len(keep) > max_rows:
        keep = keep[balanced_indices(lab_codes, max_rows, None, seed)]
        lab_codes = group_codes(lab.iloc[keep])
    Xs = X[keep]
    sub = obs.iloc[keep].reset_index(drop=True)
    n = len(keep)
    k = int(min(n_neighbors, n - 1))
    rng = np.random.default_rng(seed)

    report(progress, 0, len(columns) + 2, "what drives: neighbours")
    neighbors, _ = nearest_neighbors(Xs, k, seed)
    shared = _LabelNull(np.unique(lab_codes, return_inverse=True)[1], n_permutations,
                        n_bootstrap, rng)  # fmt: skip
    rows, skipped, parts = [], {}, []
    for i, col_name in enumerate(columns):
        report(progress, i + 1, len(columns) + 2, f"what drives: {col_name}")
        col = sub[col_name]
        kind = column_kind_of(col_name, col)
        if col_name in (condition, batch) and kind == "identifier":
            kind = "categorical"  # the user named it a treatment or batch (plate_id: 1, 2, ..)
        reason = _skip_reason(col_name, obs[col_name], kind, labels_col)
        if reason is None and column_role(col_name, condition, batch) == "identity":
            reason = "an identifier (it names things, it does not group them)"
        raw = _codes(col, kind) if reason is None else None
        codes = _full_codes(raw) if raw is not None else None
        if reason is None and len(np.unique(codes)) < 2:
            reason = "one value only in the rows analysed"
        if reason:
            skipped[col_name] = reason
            continue
        valid = raw >= 0
        blocks, unit = (
            (None, "") if col_name == "image" else block_shuffles(sub, codes, n_permutations, rng)
        )
        est = shared.ami_parts(codes, blocks)
        ami = float(shared.adjusted(est["mi"], est["emi"], est["h_col"]))
        null = shared.adjusted(est["null_mi"], est["emi"], est["h_col"])
        purity = knn_purity(codes, neighbors)
        draws = (blocks[:PURITY_PERMUTATIONS] if blocks is not None
                 else [codes[p] for p in shared.perms[:PURITY_PERMUTATIONS]])  # fmt: skip
        base = np.array([knn_purity(d, neighbors) for d in draws])
        baseline = float(base.mean())
        sd = float(base.std(ddof=1)) if len(base) > 1 else float("nan")
        r2 = float("nan")
        if kind == "position" and valid.sum() >= 10:
            y = pd.to_numeric(col[valid]).to_numpy(dtype=np.float64)
            r2 = position_r2(Xs[valid], y, seed)
        parts.append({"codes": codes, "est": est, "null": null, "kind": kind})
        rows.append(
            {
                "column": col_name,
                "kind": kind,
                "role": role_words(col_name, condition, batch),
                "effect": "none",
                "n_values": int(len(np.unique(raw[valid]))),
                "n_rows": int(n),
                "missing": float(1 - valid.mean()),
                "ami": ami,
                "ami_low": float("nan"),
                "ami_high": float("nan"),
                "ami_null": float("nan"),
                "p_value": float((1 + np.sum(null >= ami - 1e-12)) / (1 + len(null))),
                "strength": float(shared.adjusted(est["mi"], est["emi"], est["h_col"], "min")),
                "tier": 0,
                "knn_purity": purity,
                "purity_baseline": baseline,
                "purity_gain": (purity - baseline) / (1 - baseline) if baseline < 1 else np.nan,
                "purity_z": (purity - baseline) / sd if sd > 0 else float("nan"),
                "position_r2": r2,
                "confounded_with": confounded_with(obs, col_name) or "",
                "null_unit": unit or "row",
            }
        )
    report(progress, len(columns) + 1, len(columns) + 2, "what drives: noise and ties")
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    if len(table):
        _calibrate(table, parts, shared)
        order = table.sort_values(
            ["ami", "purity_gain"], ascending=False, na_position="last", kind="stable"
        ).index.to_numpy()
        table = table.loc[order].reset_index(drop=True)
        parts = [parts[i] for i in order]
        boot = _tiers(table, parts, shared)
    else:
        boot = {}
    report(progress, len(columns) + 2, len(columns) + 2, "what drives: done")
    table = _coerce_table(table)
    return DriversReport(table, _verdict(table, subject, boot), name, skipped)


def _calibrate(table: pd.DataFrame, parts: list[dict], shared: _LabelNull) -> None:
    """``ami_null`` (family-wise, max over the standardised nulls), ``effect`` and the
    same-split groups in ``confounded_with``."""
    nulls = np.stack([p["null"] for p in parts], axis=1)  # permutations x columns
    mean = nulls.mean(axis=0)
    sd = nulls.std(axis=0)
    safe = np.where(sd > 0, sd, 1.0)
    z_max = ((nulls - mean) / safe).max(axis=1)
    crit = float(np.quantile(z_max, 1 - NULL_LEVEL))
    limit = mean + crit * sd if len(parts) > 1 else np.quantile(nulls, 1 - NULL_LEVEL, axis=0)
    table["ami_null"] = limit
    beyond = table["ami"].to_numpy() > limit + 1e-12
    strong = table["strength"].to_numpy() >= STRONG_STRENGTH
    table["effect"] = np.where(beyond, np.where(strong, "strong", "weak"), "none")
    # columns that split the rows the same way (categorical kinds only: bins of continuous
    # columns can coincide without meaning anything)
    cats = [i for i, p in enumerate(parts) if p["kind"] != "continuous"]
    names = table["column"].tolist()
    for a in cats:
        same = [names[b] for b in cats if b != a and parts[a]["est"]["K"] == parts[b]["est"]["K"]
                and same_partition(parts[a]["codes"], parts[b]["codes"])]  # fmt: skip
        if same:
            old = [w for w in str(table.at[a, "confounded_with"]).split(", ") if w]
            table.at[a, "confounded_with"] = ", ".join(dict.fromkeys(same + old))


def _tiers(table: pd.DataFrame, parts: list[dict], shared: _LabelNull) -> dict:
    """Bootstrap intervals of every column's AMI, and tiers of the effects (see
    :func:`what_drives`). Returns the bootstrap AMIs of the effects by column name."""
    boot = {}
    for i, p in enumerate(parts):
        values = shared.bootstrap_ami(p["codes"], p["est"]["emi"])
        # resampling with replacement inflates MI (repeated rows), more for columns with many
        # values: centre each column's resamples on its AMI so that the bias cancels
        values = values - values.mean() + table.at[i, "ami"]
        table.at[i, "ami_low"] = float(np.quantile(values, TIE_LEVEL / 2))
        table.at[i, "ami_high"] = float(np.quantile(values, 1 - TIE_LEVEL / 2))
        if table.at[i, "effect"] != "none":
            boot[table.at[i, "column"]] = values
    effects = [c for c in table["column"] if c in boot]
    tier, best = 0, None
    tiers = {}
    for c in effects:  # in AMI order
        if best is None or separable(boot[c], boot[best]):
            tier, best = tier + 1, c
        tiers[c] = tier
    table["tier"] = [tiers.get(c, 0) for c in table["column"]]
    return boot


def separable(lower: np.ndarray, upper: np.ndarray) -> bool:
    """Whether the AMI of one column (``lower``'s bootstrap values) is below another's
    (``upper``'s, the same resamples) beyond noise: the two-sided 95 % interval of the
    difference excludes 0."""
    return bool(np.quantile(np.asarray(upper) - np.asarray(lower), TIE_LEVEL / 2) > 0)


def _units(table: pd.DataFrame) -> list[list[int]]:
    """The effects as groups of rows (columns splitting the rows the same way together), in
    AMI order."""
    effects = [i for i in range(len(table)) if table.at[i, "effect"] != "none"]
    units, seen = [], set()
    for i in effects:
        if i in seen:
            continue
        same = {w for w in str(table.at[i, "confounded_with"]).split(", ") if w}
        group = [j for j in effects if j == i or (table.at[j, "column"] in same and j not in seen)]
        seen.update(group)
        units.append(group)
    return units


def _entry(table: pd.DataFrame, unit: list[int], with_role: bool = True, digits: int = 2) -> str:
    names = " / ".join(str(table.at[j, "column"]) for j in unit)
    role = _unit_role(table, unit)
    what = [role] if role and with_role else []
    if len(unit) > 1:
        what.append("the same split of the rows")
    what.append(f"AMI {table.at[unit[0], 'ami']:.{digits}f}")
    return f"{names} ({'; '.join(what)})"


def _unit_role(table: pd.DataFrame, unit: list[int]) -> str:
    roles = [str(table.at[j, "role"]) for j in unit if str(table.at[j, "role"])]
    return " and ".join(dict.fromkeys(roles))


def _verdict(table: pd.DataFrame, subject: str, boot: dict | None = None) -> str:
    """One line: what the clusters follow (strong, or weakly), named with what each driver
    is; drivers within noise of each other together and unranked; "more than" only across a
    gap beyond noise; no column of effect ``none`` named as a driver."""
    plain = subject.removeprefix("the ")
    if table.empty:
        return f"no metadata column to compare the {plain} with"
    boot = boot or {}
    units = _units(table) if "effect" in table.columns else []
    if not units:
        top = table.iloc[0]
        return (
            f"no metadata column explains the {plain} beyond chance "
            f"(highest AMI: {top['column']} {top['ami']:.2f}, within noise)"
        ) + _confounded_note(table)
    names = [str(table.at[u[0], "column"]) for u in units]
    top = names[0]
    lead = [u for u, c in zip(units, names)
            if c == top or c not in boot or not separable(boot[c], boot[top])]  # fmt: skip
    shown = lead[:3]
    # a gap beyond noise that rounds away at two decimals is shown at three
    rest = [float(table.at[u[0], "ami"]) for u in units if u not in lead]
    last = float(table.at[lead[-1][0], "ami"])
    digits = 3 if rest and f"{last:.2f}" == f"{rest[0]:.2f}" else 2
    roles = {_unit_role(table, u) for u in shown}
    if len(shown) > 1 and len(roles) == 1 and all(len(u) == 1 for u in shown):
        role = roles.pop()
        amis = ", ".join(f"{table.at[u[0], 'ami']:.{digits}f}" for u in shown)
        what = "; ".join(w for w in (role, f"AMI {amis}", "not separable") if w)
        text = " and ".join(str(table.at[u[0], "column"]) for u in shown) + f" ({what})"
    else:
        text = " and ".join(_entry(table, u, digits=digits) for u in shown)
        if len(shown) > 1:
            text += " (not separable from each other)"
    if len(lead) > len(shown):
        text += f" (and {len(lead) - len(shown)} more within noise)"
    weak = all(table.at[u[0], "effect"] == "weak" for u in shown)  # "weakly" only if all are
    verb = "follows" if subject == "the selection" else "follow"
    line = f"{subject} {'weakly ' if weak else ''}{verb} {text}"
    lead_names = {str(table.at[u[0], "column"]) for u in lead}
    for u in units:
        c = str(table.at[u[0], "column"])
        if c in lead_names or c not in boot:
            continue
        if all(m in boot and separable(boot[c], boot[m]) for m in lead_names):
            line += f", more than {_entry(table, u, digits=digits)}"
        break
    return line + _confounded_note(table)


def _per_image_covariate(name: str) -> bool:
    """A technical column that holds one value per image by construction (cells per image,
    the image's normalisation statistics): its one-value-per-image flag says nothing new."""
    from napari_maeprobe.schema import schema_column

    entry = schema_column(name)
    return entry is not None and entry.name in ("cells_in_image", "norm_low", "norm_high")


def _confounded_note(table: pd.DataFrame) -> str:
    """The verdict's note on columns perfectly confounded with the image (field)."""
    if "confounded_with" not in table.columns:
        return ""
    names = [str(c) for c, w in zip(table["column"], table["confounded_with"])
             if c != CONFOUND_KEY and CONFOUND_KEY in str(w).split(", ")
             and not _per_image_covariate(str(c))]  # fmt: skip
    if not names:
        return ""
    what = " and ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
    verb = "has" if len(names) == 1 else "have"
    return (
        f"; {what} {verb} one value per image and one image per value, so "
        f"{'it' if len(names) == 1 else 'they'} cannot be separated from the field (image)"
    )
