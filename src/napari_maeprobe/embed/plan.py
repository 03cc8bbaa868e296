"""Planning a job on the caller's side: channels picked, z handled, cells found, normalisation
statistics, units of work and the signature that decides resume or refusal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_maeprobe.embed.engine import (
    ModelInfo,
)
from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.store import UnitSpec
from napari_maeprobe.errors import MaeprobeInputError, NoCellsFoundError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.pp.measure import measure_cells, measure_crops, tile_labels
from napari_maeprobe.pp.normalization_groups import describe_normalization
from napari_maeprobe.pp.preprocessing import (
    apply_normalization,
    channel_stats,
    check_finite,
    foreground_thresholds,
    normalization_stats,
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
    cell_obs: pd.DataFrame | None = None  # per-cell columns, indexed by cell id
    crop_fit: str | None = None  # crop stacks: pad | resize (io.crops.fit_crops)
    notes: list[str] = field(default_factory=list)  # per channel: how its statistics were chosen
    #: per-cell measurements on raw intensities (pp.measure: baseline features, touches_border),
    #: indexed by cell id; None where nothing was measured
    measures: pd.DataFrame | None = None
    excluded_border: int = 0  # cells left out because they touch the image border

    def info(self) -> dict:
        img = self.image
        return {
            "name": img.name, "dataset": img.dataset,
            "source": [str(p) for p in img.source], "channels": list(img.channel_names),
            "shape": list(img.data.shape), "scale": list(img.scale) if img.scale else None,
            "n_cells": int(len(self.cell_ids)),
            "normalization_stats": self.stats.tolist(), "normalization_note": list(self.notes),
            "otsu_thresholds": self.thresholds.tolist(),
            "feature_names": self.feature_names(), "excluded_border": int(self.excluded_border),
            **({"kind": "crops", "crop_fit": self.crop_fit} if self.crop_fit else {}),
        }  # fmt: skip

    def feature_names(self) -> list[str]:
        """The baseline feature columns stored per cell (``features``), in order."""
        if self.measures is None:
            return []
        return [c for c in self.measures.columns if c != "touches_border"]


def prepare_image(
    image: MicroscopyImage, job: EmbedJob, model_3d: bool, info: ModelInfo | None = None
) -> MicroscopyImage:
    """Pick and order channels, and turn z-stacks into what the model takes.

    With ``info``, a model with a fixed channel count refuses an image with another count
    here, before any segmentation (:func:`check_channel_count`)."""
    from napari_maeprobe.io.channels import select_channels
    from napari_maeprobe.io.crops import CropStack

    if isinstance(image, CropStack):  # crops: channels picked, 3D crops projected one by one
        if job.channels:
            image = image.select_channels(list(job.channels))
        if info is not None:
            check_channel_count(image, info)
        if model_3d and not image.is_3d:
            raise MaeprobeInputError(
                f"{image.name} holds 2D crops but model {job.model!r} takes 3D crops",
                "pass NCZYX crops, or pick a 2D model (maeprobe models)",
            )
        return image if model_3d else image.project_z(job.projection)
    if job.channels:
        image = select_channels(image, job.channels)
    if info is not None:
        check_channel_count(image, info)
    if image.is_3d and not model_3d:
        image = project_z(image, job.projection)
    if model_3d and not image.is_3d:
        raise MaeprobeInputError(
            f"{image.name} is 2D but model {job.model!r} takes 3D crops",
            "pass z-stacks, or pick a 2D model (maeprobe models)",
        )
    return image


def check_channel_count(image: MicroscopyImage, info: ModelInfo) -> None:
    """Refuse an image whose (picked) channels do not number what the model takes.

    Channel-agnostic models (``info.n_channels is None``) take any count. Called while
    planning, right after the channels are picked, so the refusal comes before segmentation
    and names the image's channels and how to choose them."""
    want = info.n_channels
    have = list(image.channel_names)
    if want is None or len(have) == want:
        return
    shown = ", ".join(have[:12]) + (f", ... ({len(have)} in all)" if len(have) > 12 else "")
    example = ",".join(have[:want]) if len(have) >= want else None
    fix = (
        f"pick {want} channel(s) by name with --channels NAME,NAME,... (e.g. --channels "
        f"{example})" if example else
        f"pass images with {want} channel(s), or pick a model that takes any number of "
        "channels (--model default; see maeprobe models)"
    )  # fmt: skip
    raise MaeprobeInputError(
        f"{image.name} has {len(have)} channel(s) ({shown}) but model {info.name!r} takes "
        f"exactly {want}",
        fix,
    )


