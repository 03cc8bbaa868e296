"""The explorer's scatter canvas on real patch data: colouring, selection tools, mouse, export."""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as MplPath

pytestmark = pytest.mark.gui

if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
    pytest.skip(
        "needs a display: run the tests with scripts/test.sh (Xvfb)", allow_module_level=True
    )

from vispy.util import keys  # noqa: E402

from napari_maeprobe._napari import scatter as scatter_mod  # noqa: E402
from napari_maeprobe._napari.scatter import LegendWidget, ScatterCanvas  # noqa: E402
from napari_maeprobe.io.samples import load_sample  # noqa: E402
from napari_maeprobe.pl import colors  # noqa: E402
from napari_maeprobe.pp.preprocessing import cell_crops, normalize, patch_table  # noqa: E402
from napari_maeprobe.pp.segmentation import segment  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _pcs(features: np.ndarray) -> np.ndarray:
    """The first two principal components (numpy SVD), a fast stand-in for UMAP."""
    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return (u[:, :2] * s[:2]).astype(np.float32)


@pytest.fixture(scope="module")
def real() -> tuple[np.ndarray, pd.DataFrame]:
    """One point per cell crop and 8x8 patch of the bundled Cell Painting field: coordinates
    are the first 2 PCs of the patch's mean intensity in the 6 channels."""
    image, labels = load_sample("cellpainting")
    if labels is None:
        labels = segment(image, "builtin").labels
    data = normalize(image.to_numpy(), name=image.name, channel_names=image.channel_names)
    crops = cell_crops(data, labels, 96, image.name, image.channel_names)
    table = patch_table(crops, 8, per_channel=True, dataset=image.dataset)
    keys_ = ["crop_index", "patch_row", "patch_col"]
    wide = table.pivot_table(
        index=keys_, columns="channel", values="patch_intensity", observed=True
    ).reset_index()
    first = table[table["channel"] == image.channel_names[0]].set_index(keys_)
    meta = first.loc[pd.MultiIndex.from_frame(wide[keys_])].reset_index(drop=True)
    channels = list(image.channel_names)
    xy = _pcs(np.log1p(wide[channels].to_numpy()))
    xy[::13] = np.nan  # rows "not analysed": hidden
    ok = np.isfinite(xy).all(axis=1)
    edges = np.quantile(xy[ok, 0], np.linspace(0, 1, 9)[1:-1])
    leiden = np.full(len(xy), None, dtype=object)
    leiden[ok] = np.searchsorted(edges, xy[ok, 0]).astype(str)
    obs = pd.DataFrame(
        {
            "leiden": pd.Categorical(leiden, categories=[str(i) for i in range(8)]),
            "brightest": wide[channels].idxmax(axis=1).astype(object),
            "cell_id": meta["cell_id"].to_numpy(),
            "cell": meta["cell_id"].astype(str).to_numpy(),
            "patch_row": wide["patch_row"].to_numpy(),
            "foreground": meta["foreground"].to_numpy(),
            "boundary_fraction": meta["boundary_fraction"].to_numpy(),
            "dna": wide["DNA"].to_numpy(),
        }
    )
    assert len(obs) == 40 * 144 and obs["cell_id"].nunique() > 32
    return xy, obs


@pytest.fixture
def canvas(qtbot, real) -> ScatterCanvas:
    sc = ScatterCanvas()
    qtbot.addWidget(sc)
    sc.resize(640, 480)
    sc.show()
    qtbot.waitExposed(sc)
    sc.set_data(*real)
    return sc


def _inside(xy: np.ndarray, rows: np.ndarray, poly: np.ndarray) -> np.ndarray:
    pts = xy[rows].astype(np.float32)
    return np.sort(rows[MplPath(poly).contains_points(pts)]).astype(np.int64)


