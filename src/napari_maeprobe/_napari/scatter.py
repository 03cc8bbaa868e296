"""The explorer's scatter canvas: a vispy ``SceneCanvas`` for 100k to several million points.

``ScatterCanvas`` draws a 2-D embedding (UMAP/PCA) with a vispy ``Markers`` visual on the GPU.
Three visuals are layered: all visible points, the selected points (full opacity, dark edge,
on top of the dimmed rest) and the highlighted points (larger, magenta edge, on top of all).
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
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy import API_NAME
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QVBoxLayout, QWidget
from vispy import scene
from vispy.scene.cameras import PanZoomCamera
from vispy.util import keys
from vispy.visuals import MarkersVisual
from vispy.visuals.transforms import STTransform

from napari_maeprobe.pl.colors import (
    NA_RGBA,
    categorical_palette,
    color_kind,
    ordinal_colors,
    viridis_lut,
)

TOOLS = ("pan", "lasso", "rect")
RENDER_MODES = ("auto", "markers", "raster")
DEFAULT_RGBA = (0.27, 0.51, 0.71, 1.0)
SELECTED_EDGE = (0.05, 0.05, 0.05, 1.0)
HIGHLIGHT_EDGE = (1.0, 0.0, 1.0, 1.0)
OUTLINE_RGBA = (0.85, 0.1, 0.3, 1.0)
DIM = 0.25  # alpha factor of unselected points while a selection exists
RASTER_AUTO_MIN = 50_000
SVG_VECTOR_MAX = 200_000
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


class _Points(scene.visuals.Markers):
    """A Markers visual fed with a prebuilt float32 buffer (no per-call colour parsing)."""

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


class ScatterCanvas(QWidget):
    """Scatter plot of an embedding with colouring, filtering, selection tools and highlight."""

    selection_changed = Signal(object)  # sorted int64 row indices
    point_clicked = Signal(int)
    legend_changed = Signal(object)  # list of (label, rgba)

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
        self._hl_pts = _Points(self._view.scene, 2)
        self._outline = scene.visuals.Line(
            pos=np.zeros((2, 2), np.float32), color=OUTLINE_RGBA, width=1.5, parent=self._view.scene
        )
        self._outline.order = 3
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
        """Colour by an obs column (categorical palette or viridis); ``None``: one colour."""
        if column is None:
            self._colour_column = self._colour_kind = None
            self._legend = []
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
        if kind == "ordinal":
            v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            ok = np.isfinite(v)
            lo = int(np.nanmin(v)) if ok.any() else 0
            hi = int(np.nanmax(v)) if ok.any() else 0
            self._lut = np.vstack([ordinal_colors(hi - lo + 1), NA_RGBA])
            idx = np.full(len(v), -1, np.int32)
            idx[ok] = (v[ok] - lo).astype(np.int32)
            self._cidx = idx
            counts = np.bincount(idx + 1, minlength=hi - lo + 2)
            legend = [
                (str(lo + i), tuple(float(c) for c in self._lut[i]))
                for i in range(hi - lo + 1)
                if counts[i + 1]
            ]
            if counts[0]:
                legend.append(("NA", NA_RGBA))
            self._colour_kind = "ordinal"
        elif kind == "categorical":
            codes, cats = _codes(s)
            self._lut = np.vstack([categorical_palette(max(len(cats), 1)), NA_RGBA])
            self._cidx = codes  # -1 (NA) picks the LUT's last row
            counts = np.bincount(codes + 1, minlength=len(cats) + 1)
            legend = [
                (str(c), tuple(float(v) for v in self._lut[i]))
                for i, c in enumerate(cats)
                if counts[i + 1]
            ]
            if counts[0]:
                legend.append(("NA", NA_RGBA))
            self._colour_kind = "categorical"
        else:
            v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)
            ok = np.isfinite(v)
            self._lut = np.vstack([viridis_lut(), NA_RGBA])
            legend = []
            if ok.all():
                lo, hi = (float(q) for q in np.percentile(v, [1.0, 99.0]))
            elif ok.any():
                lo, hi = (float(q) for q in np.percentile(v[ok], [1.0, 99.0]))
            if ok.any():
                scale = np.float32(255.0 / (hi - lo) if hi > lo else 0.0)
                t = (v - np.float32(lo)) * scale
                np.clip(t, 0.0, 255.0, out=t)
                idx = t.astype(np.int32)
                idx[~ok] = -1
                self._cidx = idx
                legend = [
                    (f"{lo:.3g}", tuple(float(x) for x in self._lut[0])),
                    (f"{hi:.3g}", tuple(float(x) for x in self._lut[255])),
                ]
            else:
                self._cidx = np.full(len(v), -1, np.int32)
            self._colour_kind = "continuous"
        self._lut = self._lut.astype(np.float32)
        self._colour_column = column
        self._legend = legend

    def legend(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        """(label, rgba) per category present (plus NA), or the continuous range's two ends."""
        return list(self._legend)

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

    def export_image(self, path: str | Path) -> Path:
        """Write the view as ``.png`` (rendered canvas) or ``.svg`` (matplotlib; vector below
        ``SVG_VECTOR_MAX`` visible points, else with the points embedded as a PNG)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".png":
            from vispy.io import write_png

            write_png(str(path), self._canvas.render())
        elif suffix == ".svg":
            self._export_svg(path)
        else:
            raise ValueError(f"cannot export {suffix or 'no suffix'}: use .png or .svg")
        return path

    def _export_svg(self, path: Path) -> None:
        from matplotlib.figure import Figure

        dpi = 100.0
        w, h = (float(v) for v in self._view.size)
        (x0, y1), (x1, y0) = self.canvas_to_data((0, 0)), self.canvas_to_data((w, h))
        fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, facecolor="white")
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_axis_off()
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        pt = 72.0 / dpi
        base = self.colours(self._shown)
        base[:, 3] *= self._base_alpha()
        rasterized = len(self._shown) >= SVG_VECTOR_MAX
        ax.scatter(self._sx, self._sy, s=(self._size * pt) ** 2, c=base, linewidths=0,
                   rasterized=rasterized)  # fmt: skip
        sel = np.flatnonzero(self._sel_mask & self._shown_mask)
        if len(sel):
            ax.scatter(*self._xy[sel].T, s=((self._size + 2) * pt) ** 2, c=self.colours(sel),
                       edgecolors=[SELECTED_EDGE], linewidths=pt,
                       rasterized=len(sel) >= SVG_VECTOR_MAX)  # fmt: skip
        hl = self._hl[self._shown_mask[self._hl]]
        if len(hl):
            ax.scatter(*self._xy[hl].T, s=(self._hl_size() * pt) ** 2, c=self.colours(hl),
                       edgecolors=[HIGHLIGHT_EDGE], linewidths=2 * pt)  # fmt: skip
        fig.savefig(path, format="svg", dpi=2 * dpi, facecolor="white")

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
            self._hl_pts.upload(
                _marker_buffer(
                    self._x[hl], self._y[hl], self.colours(hl), self._hl_size(), 2.0, HIGHLIGHT_EDGE
                )
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
        w_log, h_log = (float(v) for v in self._view.size)
        scale = float(self._canvas.pixel_scale)
        width, height = max(1, round(w_log * scale)), max(1, round(h_log * scale))
        (x_left, y_top), (x_right, y_bottom) = (
            self.canvas_to_data((0.0, 0.0)),
            self.canvas_to_data((w_log, h_log)),
        )
        px_w, px_h = (x_right - x_left) / width, (y_top - y_bottom) / height
        if not (px_w > 0 and px_h > 0):
            return
        radius = self._size * scale / 2.0
        ring = radius + max(1.0, scale)
        pad = int(math.ceil(ring)) + 1
        shape = (height + 2 * pad, width + 2 * pad)
        crop = (slice(pad, pad + height), slice(pad, pad + width))
        cache = self._raster_cache
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
        self._image.set_data(out.view(np.uint8).reshape(height, width, 4))
        self._image.transform.scale = (px_w, px_h, 1.0)
        self._image.transform.translate = (x_left, y_bottom, 0.0)
        self._image.visible = True


class LegendWidget(QWidget):
    """Colour swatches and labels of a ScatterCanvas legend (at most ``MAX_ENTRIES`` rows)."""

    MAX_ENTRIES = 30

    def __init__(self, canvas: ScatterCanvas | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(2, 2, 2, 2)
        self._layout.setSpacing(1)
        self._title = QLabel("")
        self._title.setStyleSheet("font-weight: bold")
        self._layout.addWidget(self._title)
        self._rows: list[QWidget] = []
        self._labels: list[str] = []
        self._canvas = canvas
        if canvas is not None:
            canvas.legend_changed.connect(self._on_legend_changed)
            self._on_legend_changed(canvas.legend())

    def _on_legend_changed(self, entries) -> None:
        title = self._canvas.colour_column if self._canvas is not None else None
        self.set_entries(entries, title)

    def set_entries(
        self,
        entries: list[tuple[str, tuple[float, float, float, float]]],
        title: str | None = None,
    ) -> None:
        """Show ``entries`` (label, rgba); beyond ``MAX_ENTRIES`` a "+N more" row."""
        for w in self._rows:
            self._layout.removeWidget(w)
            w.deleteLater()
        self._rows, self._labels = [], []
        self._title.setText(title or "")
        self._title.setVisible(bool(title))
        for label, rgba in entries[: self.MAX_ENTRIES]:
            row = QWidget(self)
            h = QHBoxLayout(row)
            h.setContentsMargins(0, 0, 0, 0)
            swatch = QLabel(row)
            swatch.setFixedSize(12, 12)
            r, g, b, a = (int(round(255 * float(c))) for c in rgba)
            swatch.setStyleSheet(f"background-color: rgba({r},{g},{b},{a}); border: 1px solid #888")
            h.addWidget(swatch)
            h.addWidget(QLabel(str(label), row), 1)
            self._layout.addWidget(row)
            self._rows.append(row)
            self._labels.append(str(label))
        if len(entries) > self.MAX_ENTRIES:
            more = QLabel(f"+{len(entries) - self.MAX_ENTRIES} more", self)
            self._layout.addWidget(more)
            self._rows.append(more)
            self._labels.append(more.text())

    def labels(self) -> list[str]:
        """The texts shown, in order (including a trailing "+N more")."""
        return list(self._labels)
