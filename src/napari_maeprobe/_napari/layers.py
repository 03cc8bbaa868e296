"""Turn library objects into napari layer data tuples (no Qt needed)."""

from __future__ import annotations

import numpy as np

from napari_maeprobe.io.image import MicroscopyImage

COLORMAPS = (
    "blue",
    "green",
    "red",
    "magenta",
    "cyan",
    "yellow",
    "gray",
    "bop orange",
    "bop purple",
)

#: ``layer.metadata[OVERLAY_KEY]`` is True on the layers the explorer draws (selected patches,
#: outlines, attention): they are views of the embedding, never input channels or cells.
OVERLAY_KEY = "maeprobe_overlay"


def is_overlay(layer) -> bool:
    """Whether a napari layer is one of this plugin's own overlays (not user data)."""
    return bool(getattr(layer, "metadata", {}).get(OVERLAY_KEY, False))


def _contrast_limits(plane) -> tuple[float, float]:
    """Robust display range from a subsample of the channel (avoids napari reading it all)."""
    step = tuple(max(1, s // 512) for s in plane.shape)
    sample = np.asarray(plane[tuple(slice(None, None, st) for st in step)], dtype=np.float64)
    lo, hi = np.percentile(sample, [0.5, 99.9]) if sample.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def image_layers(image: MicroscopyImage) -> list[tuple]:
    """One image layer per channel, named by channel, blended additively."""
    layers = []
    single = image.n_channels == 1
    for c, name in enumerate(image.channel_names):
        data = image.data[c]
        meta = {
            "name": name if single is False else f"{image.name}",
            "colormap": "gray" if single else COLORMAPS[c % len(COLORMAPS)],
            "blending": "translucent_no_depth" if single else "additive",
            "contrast_limits": _contrast_limits(data),
            "metadata": {
                "maeprobe_image": image.name,
                "channel": name,
                "channel_index": c,
                "dataset": image.dataset,
                "source": [str(p) for p in image.source],
                "source_axes": image.source_axes,
            },
        }
        if image.scale:
            meta["scale"] = image.scale
        layers.append((data, meta, "image"))
    return layers


def labels_layer(labels: np.ndarray, name: str, scale=None) -> tuple:
    """A labels layer tuple for instance masks."""
    meta = {"name": name, "opacity": 0.4}
    if scale:
        meta["scale"] = scale
    return (labels, meta, "labels")
