"""The colour policy: one rule for how each column is coloured, shared by the explorer's
scatter, the report's figures and the ``uns[f"{column}_colors"]`` of the exports.

- categorical columns (and flags, identifiers): tab10 up to 10 categories, tab20 up to 20, then
  Glasbey-style colours, each the farthest in CIELAB from those chosen before;
- ordinal columns (patch row / column / z): stepped viridis, one step per value;
- continuous columns: viridis between the 1st and 99th percentiles.
Missing values are light grey everywhere.
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
#: an ordinal column with more distinct values than this is coloured as continuous
MAX_ORDINAL_STEPS = 32
#: at most this many distinct categorical colours (identifiers with more values repeat them)
MAX_DISTINCT = 256


def color_kind(name: str, values: pd.Series | None = None) -> ColorKind:
    """How a column is coloured, from its schema kind (see :mod:`napari_maeprobe.schema`)."""
    kind = column_kind(name, values)
    if kind == "ordinal":
        if values is not None and values.nunique(dropna=True) > MAX_ORDINAL_STEPS:
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
    fixed = _srgb_to_lab(np.vstack([seed[:, :3], NA_RGBA[:3], (1.0, 1.0, 1.0)]))
    dist = np.min(((lab[:, None, :] - fixed[None, :, :]) ** 2).sum(-1), axis=1)
    out = []
    for _ in range(k):
        i = int(np.argmax(dist))
        out.append(cand[i])
        dist = np.minimum(dist, ((lab - lab[i]) ** 2).sum(-1))
    return np.column_stack([np.asarray(out).reshape(-1, 3), np.ones(k)])


@lru_cache(maxsize=32)
def categorical_palette(k: int) -> np.ndarray:
    """``k`` RGBA colours: tab10 (k <= 10), tab20 (k <= 20), then Glasbey-like extras."""
    if k > MAX_DISTINCT:  # more categories than distinguishable colours: the palette repeats
        return np.resize(categorical_palette(MAX_DISTINCT), (k, 4)).astype(np.float32)
    from matplotlib import colormaps

    if k <= 10:
        pal = np.asarray(colormaps["tab10"].colors)[:k]
    else:
        tab20 = np.asarray(colormaps["tab20"].colors)
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
