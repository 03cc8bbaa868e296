"""Batch versus biology: how well the embedding (and a baseline of hand-crafted per-cell
features) separates each condition from the control with folds grouped by batch, and how well
it predicts the batch itself.

The question a biologist asks of a screen's embeddings is whether they see the treatment, or the
plate it was imaged on, and whether they see more than simple intensity and shape features do.
Both are answered here with cross-validated classifiers whose folds never share a batch (or,
for the batch itself, a field of view) between training and testing, so that what is measured
carries over to data the classifier has not seen.

Choices (stated in the result under ``"method"``):

- Features: the embedding is standardised and reduced to at most 50 principal components; the
  scaler and the PCA are fitted on each fold's training rows only (a scikit-learn pipeline), so
  nothing of the test rows leaks into them. The baseline features (``obsm["X_features"]``) get
  ``log1p`` on their non-negative columns (intensities and areas are skewed), then the same
  scaler (and PCA when they have more than 50 columns).
- Classifiers: kNN (``n_neighbors``) and a linear probe (logistic regression, balanced class
  weights). Scores are balanced accuracy (chance = 1 / classes) with their spread over folds.
- Condition vs control: leave-one-batch-out over the batches that hold both; with fewer than
  two such batches, folds grouped by image (said in the result).
- Batch: multi-class, on the control cells (so a condition that is commoner in one batch cannot
  stand in for the batch), folds grouped by image: the batch is a property of whole fields, and
  cells of one field in both training and test would let a classifier recognise the field (its
  density, its illumination) rather than the batch.
- Noise: a difference counts only when it exceeds twice the combined noise of the two scores,
  each score's noise being the larger of its spread over folds and the sampling error of a
  balanced accuracy on that many cells. Differences within noise are never ranked.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import ProgressCallback, report

if TYPE_CHECKING:
    import anndata as ad

#: names a control (vehicle) condition goes by, matched case-insensitively
CONTROL_NAMES = ("dmso", "control", "ctrl", "untreated", "vehicle", "mock", "nt", "none")
#: at most this many principal components of the embedding (fitted on training rows)
MAX_COMPONENTS = 50
#: said when the store holds no baseline features
NO_FEATURES = "no baseline features in this store: re-embed it with this version"
#: at most this many folds when folds are grouped by image
MAX_FOLDS = 5


def guess_control(values: pd.Series, control: str | None = None, column: str = "condition") -> str:
    """The control value of a condition column: ``control`` when given (it must occur), else the
    one value named like a control (DMSO, control, ctrl, untreated, vehicle, mock, NT, none;
    case-insensitively, as the whole value or one of its words)."""
    present = [str(v) for v in pd.Series(values).dropna().astype(str).unique()]
    listing = ", ".join(sorted(present)[:20]) + (" ..." if len(present) > 20 else "")
    if control is not None:
        if str(control) in present:
            return str(control)
        low = [v for v in present if v.lower() == str(control).lower()]
        if len(low) == 1:
            return low[0]
        raise MaeprobeInputError(
            f"control {control!r} is not a value of {column!r} (values: {listing})",
            "pass one of those values with --control VALUE",
        )
    exact = [v for v in present if v.strip().lower() in CONTROL_NAMES]
    if len(exact) == 1:
        return exact[0]
    words = [v for v in present
             if set(re.split(r"[^a-z0-9]+", v.lower())) & set(CONTROL_NAMES)]  # fmt: skip
    if not exact and len(words) == 1:
        return words[0]
    found = exact or words
    problem = (f"several values of {column!r} look like a control ({', '.join(found)})" if found
               else f"no value of {column!r} looks like a control (values: {listing})")  # fmt: skip
    raise MaeprobeInputError(problem, "name the control with --control VALUE")


def _baseline_transform(F: np.ndarray) -> np.ndarray:
    """log1p on the non-negative columns (intensities, areas: right-skewed); others as they are."""
    F = np.asarray(F, dtype=np.float64).copy()
    nonneg = np.all(F >= 0, axis=0)
    F[:, nonneg] = np.log1p(F[:, nonneg])
    return F


def _pipelines(n_features: int, n_train: int, n_neighbors: int, seed: int) -> dict:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def reduce():
        steps = [StandardScaler()]
        k = min(MAX_COMPONENTS, n_features, max(n_train - 1, 1))
        if n_features > MAX_COMPONENTS:
            steps.append(PCA(n_components=k, random_state=seed))
        return steps

    knn = KNeighborsClassifier(n_neighbors=max(1, min(n_neighbors, n_train - 1)))
    linear = LogisticRegression(class_weight="balanced", max_iter=500)
    return {"knn": make_pipeline(*reduce(), knn), "linear": make_pipeline(*reduce(), linear)}


def _score_noise(scores: list[float], counts: np.ndarray) -> float:
    """The larger of the spread over folds and the sampling error of a balanced accuracy (the
    mean of per-class recalls; each recall's variance at most 1/(4 n))."""
    spread = float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0  # 2 folds: |a-b|/sqrt2
    counts = np.asarray(counts, dtype=float)
    sampling = float(np.sqrt(np.sum(0.25 / np.maximum(counts, 1))) / max(len(counts), 1))
    return max(spread, sampling)


def _cross_validate(X, y, folds, n_neighbors, seed, progress, step, total, what) -> tuple:
    """kNN and linear balanced accuracy over ``folds`` (a list of (train, test) indices)."""
    from sklearn.base import clone
    from sklearn.metrics import balanced_accuracy_score

    out = {}
    for name in ("knn", "linear"):
        scores = []
        for train, test in folds:
            if len(np.unique(y[train])) < 2:
                continue
            pipe = clone(_pipelines(X.shape[1], len(train), n_neighbors, seed)[name])
            pipe.fit(X[train], y[train])
            scores.append(float(balanced_accuracy_score(y[test], pipe.predict(X[test]))))
        step += 1
        report(progress, step, total, what)
        out[name] = scores
    return out, step


def _summarise(scores: dict, y: np.ndarray) -> dict:
    counts = np.bincount(y)
    res = {}
    for name, s in scores.items():
        res[name] = float(np.mean(s)) if s else float("nan")
        res[f"{name}_spread"] = float(np.std(s, ddof=1)) if len(s) > 1 else 0.0
        res[f"{name}_folds"] = [float(v) for v in s]
        res[f"{name}_noise"] = _score_noise(s, counts)
    best = max(("knn", "linear"), key=lambda k: -1 if np.isnan(res[k]) else res[k])
    res["best"] = res[best]
    res["best_classifier"] = best
    res["best_noise"] = res[f"{best}_noise"]
    return res


def _grouped_folds(y: np.ndarray, groups: np.ndarray, seed: int) -> list:
    """Folds grouped by ``groups`` (image) and stratified by ``y``: at most 5, at most the
    fewest groups any class has."""
    from sklearn.model_selection import StratifiedGroupKFold

    per_class = [len(np.unique(groups[y == c])) for c in np.unique(y)]
    k = min(MAX_FOLDS, min(per_class))
    if k < 2:
        return []
    split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in split.split(np.zeros(len(y)), y, groups)
            if len(np.unique(y[te])) == len(np.unique(y))]  # fmt: skip


