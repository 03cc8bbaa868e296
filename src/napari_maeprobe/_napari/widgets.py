"""Dock widgets: "Data and segmentation" (image from layers, cells) and "Embed" (the store).

Thin on purpose: the widgets collect settings and show results; the work is done by the core
library through :mod:`.jobs`, in napari thread workers (never on the GUI thread). Progress comes
back through a Qt signal emitted from the worker thread (queued to the GUI thread), so no widget
is touched outside the GUI thread; errors become notifications that name the problem and its
fix, and the buttons are re-enabled whatever happened.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import napari
import napari.layers
import numpy as np
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_maeprobe._napari.hub import compact_combos
from napari_maeprobe._napari.jobs import (
    BuiltImage,
    ChannelSource,
    EmbedTask,
    NamedJob,
    Outcome,
    build_image,
    error_message,
    guess_channel_axis,
    segment_image,
    warm_imports,
)
from napari_maeprobe._napari.layers import is_overlay
from napari_maeprobe.embed.job import MASKING_CHOICES, EmbedJob
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage

log = logging.getLogger(__name__)

#: layers this plugin marks as boundary maps (not offered as cells)
BOUNDARY_KIND = "boundaries"
Z_CHOICES = (("max projection", "max"), ("one slice", "slice"), ("native 3D", "keep"))
NO_LABELS = "(none: segment when embedding)"
AUTO_CHANNEL = "auto (by name)"
#: the largest in-memory 3D layer whose planes are compared to tell channels from z-slices
GUESS_MAX_BYTES = 512 * 2**20


def _layer_array(layer: napari.layers.Layer):
    """Level 0 of a multiscale layer, else its data."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


#: command-line wording in errors shared with the CLI -> the dock's controls (first match wins,
#: in this order); the CLI keeps its own text, only what the GUI shows is translated
GUI_WORDS: tuple[tuple[str, object], ...] = (
    (r"maeprobe --debug shows the worker's traceback",
     "the terminal napari runs in shows the worker's traceback"),
    (r"so the same command resumes", "so Run with the same Output store resumes"),
    (r"\(maeprobe segment\)", "('Segment cells' under 'Data and segmentation')"),
    (r"\(see: maeprobe models\)|\(maeprobe models\)", "(the Model list)"),
    (r"write to a new store with another --out, or pass --overwrite to replace it",
     "type another Output store, or tick 'replace a store that holds another job'"),
    (r"(?:choose |with )?(?:a new |another )?--out path ending in \.zarr",
     "type an Output store ending in .zarr"),
    (r"pass weights made for (\S+) with --weights",
     "choose weights made for \\1 in the Weights file field"),
    (r"\(--weights\)", "(in the Weights file field)"),
    (r"(?:or )?pass --weights PATH", "choose a file in the Weights file field"),
    (r"(?:pass |with )?--weights PATH", "the Weights file field"),
    (r"(?:pass |with )?--weights", "the Weights file field"),
    (r"use a smaller --batch-size, or --device cpu",
     "close other programs that use the memory, or pick Device 'cpu'"),
    (r"use --masking none, random or boundary", "pick none, random or boundary under Masking"),
    (r"add --masking random or --masking boundary", "pick Masking 'random' or 'boundary'"),
    (r"--device (\w+)", "Device '\\1'"),
    (r"--masking (\w+)", "Masking '\\1'"),
    (r"--mask-ratio ([\d.]+)", "Mask ratio \\1"),
    (r"--tau ([\d.]+)", "Tau \\1"),
    (r"--levels with", "the Levels boxes: tick"),
    (r"drop --segmentation none", "segment the cells"),
    (r"--channels NAME,\.\.\.|--channels", "the ticks under 'Data and segmentation'"),
    (r"--channel-names", "the Channel name column"),
    (r"--batch-size", "batch size (Device 'cpu' has more memory)"),
    (r"--([a-z][a-z-]*)", lambda m: f"the {m.group(1).replace('-', ' ')} setting"),
)


def gui_message(text: str) -> str:
    """``text`` (an error shared with the CLI) with its command-line flags named as the
    dock's controls: "--weights PATH" becomes "the Weights file field", and so on."""
    import re

    for pattern, words in GUI_WORDS:
        text = re.sub(pattern, words, text)
    return text


def _notify_error(exc: BaseException) -> None:
    traceback = getattr(exc, "worker_traceback", None)
    if traceback:  # a crash in the model's worker: its traceback goes to the terminal
        log.error("the inference worker's traceback:\n%s", traceback)
    show_error(gui_message(error_message(exc)))


class _Relay(QObject):
    """Carries progress from a worker thread to the GUI thread (a queued signal)."""

    progress = Signal(int, int, str)


class _CancellableWorker(FunctionWorker):
    """A function worker whose ``quit`` (napari's task-status cancel) cancels the job."""

    on_quit = None

    def quit(self) -> None:
        if self.on_quit is not None:
            self.on_quit()
        super().quit()


@dataclass
class _Row:
    """One channel row of the image table: a layer, or one index along its channel axis."""

    layer_id: object
    index: int | None
    default_name: str
    name: str
    checked: bool
    edited: bool = False

    @property
    def key(self) -> tuple:
        return (self.layer_id, self.index)


def _channel_default(layer: napari.layers.Layer) -> str:
    """A one-channel layer's channel name: the channel its reader named, else the layer's name.

    Readers name channels they know nothing about ``c0``, ``c1``...; such a placeholder is
    never shown as the channel of a one-channel layer: the layer (file) name is.
    """
    import re

    channel = str(layer.metadata.get("channel") or "")
    if not channel or re.fullmatch(r"c\d+", channel):
        return str(layer.name)
    return channel


def _disconnect(viewer, watched: dict, callback, *_) -> None:
    """Stop following the viewer's layers once the widget is gone (the viewer may live on)."""
    emitters = [viewer.layers.events.inserted, viewer.layers.events.removed]
    emitters += [layer.events.name for layer in watched.values()]
    for emitter in emitters:
        try:
            emitter.disconnect(callback)
        except (RuntimeError, ValueError, TypeError):
            pass


#: how the cells and boundary layers of a segmentation are shown
CELLS_STYLE = {"opacity": 0.5}


def _boundary_style() -> dict:
    """The boundary map in yellow on transparent. A cyclic colormap of these two colours, not
    a direct ``{None: transparent, 1: yellow}`` one: napari builds a direct colormap as a numba
    typed dict, compiled afresh in every session (1.5-2 s measured, holding the GIL even in a
    worker thread); the cyclic colormap's kernels are cached on disk by numba."""
    from napari.utils.colormaps import CyclicLabelColormap

    colors = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    return {"colormap": CyclicLabelColormap(colors=colors), "opacity": 0.8}


