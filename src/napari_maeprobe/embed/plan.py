"""Planning a job on the caller's side: channels picked, z handled, cells found, normalisation
statistics, units of work and the signature that decides resume or refusal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from napari_maeprobe.embed.engine import (
    ModelInfo,
)
from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.store import UnitSpec
from napari_maeprobe.errors import MaeprobeInputError, NoCellsFoundError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.pp.preprocessing import (
    apply_normalization,
    channel_stats,
    check_finite,
    foreground_thresholds,
    project_z,
    tile_origins,
)

#: bytes of float32 crops held per unit of work (bounds memory, whatever the image size)
UNIT_BYTES = 64 * 2**20


@dataclass
class PlannedImage:
    """One image of a job: its (channel-picked, projected) data, cells and statistics."""

    image: MicroscopyImage
    labels: np.ndarray | None
    stats: np.ndarray  # (C, 2) normalisation statistics
    thresholds: np.ndarray  # (C + 1,) foreground thresholds (preprocessing.foreground_thresholds)
    cell_ids: np.ndarray
    metadata: dict = field(default_factory=dict)

    def info(self) -> dict:
        img = self.image
        return {
            "name": img.name, "dataset": img.dataset,
            "source": [str(p) for p in img.source], "channels": list(img.channel_names),
            "shape": list(img.data.shape), "scale": list(img.scale) if img.scale else None,
            "n_cells": int(len(self.cell_ids)),
            "normalization_stats": self.stats.tolist(), "otsu_thresholds": self.thresholds.tolist(),
        }  # fmt: skip


def prepare_image(image: MicroscopyImage, job: EmbedJob, model_3d: bool) -> MicroscopyImage:
    """Pick and order channels, and turn z-stacks into what the model takes."""
    from napari_maeprobe.io.channels import select_channels

    if job.channels:
        image = select_channels(image, job.channels)
    if image.is_3d and not model_3d:
        image = project_z(image, job.projection)
    if model_3d and not image.is_3d:
        raise MaeprobeInputError(
            f"{image.name} is 2D but model {job.model!r} takes 3D crops",
            "pass z-stacks, or pick a 2D model (maeprobe models)",
        )
    return image


def plan_image(
    image: MicroscopyImage,
    job: EmbedJob,
    labels: np.ndarray | None,
    crop_size: tuple[int, ...],
    patch_size: tuple[int, ...],
) -> PlannedImage:
    """Statistics, cells and Otsu thresholds of one image (labels already made or given)."""
    data = image.to_numpy()
    check_finite(data, image.name, image.channel_names)
    stats = channel_stats(data, job.normalization)
    norm = apply_normalization(data[None], stats, job.normalization)[0]
    thresholds = foreground_thresholds(norm, patch_size)
    del norm
    if labels is None:
        # tiles: the same rule that cuts them (pp.preprocessing.tile_origins), at the crop size
        n = len(tile_origins(tuple(image.spatial_shape), crop_size))
        cell_ids = np.arange(n, dtype=np.int64)
    else:
        cell_ids = np.unique(labels[labels > 0]).astype(np.int64)
        if cell_ids.size == 0:
            raise NoCellsFoundError(
                f"{image.name}: no cells were found",
                "segment with other settings (--diameter), pass label images, or tile the "
                "image with --segmentation none",
            )
    return PlannedImage(image, labels, stats, thresholds, cell_ids,
                        dict(image.metadata.get("obs", {})))  # fmt: skip


def crop_size_for(job: EmbedJob, info: ModelInfo) -> tuple[int, ...]:
    size = job.crop_size or info.input_size
    if np.isscalar(size):
        size = (int(size),) * len(info.patch_size)
    size = tuple(int(s) for s in size)
    if len(size) != len(info.patch_size) or any(s % p for s, p in zip(size, info.patch_size)):
        raise MaeprobeInputError(
            f"crop size {size} does not fit model {info.name!r} (patches of {info.patch_size})",
            f"use a crop size that is a multiple of the patch size, e.g. {info.input_size}",
        )
    return size


def cells_per_unit(crop_shape: tuple[int, ...]) -> int:
    """Cells per unit of work: at most :data:`UNIT_BYTES` of float32 crops."""
    return int(max(8, min(4096, UNIT_BYTES // max(4 * int(np.prod(crop_shape)), 1))))


def plan_units(
    planned: list[PlannedImage], per_unit: int, rows_per_cell: dict[str, int]
) -> list[UnitSpec]:
    """Split every image's cells into units of ``per_unit`` cells (the last one smaller)."""
    units, first = [], 0
    for i, p in enumerate(planned):
        for j, start in enumerate(range(0, len(p.cell_ids), per_unit)):
            ids = p.cell_ids[start : start + per_unit]
            rows = {lvl: len(ids) * r for lvl, r in rows_per_cell.items()}
            units.append(UnitSpec(f"{i:05d}-{j:05d}", i, ids, rows, first))
            first += len(ids)
    return units


def job_signature(
    job: EmbedJob, planned_inputs: list[dict], info: ModelInfo, segmentation: str, per_unit: int
) -> dict:
    """What identifies a job: inputs (files with sizes and mtimes), model, weights sha256,
    preprocessing and masking, and the package version."""
    from napari_maeprobe import __version__

    params = asdict(job)
    for key in ("device", "precision", "batch_size"):  # how it runs, not what it computes
        params.pop(key)
    params["segmentation"] = segmentation
    params["cells_per_unit"] = per_unit  # the unit layout a resumed job must keep
    return {
        "inputs": planned_inputs,
        "model": info.name,
        "weights_sha256": info.weights_sha256,
        "params": params,
        "package_version": __version__,
    }


def describe_inputs(images: Sequence[MicroscopyImage]) -> list[dict]:
    """Input files with sizes and mtimes (in-memory images: a hash of their pixels)."""
    import hashlib

    out = []
    for img in images:
        files = []
        for p in img.source:
            path = Path(p)
            if path.is_file():
                st = path.stat()
                files.append({"path": str(path.resolve()), "size": st.st_size,
                              "mtime": int(st.st_mtime)})  # fmt: skip
            elif path.is_dir():
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                files.append({"path": str(path.resolve()), "size": size})
        entry = {"name": img.name, "dataset": img.dataset, "files": files}
        if not files:
            entry["sha256"] = hashlib.sha256(np.ascontiguousarray(img.to_numpy())).hexdigest()
        out.append(entry)
    return out


def job_facts(job: EmbedJob, info: ModelInfo, crop_size) -> dict:
    from napari_maeprobe import __version__

    return {
        "model": info.name, "weights": info.weights_name, "weights_sha256": info.weights_sha256,
        "embed_dim": info.embed_dim, "patch_size": list(info.patch_size),
        "channel_agnostic": info.channel_agnostic, "crop_size": list(crop_size),
        "device": info.device, "precision": info.precision, "levels": list(job.levels),
        "channels": job.channels, "normalization": job.normalization,
        "projection": job.projection, "segmentation": job.segmentation,
        "masking": {"kind": job.masking, "ratio": job.mask_ratio, "tau": job.tau,
                    "seed": job.seed},
        "store_dtype": job.dtype, "package_version": __version__,
    }  # fmt: skip
