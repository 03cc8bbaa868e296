"""The evaluate step: effective rank, linear probes and attention IoU of a store."""

from __future__ import annotations

import numpy as np

from napari_maeprobe.errors import MaeprobeInputError


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
    from napari_maeprobe.pp.preprocessing import extract_windows
    from napari_maeprobe.tl.analysis import effective_rank
    from napari_maeprobe.tl.evaluation import attention_iou, linear_probe

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
