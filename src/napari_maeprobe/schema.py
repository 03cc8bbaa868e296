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

Roles say what a column stands for when it drives an embedding, so a verdict can say "patch
position", "an artefact of the crops" or "brightness" rather than a bare name:
``position`` (where a patch or cell lies), ``artefact`` (technical properties of a crop: padding,
image border, empty channel), ``intensity`` (brightness, size and density: what simple features
see), ``channel``, ``batch`` (data set, image, plate, imaging date), ``condition`` (treatment),
``identity`` (names of things), ``structure`` (patch content flags), ``analysis`` (results) and
``metadata`` (a user's column whose role is not known).

Per-channel columns (``mean_intensity``, ``norm_low``, ``norm_high``) are families: at the
channel level (one row per cell and channel) the plain name holds the row's channel; at the other
levels there is one column per channel, named :func:`channel_column` (``mean_intensity_DNA``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

Kind = Literal["identifier", "categorical", "ordinal", "continuous", "flag"]
Role = Literal["position", "artefact", "intensity", "channel", "batch", "condition", "identity",
               "structure", "analysis", "metadata"]  # fmt: skip
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
    role: Role = "metadata"
    per_channel: bool = False  # a family: one column per channel outside the channel level


COLUMNS: tuple[Column, ...] = (
    Column("level", "category", "categorical", "global, channel or patch", role="analysis"),
    Column("dataset", "category", "categorical", "the data set (folder) the image came from",
           role="batch"),
    Column("image", "category", "categorical", "the image's name (file name without extension)",
           role="batch"),
    Column("cell_id", "Int64", "identifier", "cell label in its image (tile index when tiled)",
           role="identity"),
    Column("channel", "category", "categorical", "marker channel (channel and patch levels)",
           role="channel"),
    Column("patch_row", "Int64", "ordinal", "row of the patch in the crop's grid",
           role="position"),
    Column("patch_col", "Int64", "ordinal", "column of the patch in the crop's grid",
           role="position"),
    Column("patch_z", "Int64", "ordinal", "z index of the patch (3D patches)", role="position"),
    Column("centroid_y", "float64", "continuous", "y of the cell's (or patch's) centre, px",
           role="position"),
    Column("centroid_x", "float64", "continuous", "x of the cell's (or patch's) centre, px",
           role="position"),
    Column("centroid_z", "float64", "continuous", "z of the cell's (or patch's) centre, px",
           role="position"),
    Column("patch_intensity", "float64", "continuous", "mean normalised intensity of the patch",
           role="intensity"),
    Column("foreground", "boolean", "flag",
           "patch intensity above the image's Otsu threshold (per channel when channels are "
           "kept apart)", role="structure"),
    Column("central", "boolean", "flag", "patch in the middle half of the crop",
           role="position"),
    Column("boundary_fraction", "float64", "continuous", "share of the patch on cell boundaries",
           role="structure"),
    Column("segmentation", "category", "categorical", "how the cells were found", False,
           role="batch"),
    # technical covariates of each cell (pp.measure): always filled where they apply
    Column("crop_padding", "float64", "continuous",
           "fraction of the cell's crop outside the image (zero-padded)", False,
           role="artefact"),
    Column("touches_border", "boolean", "flag", "the cell's mask touches the image border",
           False, role="artefact"),
    Column("cell_area", "float64", "continuous", "the cell's area (volume in 3D), px", False,
           role="intensity"),
    Column("cells_in_image", "float64", "continuous", "cells embedded from the image (density)",
           False, role="intensity"),
    Column("mean_intensity", "float64", "continuous",
           "the cell's mean intensity in raw units, before normalisation", False,
           role="intensity", per_channel=True),
    Column("norm_low", "float64", "continuous",
           "the lower statistic the image's channel was scaled with, raw units (percentile: "
           "the 1st percentile; zscore: the mean)", False,
           role="intensity", per_channel=True),
    Column("norm_high", "float64", "continuous",
           "the upper statistic the image's channel was scaled with, raw units (percentile: "
           "the 99.8th percentile; zscore: the standard deviation)", False,
           role="intensity", per_channel=True),
    Column("channel_empty", "boolean", "flag",
           "the row's channel is blank in the cell's crop (no signal after normalisation)",
           False, role="artefact"),
    Column("leiden", "category", "categorical", "Leiden cluster", False, "analyze",
           role="analysis"),
    Column("kmeans", "category", "categorical", "k-means cluster", False, "analyze",
           role="analysis"),
    Column("analysed", "boolean", "flag", "row passed the analysis filters", False, "analyze",
           role="analysis"),
)  # fmt: skip

BY_NAME: Mapping[str, Column] = {c.name: c for c in COLUMNS}
#: the contract's observation columns, in order
OBS_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.contract)
#: columns that ``maeprobe analyze`` writes
ANALYSIS_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.source == "analyze")
#: columns a user's metadata table may not redefine
RESERVED: frozenset[str] = frozenset(BY_NAME)
#: the per-channel families (:func:`channel_column`)
CHANNEL_FAMILIES: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.per_channel)
#: user column names that say "batch" (plate, imaging date, run): their role when not told
BATCH_NAMES = ("plate", "batch", "date", "run", "experiment", "replicate", "donor", "site_batch")
#: user column names that say "condition" (treatment)
CONDITION_NAMES = ("compound", "treatment", "condition", "perturbation", "drug", "moa",
                   "target", "genotype", "dose", "concentration")  # fmt: skip


