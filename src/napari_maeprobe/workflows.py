"""End-to-end steps shared by the command line and the GUI: segment a set of images and write
label images, boundary maps and the patch table. Progress goes through callbacks."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .boundaries import boundary_map
from .errors import MaeprobeInputError
from .image import MicroscopyImage
from .preprocessing import cell_crops, normalize, patch_table, project_z
from .progress import ProgressCallback, report
from .segmentation import Segmentation, segment


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


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Save a label image as a compressed TIFF (atomically)."""
    import tifffile

    dtype = np.uint16 if labels.max() < 2**16 else np.uint32
    _atomic_write(path, lambda p: tifffile.imwrite(p, labels.astype(dtype), compression="zlib"))


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


def prepare_patches(
    segmented: list[SegmentedImage],
    crop_size: int = 96,
    patch_size: int = 16,
    crop_size_3d: tuple[int, int, int] = (40, 64, 64),
    patch_size_3d: tuple[int, int, int] = (10, 8, 8),
    per_channel: bool = True,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Single-cell crops of every image and their patch table (one row per cell/channel/patch).

    2D images use square ``crop_size`` crops and ``patch_size`` patches; z-stacks kept in 3D use
    ``crop_size_3d`` and 3D patches of ``patch_size_3d`` (Z, Y, X) voxels.
    """
    frames = []
    report(progress, 0, len(segmented), "crops and patch tables")
    for i, s in enumerate(segmented, start=1):
        image = s.image
        data = normalize(image.to_numpy(), name=image.name, channel_names=image.channel_names)
        crop, patch = (crop_size_3d, patch_size_3d) if image.is_3d else (crop_size, patch_size)
        crops = cell_crops(data, s.segmentation.labels, crop, image.name, image.channel_names)
        frames.append(patch_table(crops, patch, per_channel=per_channel, dataset=image.dataset))
        report(progress, i, len(segmented), "crops and patch tables")
    return pd.concat(frames, ignore_index=True)


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
    _atomic_write(out_dir / "segmentation_summary.csv", lambda p: summary.to_csv(p, index=False))
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
    _atomic_write(path, lambda p: iio.imwrite(p, rgb, extension=".png"))


def write_json(path: Path, payload: dict) -> None:
    """Atomically write a JSON file."""
    _atomic_write(path, lambda p: p.write_text(json.dumps(payload, indent=2, default=str)))


def require_images(images: list[MicroscopyImage]) -> None:
    """Refuse an empty input list with a clear message."""
    if not images:
        raise MaeprobeInputError("no images to process", "pass at least one image file or folder")
