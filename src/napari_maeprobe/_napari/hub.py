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
