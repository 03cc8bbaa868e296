"""Lets the maeprobe dock widgets of one viewer find each other (each is opened on its own from
Plugins > maeprobe): the data widget feeds the embed widget, and a finished or opened store
goes to the explorer."""

from __future__ import annotations

import weakref

from qtpy.QtCore import QObject, Signal


class Hub(QObject):
    """Per-viewer meeting point of the widgets."""

    store_ready = Signal(object)  # a path to a store (.zarr) or an .h5ad

    def __init__(self) -> None:
        super().__init__()
        self.data_widget = None
        self.explorer = None
        self.last_store = None
        self.store_ready.connect(self._remember)

    def _remember(self, path) -> None:
        self.last_store = path


_HUBS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hub_for(viewer) -> Hub:
    """The hub of ``viewer`` (created on first use; it goes away with the viewer)."""
    if viewer not in _HUBS:
        _HUBS[viewer] = Hub()
    return _HUBS[viewer]


def _dock_of(widget):
    """The QDockWidget holding ``widget`` (None when it is not docked)."""
    from qtpy.QtWidgets import QDockWidget

    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def arrange_docks(widget) -> None:
    """Stack this plugin's docks of a window as tabs of one dock area and raise ``widget``'s.

    Three docks one above the other need ~1,700 px of height (the window then outgrows a
    1080p screen and the canvas becomes a strip); as tabs each gets the full height, so the
    explorer's scatter keeps its size. Docks the user floated are left where they are."""
    from napari_maeprobe._napari.explorer_widget import ExplorerWidget
    from napari_maeprobe._napari.widgets import DataWidget, EmbedWidget

    dock = _dock_of(widget)
    if dock is None or dock.isFloating():
        return
    window = dock.parentWidget()
    if window is None or not hasattr(window, "tabifyDockWidget"):
        return
    ours = []
    for other in window.findChildren(type(dock).__mro__[0]):
        inner = other.widget()
        if other is dock or other.isFloating() or inner is None:
            continue
        found = [w for w in [inner, *inner.findChildren((DataWidget, EmbedWidget, ExplorerWidget))]
                 if isinstance(w, DataWidget | EmbedWidget | ExplorerWidget)]  # fmt: skip
        if found and window.dockWidgetArea(other) == window.dockWidgetArea(dock):
            ours.append(other)
    for other in ours[1:] + [dock] if ours else []:
        window.tabifyDockWidget(ours[0], other)
    from qtpy.QtCore import Qt, QTimer

    def settle() -> None:  # after Qt has settled the new tab bar
        dock.raise_()
        width = min(widget.sizeHint().width(), window.width() // 3)
        if width > dock.width():  # the explorer's scatter and gallery want ~580 px, not ~400
            window.resizeDocks([dock], [width], Qt.Orientation.Horizontal)

    QTimer.singleShot(0, settle)


def compact_combos(widget, chars: int = 8) -> None:
    """Let every combo box of ``widget`` shrink to ``chars`` characters (long model names and
    column names otherwise set the dock's minimum width, and the canvas pays for it); the full
    text stays in the drop-down list and the tooltip."""
    from qtpy.QtWidgets import QComboBox

    for combo in widget.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(chars)
        if not combo.toolTip():  # the whole choice on hover, however narrow the box
            combo.currentTextChanged.connect(combo.setToolTip)