def warm_labels_display(*samples: tuple[np.ndarray, dict]) -> None:
    """Load napari's label-colour code for these dtypes and colormaps (worker thread).

    The first Labels layer of a dtype / colormap kind loads (or JIT-compiles) napari's numba
    kernels (texture cast, colormap look-up): part of the 1.5-2.5 s measured on the GUI thread
    when the layers of a segmentation were added. A throw-away 8 x 8 layer of each kind, made
    here in the worker, pays that once; the layers then added on the GUI thread only take
    finished arrays (what is left there is napari making the layers' visuals).
    """
    for data, style in samples:
        try:
            tiny = np.ascontiguousarray(data[(slice(0, 8),) * data.ndim])
            layer = napari.layers.Labels(tiny, **style)
            layer.colormap.map(tiny)
            layer.colormap._data_to_texture(tiny)  # what the canvas draws with
        except Exception as exc:  # only a warm-up: the layers still work without it
            log.debug("label display warm-up skipped: %s", exc)


def _segment_for_layers(image, method, nucleus, cell, diameter):
    """Segment (worker thread), with everything the layers need made here, not in the slot:
    labels as uint16/uint32, the uint8 boundary map and napari's compiled colour code."""
    res = segment_image(image, method, nucleus, cell, diameter)
    warm_labels_display((res.labels, CELLS_STYLE), (res.boundaries, _boundary_style()))
    return res


def _busy(bar: QProgressBar, text: str) -> None:
    bar.setRange(0, 0)
    bar.setFormat(text)
    bar.setVisible(True)


# =========================================================================== DataWidget


