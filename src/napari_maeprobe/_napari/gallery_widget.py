"""The gallery panel of the explorer: per cell of a selection, what the model saw (input
composite, attention over it, masked input, masked reconstruction), side by side.

Thin over :mod:`napari_maeprobe.pl.gallery`, which computes the tiles off the GUI thread; this
widget only shows finished RGB arrays and turns clicks into "centre the viewer on this cell".
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_maeprobe.pl.gallery import PANELS, CellTile

PANEL_TITLES = {
    "input": "input",
    "attention": "attention",
    "masked": "masked input",
    "reconstruction": "reconstruction",
}


def _pixmap(rgb: np.ndarray) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = rgb.shape[:2]
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(image.copy())  # copy: the QImage must not outlive the array


class _TileLabel(QLabel):
    """One panel of one cell; a click asks to centre the viewer on the cell."""

    clicked = Signal(int)

    def __init__(self, index: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.index = index
        self.setCursor(Qt.CursorShape.PointingHandCursor)

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802 (Qt API)
        if event.button() == Qt.MouseButton.LeftButton:
            self.clicked.emit(self.index)
        super().mouseReleaseEvent(event)


class GalleryWidget(QWidget):
    """A page of cell tiles with paging and resampling controls.

    Signals: ``page_requested(offset, seed)`` when the user pages or resamples (seed -1: most
    typical first), ``cell_clicked(index)`` with the tile's index on the page."""

    page_requested = Signal(int, int)
    cell_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.tiles: list[CellTile] = []
        self.offset = 0
        self.total = 0
        self.seed = -1  # -1: most typical first; otherwise a random order
        self.header = QLabel("Select points (a cluster, a lasso or a click) to see their cells.")
        self.header.setWordWrap(True)
        self.per_page = QSpinBox()
        self.per_page.setRange(1, 48)
        self.per_page.setValue(6)
        self.per_page.setToolTip("cells per page")
        self.prev_button = QPushButton("◀")
        self.prev_button.setToolTip("previous page")
        self.next_button = QPushButton("▶")
        self.next_button.setToolTip("next page")
        self.resample_button = QPushButton("Resample")
        self.resample_button.setToolTip("a random draw of cells from the selection")
        self.typical_button = QPushButton("Typical")
        self.typical_button.setToolTip(
            "cells nearest the selection's mean embedding first (the default order)"
        )
        self.notes = QLabel("")
        self.notes.setWordWrap(True)
        self.notes.setStyleSheet("color: #bbbbbb;")
        self._grid_host = QWidget()
        self._grid = QGridLayout(self._grid_host)
        self._grid.setSpacing(3)
        self._grid.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        scroll = QScrollArea()
        scroll.setWidget(self._grid_host)
        scroll.setWidgetResizable(True)
        scroll.setMinimumHeight(140)

        controls = QHBoxLayout()
        for w in (self.prev_button, self.next_button, self.resample_button, self.typical_button):
            controls.addWidget(w)
        controls.addWidget(QLabel("cells"))
        controls.addWidget(self.per_page)
        controls.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.header)
        layout.addLayout(controls)
        layout.addWidget(self.notes)
        layout.addWidget(scroll, 1)

        self.prev_button.clicked.connect(lambda: self._page(-1))
        self.next_button.clicked.connect(lambda: self._page(+1))
        self.resample_button.clicked.connect(self._resample)
        self.typical_button.clicked.connect(self._typical)
        self.per_page.valueChanged.connect(lambda _: self._request(self.offset))
        self._update_buttons()

    # ------------------------------------------------------------------ requests
    def _request(self, offset: int) -> None:
        self.offset = max(0, offset)
        self.page_requested.emit(self.offset, self.seed)

    def _page(self, step: int) -> None:
        n = self.per_page.value()
        offset = self.offset + step * n
        if 0 <= offset < max(self.total, 1):
            self._request(offset)

    def _resample(self) -> None:
        self.seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        self._request(0)

    def _typical(self) -> None:
        self.seed = -1
        self._request(0)

    def _update_buttons(self) -> None:
        n = self.per_page.value()
        self.prev_button.setEnabled(self.offset > 0)
        self.next_button.setEnabled(self.offset + n < self.total)
        for b in (self.resample_button, self.typical_button):
            b.setEnabled(self.total > 0)

    # ------------------------------------------------------------------ showing tiles
    def clear(self, text: str | None = None) -> None:
        """Empty the gallery (the selection was cleared or the data changed)."""
        self.tiles = []
        self.total = 0
        self.offset = 0
        self._clear_grid()
        self.header.setText(
            text or "Select points (a cluster, a lasso or a click) to see their cells."
        )
        self.notes.setText("")
        self.notes.setVisible(False)
        self._update_buttons()

    def set_busy(self, text: str) -> None:
        self.header.setText(text)

    def _clear_grid(self) -> None:
        while self._grid.count():
            item = self._grid.takeAt(0)
            widget = item.widget()
            if widget is not None:  # gone from the screen now, not at the next idle moment
                widget.hide()
                widget.setParent(None)
                widget.deleteLater()

    def show_tiles(self, tiles: list[CellTile], offset: int, total: int, order: str) -> None:
        """Show one page: a header row of panel titles, then one row per cell."""
        self.tiles, self.offset, self.total = list(tiles), offset, total
        self._clear_grid()
        panels = [p for p in PANELS if any(p in t.panels for t in tiles)]
        for j, p in enumerate(panels):
            title = QLabel(f"<b>{PANEL_TITLES.get(p, p)}</b>")
            title.setAlignment(Qt.AlignmentFlag.AlignCenter)
            self._grid.addWidget(title, 0, j + 1)
        several = len({t.image for t in tiles}) > 1
        for i, tile in enumerate(tiles):
            short = tile.image if len(tile.image) <= 12 else "…" + tile.image[-11:]
            caption = QPushButton(f"cell {tile.cell_id}" + (f"\n{short}" if several else ""))
            caption.setFlat(True)
            caption.setToolTip(f"{tile.image}, cell {tile.cell_id}: centre the viewer on it")
            caption.setMaximumWidth(100)
            caption.clicked.connect(lambda _=False, k=i: self.cell_clicked.emit(k))
            self._grid.addWidget(caption, i + 1, 0)
            for j, p in enumerate(panels):
                label = _TileLabel(i)
                if p in tile.panels:
                    label.setPixmap(_pixmap(tile.panels[p]))
                    label.setToolTip(f"{PANEL_TITLES.get(p, p)}: click to centre the viewer")
                else:
                    label.setText("–")
                    label.setToolTip(tile.notes.get(p, "not available"))
                    label.setAlignment(Qt.AlignmentFlag.AlignCenter)
                label.clicked.connect(self.cell_clicked.emit)
                self._grid.addWidget(label, i + 1, j + 1)
        last = min(offset + len(tiles), total)
        where = f" of {tiles[0].image}" if tiles and not several else ""
        plane = f"; {tiles[0].plane}" if tiles and tiles[0].plane else ""
        self.header.setText(
            f"{total:,} cells in the selection ({order}); showing {offset + 1:,}–{last:,}"
            f"{where}{plane}"
            if tiles
            else f"{total:,} cells in the selection; none on this page"
        )
        notes = {}
        for t in tiles:
            notes.update(t.notes)
        self.notes.setText("<br>".join(f"<i>{k}</i>: {v}" for k, v in sorted(notes.items())))
        self.notes.setVisible(bool(notes))
        self._update_buttons()
