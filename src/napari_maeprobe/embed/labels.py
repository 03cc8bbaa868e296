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
    folder = Path(folder)
    out, missing = [], []
    for img in images:
        names = [f"{img.name}_labels.tif", f"{img.name}_labels.tiff", f"{img.name}.tif",
                 f"{img.name}.tiff"]  # fmt: skip
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            missing.append(names[0])
            continue
        out.append(read_label_file(path))
    if missing:
        raise MaeprobeInputError(
            f"{folder} lacks label images for {len(missing)} input(s), e.g. {missing[0]}",
            "run `maeprobe segment IMAGE... --out FOLDER` first, or drop --labels",
        )
    return out


def read_label_file(path: str | Path) -> np.ndarray:
    """One label image from a TIFF, checked: a file that is not a readable image, or that holds
    negative labels (instance labels are 0 for background and 1, 2, ... for cells; a negative
    one would silently drop its cell), is refused naming the file."""
    import tifffile

    path = Path(path)
    try:
        labels = np.asarray(tifffile.imread(path))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for a bad file
        raise MaeprobeInputError(
            f"label file {path} is not a readable image ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})",
            "replace it with the label TIFF (maeprobe segment IMAGE... --out FOLDER writes one), "
            "or move it out of the --labels folder",
        ) from None
    check_labels(labels, str(path))
    return labels


def check_labels(labels: np.ndarray, where: str) -> None:
    """Refuse label images that are not instance labels: not integers, or negative values."""
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise MaeprobeInputError(
                f"{where} holds non-integer values, so it is not a label image",
                "pass an instance label image (0 background, 1, 2, ... one value per cell)",
            )
    elif labels.dtype.kind not in "iub":
        raise MaeprobeInputError(f"{where} holds {labels.dtype} values, not labels",
                                 "pass an integer instance label image")  # fmt: skip
    if labels.size and labels.dtype.kind in "if" and labels.min() < 0:
        n = int(np.count_nonzero(labels < 0))
        raise MaeprobeInputError(
            f"{where} holds negative labels ({n} pixels, smallest {labels.min():g}); cells "
            "are 1, 2, ... and background 0",
            "relabel it (e.g. skimage.measure.label(labels != 0)) or write it as unsigned "
            "integers",
        )


def labels_for(
    store: EmbeddingStore,
    index: int,
    image: MicroscopyImage,
    job: EmbedJob,
    given: np.ndarray | None,
    nucleus: tuple[int, str] | None = None,
) -> tuple[np.ndarray | None, str]:
    """The image's label image: stored (resume), given, segmented now, or None (tiles).

    ``nucleus``: the run's nucleus channel (index, how it was chosen), chosen once for every
    image with these channels (``pp.segmentation.choose_nucleus_channel_for_run``)."""
    from napari_maeprobe.pp.segmentation import segment

    if given is not None:
        labels = np.asarray(given)
        check_labels(labels, f"the label image of {image.name}")
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
    index_how = nucleus or (None, None)
    seg = segment(image, job.segmentation, nucleus_channel=index_how[0], diameter=job.diameter,
                  nucleus_how=index_how[1])  # fmt: skip
    store.write_labels(index, seg.labels, seg.method)
    return seg.labels, seg.method