def _differs(a: float, na: float, b: float, nb: float) -> int:
    """+1 when a is above b by more than twice their combined noise, -1 when below, else 0."""
    margin = 2 * float(np.hypot(na, nb))
    return 1 if a - b > margin else -1 if b - a > margin else 0


def compare_condition_batch(
    adata: ad.AnnData,
    condition: str,
    batch: str,
    control: str | None = None,
    features_key: str = "X_features",
    n_neighbors: int = 15,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    max_cells: int = 20_000,
) -> dict:
    """How well the embedding (``X``) and the baseline features (``obsm[features_key]``)
    separate each condition from the control (folds grouped by ``batch``) and predict the batch
    (folds grouped by image), on a one-row-per-cell table. Rows with a missing embedding,
    condition or batch (or baseline features) are left out, so both are scored on the same
    cells. Comparisons bigger than ``max_cells`` rows are scored on a random sample of that
    size (a class smaller than half of it kept whole). Returns a JSON-able dict with
    ``conditions`` (per condition), ``batch_prediction``, ``grouping``, ``method`` and one
    ``summary`` line (see the module docstring for the choices)."""
    obs = adata.obs.reset_index(drop=True)
    for col, opt in ((condition, "--condition"), (batch, "--batch")):
        if col not in obs:
            raise MaeprobeInputError(
                f"no column {col!r} in this table",
                f"pass {opt} one of: {', '.join(map(str, obs.columns))}",
            )
    if condition == batch:
        raise MaeprobeInputError(
            f"the condition and the batch are the same column ({condition!r})",
            "pass the treatment with --condition and the plate (or date) with --batch",
        )
    X = np.asarray(adata.X, dtype=np.float64)
    valid = np.isfinite(X).all(axis=1) & obs[condition].notna().to_numpy()
    valid &= obs[batch].notna().to_numpy()
    F = None
    if features_key in adata.obsm:
        F = np.asarray(adata.obsm[features_key], dtype=np.float64)
        valid &= np.isfinite(F).all(axis=1)
    rows = np.flatnonzero(valid)
    cond = obs[condition].astype(str).to_numpy()
    bat = obs[batch].astype(str).to_numpy()
    image = (obs["image"].astype(str).to_numpy() if "image" in obs
             else np.arange(len(obs)).astype(str))  # fmt: skip
    ctrl = guess_control(obs[condition].iloc[rows], control, condition)
    others = [c for c in pd.unique(cond[rows]) if c != ctrl]
    if not others:
        raise MaeprobeInputError(
            f"{condition!r} holds only the control {ctrl!r} in these cells",
            "pass as --condition a column with treated and control cells",
        )
    spaces = {"embedding": X}
    if F is not None:
        spaces["baseline"] = _baseline_transform(F)
    rng = np.random.default_rng(seed)
    total = (len(others) + 1) * 2 * len(spaces)
    step = 0
    report(progress, step, total, "condition vs batch")

    def sample(r: np.ndarray) -> np.ndarray:
        return np.sort(rng.choice(r, max_cells, replace=False)) if len(r) > max_cells else r

    results: dict = {}
    groupings = set()
    for c in others:
        treated, controls = rows[cond[rows] == c], rows[cond[rows] == ctrl]
        if len(treated) + len(controls) > max_cells:  # each class keeps at least half
            keep_t = min(len(treated), max(max_cells // 2, max_cells - len(controls)))
            treated = rng.choice(treated, keep_t, replace=False)
            controls = rng.choice(controls, min(len(controls), max_cells - keep_t), replace=False)
        r = np.sort(np.concatenate([treated, controls]))
        y = (cond[r] == c).astype(int)
        both = [b for b in pd.unique(bat[r]) if len(np.unique(y[bat[r] == b])) == 2]
        entry: dict = {"control": ctrl, "n_cells": int(len(r)),
                       "n_condition": int(y.sum()), "n_control": int(len(y) - y.sum()),
                       "chance": 0.5}  # fmt: skip
        if len(both) >= 2:
            keep = np.isin(bat[r], both)
            r, y = r[keep], y[keep]
            folds = [(np.flatnonzero(bat[r] != b), np.flatnonzero(bat[r] == b)) for b in both]
            entry.update(grouping=f"leave one {batch} out", folds=len(folds),
                         batches=[str(b) for b in both], n_cells=int(len(r)),
                         n_condition=int(y.sum()), n_control=int(len(y) - y.sum()))  # fmt: skip
        else:
            folds = _grouped_folds(y, image[r], seed)
            entry.update(grouping="grouped by image", folds=len(folds),
                         why=f"fewer than 2 {batch} values hold both {c} and {ctrl}")  # fmt: skip
        groupings.add(entry["grouping"])
        if not folds:
            entry["skipped"] = f"too few images of {c} or {ctrl} for grouped folds"
            step += 2 * len(spaces)
            report(progress, step, total, "condition vs batch")
            results[c] = entry
            continue
        for space, M in spaces.items():
            scores, step = _cross_validate(M[r], y, folds, n_neighbors, seed, progress, step,
                                           total, f"{c} vs {ctrl} ({space})")  # fmt: skip
            entry[space] = _summarise(scores, y)
        results[c] = entry

    # the batch itself, on the control cells, folds grouped by image
    r = rows[cond[rows] == ctrl]
    on = f"{ctrl} cells"
    codes_all = pd.factorize(bat[r], sort=True)[0]
    if len(np.unique(codes_all)) < 2 or not _grouped_folds(codes_all, image[r], seed):
        r, on = rows, "all cells"
    r = sample(r)
    codes, levels = pd.factorize(bat[r], sort=True)
    batch_entry: dict = {"column": batch, "on": on, "n_cells": int(len(r)),
                         "classes": [str(v) for v in levels],
                         "chance": 1.0 / max(len(levels), 1),
                         "grouping": "grouped by image"}  # fmt: skip
    folds = _grouped_folds(codes, image[r], seed) if len(levels) >= 2 else []
    batch_entry["folds"] = len(folds)
    if not folds:
        batch_entry["skipped"] = (
            f"only one {batch} value"
            if len(levels) < 2
            else f"too few images per {batch} for folds grouped by image"
        )
        step += 2 * len(spaces)
    else:
        for space, M in spaces.items():
            scores, step = _cross_validate(
                M[r],
                codes,
                folds,
                n_neighbors,
                seed,
                progress,
                step,
                total,
                f"predicting {batch} ({space})",
            )
            batch_entry[space] = _summarise(scores, codes)
    report(progress, total, total, "condition vs batch")

    out = {
        "condition": condition, "batch": batch, "control": ctrl,
        "features": features_key if F is not None else None,
        "feature_names": _feature_names(adata) if F is not None else None,
        "n_cells": int(len(rows)), "conditions": results, "batch_prediction": batch_entry,
        "grouping": sorted(groupings),
        "method": {
            "embedding": f"standardised, PCA to at most {MAX_COMPONENTS} components, both "
                         "fitted on each fold's training rows",
            "baseline": "log1p on non-negative columns, standardised on training rows"
                        + (f", PCA to {MAX_COMPONENTS}" if F is not None
                           and F.shape[1] > MAX_COMPONENTS else ""),
            "classifiers": f"kNN (k={n_neighbors}) and logistic regression (balanced class "
                           "weights); balanced accuracy, mean and spread over folds",
            "summary_score": "the better of kNN and the linear probe",
            "batch": "control cells, folds grouped by image so no field is in training and "
                     "test",
            "noise": "a difference counts when it exceeds twice the combined noise of both "
                     "scores (the larger of the spread over folds and the sampling error)",
        },
    }  # fmt: skip
    if F is None:
        out["note"] = NO_FEATURES
    out["table"] = _table(out)
    out["notes"] = _notes(out)
    out["summary"] = summary_line(out)
    return _jsonable(out)


def _table(result: dict) -> list[dict]:
    """One record per comparison and feature space (the report's and the explorer's table)."""
    rows = []
    entries = [(f"{c} vs {e['control']}", e) for c, e in result["conditions"].items()]
    entries.append((f"{result['batch']} (of {result['batch_prediction']['on']})",
                    result["batch_prediction"]))  # fmt: skip
    for what, e in entries:
        for space in ("embedding", "baseline"):
            if space not in e:
                continue
            s = e[space]
            rows.append({
                "comparison": what, "features": space, "kNN": s["knn"],
                "kNN spread": s["knn_spread"], "linear": s["linear"],
                "linear spread": s["linear_spread"], "chance": e["chance"],
                "cells": e["n_cells"], "folds": e["folds"], "grouping": e["grouping"],
            })  # fmt: skip
    return rows


def _notes(result: dict) -> list[str]:
    """What the reader should know beside the table: fallbacks, skips, missing features."""
    notes = [f"{c}: {e['why']}; folds grouped by image instead"
             for c, e in result["conditions"].items() if "why" in e]  # fmt: skip
    notes += [f"{c}: {e['skipped']}" for c, e in result["conditions"].items() if "skipped" in e]
    if "skipped" in result["batch_prediction"]:
        notes.append(f"{result['batch']}: {result['batch_prediction']['skipped']}")
    if result.get("features") is None:
        notes.append(NO_FEATURES)
    notes.append("balanced accuracy over folds; differences within twice the combined noise "
                 "(fold spread or sampling error) are not ranked")  # fmt: skip
    return notes


def _feature_names(adata) -> list[str] | None:
    names = adata.uns.get("maeprobe", {}).get("feature_names")
    return [str(n) for n in names] if names is not None else None


def _fmt(entry: dict, space: str) -> str:
    return f"{entry[space]['best']:.2f}"


def _versus_chance(score: dict, chance: float) -> int:
    """+1 above chance beyond noise, -1 below it beyond noise, 0 within noise."""
    return _differs(score["best"], score["best_noise"], chance, 0.0)


def _condition_phrase(c: str, e: dict, batch: str) -> str:
    where = f"across {batch}s" if e["grouping"].startswith("leave") else "across images"
    head = f"{c} vs {e['control']} {where}: embedding {_fmt(e, 'embedding')}"
    emb = e["embedding"]
    emb_sep = _versus_chance(emb, e["chance"])
    below = (f"below chance: what tells them apart in one {batch} is reversed in another "
             f"(a well or {batch} effect, not the treatment)")  # fmt: skip
    if "baseline" not in e:
        tail = {1: "separated", 0: "not separated beyond noise", -1: below}[emb_sep]
        return f"{head} balanced accuracy (chance {e['chance']:.2f}): {tail}"
    base = e["baseline"]
    head += f", intensity/shape baseline {_fmt(e, 'baseline')} balanced accuracy"
    head += f" (chance {e['chance']:.2f})"
    base_sep = _versus_chance(base, e["chance"])
    if emb_sep < 1 and base_sep < 1:
        if -1 in (emb_sep, base_sep):
            who = ("both" if emb_sep == base_sep == -1
                   else "the embedding" if emb_sep == -1 else "the baseline")  # fmt: skip
            return f"{head}: neither separates it; {who} {'are' if who == 'both' else 'is'} {below}"
        return f"{head}: neither separates it beyond noise"
    d = _differs(emb["best"], emb["best_noise"], base["best"], base["best_noise"])
    if d > 0:
        return f"{head}: the model sees more than simple features here"
    if d < 0:
        return f"{head}: simple features separate it better than the model"
    if base_sep < 1:
        return (f"{head}: the embedding separates it and the baseline not beyond noise, but "
                "the two differ within noise")  # fmt: skip
    if emb_sep < 1:
        return (f"{head}: the baseline separates it and the embedding not beyond noise, but "
                "the two differ within noise")  # fmt: skip
    return f"{head}: the model adds nothing beyond simple features here (within noise)"


def _normalised(score: float, chance: float) -> float:
    return (score - chance) / (1 - chance) if chance < 1 else 0.0


def _batch_vs_biology(b: dict, scored: dict, space: str) -> tuple[int, str] | None:
    """Whether the batch separates more (+1), less (-1) or alike (0) than the best-separated
    condition in one feature space, on the chance-normalised scale (0 chance, 1 perfect)."""
    cands = [c for c in scored if space in scored[c]]
    if space not in b or not cands:
        return None
    top = max(cands, key=lambda c: _normalised(scored[c][space]["best"], scored[c]["chance"]))
    e = scored[top]
    d = _differs(
        _normalised(b[space]["best"], b["chance"]), b[space]["best_noise"] / (1 - b["chance"]),
        _normalised(e[space]["best"], e["chance"]), e[space]["best_noise"] / (1 - e["chance"]),
    )  # fmt: skip
    return d, top


def summary_line(result: dict) -> str:
    """One line for a biologist: per condition (the best separated first, at most three),
    embedding vs baseline, then whether the batch separates more than the biology (on the
    chance-normalised scale, in the embedding and in the baseline); only differences beyond
    noise are worded as differences."""
    batch = result["batch"]
    scored = {c: e for c, e in result["conditions"].items() if "embedding" in e}
    parts = []
    order = sorted(scored, key=lambda c: -scored[c]["embedding"]["best"])
    for c in order[:3]:
        parts.append(_condition_phrase(c, scored[c], batch))
    if len(order) > 3:
        parts.append(f"{len(order) - 3} more condition(s) in the table")
    for c, e in result["conditions"].items():
        if "skipped" in e:
            parts.append(f"{c}: {e['skipped']}")
    b = result["batch_prediction"]
    if "embedding" in b:
        text = f"{batch} is predicted at {b['embedding']['best']:.2f}"
        if "baseline" in b:
            text += f" (baseline {b['baseline']['best']:.2f})"
        text += f", chance {b['chance']:.2f}"

        def say(v: tuple[int, str]) -> str:
            d, top = v
            return (f"{batch} separates more than biology ({top})" if d > 0
                    else f"biology ({top}) separates more than {batch}" if d < 0
                    else f"{batch} and {top} separate alike (within noise)")  # fmt: skip

        emb = _batch_vs_biology(b, scored, "embedding")
        base = _batch_vs_biology(b, scored, "baseline")
        if emb and base and emb[0] == base[0]:
            text += f": {say(emb)}, in the embedding and the baseline alike"
        elif emb and base:
            text += f": in the embedding {say(emb)}; with simple features {say(base)}"
        elif emb:
            text += f": {say(emb)}"
        parts.append(text)
    elif "skipped" in b:
        parts.append(f"{batch}: {b['skipped']}")
    line = "; ".join(parts)
    folds = [int(e["folds"]) for e in scored.values()
             if e.get("folds") and str(e.get("grouping", "")).startswith("leave one")]  # fmt: skip
    if folds and min(folds) < 3:  # cells of one well or field are not independent samples
        line += (f" (only {min(folds)} {batch}s to hold out: the noise counts cells, which "
                 "are not independent within a well, so read these as indications)")  # fmt: skip
    if result.get("features") is None:
        line += f" ({NO_FEATURES})"
    return line


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