def _isolated_row(xy: np.ndarray, rows: np.ndarray) -> int:
    """The visible row farthest from its nearest visible neighbour."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy[rows]).query(xy[rows], k=2)
    return int(rows[np.argmax(d[:, 1])])


def test_colour_by_categorical_and_continuous_legends(canvas, real):
    xy, obs = real
    legend_widget = LegendWidget(canvas)
    canvas.colour_by("leiden")
    tab10 = colors.categorical_palette(8)
    assert canvas.colour_kind == "categorical"
    # the legend lists what is drawn: the NA rows of leiden all lack coordinates
    assert [lab for lab, _ in canvas.legend()] == [str(i) for i in range(8)]
    np.testing.assert_allclose([c for _, c in canvas.legend()], tab10)
    assert legend_widget.labels() == [str(i) for i in range(8)]
    finite = np.isfinite(xy).all(axis=1)
    counts = [int((finite & (obs["leiden"] == str(i))).sum()) for i in range(8)]
    np.testing.assert_array_equal(canvas.legend_counts(), counts)
    assert legend_widget.texts() == [f"{i} ({n:,})" for i, n in enumerate(counts)]
    rgba = canvas.colours()
    np.testing.assert_allclose(rgba[~np.isfinite(xy[:, 0])], [colors.NA_RGBA] * 444)
    row = int(np.flatnonzero(obs["leiden"] == "5")[0])
    np.testing.assert_allclose(rgba[row], tab10[5])
    # the counts follow the filters (the widget follows the canvas)
    fg = obs["foreground"].to_numpy(bool)
    canvas.set_visible(fg)
    counts_fg = [int((fg & finite & (obs["leiden"] == str(i))).sum()) for i in range(8)]
    assert legend_widget.texts() == [f"{i} ({n:,})" for i, n in enumerate(counts_fg)]
    assert canvas.legend_info().n_shown == (fg & finite).sum()
    canvas.set_visible(None)
    # NA drawn: listed last, in the NA grey, with its count
    with_na = obs.copy()
    with_na.loc[np.flatnonzero(finite)[:7], "leiden"] = None
    canvas.set_data(xy, with_na)
    info = canvas.legend_info()
    assert info.entries[-1] == ("NA", colors.NA_RGBA, 7)
    assert legend_widget.texts()[-1] == "NA (7)"
    canvas.set_data(xy, obs)

    # patch row is ordinal (the schema says so): stepped viridis, one step per row, the same
    # colours as the report's; cell_id is an identifier, coloured as categories
    canvas.colour_by("patch_row")
    assert [lab for lab, _ in canvas.legend()] == [str(i) for i in range(12)]
    assert canvas.colour_kind == "ordinal"
    np.testing.assert_allclose([c for _, c in canvas.legend()], colors.ordinal_colors(12))
    canvas.colour_by("cell_id")
    assert canvas.colour_kind == "categorical"

    canvas.colour_by("boundary_fraction")
    v = obs["boundary_fraction"].to_numpy(np.float64)
    lo, hi = np.percentile(v, [1, 99])
    (lab_lo, c_lo), (lab_hi, c_hi) = canvas.legend()
    assert (lab_lo, lab_hi) == (f"{lo:.3g}", f"{hi:.3g}")
    np.testing.assert_allclose(c_lo, colors.viridis_lut()[0])
    np.testing.assert_allclose(c_hi, colors.viridis_lut()[-1])
    # a colour bar, not swatches: its ends are the clipping percentiles
    info = canvas.legend_info()
    assert info.kind == "continuous" and info.entries == []
    np.testing.assert_allclose(info.range, (lo, hi), rtol=1e-5)
    assert legend_widget.colour_bar.isVisibleTo(legend_widget)
    assert legend_widget.colour_bar.tick_labels()[::2] == (lab_lo, lab_hi)
    assert legend_widget.labels() == [lab_lo, lab_hi] and legend_widget.texts() == []

    # bool and strings are categorical; 40 string categories: distinct colours, all listed
    canvas.colour_by("foreground")
    assert [lab for lab, _ in canvas.legend()] == ["False", "True"]
    assert not legend_widget.colour_bar.isVisibleTo(legend_widget)
    canvas.colour_by("cell")
    cols = np.array([c for _, c in canvas.legend()])
    assert len(cols) == 40 and len(np.unique(cols.round(4), axis=0)) == 40
    np.testing.assert_allclose(cols[:20], colors.categorical_palette(20))
    assert len(legend_widget.labels()) == 40
    assert sum(int(t.rsplit("(", 1)[1].rstrip(")").replace(",", ""))
               for t in legend_widget.texts()) == finite.sum()  # fmt: skip
    canvas.colour_by(None)
    assert canvas.legend() == [] and legend_widget.labels() == []
    # the explorer's old way still works: entries by hand
    legend_widget.set_entries([("a", (1.0, 0.0, 0.0, 1.0)), ("b", (0.0, 0.0, 1.0, 1.0), 3)])
    assert legend_widget.texts() == ["a", "b (3)"]


@pytest.mark.parametrize("stored", ["Int64", "category", "str-category"])
def test_ordinal_columns_get_stepped_colours_however_stored(canvas, real, stored):
    xy, obs = real
    obs = obs.copy()
    z = pd.Series(np.arange(len(obs)) % 5, dtype="Int64")
    for col, v in (("patch_row", obs["patch_row"]), ("patch_col", obs["patch_row"]),
                   ("patch_z", z), ("z", z)):  # fmt: skip
        v = pd.Series(v).astype("Int64")
        if stored == "category":
            v = v.astype("category")
        elif stored == "str-category":
            v = v.astype("string").astype("category")
        obs[col] = v.array
    canvas.set_data(xy, obs)
    for col, steps in (("patch_row", 12), ("patch_col", 12), ("patch_z", 5), ("z", 5)):
        canvas.colour_by(col)
        assert canvas.colour_kind == "ordinal", (col, stored)
        labels = [lab for lab, _ in canvas.legend()]
        assert labels == [str(i) for i in range(steps)]  # low to high, not "0, 1, 10, 11, 2"
        np.testing.assert_allclose(
            [c for _, c in canvas.legend()], colors.ordinal_colors(steps), atol=1e-6
        )
        row = int(np.flatnonzero(np.isfinite(xy).all(axis=1))[3])
        value = int(str(obs[col].iloc[row]))
        np.testing.assert_allclose(canvas.colours([row])[0], colors.ordinal_colors(steps)[value])


def _blend(rgba, alpha: float) -> np.ndarray:
    """A colour drawn with ``alpha`` over the white background, 0-255."""
    rgb = np.asarray(rgba[:3], float)
    return 255 * (rgb * alpha + (1 - alpha))


@pytest.mark.parametrize("mode", ["markers", "raster"])
def test_unselected_points_are_dimmed_while_a_selection_exists(canvas, real, mode):
    xy, _ = real
    canvas.set_render_mode(mode)
    canvas.set_point_size(6)
    canvas.set_opacity(0.8)
    canvas.colour_by("leiden")
    rows = canvas.visible_rows()
    row = _isolated_row(xy, rows)
    other = _isolated_row(xy, rows[rows != row])

    def pixel(r):
        img = canvas._canvas.render()
        x, y = np.round(canvas.data_to_canvas(xy[r])).astype(int)
        return img[y, x, :3].astype(float)

    colour = canvas.colours([row])[0]
    np.testing.assert_allclose(pixel(row), _blend(colour, 0.8), atol=4)
    canvas.select([other])
    np.testing.assert_allclose(pixel(row), _blend(colour, 0.8 * scatter_mod.DIM), atol=4)
    np.testing.assert_allclose(pixel(other), 255 * canvas.colours([other])[0][:3], atol=4)
    canvas.select([])
    np.testing.assert_allclose(pixel(row), _blend(colour, 0.8), atol=4)
    # the highlight: a white ring outlined in black around the point's own colour
    canvas.highlight([row])
    img = canvas._canvas.render()
    x, y = np.round(canvas.data_to_canvas(xy[row])).astype(int)
    line = img[y, x - 14 : x + 1, :3].astype(int)
    assert (line.max(axis=1) < 80).any()  # black outline
    assert (line.min(axis=1) > 225).any()  # white ring
    np.testing.assert_allclose(line[-1], 255 * colour[:3], atol=4)


def test_lasso_selects_exactly_the_points_inside(canvas, real, qtbot):
    xy, _ = real
    visible = canvas.visible_rows()
    assert len(visible) == len(xy) - 444
    c = np.nanmedian(xy, axis=0)
    s = np.nanstd(xy, axis=0)
    poly = c + s * np.array([[-1.0, -0.8], [0.6, -1.1], [1.2, 0.2], [0.1, 1.0], [-0.9, 0.5]])
    expected = _inside(xy, visible, poly)
    assert 0.05 * len(visible) < len(expected) < 0.9 * len(visible)
    with qtbot.waitSignal(canvas.selection_changed) as sig:
        got = canvas.lasso_select(poly)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(sig.args[0], expected)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(canvas.selected(), expected)


def test_rect_select_and_shift_add_remove(canvas, real):
    xy, _ = real
    visible = canvas.visible_rows()
    v = xy[visible]
    x0, x1 = np.percentile(v[:, 0], [10, 40])
    y0, y1 = np.percentile(v[:, 1], [20, 70])
    a = canvas.rect_select(x1, y1, x0, y0)  # corners in any order
    inside_a = (v[:, 0] >= x0) & (v[:, 0] <= x1) & (v[:, 1] >= y0) & (v[:, 1] <= y1)
    np.testing.assert_array_equal(a, visible[inside_a])
    x2, x3 = np.percentile(v[:, 0], [60, 90])
    b = canvas.rect_select(x2, y0, x3, y1, add=True)
    inside_b = (v[:, 0] >= x2) & (v[:, 0] <= x3) & (v[:, 1] >= y0) & (v[:, 1] <= y1)
    np.testing.assert_array_equal(b, visible[inside_a | inside_b])
    canvas.select(visible[inside_a], mode="remove")
    np.testing.assert_array_equal(canvas.selected(), visible[inside_b & ~inside_a])
    only_b = canvas.rect_select(x2, y0, x3, y1)  # no shift: replaces
    np.testing.assert_array_equal(only_b, visible[inside_b])


def test_pick_cluster_selects_the_whole_visible_cluster(canvas, real):
    xy, obs = real
    finite = np.isfinite(xy).all(axis=1)
    row = int(np.flatnonzero(finite & (obs["leiden"] == "3"))[0])
    # default column without colouring: "leiden"
    got = canvas.pick_cluster(row)
    np.testing.assert_array_equal(got, np.flatnonzero(finite & (obs["leiden"] == "3")))
    # the categorical colour column becomes the default; add = union
    canvas.colour_by("brightest")
    other = int(np.flatnonzero(finite & (obs["brightest"] != obs["brightest"][row]))[0])
    canvas.pick_cluster(row)
    both = canvas.pick_cluster(other, add=True)
    want = finite & obs["brightest"].isin([obs["brightest"][row], obs["brightest"][other]])
    np.testing.assert_array_equal(both, np.flatnonzero(want))
    got = canvas.pick_cluster(row, column="cell_id")
    np.testing.assert_array_equal(
        got, np.flatnonzero(finite & (obs["cell_id"] == obs.cell_id[row]))
    )


def test_set_visible_hides_rows_from_drawing_and_selection(canvas, real, qtbot):
    xy, obs = real
    finite = np.isfinite(xy).all(axis=1)
    everything = np.array([[-1e3, -1e3], [1e3, -1e3], [1e3, 1e3], [-1e3, 1e3]])
    np.testing.assert_array_equal(canvas.lasso_select(everything), np.flatnonzero(finite))
    fg = obs["foreground"].to_numpy()
    with qtbot.waitSignal(canvas.selection_changed) as sig:  # hidden rows leave the selection
        canvas.set_visible(fg)
    np.testing.assert_array_equal(sig.args[0], np.flatnonzero(finite & fg))
    np.testing.assert_array_equal(canvas.visible_rows(), np.flatnonzero(finite & fg))
    np.testing.assert_array_equal(canvas.lasso_select(everything), np.flatnonzero(finite & fg))
    canvas.select(np.flatnonzero(~fg))  # hidden rows cannot be selected
    assert len(canvas.selected()) == 0
    row = int(np.flatnonzero(finite & fg & (obs["leiden"] == "2"))[0])
    np.testing.assert_array_equal(
        canvas.pick_cluster(row), np.flatnonzero(finite & fg & (obs["leiden"] == "2"))
    )
    canvas.set_visible(None)
    assert len(canvas.visible_rows()) == finite.sum()


def test_highlight_does_not_touch_the_selection(canvas, real, qtbot):
    sel = canvas.rect_select(-1e3, -1e3, 0, 1e3)
    hits = []
    canvas.selection_changed.connect(hits.append)
    canvas.highlight(np.arange(100, 1100))
    canvas.highlight(np.array([5, 7, 9]))
    np.testing.assert_array_equal(canvas.highlighted(), [5, 7, 9])
    np.testing.assert_array_equal(canvas.selected(), sel)
    assert hits == []
    canvas.highlight(None)
    assert len(canvas.highlighted()) == 0


@pytest.mark.parametrize("mode", ["markers", "raster"])
def test_drawn_points_sit_where_the_camera_maps_them(canvas, real, mode):
    xy, _ = real
    canvas.set_render_mode(mode)
    canvas.set_point_size(6)
    canvas.colour_by("leiden")
    row = _isolated_row(xy, canvas.visible_rows())
    canvas.select([row])
    assert canvas.rasterised == (mode == "raster")
    img = canvas._canvas.render()
    x, y = np.round(canvas.data_to_canvas(xy[row])).astype(int)
    want = np.round(np.asarray(canvas.colours([row])[0]) * 255)
    np.testing.assert_allclose(img[y, x], want, atol=3)  # the selected point, fully opaque
    # pan and zoom: the point follows the camera
    rect = canvas._camera.rect
    canvas._camera.rect = (rect.left + 0.2 * rect.width, rect.bottom, rect.width * 0.7, rect.height)
    canvas.redraw()
    img = canvas._canvas.render()
    x2, y2 = np.round(canvas.data_to_canvas(xy[row])).astype(int)
    assert (x2, y2) != (x, y)
    np.testing.assert_allclose(img[y2, x2], want, atol=3)
    canvas.set_opacity(0.3)
    canvas.highlight([row])
    assert img.shape[:2] == tuple(canvas._canvas.physical_size[::-1])


def test_mouse_click_emits_the_row_and_picks_its_cluster(canvas, real, qtbot):
    xy, obs = real
    row = _isolated_row(xy, canvas.visible_rows())
    pos = canvas.data_to_canvas(xy[row]) + 1.5  # a pixel or two off the centre
    canvas.kdtree()
    with qtbot.waitSignal(canvas.point_clicked) as clicked:
        canvas._canvas.events.mouse_press(pos=pos, button=1, modifiers=())
        canvas._canvas.events.mouse_release(pos=pos, button=1, modifiers=())
    assert clicked.args == [row]
    finite = np.isfinite(xy).all(axis=1)
    cluster = obs["leiden"][row]
    np.testing.assert_array_equal(
        canvas.selected(), np.flatnonzero(finite & (obs["leiden"] == cluster))
    )
    # shift-click on a point of another cluster adds that cluster
    other = int(np.flatnonzero(finite & (obs["leiden"] != cluster))[0])
    canvas.highlight([other])
    p2 = canvas.data_to_canvas(xy[other])
    picked = []
    canvas.point_clicked.connect(picked.append)
    canvas._canvas.events.mouse_press(pos=p2, button=1, modifiers=(keys.SHIFT,))
    canvas._canvas.events.mouse_release(pos=p2, button=1, modifiers=(keys.SHIFT,))
    assert len(picked) == 1
    got = obs["leiden"][picked[0]]
    want = finite & obs["leiden"].isin([cluster, got])
    np.testing.assert_array_equal(canvas.selected(), np.flatnonzero(want))
    # a click on empty space clears the selection
    canvas._canvas.events.mouse_press(pos=(2, 2), button=1, modifiers=())
    canvas._canvas.events.mouse_release(pos=(2, 2), button=1, modifiers=())
    assert len(canvas.selected()) == 0


def test_lasso_and_rect_tools_select_on_release(canvas, real):
    xy, _ = real
    canvas.set_tool("lasso")
    w, h = canvas._canvas.size
    path = np.array([[0.3, 0.3], [0.7, 0.25], [0.75, 0.6], [0.5, 0.8], [0.25, 0.6]]) * (w, h)
    ev = canvas._canvas.events
    ev.mouse_press(pos=path[0], button=1, modifiers=())
    for p in path[1:]:
        ev.mouse_move(pos=p, button=1, modifiers=())
    ev.mouse_release(pos=path[0], button=1, modifiers=())
    poly = np.array([canvas.canvas_to_data(p) for p in np.vstack([path, path[:1]])])
    expected = _inside(xy, canvas.visible_rows(), poly)
    assert len(expected) > 100
    np.testing.assert_array_equal(canvas.selected(), expected)

    canvas.set_tool("rect")
    a, b = np.array([0.1, 0.1]) * (w, h), np.array([0.4, 0.5]) * (w, h)
    ev.mouse_press(pos=a, button=1, modifiers=())
    ev.mouse_move(pos=b, button=1, modifiers=())
    ev.mouse_release(pos=b, button=1, modifiers=(keys.SHIFT,))
    (x0, y1), (x1, y0) = canvas.canvas_to_data(a), canvas.canvas_to_data(b)
    v = canvas.visible_rows()
    in_rect = v[(xy[v, 0] >= x0) & (xy[v, 0] <= x1) & (xy[v, 1] >= y0) & (xy[v, 1] <= y1)]
    np.testing.assert_array_equal(canvas.selected(), np.union1d(expected, in_rect))
    with pytest.raises(ValueError):
        canvas.set_tool("magic wand")


def test_export_png_and_svg(canvas, real, tmp_path, monkeypatch):
    from matplotlib.image import imread

    canvas.colour_by("leiden")
    canvas.set_labels("patch level", "UMAP")
    sel = canvas.rect_select(-1e3, -1e3, 0, 1e3)
    canvas.highlight([10, 20])
    title = canvas.figure_title()
    n_visible = len(canvas.visible_rows())
    assert title == (f"patch level, coloured by leiden, {n_visible:,} points, "
                     f"{len(sel):,} selected (highlighted, the rest dimmed)")  # fmt: skip
    png = canvas.export_image(tmp_path / "scatter.png")
    assert png.read_bytes()[:8] == PNG
    img = imread(png)
    h, w = img.shape[:2]
    assert 1000 < w < 3000 and 900 < h < 2500  # 200 dpi, the view plus axes and legend
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10

    svg = canvas.export_image(tmp_path / "scatter.svg")
    text = svg.read_text()
    root = ET.fromstring(text)
    ns = "{http://www.w3.org/2000/svg}"
    texts = ["".join(t.itertext()) for t in root.iter(f"{ns}text")]
    assert "UMAP 1" in texts and "UMAP 2" in texts and title in texts
    counts = canvas.legend_counts()
    for (label, _), n in zip(canvas.legend(), counts, strict=True):
        assert f"{label} ({n:,})" in texts
    assert "leiden (points shown)" in texts
    uses = root.iter(f"{ns}use")
    assert sum(1 for _ in uses) >= n_visible  # one vector marker per point
    assert not list(root.iter(f"{ns}image"))

    # a continuous column: a colour bar named after the column, no swatches
    canvas.colour_by("dna")
    root = ET.parse(canvas.export_image(tmp_path / "dna.svg")).getroot()
    texts = ["".join(t.itertext()) for t in root.iter(f"{ns}text")]
    assert "dna" in texts and "(1st-99th percentile)" in texts  # the bar's label, two lines
    assert not any(t.endswith(")") and t.split(" (")[0].isdigit() for t in texts)

    monkeypatch.setattr(scatter_mod, "SVG_VECTOR_MAX", 1000)
    root = ET.parse(canvas.export_image(tmp_path / "big.svg")).getroot()
    assert list(root.iter(f"{ns}image"))  # points embedded as a PNG
    with pytest.raises(ValueError):
        canvas.export_image(tmp_path / "scatter.jpg")


def test_export_lists_hundreds_of_categories(canvas, real, tmp_path):
    xy, obs = real
    obs = obs.assign(image=pd.Categorical([f"img{i % 300:03d}" for i in range(len(obs))]))
    canvas.set_data(xy, obs)
    canvas.colour_by("image")
    legend = LegendWidget(canvas)
    assert len(legend.labels()) == 300  # every category, in a scrolling list
    root = ET.parse(canvas.export_image(tmp_path / "images.svg")).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    texts = {"".join(t.itertext()) for t in root.iter(f"{ns}text")}
    assert {t for t in legend.texts()} <= texts


def test_raster_primitives_match_brute_force():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    px = rng.uniform(-3, 23, 400).astype(np.float32)
    py = rng.uniform(-3, 13, 400).astype(np.float32)
    want = np.full((10, 20), -1)
    for i, (x, y) in enumerate(zip(px, py)):
        if 0 <= x < 20 and 0 <= y < 10:
            want[int(y), int(x)] = i  # later points on top
    got = scatter_mod._splat(px.copy(), py.copy(), (10, 20))
    np.testing.assert_array_equal(got, want)
    for radius in (0.5, 1.0, 1.5, 2.5, 4.0):
        r = int(radius)
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disc = xx**2 + yy**2 <= radius**2 + 1e-6
        ref = ndimage.maximum_filter(got, footprint=disc, mode="constant", cval=-1)
        np.testing.assert_array_equal(scatter_mod._dilate(got, radius), ref)


def test_two_million_points_still_work(qtbot, real):
    xy, obs = real
    reps = -(-2_100_000 // len(xy))
    rng = np.random.default_rng(2)
    big = np.tile(xy, (reps, 1)) + rng.normal(0, 0.05, (reps * len(xy), 2)).astype(np.float32)
    big_obs = obs.iloc[np.tile(np.arange(len(obs)), reps)].reset_index(drop=True)
    sc = ScatterCanvas()
    qtbot.addWidget(sc)
    sc.resize(400, 300)
    sc.show()
    qtbot.waitExposed(sc)
    sc.set_data(big, big_obs)
    sc.colour_by("leiden")
    sc.set_point_size(2)
    assert sc.n_points == len(big) > 2_000_000
    img = sc._canvas.render()
    assert (img[..., :3] < 250).any()
    c = np.nanmedian(big, axis=0)
    sel = sc.lasso_select(c + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]))
    assert len(sel) > 10_000
    finite = np.isfinite(big).all(axis=1)
    assert (
        len(sc.pick_cluster(int(sel[0])))
        == (finite & (big_obs["leiden"] == big_obs["leiden"][sel[0]])).sum()
    )
    sc.highlight(sel[:1000])
    sc._canvas.render()
