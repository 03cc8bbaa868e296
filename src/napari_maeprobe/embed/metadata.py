"""The user's metadata joined onto the images, so its columns reach every observation row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.schema import RESERVED


def attach_metadata(images: Sequence[MicroscopyImage], table: str | Path) -> list[MicroscopyImage]:
    """Add the user's per-image metadata (a CSV with an ``image`` column: condition, well, ...)
    to the images; the values become observation columns of every row of that image."""
    path = Path(table)
    if not path.is_file():
        raise MaeprobeInputError(f"metadata file {path} does not exist", "pass an existing CSV")
    meta = pd.read_csv(path, dtype=str)
    if "image" not in meta.columns:
        raise MaeprobeInputError(
            f"{path} has no 'image' column (columns: {', '.join(meta.columns)})",
            "add a column 'image' with the image names (file names without extension)",
        )
    reserved = sorted(set(meta.columns) & (RESERVED - {"image"}))
    if reserved:
        raise MaeprobeInputError(
            f"{path} has columns that the observation table already defines: {reserved}",
            "rename them (e.g. prefix with 'meta_')",
        )
    rows = {str(r["image"]): r.drop("image").dropna().to_dict() for _, r in meta.iterrows()}
    names = {img.name for img in images}
    unknown = sorted(set(rows) - names)
    if unknown and not set(rows) & names:
        raise MaeprobeInputError(
            f"none of the images in {path} match the inputs (e.g. {unknown[0]!r})",
            f"use the image names, e.g. {sorted(names)[0]!r}",
        )
    out = []
    for img in images:
        extra = rows.get(img.name, {})
        out.append(img.with_data(img.data, metadata={**img.metadata, "obs": extra}))
    return out
