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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual mode
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


#: the observation columns every embedding table carries (docs/contract.md)
OBS_COLUMNS = (
    "level", "dataset", "image", "cell_id", "channel", "patch_row", "patch_col", "patch_z",
    "centroid_y", "centroid_x", "centroid_z", "patch_intensity", "foreground", "central",
    "boundary_fraction",
)  # fmt: skip


def _with_embeddings(obs: pd.DataFrame, emb: np.ndarray) -> pd.DataFrame:
    cols = pd.DataFrame(emb.astype(np.float32), columns=[f"e{i}" for i in range(emb.shape[1])])
    return pd.concat([obs.reset_index(drop=True), cols], axis=1)


def embed_segmented(
    segmented: list[SegmentedImage],
    model: str = "default",
    weights: str | None = None,
    crop_size: int = 96,
    progress: ProgressCallback | None = None,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Embed every segmented cell of the 2D images at three levels with one model.

    Single-cell crops of ``crop_size`` go through the inference engine (worker process);
    returns one table per level (``global``, ``channel``, ``patch``: the observation columns
    plus ``e0``, ``e1``, ...) and the model's facts (name, weights file and sha256). z-stacks
    are skipped: the 2D models do not take them.
    """
    from .inference import LEVELS, EngineConfig, InferenceEngine

    tables: dict[str, list[pd.DataFrame]] = {lvl: [] for lvl in LEVELS}
    cfg = EngineConfig(model=model, weights=weights, levels=LEVELS)
    with InferenceEngine(cfg) as engine:
        info = engine.info
        for s in segmented:
            image = s.image
            if image.is_3d:
                continue
            data = normalize(image.to_numpy(), name=image.name, channel_names=image.channel_names)
            crops = cell_crops(data, s.segmentation.labels, crop_size, image.name,
                               image.channel_names)  # fmt: skip
            results = list(engine.embed(crops.crops, progress=progress))
            glob = np.concatenate([r.global_embedding for r in results])
            chan = np.concatenate([r.channel_embeddings for r in results])
            patch = np.concatenate([r.patch_embeddings for r in results])
            n, n_c = chan.shape[:2]
            cells = pd.DataFrame({
                "dataset": image.dataset, "image": image.name, "cell_id": crops.cell_ids,
                "centroid_y": crops.centroids[:, -2], "centroid_x": crops.centroids[:, -1],
            })  # fmt: skip
            tables["global"].append(_with_embeddings(_obs(cells, "global"), glob))
            per_channel = cells.loc[cells.index.repeat(n_c)].reset_index(drop=True)
            per_channel["channel"] = list(image.channel_names) * n
            tables["channel"].append(
                _with_embeddings(_obs(per_channel, "channel"), chan.reshape(n * n_c, -1))
            )
            ptable = patch_table(crops, info.patch_size, per_channel=True, dataset=image.dataset)
            # the patch table runs channel by channel, then crop, then row and column
            emb = patch.transpose(1, 0, 2, 3, 4).reshape(-1, patch.shape[-1])
            tables["patch"].append(_with_embeddings(_obs(ptable, "patch"), emb))
    facts = dict(
        model=info.name, weights=info.weights_name, weights_sha256=info.weights_sha256,
        embed_dim=info.embed_dim, patch_size=list(info.patch_size), precision=info.precision,
        device=info.device, crop_size=crop_size,
    )  # fmt: skip
    return {lvl: pd.concat(t, ignore_index=True) for lvl, t in tables.items() if t}, facts


def _obs(frame: pd.DataFrame, level: str) -> pd.DataFrame:
    """``frame`` with every observation column (missing ones as NA) in contract order."""
    out = pd.DataFrame({"level": [level] * len(frame)})
    for col in OBS_COLUMNS[1:]:
        out[col] = frame[col].to_numpy() if col in frame else pd.NA
    out["channel"] = out["channel"].astype("string")
    for col in ("cell_id", "patch_row", "patch_col", "patch_z"):
        out[col] = out[col].astype("Int64")
    for col in ("centroid_y", "centroid_x", "centroid_z", "patch_intensity", "boundary_fraction"):
        out[col] = out[col].astype("Float64")
    for col in ("foreground", "central"):
        out[col] = out[col].astype("boolean")
    return out
