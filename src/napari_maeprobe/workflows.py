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
from .preprocessing import normalize, project_z
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


@dataclass
class AnalysisSettings:
    """How ``maeprobe analyze`` treats a level (defaults follow scanpy's usual choices)."""

    foreground: bool = False  # only foreground patches (Otsu on patch intensity)
    central: bool = False  # only patches in the middle half of the crop
    balance_by: str | None = None  # equal rows per value of this column
    max_rows: int | None = None  # analyse at most this many rows (balanced or uniform)
    n_pcs: int = 50
    n_neighbors: int = 15
    umap_max_fit: int = 20_000  # UMAP fit on a sample this big, the rest mapped by transform
    min_dist: float = 0.1
    resolution: float = 1.0  # Leiden
    kmeans: int | None = None  # k for k-means (None: no k-means)
    seed: int = 0


def analyze_store(
    store,
    levels: list[str] | None = None,
    settings: AnalysisSettings | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, dict]:
    """PCA, UMAP, Leiden (and k-means), "what drives these clusters" and the effective rank of
    each level; every result is written back into the store. Rows whose embedding is missing
    (masked patches) or that fail the filters get NA. Returns a summary per level."""
    import time

    from .analysis import apply_filters, effective_rank, kmeans, leiden, pca, umap_embed
    from .diagnostics import what_drives

    settings = settings or AnalysisSettings()
    levels = levels or store.levels()
    out = {}
    for level in levels:
        t0 = time.perf_counter()
        report(progress, 0, 5, f"analysing {level}")
        obs, X = store.read_level(level)
        valid = np.isfinite(X).all(axis=1)
        keep = apply_filters(
            obs, settings.foreground, settings.central, settings.balance_by,
            settings.max_rows, settings.seed,
        )  # fmt: skip
        rows = keep[valid[keep]]
        if len(rows) < 10:
            raise MaeprobeInputError(
                f"only {len(rows)} {level} rows are left to analyse after the filters",
                "loosen the filters (--foreground/--central/--max-rows) or embed more cells",
            )
        Xs = X[rows]
        P = pca(Xs, settings.n_pcs, seed=settings.seed)
        report(progress, 1, 5, f"analysing {level}")
        balance = None
        if settings.balance_by:
            balance = obs[settings.balance_by].astype(str).to_numpy()[rows]
        U, umap_info = umap_embed(
            P, settings.n_neighbors, settings.min_dist, seed=settings.seed,
            max_fit=settings.umap_max_fit, balance_by=balance, progress=progress,
        )  # fmt: skip
        report(progress, 2, 5, f"analysing {level}")
        clusters = leiden(P, settings.n_neighbors, settings.resolution, seed=settings.seed)
        columns = {"leiden": _labels_column(clusters, rows, len(obs))}
        if settings.kmeans:
            columns["kmeans"] = _labels_column(
                kmeans(P, settings.kmeans, seed=settings.seed), rows, len(obs)
            )
        analysed = np.zeros(len(obs), dtype=bool)
        analysed[rows] = True
        columns["analysed"] = pd.Series(analysed)
        report(progress, 3, 5, f"analysing {level}")
        sub = obs.iloc[rows].reset_index(drop=True)
        drivers = what_drives(P, sub, clusters, n_neighbors=settings.n_neighbors,
                              seed=settings.seed, labels_name="leiden")  # fmt: skip
        report(progress, 4, 5, f"analysing {level}")
        rank = effective_rank(X[valid])
        arrays = {"X_pca": _scatter_rows(P, rows, len(obs)),
                  "X_umap": _scatter_rows(U, rows, len(obs))}  # fmt: skip
        summary = {
            "level": level, "rows": int(len(obs)), "analysed_rows": int(len(rows)),
            "n_pcs": int(P.shape[1]), "n_leiden": int(clusters.max() + 1),
            "effective_rank": float(rank), "umap": umap_info,
            "settings": {k: v for k, v in vars(settings).items()},
            "verdict": drivers.verdict, "seconds": round(time.perf_counter() - t0, 2),
        }  # fmt: skip
        store.write_analysis(level, arrays, columns, {**summary, "drivers": drivers.to_dict()})
        report(progress, 5, 5, f"analysing {level}")
        out[level] = summary
    return out


def _scatter_rows(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    full = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
    full[rows] = values
    return full


def _labels_column(labels: np.ndarray, rows: np.ndarray, n: int) -> pd.Series:
    codes = np.full(n, -1, dtype=np.int64)
    codes[rows] = labels
    cats = [str(c) for c in range(int(labels.max()) + 1)]
    return pd.Series(pd.Categorical.from_codes(codes, categories=cats))


def evaluate_store(
    store,
    levels: list[str] | None = None,
    probes: list[str] | tuple[str, ...] = (),
    max_rows: int = 20_000,
    top_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, dict]:
    """Effective rank and linear probes of each level, and, when attention maps were stored,
    how well the most-attended patches cover each cell (attention IoU, per cell)."""
    from .analysis import effective_rank
    from .evaluation import attention_iou, linear_probe
    from .preprocessing import extract_windows

    levels = levels or store.levels()
    out: dict[str, dict] = {}
    for level in levels:
        obs, X = store.read_level(level)
        valid = np.flatnonzero(np.isfinite(X).all(axis=1))
        if len(valid) > max_rows:  # a uniform sample keeps probes and SVD quick
            valid = np.sort(np.random.default_rng(seed).choice(valid, max_rows, replace=False))
        res: dict = {"rows": int(len(obs)), "evaluated_rows": int(len(valid)),
                     "embed_dim": int(X.shape[1]),
                     "effective_rank": float(effective_rank(X[valid]))}  # fmt: skip
        for col in probes:
            if col not in obs:
                raise MaeprobeInputError(
                    f"no column {col!r} to probe in the {level} table",
                    f"use one of: {', '.join(map(str, obs.columns))}",
                )
            y = obs[col].iloc[valid]
            if y.nunique(dropna=True) < 2:  # e.g. patch_row at the global level
                res.setdefault("skipped_probes", {})[col] = "fewer than 2 values at this level"
                continue
            res.setdefault("probes", {})[col] = linear_probe(X[valid], y, seed=seed)
        out[level] = res
    ious = []
    for i, _ in enumerate(store.image_names()):
        att = store.read_cells("attention", i)
        if att is None or not store.has_labels(i):
            continue
        att = att.astype(np.float32).mean(axis=1)  # over heads
        patch = tuple(store.facts["patch_size"])
        if att.ndim == len(patch) + 2:  # channel-agnostic: one map per channel, averaged
            att = att.mean(axis=1)
        origins = store.read_cells("origins", i)
        obs = store.read_obs("global", images=[i]) if "global" in store.levels() else None
        labels = store.labels(i)
        ids = obs["cell_id"].to_numpy(np.int64) if obs is not None else None
        if ids is None:
            continue
        size = tuple(np.asarray(att.shape[1:]) * np.asarray(patch))
        windows = extract_windows(labels, origins, size)
        masks = windows == ids.reshape((-1,) + (1,) * len(size))
        ious.append(attention_iou(att, masks, top_fraction))
    if ious:
        values = np.concatenate(ious)
        entry = out.setdefault("global", {})
        entry["attention_iou"] = {"mean": float(np.nanmean(values)),
                                  "median": float(np.nanmedian(values)),
                                  "cells": int(np.isfinite(values).sum()),
                                  "top_fraction": top_fraction}  # fmt: skip
    return out
