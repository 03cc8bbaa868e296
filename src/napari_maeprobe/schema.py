"""The observation columns: one place that defines each one.

Every table of rows (the store's units, the level table in memory, both exports, the explorer,
the report and the diagnostics) takes its column names, order, dtypes and kinds from here.
Adding a column is one entry in :data:`COLUMNS` (and, where it is computed, the code that fills
it).

Kinds decide how a column is treated downstream:

- ``identifier``: names a thing (``cell_id``); never a candidate driver, never a colour scale.
- ``categorical``: unordered groups (``image``, ``channel``, ``leiden``, user metadata).
- ``ordinal``: ordered small integers (``patch_row``, ``patch_col``, ``patch_z``): a stepped
  colour scale, and a linear read-out in the diagnostics.
- ``continuous``: numbers (centroids, intensities, fractions).
- ``flag``: booleans (``foreground``, ``central``, ``analysed``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

Kind = Literal["identifier", "categorical", "ordinal", "continuous", "flag"]
KINDS: tuple[Kind, ...] = ("identifier", "categorical", "ordinal", "continuous", "flag")
LEVELS = ("global", "channel", "patch")


@dataclass(frozen=True)
class Column:
    """One observation column: its name, pandas dtype, kind and what it means."""

    name: str
    dtype: str  # "category" | "Int64" | "float64" | "boolean"
    kind: Kind
    description: str
    contract: bool = True  # one of the contract's obs columns (docs/contract.md), in order
    source: str = "embed"  # who fills it: embed | analyze | metadata


COLUMNS: tuple[Column, ...] = (
    Column("level", "category", "categorical", "global, channel or patch"),
    Column("dataset", "category", "categorical", "the data set (folder) the image came from"),
    Column("image", "category", "categorical", "the image's name (file name without extension)"),
    Column("cell_id", "Int64", "identifier", "cell label in its image (tile index when tiled)"),
    Column("channel", "category", "categorical", "marker channel (channel and patch levels)"),
    Column("patch_row", "Int64", "ordinal", "row of the patch in the crop's grid"),
    Column("patch_col", "Int64", "ordinal", "column of the patch in the crop's grid"),
    Column("patch_z", "Int64", "ordinal", "z index of the patch (3D patches)"),
    Column("centroid_y", "float64", "continuous", "y of the cell's (or patch's) centre, px"),
    Column("centroid_x", "float64", "continuous", "x of the cell's (or patch's) centre, px"),
    Column("centroid_z", "float64", "continuous", "z of the cell's (or patch's) centre, px"),
    Column("patch_intensity", "float64", "continuous", "mean normalised intensity of the patch"),
    Column("foreground", "boolean", "flag",
           "patch intensity above the image's Otsu threshold (per channel when channels are "
           "kept apart)"),  # fmt: skip
    Column("central", "boolean", "flag", "patch in the middle half of the crop"),
    Column("boundary_fraction", "float64", "continuous", "share of the patch on cell boundaries"),
    Column("segmentation", "category", "categorical", "how the cells were found", False),
    Column("leiden", "category", "categorical", "Leiden cluster", False, "analyze"),
    Column("kmeans", "category", "categorical", "k-means cluster", False, "analyze"),
    Column("analysed", "boolean", "flag", "row passed the analysis filters", False, "analyze"),
)  # fmt: skip

BY_NAME: Mapping[str, Column] = {c.name: c for c in COLUMNS}
#: the contract's observation columns, in order
OBS_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.contract)
#: columns that ``maeprobe analyze`` writes
ANALYSIS_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.source == "analyze")
#: columns a user's metadata table may not redefine
RESERVED: frozenset[str] = frozenset(BY_NAME)

#: an integer column with at most this many values is categorical (else continuous)
MAX_INT_LEVELS = 32
#: a float column with at most this many values is categorical (else continuous)
MAX_FLOAT_LEVELS = 10


def column_kind(name: str, values: pd.Series | None = None) -> Kind:
    """The kind of a column: from the schema for known columns, from the values otherwise
    (user metadata: text and booleans categorical; integers with few values categorical, names
    ending in ``id``/``index`` identifiers; other numbers continuous)."""
    if name in BY_NAME:
        return BY_NAME[name].kind
    if values is None:
        return "categorical"
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "flag"
    if not pd.api.types.is_numeric_dtype(dtype):
        return "categorical"
    n_unique = values.nunique(dropna=True)
    if pd.api.types.is_integer_dtype(dtype):
        if name.lower().endswith(("_id", "id", "_index")):
            return "identifier"
        return "categorical" if n_unique <= MAX_INT_LEVELS else "continuous"
    return "categorical" if n_unique <= MAX_FLOAT_LEVELS else "continuous"


def _as_dtype(values, dtype: str, n: int) -> pd.Series | pd.Categorical | np.ndarray:
    if values is None:
        values = pd.Series([pd.NA] * n, dtype="object")
    s = pd.Series(values).reset_index(drop=True)
    if dtype == "category":
        return s.astype("string").astype("category")
    if dtype == "Int64":
        return s.astype("Float64").round().astype("Int64")
    if dtype == "float64":
        return s.astype("Float64").astype(np.float64)
    if dtype == "boolean":
        return s.astype("boolean")
    raise ValueError(f"unknown schema dtype {dtype!r}")


def conform(
    frame: pd.DataFrame, level: str, metadata: Mapping[str, object] | None = None
) -> pd.DataFrame:
    """``frame`` as a level's observation table: every contract column in order with its dtype
    (missing ones NA), then the other schema columns ``frame`` has, then the image's metadata
    (each a categorical column holding one value)."""
    n = len(frame)
    out = {"level": pd.Categorical([level] * n)}
    for col in OBS_COLUMNS[1:]:
        out[col] = _as_dtype(frame[col] if col in frame else None, BY_NAME[col].dtype, n)
    for col in frame.columns:  # other schema columns (working columns such as crop_index go)
        if col not in out and col in BY_NAME:
            out[col] = _as_dtype(frame[col], BY_NAME[col].dtype, n)
    for key, value in (metadata or {}).items():
        if key not in out and np.isscalar(value):
            out[key] = pd.Categorical([str(value)] * n)
    return pd.DataFrame(out)
