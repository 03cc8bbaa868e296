"""Embedding jobs: images -> cells -> crops -> model -> the embedding store.

A job is planned on the caller's side (images read, channels picked, cells segmented or label
images loaded, cells split into units of work) and each unit is then embedded either here, by
the inference engine's worker process, or as one task on a dask.distributed cluster. Every
unit's rows land in the same store (:mod:`.store`); a re-run of the same job skips the
finished units, so an interrupted job resumes and ends with the same store as a clean run.

Rows are cell-major: for each cell, each channel (models that keep channels apart), each
patch in row-major order, so one batch of cells fills one contiguous block of rows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .boundaries import boundary_map, patch_fractions
from .errors import MaeprobeInputError, NoCellsFoundError
from .image import MicroscopyImage
from .inference import LEVELS, BatchResult, EngineConfig, InferenceEngine, ModelInfo
from .preprocessing import (
    CropSet,
    apply_normalization,
    cell_crops,
    channel_stats,
    check_finite,
    patch_table,
    project_z,
    tile_image,
)
from .progress import ProgressCallback, report
from .store import EmbeddingStore, UnitSpec

#: the observation columns every embedding table carries (docs/contract.md)
OBS_COLUMNS = (
    "level", "dataset", "image", "cell_id", "channel", "patch_row", "patch_col", "patch_z",
    "centroid_y", "centroid_x", "centroid_z", "patch_intensity", "foreground", "central",
    "boundary_fraction",
)  # fmt: skip

#: bytes of float32 crops held per unit of work (bounds memory, whatever the image size)
UNIT_BYTES = 64 * 2**20


@dataclass
class EmbedJob:
    """What to embed and how: everything that decides the store's contents."""

    model: str = "default"
    weights: str | None = None
    model_options: dict = field(default_factory=dict)
    channels: list[str] | None = None
    levels: tuple[str, ...] = LEVELS
    segmentation: str = "auto"  # auto | cellpose | builtin | none (tiles) | given (labels passed)
    diameter: float | None = None
    crop_size: int | tuple[int, ...] | None = None  # None: the model's input size
    normalization: str = "percentile"
    projection: str = "max"  # z-stacks with a 2D model: max | slice
    masking: str = "none"
    mask_ratio: float = 0.75
    tau: float = 0.5
    seed: int = 0
    dtype: str = "float16"
    attention: bool = False
    reconstruction: bool = False
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    random_init: bool = False

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, weights=self.weights, model_options=dict(self.model_options),
            device=self.device, precision=self.precision, batch_size=self.batch_size,
            levels=tuple(self.levels), attention=self.attention,
            reconstruction=self.reconstruction, masking=self.masking,
            mask_ratio=self.mask_ratio, tau=self.tau, seed=self.seed,
            random_init=self.random_init,
        )  # fmt: skip

    def check(self) -> None:
        """Refuse impossible settings before any work is done."""
        bad = [lvl for lvl in self.levels if lvl not in LEVELS]
        if bad or not self.levels:
            raise MaeprobeInputError(
                f"unknown level(s) {', '.join(bad) or '(none)'}",
                "use --levels with some of global,channel,patch",
            )
        if self.masking not in ("none", "random", "boundary"):
            raise MaeprobeInputError(
                f"unknown masking {self.masking!r}", "use --masking none, random or boundary"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise MaeprobeInputError(
                f"mask ratio {self.mask_ratio} is outside [0, 1)", "pick e.g. --mask-ratio 0.75"
            )
        if self.tau <= 0:
            raise MaeprobeInputError(f"tau {self.tau} must be positive", "pick e.g. --tau 0.5")
        if self.dtype not in ("float16", "float32"):
            raise MaeprobeInputError(
                f"unknown store dtype {self.dtype!r}", "use --dtype float16 or float32"
            )
        if self.masking == "boundary" and self.segmentation == "none":
            raise MaeprobeInputError(
                "boundary-guided masking needs cell boundaries, but segmentation is off",
                "segment the cells (drop --segmentation none) or use --masking random",
            )
        if self.reconstruction and self.masking == "none":
            raise MaeprobeInputError(
                "reconstructions need masked patches to reconstruct",
                "add --masking random or --masking boundary",
            )


@dataclass
class PlannedImage:
    """One image of a job: its (channel-picked, projected) data, cells and statistics."""

    image: MicroscopyImage
    labels: np.ndarray | None
    stats: np.ndarray  # (C, 2) normalisation statistics
    thresholds: np.ndarray  # (C + 1,) Otsu thresholds: per channel, then of the channel mean
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


# --------------------------------------------------------------------------- planning


def prepare_image(image: MicroscopyImage, job: EmbedJob, model_3d: bool) -> MicroscopyImage:
    """Pick and order channels, and turn z-stacks into what the model takes."""
    from .channels import select_channels

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


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float("inf")
    return float(threshold_otsu(values))


def plan_image(
    image: MicroscopyImage,
    job: EmbedJob,
    labels: np.ndarray | None,
) -> PlannedImage:
    """Statistics, cells and Otsu thresholds of one image (labels already made or given)."""
    data = image.to_numpy()
    check_finite(data, image.name, image.channel_names)
    stats = channel_stats(data, job.normalization)
    step = max(1, data[0].size // 1_000_000)
    norm = apply_normalization(data.reshape(1, data.shape[0], -1)[:, :, ::step], stats,
                               job.normalization)[0]  # fmt: skip
    thresholds = np.array([_otsu(ch) for ch in norm] + [_otsu(norm.mean(axis=0))])
    if labels is None:
        cell_ids = np.arange(_n_tiles(image, job), dtype=np.int64)
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


def _crop_size(job: EmbedJob, info: ModelInfo) -> tuple[int, ...]:
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


def _n_tiles(image: MicroscopyImage, job: EmbedJob) -> int:
    size = job.crop_size or 224
    size = (size,) * len(image.spatial_shape) if np.isscalar(size) else size
    return int(np.prod([-(-s // t) for s, t in zip(image.spatial_shape, size)]))


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
    from . import __version__

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
    reserved = sorted(set(meta.columns) & (set(OBS_COLUMNS) - {"image"}))
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


# --------------------------------------------------------------------------- one unit


def unit_crops(
    p: PlannedImage,
    unit: UnitSpec,
    crop_size: tuple[int, ...],
    boundary: np.ndarray | None,
    normalization: str = "percentile",
) -> CropSet:
    """The normalised crops of one unit's cells (tiles without segmentation)."""
    data = p.image.to_numpy()
    img = p.image
    if p.labels is None:
        tiles = tile_image(data, crop_size, image_name=img.name, channel_names=img.channel_names)
        sel = unit.cell_ids
        crops = CropSet(
            tiles.crops[sel], tiles.cell_masks[sel], None, tiles.cell_ids[sel],
            tiles.origins[sel], tiles.centroids[sel], tiles.size, "tile", img.name,
            tiles.channel_names,
        )  # fmt: skip
    else:
        crops = cell_crops(data, p.labels, crop_size, img.name, img.channel_names,
                           ids=unit.cell_ids, boundary=boundary)  # fmt: skip
    crops.crops = apply_normalization(crops.crops, p.stats, normalization)
    return crops


def unit_obs(
    p: PlannedImage, crops: CropSet, info: ModelInfo, levels: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """The observation table of each level for one unit, in the store's cell-major row order."""
    img = p.image
    n, n_c = len(crops), img.n_channels
    nd = len(crops.size)
    cells = pd.DataFrame({
        "dataset": img.dataset, "image": img.name, "cell_id": crops.cell_ids,
        "centroid_y": crops.centroids[:, -2], "centroid_x": crops.centroids[:, -1],
    })  # fmt: skip
    if nd == 3:
        cells["centroid_z"] = crops.centroids[:, 0]
    out: dict[str, pd.DataFrame] = {}
    if "global" in levels:
        out["global"] = obs_frame(cells, "global", p.metadata)
    if "channel" in levels and info.channel_agnostic:
        per_channel = cells.loc[cells.index.repeat(n_c)].reset_index(drop=True)
        per_channel["channel"] = list(img.channel_names) * n
        out["channel"] = obs_frame(per_channel, "channel", p.metadata)
    if "patch" in levels:
        table = patch_table(crops, info.patch_size, per_channel=info.channel_agnostic,
                            dataset=img.dataset)  # fmt: skip
        n_p = len(table) // (n * (n_c if info.channel_agnostic else 1))
        if info.channel_agnostic:  # patch_table runs channel-major: make it cell-major
            order = np.arange(len(table)).reshape(n_c, n, n_p).transpose(1, 0, 2).ravel()
            table = table.iloc[order].reset_index(drop=True)
            ch_index = pd.Categorical(table["channel"], categories=list(img.channel_names)).codes
            thr = p.thresholds[ch_index]
        else:
            thr = np.full(len(table), p.thresholds[-1])
        table["foreground"] = table["patch_intensity"].to_numpy(np.float64) > thr
        out["patch"] = obs_frame(table, "patch", p.metadata)
    return out


def obs_frame(frame: pd.DataFrame, level: str, metadata: dict | None = None) -> pd.DataFrame:
    """``frame`` with every observation column (missing ones as NA) in contract order, plus
    the image's user metadata (condition, well, ...) as further columns."""
    out = pd.DataFrame({"level": pd.Categorical([level] * len(frame))})
    for col in OBS_COLUMNS[1:]:
        out[col] = frame[col].to_numpy() if col in frame else pd.NA
    for col in ("dataset", "image", "channel"):
        out[col] = out[col].astype("string").astype("category")
    for col in ("cell_id", "patch_row", "patch_col", "patch_z"):
        out[col] = out[col].astype("Int64")
    for col in ("centroid_y", "centroid_x", "centroid_z", "patch_intensity", "boundary_fraction"):
        out[col] = out[col].astype("Float64").astype(np.float64)
    for col in ("foreground", "central"):
        out[col] = out[col].astype("boolean")
    for key, value in (metadata or {}).items():
        if key not in out and np.isscalar(value):
            out[key] = pd.Categorical([str(value)] * len(frame))
    return out


def batch_rows(
    res: BatchResult, unit: UnitSpec, info: ModelInfo, levels: Sequence[str]
) -> list[tuple[str, int, np.ndarray]]:
    """(array name, first row, values) writes of one batch into its unit."""
    start = int(res.index[0]) - unit.first_index
    n = len(res.index)
    writes = []
    if "global" in levels:
        writes.append(("global/X", start, res.global_embedding))
    if "channel" in levels and info.channel_agnostic and res.channel_embeddings is not None:
        ch = res.channel_embeddings
        writes.append(("channel/X", start * ch.shape[1], ch.reshape(-1, ch.shape[-1])))
    if "patch" in levels:
        pe = res.patch_embeddings.reshape(n, -1, res.patch_embeddings.shape[-1])
        writes.append(("patch/X", start * pe.shape[1], pe.reshape(-1, pe.shape[-1])))
    if res.attention is not None:
        writes.append(("attention", start, res.attention))
    if res.reconstruction is not None:
        writes.append(("reconstruction", start, res.reconstruction))
    if res.mask is not None:
        writes.append(("mask", start, res.mask))
    return writes


def _extras(job: EmbedJob, info: ModelInfo, unit: UnitSpec, crop_shape, n_heads_grid):
    n = len(unit.cell_ids)
    nd = len(info.patch_size)
    extras = {"origins": ((n, nd), "int64")}
    grid = tuple(s // p for s, p in zip(crop_shape[1:], info.patch_size))
    token_grid = ((crop_shape[0],) if info.channel_agnostic else ()) + grid
    if job.attention:
        extras["attention"] = ((n, n_heads_grid, *token_grid), "float16")
    if job.reconstruction:
        extras["reconstruction"] = ((n, *crop_shape), "float16")
    if job.masking != "none":
        extras["mask"] = ((n, *token_grid), "bool")
    return extras


def embed_unit(
    p: PlannedImage,
    unit: UnitSpec,
    engine: InferenceEngine,
    job: EmbedJob,
    crop_size: tuple[int, ...],
    boundary: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
):
    """Embed one unit: yields ``("begin", obs, extras)`` once, then the writes of each batch."""
    info = engine.info
    crops = unit_crops(p, unit, crop_size, boundary, job.normalization)
    obs = unit_obs(p, crops, info, job.levels)
    bfrac = None
    if job.masking == "boundary":
        bfrac = patch_fractions(crops.boundary, info.patch_size).astype(np.float32)
    n_heads = None
    writes_iter = engine.embed(crops.crops, bfrac, progress=progress,
                               first_index=unit.first_index)  # fmt: skip
    first = True
    for res in writes_iter:
        if first:
            n_heads = res.attention.shape[1] if res.attention is not None else 0
            yield ("begin", obs, _extras(job, info, unit, crops.crops.shape[1:], n_heads))
            yield ("rows", [("origins", 0, crops.origins.astype(np.int64))])
            first = False
        yield ("rows", batch_rows(res, unit, info, job.levels))


# --------------------------------------------------------------------------- the job


@dataclass
class EmbedResult:
    """What an embedding job did."""

    store: EmbeddingStore
    units_done: int
    units_skipped: int
    rows: dict[str, int]
    seconds: float
    facts: dict


def _labels_for(
    store: EmbeddingStore,
    index: int,
    image: MicroscopyImage,
    job: EmbedJob,
    given: np.ndarray | None,
) -> tuple[np.ndarray | None, str]:
    """The image's label image: stored (resume), given, segmented now, or None (tiles)."""
    from .segmentation import segment

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


def run_embedding(
    images: Sequence[MicroscopyImage],
    out: str | Path,
    job: EmbedJob,
    labels: Sequence[np.ndarray | None] | None = None,
    progress: ProgressCallback | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    engine: InferenceEngine | None = None,
    per_unit: int | None = None,
) -> EmbedResult:
    """Embed every cell of ``images`` into the store at ``out`` (resuming a matching store).

    ``labels``: one label image per image (None entries: segment or tile as ``job`` says).
    ``scheduler``: a dask.distributed scheduler address (or ``"local"`` for a LocalCluster):
    one task per unit, results gathered into the store here. ``per_unit``: cells per unit of
    work (default: what keeps a unit's crops under :data:`UNIT_BYTES`).
    """
    t0 = time.perf_counter()
    job.check()
    if not images:
        raise MaeprobeInputError("no images to embed", "pass at least one image file or folder")
    names = [img.name for img in images]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MaeprobeInputError(
            f"several images are named {', '.join(dupes)}",
            "give each image its own file name (names key the store's rows)",
        )
    given = list(labels) if labels is not None else [None] * len(images)
    if len(given) != len(images):
        raise MaeprobeInputError(
            f"{len(given)} label images for {len(images)} images", "pass one label image per image"
        )
    own_engine = engine is None and scheduler is None
    if own_engine:
        engine = InferenceEngine(job.engine_config())
    try:
        info = engine.info if engine is not None else _remote_model_info(scheduler, job)
        model_3d = len(info.patch_size) == 3
        images = [prepare_image(img, job, model_3d) for img in images]
        crop_size = _crop_size(job, info)
        seg_kind = "given" if any(g is not None for g in given) else job.segmentation
        n_c = max(img.n_channels for img in images)
        per_unit = per_unit or cells_per_unit((n_c, *crop_size))
        signature = job_signature(job, describe_inputs(images), info, seg_kind, per_unit)
        store = EmbeddingStore.open_for_job(out, signature, overwrite=overwrite)
        planned = []
        for i, img in enumerate(images):
            report(progress, i, len(images), "segmenting")
            lab, method = _labels_for(store, i, img, job, given[i])
            planned.append(plan_image(img, job, lab))
            planned[-1].metadata["segmentation"] = method
        report(progress, len(images), len(images), "segmenting")
        store.set_images([p.info() for p in planned])
        n_patches = int(np.prod([s // q for s, q in zip(crop_size, info.patch_size)]))
        rows_per_cell = {"global": 1, "channel": n_c if info.channel_agnostic else 0,
                         "patch": n_patches * (n_c if info.channel_agnostic else 1)}  # fmt: skip
        rows_per_cell = {k: v for k, v in rows_per_cell.items() if k in job.levels and v}
        units = plan_units(planned, per_unit, rows_per_cell)
        todo = [u for u in units if not store.unit_complete(u.key)]
        facts = _facts(job, info, crop_size)
        store.set_facts(facts)
        total = sum(len(u.cell_ids) for u in units)
        done = total - sum(len(u.cell_ids) for u in todo)
        if scheduler is None:
            _run_local(store, planned, todo, engine, job, crop_size, progress, done, total)
        else:
            _run_distributed(store, planned, todo, job, crop_size, scheduler, progress, done, total)
    finally:
        if own_engine and engine is not None:
            engine.close()
    rows = {lvl: store.n_rows(lvl) for lvl in store.levels()}
    return EmbedResult(store, len(todo), len(units) - len(todo), rows,
                       time.perf_counter() - t0, facts)  # fmt: skip


def _facts(job: EmbedJob, info: ModelInfo, crop_size) -> dict:
    from . import __version__

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


def _run_local(store, planned, todo, engine, job, crop_size, progress, done, total) -> None:
    boundaries: dict[int, np.ndarray] = {}
    for unit in todo:
        p = planned[unit.image_index]
        if p.labels is not None and unit.image_index not in boundaries:
            boundaries.clear()  # one image's boundary map at a time
            boundaries[unit.image_index] = boundary_map(p.labels)
        inner = _offset_progress(progress, done, total)
        for kind, *payload in embed_unit(p, unit, engine, job, crop_size,
                                         boundaries.get(unit.image_index), inner):  # fmt: skip
            if kind == "begin":
                obs, extras = payload
                store.begin_unit(unit, obs, engine.info.embed_dim, job.dtype, extras)
            else:
                for name, start, values in payload[0]:
                    store.write_rows(unit.key, name, start, values)
        store.finish_unit(unit.key)
        done += len(unit.cell_ids)
        report(progress, done, total, "embedding")


def _offset_progress(progress, done: int, total: int):
    if progress is None:
        return None

    def inner(d: int, _t: int, desc: str):
        return progress(done + d, total, desc)

    return inner


# --------------------------------------------------------------------------- dask.distributed

_WORKER_ENGINES: dict[str, InferenceEngine] = {}


def _worker_engine(cfg: EngineConfig) -> InferenceEngine:
    """One in-process engine per dask worker and config (the model loads once per worker)."""
    key = repr(cfg)
    if key not in _WORKER_ENGINES:
        _WORKER_ENGINES.clear()
        threads = int(os.environ.get("MAEPROBE_WORKER_THREADS", "0")) or None
        if threads:
            cfg.threads = threads
        _WORKER_ENGINES[key] = InferenceEngine(cfg, in_process=True)
    return _WORKER_ENGINES[key]


def _remote_model_info(scheduler: str, job: EmbedJob) -> ModelInfo:
    client = _client(scheduler)
    return client.submit(lambda cfg: _worker_engine(cfg).info, job.engine_config(),
                         pure=False).result()  # fmt: skip


def _remote_unit(p: PlannedImage, unit: UnitSpec, job: EmbedJob, crop_size) -> dict:
    """A dask task: embed one unit on a worker and return its obs, extras and full arrays."""
    engine = _worker_engine(job.engine_config())
    boundary = boundary_map(p.labels) if p.labels is not None else None
    out: dict = {"arrays": {}}
    for kind, *payload in embed_unit(p, unit, engine, job, crop_size, boundary):
        if kind == "begin":
            out["obs"], out["extras"] = payload
            continue
        for name, start, values in payload[0]:
            out["arrays"].setdefault(name, []).append((start, values))
    out["dim"] = engine.info.embed_dim
    return out


_CLIENTS: dict[str, object] = {}


def _client(scheduler: str):
    """A dask.distributed client for an address, or a LocalCluster for ``"local"``."""
    from distributed import Client, LocalCluster

    if scheduler not in _CLIENTS:
        if scheduler == "local":
            n = max(1, min(2, os.cpu_count() or 1))
            threads = max(
                1, (os.cpu_count() or 1) // n
            )  # torch threads per worker: no oversubscription
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=None,
                                   env={"MAEPROBE_WORKER_THREADS": str(threads)})  # fmt: skip
            _CLIENTS[scheduler] = Client(cluster)
        else:
            try:
                _CLIENTS[scheduler] = Client(scheduler, timeout=30)
            except OSError as exc:
                raise MaeprobeInputError(
                    f"cannot reach the dask scheduler at {scheduler} ({exc})",
                    "start it (dask scheduler, or dask-jobqueue on SLURM) and pass its address",
                ) from exc
    return _CLIENTS[scheduler]


def close_clients() -> None:
    """Close the dask clients (and local clusters) this process opened."""
    while _CLIENTS:
        _, client = _CLIENTS.popitem()
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()


def _run_distributed(store, planned, todo, job, crop_size, scheduler, progress, done, total):
    from distributed import as_completed

    client = _client(scheduler)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    scattered: dict[int, object] = {}
    pending = list(todo)
    futures = as_completed()
    by_key = {}

    def submit_next() -> None:
        unit = pending.pop(0)
        i = unit.image_index
        if i not in scattered:
            scattered[i] = client.scatter(planned[i], broadcast=False)
        fut = client.submit(_remote_unit, scattered[i], unit, job, crop_size,
                            key=f"maeprobe-unit-{unit.key}-{id(store)}", pure=False)  # fmt: skip
        by_key[fut.key] = unit
        futures.add(fut)

    for _ in range(min(len(pending), 2 * n_workers)):  # bounded in flight: bounded memory
        submit_next()
    try:
        for fut in futures:
            unit = by_key.pop(fut.key)
            res = fut.result()
            store.begin_unit(unit, res["obs"], res["dim"], job.dtype, res["extras"])
            for name, parts in res["arrays"].items():
                for start, values in parts:
                    store.write_rows(unit.key, name, start, values)
            store.finish_unit(unit.key)
            done += len(unit.cell_ids)
            report(progress, done, total, "embedding")
            if pending:
                submit_next()
    except BaseException:
        for fut in list(futures.futures):
            fut.cancel()
        raise