class DataWidget(QWidget):
    """The "Data and segmentation" dock: the layers that form the image, its channels, z, cells.

    ``current_image()`` builds the :class:`~napari_maeprobe.io.image.MicroscopyImage` the other
    widgets use; ``current_labels()`` returns the chosen cells. Segmentation runs in a worker
    thread and adds ``"<image> cells"`` and ``"<image> boundaries"`` Labels layers aligned with
    the image layers (same scale and translate).
    """

    #: emitted with the cells Labels layer after a segmentation run
    segmented = Signal(object)
    #: emitted with "done", "cancelled" or "error" when a segmentation run ends
    segmentation_finished = Signal(str)
    #: emitted when the z handling or the ticked image changes (the Embed dock checks the model)
    z_changed = Signal()

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._rows: list[_Row] = []
        self._split: dict[object, int | None] = {}  # layer id -> channel axis
        self._watched: dict[object, napari.layers.Layer] = {}
        self._labels_auto = True
        self._worker = None
        self._closed = False  # taken out of its dock (see event)
        self._seg_built: BuiltImage | None = None
        self._seg_pending: tuple | None = None
        self._seg_clicked = 0.0
        self._building = False
        self._build_ui()
        compact_combos(self)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self.destroyed.connect(partial(_disconnect, viewer, self._watched, self._on_layers_changed))
        self.refresh()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        image_box = QGroupBox("Image (ticked layers, in this order)")
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Layer", "Channel name"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(170)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setToolTip(
            "Tick the layers that form one image; double-click a channel name to rename it"
        )
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.currentCellChanged.connect(lambda *_: self._update_axis_combo())
        self.up_button = QPushButton("Up")
        self.down_button = QPushButton("Down")
        self.up_button.clicked.connect(lambda: self.move_row(-1))
        self.down_button.clicked.connect(lambda: self.move_row(1))
        self.axis_combo = QComboBox()
        self.axis_combo.setToolTip(
            "For a multichannel layer: the axis that holds its channels (each becomes a row)"
        )
        self.axis_combo.activated.connect(self._on_axis_chosen)
        moves = QHBoxLayout()
        moves.addWidget(self.up_button)
        moves.addWidget(self.down_button)
        moves.addWidget(QLabel("Channel axis:"))
        moves.addWidget(self.axis_combo, 1)
        self.z_combo = QComboBox()
        for text, mode in Z_CHOICES:
            self.z_combo.addItem(text, mode)
        self.z_combo.currentIndexChanged.connect(self._update_z_controls)
        self.z_spin = QSpinBox()
        self.z_spin.setToolTip("The z-slice used with 'one slice'")
        z_row = QHBoxLayout()
        z_row.addWidget(self.z_combo, 1)
        z_row.addWidget(self.z_spin)
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip(
            "The cells to embed: a Labels layer (made here, or opened from disk)"
        )
        self.labels_combo.activated.connect(self._on_labels_chosen)
        self.info_label = QLabel()
        form = QFormLayout()
        form.addRow("Z-stacks:", z_row)
        form.addRow("Cells:", self.labels_combo)
        box = QVBoxLayout(image_box)
        box.addWidget(self.table)
        box.addLayout(moves)
        box.addLayout(form)
        box.addWidget(self.info_label)

        seg_box = QGroupBox("Segmentation")
        self.method_combo = QComboBox()
        self.method_combo.addItems(["auto", "cellpose", "builtin"])
        self.method_combo.setToolTip(
            "auto: Cellpose when it and its weights are on this machine, else the built-in method"
        )
        self.nucleus_combo = QComboBox()
        self.cell_combo = QComboBox()
        self.cell_combo.setToolTip(
            "Whole-cell stain; auto picks one by name, else the mean of the other channels"
        )
        self.diameter_spin = QDoubleSpinBox()
        self.diameter_spin.setRange(0.0, 1000.0)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setSuffix(" px")
        self.diameter_spin.setSpecialValueText("auto")
        self.diameter_spin.setToolTip("Nucleus diameter in pixels (auto: estimated)")
        self.segment_button = QPushButton("Segment cells")
        self.segment_button.clicked.connect(self.run_segmentation)
        self.segment_progress = QProgressBar()
        self.segment_progress.setVisible(False)
        self.segment_status = QLabel()
        self.segment_status.setWordWrap(True)
        sform = QFormLayout(seg_box)
        sform.addRow("Method:", self.method_combo)
        sform.addRow("Nucleus channel:", self.nucleus_combo)
        sform.addRow("Cell channel:", self.cell_combo)
        sform.addRow("Diameter:", self.diameter_spin)
        sform.addRow(self.segment_button)
        sform.addRow(self.segment_progress)
        sform.addRow(self.segment_status)

        layout = QVBoxLayout(self)
        layout.addWidget(image_box)
        layout.addWidget(seg_box)
        layout.addStretch(1)

    # ------------------------------------------------------------------ layers -> rows
    def _image_layers(self) -> list[napari.layers.Image]:
        """The viewer's image layers, less the explorer's overlays (views, not channels)."""
        return [
            ly
            for ly in self.viewer.layers
            if isinstance(ly, napari.layers.Image) and not is_overlay(ly)
        ]

    def _labels_layers(self) -> list[napari.layers.Labels]:
        """The Labels layers that can be cells: not boundary maps, not the explorer's overlays."""
        return [
            ly
            for ly in self.viewer.layers
            if isinstance(ly, napari.layers.Labels)
            and ly.metadata.get("maeprobe_kind") != BOUNDARY_KIND
            and not is_overlay(ly)
        ]

    def _layer(self, layer_id) -> napari.layers.Layer | None:
        return next((ly for ly in self.viewer.layers if ly.unique_id == layer_id), None)

    def _channel_axis(self, layer: napari.layers.Image) -> int | None:
        """The layer's channel axis: chosen by the user, else guessed once from the layer."""
        if layer.unique_id not in self._split:
            data = _layer_array(layer)
            if "channel" in layer.metadata and not layer.rgb:
                axis = None  # this plugin's reader: one layer per channel
            else:  # in-memory pixels are compared plane by plane (C vs Z); not huge ones
                small = isinstance(data, np.ndarray) and data.nbytes <= GUESS_MAX_BYTES
                axis = guess_channel_axis(data.shape, layer.rgb, data if small else None)
            self._split[layer.unique_id] = axis
        return self._split[layer.unique_id]

    def _spatial_shape(self, row: _Row) -> tuple[int, ...]:
        layer = self._layer(row.layer_id)
        shape = list(_layer_array(layer).shape)
        axis = self._split.get(row.layer_id)
        if axis is not None:
            del shape[axis]
        return tuple(shape)

    def _on_layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)  # inserted / removed: the layer
        if is_overlay(layer):  # the explorer's own overlays change nothing here
            return
        self.refresh()

    def _watch(self, layers: list[napari.layers.Layer]) -> None:
        """Follow layer renames (row labels and default names follow them)."""
        ids = {ly.unique_id for ly in layers}
        for layer_id in list(self._watched):
            if layer_id not in ids:
                del self._watched[layer_id]
        for ly in layers:
            if ly.unique_id not in self._watched:
                ly.events.name.connect(self._on_layers_changed)
                self._watched[ly.unique_id] = ly

    def refresh(self) -> None:
        """Rebuild the rows from the viewer's layers, keeping order, ticks and edited names."""
        layers = self._image_layers()
        self._watch([ly for ly in self.viewer.layers if not is_overlay(ly)])
        wanted: list[_Row] = []
        for ly in layers:
            axis = self._channel_axis(ly)
            if axis is None:
                default = _channel_default(ly)
                wanted.append(_Row(ly.unique_id, None, default, default, False))
            else:
                n = int(_layer_array(ly).shape[axis])
                for i in range(n):
                    default = f"{ly.name} {i}"
                    wanted.append(_Row(ly.unique_id, i, default, default, False))
        old = {r.key: r for r in self._rows}
        new_keys = {r.key for r in wanted}
        rows = [r for r in self._rows if r.key in new_keys]
        fresh = {r.key: r for r in wanted}
        for r in rows:  # follow renamed layers unless the user typed a name
            r.default_name = fresh[r.key].default_name
            if not r.edited:
                r.name = r.default_name
        added = [r for r in wanted if r.key not in old]
        for r in added:
            r.checked = self._tick_by_default(r, rows)
            rows.append(r)
        self._rows = rows
        self._render()

    def _tick_by_default(self, row: _Row, rows: list[_Row]) -> bool:
        """New layers are ticked when nothing is, or when they match the ticked image."""
        ticked = [r for r in rows if r.checked]
        if not ticked:
            return True
        if self._spatial_shape(row) != self._spatial_shape(ticked[0]):
            return False
        a = self._layer(row.layer_id).metadata.get("maeprobe_image")
        b = self._layer(ticked[0].layer_id).metadata.get("maeprobe_image")
        return a is None or b is None or a == b

    def _render(self) -> None:
        current = self.table.currentRow()
        self._building = True
        try:
            self.table.setRowCount(len(self._rows))
            for i, r in enumerate(self._rows):
                layer = self._layer(r.layer_id)
                text = layer.name if r.index is None else f"{layer.name} [{r.index}]"
                item = QTableWidgetItem(text)
                item.setFlags(
                    Qt.ItemFlag.ItemIsUserCheckable
                    | Qt.ItemFlag.ItemIsEnabled
                    | Qt.ItemFlag.ItemIsSelectable
                )
                item.setCheckState(Qt.CheckState.Checked if r.checked else Qt.CheckState.Unchecked)
                item.setToolTip(f"{text}: {tuple(_layer_array(layer).shape)}")
                self.table.setItem(i, 0, item)
                name = QTableWidgetItem(r.name)
                name.setFlags(
                    Qt.ItemFlag.ItemIsEditable
                    | Qt.ItemFlag.ItemIsEnabled
                    | Qt.ItemFlag.ItemIsSelectable
                )
                self.table.setItem(i, 1, name)
            if self._rows:
                self.table.setCurrentCell(min(max(current, 0), len(self._rows) - 1), 0)
        finally:
            self._building = False
        self._update_axis_combo()
        self._update_dependents()

    def _on_item_changed(self, item: QTableWidgetItem) -> None:
        if self._building or item.row() >= len(self._rows):
            return
        row = self._rows[item.row()]
        if item.column() == 0:
            row.checked = item.checkState() == Qt.CheckState.Checked
        else:
            text = item.text().strip()
            row.name = text or row.default_name
            row.edited = bool(text) and text != row.default_name
        self._update_dependents()

    # ------------------------------------------------------------------ editing the rows
    def set_checked(self, layer_names: list[str]) -> None:
        """Tick exactly the rows of these layers (all their channels), untick the others."""
        for r in self._rows:
            r.checked = self._layer(r.layer_id).name in layer_names
        self._render()

    def set_channel_name(self, row: int, name: str) -> None:
        """Rename the channel in ``row`` (as typing in its cell does)."""
        self.table.item(row, 1).setText(name)

    def channel_names(self) -> list[str]:
        """Names of the ticked channels, in order."""
        return [r.name for r in self._rows if r.checked]

    def move_row(self, step: int, row: int | None = None) -> None:
        """Move a row (default: the current one) up (``-1``) or down (``+1``)."""
        row = self.table.currentRow() if row is None else row
        target = row + step
        if not (0 <= row < len(self._rows) and 0 <= target < len(self._rows)):
            return
        self._rows[row], self._rows[target] = self._rows[target], self._rows[row]
        self._render()
        self.table.setCurrentCell(target, 0)

    def set_channel_axis(self, layer_name: str, axis: int | None) -> None:
        """Split a multichannel layer along ``axis`` (``None``: the layer is one channel)."""
        layer = next(ly for ly in self._image_layers() if ly.name == layer_name)
        self._split[layer.unique_id] = axis
        was_checked = any(r.checked for r in self._rows if r.layer_id == layer.unique_id)
        self._rows = [r for r in self._rows if r.layer_id != layer.unique_id]
        self.refresh()
        for r in self._rows:
            if r.layer_id == layer.unique_id:
                r.checked = was_checked
        self._render()

    def _update_axis_combo(self) -> None:
        self.axis_combo.clear()
        row = self.table.currentRow()
        if not 0 <= row < len(self._rows):
            self.axis_combo.setEnabled(False)
            return
        layer = self._layer(self._rows[row].layer_id)
        shape = _layer_array(layer).shape
        self.axis_combo.addItem("none (one channel)", None)
        for i, n in enumerate(shape):
            if i < len(shape) - 2 or (layer.rgb and i == len(shape) - 1):
                self.axis_combo.addItem(f"axis {i} ({n})", i)
        axis = self._split.get(layer.unique_id)
        self.axis_combo.setCurrentIndex(max(0, self.axis_combo.findData(axis)))
        self.axis_combo.setEnabled(self.axis_combo.count() > 1)

    def _on_axis_chosen(self, index: int) -> None:
        row = self.table.currentRow()
        if 0 <= row < len(self._rows):
            layer = self._layer(self._rows[row].layer_id)
            self.set_channel_axis(layer.name, self.axis_combo.itemData(index))

    def _update_dependents(self) -> None:
        """Channel pickers, z controls and the cells choice follow the ticked rows."""
        names = self.channel_names()
        for combo in (self.nucleus_combo, self.cell_combo):
            keep = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([AUTO_CHANNEL, *names])
            combo.setCurrentIndex(max(0, combo.findText(keep)))
            combo.blockSignals(False)
        ticked = [r for r in self._rows if r.checked]
        shape = self._spatial_shape(ticked[0]) if ticked else ()
        is_3d = len(shape) == 3
        self.z_combo.setEnabled(is_3d)
        if is_3d:
            if self.z_spin.maximum() != shape[0] - 1:
                self.z_spin.setRange(0, shape[0] - 1)
                self.z_spin.setValue(shape[0] // 2)
        self._update_z_controls()
        self.info_label.setText(
            f"{len(ticked)} channel(s), {' x '.join(map(str, shape))} pixels"
            if ticked
            else "Tick the image layers that form one image"
        )
        self._update_labels_combo()

    def _update_z_controls(self) -> None:
        self.z_spin.setEnabled(self.z_combo.isEnabled() and self.z_combo.currentData() == "slice")
        self._update_labels_combo()  # 2D or 3D cells follow the z handling
        self.z_changed.emit()

    def is_z_stack(self) -> bool:
        """Whether the ticked image is a z-stack (3 spatial axes before any z handling)."""
        ticked = [r for r in self._rows if r.checked]
        return bool(ticked) and len(self._spatial_shape(ticked[0])) == 3

    def z_mode(self) -> str:
        """The z handling chosen: "max", "slice" or "keep" (native 3D)."""
        return self.z_combo.currentData()

    def z_mode_text(self) -> str:
        """The z handling as the Z-stacks list shows it (e.g. "max projection")."""
        return self.z_combo.currentText()

    def _output_shape(self) -> tuple[int, ...]:
        """The spatial shape of the image that ``current_image`` builds (after z handling)."""
        ticked = [r for r in self._rows if r.checked]
        shape = self._spatial_shape(ticked[0]) if ticked else ()
        if len(shape) == 3 and self.z_combo.currentData() != "keep":
            shape = shape[1:]
        return shape

    def _update_labels_combo(self) -> None:
        chosen = self.labels_combo.currentData()
        layers = self._labels_layers()
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItem(NO_LABELS, None)
        for ly in layers:
            self.labels_combo.addItem(ly.name, ly.unique_id)
        if self._labels_auto:
            chosen = self._auto_labels(layers, self._output_shape())
        self.labels_combo.setCurrentIndex(max(0, self.labels_combo.findData(chosen)))
        self.labels_combo.blockSignals(False)

    def _auto_labels(self, layers, shape: tuple[int, ...]) -> object:
        """The image's own cells layer, else any Labels layer, of the image's shape."""
        if not shape:
            return None
        fits = [ly for ly in layers if tuple(_layer_array(ly).shape) == tuple(shape)]
        name = self._image_name()
        own = [ly for ly in fits if ly.name == f"{name} cells"]
        best = own or fits
        return best[0].unique_id if best else None

    def _on_labels_chosen(self, index: int) -> None:
        self._labels_auto = False

    def set_labels_layer(self, name: str | None) -> None:
        """Use this Labels layer as the cells (``None``: segment when embedding)."""
        self._labels_auto = False
        layer = next((ly for ly in self._labels_layers() if ly.name == name), None)
        data = None if layer is None else layer.unique_id
        self.labels_combo.setCurrentIndex(max(0, self.labels_combo.findData(data)))

    def _image_name(self) -> str | None:
        ticked = [r for r in self._rows if r.checked]
        if not ticked:
            return None
        layer = self._layer(ticked[0].layer_id)
        return str(layer.metadata.get("maeprobe_image") or layer.name)

    # ------------------------------------------------------------------ the image and its cells
    def current_build(self) -> BuiltImage:
        """The image from the ticked rows plus its scale and translate in the viewer."""
        sources = []
        for r in self._rows:
            if not r.checked:
                continue
            layer = self._layer(r.layer_id)
            sources.append(
                ChannelSource(
                    _layer_array(layer),
                    r.name,
                    layer.name,
                    self._split.get(r.layer_id) if r.index is not None else None,
                    r.index or 0,
                    tuple(layer.scale),
                    tuple(layer.translate),
                    dict(layer.metadata),
                )
            )
        mode = self.z_combo.currentData()
        return build_image(sources, mode, self.z_spin.value() if mode == "slice" else None)

    def current_image(self) -> MicroscopyImage:
        """The chosen image as a ``MicroscopyImage`` (lazy data, CYX or CZYX)."""
        return self.current_build().image

    def current_labels(self, built: BuiltImage | None = None) -> np.ndarray | None:
        """A copy of the chosen cells layer's labels, checked against the image; or ``None``."""
        layer_id = self.labels_combo.currentData()
        layer = None if layer_id is None else self._layer(layer_id)
        if layer is None:
            return None
        labels = np.array(_layer_array(layer), copy=True)
        built = built or self.current_build()
        shape = tuple(built.image.spatial_shape)
        if labels.shape != shape:
            raise MaeprobeInputError(
                f"the cells layer '{layer.name}' is {labels.shape} but the image is {shape}",
                "segment this image here, choose a Labels layer of its size, or change the "
                "z-stack handling (native 3D for 3D labels)",
            )
        if labels.dtype.kind not in "iu":
            labels = labels.astype(np.int32)
        return labels

    # ------------------------------------------------------------------ segmentation
    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def run_segmentation(self) -> None:
        """Segment the current image in a worker thread (the Segment button)."""
        if self._worker is not None:
            return
        try:
            built = self.current_build()
        except MaeprobeInputError as exc:
            _notify_error(exc)
            return
        nucleus = self.nucleus_combo.currentText()
        cell = self.cell_combo.currentText()
        fn = partial(
            _segment_for_layers,
            built.image,
            self.method_combo.currentText(),
            None if nucleus in ("", AUTO_CHANNEL) else nucleus,
            None if cell in ("", AUTO_CHANNEL) else cell,
            self.diameter_spin.value() or None,
        )
        job = NamedJob(f"maeprobe: segmenting {built.image.name}", fn)
        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._segmentation_done)  # a bound slot: gone with the widget
        self._worker, self._seg_built = worker, built
        self._seg_clicked = time.perf_counter()
        self.segment_button.setEnabled(False)
        self.segment_status.setText(f"segmenting {built.image.name}...")
        _busy(self.segment_progress, "segmenting...")
        worker.start()

    def event(self, event) -> bool:
        """Taken out of its dock (napari's close button unparents the widget): a segmentation
        still running is dropped (it cannot be interrupted; its layers are never added)."""
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):
                self._closed = True
        return super().event(event)

    def _segmentation_done(self, outcome: Outcome) -> None:
        """The worker's result: show the layers, one per turn of the event loop.

        Everything was computed in the worker (uint16 labels, the boundary map, napari's
        colour code loaded); what is left here is napari making each layer's visuals (0.1-0.2 s
        per Labels layer measured on the 6-channel Cell Painting field, more on a loaded
        machine), so the two layers are added in two turns and the GUI draws in between.
        """
        built = self._seg_built
        if self._closed:  # the dock was closed meanwhile: its result goes nowhere
            self._worker = None
            return
        if outcome.status != "done":
            self._worker = None
            self.segment_button.setEnabled(True)
            self.segment_progress.setVisible(False)
            self.segment_status.setText("segmentation failed")
            _notify_error(outcome.error)
            self.segmentation_finished.emit(outcome.status)
            return
        res = outcome.value
        _busy(self.segment_progress, "adding the layers...")
        cells = self._put_labels(
            f"{built.image.name} cells", res.labels, built, {"maeprobe_kind": "cells"},
            **CELLS_STYLE,
        )  # fmt: skip
        self._seg_pending = (res, built, cells)
        QTimer.singleShot(50, self._segmentation_shown)  # a paint and timer ticks between

    def _segmentation_shown(self) -> None:
        """Second turn after a segmentation: the boundary layer, the cells choice, the news."""
        pending, self._seg_pending = self._seg_pending, None
        if pending is None:
            return
        res, built, cells = pending
        self._put_labels(
            f"{built.image.name} boundaries",
            res.boundaries,
            built,
            {"maeprobe_kind": BOUNDARY_KIND},
            **_boundary_style(),
        )
        self._worker = None
        self.segment_button.setEnabled(True)
        self.segment_progress.setVisible(False)
        self._labels_auto = True  # use the new cells (and follow later changes)
        self._update_labels_combo()
        waited = time.perf_counter() - self._seg_clicked  # from the click: what the user waited
        self.segment_status.setText(f"{res.n_cells} cells ({res.method}) in {waited:.1f} s")
        for note in res.notes:
            show_info(gui_message(note))
        self.segmented.emit(cells)
        self.segmentation_finished.emit("done")

    def _put_labels(
        self, name: str, data: np.ndarray, built: BuiltImage, metadata: dict, **kwargs
    ) -> napari.layers.Labels:
        """Add (or update) a Labels layer aligned with the image layers."""
        layer = next(
            (ly for ly in self.viewer.layers if ly.name == name and not is_overlay(ly)), None
        )
        if isinstance(layer, napari.layers.Labels) and layer.ndim == data.ndim:
            layer.data = data
            layer.scale = built.scale
            layer.translate = built.translate
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        return self.viewer.add_labels(
            data,
            name=name,
            scale=built.scale,
            translate=built.translate,
            metadata=metadata,
            **kwargs,
        )


