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
    """Open each path as image layers (one per channel); label images as labels layers.

    Several images (a plate tree, a folder of fields) get layer names that start with the
    image name, and only the first image is visible: fields of one plate would otherwise lie
    on top of each other under repeated channel names."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    images = [image for p in paths for image in read_images(p)]
    several = sum(not _is_label_image(im) for im in images) > 1
    layers: list[tuple] = []
    shown = None
    for image in images:
        if _is_label_image(image):
            layers.append(labels_layer(image.data[0], image.name, image.scale))
            continue
        shown = shown or image.name
        for data, meta, kind in image_layers(image):
            if several:  # a plate or a folder of fields: name layers by image, show the first
                if image.n_channels > 1:
                    meta["name"] = f"{image.name} {meta['name']}"
                meta["visible"] = image.name == shown
            layers.append((data, meta, kind))
    return layers


def _is_label_image(image) -> bool:
    name = image.name.lower()
    return (
        image.n_channels == 1
        and image.data.dtype.kind in "iu"
        and any(w in name for w in LABEL_WORDS)
    )
