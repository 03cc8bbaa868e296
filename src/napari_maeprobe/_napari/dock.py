"""npe2 widget factories (Plugins > maeprobe): each dock widget registers with the viewer's hub
so the data widget feeds the embed widget and a finished store reaches the explorer."""

from __future__ import annotations

from .hub import hub_for


def data_widget(napari_viewer):
    """Data and segmentation: pick and name channels, z handling, segment cells."""
    from .widgets import DataWidget

    widget = DataWidget(napari_viewer)
    hub_for(napari_viewer).data_widget = widget
    return widget


def embed_widget(napari_viewer):
    """Embed: model, weights, device, levels, masking; progress and cancel."""
    from .widgets import EmbedWidget

    hub = hub_for(napari_viewer)
    widget = EmbedWidget(napari_viewer, hub.data_widget)
    widget.store_ready.connect(hub.store_ready.emit)
    return widget


def explorer_widget(napari_viewer):
    """Explorer: the linked scatter, diagnostics and export."""
    from .explorer_widget import ExplorerWidget

    widget = ExplorerWidget(napari_viewer)
    hub_for(napari_viewer).explorer = widget
    return widget