# =========================================================================== EmbedWidget


def default_store_folder() -> Path:
    """Where stores go when no output is given: a ``maeprobe-stores`` folder in the temp dir."""
    return Path(tempfile.gettempdir()) / "maeprobe-stores"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "image"


def _usable_devices() -> list[str]:
    """``auto`` plus every device ``resolve_device`` accepts on this machine."""
    from napari_maeprobe.embed.engine import resolve_device

    candidates = ["cpu", "cuda", "mps"]
    try:
        import torch

        candidates += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except Exception:  # torch missing or broken: the CPU only
        pass
    out = ["auto"]
    for dev in candidates:
        try:
            resolve_device(dev)
        except MaeprobeInputError:
            continue
        out.append(dev)
    return out


def model_is_3d(spec) -> bool:
    """Whether a registered model takes 3D crops: its config's patch size has three sides
    (``mae3d``: (10, 8, 8)); the 2D models have one side (``default``: 12)."""
    import dataclasses

    for f in dataclasses.fields(spec.config):
        if f.name == "patch_size":
            default = None if f.default is dataclasses.MISSING else f.default
            return isinstance(default, (tuple, list)) and len(default) == 3
    return False


class EmbedWidget(QWidget):
    """The "Embed" dock: run a model over the cells of the current image into a store.

    Settings mirror :class:`~napari_maeprobe.embed.job.EmbedJob`. Run embeds in a worker
    thread (the model itself runs in the engine's worker process); Cancel stops within a
    fraction of a second. ``store_ready`` carries the path of the store (or of an opened
    ``.h5ad``) for the explorer.
    """

    #: the path of a finished or opened embedding store (a ``.zarr`` folder) or ``.h5ad`` file
    store_ready = Signal(object)
    #: "done", "cancelled" or "error" when a run ends (the widget is idle again by then)
    run_finished = Signal(str)

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        data_widget: DataWidget | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._data_widget = data_widget
        self._worker = None
        self._task: EmbedTask | None = None
        self._out: Path | None = None
        self._cancel_clicked: float | None = None
        self.last_result = None
        self.last_outcome: Outcome | None = None
        self._relay = _Relay(self)
        self._relay.progress.connect(self._on_progress)
        self._hooked: DataWidget | None = None
        self._run_clicked: float | None = None
        self._run_kind = ""  # what the "segmenting" stage of the run does, in words
        warm_imports()
        self._build_ui()
        compact_combos(self)
        self.follow_data(data_widget or self._docked_data_widget())

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        from napari_maeprobe.models.registry import list_models, weights_status

        self.model_combo = QComboBox()
        self._specs = {}
        for spec in list_models():
            ok, where = weights_status(spec)
            where = gui_message(where)
            here = "weights on this machine" if ok else "weights not on this machine"
            self.model_combo.addItem(f"{spec.name}  [{spec.licence}; {here}]", spec.name)
            idx = self.model_combo.count() - 1
            self.model_combo.setItemData(
                idx,
                f"{spec.summary}\nchannels: {spec.channels}; input {spec.input_size}; "
                f"{spec.embed_dim}-d\nweights licence: {spec.licence}\nweights: {where}",
                Qt.ItemDataRole.ToolTipRole,
            )
            self._specs[spec.name] = (spec, ok, where)
        self.model_combo.setCurrentIndex(max(0, self.model_combo.findData("default")))
        self.model_combo.currentIndexChanged.connect(self._update_controls)
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)
        self.z_note = QLabel()  # a 3D model with a 2D image, or 'native 3D' with a 2D model
        self.z_note.setWordWrap(True)
        self.z_note.setStyleSheet("color: #e8a33d")
        self.z_note.setVisible(False)
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("the model's own weights")
        weights_browse = QPushButton("Browse...")
        weights_browse.clicked.connect(self._browse_weights)
        weights_row = QHBoxLayout()
        weights_row.addWidget(self.weights_edit, 1)
        weights_row.addWidget(weights_browse)
        self.device_combo = QComboBox()
        for dev in _usable_devices():
            self.device_combo.addItem(dev, dev)
        self._set_auto_device_text()
        self.level_checks = {lvl: QCheckBox(lvl) for lvl in ("global", "channel", "patch")}
        levels_row = QHBoxLayout()
        for box in self.level_checks.values():
            box.setChecked(True)
            levels_row.addWidget(box)
        self.level_checks["channel"].setToolTip("per-channel embeddings (channel-agnostic models)")
        self.masking_combo = QComboBox()
        self.masking_combo.addItems(list(MASKING_CHOICES))
        self.masking_combo.currentIndexChanged.connect(self._update_controls)
        self.ratio_spin = QDoubleSpinBox()
        self.ratio_spin.setRange(0.0, 0.95)
        self.ratio_spin.setSingleStep(0.05)
        self.ratio_spin.setValue(EmbedJob.mask_ratio)
        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setRange(0.01, 10.0)
        self.tau_spin.setSingleStep(0.1)
        self.tau_spin.setValue(EmbedJob.tau)
        self.tau_spin.setToolTip("boundary masking: how strongly boundary patches are preferred")
        self.attention_check = QCheckBox("attention maps")
        self.recon_check = QCheckBox("reconstructions")
        extras_row = QHBoxLayout()
        extras_row.addWidget(self.attention_check)
        extras_row.addWidget(self.recon_check)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText(f"new store in {default_store_folder()}")
        self.out_edit.setToolTip(
            "The embedding store (.zarr folder). An existing store of the same job is resumed"
        )
        out_browse = QPushButton("Browse...")
        out_browse.clicked.connect(self._browse_out)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(out_browse)
        self.overwrite_check = QCheckBox("replace a store that holds another job")
        self.border_check = QCheckBox("leave out cells that touch the image border")
        self.border_check.setChecked(EmbedJob.exclude_border)
        self.border_check.setToolTip(
            "Cells cut by the image edge are not embedded. When kept (the default), each row "
            "says whether its cell touches the border and how much of its crop is padding"
        )
        self.crops_check = QCheckBox("the selected layer is a crop stack (one cell per crop)")
        self.crops_check.toggled.connect(lambda *_: self._update_z_note())
        self.crops_check.setToolTip(
            "Embed the selected 4D/5D image layer as single-cell crops: crop axis first, then "
            "channels ((N, C, Y, X) or (N, C, Z, Y, X)); no segmentation, each crop one cell"
        )

        settings = QGroupBox("Model and settings")
        form = QFormLayout(settings)
        form.addRow("Model:", self.model_combo)
        form.addRow(self.model_info)
        form.addRow(self.z_note)
        form.addRow("Weights file:", weights_row)
        form.addRow("Device:", self.device_combo)
        form.addRow("Levels:", levels_row)
        form.addRow("Masking:", self.masking_combo)
        form.addRow("Mask ratio:", self.ratio_spin)
        form.addRow("Tau:", self.tau_spin)
        form.addRow("Also store:", extras_row)
        form.addRow("Output store:", out_row)
        form.addRow(self.overwrite_check)
        form.addRow(self.border_check)
        form.addRow(self.crops_check)

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.status_label = QLabel("ready")
        self.status_label.setWordWrap(True)
        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_store_button = QPushButton("Open existing store...")
        self.open_store_button.clicked.connect(self._browse_store)
        self.open_h5ad_button = QPushButton("Open .h5ad...")
        self.open_h5ad_button.clicked.connect(self._browse_h5ad)
        opens = QHBoxLayout()
        opens.addWidget(self.open_store_button)
        opens.addWidget(self.open_h5ad_button)

        layout = QVBoxLayout(self)
        layout.addWidget(settings)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.summary_label)
        layout.addLayout(opens)
        layout.addStretch(1)
        self._update_controls()

    def _update_controls(self) -> None:
        spec, ok, where = self._specs[self.model_combo.currentData()]
        here = "on this machine" if ok else f"not on this machine ({where})"
        dims = "3D model (z-stacks, 'native 3D')" if model_is_3d(spec) else "2D model"
        self.model_info.setText(f"{dims}; weights licence: {spec.licence}; {here}")
        self.model_info.setToolTip(spec.summary)
        self._update_z_note()
        masked = self.masking_combo.currentText() != "none"
        self.ratio_spin.setEnabled(masked)
        self.tau_spin.setEnabled(self.masking_combo.currentText() == "boundary")
        self.recon_check.setEnabled(masked and spec.has_decoder)
        if not self.recon_check.isEnabled():
            self.recon_check.setChecked(False)

    def _set_auto_device_text(self) -> None:
        """Show what ``auto`` resolves to on this machine."""
        from napari_maeprobe.embed.engine import resolve_device

        try:
            self.device_combo.setItemText(0, f"auto ({resolve_device('auto')})")
        except Exception:  # torch unusable: leave the plain word
            pass

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Model weights", "", "Weights (*.safetensors *.pt *.pth *.bin);;All files (*)"
        )
        if path:
            self.weights_edit.setText(path)

    def _browse_out(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Embedding store (.zarr folder)", str(default_store_folder()), "Store (*.zarr)"
        )
        if path:
            self.out_edit.setText(path if path.endswith(".zarr") else path + ".zarr")

    def _browse_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open an embedding store (.zarr folder)")
        if path:
            self.open_store(path)

    def _browse_h5ad(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open an AnnData file", "", "AnnData (*.h5ad)")
        if path:
            self.open_h5ad(path)

    # ------------------------------------------------------------------ settings -> job
    def _docked_data_widget(self) -> DataWidget | None:
        try:
            docks = list(self.viewer.window.dock_widgets.values())
        except (AttributeError, RuntimeError):  # no window (yet)
            return None
        return next((w for w in docks if isinstance(w, DataWidget)), None)

    def data_widget(self) -> DataWidget:
        """The DataWidget to take the image from: given, docked in the viewer, or a new one."""
        if self._data_widget is not None:
            return self._data_widget
        widget = self._docked_data_widget()
        if widget is not None:
            self.follow_data(widget)
            return widget
        self._data_widget = DataWidget(self.viewer)
        self.viewer.window.add_dock_widget(self._data_widget, name="Data and segmentation")
        self.follow_data(self._data_widget)
        return self._data_widget

    def follow_data(self, data: DataWidget | None) -> None:
        """Follow this data widget's z handling: the model's dimensions are checked against it
        and a mismatch is flagged under the model (the data dock calls it when opened later)."""
        if data is None or data is self._hooked:
            return
        self._hooked = data
        data.z_changed.connect(self._update_z_note)
        self._update_z_note()

    def z_problem(self, data: DataWidget | None = None) -> MaeprobeInputError | None:
        """Why the model cannot take the image as the z handling makes it, or ``None``.

        A 2D model cannot embed a z-stack kept as 'native 3D' (it would be refused later with a
        misleading label-shape message, or silently projected); a 3D model needs one.
        """
        data = data or self._hooked
        if data is None or self.crops_check.isChecked() or not data.channel_names():
            return None
        name = self.model_combo.currentData()
        three_d = model_is_3d(self._specs[name][0])
        stack, mode = data.is_z_stack(), data.z_mode()
        if stack and mode == "keep" and not three_d:
            return MaeprobeInputError(
                f"the {name} model is 2D, but 'native 3D' keeps the z-stack",
                "pick 'max projection' or 'one slice' under Z-stacks in 'Data and "
                "segmentation', or a 3D model such as mae3d",
            )
        if three_d and not (stack and mode == "keep"):
            if stack:
                return MaeprobeInputError(
                    f"the {name} model is 3D, but the z-stack is made 2D "
                    f"('{data.z_mode_text()}')",
                    "pick 'native 3D' under Z-stacks in 'Data and segmentation', or a 2D "
                    "model such as default",
                )
            return MaeprobeInputError(
                f"the {name} model is 3D, but the image is 2D",
                "tick a z-stack under 'Data and segmentation', or pick a 2D model such as "
                "default",
            )
        return None

    def _update_z_note(self) -> None:
        """Flag, next to the model, a model / z-handling mismatch before Run is clicked."""
        if not hasattr(self, "z_note"):
            return
        try:
            problem = self.z_problem()
        except RuntimeError:  # the data widget it followed was closed
            self._hooked, problem = None, None
        self.z_note.setText("" if problem is None else f"⚠ {gui_message(str(problem))}")
        self.z_note.setVisible(problem is not None)

    def current_job(self, data: DataWidget | None = None) -> EmbedJob:
        """The :class:`EmbedJob` the settings describe (segmentation settings from ``data``)."""
        data = data or self.data_widget()
        levels = tuple(lvl for lvl, box in self.level_checks.items() if box.isChecked())
        weights = self.weights_edit.text().strip() or None
        return EmbedJob(
            model=self.model_combo.currentData(),
            weights=weights,
            levels=levels,
            segmentation=data.method_combo.currentText(),
            diameter=data.diameter_spin.value() or None,
            masking=self.masking_combo.currentText(),
            mask_ratio=self.ratio_spin.value(),
            tau=self.tau_spin.value(),
            attention=self.attention_check.isChecked(),
            reconstruction=self.recon_check.isChecked(),
            device=self.device_combo.currentData(),
            exclude_border=self.border_check.isChecked(),
        )

    def output_path(self, image_name: str, model: str) -> Path:
        """The store to write: the one typed in, else a new folder under the default place."""
        text = self.out_edit.text().strip()
        if text:
            return Path(text).expanduser()
        folder = default_store_folder()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = folder / f"{_safe(image_name)}-{_safe(model)}-{stamp}.zarr"
        n = 1
        while path.exists():
            n += 1
            path = folder / f"{_safe(image_name)}-{_safe(model)}-{stamp}-{n}.zarr"
        return path

    # ------------------------------------------------------------------ run / cancel
    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def selected_crop_stack(self):
        """The selected layer as a :class:`~napari_maeprobe.io.crops.CropStack` (crop axis
        first, then channels; channel names from the layer's ``metadata["channel_names"]``)."""
        from napari_maeprobe.io.crops import crop_stack_from_array

        layer = self.viewer.layers.selection.active
        if (
            not isinstance(layer, napari.layers.Image)
            or is_overlay(layer)
            or layer.data.ndim not in (4, 5)
        ):
            raise MaeprobeInputError(
                "no crop stack is selected: a crop stack is a 4D or 5D image layer "
                f"(selected: {getattr(layer, 'name', 'nothing')})",
                "select the crop-stack layer in the layer list (crop axis first, then "
                "channels), or untick 'the selected layer is a crop stack'",
            )
        data = np.asarray(layer.data)
        names = layer.metadata.get("channel_names") if hasattr(layer, "metadata") else None
        if names is not None and len(names) != data.shape[1]:
            names = None
        return crop_stack_from_array(data, names, name=layer.name)

    def run(self) -> None:
        """Start embedding the current image, or the selected crop stack (the Run button)."""
        if self._worker is not None:
            return
        clicked = time.perf_counter()
        data = self.data_widget()
        facts: dict = {}
        try:
            if self.crops_check.isChecked():
                image, labels = self.selected_crop_stack(), None
            else:
                problem = self.z_problem(data)
                if problem is not None:
                    raise problem
                built = data.current_build()
                image, labels = built.image, data.current_labels(built)
                facts = built.z_facts()
            job = self.current_job(data)
            if facts.get("projection") in ("max", "slice"):  # the plane embedded, as the job
                job.projection = facts["projection"]  # says it (facts add the slice index)
            job.check()
            out = self.output_path(image.name, job.model)
        except MaeprobeInputError as exc:
            _notify_error(exc)
            return
        task = EmbedTask(on_progress=self._relay.progress.emit)
        fn = partial(
            task.run, image, out, job, labels, self.overwrite_check.isChecked(), facts or None
        )
        named = NamedJob(f"maeprobe: embedding {image.name}", fn, job=task.job)
        worker = create_worker(
            named, _start_thread=False, _ignore_errors=True, _worker_class=_CancellableWorker
        )
        worker.on_quit = task.cancel  # napari's task manager (e.g. closing napari) cancels too
        worker.returned.connect(self._run_done)  # a bound slot: gone with the widget
        self.destroyed.connect(task.cancel)  # a closed viewer stops the run and its worker
        self._worker, self._task, self._out = worker, task, out
        self._cancel_clicked = None
        self._run_clicked = clicked
        self.last_result = None
        self._set_running(True)
        if self.crops_check.isChecked():
            n, self._run_kind = f"{image.n_crops} crops, one cell each", "reading the crops"
        elif labels is not None:
            n, self._run_kind = "given cells", "preparing the given cells"
        else:
            n = f"cells segmented ({job.segmentation})"
            self._run_kind = f"segmenting the cells ({job.segmentation})"
        self.status_label.setText(f"embedding {image.name} ({n}) with {job.model}")
        self.summary_label.setText("")
        _busy(self.progress_bar, "starting...")
        worker.start()

    def cancel(self) -> None:
        """Stop the run (the Cancel button): cancels the task's job, which stops the engine (its
        worker process) at once."""
        if self._task is None:
            return
        self._cancel_clicked = time.perf_counter()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("cancelling...")
        self._task.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.open_store_button.setEnabled(not running)
        self.open_h5ad_button.setEnabled(not running)

    def _on_progress(self, done: int, total: int, desc: str) -> None:
        if self._worker is None or (self._task is not None and self._task.cancelled):
            return
        bar = self.progress_bar
        if total <= 0:
            _busy(bar, f"{desc}...")
            return
        if desc == "segmenting":  # one image here: say what is done to it, not "1 / 1 images"
            if done < total:
                _busy(bar, f"{self._run_kind or 'segmenting the cells'}...")
            return
        bar.setRange(0, total)
        bar.setValue(min(done, total))
        bar.setFormat("%v / %m cells" if desc == "embedding" else f"{desc}: %v / %m")

    def _run_done(self, outcome: Outcome) -> None:
        out, task = self._out, self._task
        self._worker, self._task = None, None
        if task is not None:
            try:
                self.destroyed.disconnect(task.cancel)
            except (TypeError, RuntimeError):
                pass
        self.last_outcome = outcome
        self._set_running(False)
        self.progress_bar.setVisible(False)
        if outcome.status == "done":
            res = outcome.value
            self.last_result = res
            rows = ", ".join(f"{lvl} {n:,}" for lvl, n in res.rows.items())
            waited = time.perf_counter() - (self._run_clicked or time.perf_counter())
            self.status_label.setText(f"done in {waited:.1f} s")
            self.summary_label.setText(
                f"{res.store.path}\nrows: {rows}\n{res.units_done} unit(s) embedded, "
                f"{res.units_skipped} resumed from the store; embedding {res.seconds:.1f} s "
                f"of {waited:.1f} s, on {res.facts.get('device', '?')}"
            )
            self.run_finished.emit("done")
            self.store_ready.emit(Path(res.store.path))
            return
        if outcome.status == "cancelled":
            waited = (
                f" ({time.perf_counter() - self._cancel_clicked:.2f} s after the click)"
                if self._cancel_clicked is not None
                else ""
            )
            kept = task.kept_units if task is not None else 0
            if kept:
                if not self.out_edit.text().strip():  # so that Run resumes this store
                    self.out_edit.setText(str(out))
                self.status_label.setText(
                    f"cancelled{waited}; {kept} finished unit(s) stay in {out} (Run with it as "
                    "the Output store resumes)"
                )
            else:
                self.status_label.setText(f"cancelled{waited}; nothing was written")
        else:
            self.status_label.setText("failed (see the notification)")
            _notify_error(outcome.error)
        self.run_finished.emit(outcome.status)

    # ------------------------------------------------------------------ existing results
    def open_store(self, path: str | Path) -> bool:
        """Announce an existing embedding store (``store_ready``) without computing."""
        from napari_maeprobe.embed.store import EmbeddingStore

        try:
            store = EmbeddingStore(path)
            rows = ", ".join(f"{lvl} {store.n_rows(lvl):,}" for lvl in store.levels())
        except MaeprobeInputError as exc:
            _notify_error(exc)
            return False
        self.summary_label.setText(f"{store.path}\nrows: {rows or 'none yet'}")
        self.status_label.setText("opened an existing store")
        self.store_ready.emit(Path(store.path))
        return True

    def open_h5ad(self, path: str | Path) -> bool:
        """Announce an AnnData ``.h5ad`` file (``store_ready``) without computing."""
        path = Path(path)
        try:
            if path.suffix.lower() != ".h5ad" or not path.is_file():
                raise MaeprobeInputError(
                    f"{path} is not an .h5ad file", "pick a file written by `maeprobe export`"
                )
            with open(path, "rb") as f:
                if f.read(8) != b"\x89HDF\r\n\x1a\n":
                    raise MaeprobeInputError(
                        f"{path} is not an HDF5 (AnnData) file",
                        "pick an .h5ad file written by anndata or `maeprobe export`",
                    )
        except MaeprobeInputError as exc:
            _notify_error(exc)
            return False
        self.summary_label.setText(str(path))
        self.status_label.setText("opened an AnnData file")
        self.store_ready.emit(path)
        return True

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        """A closed widget stops its run (and the model's worker process)."""
        self.cancel()
        super().closeEvent(event)

    def event(self, event) -> bool:
        """Taken out of its dock (napari's close button and ``remove_dock_widget`` unparent the
        widget without closing it): the run stops. Hiding, e.g. behind another tab, does not."""
        if event.type() == QEvent.Type.ParentChange and self.parent() is None:
            self.cancel()
        return super().event(event)
