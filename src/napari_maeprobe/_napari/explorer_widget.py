"""The linked embedding explorer: scatter <-> image layers, a gallery of what the model saw,
analysis, diagnostics and export, in one dock.

Thin over :mod:`napari_maeprobe.pl.linking` (rows <-> pixels), :mod:`.pl.overlays` (what a
selection draws), :mod:`.pl.gallery` (per-cell tiles), :mod:`.tl.analysis_process` (the
long-lived analysis worker), :mod:`.diagnostics` and :mod:`.export`; the observation table of the
loaded level is the single source of truth.

The GUI thread never waits: loads, selection overlays and gallery tiles are computed in thread
workers and only finished arrays reach the layers; every request carries a token, so the last
request wins and a late answer to an older one is dropped. Analysis runs in one child process
per explorer that lives for the session (numba compiles once), reports its stages and can be
cancelled; closing the dock or the viewer ends it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import QEvent, QSize, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QMenu,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_maeprobe._napari.gallery_widget import GalleryWidget
from napari_maeprobe._napari.hub import compact_combos, hub_for
from napari_maeprobe._napari.jobs import compact_labels
from napari_maeprobe._napari.layers import OVERLAY_KEY, is_overlay
from napari_maeprobe._napari.scatter import LegendWidget, ScatterCanvas
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.export import embedded_rows
from napari_maeprobe.pl.linking import (
    ExplorerData,
    available_levels,
    load_level,
    rows_at,
)
from napari_maeprobe.tl.analyze import AnalysisSettings

ALL = "(all)"
NONE = "(none)"
RGB_COLOURS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
#: the gallery's colours for the channels of a multichannel layer napari did not split
SPLIT_COLOURS = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 1.0),
                 (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0))  # fmt: skip

#: overlay colours on the image: none of them is the segmentation layers' (yellow boundaries,
#: random label colours at half opacity)
PATCH_COLOUR = (0.0, 0.9, 1.0, 1.0)  # cyan fill: selected patches
CELL_COLOUR = (1.0, 1.0, 1.0, 1.0)  # white outlines: the selected cells
OVERLAY_NAMES = {
    "selected patches": "selected patches",
    "selected cells": "selected cells",
    "attention": "attention (selected cells)",
}


def _label_colours(rgba: tuple[float, float, float, float]):
    """Every label in one colour, on transparent. A cyclic colormap of two colours, not a direct
    one: napari builds a direct colormap as a numba typed dict compiled afresh in every session
    (seconds, holding the GIL), while the cyclic colormap's kernels are cached on disk."""
    from napari.utils.colormaps import CyclicLabelColormap

    return CyclicLabelColormap(colors=np.array([[0.0, 0.0, 0.0, 0.0], rgba], dtype=np.float32))


def _overlay_style(kind: str) -> dict:
    """How a labels overlay is drawn (also used to warm napari's colour code in the worker)."""
    if kind == "selected patches":
        return {"opacity": 0.45, "colormap": _label_colours(PATCH_COLOUR)}
    return {"opacity": 1.0, "colormap": _label_colours(CELL_COLOUR)}


#: the explorer's command-line wording -> its controls (then the docks' own translation)
EXPLORER_WORDS = (
    (r"run `maeprobe analyze STORE` first \(or Analyse in the explorer's Analyse tab\)",
     "press Analyse in the Analyse tab"),
    (r"(?:resume|finish) it by running the same `maeprobe embed[^`]*` command again, or pass "
     r"--allow-incomplete to use the cells that are done",
     "resume it with Run in the Embed dock (the same Output store)"),
    (r"`maeprobe analyze[^`]*`", "Analyse (the Analyse tab)"),
    (r"pass the \.zarr folder written by `maeprobe embed`",
     "open the .zarr folder an Embed run wrote (Open... > Embedding store folder)"),
    (r"`maeprobe embed`", "the Embed dock"),
    (r"`maeprobe export`", "the Export tab"),
    (r"--level\b", "the level list"),
)


def gui_message(exc: BaseException | str) -> str:
    """One line in the GUI's words: the problem and its fix, flags named as controls."""
    import re

    from napari_maeprobe._napari.jobs import error_message
    from napari_maeprobe._napari.widgets import gui_message as dock_words

    text = exc if isinstance(exc, str) else error_message(exc)
    for pattern, words in EXPLORER_WORDS:
        text = re.sub(pattern, words, text)
    return " ".join(dock_words(text).split())


def _error(exc: BaseException | str) -> None:
    from napari.utils.notifications import show_error

    show_error(f"maeprobe: {gui_message(exc)}")


def _scroll(widget: QWidget) -> QScrollArea:
    """A tab page that scrolls instead of growing the dock past the screen."""
    area = QScrollArea()
    area.setWidget(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.Shape.NoFrame)
    return area


class _Resources:
    """What must end with the explorer (its analysis process, its thread workers); held apart
    from the widget so a closed dock or viewer can end them after the widget is gone."""

    def __init__(self) -> None:
        self.analysis = None  # tl.analysis_process.AnalysisProcess, started on first use
        self.workers: set = set()
        self.closed = False

    def shutdown(self, *_) -> None:
        self.closed = True
        for worker in list(self.workers):
            try:
                worker.quit()
            except RuntimeError:
                pass
        if self.analysis is not None:
            self.analysis.close()
            self.analysis = None


