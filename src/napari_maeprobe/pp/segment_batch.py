"""Segment a set of images and write what the command line and the demo show: label images,
boundary maps, a summary table and overlay pictures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.files import atomic_write, write_labels
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.pp.boundaries import boundary_map
from napari_maeprobe.pp.preprocessing import normalize, project_z
from napari_maeprobe.pp.segmentation import Segmentation, segment
from napari_maeprobe.progress import ProgressCallback, report


@dataclass
class SegmentedImage:
    """An image with its segmentation and boundary map."""

    image: MicroscopyImage
    segmentation: Segmentation
    boundary: np.ndarray


@dataclass
class PreparedSet:
    """Everything the foundation computes for a set of images, before any model runs."""

    images: list[SegmentedImage] = field(default_factory=list)
    patches: pd.DataFrame | None = None


def segment_images(
    images: list[MicroscopyImage],
    method: str = "auto",
    nucleus_channel: str | None = None,
    cell_channel: str | None = None,
    diameter: float | None = None,
    weights: str | None = None,
    progress: ProgressCallback | None = None,
) -> list[SegmentedImage]:
    """Segment each image and compute its boundary map."""
    out = []
    report(progress, 0, len(images), "segmenting")
    for i, image in enumerate(images, start=1):
        seg = segment(image, method, nucleus_channel, cell_channel, diameter, weights)
        out.append(SegmentedImage(image, seg, boundary_map(seg.labels)))
        report(progress, i, len(images), "segmenting")
    return out


def write_segmentation_outputs(segmented: list[SegmentedImage], out_dir: Path) -> pd.DataFrame:
    """Write ``<image>_labels.tif`` and ``<image>_boundary.tif`` per image; return a summary."""
    names = [s.image.name for s in segmented]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MaeprobeInputError(
            f"several inputs are named {', '.join(twice)}: their outputs would overwrite "
            "each other",
            "segment them into separate --out folders, or rename the files",
        )
    rows = []
    for s in segmented:
        write_labels(out_dir / f"{s.image.name}_labels.tif", s.segmentation.labels)
        write_labels(out_dir / f"{s.image.name}_boundary.tif", s.boundary.astype(np.uint8))
        rows.append(
            {
                "dataset": s.image.dataset,
                "image": s.image.name,
                "shape": "x".join(map(str, s.image.spatial_shape)),
                "channels": ",".join(s.image.channel_names),
                "method": s.segmentation.method,
                "nucleus_channel": s.segmentation.nucleus_channel,
                "cell_channel": s.segmentation.cell_channel,
                "n_cells": s.segmentation.n_cells,
                "boundary_pixel_fraction": float(s.boundary.mean()),
                "notes": "; ".join(s.segmentation.notes),
            }
        )
    summary = pd.DataFrame(rows)
    atomic_write(out_dir / "segmentation_summary.csv", lambda p: summary.to_csv(p, index=False))
    return summary


def overlay_png(
    path: Path, image: MicroscopyImage, boundary: np.ndarray, nucleus_channel: str
) -> None:
    """An RGB picture of the nucleus channel (grey) with cell boundaries in yellow."""
    import imageio.v3 as iio

    data = project_z(image, "max").to_numpy() if image.is_3d else image.to_numpy()
    idx = (
        image.channel_names.index(nucleus_channel) if nucleus_channel in image.channel_names else 0
    )
    grey = normalize(data[idx : idx + 1])[0]
    b = boundary.max(axis=0) if boundary.ndim == 3 else boundary
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    rgb[b] = (255, 220, 0)
    atomic_write(path, lambda p: iio.imwrite(p, rgb, extension=".png"))


def require_images(images: list[MicroscopyImage]) -> None:
    """Refuse an empty input list with a clear message."""
    if not images:
        raise MaeprobeInputError("no images to process", "pass at least one image file or folder")
