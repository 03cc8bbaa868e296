"""Where each image's cells come from: label images in a folder, given arrays, the store (resume)
or segmentation now."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.store import EmbeddingStore
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage


def find_labels(images: Sequence[MicroscopyImage], folder: str | Path) -> list[np.ndarray]:
    """The label image of each image from a folder: ``<image>_labels.tif`` as written by
    ``maeprobe segment``, or a TIFF with the image's own name (e.g. a folder of DeepCell or
    CellProfiler masks beside a folder of images)."""
    import tifffile

    folder = Path(folder)
    out, missing = [], []
    for img in images:
        names = [f"{img.name}_labels.tif", f"{img.name}_labels.tiff", f"{img.name}.tif",
                 f"{img.name}.tiff"]  # fmt: skip
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            missing.append(names[0])
            continue
        out.append(tifffile.imread(path))
    if missing:
        raise MaeprobeInputError(
            f"{folder} lacks label images for {len(missing)} input(s), e.g. {missing[0]}",
            "run `maeprobe segment IMAGE... --out FOLDER` first, or drop --labels",
        )
    return out


def labels_for(
    store: EmbeddingStore,
    index: int,
    image: MicroscopyImage,
    job: EmbedJob,
    given: np.ndarray | None,
) -> tuple[np.ndarray | None, str]:
    """The image's label image: stored (resume), given, segmented now, or None (tiles)."""
    from napari_maeprobe.pp.segmentation import segment

    if given is not None:
        labels = np.asarray(given)
        if labels.shape != tuple(image.spatial_shape):
            raise MaeprobeInputError(
                f"{image.name}: labels of shape {labels.shape} do not match the image "
                f"{tuple(image.spatial_shape)}",
                "pass the label image made from this image (maeprobe segment)",
            )
        if not store.has_labels(index):
            store.write_labels(index, labels, "given")
        return labels, "given"
    if job.segmentation == "none":
        return None, "tiles"
    if store.has_labels(index):
        return store.labels(index), store.labels_method(index)
    seg = segment(image, job.segmentation, diameter=job.diameter)
    store.write_labels(index, seg.labels, seg.method)
    return seg.labels, seg.method
