"""The evaluate step: effective rank and linear probes of each level's table, and attention IoU
of the cells whose attention maps were stored."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import ProgressCallback, report

if TYPE_CHECKING:
    import anndata as ad

    from napari_maeprobe.embed.store import EmbeddingStore


def evaluate(
    adata: ad.AnnData,
    probes: list[str] | tuple[str, ...] = (),
    max_rows: int = 50_000,
    seed: int = 0,
    group_by: str | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Effective rank and linear probes of one level's table; the result is also kept in
    ``uns["maeprobe"]["evaluation"][level]``.

    Probes run on at most ``max_rows`` rows (a uniform sample; above that the figures barely
    move and the time grows) through :func:`~napari_maeprobe.tl.evaluation.linear_probe`
    (standardise, PCA to 64 components, bounded lbfgs). With ``group_by`` (e.g. ``plate`` or
    ``image``) no value of that column is in both training and test, so a probe cannot score
    by recognising a plate or a field; a probed column whose values each lie in one group
    cannot be tested that way and is listed under ``skipped_probes`` with the reason."""
    from napari_maeprobe.table import UNS_KEY, level_of
    from napari_maeprobe.tl.analysis import effective_rank
    from napari_maeprobe.tl.evaluation import linear_probe

    level = level_of(adata)
    obs = adata.obs
    for col in list(probes) + ([group_by] if group_by else []):
        if col not in obs:
            what = "to group folds by" if col == group_by else "to probe"
            raise MaeprobeInputError(
                f"no column {col!r} {what} in the {level} table",
                f"use one of: {', '.join(map(str, obs.columns))}",
            )
    X = np.asarray(adata.X, dtype=np.float32)
    valid = np.flatnonzero(np.isfinite(X).all(axis=1))
    if group_by:
        valid = valid[obs[group_by].iloc[valid].notna().to_numpy()]
        if obs[group_by].iloc[valid].nunique() < 2:
            raise MaeprobeInputError(
                f"{group_by!r} has one value in the {level} table: folds cannot be grouped by it",
                "group by a column with at least 2 values (e.g. plate, image), or leave "
                "--group-by out",
            )
    if len(valid) > max_rows:  # a uniform sample keeps probes and SVD quick
        valid = np.sort(np.random.default_rng(seed).choice(valid, max_rows, replace=False))
    total = len(probes) + 1
    report(progress, 0, total, f"evaluating {level}")
    res: dict = {"rows": int(len(obs)), "evaluated_rows": int(len(valid)),
                 "embed_dim": int(X.shape[1]),
                 "effective_rank": float(effective_rank(X[valid]))}  # fmt: skip
    if group_by:
        res["group_by"] = group_by
    groups = obs[group_by].iloc[valid].astype(str).to_numpy() if group_by else None
    for i, col in enumerate(probes, start=1):
        report(progress, i, total, f"evaluating {level}: probe of {col}")
        y = obs[col].iloc[valid]
        if y.nunique(dropna=True) < 2:  # e.g. patch_row at the global level
            res.setdefault("skipped_probes", {})[col] = "fewer than 2 values at this level"
            continue
        try:
            probe = linear_probe(X[valid], y, seed=seed, groups=groups,
                                 group_name=group_by or "group")  # fmt: skip
        except MaeprobeInputError as exc:
            if group_by is None:
                raise
            res.setdefault("skipped_probes", {})[col] = exc.problem
            continue
        res.setdefault("probes", {})[col] = probe
    report(progress, total, total, f"evaluating {level}")
    adata.uns.setdefault(UNS_KEY, {}).setdefault("evaluation", {})[level] = res
    return res


def attention_iou_of_store(store: EmbeddingStore, top_fraction: float = 0.25) -> dict | None:
    """How well the most-attended patches of each cell cover its mask (attention IoU), over
    every cell whose attention map was stored (whatever levels were embedded); None when no
    attention maps or labels were stored."""
    from napari_maeprobe.pp.preprocessing import extract_windows
    from napari_maeprobe.tl.evaluation import attention_iou

    patch = tuple(store.facts.get("patch_size", ()))
    ious = []
    for i, _ in enumerate(store.image_names()):
        stored = store.read_cells("attention", i)
        if stored is None or not store.has_labels(i):
            continue
        ids, att = stored
        att = att.astype(np.float32).mean(axis=1)  # over heads
        if att.ndim == len(patch) + 2:  # channel-agnostic: one map per channel, averaged
            att = att.mean(axis=1)
        origin_ids, origins = store.read_cells("origins", i)
        order = {c: k for k, c in enumerate(origin_ids.tolist())}
        origins = origins[[order[int(c)] for c in ids]]
        size = tuple(np.asarray(att.shape[1:]) * np.asarray(patch))
        windows = extract_windows(store.labels(i), origins, size)
        masks = windows == ids.reshape((-1,) + (1,) * len(size))
        ious.append(attention_iou(att, masks, top_fraction))
    if not ious:
        return None
    values = np.concatenate(ious)
    return {"mean": float(np.nanmean(values)), "median": float(np.nanmedian(values)),
            "cells": int(np.isfinite(values).sum()), "top_fraction": top_fraction}  # fmt: skip


def evaluate_store(
    store: EmbeddingStore,
    levels: list[str] | None = None,
    probes: list[str] | tuple[str, ...] = (),
    max_rows: int = 50_000,
    top_fraction: float = 0.25,
    seed: int = 0,
    group_by: str | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, dict]:
    """:func:`evaluate` each level (default: all), folds grouped by ``group_by`` when given;
    with stored attention maps, also ``out["cells"]["attention_iou"]``
    (:func:`attention_iou_of_store`)."""
    from napari_maeprobe.table import read_level

    out: dict[str, dict] = {}
    for level in levels or store.levels():
        out[level] = evaluate(read_level(store, level), probes, max_rows, seed, group_by,
                              progress)  # fmt: skip
    report(progress, 0, 1, "attention IoU")
    iou = attention_iou_of_store(store, top_fraction)
    if iou is not None:
        out["cells"] = {"attention_iou": iou}
    return out
