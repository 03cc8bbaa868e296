"""How good are the embeddings: a linear probe for a known label, how well the model's
attention falls on the cell, and the effective rank (RankMe) of the embedding matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.tl.analysis import check_embeddings, effective_rank

__all__ = ["attention_iou", "effective_rank", "linear_probe"]


def linear_probe(X: np.ndarray, y: np.ndarray | pd.Series, cv: int = 5, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of a standardised logistic regression predicting ``y``
    from ``X`` (stratified ``cv`` folds; rows with a missing label are left out).

    Returns ``balanced_accuracy`` (mean over folds) and its ``balanced_accuracy_std``,
    ``accuracy``, the ``chance`` level of balanced accuracy (1 / classes), the
    ``majority_baseline`` (accuracy of always answering the most common class), ``n_rows``,
    ``n_classes``, ``classes`` and ``cv``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = check_embeddings(X, min_rows=2)
    y = pd.Series(np.asarray(y) if not isinstance(y, pd.Series) else y.to_numpy())
    if len(y) != X.shape[0]:
        raise MaeprobeInputError(
            f"{len(y)} labels for {X.shape[0]} rows", "pass one label per row of the embeddings"
        )
    keep = y.notna().to_numpy()
    X, y = X[keep], y[keep]
    codes, classes = pd.factorize(y, sort=True)
    counts = np.bincount(codes, minlength=len(classes))
    if len(classes) < 2:
        raise MaeprobeInputError(
            f"the labels have {len(classes)} class(es); a probe needs at least 2",
            "pick a label column that varies across these rows",
        )
    if cv < 2:
        raise MaeprobeInputError(f"cv={cv}", "use at least 2 folds")
    if counts.min() < cv:
        rare = [str(classes[i]) for i in np.flatnonzero(counts < cv)][:5]
        raise MaeprobeInputError(
            f"class(es) {', '.join(rare)} have fewer rows ({counts.min()}) than the {cv} folds",
            "embed more cells of those classes, drop them, or use fewer folds (cv)",
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    scores = cross_validate(model, X, codes, cv=folds, scoring=["balanced_accuracy", "accuracy"])
    bal = scores["test_balanced_accuracy"]
    return {
        "balanced_accuracy": float(bal.mean()),
        "balanced_accuracy_std": float(bal.std()),
        "accuracy": float(scores["test_accuracy"].mean()),
        "chance": 1.0 / len(classes),
        "majority_baseline": float(counts.max() / counts.sum()),
        "n_rows": int(len(codes)),
        "n_classes": int(len(classes)),
        "classes": [c.item() if hasattr(c, "item") else c for c in classes],
        "cv": int(cv),
    }


def attention_iou(
    attention: np.ndarray, cell_masks: np.ndarray, top_fraction: float = 0.25
) -> np.ndarray:
    """Per-crop IoU between the model's most-attended patches and the crop's cell mask.

    ``attention`` (N, gy, gx) (or (N, gz, gy, gx)), e.g. the CLS-to-patch attention averaged
    over heads; ``cell_masks`` (N, Y, X) bool with ``Y = gy * py``. The top ``top_fraction`` of
    patches (at least one; NaN attention never counts) are upsampled to the pixel grid
    (nearest) and compared with the mask. 1: the model looks exactly at the cell.
    """
    att = np.asarray(attention, dtype=np.float64)
    masks = np.asarray(cell_masks).astype(bool)
    if att.ndim < 3 or masks.ndim != att.ndim or att.shape[0] != masks.shape[0]:
        raise MaeprobeInputError(
            f"attention {att.shape} and cell masks {masks.shape} do not pair up",
            "pass attention (N, gy, gx) and masks (N, Y, X) for the same N crops",
        )
    grid, pix = att.shape[1:], masks.shape[1:]
    if any(p % g for p, g in zip(pix, grid)):
        raise MaeprobeInputError(
            f"mask size {pix} is not a multiple of the attention grid {grid}",
            "pass the masks of the crops the attention was computed on",
        )
    if not 0 < top_fraction <= 1:
        raise MaeprobeInputError(f"top_fraction={top_fraction}", "use a fraction in (0, 1]")
    n, n_patches = att.shape[0], int(np.prod(grid))
    k = max(1, int(round(top_fraction * n_patches)))
    flat = np.nan_to_num(att.reshape(n, -1), nan=-np.inf)
    top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    chosen = np.zeros((n, n_patches), dtype=bool)
    np.put_along_axis(chosen, top, True, axis=1)
    chosen = chosen.reshape(n, *grid)
    for axis, (p, g) in enumerate(zip(pix, grid), start=1):
        chosen = np.repeat(chosen, p // g, axis=axis)
    inter = (chosen & masks).reshape(n, -1).sum(axis=1)
    union = (chosen | masks).reshape(n, -1).sum(axis=1)
    return inter / np.maximum(union, 1)
