"""What drives these clusters: which metadata column (channel, patch position, cell, image,
intensity, ...) the clusters of an embedding follow, and how much the embedding itself is
organised by it.

For each column of the observation table :func:`what_drives` measures the adjusted mutual
information between the clusters and the column, the kNN purity of the column in the embedding
(against a permutation baseline) and, for patch position columns, how well a linear model reads
the position out of the embedding. A model whose patch clusters follow ``patch_row`` has learnt
where a patch is more than what is in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import ProgressCallback, report
from napari_maeprobe.schema import ANALYSIS_COLUMNS, column_kind
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
#: below this AMI no column "explains" the clusters
AMI_THRESHOLD = 0.05

TABLE_COLUMNS = (
    "column",
    "kind",
    "n_values",
    "n_rows",
    "ami",
    "knn_purity",
    "purity_baseline",
    "purity_gain",
    "position_r2",
    "confounded_with",
)
#: the column a metadata column can be perfectly confounded with (one value per image and one
#: image per value): the clusters cannot tell such a column from the field it was imaged in
CONFOUND_KEY = "image"


@dataclass
class DriversReport:
    """The ranked table (one row per metadata column), a one-line verdict, the name of the
    labels it explains, and the columns left out with the reason."""

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
        table = pd.DataFrame.from_records(data["records"], columns=data["columns"])
        for col in table.columns:
            if col not in ("column", "kind", "confounded_with"):
                values = pd.to_numeric(table[col], errors="coerce")  # None -> NaN
                table[col] = values.astype("int64" if col in ("n_values", "n_rows") else "float64")
        return cls(table, data["verdict"], data["labels_name"], dict(data.get("skipped", {})))

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
        table = pd.DataFrame(data["table"])
        skipped = {str(k): str(v) for k, v in dict(data.get("skipped", {}) or {}).items()}
        return cls(table, str(data.get("verdict", "")), str(data.get("labels", "")), skipped)

    def __str__(self) -> str:
        return f"{self.verdict}\n{self.table.to_string(index=False, float_format='%.3f')}"


def _json_value(v):
    if isinstance(v, (np.integer,)):
        return int(v)
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
    pair = pd.DataFrame({"k": obs[key].to_numpy(), "v": obs[name].to_numpy()}).dropna()
    pair = pair.astype(str).drop_duplicates()
    if pair["v"].nunique() < 2:
        return None
    one_each = not pair["k"].duplicated().any() and not pair["v"].duplicated().any()
    return key if one_each else None


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


# --------------------------------------------------------------------------- the report


def what_drives(
    X: np.ndarray,
    obs: pd.DataFrame,
    labels: np.ndarray | pd.Series | str,
    columns: list[str] | None = None,
    n_neighbors: int = 15,
    n_permutations: int = 5,
    max_rows: int = 20_000,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    labels_name: str | None = None,
) -> DriversReport:
    """Rank the metadata columns by how much the clusters (or a selection) follow them.

    ``labels``: one cluster label per row, a boolean selection (selected vs the rest), or the
    name of an ``obs`` column (e.g. ``"leiden"``). Rows with a missing label are left out;
    above ``max_rows`` rows a sample balanced by label is used. For each column: ``ami``
    (adjusted mutual information with the labels; continuous columns in 10 quantile bins),
    ``knn_purity`` / ``purity_baseline`` / ``purity_gain`` (how often a row's
    ``n_neighbors`` nearest neighbours in ``X`` share its value, against shuffled values) and,
    for patch_row / patch_col / patch_z, ``position_r2`` (see :func:`position_r2`). Sorted
    by AMI, then purity gain.
    """
    from sklearn.metrics import adjusted_mutual_info_score

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

    report(progress, 0, len(columns) + 1, "what drives: neighbours")
    neighbors, _ = nearest_neighbors(Xs, k, seed)
    rows, skipped = [], {}
    for i, col_name in enumerate(columns):
        report(progress, i + 1, len(columns) + 1, f"what drives: {col_name}")
        col = sub[col_name]
        kind = column_kind_of(col_name, col)
        reason = _skip_reason(col_name, obs[col_name], kind, labels_col)
        if reason is None and col.nunique(dropna=True) < 2:
            reason = "one value only in the rows analysed"
        if reason:
            skipped[col_name] = reason
            continue
        codes = _codes(col, kind)
        valid = codes >= 0
        ami = adjusted_mutual_info_score(lab_codes[valid], codes[valid])
        purity, baseline, gain = purity_with_baseline(codes, neighbors, n_permutations, rng)
        r2 = float("nan")
        if kind == "position":
            y = pd.to_numeric(col[valid]).to_numpy(dtype=np.float64)
            r2 = position_r2(Xs[valid], y, seed)
        rows.append(
            {
                "column": col_name,
                "kind": kind,
                "n_values": int(len(np.unique(codes[valid]))),
                "n_rows": int(valid.sum()),
                "ami": float(ami),
                "knn_purity": purity,
                "purity_baseline": baseline,
                "purity_gain": gain,
                "position_r2": r2,
                "confounded_with": confounded_with(obs, col_name) or "",
            }
        )
    report(progress, len(columns) + 1, len(columns) + 1, "what drives: done")
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    if len(table):
        table = table.sort_values(
            ["ami", "purity_gain"], ascending=False, na_position="last", kind="stable"
        ).reset_index(drop=True)
    return DriversReport(table, _verdict(table, subject), name, skipped)


def _verdict(table: pd.DataFrame, subject: str) -> str:
    if table.empty:
        return f"no metadata column to compare the {subject.removeprefix('the ')} with"
    top = table.iloc[0]
    if not top["ami"] >= AMI_THRESHOLD:
        return (
            f"no metadata column explains the {subject.removeprefix('the ')} "
            f"(highest AMI: {top['column']} {top['ami']:.2f})"
        ) + _confounded_note(table)
    close = table[(table["ami"] >= max(AMI_THRESHOLD, 0.8 * top["ami"]))].head(3)
    lead = [f"{r['column']} (AMI {r['ami']:.2f})" for _, r in close.iterrows()]
    verb = "follows" if subject == "the selection" else "follow"
    line = f"{subject} {verb} {' and '.join(lead)}"
    if len(table) > len(close):
        nxt = table.iloc[len(close)]
        line += f" more than {nxt['column']} (AMI {nxt['ami']:.2f})"
    return line + _confounded_note(table)


def _confounded_note(table: pd.DataFrame) -> str:
    """The verdict's note on columns perfectly confounded with the image (field)."""
    if "confounded_with" not in table.columns:
        return ""
    names = [str(c) for c, w in zip(table["column"], table["confounded_with"])
             if isinstance(w, str) and w]  # fmt: skip
    if not names:
        return ""
    what = " and ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
    verb = "has" if len(names) == 1 else "have"
    return (f"; {what} {verb} one value per image and one image per value, so "
            f"{'it' if len(names) == 1 else 'they'} cannot be separated from the field (image)")