def plan_image(
    image: MicroscopyImage,
    job: EmbedJob,
    labels: np.ndarray | None,
    crop_size: tuple[int, ...],
    patch_size: tuple[int, ...],
) -> PlannedImage:
    """Statistics, cells and Otsu thresholds of one image (labels already made or given)."""
    from napari_maeprobe.io.crops import CropStack

    if isinstance(image, CropStack):
        return plan_crops(image, job, crop_size, patch_size)
    data = image.to_numpy()
    check_finite(data, image.name, image.channel_names)
    stats, notes = normalization_stats(data, job.normalization)
    norm = apply_normalization(data[None], stats, job.normalization)[0]
    thresholds = foreground_thresholds(norm, patch_size)
    del norm
    excluded = 0
    if labels is None:
        # tiles: the same rule that cuts them (pp.preprocessing.tile_origins), at the crop size,
        # measured as a label image of the tiles (tile i is label i + 1)
        n = len(tile_origins(tuple(image.spatial_shape), crop_size))
        cell_ids = np.arange(n, dtype=np.int64)
        measures = measure_cells(data, tile_labels(image.spatial_shape, crop_size),
                                 image.channel_names, ids=cell_ids + 1)  # fmt: skip
        measures.index = pd.Index(cell_ids, name="cell_id")
    else:
        cell_ids = np.unique(labels[labels > 0]).astype(np.int64)
        if cell_ids.size == 0:
            raise NoCellsFoundError(
                f"{image.name}: no cells were found",
                "segment with other settings (--diameter), pass label images, or tile the "
                "image with --segmentation none",
            )
        measures = measure_cells(data, labels, image.channel_names, ids=cell_ids)
        if job.exclude_border:  # cells cut by the image border are left out, before units
            keep = ~measures["touches_border"].to_numpy(dtype=bool, na_value=False)
            excluded = int((~keep).sum())
            cell_ids, measures = cell_ids[keep], measures[keep]
            if cell_ids.size == 0:
                raise NoCellsFoundError(
                    f"{image.name}: all {excluded} of its cells touch the image border",
                    "embed without excluding border cells (drop --exclude-border)",
                )
    return PlannedImage(image, labels, stats, thresholds, cell_ids,
                        dict(image.metadata.get("obs", {})),
                        image.metadata.get("cell_obs"), notes=notes, measures=measures,
                        excluded_border=excluded)  # fmt: skip


#: crops of a stack sampled for its normalisation statistics and Otsu thresholds
CROP_SAMPLE = 512


