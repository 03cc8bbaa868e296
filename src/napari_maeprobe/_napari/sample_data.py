"""File > Open Sample entries: the real images bundled in ``sample_data/``."""

from __future__ import annotations

from napari_maeprobe._napari.layers import image_layers, labels_layer
from napari_maeprobe.io.samples import load_sample


def _layers(key: str) -> list[tuple]:
    image, labels = load_sample(key)
    layers = image_layers(image)
    if labels is not None:
        layers.append(labels_layer(labels, f"{image.name} labels", image.scale))
    return layers


def cellpainting() -> list[tuple]:
    """Cell Painting field, 6 channels."""
    return _layers("cellpainting")


def examplehuman() -> list[tuple]:
    """CellProfiler ExampleHuman, 3 channels."""
    return _layers("examplehuman")


def imc() -> list[tuple]:
    """IMC region, 5 markers, with its whole-cell masks."""
    return _layers("imc")


def nuclei3d() -> list[tuple]:
    """3D nuclei stack with 3D labels."""
    return _layers("nuclei3d")


def spots3d() -> list[tuple]:
    """Two-colour 3D stack."""
    return _layers("spots3d")


def imc_with_embeddings() -> list[tuple]:
    """IMC region with precomputed embeddings of the bundled default model: the image, its cells,
    and the explorer opened on the precomputed store (all three levels, UMAP, Leiden,
    diagnostics, attention maps), so the linked views work within seconds."""
    from napari_maeprobe.io.samples import sample_data_dir

    store = sample_data_dir() / "embeddings" / "imc_default.zarr"
    image, labels = load_sample("imc")
    layers = image_layers(image)
    layers.append(labels_layer(labels, f"{image.name} cells", image.scale))
    _open_explorer_later(store)
    return layers


def _open_explorer_later(store) -> None:
    """Once napari has added the layers, dock the explorer on the current viewer with ``store``."""
    import napari
    from qtpy.QtCore import QTimer

    def open_it() -> None:
        viewer = napari.current_viewer()
        if viewer is None:
            return
        from napari_maeprobe._napari.dock import explorer_widget
        from napari_maeprobe._napari.hub import hub_for

        hub = hub_for(viewer)
        if hub.explorer is None:  # one explorer per viewer; it loads the hub's last store
            hub.last_store = store
            viewer.window.add_dock_widget(
                explorer_widget(viewer), name="maeprobe explorer", area="right"
            )
        else:
            hub.store_ready.emit(store)

    QTimer.singleShot(0, open_it)