class ExplorerWidget(QWidget):
    """Scatter of one level's UMAP/PCA, linked both ways to the image layers and a gallery."""

    loaded = Signal(object)  # ExplorerData
    not_analysed = Signal(object)  # the store path, when the asked level has no UMAP/PCA yet
    layers_updated = Signal()  # after a selection was drawn on the images
    gallery_updated = Signal()  # after the gallery shows a new page
    diagnostics_ready = Signal(object)  # DriversReport
    analysis_finished = Signal(str)  # "done", "cancelled" or "error"
    exported = Signal(object)  # the written path (io.export.Exported)

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.data: ExplorerData | None = None
        self.path: Path | None = None
        self._res = _Resources()
        self._tokens = {"load": 0, "selection": 0, "gallery": 0, "compare": 0, "diagnose": 0,
                        "export": 0}  # fmt: skip
        self._labels_cache: dict[str, np.ndarray | None] = {}
        self._selected = np.zeros(0, dtype=np.int64)
        self._order: pd.DataFrame | None = None  # the gallery's cell order of the selection
        self._order_key: tuple | None = None
        self._analysis_job: int | None = None
        self._docked = False
        self.last_clicked: np.ndarray = np.zeros(0, dtype=np.int64)
        self.drivers = None  # the DriversReport the diagnostics tab shows
        self.comparison: dict | None = None  # the last batch-versus-biology result
        self.embedded = 0  # rows of the loaded level with an embedding
        self._build_ui()
        compact_combos(self)
        self._connect()
        hub = hub_for(viewer)
        hub.store_ready.connect(self.load)
        viewer.mouse_drag_callbacks.append(self._on_viewer_click)
        res = self._res  # a closure, not a bound method: it must outlive the widget
        self.destroyed.connect(lambda *_: res.shutdown())
        if hub.last_store is not None:
            self.load(hub.last_store)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.source_label = QLabel("no embeddings loaded: open a store or embed an image")
        self.source_label.setWordWrap(True)
        self.source_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.open_button = QToolButton()
        self.open_button.setText("Open...")
        self.open_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.open_button)
        self.open_store_action = menu.addAction("Embedding store folder (.zarr)...")
        self.open_h5ad_action = menu.addAction("Exported table (.h5ad)...")
        self.open_button.setMenu(menu)
        self.level = QComboBox()
        self.coords = QComboBox()
        self.colour = QComboBox()
        self.tool = QComboBox()
        self.tool.addItems(["pan", "lasso", "rect"])
        self.tool.setToolTip("pan: drag to move, click a point to pick its cluster; lasso / "
                             "rect: draw to select (Shift adds)")  # fmt: skip
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("clear the selection (and its overlays on the image)")
        self.stage = QLabel("")
        self.stage.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.progress.setMaximumHeight(14)
        self.progress.setTextVisible(False)
        self.scatter = ScatterCanvas()
        self.scatter.setMinimumHeight(220)
        self.legend = LegendWidget(self.scatter)  # follows the scatter's colours and filters
        self.legend.setMaximumHeight(130)

        controls = QGridLayout()
        controls.setContentsMargins(0, 0, 0, 0)
        for col, (text, w) in enumerate((("level", self.level), ("coordinates", self.coords))):
            controls.addWidget(QLabel(text), 0, 2 * col)
            controls.addWidget(w, 0, 2 * col + 1)
        controls.addWidget(QLabel("colour by"), 1, 0)
        controls.addWidget(self.colour, 1, 1)
        controls.addWidget(QLabel("tool"), 1, 2)
        tool_row = QHBoxLayout()
        tool_row.addWidget(self.tool, 1)
        tool_row.addWidget(self.clear_button)
        controls.addLayout(tool_row, 1, 3)
        controls.setColumnStretch(1, 1)
        controls.setColumnStretch(3, 1)

        # the view tab: how points are drawn and which are shown
        self.size = QSlider(Qt.Orientation.Horizontal)
        self.size.setRange(1, 20)
        self.size.setValue(4)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(5, 100)
        self.opacity.setValue(80)
        self.foreground = QCheckBox("foreground patches")
        self.central = QCheckBox("central patches")
        self.channel = QComboBox()
        self.dataset = QComboBox()
        self.attention_check = QCheckBox("attention of the selected cells on the image")
        self.attention_check.setToolTip(
            "each selected cell's attention map, smooth and normalised per cell, drawn on the "
            "cell only (needs attention maps: tick them in the Embed dock)"
        )
        view = QWidget()
        vf = QFormLayout(view)
        vf.addRow("point size", self.size)
        vf.addRow("opacity", self.opacity)
        filters = QHBoxLayout()
        filters.addWidget(self.foreground)
        filters.addWidget(self.central)
        vf.addRow("filters", filters)
        vf.addRow("channel", self.channel)
        vf.addRow("dataset", self.dataset)
        vf.addRow(self.attention_check)

        # gallery tab
        self.gallery = GalleryWidget()

        # analyse tab
        self.analyse_levels = QWidget()
        self._level_boxes: dict[str, QCheckBox] = {}
        QHBoxLayout(self.analyse_levels).setContentsMargins(0, 0, 0, 0)
        self.an_foreground = QCheckBox("foreground patches only")
        self.an_central = QCheckBox("central patches only")
        self._analysis_obs: pd.DataFrame | None = None  # the table the condition lists read
        defaults = AnalysisSettings()  # the library's (and the command line's) defaults
        self.an_pcs = QSpinBox()
        self.an_pcs.setRange(2, 200)
        self.an_pcs.setValue(defaults.n_pcs)
        self.an_neighbors = QSpinBox()
        self.an_neighbors.setRange(2, 200)
        self.an_neighbors.setValue(defaults.n_neighbors)
        self.an_min_dist = QDoubleSpinBox()
        self.an_min_dist.setRange(0.0, 1.0)
        self.an_min_dist.setSingleStep(0.05)
        self.an_min_dist.setValue(defaults.min_dist)
        self.an_umap_fit = QSpinBox()
        self.an_umap_fit.setRange(1_000, 1_000_000)
        self.an_umap_fit.setSingleStep(5_000)
        self.an_umap_fit.setValue(defaults.umap_max_fit)
        self.an_umap_fit.setToolTip("UMAP is fitted on a sample this big; the other rows are "
                                    "placed by the fitted map")  # fmt: skip
        self.an_resolution = QDoubleSpinBox()
        self.an_resolution.setRange(0.05, 10.0)
        self.an_resolution.setSingleStep(0.1)
        self.an_resolution.setValue(defaults.resolution)
        self.an_max_rows = QSpinBox()
        self.an_max_rows.setRange(0, 50_000_000)
        self.an_max_rows.setSingleStep(10_000)
        self.an_max_rows.setSpecialValueText("all")
        self.an_condition = QComboBox()
        self.an_batch = QComboBox()
        self.an_control = QComboBox()
        self.analyse_button = QPushButton("Analyse")
        self.cancel_analysis_button = QPushButton("Cancel")
        self.cancel_analysis_button.setEnabled(False)
        an = QWidget()
        af = QFormLayout(an)
        af.addRow("levels", self.analyse_levels)
        an_filters = QHBoxLayout()
        an_filters.addWidget(self.an_foreground)
        an_filters.addWidget(self.an_central)
        af.addRow("filters", an_filters)
        af.addRow("PCA components", self.an_pcs)
        af.addRow("UMAP neighbours", self.an_neighbors)
        af.addRow("UMAP min. distance", self.an_min_dist)
        af.addRow("UMAP fitted on", self.an_umap_fit)
        af.addRow("Leiden resolution", self.an_resolution)
        af.addRow("at most rows", self.an_max_rows)
        af.addRow("condition", self.an_condition)
        af.addRow("control", self.an_control)
        af.addRow("batch", self.an_batch)
        buttons = QHBoxLayout()
        buttons.addWidget(self.analyse_button)
        buttons.addWidget(self.cancel_analysis_button)
        af.addRow(buttons)

        # diagnostics tab
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)
        self.context = QLabel("")  # normalisation, channel content: what the verdict cannot see
        self.context.setWordWrap(True)
        self.table = QTableWidget()
        self.table.setMinimumHeight(120)
        self.diagnose_button = QPushButton("What drives the selection?")
        self.recolour_button = QPushButton("Colour by top column")
        diag = QWidget()
        dl = QVBoxLayout(diag)
        dl.addWidget(self.verdict)
        dl.addWidget(self.context)
        dl.addWidget(self.table, 1)
        row = QHBoxLayout()
        row.addWidget(self.diagnose_button)
        row.addWidget(self.recolour_button)
        dl.addLayout(row)

        # batch versus biology tab
        self.condition_combo = QComboBox()
        self.batch_combo = QComboBox()
        self.control_combo = QComboBox()
        self.compare_button = QPushButton("Compare condition and batch")
        self.compare_result = QLabel("")
        self.compare_result.setWordWrap(True)
        self.compare_result.setTextFormat(Qt.TextFormat.RichText)
        for combo, tip in (
            (self.condition_combo, "the treatment column (compound, genotype, ...)"),
            (self.batch_combo, "the batch column (plate, imaging date, ...): folds are grouped "
                               "by it, so no batch is in training and test at once"),
            (self.control_combo, "the control value of the condition (e.g. DMSO)"),
        ):  # fmt: skip
            combo.setToolTip(tip)
        bio = QWidget()
        bl = QFormLayout(bio)
        bl.addRow("condition", self.condition_combo)
        bl.addRow("control", self.control_combo)
        bl.addRow("batch", self.batch_combo)
        bl.addRow(self.compare_button)
        bl.addRow(self.compare_result)

        # export tab
        self.export_format = QComboBox()
        self.export_format.addItems(["h5ad", "parquet", "csv"])
        self.export_all_button = QPushButton("Export whole table...")
        self.export_selection_button = QPushButton("Export selection...")
        self.save_plot_button = QPushButton("Save plot (PNG/SVG)...")
        exp = QWidget()
        el = QFormLayout(exp)
        el.addRow("format", self.export_format)
        el.addRow(self.export_all_button)
        el.addRow(self.export_selection_button)
        el.addRow(self.save_plot_button)

        self.tabs = tabs = QTabWidget()
        self.gallery_tab = self.gallery
        self.analyse_tab = _scroll(an)
        self.diagnostics_tab = _scroll(diag)
        self.biology_tab = _scroll(bio)
        tabs.addTab(self.gallery_tab, "Gallery")
        tabs.addTab(self.diagnostics_tab, "Diagnostics")
        tabs.addTab(self.biology_tab, "Batch vs biology")
        tabs.addTab(self.analyse_tab, "Analyse")
        tabs.addTab(_scroll(view), "View")
        tabs.addTab(_scroll(exp), "Export")
        tabs.setMinimumHeight(160)

        top_pane = QWidget()
        tl = QVBoxLayout(top_pane)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addWidget(self.scatter, 1)
        tl.addWidget(self.legend)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(top_pane)
        self.splitter.addWidget(tabs)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setChildrenCollapsible(False)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        header = QHBoxLayout()
        header.addWidget(self.source_label, 1)
        header.addWidget(self.open_button)
        layout.addLayout(header)
        layout.addLayout(controls)
        layout.addWidget(self.stage)
        layout.addWidget(self.progress)
        layout.addWidget(self.splitter, 1)
        self.setMinimumWidth(380)

    def _connect(self) -> None:
        self.open_store_action.triggered.connect(self._ask_open_store)
        self.open_h5ad_action.triggered.connect(self._ask_open_h5ad)
        self.level.currentTextChanged.connect(self._level_changed)
        self.coords.currentTextChanged.connect(self._coords_changed)
        self.colour.currentTextChanged.connect(self._colour_changed)
        self.size.valueChanged.connect(lambda v: self.scatter.set_point_size(float(v)))
        self.opacity.valueChanged.connect(lambda v: self.scatter.set_opacity(v / 100.0))
        self.tool.currentTextChanged.connect(self.scatter.set_tool)
        self.clear_button.clicked.connect(self.clear_selection)
        for box in (self.foreground, self.central):
            box.toggled.connect(self._filters_changed)
        for combo in (self.channel, self.dataset):
            combo.currentTextChanged.connect(self._filters_changed)
        self.attention_check.toggled.connect(lambda _: self.show_selection(self._selected))
        self.scatter.selection_changed.connect(self._selection_changed)
        self.gallery.page_requested.connect(self._gallery_page)
        self.gallery.cell_clicked.connect(self.centre_on_tile)
        self.analyse_button.clicked.connect(self.start_analysis)
        self.cancel_analysis_button.clicked.connect(self.cancel_analysis)
        self.an_condition.currentTextChanged.connect(self._analysis_condition_changed)
        self.diagnose_button.clicked.connect(self.diagnose_selection)
        self.recolour_button.clicked.connect(self.colour_by_top_column)
        self.compare_button.clicked.connect(self.compare_condition_batch)
        self.condition_combo.currentTextChanged.connect(self._condition_changed)
        self.export_all_button.clicked.connect(lambda: self._ask_export(False))
        self.export_selection_button.clicked.connect(lambda: self._ask_export(True))
        self.save_plot_button.clicked.connect(self._ask_save_plot)
        self._poll = QTimer(self)
        self._poll.setInterval(150)
        self._poll.timeout.connect(self._poll_analysis)

    # ------------------------------------------------------------------ workers
    def _start(self, kind: str, fn, on_done, busy: str | None = None, on_error=None) -> int:
        """Run ``fn()`` in a thread worker; ``on_done(result)`` runs on the GUI thread only if
        no newer request of the same ``kind`` was made meanwhile (the last request wins)."""
        from napari.qt.threading import create_worker

        self._tokens[kind] += 1
        token = self._tokens[kind]
        res = self._res
        if res.closed:  # a closed explorer starts nothing
            return token

        def current() -> bool:
            return not res.closed and self._tokens.get(kind) == token

        def done(result) -> None:
            if current():
                on_done(result)

        def failed(exc) -> None:
            if current():
                (on_error or _error)(exc)

        def finished() -> None:
            res.workers.discard(worker)
            if busy is not None and current():
                self._busy(None)

        worker = create_worker(fn, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(done)
        worker.errored.connect(failed)
        worker.finished.connect(finished)
        res.workers.add(worker)
        if busy is not None:
            self._busy(busy)
        worker.start()
        return token

    def _busy(self, text: str | None, done: int = 0, total: int = 0) -> None:
        """Stage text and a bar under the controls (``None``: idle)."""
        if text is None:
            self.progress.setVisible(False)
            self.stage.setText("")
            return
        self.stage.setText(text)
        self.progress.setVisible(True)
        self.progress.setRange(0, total if total > 0 else 0)
        if total > 0:
            self.progress.setValue(min(done, total))

    # ------------------------------------------------------------------ loading
    def _ask_open_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open an embedding store (.zarr folder)")
        if path:
            self.load(path)

    def _ask_open_h5ad(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open an exported table", "",
                                              "AnnData (*.h5ad)")  # fmt: skip
        if path:
            self.load(path)

    def load(self, path, level: str | None = None) -> None:
        """Open a store (``.zarr``) or an ``.h5ad`` in a worker thread: the scatter fills in
        when it is read (``loaded``). A level without UMAP/PCA yet is not analysed by itself:
        the Analyse tab opens with its settings (``not_analysed``)."""
        path = Path(path)
        self._cancel_selection_work()
        visible = list(self._image_layers())

        def work():
            levels = available_levels(path)
            if not levels:
                raise MaeprobeInputError(
                    f"{path.name} holds no embeddings yet",
                    "embed an image into it (Embed dock) or open another store",
                )
            if path.suffix == ".h5ad":
                analysed = levels
            else:
                from napari_maeprobe.embed.store import EmbeddingStore

                analysed = [lvl for lvl in levels if lvl in EmbeddingStore(path).analysed_levels()]
            want = level or ("patch" if "patch" in analysed else (analysed or levels)[0])
            if want not in analysed:
                from napari_maeprobe.embed.store import EmbeddingStore

                store = EmbeddingStore(path)
                obs = store.read_obs("global" if "global" in levels else want)
                return {"levels": levels, "analysed": analysed, "level": want, "obs": obs,
                        "choices": table_choices(obs), "path": path}  # fmt: skip
            data = load_level(path, want)
            labels: dict = {}
            for name in visible:  # read here, not on the GUI thread at the first click
                cells_of(data, name, {}, labels)
            from napari_maeprobe._napari.widgets import warm_labels_display

            # napari's label-colour code for the overlays, loaded here rather than when the
            # overlays are first added on the GUI thread
            warm_labels_display(*[(np.zeros((8, 8), dtype), _overlay_style(kind)) for dtype, kind
                                  in ((np.uint8, "selected patches"),
                                      (np.uint16, "selected cells"))])  # fmt: skip
            embedded = int(embedded_rows(data.adata).sum())
            return {"levels": levels, "analysed": analysed, "level": want, "data": data,
                    "labels": labels, "embedded": embedded,
                    "choices": table_choices(data.obs), "path": path}  # fmt: skip

        self._start("load", work, self._loaded, busy=f"opening {path.name}...")

    def _loaded(self, result: dict) -> None:
        self.path = result["path"]  # only now: a failed open keeps the store that is shown
        self._set_levels(result["levels"], result["analysed"], result["level"])
        if "data" not in result:
            self._show_unanalysed(result)
            return
        self._labels_cache = {k: v for k, v in result["labels"].items() if v is not None}
        self.load_data(result["data"], embedded=result.get("embedded"),
                       choices=result.get("choices"))  # fmt: skip

    def _set_levels(self, levels: list[str], analysed: list[str], current: str) -> None:
        self.level.blockSignals(True)
        self.level.clear()
        for lvl in levels:
            self.level.addItem(lvl if lvl in analysed else f"{lvl} (not analysed)", lvl)
        self.level.setCurrentIndex(max(0, levels.index(current) if current in levels else 0))
        self.level.blockSignals(False)
        layout = self.analyse_levels.layout()
        for box in self._level_boxes.values():
            layout.removeWidget(box)
            box.deleteLater()
        self._level_boxes = {}
        for lvl in levels:
            box = QCheckBox(lvl)
            box.setChecked(lvl not in analysed or lvl == current)
            layout.addWidget(box)
            self._level_boxes[lvl] = box

    def _show_unanalysed(self, result: dict) -> None:
        """A store whose level has no UMAP/PCA yet: say so and offer the Analyse tab."""
        self.data = None
        self.scatter.set_data(np.zeros((0, 2), dtype=np.float32), pd.DataFrame())
        self._clear_overlays()
        self.gallery.clear()
        name = self.path.name if self.path is not None else "store"
        self.source_label.setText(
            f"<b>{name}</b>: the {result['level']} level is not analysed yet. Pick the "
            "settings in the Analyse tab and press Analyse."
        )
        self._fill_analysis_columns(result["obs"], result["choices"]["groups"])
        self.tabs.setCurrentWidget(self.analyse_tab)
        self._raise_dock()
        self.not_analysed.emit(self.path)

    def load_data(
        self, data: ExplorerData, embedded: int | None = None, choices: dict | None = None
    ) -> None:
        """Show an already loaded level (the same as :meth:`load` without the worker)."""
        self._cancel_selection_work()
        self.data = data
        self._selected = np.zeros(0, dtype=np.int64)
        self.last_clicked = np.zeros(0, dtype=np.int64)
        self.gallery.clear()
        if embedded is None:
            embedded = int(embedded_rows(data.adata).sum())
        self.embedded = embedded
        self.source_label.setText(self._header(data, embedded))
        self.source_label.setToolTip(
            "Masked patches were hidden from the encoder (masking for reconstructions), so they "
            "have no embedding and no point; the gallery shows them as grey patches."
            if embedded < data.n else ""
        )  # fmt: skip
        choices = choices or table_choices(data.obs)
        for combo, items in (
            (self.coords, list(data.coords)),
            (self.colour, choices["colour"]),
            (self.channel, [ALL] + choices["channel"]),
            (self.dataset, [ALL] + choices["dataset"]),
        ):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(items)
            combo.blockSignals(False)
        start = "leiden" if "leiden" in data.obs else self.colour.itemText(0)
        self.colour.blockSignals(True)
        self.colour.setCurrentText(start)
        self.colour.blockSignals(False)
        self.scatter.set_data(data.coords[self.coords.currentText()], data.obs)
        self.scatter.colour_by(self.colour.currentText())
        self._label_scatter()
        self._filters_changed()
        self._show_drivers(data.drivers)
        self._show_context(data)
        self._fill_condition_batch(data.obs, choices["categorical_groups"])
        self._fill_analysis_columns(data.obs, choices["groups"])
        if self.tabs.currentWidget() is self.analyse_tab:
            self.tabs.setCurrentWidget(self.gallery_tab)
        self._raise_dock()
        self._prepare_overlays()
        self.loaded.emit(data)

    def _raise_dock(self) -> None:
        """Bring the explorer's tab to the front when it has something new to show."""
        from napari_maeprobe._napari.hub import _dock_of

        dock = _dock_of(self)
        if dock is not None:
            dock.raise_()

    @staticmethod
    def _header(data: ExplorerData, embedded: int) -> str:
        """The source, level and row counts; masked rows (no embedding) counted apart."""
        name = data.source.name if data.source is not None else "table"
        text = f"<b>{name}</b>: {data.level} level, {data.n:,} rows"
        if embedded < data.n:
            text += (f" ({embedded:,} embedded and plotted; {data.n - embedded:,} masked "
                     "patches have no embedding)")  # fmt: skip
        return text

    def _label_scatter(self) -> None:
        """Axis names and title of saved figures (when the scatter supports them)."""
        data = self.data
        set_labels = getattr(self.scatter, "set_labels", None)
        if data is None or set_labels is None:
            return
        name = data.source.name if data.source is not None else "table"
        set_labels(f"{name}: {data.level} level", self.coords.currentText())

    @staticmethod
    def _values(obs: pd.DataFrame, col: str) -> list[str]:
        if col not in obs:
            return []
        return sorted(str(v) for v in obs[col].dropna().unique())

    def _level_changed(self, _text: str) -> None:
        level = self.level.currentData() or _text
        if self.path is not None and level and (self.data is None or level != self.data.level):
            self.load(self.path, level)

    def _coords_changed(self, name: str) -> None:
        if self.data is not None and name in self.data.coords:
            selected = self.scatter.selected()
            self.scatter.set_data(self.data.coords[name], self.data.obs)
            self.scatter.colour_by(self.colour.currentText())
            self._label_scatter()
            self._filters_changed()
            if len(selected):
                self.scatter.select(selected)

    def _colour_changed(self, column: str) -> None:
        if self.data is not None and column:
            self.scatter.colour_by(column)

    def _filters_changed(self, *_) -> None:
        if self.data is None:
            return
        obs = self.data.obs
        mask = np.ones(len(obs), dtype=bool)
        if self.foreground.isChecked() and "foreground" in obs:
            mask &= obs["foreground"].fillna(False).to_numpy(bool)
        if self.central.isChecked() and "central" in obs:
            mask &= obs["central"].fillna(False).to_numpy(bool)
        for combo, col in ((self.channel, "channel"), (self.dataset, "dataset")):
            value = combo.currentText()
            if value and value != ALL and col in obs:
                mask &= (obs[col].astype(str) == value).to_numpy()
        self.scatter.set_visible(mask)

    # ------------------------------------------------------------------ scatter -> image
    def _image_layers(self) -> dict[str, object]:
        """Image name -> one of its image layers in the viewer (for shape, scale, translate);
        the explorer's own overlays are never images."""
        out = {}
        for layer in self.viewer.layers:
            if layer.__class__.__name__ != "Image" or is_overlay(layer):
                continue
            name = layer.metadata.get("maeprobe_image", layer.name)
            out.setdefault(str(name), layer)
        return out

    def _labels_of(self, image: str) -> np.ndarray | None:
        """The cells of an image: the store's labels, else a ``<image> cells`` layer (cached;
        the store is read in the load worker, so the GUI thread only reads the cache)."""
        if self.data is None:
            return None
        fallback = self._label_layers_data([image])
        return cells_of(self.data, image, fallback, self._labels_cache)

    def _spatial(self, like) -> tuple[tuple[int, ...], tuple, tuple]:
        """The overlay shape, scale and translate for an image layer: the embedding's spatial
        axes (a 2D embedding of a z-stack is drawn on every plane)."""
        nd = len(self.data.patch_size) if self.data is not None else 2
        nd = min(nd, like.ndim)
        return (pixel_shape(like)[-nd:], tuple(like.scale[-nd:]),
                tuple(like.translate[-nd:]))  # fmt: skip

    def _overlay_layers(self) -> list:
        return [ly for ly in self.viewer.layers if is_overlay(ly)]

    def _clear_overlays(self) -> None:
        for layer in self._overlay_layers():
            self.viewer.layers.remove(layer)

    def _cancel_selection_work(self) -> None:
        for kind in ("selection", "gallery"):
            self._tokens[kind] += 1

    def clear_selection(self) -> None:
        """Clear the selection: the scatter, the overlays and the gallery."""
        self.scatter.select(np.zeros(0, dtype=np.int64))
        self.show_selection(np.zeros(0, dtype=np.int64))

    def _selection_changed(self, rows: np.ndarray) -> None:
        self.show_selection(rows)

    def show_selection(self, rows: np.ndarray) -> None:
        """Draw the selected rows on their images (patch footprints, the selected cells'
        outlines, optionally their attention) and fill the gallery; computed in workers,
        the last selection wins. An empty selection removes the overlays."""
        data = self.data
        rows = np.asarray(rows, dtype=np.int64)
        self._selected = rows
        if data is None or len(rows) == 0:
            self._cancel_selection_work()
            self.gallery.clear()
            self.gallery_updated.emit()
            self._blank_overlays()
            return
        names = set(map(str, data.obs["image"].unique()))
        images = {name: layer for name, layer in self._image_layers().items() if name in names}
        specs = {name: self._spatial(like) for name, like in images.items()}
        fallback = self._label_layers_data(images)
        attention = self.attention_check.isChecked()
        cache = self._labels_cache

        def work():
            from napari_maeprobe.pl.overlays import selection_overlays

            picked = set(map(str, data.obs["image"].iloc[rows].unique()))
            out = {}
            for image, (shape, _, _) in specs.items():
                if image not in picked:
                    continue
                labels = cells_of(data, image, fallback, cache)
                out[image] = selection_overlays(data, rows, image, shape, labels, attention)
                if "selected cells" in out[image]:  # compact (uint16), like the cells layer
                    out[image]["selected cells"] = compact_labels(out[image]["selected cells"])
            return out

        self._start("selection", work, lambda out: self._apply_overlays(out, images, specs))
        self._order = None
        self.gallery.seed = -1  # a new selection starts most typical first
        self._gallery_page(0, -1)

    def _label_layers_data(self, images) -> dict[str, np.ndarray]:
        """``<image> cells`` layers' arrays (references, read on the GUI thread)."""
        out = {}
        for layer in self.viewer.layers:
            if layer.__class__.__name__ != "Labels" or is_overlay(layer):
                continue
            for image in images:
                if layer.name == f"{image} cells":
                    out[image] = layer.data
        return out

    def _apply_overlays(self, out: dict, images: dict, specs: dict) -> None:
        """Hand finished overlay arrays to layers (add, update or remove; nothing computed),
        one layer per turn of the event loop: napari takes 0.2-0.4 s to add, update or remove
        a large layer on a software renderer, and one turn per layer keeps each wait to one of
        those, not their sum. A newer selection drops what is left of the queue."""
        token = self._tokens["selection"]
        steps = []
        wanted = set()
        for image, arrays in out.items():
            like = images[image]
            _, scale, translate = specs[image]
            for kind in ("attention", "selected cells", "selected patches"):
                if kind in arrays:
                    name = f"{image} {OVERLAY_NAMES[kind]}"
                    wanted.add(name)
                    steps.append((self._put_overlay, (name, kind, arrays[kind], scale, translate,
                                                      like)))  # fmt: skip
        for layer in self._overlay_layers():
            if layer.name in wanted:
                continue
            if layer.metadata.get("overlay_kind") == "attention":  # optional: gone when unticked
                steps.append((self._remove_layer, (layer,)))
            else:  # no selected rows on this image: blank, kept for the next selection
                steps.append((self._blank_layer, (layer,)))
        self._run_steps(steps, token)

    def _blank_overlays(self) -> None:
        """The selection went: nothing of it stays on the image. Patch and cell overlays are
        blanked (kept, so the next selection only updates their pixels: ~40 ms, against
        ~0.4 s for napari to add a large layer on a software renderer), attention removed."""
        token = self._tokens["selection"]
        steps = []
        for layer in self._overlay_layers():
            if layer.metadata.get("overlay_kind") == "attention":
                steps.append((self._remove_layer, (layer,)))
            else:
                steps.append((self._blank_layer, (layer,)))
        self._run_steps(steps, token)

    @staticmethod
    def _blank_layer(layer) -> None:
        if np.asarray(layer.data).any():
            layer.data = np.zeros(layer.data.shape, dtype=layer.data.dtype)

    def _prepare_overlays(self) -> None:
        """Add the (empty) patch and cell overlays of the images on screen, one per event-loop
        turn, when a level is loaded: the first selection then updates pixels instead of
        waiting for napari to build the layers."""
        data = self.data
        if data is None:
            return
        names = set(map(str, data.obs["image"].unique()))
        token = self._tokens["selection"]
        steps = []
        kinds = ("selected cells", "selected patches") if data.level == "patch" else (
            "selected cells",
        )  # fmt: skip
        wanted = set()
        for image, like in self._image_layers().items():
            if image not in names:
                continue
            shape, scale, translate = self._spatial(like)
            for kind in kinds:
                name = f"{image} {OVERLAY_NAMES[kind]}"
                wanted.add(name)
                layer = self.viewer.layers[name] if name in self.viewer.layers else None
                if layer is not None and tuple(layer.data.shape) == shape:
                    steps.append((self._blank_layer, (layer,)))  # reused: only blanked
                    continue
                dtype = np.uint8 if kind == "selected patches" else np.uint16
                steps.append((self._put_overlay, (name, kind, np.zeros(shape, dtype), scale,
                                                  translate, like)))  # fmt: skip
        for layer in self._overlay_layers():  # another level's or store's: one per turn
            if layer.name not in wanted:
                steps.insert(0, (self._remove_layer, (layer,)))
        QTimer.singleShot(0, lambda: self._run_steps(steps, token))

    def _run_steps(self, steps: list, token: int) -> None:
        if self._res.closed or token != self._tokens["selection"]:
            return  # a newer selection (or a closed explorer) took over
        if not steps:
            self.layers_updated.emit()
            return
        fn, args = steps[0]
        fn(*args)
        QTimer.singleShot(0, lambda: self._run_steps(steps[1:], token))

    def _remove_layer(self, layer) -> None:
        if layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def _put_overlay(self, name, kind, data, scale, translate, like) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is not None and layer.ndim == data.ndim:
            layer.data = data
            return
        if layer is not None:
            self.viewer.layers.remove(layer)
        meta = {OVERLAY_KEY: True, "overlay_kind": kind,
                "overlay_of": str(like.metadata.get("maeprobe_image", ""))}  # fmt: skip
        kw = {"name": name, "scale": scale, "translate": translate, "metadata": meta}
        if kind == "selected patches":
            self.viewer.add_labels(data, **_overlay_style(kind), **kw)
        elif kind == "selected cells":  # the cells' own ids: one outline per cell
            layer = self.viewer.add_labels(data, **_overlay_style(kind), **kw)
            with warnings.catch_warnings():  # "not displayed during 3D rendering": in 2D it is
                warnings.simplefilter("ignore", UserWarning)
                layer.contour = 1
        else:
            self.viewer.add_image(data, colormap="inferno", blending="additive", opacity=0.8,
                                  contrast_limits=(0.0, 1.0), **kw)  # fmt: skip

    # ------------------------------------------------------------------ gallery
    def _channel_views(self, images: set[str]) -> dict[str, list]:
        """Each image's visible channels as the gallery shows them (references to the pixels,
        the colour and contrast limits; read on the GUI thread, cheap). A layer of one channel
        (as the readers open them) is one view; an RGB layer gives three; a multichannel layer
        napari did not split is split on the axis the Data dock uses for it (a 3D layer it
        knows nothing of is taken as a z-stack); a multiscale layer shows its full resolution."""
        from napari_maeprobe._napari.jobs import guess_channel_axis
        from napari_maeprobe.pl.gallery import ChannelView

        nd = len(self.data.patch_size) if self.data is not None else 2
        data_widget = hub_for(self.viewer).data_widget
        views: dict[str, list] = {}
        shown: dict[str, list] = {}
        for layer in self.viewer.layers:
            if layer.__class__.__name__ != "Image" or is_overlay(layer):
                continue
            image = str(layer.metadata.get("maeprobe_image", layer.name))
            if image not in images:
                continue
            pixels = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
            limits = tuple(float(v) for v in layer.contrast_limits)
            name = str(layer.metadata.get("channel", layer.name))
            if layer.rgb:
                parts = [(f"{name} {c}", pixels[..., k], rgb)
                         for k, (c, rgb) in enumerate(zip("RGB", RGB_COLOURS))]  # fmt: skip
            else:
                axis = None
                if "channel" not in layer.metadata and np.ndim(pixels) > nd:
                    try:
                        axis = data_widget._channel_axis(layer) if data_widget else None
                    except (AttributeError, RuntimeError):
                        axis = None
                    if axis is None and data_widget is None:  # planes compared when small
                        small = isinstance(pixels, np.ndarray) and pixels.nbytes <= 64 * 2**20
                        axis = guess_channel_axis(pixels.shape, False, pixels if small else None)
                if axis is None:
                    colour = np.asarray(layer.colormap.colors)[-1][:3]
                    parts = [(name, pixels, tuple(float(v) for v in colour))]
                else:
                    names = list(layer.metadata.get("channel_names") or [])
                    n = pixels.shape[axis]
                    names = names if len(names) == n else [f"{layer.name} {i}" for i in range(n)]
                    parts = [(names[i], pixels[(slice(None),) * axis + (i,)],
                              SPLIT_COLOURS[i % len(SPLIT_COLOURS)]) for i in range(n)]  # fmt: skip
            for part_name, part, rgb in parts:
                view = ChannelView(name=part_name, data=part, rgb=rgb, limits=limits)
                views.setdefault(image, []).append(view)
                if layer.visible:
                    shown.setdefault(image, []).append(view)
        return {image: shown.get(image) or v for image, v in views.items()}

    def _gallery_page(self, offset: int, seed: int) -> None:
        """Compute one page of the gallery in a worker (the last request wins)."""
        data = self.data
        rows = self._selected
        if data is None or len(rows) == 0:
            self.gallery.clear()
            return
        n = self.gallery.per_page.value()
        names = set(map(str, data.obs["image"].iloc[rows].unique()))
        channels = self._channel_views(names)
        fallback = self._label_layers_data(names)
        z_index = embedded_plane(data, channels)
        key = (id(rows), seed)
        order = self._order if self._order_key == key else None
        cache = self._labels_cache
        # four panels and a caption across the dock's width, 64 to 160 px each
        size = int(np.clip((self.gallery.width() - 150) / 4 - 10, 64, 160))
        self.gallery.set_busy(f"drawing the cells of {len(rows):,} selected rows...")
        token = self._tokens["gallery"] + 1  # the one _start gives this request

        def work():
            from napari_maeprobe.pl.gallery import cell_tiles, order_cells

            ordered = order if order is not None else order_cells(
                data, rows, seed=None if seed < 0 else seed
            )  # fmt: skip
            page = ordered.iloc[offset : offset + n]
            labels = {image: cells_of(data, image, fallback, cache)
                      for image in page["image"].astype(str).unique()}  # fmt: skip
            tiles = cell_tiles(data, page, channels, labels, z_index=z_index, size=size,
                               cancelled=lambda: self._tokens["gallery"] != token)  # fmt: skip
            return ordered, tiles

        def done(result) -> None:
            ordered, tiles = result
            self._order, self._order_key = ordered, key
            order_text = "most typical first" if seed < 0 else "a random draw"
            self.gallery.show_tiles(tiles, offset, len(ordered), order_text)
            self.gallery_updated.emit()

        self._start("gallery", work, done)

    def centre_on_tile(self, index: int) -> None:
        """Centre the viewer on a gallery cell and light up its points in the scatter."""
        tiles = self.gallery.tiles
        if not 0 <= index < len(tiles) or self.data is None:
            return
        tile = tiles[index]
        like = self._image_layers().get(tile.image)
        if like is not None:
            centre = np.asarray(tile.centre, dtype=float)
            nd = len(centre)
            world = centre * np.asarray(like.scale[-nd:]) + np.asarray(like.translate[-nd:])
            axes = list(range(self.viewer.dims.ndim - nd, self.viewer.dims.ndim))
            if nd == 3 and self.viewer.dims.ndisplay == 2:
                self.viewer.dims.set_point(axes[0], world[0])
            shown = world[-self.viewer.dims.ndisplay :]
            self.viewer.camera.center = tuple(float(v) for v in shown)
        obs = self.data.obs
        mine = (obs["image"].astype(str) == tile.image) & (obs["cell_id"] == tile.cell_id)
        rows = np.flatnonzero(mine.fillna(False).to_numpy())
        self.highlight_rows(rows)

    # ------------------------------------------------------------------ image -> scatter
    def _on_viewer_click(self, viewer, event):
        """Mouse press in the viewer: on release without a drag, highlight the points of the
        clicked patch (patch level) or cell in the scatter."""
        if event.type != "mouse_press" or self.data is None:
            return
        start = np.asarray(event.position)
        yield
        while event.type == "mouse_move":
            yield
        if np.abs(np.asarray(event.position) - start).max() > 2:
            return  # a drag (pan), not a click
        self.click_world(tuple(event.position), add="Shift" in event.modifiers)

    def click_world(self, position: tuple[float, ...], add: bool = False) -> np.ndarray:
        """Highlight in the scatter the rows under a world position of the viewer."""
        if self.data is None:
            return np.zeros(0, dtype=np.int64)
        nd = len(self.data.patch_size)
        for image, layer in self._image_layers().items():
            point = np.asarray(layer.world_to_data(position))
            shape = pixel_shape(layer)[-nd:]
            local = point[-len(shape) :]
            if not all(0 <= v < s for v, s in zip(local, shape)):
                continue
            rows = rows_at(self.data, image, tuple(local), self._labels_of(image))
            if len(rows):
                return self.highlight_rows(rows, add=add)
        return self.highlight_rows(np.zeros(0, dtype=np.int64), add=add)

    def highlight_rows(self, rows: np.ndarray, add: bool = False) -> np.ndarray:
        """Emphasise rows in the scatter (a click on a cell or patch)."""
        rows = np.asarray(rows, dtype=np.int64)
        if add:
            rows = np.union1d(self.last_clicked, rows)
        self.last_clicked = rows
        self.scatter.highlight(rows)
        return rows

    # ------------------------------------------------------------------ analysis
    def _fill_analysis_columns(self, obs: pd.DataFrame, columns: list[str]) -> None:
        """Offer the grouping columns for condition and batch (optional) in the Analyse tab."""
        self._analysis_obs = obs
        for combo in (self.an_condition, self.an_batch):
            keep = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([NONE, *columns])
            if keep in columns:
                combo.setCurrentText(keep)
            combo.blockSignals(False)
        self._analysis_condition_changed(self.an_condition.currentText())

    def _analysis_condition_changed(self, column: str) -> None:
        from napari_maeprobe.tl.condition_batch import guess_control

        self.an_control.clear()
        obs = self._analysis_obs
        if obs is None or column in ("", NONE) or column not in obs:
            self.an_control.setEnabled(False)
            return
        self.an_control.setEnabled(True)
        self.an_control.addItems(self._values(obs, column))
        try:
            self.an_control.setCurrentText(guess_control(obs[column], None, column))
        except MaeprobeInputError:
            pass

    def analysis_settings(self) -> AnalysisSettings:
        """The Analyse tab's settings as the library takes them."""

        def pick(combo: QComboBox) -> str | None:
            text = combo.currentText()
            return None if text in ("", NONE) or not combo.isEnabled() else text

        condition = pick(self.an_condition)
        return AnalysisSettings(
            foreground=self.an_foreground.isChecked(),
            central=self.an_central.isChecked(),
            n_pcs=self.an_pcs.value(),
            n_neighbors=self.an_neighbors.value(),
            umap_max_fit=self.an_umap_fit.value(),
            min_dist=self.an_min_dist.value(),
            resolution=self.an_resolution.value(),
            max_rows=self.an_max_rows.value() or None,
            condition=condition,
            batch=pick(self.an_batch) if condition else None,
            control=pick(self.an_control) if condition else None,
        )

    def start_analysis(self) -> None:
        """The Analyse button: PCA, UMAP, Leiden and the diagnostics of the ticked levels, in
        the explorer's analysis process; the stages show under the controls."""
        if self._analysis_job is not None:
            return
        if self.path is None or self.path.suffix == ".h5ad":
            _error(MaeprobeInputError(
                "an exported table cannot be re-analysed here",
                "open its embedding store (.zarr) with Open... to analyse it",
            ))  # fmt: skip
            return
        levels = [lvl for lvl, box in self._level_boxes.items() if box.isChecked()]
        if not levels:
            _error(MaeprobeInputError("no level ticked", "tick at least one level to analyse"))
            return
        settings = self.analysis_settings()
        if settings.condition and settings.batch and settings.condition == settings.batch:
            _error(MaeprobeInputError(
                "condition and batch are the same column",
                "pick two different columns, or (none) for batch",
            ))  # fmt: skip
            return
        if settings.condition and not settings.batch:
            _error(MaeprobeInputError(
                f"a condition ({settings.condition}) needs a batch column",
                "pick the batch (plate, imaging date, ...) under batch, or (none) for condition",
            ))  # fmt: skip
            return
        from napari_maeprobe.tl.analysis_process import AnalysisProcess

        try:
            if self._res.analysis is None:
                self._res.analysis = AnalysisProcess()
            self._analysis_job = self._res.analysis.submit(self.path, levels, settings)
        except (OSError, RuntimeError) as exc:  # the process could not start or take the job
            _error(MaeprobeInputError(
                f"the analysis could not start ({exc})",
                "close other programs that use the memory, then retry",
            ))  # fmt: skip
            return
        self._analysis_levels = levels
        self.analyse_button.setEnabled(False)
        self.cancel_analysis_button.setEnabled(True)
        self._busy(f"analysing {', '.join(levels)}: starting...")
        self._poll.start()

    def cancel_analysis(self) -> None:
        """The Cancel button of the Analyse tab."""
        if self._analysis_job is None or self._res.analysis is None:
            return
        self.stage.setText("cancelling the analysis...")
        self.cancel_analysis_button.setEnabled(False)
        self._res.analysis.cancel(self._analysis_job)

    def _poll_analysis(self) -> None:
        """Read the analysis process's messages (never blocks)."""
        proc = self._res.analysis
        if proc is None or self._analysis_job is None:
            self._poll.stop()
            return
        for msg in proc.poll():
            kind, job = msg[0], msg[1]
            if job != self._analysis_job:
                continue
            if kind == "progress":
                text, done, total = msg[2], int(msg[3]), int(msg[4])
                counts = f" ({done:,} / {total:,})" if total > 0 else ""
                self._busy(f"analysing: {text}{counts}", done, total)
            elif kind in ("done", "error", "cancelled"):
                self._analysis_ended(kind, msg[2] if len(msg) > 2 else None)

    def _analysis_ended(self, kind: str, payload) -> None:
        self._poll.stop()
        self._analysis_job = None
        self.analyse_button.setEnabled(True)
        self.cancel_analysis_button.setEnabled(False)
        self._busy(None)
        if kind == "done":
            level = self.level.currentData() or None
            self.load(self.path, level)
        elif kind == "error":
            _error(str(payload))
            self.stage.setText("the analysis failed (see the notification)")
        else:
            self.stage.setText(
                "analysis cancelled: a level whose results were already saved keeps them; the "
                "level it was working on keeps no new results (re-run Analyse for it)"
            )
        self.analysis_finished.emit(kind)

    # ------------------------------------------------------------------ closing
    def event(self, ev) -> bool:  # noqa: D401 (Qt API)
        """A dock closed by napari takes this widget out of its parent: end its jobs then."""
        if ev.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                if not self._docked:
                    QTimer.singleShot(0, self._on_docked)
                self._docked = True
            elif self._docked:
                self.shutdown()
        return super().event(ev)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        """Wide enough for a readable scatter and four gallery panels; the canvas keeps more
        than half of a 1920-px window."""
        return QSize(580, 900)

    def showEvent(self, event) -> None:  # noqa: N802 (Qt API)
        """First shown: the scatter (with its legend) takes 55 % of the height, the tabs the
        rest (the splitter would otherwise share by the tab pages' large size hints)."""
        super().showEvent(event)
        if not getattr(self, "_sized", False):
            self._sized = True
            QTimer.singleShot(0, self._size_splitter)

    def _size_splitter(self) -> None:
        total = max(self.splitter.height(), 400)
        self.splitter.setSizes([int(total * 0.55), total - int(total * 0.55)])

    def _on_docked(self) -> None:
        """Once in the window: share the dock area with the other maeprobe docks as tabs, and
        end the analysis process when the window goes (a closed viewer)."""
        from napari_maeprobe._napari.hub import arrange_docks

        top = self.window()
        if top is not self and not getattr(self, "_watching_window", False):
            res = self._res
            top.destroyed.connect(lambda *_: res.shutdown())
            self._watching_window = True
        arrange_docks(self)

    def shutdown(self) -> None:
        """End the analysis process, drop pending work and let go of the viewer (the dock or
        the viewer closed): no more loads from the hub, no more clicks handled, and the hub
        forgets this explorer so the next one can be opened."""
        for kind in self._tokens:
            self._tokens[kind] += 1
        self._poll.stop()
        self._analysis_job = None
        self._res.shutdown()
        hub = hub_for(self.viewer)
        try:
            hub.store_ready.disconnect(self.load)
        except (TypeError, RuntimeError):
            pass  # already disconnected
        if self._on_viewer_click in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_viewer_click)
        if hub.explorer is self:
            hub.explorer = None

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)

    # ------------------------------------------------------------------ diagnostics
    def _show_drivers(self, report) -> None:
        self.drivers = report
        self.table.clear()
        if report is None:
            self.verdict.setText("no diagnostics yet (analyse the store)")
            self.table.setRowCount(0)
            return
        self.verdict.setText(f"<b>{report.verdict}</b>")
        table = report.table
        cols = [c for c in ("column", "role", "effect", "ami", "ami_null", "p_value",
                            "knn_purity", "purity_gain", "position_r2", "missing",
                            "confounded_with") if c in table.columns]  # fmt: skip
        self.table.setColumnCount(len(cols))
        self.table.setHorizontalHeaderLabels(cols)
        self.table.setRowCount(len(table))
        for i, (_, row) in enumerate(table[cols].iterrows()):
            for j, c in enumerate(cols):
                v = row[c]
                if v is None or v is pd.NA or (isinstance(v, str) and not v):
                    v = float("nan")  # shown as a dash, like a missing number
                text = f"{v:.3f}" if isinstance(v, float | np.floating) and np.isfinite(v) else (
                    "–" if isinstance(v, float | np.floating) else str(v)
                )  # fmt: skip
                self.table.setItem(i, j, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def _show_context(self, data: ExplorerData) -> None:
        """What the verdict cannot see: how the images were normalised, and at the channel
        level whether the per-channel embeddings describe the channel or the cell."""
        from napari_maeprobe.pp.normalization_groups import describe_normalization

        facts = dict(data.adata.uns.get("maeprobe", {}) or {})
        hides = facts.get("normalization_hides") or describe_normalization(
            str(facts.get("normalization", "percentile")), str(facts.get("normalize_by", "image")),
            facts.get("normalize_reference"), bool(facts.get("model_standardizes_crops")),
        )  # fmt: skip
        summary = dict(dict(facts.get("analysis", {}) or {}).get(data.level, {}) or {})
        lines = [f"Normalisation: {hides}."]
        content = summary.get("channel_content")
        if isinstance(content, dict) and content.get("line"):
            lines.append(str(content["line"]))
        stored = summary.get("condition_batch")
        if isinstance(stored, dict) and stored.get("summary"):
            lines.append(str(stored["summary"]))
        self.context.setText("\n".join(lines))

    def _fill_condition_batch(self, obs: pd.DataFrame, columns: list[str]) -> None:
        """Offer the grouping columns; preselect those whose names say treatment or batch."""
        from napari_maeprobe.schema import column_role

        for combo, role in ((self.condition_combo, "condition"), (self.batch_combo, "batch")):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(columns)
            pick = [c for c in columns if column_role(c) == role and c not in ("image", "dataset")]
            if pick:
                combo.setCurrentText(pick[0])
            combo.blockSignals(False)
        self._condition_changed(self.condition_combo.currentText())
        self.compare_button.setEnabled(len(columns) >= 2)

    def _condition_changed(self, column: str) -> None:
        from napari_maeprobe.tl.condition_batch import guess_control

        self.control_combo.clear()
        if self.data is None or column not in self.data.obs:
            return
        values = self._values(self.data.obs, column)
        self.control_combo.addItems(values)
        try:
            self.control_combo.setCurrentText(guess_control(self.data.obs[column], None, column))
        except MaeprobeInputError:
            pass  # no usual control name: the user picks one

    def compare_condition_batch(self) -> None:
        """Condition vs control with folds grouped by batch, for the embedding and the
        intensity/shape baseline (tl.condition_batch), on the cells (global level), in a
        worker thread."""
        from napari_maeprobe.tl.condition_batch import compare_condition_batch

        data = self.data
        condition, batch = self.condition_combo.currentText(), self.batch_combo.currentText()
        control = self.control_combo.currentText() or None
        if data is None or not condition or not batch:
            _error(ValueError("load a store with condition and batch columns first"))
            return
        if condition == batch:
            _error(ValueError("pick two different columns for condition and batch"))
            return

        def work():
            adata = data.adata
            if data.level != "global":
                if data.store is None:
                    raise MaeprobeInputError(
                        "the comparison needs the cells (global level), not loaded here",
                        "open the store that holds the global level",
                    )
                from napari_maeprobe.table import read_level

                adata = read_level(data.store, "global")
            return compare_condition_batch(adata, condition, batch, control)

        def done(result: dict) -> None:
            self.comparison = result
            self.compare_result.setText(_comparison_html(result))

        self._start("compare", work, done, busy=f"comparing {condition} and {batch}...")

    def diagnose_selection(self) -> None:
        """Rank the metadata columns by how much the current selection (vs the rest) follows
        them, in a worker thread; the table and verdict update when done."""
        from napari_maeprobe.tl.diagnostics import what_drives

        data = self.data
        rows = self.scatter.selected()
        if data is None or data.X is None or len(rows) == 0:
            _error(ValueError("select some points first (lasso, rectangle or click)"))
            return
        selection = np.zeros(data.n, dtype=bool)
        selection[rows] = True
        def work():
            valid = embedded_rows(data.adata)
            obs = data.obs[valid].reset_index(drop=True)
            return what_drives(data.X[valid], obs, selection[valid], labels_name="selection")

        def done(report):
            self._show_drivers(report)
            self.diagnostics_ready.emit(report)

        self._start("diagnose", work, done, busy="diagnosing the selection...")

    def colour_by_top_column(self) -> None:
        """Recolour the scatter by the column that best explains the clusters/selection."""
        report = self.drivers
        if report is None or report.table.empty:
            return
        top = str(report.table.iloc[0]["column"])
        if top in [self.colour.itemText(i) for i in range(self.colour.count())]:
            self.colour.setCurrentText(top)

    # ------------------------------------------------------------------ export
    def export(
        self,
        path: str | Path,
        selection_only: bool = False,
        fmt: str | None = None,
        rows: np.ndarray | None = None,
    ):
        """Write the whole table or the selection (h5ad / parquet / csv, from the suffix);
        rows without an embedding (masked patches) are left out (see ``io.export``)."""
        from napari_maeprobe.io.export import write_table

        data = self.data
        if data is None:
            raise ValueError("nothing loaded to export")
        path = Path(path)
        fmt = fmt or path.suffix.lstrip(".")
        if rows is None:
            rows = self.scatter.selected() if selection_only else np.arange(data.n)
        table = data.adata[np.asarray(rows, dtype=np.int64)].copy()
        facts = table.uns.setdefault("maeprobe", {})
        facts["source"] = str(data.source)
        facts["selection_only"] = bool(selection_only)
        return write_table(table, fmt, path)

    def _ask_export(self, selection_only: bool) -> None:
        fmt = self.export_format.currentText()
        path, _ = QFileDialog.getSaveFileName(self, "Export", f"embeddings.{fmt}", f"*.{fmt}")
        if path:
            self.export_in_background(path, selection_only, fmt)

    def export_in_background(self, path, selection_only: bool = False, fmt: str | None = None):
        """:meth:`export` in a worker (a large table takes seconds to write); says where it
        went and how many masked rows (no embedding) were left out."""
        from napari.utils.notifications import show_info

        if self.data is None:
            _error(MaeprobeInputError("nothing loaded to export", "open a store first"))
            return
        if selection_only and len(self.scatter.selected()) == 0:
            _error(MaeprobeInputError(
                "nothing selected to export", "select points first, or export the whole table"
            ))  # fmt: skip
            return
        rows = self.scatter.selected() if selection_only else None

        def done(out) -> None:
            note = out.left_out() if hasattr(out, "left_out") else ""
            show_info(f"maeprobe: wrote {getattr(out, 'rows', '?'):,} rows to {out}"
                      + (f"; {note}" if note else ""))  # fmt: skip
            self.exported.emit(out)

        self._start("export", lambda: self.export(path, selection_only, fmt, rows=rows), done,
                    busy=f"exporting to {Path(path).name}...")  # fmt: skip

    def _ask_save_plot(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save plot", "scatter.png", "*.png *.svg")
        if path:
            self.scatter.export_image(path)



def table_choices(obs: pd.DataFrame) -> dict[str, list[str]]:
    """What the explorer's combo boxes offer for a table, in one pass over its columns (the load
    worker computes it; at 100k+ rows, counting values on the GUI thread took ~0.5 s):
    ``colour`` (columns with more than one value), ``channel`` and ``dataset`` (their values),
    ``groups`` (condition/batch candidates: 2-200 values, not analysis, channel or identity
    columns) and ``categorical_groups`` (those stored as categories)."""
    from napari_maeprobe.schema import column_role

    out: dict[str, list[str]] = {"colour": [], "groups": [], "categorical_groups": []}
    for c in obs.columns:
        n = obs[c].nunique(dropna=True)
        if c not in ("level", "analysed") and n > 1:
            out["colour"].append(c)
        categorical = isinstance(obs[c].dtype, pd.CategoricalDtype)
        if (categorical or obs[c].dtype == object) and 2 <= n <= 200 and column_role(c) not in (
            "analysis", "channel", "identity"
        ):  # fmt: skip
            out["groups"].append(c)
            if categorical:
                out["categorical_groups"].append(c)
    for col in ("channel", "dataset"):
        out[col] = sorted(str(v) for v in obs[col].dropna().unique()) if col in obs else []
    return out


def pixel_shape(layer) -> tuple[int, ...]:
    """A napari image layer's spatial shape (an RGB layer's colour axis left out)."""
    shape = tuple(int(v) for v in layer.data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def embedded_plane(data: ExplorerData, channels: dict | None = None) -> int | None:
    """The z plane a 2D embedding of a z-stack was made from (``None``: a maximum projection,
    or no z-stack): the store's ``z_index``, else the middle plane as ``project_z`` takes it."""
    facts = data.store.facts if data.store is not None else {}
    if facts.get("projection") != "slice" or len(data.patch_size) == 3:
        return None
    if facts.get("z_index") is not None:
        return int(facts["z_index"])
    for views in (channels or {}).values():
        for view in views:
            if np.ndim(view.data) == 3:
                return int(np.shape(view.data)[0]) // 2
    return None


def cells_of(
    data: ExplorerData, image: str, fallback: dict, cache: dict, z_index: int | None = None
) -> np.ndarray | None:
    """The cells of an image on the embedding's spatial axes (any thread): the store's labels,
    else the ``<image> cells`` layer's (``fallback``). 3D cells behind a 2D embedding of a
    z-stack are taken at the embedded plane, or projected (a pixel shows the cell any plane
    holds there). Found labels are cached; a miss is not, so later cells are picked up."""
    if cache.get(image) is not None:
        return cache[image]
    labels = _read_labels(data, image)
    if labels is None and fallback.get(image) is not None:
        labels = np.asarray(fallback[image])
    if labels is None:
        return None
    nd = len(data.patch_size)
    if labels.ndim > nd:
        z = z_index if z_index is not None else embedded_plane(data)
        if labels.ndim == nd + 1 and z is not None and 0 <= z < labels.shape[0]:
            labels = labels[z]
        else:
            labels = labels.max(axis=tuple(range(labels.ndim - nd)))
    cache[image] = labels
    return labels


def _read_labels(data: ExplorerData | None, image: str) -> np.ndarray | None:
    """The store's label image of an image (None without a store or labels); any thread."""
    if data is None or data.store is None or image not in data.image_index:
        return None
    i = data.image_index[image]
    return data.store.labels(i) if data.store.has_labels(i) else None


def _comparison_html(result: dict) -> str:
    """The comparison's summary line and its table, as rich text for a label."""
    import html

    parts = [f"<b>{html.escape(str(result.get('summary', '')))}</b>"]
    rows = result.get("table")
    if isinstance(rows, list) and rows:
        frame = pd.DataFrame.from_records(rows)
        parts.append(frame.to_html(index=False, float_format=lambda v: f"{v:.2f}", border=0))
    for note in result.get("notes", []) or []:
        parts.append(f"<i>{html.escape(str(note))}</i>")
    return "<br>".join(parts)
