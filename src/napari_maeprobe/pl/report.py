"""The demo's ``report.html``: run facts, the segmentation table and, per embedding level, the
verdict, the diagnostics (AMI per column) and UMAP maps coloured by channel, patch position,
dataset and cluster, so that a reader can tell biology from marker channel and patch position.

Figures are PNG files next to the page (``umap_{level}_{column}.png``, ``drivers_{level}.png``),
drawn with matplotlib's Agg canvas on private ``Figure`` objects (no pyplot state). Every file is
written atomically (temporary name in the same folder, then rename).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from napari_maeprobe.io.files import atomic_write
from napari_maeprobe.pl.colors import NA_RGBA, categorical_palette, color_kind, ordinal_colors

if TYPE_CHECKING:
    import anndata
    from matplotlib.figure import Figure

#: the colourings drawn by default, in this order
DEFAULT_COLOUR_BY = ("channel", "patch_row", "patch_col", "dataset", "leiden")
#: levels in the order the page shows them (others follow, sorted)
LEVEL_ORDER = ("global", "channel", "patch")
#: at most this many categories get a legend; more get a note "N categories"
MAX_LEGEND = 20
#: more points than this are drawn as a random subset (keeps a figure near one second)
MAX_POINTS = 250_000
SEED = 0
NA_COLOUR = NA_RGBA

LEVEL_TEXT = {
    "global": "one embedding per cell (all channels together)",
    "channel": "one embedding per cell and marker channel",
    "patch": "one embedding per patch of each cell crop (and channel)",
}

#: what each colouring tells the reader; ``{col}`` is the column name
CAPTIONS = {
    "channel": (
        "Coloured by marker channel: one island per channel means the embedding mostly encodes "
        "which stain it looks at, not the state of the cell; compare cells within one channel."
    ),
    "patch_row": (
        "Coloured by patch_row: bands or a smooth gradient of colour mean the embedding encodes "
        "the patch's vertical position within the crop, not biology."
    ),
    "patch_col": (
        "Coloured by patch_col: bands or a smooth gradient of colour mean the embedding encodes "
        "the patch's horizontal position within the crop, not biology."
    ),
    "patch_z": (
        "Coloured by patch_z: bands or a gradient mean the embedding encodes the patch's depth "
        "in the stack, not biology."
    ),
    "dataset": (
        "Coloured by dataset: separate islands per dataset can be biology (other cell types, "
        "stains) or a batch effect; clusters that mix colours are shared across datasets."
    ),
    "image": (
        "Coloured by image: islands per image point to field or plate effects (illumination, "
        "focus) rather than biology."
    ),
    "leiden": (
        "Coloured by Leiden cluster: the clusters the diagnostics explain; compare with the "
        "other maps to see whether each cluster follows channel, position or something else."
    ),
    "foreground": (
        "Coloured by foreground: if background patches form their own region, much of the "
        "structure is signal versus empty space."
    ),
    "central": (
        "Coloured by central: a split between centre and edge patches means the embedding "
        "encodes where in the crop a patch sits."
    ),
    "patch_intensity": (
        "Coloured by patch intensity: a gradient across the map means the embedding tracks "
        "brightness more than shape or texture."
    ),
    "boundary_fraction": (
        "Coloured by boundary fraction: high values on one side mean the embedding separates "
        "patches on cell borders from patches inside cells."
    ),
}

#: explanations of the diagnostics table's columns, shown under it when present
TABLE_HELP = {
    "ami": "adjusted mutual information between the clusters and the column "
    "(1: the clusters are that column, 0: they ignore it)",
    "knn_purity": "share of each point's nearest neighbours in the embedding with the same value",
    "purity_baseline": "the same after shuffling the column (what chance gives)",
    "purity_gain": "purity minus baseline: how much the embedding itself is organised by it",
    "position_r2": "how well a linear model reads the patch position out of the embedding (R²)",
    "role": "what the column stands for (batch, condition, patch position, a crop artefact, "
    "brightness, ...)",
    "effect": "strong, weak, or none (within noise: the AMI does not exceed ami_null)",
    "missing": "fraction of rows without a value (compared as a value of its own, so every "
    "column is compared on the same rows)",
    "ami_low": "low end of the AMI's 95 % bootstrap interval over rows",
    "ami_high": "high end of the AMI's 95 % bootstrap interval over rows",
    "ami_null": "the AMI the column must exceed to count: what shuffled values reach "
    "(99th percentile, over all columns tested)",
    "p_value": "share of shuffles whose AMI reaches the column's (1: chance explains it)",
    "strength": "the AMI over the smaller of the two entropies: 1 when the clusters nest in the "
    "column's values or the other way round; strong from 0.5",
    "tier": "1: not separable from the top column (bootstrap); 2: from the best of the rest; "
    "0: no effect",
    "purity_z": "kNN purity above its baseline in standard deviations of the shuffles",
    "confounded_with": "columns that split the rows the same way (their values match one to "
    "one, e.g. plate and imaging date), or image (one value per image, one image per value)",
}

#: run facts kept in uns["maeprobe"] that the header does not list (each has its own place on
#: the page, or is bookkeeping: the job's full parameters, input names, feature names)
HIDDEN_FACTS = frozenset({
    "analysis", "signature", "inputs", "feature_names", "evaluation", "units_done",
    "units_total", "cells_done", "cells_total", "levels", "channel_agnostic",
})  # fmt: skip
#: the diagnostics columns the page shows (the whole table is in the store and the h5ad)
REPORT_COLUMNS = ("column", "role", "effect", "ami", "ami_null", "p_value", "knn_purity",
                  "purity_gain", "position_r2", "missing", "confounded_with")  # fmt: skip

#: groups of the diagnostics bar chart: (label, colour, columns)
_GROUPS = (
    ("position in crop", "#e6862a", {"patch_row", "patch_col", "patch_z", "central"}),
    ("position in image", "#2a9d9d", {"centroid_y", "centroid_x", "centroid_z"}),
    ("cell boundary", "#c9a227", {"boundary_fraction"}),
    ("marker channel", "#7b4fb0", {"channel"}),
    ("dataset / image", "#8c8c8c", {"dataset", "image"}),
    ("signal vs background", "#3b9c5a", {"foreground", "patch_intensity"}),
    ("crop artefact", "#d1495b", {"crop_padding", "touches_border", "channel_empty"}),
)
#: groups of columns not listed above, by their schema role (schema.column_role)
_ROLE_GROUPS = {
    "intensity": ("brightness / size / density", "#6aa84f"),
    "batch": ("batch (plate, date)", "#5d5d5d"),
    "condition": ("condition (treatment)", "#c2185b"),
    "position": ("position in image", "#2a9d9d"),
    "artefact": ("crop artefact", "#d1495b"),
}
_OTHER_GROUP = ("other", "#3d6fb5")
#: at most this many columns in the diagnostics bar chart (the highest AMIs)
MAX_BARS = 24


# --------------------------------------------------------------------------- small helpers


def _e(value: object) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def _safe_name(text: str) -> str:
    """A file-name fragment: letters, digits, ``_``, ``-`` and ``.`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "x"


def _mpl_text(text: object, limit: int = 28) -> str:
    """Plain text for a matplotlib label: ``$`` escaped (no mathtext), long labels shortened."""
    s = str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def _new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A private figure on an Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: Path) -> None:
    """Write the figure as a PNG, atomically."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=fig.dpi))


def _marker_size(n: int) -> float:
    """Scatter marker area (points^2): large for a few hundred points, ~1 for 100k."""
    return float(np.clip(25.0 * (1000.0 / max(n, 1)) ** 0.7, 0.15, 16.0))


def _sort_key(value: object) -> tuple:
    """Natural order: numbers (also as strings, e.g. Leiden '10' after '9') before text."""
    s = str(value)
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def _categories(values: pd.Series) -> list:
    """The distinct non-NA values in display order."""
    present = pd.unique(values.dropna())
    if isinstance(values.dtype, pd.CategoricalDtype):
        keep = set(present)
        return [c for c in values.cat.categories if c in keep]
    return sorted(present, key=_sort_key)


# --------------------------------------------------------------------------- UMAP figures


def umap_png(
    path: Path, xy: np.ndarray, values: pd.Series, column: str, title: str
) -> dict[str, Any]:
    """Draw ``xy`` coloured by ``values`` (rows with NaN coordinates skipped) into a PNG.

    Draw order is shuffled (fixed seed) so that no category paints over the others; above
    ``MAX_POINTS`` a random subset is drawn. Returns what the caption needs: ``kind``,
    ``n_shown``, ``n_total`` (rows with coordinates), ``n_skipped``, ``n_values``.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize

    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    ok = np.isfinite(xy).all(axis=1)
    n_total = int(ok.sum())
    kind = color_kind(column, values)
    rng = np.random.default_rng(SEED)
    keep = np.flatnonzero(ok)
    if n_total > MAX_POINTS:
        keep = np.sort(rng.choice(keep, MAX_POINTS, replace=False))
    xy = xy[keep]
    values = values.iloc[keep].reset_index(drop=True)
    n = len(xy)
    order = rng.permutation(n)
    size = _marker_size(n)
    alpha = 1.0 if n < 5_000 else 0.7 if n < 50_000 else 0.5

    fig = _new_figure(6.4, 4.8)
    ax = fig.add_axes((0.03, 0.04, 0.64, 0.86))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1", fontsize=8, labelpad=2)
    ax.set_ylabel("UMAP 2", fontsize=8, labelpad=2)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    ax.set_title(_mpl_text(title, 80), fontsize=10, loc="left")
    scatter_kw = dict(s=size, linewidths=0, edgecolors="none", rasterized=True)

    na = values.isna().to_numpy(dtype=bool)
    if na.any():
        ax.scatter(xy[na, 0], xy[na, 1], color=NA_COLOUR, **scatter_kw)
    shuffled = order[~na[order]]

    info: dict[str, Any] = {
        "kind": kind,
        "n_shown": n,
        "n_total": n_total,
        "n_skipped": int((~ok).sum()),
    }
    if kind == "categorical":
        cats = _categories(values)
        colours = [tuple(map(float, c)) for c in categorical_palette(len(cats))]
        lookup = {c: i for i, c in enumerate(cats)}
        codes = np.array([lookup[v] for v in values.to_numpy(dtype=object)[shuffled]], dtype=int)
        rgba = np.asarray(colours, dtype=np.float64)[codes] if len(codes) else np.zeros((0, 4))
        rgba[:, 3] = alpha
        ax.scatter(xy[shuffled, 0], xy[shuffled, 1], c=rgba, **scatter_kw)
        info["n_values"] = len(cats)
        if len(cats) <= MAX_LEGEND:
            from matplotlib.lines import Line2D

            labels = [_mpl_text(c, 24 if len(cats) <= 12 else 13) for c in cats]
            if na.any():
                colours = [*colours, NA_COLOUR]
                labels.append("n/a")
            handles = [Line2D([], [], ls="", marker="o", ms=6, mfc=c, mec="none") for c in colours]
            fig.legend(
                handles,
                labels,
                loc="center left",
                bbox_to_anchor=(0.68, 0.47),
                fontsize=7,
                frameon=False,
                ncols=1 if len(labels) <= 12 else 2,
                title=_mpl_text(column),
                title_fontsize=8,
                handletextpad=0.2,
                columnspacing=0.6,
            )
        else:
            fig.text(0.70, 0.5, f"{len(cats)} categories\n(no legend)", fontsize=9, va="center")
    else:
        from napari_maeprobe.pl.colors import numeric_values

        vals = numeric_values(values)  # numbers however stored (categories of numbers too)
        finite = vals[np.isfinite(vals)]
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        distinct = np.unique(finite) if len(finite) else finite
        extend = "neither"
        if kind == "ordinal" and len(distinct):
            lo, hi = int(distinct.min()), int(distinct.max())
            steps = hi - lo + 1
            cmap = ListedColormap(ordinal_colors(steps))
            norm = BoundaryNorm(np.arange(lo - 0.5, hi + 1.0), steps)
        else:
            lo, hi = np.percentile(finite, [1, 99]) if len(finite) else (0.0, 1.0)
            if hi <= lo and len(finite):
                lo, hi = float(finite.min()), float(finite.max())
            if hi <= lo:
                hi = lo + 1.0
            below, above = bool((finite < lo).any()), bool((finite > hi).any())
            extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
                (below, above), "neither"
            )
            norm = Normalize(lo, hi)
        sc = ax.scatter(
            xy[shuffled, 0],
            xy[shuffled, 1],
            c=vals[shuffled],
            cmap=cmap,
            norm=norm,
            alpha=alpha,
            **scatter_kw,
        )
        cax = fig.add_axes((0.70, 0.14, 0.025, 0.66))
        cbar = fig.colorbar(sc, cax=cax, extend=extend)
        if cbar.solids is not None:
            cbar.solids.set(alpha=1.0)  # the bar opaque, whatever the points' alpha
        if isinstance(norm, BoundaryNorm):
            step = max(1, math.ceil((hi - lo + 1) / 12))
            cbar.set_ticks(np.arange(lo, hi + 1, step))
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label(_mpl_text(column), fontsize=8)
        info["n_values"] = len(distinct)
    _save_png(fig, path)
    return info


# --------------------------------------------------------------------------- diagnostics


_LABEL_COLUMNS = ("column", "covariate", "variable", "factor", "feature", "driver", "obs", "name")


def ami_series(table: pd.DataFrame) -> pd.Series | None:
    """AMI per column from a diagnostics table, or ``None`` when it has no AMI column.

    The AMI column is ``ami`` (any case) or a name with ``ami`` as a word (``ami_leiden``,
    ``AMI vs clusters``) or ``adjusted_mutual_info*``; the names come from a ``column`` /
    ``covariate`` / ``variable`` / ... column, else from a non-default index.
    """
    if table is None or len(table) == 0:
        return None
    names = [str(c) for c in table.columns]
    pick = next((i for i, c in enumerate(names) if c.lower() == "ami"), None)
    if pick is None:
        pick = next(
            (
                i
                for i, c in enumerate(names)
                if re.search(r"(^|[^a-z])ami([^a-z]|$)", c.lower())
                or c.lower().startswith("adjusted_mutual")
            ),
            None,
        )
    if pick is None:
        return None
    ami_col = table.columns[pick]
    label_col = next(
        (table.columns[i] for i, c in enumerate(names) if c.lower() in _LABEL_COLUMNS), None
    )
    if label_col is not None:
        labels = table[label_col].astype(str).to_numpy()
    elif not isinstance(table.index, pd.RangeIndex):
        labels = table.index.astype(str).to_numpy()
    else:
        texts = [
            c
            for c in table.columns
            if c != ami_col
            and (pd.api.types.is_object_dtype(table[c]) or pd.api.types.is_string_dtype(table[c]))
        ]
        labels = table[texts[0]].astype(str).to_numpy() if texts else table.index.astype(str)
    values = pd.to_numeric(table[ami_col], errors="coerce").to_numpy(dtype=np.float64)
    series = pd.Series(values, index=labels, name="ami")
    return series[np.isfinite(series.to_numpy())]


def _group(column: str) -> tuple[str, str]:
    from napari_maeprobe.schema import column_role

    for label, colour, members in _GROUPS:
        if column in members:
            return label, colour
    return _ROLE_GROUPS.get(column_role(column), _OTHER_GROUP)


def _all_groups() -> list[tuple[str, str]]:
    out = [(label, colour) for label, colour, _ in _GROUPS]
    out += [g for g in _ROLE_GROUPS.values() if g not in out]
    return out + [_OTHER_GROUP]


def drivers_png(path: Path, ami: pd.Series, level: str, labels_name: str = "") -> None:
    """A horizontal bar chart of AMI per column (largest on top), bars coloured by kind."""
    from matplotlib.patches import Patch

    ami = ami.sort_values(ascending=True).tail(MAX_BARS)
    n = len(ami)
    groups = [_group(c) for c in ami.index]
    present = set(groups)
    seen = [g for g in _all_groups() if g in present]
    top = 0.7 if len(seen) <= 4 else 0.9  # inches above the bars: title and legend rows
    height = 0.55 + top + 0.28 * n  # 0.55 below the bars: ticks and axis label
    fig = _new_figure(6.4, height)
    ax = fig.add_axes((0.27, 0.55 / height, 0.68, 0.28 * n / height))
    ax.barh(np.arange(n), ami.to_numpy(), color=[g[1] for g in groups], height=0.7)
    ax.set_yticks(np.arange(n), [_mpl_text(c, 30) for c in ami.index], fontsize=8)
    ax.set_ylim(-0.6, n - 0.4)
    lo = min(0.0, float(ami.min()) * 1.1) if n else 0.0
    ax.set_xlim(lo, 1.0)
    ax.axvline(0, color="black", lw=0.6)
    for i, v in enumerate(ami.to_numpy()):
        ax.text(max(v, 0) + 0.01, i, f"{v:.2f}", va="center", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    clusters = f"the {labels_name} clusters" if labels_name else "the clusters"
    ax.set_xlabel(_mpl_text(f"AMI (adjusted mutual information with {clusters})", 90), fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.legend(
        [Patch(color=c) for _, c in seen],
        [label for label, _ in seen],
        loc="upper center",
        ncols=min(len(seen), 4),
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.5, 1.0),
        title=_mpl_text(f"{level} level", 40),
        title_fontsize=8,
    )
    _save_png(fig, path)


# --------------------------------------------------------------------------- HTML pieces


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1400px;padding:1rem 2rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h2 small{font-weight:normal;color:#666;font-size:.65em}
.lead{color:#444;max-width:60rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
thead th{background:#f3f3f3}
td.num,table.data td{font-variant-numeric:tabular-nums}
table.facts th{background:#f7f7f7;white-space:nowrap}
.verdict{font-size:1.1rem;background:#fff8e1;border-left:4px solid #e6a100;padding:.5rem .8rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:1.2rem}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.82rem;color:#444;margin-top:.3rem}
figcaption code,p code{background:#f3f3f3;padding:0 .2rem}
.drivers{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}
.drivers figure{max-width:560px}.note{color:#777;font-style:italic}
nav a{margin-right:1rem}footer{margin-top:3rem;color:#888;font-size:.8rem}
"""


def _fmt(value: object) -> str:
    """A fact as short text: floats to 3 significant digits, sequences joined."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | np.ndarray):
        return ", ".join(_fmt(i) for i in list(value))
    s = str(value)
    return s if len(s) <= 300 else s[:299] + "…"


def _timings(facts: Mapping[str, Any]) -> tuple[str | None, set[str]]:
    """Seconds per stage from ``seconds`` / ``timings`` dicts or ``*_seconds`` keys."""
    stages: dict[str, float] = {}
    used: set[str] = set()
    for key in ("seconds", "timings", "timing", "stage_seconds", "seconds_per_stage"):
        if isinstance(facts.get(key), Mapping):
            used.add(key)
            for k, v in facts[key].items():
                if isinstance(v, int | float | np.number):
                    stages[str(k)] = float(v)
    for key, v in facts.items():
        key = str(key)
        if isinstance(v, int | float | np.number) and (
            key.endswith("_seconds") or key.startswith("seconds_")
        ):
            used.add(key)
            stages[key.removesuffix("_seconds").removeprefix("seconds_")] = float(v)
    if not stages:
        return None, used
    parts = [f"{k} {v:.1f} s" for k, v in stages.items()]
    if "total" not in stages and len(stages) > 1:
        parts.append(f"total {sum(stages.values()):.1f} s")
    return ", ".join(parts), used


def _facts_rows(
    facts: Mapping[str, Any],
    levels: Mapping[str, Any],
    segmentation: pd.DataFrame | None,
) -> list[tuple[str, str]]:
    """(label, escaped HTML) rows of the header table."""
    rows: list[tuple[str, str]] = []
    used: set[str] = set()

    def take(*keys: str) -> list[Any]:
        used.update(keys)
        return [facts.get(k) for k in keys]

    (model,) = take("model")
    if model is not None:
        rows.append(("Model", _e(_fmt(model))))
    weights, sha = take("weights", "weights_sha256")
    if weights is not None or sha:
        text = _e(_fmt(weights)) if weights is not None else ""
        if sha:
            text += f' <span title="{_e(sha)}">(sha256 <code>{_e(str(sha)[:12])}…</code>)</span>'
        rows.append(("Weights", text.strip()))
    (dim,) = take("embed_dim")
    if dim is not None:
        rows.append(("Embedding dimension", _e(_fmt(dim))))
    device, precision = take("device", "precision")
    if device is not None or precision is not None:
        text = " / ".join(_fmt(v) for v in (device, precision) if v is not None)
        rows.append(("Device / precision", _e(text)))
    crop, patch = take("crop_size", "patch_size")
    if crop is not None or patch is not None:
        text = " / ".join(
            f"{name} {' × '.join(map(str, v)) if isinstance(v, list | tuple) else _fmt(v)} px"
            for name, v in (("crop", crop), ("patch", patch))
            if v is not None
        )
        rows.append(("Crop / patch size", _e(text)))

    method, by, ref = take("normalization", "normalize_by", "normalize_reference")
    used.update(("normalization_hides", "model_standardizes_crops"))
    if method is not None:
        text = f"{method}, statistics per {by or 'image'}" + (
            f" from the {ref} images" if ref else ""
        )
        rows.append(("Normalisation", _e(text)))
    (n_images,) = take("n_images")
    if n_images is None and segmentation is not None and len(segmentation):
        n_images = len(segmentation)
    elif n_images is None and "global" in levels:
        obs = levels["global"].obs
        if {"dataset", "image"} <= set(obs.columns):
            n_images = len(obs[["dataset", "image"]].drop_duplicates())
    if n_images is not None:
        rows.append(("Images", _e(_fmt(n_images))))
    (n_cells,) = take("n_cells")
    if n_cells is None and segmentation is not None and "n_cells" in segmentation:
        n_cells = int(pd.to_numeric(segmentation["n_cells"], errors="coerce").fillna(0).sum())
    if n_cells is not None:
        text = _fmt(n_cells)
        if "global" in levels:
            text += f" ({levels['global'].n_obs} embedded)"
        rows.append(("Cells", _e(text)))
    elif "global" in levels:
        rows.append(("Cells embedded", _e(levels["global"].n_obs)))
    if levels:
        rows.append(
            ("Rows per level", _e(", ".join(f"{k} {v.n_obs:,}" for k, v in levels.items())))
        )
    ranks = []
    for k, v in levels.items():
        uns = getattr(v, "uns", {})
        r = uns.get("effective_rank")
        if r is None:  # the table as analysis left it: uns["maeprobe"]["analysis"][level]
            r = dict(dict(uns.get("maeprobe", {}) or {}).get("analysis", {}) or {})
            r = dict(r.get(k, {}) or {}).get("effective_rank")
        if isinstance(r, int | float | np.number | np.ndarray) and np.size(r) == 1:
            r = float(np.asarray(r).reshape(-1)[0])
            if np.isfinite(r):
                ranks.append(f"{k} {r:.1f}")
    if ranks:
        dims = f" of {_fmt(dim)} dimensions" if dim is not None else ""
        rows.append(("Effective rank", _e(", ".join(ranks) + dims)))
    timing, timing_keys = _timings(facts)
    used |= timing_keys
    if timing:
        rows.append(("Timings", _e(timing)))
    version_keys = ("version", "package_version", "maeprobe_version")
    used.update(version_keys)
    version = next((facts[k] for k in version_keys if facts.get(k) is not None), None)
    if version is None:
        from napari_maeprobe import __version__ as version
    rows.append(("napari-maeprobe", _e(version)))
    for key, value in facts.items():
        if key not in used and key not in HIDDEN_FACTS and value is not None:
            rows.append((_e(str(key).replace("_", " ")), _e(_fmt(value))))
    return rows


def _table_html(table: pd.DataFrame, decimals: int = 3) -> str:
    """A pandas table as escaped HTML, floats to ``decimals`` places, lists joined."""
    df = table.copy()
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_float_dtype(s.dtype) and not isinstance(s.dtype, np.dtype):
            df[col] = s.astype("float64")  # nullable Float64 -> float for float_format
        elif s.dtype == object:
            df[col] = s.map(lambda v: _fmt(v) if isinstance(v, list | tuple | dict) else v)
    keep_index = not isinstance(df.index, pd.RangeIndex)
    return df.to_html(
        index=keep_index,
        escape=True,
        na_rep="–",
        border=0,
        classes="data",
        float_format=lambda v: f"{v:.{decimals}f}",
    )


def _caption(level: str, column: str, info: dict[str, Any]) -> str:
    """Escaped caption: what the colouring tells, then how many points are shown."""
    text = CAPTIONS.get(column, f"Coloured by {column}.")
    extra = f"{info['n_shown']:,} points"
    if info["n_shown"] < info["n_total"]:
        extra = f"a random {info['n_shown']:,} of {info['n_total']:,} points"
    if info["n_skipped"]:
        extra += f" ({info['n_skipped']:,} rows not analysed are left out)"
    if info["kind"] == "categorical":
        extra += f", {info['n_values']} categories"
        if info["n_values"] > MAX_LEGEND:
            extra += " (too many for a legend)"
    extra += "."
    return f"<strong>{_e(level)} · {_e(column)}</strong> — {_e(text)} {_e(extra)}"


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(quote(src))}" alt="{_e(alt)}" loading="lazy">'


def _get(obj: object, name: str) -> Any:
    """An attribute of a drivers object, or a key of a dict standing in for one."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _ordered_levels(levels: Mapping[str, Any]) -> list[str]:
    known = [k for k in LEVEL_ORDER if k in levels]
    return known + sorted(k for k in levels if k not in LEVEL_ORDER)


# --------------------------------------------------------------------------- the report


def write_report(
    out_dir: Path,
    levels: dict[str, anndata.AnnData],
    drivers: dict[str, object] | None,
    facts: dict,
    segmentation: pd.DataFrame | None = None,
    colour_by: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and the PNGs it shows; return the page's path.

    ``levels``: level name -> AnnData (``obs`` columns, ``obsm["X_umap"]`` with NaN rows for
    rows not analysed, optional ``uns["effective_rank"]`` and ``uns["maeprobe"]`` facts).
    ``drivers``: level -> object with ``.table`` (DataFrame, an AMI column per obs column) and
    ``.verdict`` (str); ``None``: each level's ``uns["maeprobe_drivers"]`` (as analysis left
    it). ``facts``: model and run facts for the header. ``colour_by``: the UMAP colourings
    (default: :data:`DEFAULT_COLOUR_BY` and the drivers each level's diagnostics found).
    ``progress`` (optional) gets one line per figure.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if drivers is None:
        from napari_maeprobe.table import drivers as stored_drivers

        drivers = {lvl: stored_drivers(a, lvl) for lvl, a in levels.items()}
    order = _ordered_levels(levels)
    merged: dict[str, Any] = {}
    for name in order:
        uns_facts = getattr(levels[name], "uns", {}).get("maeprobe")
        if isinstance(uns_facts, Mapping):
            for k, v in uns_facts.items():
                merged.setdefault(str(k), v)
    merged.update(facts or {})

    from napari_maeprobe.pp.normalization_groups import describe_normalization

    hides = merged.get("normalization_hides") or describe_normalization(
        str(merged.get("normalization", "percentile")), str(merged.get("normalize_by") or "image"),
        merged.get("normalize_reference"), bool(merged.get("model_standardizes_crops")),
    )  # fmt: skip
    sections: list[str] = []
    for level in order:
        sections.append(_level_section(out_dir, level, levels[level], drivers, colour_by,
                                       progress, hides))  # fmt: skip

    title = f"maeprobe report — {merged.get('model', 'embeddings')}"
    facts_html = "\n".join(
        f"<tr><th>{label}</th><td>{value}</td></tr>"
        for label, value in _facts_rows(merged, {k: levels[k] for k in order}, segmentation)
    )
    nav = " ".join(f'<a href="#level-{_e(_safe_name(k))}">{_e(k)} level</a>' for k in order)
    if segmentation is not None and len(segmentation):
        seg_html = (
            '<section id="segmentation"><h2>Segmentation</h2>\n'
            + _table_html(segmentation, decimals=3)
            + "</section>"
        )
    else:
        seg_html = ""
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>maeprobe report</h1>
<p class="lead">Is the structure in these embeddings biology, marker channel or patch position?
Each level below has a verdict, the diagnostics (how much the clusters follow each column:
AMI near 1 means the clusters are that column, near 0 that they ignore it) and UMAP maps of the
same points in several colourings. Structure that follows <code>channel</code>,
<code>patch_row</code> or <code>patch_col</code> is technical, not biological.</p>
<table class="facts">
{facts_html}
</table>
<nav>{nav}</nav>
</header>
{seg_html}
{"".join(sections)}
<footer>Written by napari-maeprobe. The PNG figures lie next to this page.</footer>
</body>
</html>
"""
    path = out_dir / "report.html"
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path


def drivers_found(table: pd.DataFrame | None, limit: int = 4) -> list[str]:
    """The columns the diagnostics name as drivers (an effect beyond noise, highest AMI
    first; tables without an ``effect`` column: AMI at least 0.05), at most ``limit``."""
    if not isinstance(table, pd.DataFrame) or not len(table) or "column" not in table:
        return []
    t = table.copy()
    t["ami"] = pd.to_numeric(t.get("ami"), errors="coerce")
    if "effect" in t:
        t = t[t["effect"].astype(str).isin(["strong", "weak"])]
    else:
        t = t[t["ami"] >= 0.05]
    return [str(c) for c in t.sort_values("ami", ascending=False)["column"].head(limit)]


def _analysis_summary(adata: anndata.AnnData, level: str) -> Mapping[str, Any]:
    uns = dict(getattr(adata, "uns", {}).get("maeprobe", {}) or {})
    return dict(dict(uns.get("analysis", {}) or {}).get(level, {}) or {})


def _level_section(
    out_dir: Path,
    level: str,
    adata: anndata.AnnData,
    drivers: Mapping[str, object],
    colour_by: tuple[str, ...] | None,
    progress: Callable[[str], None] | None,
    hides: str = "",
) -> str:
    """Draw one level's figures and return its HTML section."""
    obs: pd.DataFrame = adata.obs
    parts = [
        f'<section id="level-{_e(_safe_name(level))}">',
        f"<h2>{_e(level)} level <small>{_e(LEVEL_TEXT.get(level, ''))} · "
        f"{adata.n_obs:,} rows</small></h2>",
    ]
    drv = drivers.get(level) if drivers else None
    verdict, table = _get(drv, "verdict"), _get(drv, "table")
    if verdict:
        parts.append(f'<p class="verdict"><strong>{_e(verdict)}</strong></p>')
    if hides:
        parts.append(f'<p class="note">Normalisation: {_e(hides)}.</p>')
    summary = _analysis_summary(adata, level)
    content = summary.get("channel_content")
    if isinstance(content, Mapping) and content.get("line"):
        parts.append(f'<p class="verdict">{_e(content["line"])}</p>')
    parts.append(_condition_batch_html(summary.get("condition_batch")))
    if isinstance(table, pd.DataFrame) and len(table):
        parts.append("<h3>Diagnostics</h3>")
        parts.append('<div class="drivers">')
        ami = ami_series(table)
        if ami is not None and len(ami):
            name = f"drivers_{_safe_name(level)}.png"
            drivers_png(out_dir / name, ami, level, str(_get(drv, "labels_name") or ""))
            if progress:
                progress(name)
            parts.append(
                f"<figure>{_img(name, f'AMI per column, {level} level')}<figcaption>How much "
                "the clusters follow each column (AMI). Orange bars (position in the crop) or "
                "a purple bar (marker channel) on top mean technical structure.</figcaption>"
                "</figure>"
            )
        shown = [c for c in REPORT_COLUMNS if c in table.columns] or list(table.columns)
        notes = [f"<code>{_e(c)}</code>: {_e(t)}" for c, t in TABLE_HELP.items() if c in shown]
        skipped = _get(drv, "skipped")
        if isinstance(skipped, Mapping) and skipped:
            left = "; ".join(f"{_e(c)} ({_e(r)})" for c, r in skipped.items())
            notes.append(f"Columns not tested: {left}")
        help_html = f'<p class="note">{"<br>".join(notes)}</p>' if notes else ""
        parts.append(f"<div>{_table_html(table[shown], decimals=3)}{help_html}</div></div>")
    else:
        parts.append('<p class="note">No diagnostics for this level.</p>')

    if colour_by is None:  # the usual maps, then the drivers found, then condition and batch
        extra = drivers_found(table if isinstance(table, pd.DataFrame) else None)
        cb = summary.get("condition_batch")
        if isinstance(cb, Mapping):
            extra += [str(cb[k]) for k in ("condition", "batch") if cb.get(k)]
        colour_by = tuple(dict.fromkeys([*DEFAULT_COLOUR_BY, *extra]))
    xy = adata.obsm["X_umap"] if "X_umap" in getattr(adata, "obsm", {}) else None
    figures = []
    if xy is not None:
        xy = np.asarray(xy, dtype=np.float64)
        ok = np.isfinite(xy[:, :2]).all(axis=1) if xy.ndim == 2 and xy.shape[1] >= 2 else None
        for column in colour_by:
            if ok is None or not ok.any() or column not in obs.columns:
                continue
            values = obs[column].reset_index(drop=True)
            if values[ok].nunique(dropna=True) < 2:
                continue
            name = f"umap_{_safe_name(level)}_{_safe_name(column)}.png"
            info = umap_png(
                out_dir / name, xy, values, column, f"{level} level, coloured by {column}"
            )
            if progress:
                progress(name)
            figures.append(
                f"<figure>{_img(name, f'UMAP of the {level} level coloured by {column}')}"
                f"<figcaption>{_caption(level, column, info)}</figcaption></figure>"
            )
    parts.append("<h3>UMAP</h3>")
    if figures:
        parts.append('<div class="grid">\n' + "\n".join(figures) + "\n</div>")
    elif xy is None:
        parts.append('<p class="note">No UMAP coordinates for this level.</p>')
    else:
        parts.append('<p class="note">No column varies at this level; nothing to colour by.</p>')
    parts.append("</section>\n")
    return "\n".join(parts)


def _condition_batch_html(result: object) -> str:
    """The batch-versus-biology comparison (tl.condition_batch) as a line and a table."""
    if not isinstance(result, Mapping):
        return ""
    parts = ["<h3>Batch versus biology</h3>"]
    line = result.get("summary") or result.get("line")
    if line:
        parts.append(f'<p class="verdict">{_e(line)}</p>')
    rows = result.get("table")
    if isinstance(rows, list) and rows:
        parts.append(_table_html(pd.DataFrame.from_records(rows), decimals=3))
    for note in result.get("notes", []) or []:
        parts.append(f'<p class="note">{_e(note)}</p>')
    return "\n".join(parts)


def report_store(store, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """``report.html`` for an analysed store (``maeprobe report STORE``): every level's facts,
    verdict, diagnostics, batch-versus-biology comparison and UMAPs, as the demo writes it."""
    from napari_maeprobe.table import read_level

    analysed = [lvl for lvl in store.levels() if lvl in store.analysed_levels()]
    if not analysed:
        from napari_maeprobe.errors import MaeprobeInputError

        raise MaeprobeInputError(
            f"{store.path} has not been analysed", f"run `maeprobe analyze {store.path}` first"
        )
    levels = {lvl: read_level(store, lvl) for lvl in analysed}
    facts = {"store": str(store.path), "n_images": len(store.image_names())}
    left = [lvl for lvl in store.levels() if lvl not in analysed]
    if left:
        facts["not analysed"] = (
            f"{', '.join(left)} level(s): maeprobe analyze {store.path} --levels {','.join(left)}"
        )
    return write_report(out_dir, levels, None, facts, segmentation=None, progress=progress)
