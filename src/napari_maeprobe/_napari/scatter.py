"""The explorer's scatter canvas: a vispy ``SceneCanvas`` for 100k to several million points.

``ScatterCanvas`` draws a 2-D embedding (UMAP/PCA) with a vispy ``Markers`` visual on the GPU.
Four visuals are layered: all visible points, the selected points (full opacity, dark edge,
on top of the rest, which is dimmed to ``DIM`` of its opacity while a selection exists) and
the highlighted points (larger, a white ring outlined in black, on top of all; no palette
colour is white or black, see :mod:`napari_maeprobe.pl.colors`).
Updates touch only what changed: a recolour rewrites the colour field of a preallocated
float32 vertex buffer; selection and highlight rebuild only their small overlay buffers.

Software OpenGL (Xvfb, VNC, remote desktops without a GPU: Mesa llvmpipe) needs about a second
to draw a million point sprites. With such a renderer and more than ``RASTER_AUTO_MIN`` visible
points, the base and selection layers are instead splatted on the CPU into an RGBA image of
the view's pixel size (vectorised numpy: point -> pixel, max-index per pixel so later rows lie
on top, a disc dilation for the point size) and shown as one texture, re-rasterised on pan and
zoom. ``set_render_mode`` forces either path. Selection, picking and lasso never depend on the
drawing path: they run on the float32 coordinates (bounding-box prefilter, matplotlib ``Path``,
and a ``cKDTree`` that ``set_data`` builds in a background thread once the data is drawn).

``LegendWidget(canvas)`` follows a canvas: every category with its colour and its count of
shown points (scrollable), or a colour bar for continuous columns. ``export_image`` writes a
matplotlib figure (PNG or SVG) with axes, a title (:meth:`ScatterCanvas.set_labels`) and the
legend or colour bar.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy import API_NAME
from qtpy.QtCore import QRectF, QSize, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QIcon, QImage, QPainter, QPixmap
from qtpy.QtWidgets import QLabel, QListWidget, QListWidgetItem, QSizePolicy, QVBoxLayout, QWidget
from vispy import scene
from vispy.scene.cameras import PanZoomCamera
from vispy.util import keys
from vispy.visuals import MarkersVisual
from vispy.visuals.transforms import STTransform

from napari_maeprobe.pl.colors import (
    HIGHLIGHT_OUTLINE_RGBA,
    HIGHLIGHT_RGBA,
    MAX_DISTINCT,
    NA_RGBA,
    SELECTED_EDGE_RGBA,
    categorical_palette,
    color_kind,
    numeric_values,
    ordinal_colors,
    viridis_lut,
)

TOOLS = ("pan", "lasso", "rect")
RENDER_MODES = ("auto", "markers", "raster")
DEFAULT_RGBA = (0.27, 0.51, 0.71, 1.0)
SELECTED_EDGE = SELECTED_EDGE_RGBA
HIGHLIGHT_EDGE = HIGHLIGHT_RGBA  # the ring of highlighted points (white) ...
HIGHLIGHT_OUTLINE = HIGHLIGHT_OUTLINE_RGBA  # ... outlined in black
OUTLINE_RGBA = (0.85, 0.1, 0.3, 1.0)
DIM = 0.25  # alpha factor of unselected points while a selection exists
RASTER_AUTO_MIN = 50_000
SVG_VECTOR_MAX = 200_000
FIGURE_RASTER_MIN = 50_000  # a saved PNG splats this many points or more as one image
MAX_FIGURE_LEGEND = 600  # a saved figure's legend lists at most this many entries
LEGEND_ROWS = 30  # rows per column of a saved figure's legend
CLICK_TOLERANCE_PX = 3.0
PICK_RADIUS_PX = 5.0
SOFTWARE_GL = ("llvmpipe", "softpipe", "swrast", "swiftshader", "lavapipe", "software")

_MARKER_DTYPE = np.dtype(
    [
        ("a_position", np.float32, 3),
        ("a_fg_color", np.float32, 4),
        ("a_bg_color", np.float32, 4),
        ("a_size", np.float32),
        ("a_edgewidth", np.float32),
        ("a_symbol", np.float32),
    ]
)
# vispy's Markers (0.17) keep one interleaved vertex buffer of this layout: upload it directly
_FAST_UPLOAD = hasattr(MarkersVisual, "_upload_data")
_DISC = float(MarkersVisual._symbol_shader_values.get("disc", 0))
_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maeprobe-kdtree")
    return _EXECUTOR


def _build_tree(xy: np.ndarray, rows: np.ndarray):
    from scipy.spatial import cKDTree

    pts = xy if len(rows) == len(xy) else xy[rows]
    return cKDTree(pts, balanced_tree=False, compact_nodes=False)


def _vispy_app():
    """The vispy app on the Qt binding that qtpy uses (a stray PyQt5 must not win)."""
    from vispy import app

    try:
        return app.use_app(API_NAME)
    except RuntimeError:  # a backend was chosen already (napari does so)
        return app.use_app()


# --------------------------------------------------------------------------------------------
# colours
# --------------------------------------------------------------------------------------------


def _codes(s: pd.Series) -> tuple[np.ndarray, list]:
    """Integer codes (-1 = NA) and the category values of a categorical-like column."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy().astype(np.int32), list(s.cat.categories)
    try:
        codes, uniques = pd.factorize(s, sort=True)
    except TypeError:  # mixed, unorderable objects
        codes, uniques = pd.factorize(s, sort=False)
    return codes.astype(np.int32), list(uniques)


def _short(label: str, n: int = 28) -> str:
    """A label cut to ``n`` characters, with matplotlib's mathtext ``$`` escaped."""
    label = str(label)
    label = label if len(label) <= n else label[: n - 1] + "\u2026"
    return label.replace("$", r"\$")


def _pack(rgba, alpha: float = 1.0) -> np.ndarray:
    """RGBA floats (a small LUT) to one uint32 per colour (R, G, B, A bytes in memory order)."""
    c = np.clip(np.asarray(rgba, np.float64).reshape(-1, 4), 0.0, 1.0) * 255.0
    c[:, 3] *= alpha
    return np.ascontiguousarray(np.round(c).astype(np.uint8)).view(np.uint32).ravel()


# --------------------------------------------------------------------------------------------
# the CPU raster path
# --------------------------------------------------------------------------------------------


