"""The colour policy: one rule for how each column is coloured, shared by the explorer's
scatter, the report's figures and the ``uns[f"{column}_colors"]`` of the exports.

- categorical columns (and flags, identifiers): tab10 up to 10 categories, tab20 up to 20 (its
  light grey, too close to the NA grey, replaced), then Glasbey-style colours, each the farthest
  in CIELAB from those chosen before;
- ordinal columns (patch row / column / z, also when stored as categories of numbers): stepped
  viridis, one step per value from the lowest to the highest;
- continuous columns: viridis between the 1st and 99th percentiles.
Missing values are light grey everywhere. The explorer's selection and highlight colours
(:data:`SELECTED_EDGE_RGBA`, :data:`HIGHLIGHT_RGBA`, :data:`HIGHLIGHT_OUTLINE_RGBA`: black, white)
are never palette colours.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd

from napari_maeprobe.schema import column_kind

ColorKind = Literal["categorical", "ordinal", "continuous"]

#: the colour of missing values
NA_RGBA = (0.8, 0.8, 0.8, 1.0)
#: the edge of selected points in the explorer's scatter (near black)
SELECTED_EDGE_RGBA = (0.05, 0.05, 0.05, 1.0)
#: the ring of highlighted (clicked) points: white, outlined in black
HIGHLIGHT_RGBA = (1.0, 1.0, 1.0, 1.0)
HIGHLIGHT_OUTLINE_RGBA = (0.0, 0.0, 0.0, 1.0)
#: colours no categorical palette may use (NA, selection and highlight)
RESERVED_RGBA = (NA_RGBA, SELECTED_EDGE_RGBA, HIGHLIGHT_RGBA, HIGHLIGHT_OUTLINE_RGBA)
#: user columns with these names holding whole numbers are ordinal (z planes, grid positions)
ORDINAL_NAMES = frozenset(
    {"z", "z_index", "z_plane", "z_slice", "slice", "plane", "patch_z", "patch_row", "patch_col"}
)
#: an ordinal column spanning more values than this (highest - lowest + 1) is continuous
MAX_ORDINAL_SPAN = 256
#: an ordinal column with more distinct values than this is coloured as continuous
MAX_ORDINAL_STEPS = 32
#: at most this many distinct categorical colours (identifiers with more values repeat them)
MAX_DISTINCT = 256


def numeric_values(values: pd.Series) -> np.ndarray:
    """float64 values of a column (NaN where missing or not a number), also for categorical
    columns whose categories are numbers or numeric strings (one conversion per category)."""
    s = pd.Series(values) if not isinstance(values, pd.Series) else values
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = pd.to_numeric(
            pd.Series(np.asarray(s.cat.categories, dtype=object)), errors="coerce"
        ).to_numpy(dtype=np.float64, na_value=np.nan)
        codes = s.cat.codes.to_numpy()
        out = np.full(len(codes), np.nan)
        ok = codes >= 0
        out[ok] = cats[codes[ok]]
        return out
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def color_kind(name: str, values: pd.Series | None = None) -> ColorKind:
    """How a column is coloured, from its schema kind (see :mod:`napari_maeprobe.schema`).

    Ordinal columns (``patch_row``, ``patch_col``, ``patch_z``, and user columns named ``z``,
    ``plane``, ``slice``... holding whole numbers) get a stepped scale even when stored as
    categories; one with more than ``MAX_ORDINAL_STEPS`` values, or spanning more than
    ``MAX_ORDINAL_SPAN``, is continuous; one whose values are not numbers is categorical.
    """
    kind = column_kind(name, values)
    if kind != "ordinal" and str(name).lower() in ORDINAL_NAMES and values is not None:
        kind = "ordinal" if kind in ("categorical", "continuous") else kind
    if kind == "ordinal":
        if values is None:
            return "ordinal"
        v = numeric_values(values)
        ok = np.isfinite(v)
        if not ok.any():
            return "categorical" if values.notna().any() else "ordinal"
        if not np.all(v[ok] == np.round(v[ok])):
            return "continuous"
        if values.nunique(dropna=True) > MAX_ORDINAL_STEPS:
            return "continuous"
        if v[ok].max() - v[ok].min() + 1 > MAX_ORDINAL_SPAN:
            return "continuous"
        return "ordinal"
    if kind == "continuous":
        return "continuous"
    return "categorical"


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in [0, 1]."""
    c = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.column_stack(
        [116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])]
    )


def _glasbey(seed: np.ndarray, k: int) -> np.ndarray:
    """``k`` more colours, each the farthest (CIELAB) from all chosen so far (Glasbey et al.)."""
    levels = np.linspace(0.0, 1.0, 16)
    cand = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(cand)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    keep = (lab[:, 0] > 30) & (lab[:, 0] < 85) & (chroma > 20)  # not grey (NA), not white/black
    cand, lab = cand[keep], lab[keep]
    fixed = _srgb_to_lab(np.vstack([seed[:, :3], *[c[:3] for c in RESERVED_RGBA]]))
    dist = np.min(((lab[:, None, :] - fixed[None, :, :]) ** 2).sum(-1), axis=1)
    out = []
    for _ in range(k):
        i = int(np.argmax(dist))
        out.append(cand[i])
        dist = np.minimum(dist, ((lab - lab[i]) ** 2).sum(-1))
    return np.column_stack([np.asarray(out).reshape(-1, 3), np.ones(k)])


@lru_cache(maxsize=1)
def _tab20() -> np.ndarray:
    from matplotlib import colormaps

    tab20 = np.asarray(colormaps["tab20"].colors, dtype=np.float64)[:, :3]
    rest = np.delete(tab20, 15, axis=0)
    tab20[15] = _glasbey(rest, 1)[0, :3]
    return tab20


@lru_cache(maxsize=32)
def categorical_palette(k: int) -> np.ndarray:
    """``k`` RGBA colours: tab10 (k <= 10), tab20 (k <= 20), then Glasbey-like extras.

    tab20's light grey (199, 199, 199) is the NA grey to the eye: it is replaced by the
    Glasbey colour farthest from the other 19 (and from NA, selection and highlight)."""
    if k > MAX_DISTINCT:  # more categories than distinguishable colours: the palette repeats
        return np.resize(categorical_palette(MAX_DISTINCT), (k, 4)).astype(np.float32)
    from matplotlib import colormaps

    if k <= 10:
        pal = np.asarray(colormaps["tab10"].colors)[:k]
    else:
        tab20 = _tab20()
        pal = tab20[:k] if k <= 20 else np.vstack([tab20, _glasbey(tab20, k - 20)[:, :3]])
        pal = pal[:, :3]
    pal = np.column_stack([pal[:, :3], np.ones(len(pal))]).astype(np.float32)
    pal.setflags(write=False)
    return pal


@lru_cache(maxsize=1)
def viridis_lut() -> np.ndarray:
    """256 RGBA rows of viridis (read-only)."""
    from matplotlib import colormaps

    lut = colormaps["viridis"](np.linspace(0.0, 1.0, 256)).astype(np.float32)
    lut.setflags(write=False)
    return lut


def ordinal_colors(steps: int) -> np.ndarray:
    """``steps`` RGBA rows of stepped viridis, from the lowest value to the highest."""
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0.0, 1.0, max(int(steps), 1))).astype(np.float32)


def category_hex(k: int) -> list[str]:
    """``k`` categorical colours as ``#rrggbb`` (scanpy's ``uns[f"{key}_colors"]``)."""
    from matplotlib.colors import to_hex

    return [to_hex(c[:3]) for c in categorical_palette(k)]