def channel_column(family: str, channel: str) -> str:
    """The column of one channel of a per-channel family: ``mean_intensity_DNA``."""
    return f"{family}_{channel}"


def schema_column(name: str) -> Column | None:
    """The schema entry of a column: its own, or its family's for a per-channel column
    (``mean_intensity_DNA`` -> ``mean_intensity``); None for other (user) columns."""
    if name in BY_NAME:
        return BY_NAME[name]
    for family in CHANNEL_FAMILIES:
        if name.startswith(family + "_") and len(name) > len(family) + 1:
            return BY_NAME[family]
    return None


def column_role(name: str, condition: str | None = None, batch: str | None = None) -> Role:
    """What a column stands for (see the module docstring): the user's ``condition`` and
    ``batch`` columns as named, schema columns from the schema, other columns from their name
    (``plate``, ``date`` ... batch; ``compound``, ``treatment`` ... condition), else metadata."""
    if condition is not None and name == condition:
        return "condition"
    if batch is not None and name == batch:
        return "batch"
    col = schema_column(name)
    if col is not None:
        return col.role
    words = _words(name)
    if words & set(BATCH_NAMES):
        return "batch"
    if words & set(CONDITION_NAMES):
        return "condition"
    return "metadata"


def _words(name: str) -> set[str]:
    """The words of a column name: split on _ - . spaces and camelCase, lower case
    (``Metadata_Plate`` -> {metadata, plate}; ``candidate_score`` has no word ``date``)."""
    import re

    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name))
    words = {w.lower() for w in re.split(r"[\s_\-.]+", spaced) if w}
    return words | {w.rstrip("s") for w in words}  # plates, compounds, targets


#: integer user columns with these names (or name endings) are identifiers, never groups
IDENTIFIER_SUFFIXES = ("_id", "id", "_index", "objectnumber", "object_number", "_label")
IDENTIFIER_NAMES = frozenset({"label", "labels", "object", "index", "cell", "nucleus"})
#: an integer column with at most this many values is categorical (else continuous)
MAX_INT_LEVELS = 32
#: a float column with at most this many values is categorical (else continuous)
MAX_FLOAT_LEVELS = 10


def column_kind(name: str, values: pd.Series | None = None) -> Kind:
    """The kind of a column: from the schema for known columns, from the values otherwise
    (user metadata: text and booleans categorical; integers with few values categorical, names
    ending in ``id``/``index`` or naming a label number identifiers; other numbers
    continuous)."""
    col = schema_column(name)
    if col is not None:
        return col.kind
    if values is None:
        return "categorical"
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "flag"
    if not pd.api.types.is_numeric_dtype(dtype):
        return "categorical"
    n_unique = values.nunique(dropna=True)
    if pd.api.types.is_integer_dtype(dtype):
        if name.lower().endswith(IDENTIFIER_SUFFIXES) or name.lower() in IDENTIFIER_NAMES:
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
        entry = schema_column(col)
        if col not in out and entry is not None:
            out[col] = _as_dtype(frame[col], entry.dtype, n)
    for key, value in (metadata or {}).items():
        if key not in out and np.isscalar(value):
            out[key] = pd.Categorical([str(value)] * n)
    return pd.DataFrame(out)