def _splat(px: np.ndarray, py: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Index image (H, W) int32: the highest point index landing in each pixel, -1 where none.

    ``px``/``py`` are float32 pixel coordinates (overwritten): point i covers pixel
    ``(floor(py[i]), floor(px[i]))``.
    """
    h, w = shape
    # clip (no int overflow when zoomed in), then floor via truncation of positive values
    ix = (np.clip(px, -1.0, float(w), out=px) + np.float32(1.0)).astype(np.int32) - 1
    iy = (np.clip(py, -1.0, float(h), out=py) + np.float32(1.0)).astype(np.int32) - 1
    inside = (ix.view(np.uint32) < w) & (iy.view(np.uint32) < h)
    flat = iy * np.int32(w) + ix
    flat[~inside] = h * w  # a spare slot past the image
    img = np.full(h * w + 1, -1, np.int32)
    np.maximum.at(img, flat, np.arange(len(flat), dtype=np.int32))
    return img[:-1].reshape(h, w)


def _dilate(img: np.ndarray, radius: float) -> np.ndarray:
    """Grey dilation (max) of an index image with a disc of ``radius`` pixels (row-run form)."""
    r = int(math.floor(radius + 1e-6))
    if r <= 0:
        return img
    runs = [img]  # runs[k]: max over dx in [-k, k]
    for k in range(1, r + 1):
        cur = runs[-1].copy()
        np.maximum(cur[:, k:], img[:, :-k], out=cur[:, k:])
        np.maximum(cur[:, :-k], img[:, k:], out=cur[:, :-k])
        runs.append(cur)
    out = runs[r].copy()
    for dy in range(1, r + 1):
        h = runs[int(math.floor(math.sqrt(max(radius * radius - dy * dy, 0.0)) + 1e-6))]
        np.maximum(out[dy:], h[:-dy], out=out[dy:])
        np.maximum(out[:-dy], h[dy:], out=out[:-dy])
    return out


# --------------------------------------------------------------------------------------------
# vispy pieces
# --------------------------------------------------------------------------------------------


def _marker_buffer(
    x: np.ndarray,
    y: np.ndarray,
    face: np.ndarray,
    size: float,
    edge_width: float = 0.0,
    edge: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
) -> np.ndarray:
    """An interleaved vertex buffer in the layout of vispy's Markers visual."""
    buf = np.zeros(len(x), dtype=_MARKER_DTYPE)
    buf["a_position"][:, 0] = x
    buf["a_position"][:, 1] = y
    buf["a_bg_color"] = face
    buf["a_fg_color"] = edge
    buf["a_size"] = size
    buf["a_edgewidth"] = edge_width
    buf["a_symbol"] = _DISC
    return buf


# vispy's flat (non-spherical) markers ignore ``alpha`` (only its spherical lighting applies
# ``u_alpha``): these flat lighting functions apply it, so opacity and dimming cost one uniform
_FLAT_ALPHA_LIGHTING = """
vec4 apply_lighting(vec2 pointcoord, vec4 color) {
    return vec4(color.rgb, color.a * u_alpha);
}

void write_depth(vec2 pointcoord) {
}
"""


class _Points(scene.visuals.Markers):
    """A Markers visual fed with a prebuilt float32 buffer (no per-call colour parsing) whose
    ``alpha`` multiplies every point's opacity."""

    def _setup_lighting_functions(self, spherical):
        if spherical:  # pragma: no cover - never used here
            return super()._setup_lighting_functions(spherical)
        self.shared_program.frag["lighting_functions"] = _FLAT_ALPHA_LIGHTING

    def __init__(self, parent, order: int):
        super().__init__(parent=parent, scaling="fixed", antialias=1.0)
        self.order = order
        self.set_gl_state(
            depth_test=False, blend=True, blend_func=("src_alpha", "one_minus_src_alpha")
        )
        self.visible = False

    def upload(self, buf: np.ndarray | None) -> None:
        """Show ``buf`` (a ``_MARKER_DTYPE`` array); ``None`` or empty hides the visual."""
        if buf is None or len(buf) == 0:
            self.visible = False
            return
        if _FAST_UPLOAD:
            self._data = buf
            self._vbo.set_data(buf)
            for name in buf.dtype.names:
                self.shared_program[name] = self._vbo[name]
            self.update()
        else:  # pragma: no cover - older vispy
            self.set_data(
                pos=buf["a_position"],
                size=buf["a_size"],
                edge_width=buf["a_edgewidth"],
                edge_color=buf["a_fg_color"],
                face_color=buf["a_bg_color"],
                symbol="disc",
            )
        self.visible = True

    def _compute_bounds(self, axis, view):
        if self._data is None:
            return None
        return super()._compute_bounds(axis, view)


class _Camera(PanZoomCamera):
    """PanZoomCamera that can leave left drags to a selection tool and reports view changes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.drag_enabled = True
        self.on_change = None

    def viewbox_mouse_event(self, event):
        drag = getattr(self, "drag_enabled", True)
        if not drag and event.type in ("mouse_press", "mouse_move", "mouse_release"):
            return
        super().viewbox_mouse_event(event)

    def view_changed(self):
        super().view_changed()
        callback = getattr(self, "on_change", None)
        if callback is not None:
            callback()


# --------------------------------------------------------------------------------------------
# the widget
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegendInfo:
    """What a scatter's colours mean (:meth:`ScatterCanvas.legend_info`).

    ``column``/``kind``: the colour column and its colour kind (``None``: one colour).
    ``entries``: ``(label, rgba, count)`` per category or ordinal step (low to high) that has a
    drawn point, then ``"NA"`` in the NA grey; for continuous columns only ``"NA"`` (if any).
    ``count`` is the number of points shown now (after filters), of ``n_shown`` of ``n_total``.
    ``range``: continuous columns, the (1st, 99th) percentiles the colour scale spans (values
    beyond are drawn with the end colours); ``lut``: its 256 RGBA rows, low to high.
    """

    column: str | None
    kind: str | None
    entries: list[tuple[str, tuple[float, float, float, float], int]]
    n_shown: int
    n_total: int
    range: tuple[float, float] | None = None
    lut: np.ndarray | None = None


class ScatterCanvas(QWidget):
    """Scatter plot of an embedding with colouring, filtering, selection tools and highlight."""

    selection_changed = Signal(object)  # sorted int64 row indices
    point_clicked = Signal(int)
    #: ``legend()`` (list of (label, rgba)); emitted on new data, a new colour column and
    #: new filters (the counts of ``legend_info()`` change); read ``legend_info()`` for more
    legend_changed = Signal(object)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._canvas = scene.SceneCanvas(
            keys=None, app=_vispy_app(), size=(600, 500), bgcolor="white", show=False
        )
        self._view = self._canvas.central_widget.add_view()
        self._camera = _Camera(aspect=1.0)
        self._view.camera = self._camera
        self._image = scene.visuals.Image(
            np.zeros((1, 1, 4), np.uint8),
            interpolation="nearest",
            clim=(0, 255),
            parent=self._view.scene,
        )
        self._image.set_gl_state(
            depth_test=False, blend=True, blend_func=("src_alpha", "one_minus_src_alpha")
        )
        self._image.transform = STTransform()
        self._image.order = 0
        self._image.visible = False
        self._base = _Points(self._view.scene, 0)
        self._sel_pts = _Points(self._view.scene, 1)
        self._hl_ring = _Points(self._view.scene, 2)  # the black outline behind the highlight
        self._hl_pts = _Points(self._view.scene, 3)
        self._outline = scene.visuals.Line(
            pos=np.zeros((2, 2), np.float32), color=OUTLINE_RGBA, width=1.5, parent=self._view.scene
        )
        self._outline.order = 4
        self._outline.visible = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._canvas.native)

        self._view_timer = QTimer(self)
        self._view_timer.setSingleShot(True)
        self._view_timer.setInterval(0)
        self._view_timer.timeout.connect(self._on_view_timer)
        self._camera.on_change = self._on_view_changed

        self._canvas.events.mouse_press.connect(self._on_mouse_press)
        self._canvas.events.mouse_move.connect(self._on_mouse_move)
        self._canvas.events.mouse_release.connect(self._on_mouse_release)

        self._render_mode = os.environ.get("MAEPROBE_SCATTER_RENDER", "auto")
        if self._render_mode not in RENDER_MODES:
            self._render_mode = "auto"
        self._software_gl: bool | None = None
        self._raster_on: bool | None = None
        self._tool = "pan"
        self._size = 4.0
        self._opacity = 0.8
        self._press: np.ndarray | None = None
        self._moved = False
        self._drag: list[np.ndarray] | None = None
        self._title: str | None = None
        self._axis_name = "dim"
        self._set_empty()

    # ---------------------------------------------------------------- state

    def _set_empty(self) -> None:
        self._n = 0
        self._xy = np.zeros((0, 2), np.float32)
        self._x = self._y = np.zeros(0, np.float32)
        self._obs = pd.DataFrame()
        self._finite = np.zeros(0, bool)
        self._shown_mask = np.zeros(0, bool)
        self._shown = np.zeros(0, np.int64)
        self._sx = self._sy = np.zeros(0, np.float32)
        # colours: row i is drawn with _lut[_cidx[i]] (index -1: the LUT's last row, NA)
        self._lut = np.array([DEFAULT_RGBA], np.float32)
        self._cidx = np.zeros(0, np.int32)
        self._sel_mask = np.zeros(0, bool)
        self._hl = np.zeros(0, np.int64)
        self._colour_column: str | None = None
        self._colour_kind: str | None = None
        self._legend: list[tuple[str, tuple[float, float, float, float]]] = []
        self._legend_lut: np.ndarray = np.zeros(0, np.int64)  # LUT row of each entry (-1: NA)
        self._range: tuple[float, float] | None = None  # continuous: the colours' lo, hi
        self._tree_rows = np.zeros(0, np.int64)
        self._tree_future: Future | None = None
        self._base_buf: np.ndarray | None = None
        self._raster_cache: dict = {}
        self._geo_version = 0  # bumped when positions or visibility change
        self._sel_version = 0  # bumped when the selection changes

    # ---------------------------------------------------------------- data

    def set_data(self, coords: np.ndarray, obs: pd.DataFrame | None = None) -> None:
        """Show ``coords`` (n, 2); NaN rows are hidden. Row i of ``obs`` describes point i."""
        xy = np.array(coords, dtype=np.float32, order="C")  # a copy: callers may reuse theirs
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"coords must be (n, 2), got {np.shape(coords)}")
        n = len(xy)
        if obs is None:
            obs = pd.DataFrame(index=pd.RangeIndex(n))
        if len(obs) != n:
            raise ValueError(f"obs has {len(obs)} rows but coords has {n}")
        had_selection = bool(self._sel_mask.any())
        column = self._colour_column
        self._set_empty()
        self._n, self._xy, self._obs = n, xy, obs
        self._x, self._y = xy[:, 0].copy(), xy[:, 1].copy()
        self._finite = np.isfinite(self._x) & np.isfinite(self._y)
        self._sel_mask = np.zeros(n, bool)
        all_finite = bool(self._finite.all())
        self._tree_rows = np.arange(n) if all_finite else np.flatnonzero(self._finite)
        self._apply_visibility(None)
        if column is not None and column in obs.columns:
            self._compute_colours(column)
        else:
            self._cidx = np.zeros(n, np.int32)
        self._fit_view()
        self._flush(geometry=True)
        QTimer.singleShot(0, self._start_tree)  # index in the background once this is drawn
        self.legend_changed.emit(self.legend())
        if had_selection:
            self.selection_changed.emit(self.selected())

    def _apply_visibility(self, mask: np.ndarray | None) -> None:
        shown = self._finite.copy()
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (self._n,):
                raise ValueError(f"mask must have shape ({self._n},), got {mask.shape}")
            shown &= mask
        self._shown_mask = shown
        self._shown = self._tree_rows if mask is None else np.flatnonzero(shown)
        if len(self._shown) == self._n:
            self._sx, self._sy = self._x, self._y
        else:
            self._sx, self._sy = self._x[self._shown], self._y[self._shown]
        self._geo_version += 1

    def _fit_view(self) -> None:
        if len(self._sx):
            lo = np.array([self._sx.min(), self._sy.min()], float)
            hi = np.array([self._sx.max(), self._sy.max()], float)
        else:
            lo, hi = np.zeros(2), np.ones(2)
        span = np.maximum(hi - lo, 1e-6)
        lo, span = lo - 0.05 * span, span * 1.1
        self._camera.rect = (lo[0], lo[1], span[0], span[1])

    def reset_view(self) -> None:
        """Zoom to the visible points."""
        self._fit_view()
        self._flush()

    @property
    def n_points(self) -> int:
        return self._n

    @property
    def obs(self) -> pd.DataFrame:
        return self._obs

    @property
    def coords(self) -> np.ndarray:
        """The float32 (n, 2) coordinates as drawn."""
        return self._xy

    # ---------------------------------------------------------------- colour

    def colour_by(self, column: str | None) -> None:
        """Colour by an obs column (categorical palette, stepped viridis for ordinal columns,
        viridis between the 1st and 99th percentiles for continuous ones); ``None``: one
        colour. The rule is :func:`napari_maeprobe.pl.colors.color_kind`."""
        if column is None:
            self._colour_column = self._colour_kind = None
            self._legend = []
            self._legend_lut = np.zeros(0, np.int64)
            self._range = None
            self._lut = np.array([DEFAULT_RGBA], np.float32)
            self._cidx = np.zeros(self._n, np.int32)
        else:
            if column not in self._obs.columns:
                raise KeyError(f"no column {column!r} in obs")
            self._compute_colours(column)
        self._flush(colours=True)
        self.legend_changed.emit(self.legend())

    def _compute_colours(self, column: str) -> None:
        s = self._obs[column]
        kind = color_kind(column, s)
        self._range = None
        if kind == "ordinal":
            v = numeric_values(s)
            ok = np.isfinite(v)
            lo = int(np.min(v[ok])) if ok.any() else 0
            hi = int(np.max(v[ok])) if ok.any() else 0
            self._lut = np.vstack([ordinal_colors(hi - lo + 1), NA_RGBA])
            idx = np.full(len(v), -1, np.int32)
            idx[ok] = np.round(v[ok] - lo).astype(np.int32)
            self._cidx = idx
            labels = [str(lo + i) for i in range(hi - lo + 1)]
            self._colour_kind = "ordinal"
        elif kind == "categorical":
            codes, cats = _codes(s)
            self._lut = np.vstack([categorical_palette(max(len(cats), 1)), NA_RGBA])
            self._cidx = codes  # -1 (NA) picks the LUT's last row
            labels = [str(c) for c in cats]
            self._colour_kind = "categorical"
        else:
            v = numeric_values(s).astype(np.float32)
            ok = np.isfinite(v)
            self._lut = np.vstack([viridis_lut(), NA_RGBA])
            labels = []
            if ok.any():
                lo, hi = (float(q) for q in np.percentile(v if ok.all() else v[ok], [1.0, 99.0]))
                scale = np.float32(255.0 / (hi - lo) if hi > lo else 0.0)
                t = (v - np.float32(lo)) * scale
                np.clip(t, 0.0, 255.0, out=t)
                idx = t.astype(np.int32)
                idx[~ok] = -1
                self._cidx = idx
                self._range = (lo, hi)
            else:
                self._cidx = np.full(len(v), -1, np.int32)
            self._colour_kind = "continuous"
        self._lut = self._lut.astype(np.float32)
        self._colour_column = column
        # the legend: every value that has a drawable point (finite coordinates), then NA
        drawable = self._cidx if self._finite.all() else self._cidx[self._finite]
        present = np.bincount(drawable + 1, minlength=len(self._lut))
        rows = [i for i in range(len(labels)) if present[i + 1]]
        if present[0]:
            rows.append(-1)
        self._legend_lut = np.asarray(rows, np.int64)
        self._legend = [
            (labels[i], tuple(float(c) for c in self._lut[i])) if i >= 0 else ("NA", NA_RGBA)
            for i in rows
        ]

    def legend(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        """(label, rgba) per category (or ordinal step) with a drawn point, low to high for
        ordinal columns, plus ``("NA", NA_RGBA)`` when missing values are drawn; for a
        continuous column the colour range's two ends (``f"{lo:.3g}"``, ``f"{hi:.3g}"``)
        (plus NA). Counts and the colour bar: :meth:`legend_info`."""
        if self._colour_kind == "continuous" and self._range is not None:
            lo, hi = self._range
            ends = [
                (f"{lo:.3g}", tuple(float(x) for x in self._lut[0])),
                (f"{hi:.3g}", tuple(float(x) for x in self._lut[255])),
            ]
            return ends + list(self._legend)
        return list(self._legend)

    def legend_counts(self) -> np.ndarray:
        """int64 count of the shown points (finite and not filtered out) of each entry of
        ``legend_info().entries`` (categories, ordinal steps, NA)."""
        if not len(self._legend_lut):
            return np.zeros(0, np.int64)
        counts = np.bincount(self._cidx[self._shown] + 1, minlength=len(self._lut))
        return counts[self._legend_lut + 1].astype(np.int64)

    def legend_info(self) -> LegendInfo:
        """Everything a legend needs: see :class:`LegendInfo`. Counts are of the points shown
        now (finite coordinates, after ``set_visible`` filters)."""
        entries = [
            (label, rgba, int(n))
            for (label, rgba), n in zip(self._legend, self.legend_counts(), strict=True)
        ]
        return LegendInfo(
            column=self._colour_column,
            kind=self._colour_kind,
            entries=entries,
            n_shown=len(self._shown),
            n_total=self._n,
            range=self._range,
            lut=np.asarray(self._lut[:-1]) if self._colour_kind == "continuous" else None,
        )

    @property
    def colour_column(self) -> str | None:
        return self._colour_column

    @property
    def colour_kind(self) -> str | None:
        """``"categorical"``, ``"ordinal"``, ``"continuous"`` or ``None``."""
        return self._colour_kind

    def colours(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The float32 RGBA of ``rows`` (default all), before opacity and dimming."""
        idx = self._cidx if rows is None else self._cidx[np.asarray(rows, np.int64)]
        return self._lut[idx]

    # ---------------------------------------------------------------- style

    def set_point_size(self, px: float) -> None:
        """Point diameter in screen pixels."""
        if not px > 0:
            raise ValueError("point size must be > 0")
        self._size = float(px)
        self._flush(size=True)

    def set_opacity(self, alpha: float) -> None:
        """Opacity of unselected points (selected points are always opaque)."""
        self._opacity = float(np.clip(alpha, 0.0, 1.0))
        self._flush(opacity=True)

    def set_visible(self, mask: np.ndarray | None) -> None:
        """Draw (and allow selecting) only rows where ``mask`` is True; ``None`` shows all."""
        self._apply_visibility(mask)
        dropped = self._sel_mask & ~self._shown_mask
        if dropped.any():
            self._sel_mask &= self._shown_mask
            self._sel_version += 1
        self._flush(geometry=True)
        self.legend_changed.emit(self.legend())  # the counts follow the filters
        if dropped.any():
            self.selection_changed.emit(self.selected())

    def visible_rows(self) -> np.ndarray:
        """Sorted indices of the rows drawn (finite coordinates and not filtered out)."""
        return self._shown.copy()

    def set_render_mode(self, mode: str) -> None:
        """``"markers"`` (GPU), ``"raster"`` (CPU splat) or ``"auto"`` (raster on software GL)."""
        if mode not in RENDER_MODES:
            raise ValueError(f"render mode must be one of {RENDER_MODES}")
        self._render_mode = mode
        self._flush()

    @property
    def render_mode(self) -> str:
        return self._render_mode

    @property
    def rasterised(self) -> bool:
        """Whether the points are currently drawn by the CPU raster path."""
        return bool(self._raster_on)

    # ---------------------------------------------------------------- selection

    def _rows(self, rows) -> np.ndarray:
        r = np.asarray(rows)
        if r.dtype == bool:
            if r.shape != (self._n,):
                raise ValueError("a boolean row mask must have one entry per row")
            return np.flatnonzero(r)
        r = r.astype(np.int64, copy=False).ravel()
        if len(r) and (r.min() < 0 or r.max() >= self._n):
            raise IndexError(f"row index out of range 0..{self._n - 1}")
        return r

    def select(self, rows: np.ndarray, mode: str = "replace") -> None:
        """Change the selection: ``"replace"``, ``"add"`` or ``"remove"`` (hidden rows: ignored)."""
        if mode not in ("replace", "add", "remove"):
            raise ValueError(f"unknown selection mode {mode!r}")
        r = self._rows(rows)
        if mode == "remove":
            self._sel_mask[r] = False
        else:
            if mode == "replace":
                self._sel_mask[:] = False
            self._sel_mask[r] = True
            self._sel_mask &= self._shown_mask
        self._sel_version += 1
        self._flush(selection=True)
        self.selection_changed.emit(self.selected())

    def selected(self) -> np.ndarray:
        """Sorted int64 indices of the selected rows."""
        return np.flatnonzero(self._sel_mask).astype(np.int64)

    def lasso_select(self, polygon: np.ndarray, add: bool = False) -> np.ndarray:
        """Select the visible points inside ``polygon`` ((k, 2), data coordinates)."""
        from matplotlib.path import Path as MplPath

        poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        rows = np.zeros(0, np.int64)
        if len(poly) >= 3 and len(self._sx):
            (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
            x, y = self._sx, self._sy
            cand = np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
            if len(cand):
                pts = np.column_stack([x[cand], y[cand]])
                rows = self._shown[cand[MplPath(poly).contains_points(pts)]]
        self.select(rows, "add" if add else "replace")
        return self.selected()

    def rect_select(self, x0: float, y0: float, x1: float, y1: float, add: bool = False):
        """Select the visible points in the rectangle spanned by two corners (inclusive)."""
        xa, xb = sorted((float(x0), float(x1)))
        ya, yb = sorted((float(y0), float(y1)))
        x, y = self._sx, self._sy
        rows = self._shown[(x >= xa) & (x <= xb) & (y >= ya) & (y <= yb)]
        self.select(rows, "add" if add else "replace")
        return self.selected()

    def _cluster_column(self, column: str | None) -> str | None:
        if column is not None:
            return column
        if self._colour_kind == "categorical":
            return self._colour_column
        return "leiden" if "leiden" in self._obs.columns else None

    def pick_cluster(self, row: int, column: str | None = None, add: bool = False) -> np.ndarray:
        """Select every visible row sharing ``row``'s value of ``column`` (default: the colour
        column if categorical, else ``leiden``)."""
        col = self._cluster_column(column)
        if col is None:
            raise ValueError("no cluster column: colour by a categorical column or pass column=")
        if col not in self._obs.columns:
            raise KeyError(f"no column {col!r} in obs")
        row = int(row)
        if not 0 <= row < self._n:
            raise IndexError(f"row {row} out of range 0..{self._n - 1}")
        if col == self._colour_column and self._colour_kind == "categorical":
            codes = self._cidx  # what the user sees
        else:
            codes = _codes(self._obs[col])[0]
        self.select(np.flatnonzero(codes == codes[row]), "add" if add else "replace")
        return self.selected()

    def highlight(self, rows: np.ndarray | None) -> None:
        """Emphasise rows (larger, outlined, on top) without touching the selection."""
        self._hl = np.unique(self._rows(rows if rows is not None else []))
        self._flush(highlight=True)

    def highlighted(self) -> np.ndarray:
        return self._hl.copy()

    # ---------------------------------------------------------------- picking and tools

    def _start_tree(self) -> None:
        if self._tree_future is None and len(self._tree_rows):
            self._tree_future = _executor().submit(_build_tree, self._xy, self._tree_rows)

    def kdtree(self):
        """The ``cKDTree`` of all finite points (rows: ``tree_rows()``); waits for its build."""
        self._start_tree()
        return None if self._tree_future is None else self._tree_future.result()

    def tree_rows(self) -> np.ndarray:
        return self._tree_rows.copy()

    def canvas_to_data(self, pos) -> np.ndarray:
        """Canvas pixel position (x, y) -> data coordinates."""
        tr = self._canvas.scene.node_transform(self._view.scene)
        return np.asarray(tr.map(np.asarray(pos, float)[:2])[:2], float)

    def data_to_canvas(self, xy) -> np.ndarray:
        """Data coordinates -> canvas pixel positions (one point or (k, 2))."""
        tr = self._canvas.scene.node_transform(self._view.scene)
        pts = np.atleast_2d(np.asarray(xy, float))
        out = np.asarray(tr.imap(pts))[:, :2]
        return out[0] if np.ndim(xy) == 1 else out

    def nearest_visible(self, pos, radius_px: float | None = None) -> int | None:
        """The visible row nearest to canvas position ``pos`` within ``radius_px``, if any."""
        tree = self.kdtree()
        if tree is None:
            return None
        radius_px = max(PICK_RADIUS_PX, self._size / 2 + 2) if radius_px is None else radius_px
        p = np.asarray(pos, float)[:2]
        c = self.canvas_to_data(p)
        per_px = np.linalg.norm(self.canvas_to_data(p + (1.0, 0.0)) - c)
        cand = np.asarray(tree.query_ball_point(c, radius_px * per_px), dtype=np.int64)
        if not len(cand):
            return None
        rows = self._tree_rows[cand]
        rows = rows[self._shown_mask[rows]]
        if not len(rows):
            return None
        d = ((self._xy[rows] - c.astype(np.float32)) ** 2).sum(axis=1)
        return int(rows[np.argmin(d)])

    def set_tool(self, tool: str) -> None:
        """``"pan"`` (drag pans, click picks a cluster), ``"lasso"`` or ``"rect"``."""
        if tool not in TOOLS:
            raise ValueError(f"tool must be one of {TOOLS}")
        self._tool = tool
        self._camera.drag_enabled = tool == "pan"
        cursor = Qt.CursorShape.ArrowCursor if tool == "pan" else Qt.CursorShape.CrossCursor
        self._canvas.native.setCursor(cursor)
        self._drag = None
        self._outline.visible = False

    @property
    def tool(self) -> str:
        return self._tool

    @staticmethod
    def _shift(event) -> bool:
        return keys.SHIFT in (event.modifiers or ())

    def _on_mouse_press(self, event) -> None:
        if event.button != 1:
            return
        self._press = np.asarray(event.pos[:2], float)
        self._moved = False
        self._drag = [self._press.copy()] if self._tool != "pan" else None

    def _on_mouse_move(self, event) -> None:
        if self._press is None:
            return
        p = np.asarray(event.pos[:2], float)
        self._moved = self._moved or np.linalg.norm(p - self._press) > CLICK_TOLERANCE_PX
        if self._drag is None:
            return
        if self._tool == "lasso":
            if np.linalg.norm(p - self._drag[-1]) >= 2.0:
                self._drag.append(p)
            pts = np.vstack(self._drag + [self._drag[0]])
        else:
            a, b = self._drag[0], p
            pts = np.array([a, (b[0], a[1]), b, (a[0], b[1]), a])
        if len(pts) >= 2:
            tr = self._canvas.scene.node_transform(self._view.scene)
            self._outline.set_data(pos=np.asarray(tr.map(pts))[:, :2].astype(np.float32))
            self._outline.visible = True
            self._canvas.update()

    def _on_mouse_release(self, event) -> None:
        if event.button != 1 or self._press is None:
            return
        p = np.asarray(event.pos[:2], float)
        press, drag = self._press, self._drag
        self._press, self._drag = None, None
        self._outline.visible = False
        add = self._shift(event)
        if not self._moved and np.linalg.norm(p - press) <= CLICK_TOLERANCE_PX:
            self._click(p, add)
        elif self._tool == "lasso" and drag is not None:
            self.lasso_select(np.array([self.canvas_to_data(q) for q in drag + [p]]), add=add)
        elif self._tool == "rect" and drag is not None:
            (x0, y0), (x1, y1) = self.canvas_to_data(drag[0]), self.canvas_to_data(p)
            self.rect_select(x0, y0, x1, y1, add=add)
        self._canvas.update()

    def _click(self, pos: np.ndarray, add: bool) -> None:
        row = self.nearest_visible(pos)
        if row is None:
            if self._tool == "pan" and not add and self._sel_mask.any():
                self.select([], "replace")
            return
        self.point_clicked.emit(row)
        if self._tool != "pan":
            return
        if self._cluster_column(None) is None:
            self.select([row], "add" if add else "replace")
        else:
            self.pick_cluster(row, add=add)

    # ---------------------------------------------------------------- export

    def set_labels(self, title: str | None = None, axis_name: str | None = None) -> None:
        """Name what the saved figures show: ``title`` starts the figure's title (e.g.
        ``"patch level"``; the rest, ``"coloured by leiden, 12,345 points, 321 selected
        (highlighted)"``, is added from the state), ``axis_name`` names the axes
        (``"UMAP"``: "UMAP 1", "UMAP 2"; default "dim"). ``None`` leaves a value unchanged;
        ``""`` clears the title."""
        if title is not None:
            self._title = title or None
        if axis_name is not None:
            self._axis_name = axis_name or "dim"

    def figure_title(self) -> str:
        """The title of a saved figure: the ``set_labels`` title, what the colours show, the
        number of points shown and selected."""
        parts = [self._title] if self._title else []
        if self._colour_column is not None:
            parts.append(f"coloured by {self._colour_column}")
        parts.append(f"{len(self._shown):,} points")
        n_sel = int(np.count_nonzero(self._sel_mask & self._shown_mask))
        if n_sel:
            parts.append(f"{n_sel:,} selected (highlighted, the rest dimmed)")
        return ", ".join(parts)

    def axis_labels(self) -> tuple[str, str]:
        return f"{self._axis_name} 1", f"{self._axis_name} 2"

    def export_image(self, path: str | Path, dpi: float = 200.0) -> Path:
        """Save the current view as a figure, ``.png`` (``dpi``) or ``.svg``: the points as
        drawn (unselected ones dimmed while a selection exists, the selection on top, the
        highlight ringed), axis labels and title (:meth:`set_labels`), and a legend of every
        category with its count of shown points (several columns when many) or a colour bar
        for a continuous column. SVG points are vectors below ``SVG_VECTOR_MAX`` visible
        points, else embedded as an image."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".png", ".svg"):
            raise ValueError(f"cannot export {suffix or 'no suffix'}: use .png or .svg")
        from matplotlib import rc_context

        many = len(self._shown) >= (SVG_VECTOR_MAX if suffix == ".svg" else FIGURE_RASTER_MIN)
        fig = self.figure(raster_scale=dpi / 100.0 if many else None)
        with rc_context({"svg.fonttype": "none"}):  # SVG text stays text (editable)
            fig.savefig(path, format=suffix[1:], dpi=dpi, facecolor="white",
                        bbox_inches="tight", pad_inches=0.15)  # fmt: skip
        return path

    def figure(self, raster_scale: float | None = None):
        """A matplotlib ``Figure`` of the current view (what :meth:`export_image` saves).

        ``raster_scale``: draw the points (not the highlight) as one image splatted like the
        CPU raster path, ``raster_scale`` image pixels per canvas pixel (fast for many points);
        None: one vector marker per point."""
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D

        dpi = 100.0  # one canvas pixel = one figure pixel at 100 dpi: point sizes match
        w, h = (max(float(v), 50.0) for v in self._view.size)
        (x0, y1), (x1, y0) = self.canvas_to_data((0, 0)), self.canvas_to_data((w, h))
        aw, ah = w / dpi, h / dpi
        fig = Figure(figsize=(aw + 1.0, ah + 0.9), dpi=dpi, facecolor="white")
        ax = fig.add_axes((0.75 / (aw + 1.0), 0.6 / (ah + 0.9), aw / (aw + 1.0), ah / (ah + 0.9)))
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        xlabel, ylabel = self.axis_labels()
        ax.set_xlabel(xlabel, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=10)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_title(self.figure_title(), fontsize=10, loc="left")
        pt = 72.0 / dpi
        sel = np.flatnonzero(self._sel_mask & self._shown_mask)
        got = self._rasterise(raster_scale, {}) if raster_scale else None
        if got is not None:
            img, (xl, yb, px_w, px_h) = got
            extent = (xl, xl + px_w * img.shape[1], yb, yb + px_h * img.shape[0])
            ax.imshow(img, origin="lower", extent=extent, interpolation="nearest",
                      aspect="auto")  # fmt: skip
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
        else:
            base = self.colours(self._shown).copy()
            base[:, 3] *= self._base_alpha()
            ax.scatter(self._sx, self._sy, s=(self._size * pt) ** 2, c=base, linewidths=0,
                       rasterized=len(self._shown) >= SVG_VECTOR_MAX)  # fmt: skip
        if len(sel) and got is None:
            ax.scatter(*self._xy[sel].T, s=((self._size + 2) * pt) ** 2, c=self.colours(sel),
                       edgecolors=[SELECTED_EDGE], linewidths=pt,
                       rasterized=len(sel) >= SVG_VECTOR_MAX)  # fmt: skip
        hl = self._hl[self._shown_mask[self._hl]]
        if len(hl):
            size = self._hl_size()
            ax.scatter(*self._xy[hl].T, s=((size + 6) * pt) ** 2, c=[HIGHLIGHT_OUTLINE],
                       linewidths=0)  # fmt: skip
            ax.scatter(*self._xy[hl].T, s=(size * pt) ** 2, c=self.colours(hl),
                       edgecolors=[HIGHLIGHT_EDGE], linewidths=2.5 * pt)  # fmt: skip
        info = self.legend_info()
        if info.kind == "continuous" and info.range is not None:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import ListedColormap, Normalize

            lo, hi = info.range
            v = numeric_values(self._obs[info.column])[self._shown]
            v = v[np.isfinite(v)]
            extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
                (bool((v < lo).any()), bool((v > hi).any())), "neither"
            )
            cax = ax.inset_axes((1.04, 0.15, 0.035, 0.7))
            mappable = ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1e-9),
                                      ListedColormap(info.lut[:, :3]))  # fmt: skip
            bar = fig.colorbar(mappable, cax=cax, extend=extend)
            bar.set_label(f"{info.column}\n(1st-99th percentile)", fontsize=9)
            bar.ax.tick_params(labelsize=8)
        if info.entries:
            n = len(info.entries)
            shown = info.entries[:MAX_FIGURE_LEGEND]
            labels = [f"{_short(lab)} ({count:,})" for lab, _, count in shown]
            if n > len(shown):
                labels.append(f"... {n - len(shown):,} more")
            handles = [Line2D([], [], ls="", marker="o", ms=6, mfc=c, mec="none")
                       for _, c, _ in shown]  # fmt: skip
            if n > len(shown):
                handles.append(Line2D([], [], ls="", marker=""))
            # columns of at most LEGEND_ROWS rows, but no wider than about twice its height
            ncols = min(-(-len(labels) // LEGEND_ROWS), max(1, math.ceil(math.sqrt(n / 12))))
            rows = -(-len(labels) // ncols)
            continuous = info.kind == "continuous"
            ax.legend(
                handles,
                labels,
                loc="lower left" if continuous else "upper left",
                bbox_to_anchor=(1.02, 0.0) if continuous else (1.02, 1.0),
                ncols=-(-len(labels) // rows),
                fontsize=8 if len(labels) <= LEGEND_ROWS else 7,
                title=None if continuous else f"{info.column} (points shown)",
                title_fontsize=9,
                frameon=False,
                handletextpad=0.2,
                columnspacing=0.8,
                borderaxespad=0.0,
            )
        return fig

    # ---------------------------------------------------------------- drawing

    def _base_alpha(self) -> float:
        return self._opacity * (DIM if self._sel_mask.any() else 1.0)

    def _hl_size(self) -> float:
        return self._size * 2.0 + 6.0

    def _is_software_gl(self) -> bool:
        if self._software_gl is None:
            try:
                from vispy.gloo import gl

                self._canvas.set_current()
                renderer = str(gl.glGetParameter(gl.GL_RENDERER)).lower()
                self._software_gl = any(s in renderer for s in SOFTWARE_GL)
            except Exception:  # no context yet: decide again next time
                return False
        return self._software_gl

    def _raster_wanted(self) -> bool:
        if self._render_mode != "auto":
            return self._render_mode == "raster"
        return len(self._shown) > RASTER_AUTO_MIN and self._is_software_gl()

    def _flush(
        self,
        geometry: bool = False,
        colours: bool = False,
        size: bool = False,
        selection: bool = False,
        highlight: bool = False,
        opacity: bool = False,
    ) -> None:
        """Bring the visuals up to date with the state, touching only what changed."""
        raster = self._raster_wanted()
        switched = raster != self._raster_on
        if switched:
            self._raster_on = raster
            geometry = True
            self._base_buf = None
            if raster:
                self._base.upload(None)
                self._sel_pts.upload(None)
            else:
                self._image.visible = False
        if raster:
            if geometry or colours or size or selection or opacity or not highlight:
                self._draw_raster()
        else:
            self._draw_markers(geometry, colours, size, selection)
        if geometry or colours or size or highlight:
            hl = self._hl[self._shown_mask[self._hl]] if len(self._hl) else self._hl
            x, y, size = self._x[hl], self._y[hl], self._hl_size()
            ring = np.broadcast_to(np.float32(HIGHLIGHT_OUTLINE), (len(hl), 4))
            self._hl_ring.upload(_marker_buffer(x, y, ring, size + 6.0) if len(hl) else None)
            self._hl_pts.upload(
                _marker_buffer(x, y, self.colours(hl), size, 2.5, HIGHLIGHT_EDGE)
                if len(hl)
                else None
            )
        self._canvas.update()

    def _draw_markers(self, geometry: bool, colours: bool, size: bool, selection: bool) -> None:
        if geometry or self._base_buf is None:
            face = self._lut[self._cidx[self._shown]]
            self._base_buf = _marker_buffer(self._sx, self._sy, face, self._size)
            self._base.upload(self._base_buf)
        elif colours or size:
            if colours:
                cidx = np.take(self._cidx, self._shown)
                np.take(self._lut, cidx, axis=0, out=self._base_buf["a_bg_color"])
            if size:
                self._base_buf["a_size"] = self._size
            self._base.upload(self._base_buf)
        self._base.alpha = self._base_alpha()
        if geometry or colours or size or selection:
            sel = np.flatnonzero(self._sel_mask & self._shown_mask)
            self._sel_pts.upload(
                _marker_buffer(
                    self._x[sel],
                    self._y[sel],
                    self.colours(sel),
                    self._size + 2,
                    1.0,
                    SELECTED_EDGE,
                )
                if len(sel)
                else None
            )

    def _on_view_changed(self) -> None:
        if self._raster_on:
            self._view_timer.start()

    def _on_view_timer(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Redraw for the current camera now (pan/zoom otherwise redraws on the next event-loop
        turn, so that a burst of mouse moves costs one raster)."""
        self._view_timer.stop()
        if self._raster_on:
            self._draw_raster()
        self._canvas.update()

    def _draw_raster(self) -> None:
        """Splat the visible (and selected) points into an image of the view's pixel grid."""
        got = self._rasterise(float(self._canvas.pixel_scale), self._raster_cache)
        if got is None:
            return
        img, (x_left, y_bottom, px_w, px_h) = got
        self._image.set_data(img)
        self._image.transform.scale = (px_w, px_h, 1.0)
        self._image.transform.translate = (x_left, y_bottom, 0.0)
        self._image.visible = True

    def _rasterise(self, scale: float, cache: dict):
        """The visible and selected points splatted into an RGBA uint8 image of the view at
        ``scale`` pixels per canvas pixel (row 0 at the bottom) and (x_left, y_bottom, px_w,
        px_h) of its pixel grid in data coordinates; None for an empty view."""
        w_log, h_log = (float(v) for v in self._view.size)
        width, height = max(1, round(w_log * scale)), max(1, round(h_log * scale))
        (x_left, y_top), (x_right, y_bottom) = (
            self.canvas_to_data((0.0, 0.0)),
            self.canvas_to_data((w_log, h_log)),
        )
        px_w, px_h = (x_right - x_left) / width, (y_top - y_bottom) / height
        if not (px_w > 0 and px_h > 0):
            return None
        radius = self._size * scale / 2.0
        ring = radius + max(1.0, scale)
        pad = int(math.ceil(ring)) + 1
        shape = (height + 2 * pad, width + 2 * pad)
        crop = (slice(pad, pad + height), slice(pad, pad + width))
        view_key = (x_left, y_bottom, px_w, px_h, shape, self._size, scale, self._geo_version)
        sel_key = (view_key, self._sel_version)

        def splat(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            fx = (x - np.float32(x_left)) * np.float32(1.0 / px_w) + np.float32(pad)
            fy = (y - np.float32(y_bottom)) * np.float32(1.0 / px_h) + np.float32(pad)
            return _splat(fx, fy, shape)

        def covered(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            flat = img[crop].ravel()
            pix = np.flatnonzero(flat >= 0)
            return pix, flat[pix]

        if cache.get("view_key") != view_key:
            base_pix, base_idx = covered(_dilate(splat(self._sx, self._sy), radius))
            cache["base"] = (base_pix, self._shown[base_idx])
            cache["view_key"] = view_key
        if cache.get("sel_key") != sel_key:
            sel = np.flatnonzero(self._sel_mask & self._shown_mask)
            if len(sel):
                keys_img = splat(self._x[sel], self._y[sel])
                face_pix, face_idx = covered(_dilate(keys_img, radius))
                cache["sel"] = (face_pix, sel[face_idx], covered(_dilate(keys_img, ring))[0])
            else:
                cache["sel"] = None
            cache["sel_key"] = sel_key
        out = np.zeros(height * width, np.uint32)
        pix, rows = cache["base"]
        out[pix] = _pack(self._lut, self._base_alpha())[self._cidx[rows]]
        if cache["sel"] is not None:
            face_pix, face_rows, ring_pix = cache["sel"]
            out[ring_pix] = _pack(SELECTED_EDGE)[0]
            out[face_pix] = _pack(self._lut)[self._cidx[face_rows]]
        return out.view(np.uint8).reshape(height, width, 4), (x_left, y_bottom, px_w, px_h)


class ColourBar(QWidget):
    """A horizontal colour bar: a LUT's gradient, its low and high values (and the middle)
    below, for a continuous colour column."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._lut = viridis_lut()
        self._lo, self._hi = 0.0, 1.0
        self._labels = ("0", "1")
        self.setMinimumHeight(40)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_range(self, lo: float, hi: float, lut: np.ndarray | None = None) -> None:
        self._lo, self._hi = float(lo), float(hi)
        if lut is not None:
            self._lut = np.asarray(lut, np.float32)
        self._labels = (f"{self._lo:.3g}", f"{self._hi:.3g}")
        self.update()

    def tick_labels(self) -> tuple[str, str, str]:
        """The texts under the bar: low, middle, high."""
        return self._labels[0], f"{(self._lo + self._hi) / 2:.3g}", self._labels[1]

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt
        return QSize(200, 40)

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt
        p = QPainter(self)
        fm = p.fontMetrics()
        lo, mid, hi = self.tick_labels()
        margin = max(fm.horizontalAdvance(lo), fm.horizontalAdvance(hi)) // 2 + 2
        x0, x1 = margin, max(margin + 10, self.width() - margin)
        bar_h = 14
        rgba = np.ascontiguousarray(np.round(np.clip(self._lut, 0, 1) * 255).astype(np.uint8))
        img = QImage(rgba.tobytes(), len(rgba), 1, 4 * len(rgba), QImage.Format.Format_RGBA8888)
        p.drawImage(QRectF(x0, 2.0, x1 - x0, bar_h), img)
        p.setPen(QColor(90, 90, 90))
        p.drawRect(x0, 2, x1 - x0, bar_h)
        y_text = 2 + bar_h + 4 + fm.ascent()
        for x, text in ((x0, lo), ((x0 + x1) // 2, mid), (x1, hi)):
            p.drawLine(x, 2 + bar_h, x, 2 + bar_h + 3)
            p.drawText(int(x - fm.horizontalAdvance(text) / 2), y_text, text)
        p.end()


class LegendWidget(QWidget):
    """The legend of a ScatterCanvas: a header (the colour column and what the counts are of),
    then either every category / ordinal step as swatch, label and count of shown points, in a
    scrollable list (``"12 (1,234)"``; missing values ``"NA (n)"`` in the NA grey), or a colour
    bar for continuous columns (the 1st and 99th percentiles the colours span).

    ``LegendWidget(canvas)`` follows the canvas (``legend_changed``: new data, colour column or
    filters). ``set_entries(entries, title)`` shows a list by hand: ``(label, rgba)`` or
    ``(label, rgba, count)`` tuples. Give it a fixed modest height; the list scrolls.
    """

    #: at most this many rows are listed (then "+N more"): a legend of 50,000 cell ids is not read
    MAX_ENTRIES = 5000
    COUNTS_TIP = (
        "Numbers in brackets: points of each value shown in the plot now (finite coordinates, "
        "after the filters)."
    )

    def __init__(self, canvas: ScatterCanvas | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.setSpacing(2)
        self._title = QLabel("")
        self._title.setStyleSheet("font-weight: bold")
        self._title.setWordWrap(True)
        self._title.setToolTip(self.COUNTS_TIP)
        layout.addWidget(self._title)
        self._bar = ColourBar(self)
        self._bar.setVisible(False)
        layout.addWidget(self._bar)
        self._list = QListWidget(self)
        self._list.setUniformItemSizes(True)
        self._list.setSelectionMode(QListWidget.SelectionMode.NoSelection)
        self._list.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self._list.setIconSize(QSize(12, 12))
        self._list.setSpacing(0)
        self._list.setToolTip(self.COUNTS_TIP)
        self._list.setMinimumHeight(40)
        self._list.setStyleSheet("QListWidget { border: none; background: transparent; }")
        layout.addWidget(self._list, 1)
        layout.addStretch(0)  # keeps the header on top when only a colour bar shows
        self._labels: list[str] = []
        self._texts: list[str] = []
        self._icons: dict[tuple[int, int, int, int], QIcon] = {}
        self._canvas = canvas
        if canvas is not None:
            canvas.legend_changed.connect(self._on_legend_changed)
            self._on_legend_changed(None)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt
        return QSize(220, 160)

    def _on_legend_changed(self, _entries=None) -> None:
        if self._canvas is not None:
            self.set_info(self._canvas.legend_info())

    def _icon(self, rgba) -> QIcon:
        key = tuple(int(round(255 * float(c))) for c in rgba)
        icon = self._icons.get(key)
        if icon is None:
            pix = QPixmap(12, 12)
            pix.fill(QColor(*key))
            painter = QPainter(pix)
            painter.setPen(QColor(110, 110, 110))
            painter.drawRect(0, 0, 11, 11)
            painter.end()
            icon = self._icons[key] = QIcon(pix)
        return icon

    def set_info(self, info: LegendInfo) -> None:
        """Show a canvas's :class:`LegendInfo`."""
        if info.column is None:
            self._show(None, [], None)
            return
        shown = f"{info.n_shown:,}" + (
            f" of {info.n_total:,}" if info.n_shown != info.n_total else ""
        )
        title = f"{info.column}  ({shown} points shown)"
        if info.kind == "categorical" and len(info.entries) > MAX_DISTINCT:
            title += f"; colours repeat after {MAX_DISTINCT}"
        bar = None
        if info.kind == "continuous" and info.range is not None:
            bar = (info.range[0], info.range[1], info.lut)
            title = f"{info.column}  (1st-99th percentile; {shown} points shown)"
        self._show(title, info.entries, bar)

    def set_entries(self, entries, title: str | None = None) -> None:
        """Show ``entries``: ``(label, rgba)`` or ``(label, rgba, count)`` tuples."""
        self._show(title, entries, None)

    def _show(self, title, entries, bar) -> None:
        self._title.setText(title or "")
        self._title.setVisible(bool(title))
        self._bar.setVisible(bar is not None)
        self._labels, self._texts = [], []
        if bar is not None:
            self._bar.set_range(*bar)
            lo, _, hi = self._bar.tick_labels()
            self._labels = [lo, hi]
            self._bar.setToolTip(
                f"Colours span the 1st to the 99th percentile ({lo} to {hi}); values beyond "
                "are drawn with the end colours."
            )
        self._list.setUpdatesEnabled(False)
        self._list.clear()
        for entry in entries[: self.MAX_ENTRIES]:
            label, rgba = str(entry[0]), entry[1]
            text = label if len(entry) < 3 else f"{label} ({int(entry[2]):,})"
            item = QListWidgetItem(self._icon(rgba), text)
            if len(entry) >= 3 and int(entry[2]) == 0:
                item.setForeground(QColor(150, 150, 150))  # filtered out: kept, greyed
            self._list.addItem(item)
            self._labels.append(label)
            self._texts.append(text)
        if len(entries) > self.MAX_ENTRIES:
            more = f"+{len(entries) - self.MAX_ENTRIES:,} more"
            self._list.addItem(QListWidgetItem(more))
            self._labels.append(more)
            self._texts.append(more)
        self._list.setVisible(bool(self._texts) or bar is None)
        self._list.setUpdatesEnabled(True)

    def labels(self) -> list[str]:
        """The values listed, in order (category labels without counts; a colour bar's low and
        high ends first; a trailing "+N more")."""
        return list(self._labels)

    def texts(self) -> list[str]:
        """The list's texts as shown, with counts: ``"12 (1,234)"``."""
        return list(self._texts)

    @property
    def colour_bar(self) -> ColourBar:
        return self._bar
