"""The colour policy: palettes never use the NA, selection or highlight colours; ordinal
columns get stepped colours however they are stored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_maeprobe.pl import colors


def _lab(rgba) -> np.ndarray:
    return colors._srgb_to_lab(np.asarray(rgba, np.float64).reshape(-1, 4)[:, :3])


@pytest.mark.parametrize("k", [5, 15, 60, 256])
def test_no_palette_colour_is_near_the_highlight_selection_or_na_colours(k):
    pal = _lab(colors.categorical_palette(k))
    reserved = _lab(np.array(colors.RESERVED_RGBA))
    dist = np.sqrt(((pal[:, None, :] - reserved[None, :, :]) ** 2).sum(-1))
    assert dist.min() > 15.0, dist.min()  # CIELAB delta E: clearly different to the eye
    assert len(np.unique(pal.round(3), axis=0)) == k


def test_reserved_colours_are_what_the_scatter_draws():
    assert colors.HIGHLIGHT_RGBA == (1.0, 1.0, 1.0, 1.0)
    assert colors.HIGHLIGHT_OUTLINE_RGBA == (0.0, 0.0, 0.0, 1.0)
    assert {colors.NA_RGBA, colors.SELECTED_EDGE_RGBA} <= set(colors.RESERVED_RGBA)


@pytest.mark.parametrize("name", ["patch_row", "patch_col", "patch_z", "z"])
def test_ordinal_names_are_ordinal_however_stored(name):
    v = pd.Series(np.arange(60) % 12, dtype="Int64")
    for stored in (v, v.astype("category"), v.astype("string").astype("category"),
                   v.astype(float), v.astype(str)):  # fmt: skip
        assert colors.color_kind(name, stored) == "ordinal", stored.dtype
        np.testing.assert_array_equal(colors.numeric_values(stored), np.arange(60) % 12)
    many = pd.Series(np.arange(100))
    assert colors.color_kind(name, many) == "continuous"
    assert colors.color_kind(name, pd.Series(["top", "bottom"] * 5)) == "categorical"


def test_other_columns_keep_their_kind():
    assert colors.color_kind("leiden", pd.Series(["1", "2"], dtype="category")) == "categorical"
    assert colors.color_kind("centroid_z", pd.Series([1.0, 2.0])) == "continuous"
    assert colors.color_kind("foreground", pd.Series([True, False])) == "categorical"
    assert colors.color_kind("dose_um", pd.Series(np.linspace(0, 1, 50))) == "continuous"
    assert colors.color_kind("well", pd.Series(np.arange(40) % 8)) == "categorical"
