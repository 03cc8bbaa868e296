"""The linked embedding explorer: scatter <-> image layers, diagnostics and export, in one dock.

Thin over :mod:`napari_maeprobe.pl.linking` (rows <-> pixels), :mod:`.diagnostics` and
:mod:`.export`; the observation table of the loaded level is the single source of truth.
Long work (loading, analysing, diagnosing a selection) runs in napari thread workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_maeprobe._napari.hub import hub_for
from napari_maeprobe._napari.scatter import LegendWidget, ScatterCanvas
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.pl.linking import (
    ExplorerData,
    available_levels,
    cell_outlines,
    highlight_image,
    load_level,
    paste_cells,
    rows_at,
    selected_cells,
)

ALL = "(all)"


def _label_colours(rgba: tuple[float, float, float, float]):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: rgba})


PATCH_COLOUR = (0.0, 0.9, 1.0, 1.0)  # cyan: selected patches
OUTLINE_COLOUR = (1.0, 0.95, 0.0, 1.0)  # yellow: outlines of the selected cells


def _error(exc: BaseException) -> None:
    from napari.utils.notifications import show_error

    show_error(f"maeprobe: {exc}")


class ExplorerWidget(QWidget):
    """Scatter of one level's UMAP/PCA, linked both ways to the image layers."""

    loaded = Signal(object)  # ExplorerData
    layers_updated = Signal()  # after a selection was drawn on the images
    diagnostics_ready = Signal(object)  # DriversReport

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.data: ExplorerData | None = None
        self.path: Path | None = None
        self._worker = None
        self._labels_cache: dict[str, np.ndarray] = {}
        self.last_clicked: np.ndarray = np.zeros(0, dtype=np.int64)
        self.drivers = None  # the DriversReport the diagnostics tab shows
        self.comparison: dict | None = None  # the last batch-versus-biology result

        self.source_label = QLabel("no embeddings loaded")
        self.open_button = QPushButton("Open store / .h5ad...")
        self.level = QComboBox()
        self.coords = QComboBox()
        self.colour = QComboBox()
        self.size = QSlider(Qt.Orientation.Horizontal)
        self.size.setRange(1, 20)
        self.size.setValue(4)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(5, 100)
        self.opacity.setValue(80)
        self.tool = QComboBox()
        self.tool.addItems(["pan", "lasso", "rect"])
        self.foreground = QCheckBox("foreground patches")
        self.central = QCheckBox("central patches")
        self.channel = QComboBox()
        self.dataset = QComboBox()
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.scatter = ScatterCanvas()
        self.legend = LegendWidget()

        form = QFormLayout()
        form.addRow("level", self.level)
        form.addRow("coordinates", self.coords)
        form.addRow("colour by", self.colour)
        form.addRow("point size", self.size)
        form.addRow("opacity", self.opacity)
        form.addRow("tool", self.tool)
        filters = QHBoxLayout()
        filters.addWidget(self.foreground)
        filters.addWidget(self.central)
        form.addRow("filters", filters)
        form.addRow("channel", self.channel)
        form.addRow("dataset", self.dataset)

        # diagnostics tab
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)
        self.table = QTableWidget()
        self.diagnose_button = QPushButton("What drives the selection?")
        self.recolour_button = QPushButton("Colour by top column")
        diag = QWidget()
        dl = QVBoxLayout(diag)
        dl.addWidget(self.verdict)
        dl.addWidget(self.table)
        row = QHBoxLayout()
        row.addWidget(self.diagnose_button)
        row.addWidget(self.recolour_button)
        dl.addLayout(row)

        self.context = QLabel("")  # normalisation, channel content: what the verdict cannot see
        self.context.setWordWrap(True)
        dl.insertWidget(1, self.context)

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
        result_box = QScrollArea()  # the line and its table scroll, the controls stay put
        result_box.setWidget(self.compare_result)
        result_box.setWidgetResizable(True)
        bl.addRow(result_box)

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
        tabs.addTab(diag, "Diagnostics")
        tabs.addTab(bio, "Batch vs biology")
        tabs.addTab(exp, "Export")

        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(self.source_label, 1)
        top.addWidget(self.open_button)
        layout.addLayout(top)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        self.scatter.setMinimumHeight(320)
        legend_box = QScrollArea()
        legend_box.setWidget(self.legend)
        legend_box.setWidgetResizable(True)
        legend_box.setMaximumHeight(110)
        layout.addWidget(self.scatter, 3)
        layout.addWidget(legend_box)
        layout.addWidget(tabs, 1)

        self.open_button.clicked.connect(self._ask_open)
        self.level.currentTextChanged.connect(self._level_changed)
        self.coords.currentTextChanged.connect(self._coords_changed)
        self.colour.currentTextChanged.connect(self._colour_changed)
        self.size.valueChanged.connect(lambda v: self.scatter.set_point_size(float(v)))
        self.opacity.valueChanged.connect(lambda v: self.scatter.set_opacity(v / 100.0))
        self.tool.currentTextChanged.connect(self.scatter.set_tool)
        for box in (self.foreground, self.central):
            box.toggled.connect(self._filters_changed)
        for combo in (self.channel, self.dataset):
            combo.currentTextChanged.connect(self._filters_changed)
        self.scatter.selection_changed.connect(self._selection_changed)
        self.diagnose_button.clicked.connect(self.diagnose_selection)
        self.recolour_button.clicked.connect(self.colour_by_top_column)
        self.compare_button.clicked.connect(self.compare_condition_batch)
        self.condition_combo.currentTextChanged.connect(self._condition_changed)
        self.export_all_button.clicked.connect(lambda: self._ask_export(False))
        self.export_selection_button.clicked.connect(lambda: self._ask_export(True))
        self.save_plot_button.clicked.connect(self._ask_save_plot)
        hub = hub_for(viewer)
        hub.store_ready.connect(self.load)
        viewer.mouse_drag_callbacks.append(self._on_viewer_click)
        if hub.last_store is not None:
            self.load(hub.last_store)

    # ------------------------------------------------------------------ loading
    def _ask_open(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open an embedding store (.zarr)")
        if not path:
            path, _ = QFileDialog.getOpenFileName(self, "Open an .h5ad", "", "AnnData (*.h5ad)")
        if path:
            self.load(path)

    def load(self, path, level: str | None = None) -> None:
        """Load a store (analysing it first when it has no UMAP yet) or an ``.h5ad``, in a
        worker thread; the scatter fills in when it is done (``loaded`` is emitted)."""
        from napari.qt.threading import thread_worker

        path = Path(path)
        levels = available_levels(path)
        if not levels:
            _error(ValueError(f"{path} holds no embeddings"))
            return
        level = level or ("patch" if "patch" in levels else levels[0])
        self.path = path

        @thread_worker
        def work():
            if path.suffix != ".h5ad":
                from napari_maeprobe.embed.store import EmbeddingStore

                store = EmbeddingStore(path)
                missing = [lvl for lvl in levels if lvl not in store.analysed_levels()]
                if missing:
                    yield ("analysing", 0, len(missing))
                    yield from _analyse_in_subprocess(path, missing)
            yield ("loading", 0, 1)
            return load_level(path, level)

        self._run(work(), self._show, busy="loading")
        self.level.blockSignals(True)
        self.level.clear()
        self.level.addItems(levels)
        self.level.setCurrentText(level)
        self.level.blockSignals(False)

    def _run(self, worker, on_done, busy: str) -> None:
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)
        self.progress.setFormat(busy)
        if hasattr(worker.signals, "yielded"):  # generator workers report their stage
            worker.yielded.connect(lambda msg: self.progress.setFormat(f"{msg[0]}..."))
        worker.returned.connect(on_done)
        worker.errored.connect(_error)
        worker.finished.connect(lambda: self.progress.setVisible(False))
        self._worker = worker
        worker.start()

    def _show(self, data: ExplorerData) -> None:
        self.load_data(data)

    def load_data(self, data: ExplorerData) -> None:
        """Show an already loaded level (the same as :meth:`load` without the worker)."""
        self.data = data
        self._labels_cache.clear()
        name = data.source.name if data.source is not None else "table"
        self.source_label.setText(f"{name}: {data.level}, {data.n:,} rows")
        for combo, items in (
            (self.coords, list(data.coords)),
            (self.colour, self._colour_columns(data.obs)),
            (self.channel, [ALL] + self._values(data.obs, "channel")),
            (self.dataset, [ALL] + self._values(data.obs, "dataset")),
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
        self.legend.set_entries(self.scatter.legend())
        self._filters_changed()
        self._show_drivers(data.drivers)
        self._show_context(data)
        self._fill_condition_batch(data.obs)
        self.loaded.emit(data)

    @staticmethod
    def _values(obs: pd.DataFrame, col: str) -> list[str]:
        if col not in obs:
            return []
        return sorted(str(v) for v in obs[col].dropna().unique())

    @staticmethod
    def _colour_columns(obs: pd.DataFrame) -> list[str]:
        skip = {"level", "analysed"}
        return [c for c in obs.columns if c not in skip and obs[c].nunique(dropna=True) > 1]

    def _level_changed(self, level: str) -> None:
        if self.path is not None and level and (self.data is None or level != self.data.level):
            self.load(self.path, level)

    def _coords_changed(self, name: str) -> None:
        if self.data is not None and name in self.data.coords:
            selected = self.scatter.selected()
            self.scatter.set_data(self.data.coords[name], self.data.obs)
            self.scatter.colour_by(self.colour.currentText())
            self._filters_changed()
            if len(selected):
                self.scatter.select(selected)

    def _colour_changed(self, column: str) -> None:
        if self.data is not None and column:
            self.scatter.colour_by(column)
            self.legend.set_entries(self.scatter.legend())

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
        """Image name -> one of its image layers in the viewer (for shape, scale, translate)."""
        out = {}
        for layer in self.viewer.layers:
            if layer.__class__.__name__ != "Image":
                continue
            name = layer.metadata.get("maeprobe_image", layer.name)
            out.setdefault(str(name), layer)
        return out

    def _labels_of(self, image: str) -> np.ndarray | None:
        if image in self._labels_cache:
            return self._labels_cache[image]
        labels = None
        data = self.data
        if data is not None and data.store is not None and image in data.image_index:
            i = data.image_index[image]
            if data.store.has_labels(i):
                labels = data.store.labels(i)
        if labels is None:
            for layer in self.viewer.layers:
                if layer.__class__.__name__ == "Labels" and layer.name == f"{image} cells":
                    labels = np.asarray(layer.data)
        self._labels_cache[image] = labels
        return labels

    def _put_layer(self, name: str, data: np.ndarray, kind: str, like, **kwargs) -> None:
        kw = {"scale": like.scale, "translate": like.translate}
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            return
        if kind == "labels":
            self.viewer.add_labels(data, name=name, **kw, **kwargs)
        else:
            self.viewer.add_image(data, name=name, **kw, **kwargs)

    def _selection_changed(self, rows: np.ndarray) -> None:
        self.show_selection(rows)

    def show_selection(self, rows: np.ndarray) -> None:
        """Draw the selected rows on their images: patch footprints, cell outlines, and the
        stored attention maps and masked reconstructions (with the mask) of those cells."""
        data = self.data
        if data is None:
            return
        rows = np.asarray(rows, dtype=np.int64)
        images = self._image_layers()
        picked = set(data.obs["image"].astype(str).iloc[rows]) if len(rows) else set()
        for image, like in images.items():
            if image not in set(data.obs["image"].astype(str).unique()):
                continue
            shape = tuple(like.data.shape[-len(data.patch_size) :])
            labels = self._labels_of(image)
            if image not in picked:
                for suffix in ("selected patches", "selected cells"):
                    name = f"{image} {suffix}"
                    if name in self.viewer.layers:
                        self.viewer.layers[name].data = np.zeros(shape, dtype=np.uint8)
                continue
            mine = rows[(data.obs["image"].astype(str).iloc[rows] == image).to_numpy()]
            cell_labels = labels if data.level != "patch" else None
            hl = highlight_image(data, mine, image, shape, cell_labels)
            self._put_layer(f"{image} selected patches", hl, "labels", like, opacity=0.45,
                            colormap=_label_colours(PATCH_COLOUR))  # fmt: skip
            cells = selected_cells(data, mine)["cell_id"].to_numpy(np.int64)
            if labels is not None and labels.shape == shape:
                outlines = cell_outlines(labels, cells)
                self._put_layer(f"{image} selected cells", outlines, "labels", like,
                                colormap=_label_colours(OUTLINE_COLOUR))  # fmt: skip
            for name, kwargs in (
                ("attention", {"colormap": "inferno", "blending": "additive", "opacity": 0.7}),
                ("reconstruction", {"colormap": "gray", "blending": "translucent"}),
                ("mask", {"colormap": "red", "blending": "additive", "opacity": 0.4}),
            ):
                img = paste_cells(data, name, image, cells, shape)
                if img is not None:
                    self._put_layer(f"{image} {name}", np.nan_to_num(img), "image", like,
                                    **kwargs)  # fmt: skip
        self.layers_updated.emit()

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
        for image, layer in self._image_layers().items():
            point = np.asarray(layer.world_to_data(position))
            shape = layer.data.shape[-len(self.data.patch_size) :]
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

    def _fill_condition_batch(self, obs: pd.DataFrame) -> None:
        """Offer the grouping columns; preselect those whose names say treatment or batch."""
        from napari_maeprobe.schema import column_role

        columns = [c for c in obs.columns
                   if isinstance(obs[c].dtype, pd.CategoricalDtype)
                   and 2 <= obs[c].nunique(dropna=True) <= 200
                   and column_role(c) not in ("analysis", "channel", "identity")]  # fmt: skip
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
        from napari.qt.threading import thread_worker

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

        @thread_worker
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

        self._run(work(), done, busy=f"comparing {condition} and {batch}")

    def diagnose_selection(self) -> None:
        """Rank the metadata columns by how much the current selection (vs the rest) follows
        them, in a worker thread; the table and verdict update when done."""
        from napari.qt.threading import thread_worker

        from napari_maeprobe.tl.diagnostics import what_drives

        data = self.data
        rows = self.scatter.selected()
        if data is None or data.X is None or len(rows) == 0:
            _error(ValueError("select some points first (lasso, rectangle or click)"))
            return
        selection = np.zeros(data.n, dtype=bool)
        selection[rows] = True
        valid = np.isfinite(data.X).all(axis=1)

        @thread_worker
        def work():
            obs = data.obs[valid].reset_index(drop=True)
            return what_drives(data.X[valid], obs, selection[valid], labels_name="selection")

        def done(report):
            self._show_drivers(report)
            self.diagnostics_ready.emit(report)

        self._run(work(), done, busy="diagnosing the selection")

    def colour_by_top_column(self) -> None:
        """Recolour the scatter by the column that best explains the clusters/selection."""
        report = self.drivers
        if report is None or report.table.empty:
            return
        top = str(report.table.iloc[0]["column"])
        if top in [self.colour.itemText(i) for i in range(self.colour.count())]:
            self.colour.setCurrentText(top)

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path, selection_only: bool = False, fmt: str | None = None):
        """Write the whole table or the selection (h5ad / parquet / csv, from the suffix)."""
        from napari_maeprobe.io.export import write_table

        data = self.data
        if data is None:
            raise ValueError("nothing loaded to export")
        path = Path(path)
        fmt = fmt or path.suffix.lstrip(".")
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
            try:
                self.export(path, selection_only, fmt)
            except Exception as exc:  # shown to the user, GUI stays usable
                _error(exc)

    def _ask_save_plot(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save plot", "scatter.png", "*.png *.svg")
        if path:
            self.scatter.export_image(path)


def _analyse_in_subprocess(path: Path, levels: list[str]):
    """Run ``maeprobe analyze`` in a separate process: UMAP's numba compilation and the
    clustering hold the GIL for seconds, which would freeze the GUI if run in a thread here.
    Yields while waiting; raises the command's one-line error if it fails."""
    import subprocess
    import sys
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: progress bars cannot fill it
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_maeprobe.cli", "analyze", str(path),
         "--levels", ",".join(levels)],
        stdout=subprocess.DEVNULL, stderr=log, text=True,
    )  # fmt: skip
    try:
        while proc.poll() is None:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                yield ("analysing", 0, len(levels))
    finally:
        if proc.poll() is None:  # the worker was quit (widget closed): stop the analysis too
            proc.kill()
    log.seek(0)
    err = [ln for ln in log.read().splitlines() if ln.startswith("maeprobe")]
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(err[-1] if err else f"maeprobe analyze failed ({proc.returncode})")


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