def plan_crops(stack, job: EmbedJob, crop_size: tuple[int, ...],
               patch_size: tuple[int, ...]) -> PlannedImage:  # fmt: skip
    """A crop stack: every crop one cell (``cell_id`` its index), statistics of the stack (from
    up to :data:`CROP_SAMPLE` evenly spaced crops) and Otsu thresholds over the fitted crops
    laid side by side (patch-sized blocks of a crop never straddle two crops)."""
    from napari_maeprobe.io.crops import fit_crops, resolve_fit

    fit = resolve_fit(stack.spatial_shape, crop_size, stack.fit)
    n = stack.n_crops
    pick = np.unique(np.linspace(0, n - 1, min(n, CROP_SAMPLE)).round().astype(int))
    sample = np.asarray(stack.data[pick], dtype=np.float32)
    check_finite(sample, stack.name, stack.channel_names)
    stats = channel_stats(np.moveaxis(sample, 1, 0), job.normalization)
    fitted = apply_normalization(fit_crops(sample, crop_size, fit)[0], stats, job.normalization)
    thresholds = foreground_thresholds(np.concatenate(list(fitted), axis=-1), patch_size)
    # each crop measured whole (its own pixels), raw units, UNIT_BYTES of float64 at a time
    step = max(1, UNIT_BYTES // (8 * int(np.prod(stack.data.shape[1:]))))
    measures = pd.concat([measure_crops(np.asarray(stack.data[a : a + step]),
                                        stack.channel_names)
                          for a in range(0, n, step)])  # fmt: skip
    measures.index = pd.Index(np.arange(n, dtype=np.int64), name="cell_id")
    return PlannedImage(stack, None, stats, thresholds, np.arange(n, dtype=np.int64),
                        dict(stack.metadata.get("obs", {})), stack.metadata.get("cell_obs"),
                        fit, measures=measures)  # fmt: skip


def crop_size_for(job: EmbedJob, info: ModelInfo) -> tuple[int, ...]:
    """The crop size of a job: ``job.crop_size`` (one side or one per axis) or the model's
    input size; refused when not positive or not a multiple of the model's patch size."""
    size = info.input_size if job.crop_size is None else job.crop_size
    if np.isscalar(size):
        size = (int(size),) * len(info.patch_size)
    size = tuple(int(s) for s in size)
    if any(s <= 0 for s in size):
        example = info.input_size[-1] if info.input_size else info.patch_size[-1]
        raise MaeprobeInputError(
            f"crop size {', '.join(map(str, size))} is not a positive number of pixels",
            f"pass a positive --crop-size that is a multiple of the patch size "
            f"{info.patch_size[-1]}, e.g. --crop-size {example}, or leave it out for the "
            "model's own",
        )
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


#: job settings added after stores were first written, with their defaults
LATER_PARAMS = {"exclude_border": False, "normalize_by": "image", "normalize_reference": None}


def job_signature(
    job: EmbedJob, planned_inputs: list[dict], info: ModelInfo, segmentation: str, per_unit: int
) -> dict:
    """What identifies a job: inputs (files with sizes and mtimes), model, weights sha256,
    preprocessing and masking, and the package version."""
    from napari_maeprobe import __version__

    params = asdict(job)
    for key in ("device", "precision", "batch_size"):  # how it runs, not what it computes
        params.pop(key)
    for key, default in LATER_PARAMS.items():  # settings added later: at their default they
        if params.get(key) == default:  # are left out, so stores written before still resume
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
        if getattr(img, "fit", None) is not None:  # a crop stack: its axes and fit decide rows
            entry["crops"] = {"axes": img.source_axes, "fit": img.fit}
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
        "normalize_by": job.normalize_by, "normalize_reference": job.normalize_reference,
        "normalization_hides": describe_normalization(job.normalization, job.normalize_by,
                                                      job.normalize_reference,
                                                      info.standardizes_crops),
        "model_standardizes_crops": info.standardizes_crops,
        "projection": job.projection, "segmentation": job.segmentation,
        "masking": {"kind": job.masking, "ratio": job.mask_ratio, "tau": job.tau,
                    "seed": job.seed},
        "store_dtype": job.dtype, "package_version": __version__,
    }  # fmt: skip


def use_statistics(
    p: PlannedImage,
    stats: np.ndarray,
    note: str,
    job: EmbedJob,
    crop_size: tuple[int, ...],
    patch_size: tuple[int, ...],
) -> None:
    """Normalise a planned image with other statistics (shared by its group,
    :mod:`napari_maeprobe.pp.normalization_groups`): its Otsu thresholds are recomputed on the
    image so normalised, and each channel's note says where the statistics came from."""
    from napari_maeprobe.io.crops import CropStack, fit_crops

    stats = np.asarray(stats, dtype=np.float64)
    if np.array_equal(stats, p.stats):
        return
    if isinstance(p.image, CropStack):
        stack = p.image
        n = stack.n_crops
        pick = np.unique(np.linspace(0, n - 1, min(n, CROP_SAMPLE)).round().astype(int))
        sample = np.asarray(stack.data[pick], dtype=np.float32)
        fitted = apply_normalization(fit_crops(sample, crop_size, p.crop_fit)[0], stats,
                                     job.normalization)  # fmt: skip
        p.thresholds = foreground_thresholds(np.concatenate(list(fitted), axis=-1), patch_size)
    else:
        norm = apply_normalization(p.image.to_numpy()[None], stats, job.normalization)[0]
        p.thresholds = foreground_thresholds(norm, patch_size)
    p.stats = stats
    p.notes = [f"{n}; {note}" for n in p.notes] if p.notes else [note]
