"""File > Open Sample entries: the real images bundled in ``sample_data/``."""

from __future__ import annotations

from ..samples import load_sample
from .layers import image_layers, labels_layer


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
