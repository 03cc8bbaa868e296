"""The dock widgets napari opens from Plugins > MAE probe (npe2 ``widgets`` contributions).

napari passes the viewer to a widget class whose ``__init__`` takes ``napari_viewer``; these thin
subclasses also register each widget with the viewer's hub, so the data widget feeds the embed
widget and a finished or opened store reaches the explorer.
"""

from __future__ import annotations

import napari
from qtpy.QtCore import QEvent, QTimer

from napari_maeprobe._napari.explorer_widget import ExplorerWidget
from napari_maeprobe._napari.hub import arrange_docks, hub_for
from napari_maeprobe._napari.widgets import DataWidget, EmbedWidget


class _Tabbed:
    """Once docked, share the dock area with the other maeprobe docks as tabs (see
    :func:`~napari_maeprobe._napari.hub.arrange_docks`): stacked, they outgrow a 1080p screen."""

    def event(self, ev) -> bool:  # noqa: D401 (Qt API)
        if ev.type() == QEvent.Type.ParentChange and self.parent() is not None:
            if not getattr(self, "_arranged", False):
                self._arranged = True
                QTimer.singleShot(0, lambda: arrange_docks(self))
        return super().event(ev)


class DataDock(_Tabbed, DataWidget):
    """Data and segmentation: pick and name channels, z handling, segment cells."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer)
        hub_for(napari_viewer).data_widget = self
        try:  # an Embed dock opened first flags model / z-stack mismatches from now on
            docked = list(napari_viewer.window.dock_widgets.values())
        except (AttributeError, RuntimeError):
            docked = []
        for widget in docked:
            if isinstance(widget, EmbedWidget) and widget._data_widget is None:
                widget.follow_data(self)


class EmbedDock(_Tabbed, EmbedWidget):
    """Embed: model, weights, device, levels, masking; progress and cancel."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        hub = hub_for(napari_viewer)
        super().__init__(napari_viewer, hub.data_widget)
        self.store_ready.connect(hub.store_ready.emit)


class ExplorerDock(ExplorerWidget):
    """Explorer: the linked scatter, diagnostics and export."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer)
        hub_for(napari_viewer).explorer = self


def explorer_widget(napari_viewer: napari.viewer.Viewer) -> ExplorerDock:
    """An explorer docked by code (e.g. the sample with precomputed embeddings)."""
    return ExplorerDock(napari_viewer)
