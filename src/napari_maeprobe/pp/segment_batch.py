"""Segment a set of images and write what the command line and the demo show: label images,
boundary maps, a summary table and overlay pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.files import atomic_write, write_labels
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.pp.boundaries import boundary_map
from napari_maeprobe.pp.preprocessing import normalize, project_z
from napari_maeprobe.pp.segmentation import (
    SKIPPABLE,
    Segmentation,
    choose_nucleus_channel_for_run,
    nucleus_note,
    segment,
)
from napari_maeprobe.progress import ProgressCallback, report


@dataclass
class SegmentedImage:
    """An image with its segmentation and boundary map."""

    image: MicroscopyImage
    segmentation: Segmentation
    boundary: np.ndarray


def segment_images(
    images: list[MicroscopyImage],
    method: str = "auto",
    nucleus_channel: str | None = None,
    cell_channel: str | None = None,
    diameter: float | None = None,
    weights: str | None = None,
    progress: ProgressCallback | None = None,
    skipped: list[tuple[str, Exception]] | None = None,
) -> list[SegmentedImage]:
    """Segment each image and compute its boundary map.

    Without a ``nucleus_channel`` one is chosen per channel set for the whole run (by name,
    else by content), so all images use the same one. With a ``skipped`` list, an image that
    only it is at fault for (no cells, an empty plane, unreadable pixels) is appended to it as
    ``(image name, the error)`` and the others go on; without one, the first such image raises.
    """
    out = []
    choices = choose_nucleus_channel_for_run(images) if nucleus_channel is None else {}
    report(progress, 0, len(images), "segmenting")
    for i, image in enumerate(images, start=1):
        nuc, how = choices.get(tuple(image.channel_names), (nucleus_channel, None))
        try:
            seg = segment(image, method, nuc, cell_channel, diameter, weights, nucleus_how=how)
        except SKIPPABLE as exc:
            if skipped is None:
                raise
            skipped.append((image.name, exc))
            report(progress, i, len(images), "segmenting")
            continue
        out.append(SegmentedImage(image, seg, boundary_map(seg.labels)))
        report(progress, i, len(images), "segmenting")
    return out


def skip_line(name: str, why: str | Exception) -> str:
    """The one line that says an image was skipped and why (without naming it twice)."""
    why = str(why)
    return f"skipped {name}: {why[len(name) + 2:] if why.startswith(name + ': ') else why}"


def say(line: str) -> None:
    """Print a line on stderr without breaking a progress bar drawn there."""
    import sys

    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr)


def nucleus_choice_lines(segmented: list[SegmentedImage]) -> list[str]:
    """One line per nucleus-channel choice of a run ("nucleus channel 'DNA' (by name): 4
    images"), to be said once rather than once per image."""
    counts: dict[str, int] = {}
    for s in segmented:
        line = nucleus_note(s.segmentation.nucleus_channel, s.segmentation.nucleus_choice)
        counts[line] = counts.get(line, 0) + 1
    return [f"{line}: {n} image{'s' if n > 1 else ''}" for line, n in counts.items()]


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
                "nucleus_choice": s.segmentation.nucleus_choice,
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
