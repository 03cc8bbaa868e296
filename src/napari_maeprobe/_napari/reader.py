"""napari reader: files, OME-Zarr and folders of per-channel images -> one layer per channel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from napari_maeprobe._napari.layers import image_layers, labels_layer
from napari_maeprobe.io.reading import is_supported, read_images

LABEL_WORDS = ("label", "mask")


def get_reader(path: str | list[str]) -> Callable | None:
    """Return a reader when every path is something this plugin opens, else ``None``."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(is_supported(p) for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[tuple]:
    """Open each path as image layers (one per channel); label images as labels layers."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[tuple] = []
    for p in paths:
        for image in read_images(p):
            if _is_label_image(image):
                layers.append(labels_layer(image.data[0], image.name, image.scale))
            else:
                layers.extend(image_layers(image))
    return layers


def _is_label_image(image) -> bool:
    name = image.name.lower()
    return (
        image.n_channels == 1
        and image.data.dtype.kind in "iu"
        and any(w in name for w in LABEL_WORDS)
    )
