"""Cell segmentation: Cellpose (3.x ``cyto3`` and 4.x ``cpsam`` APIs) when its weights are on the
machine, and a built-in method that needs no weights (Otsu on the nucleus channel,
distance-transform watershed, expansion to whole cells) so that the pipeline works offline.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from napari_maeprobe.errors import MaeprobeInputError, NoCellsFoundError, WeightsNotFoundError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.pp.preprocessing import check_finite, normalize

Method = Literal["auto", "cellpose", "builtin"]

#: a name token: not glued to other letters (digits may follow: "DNA1", "Hoechst33342")
_W0, _W1 = r"(?<![a-z])", r"(?![a-z])"
#: nucleus stains and markers, strongest evidence first (so "DNA" wins over "H3K27Ac"); whole
#: tokens only, so "AR", "PI3K", "PH3" (a mitosis marker), "nucleolin" or "NUP" never match
NUCLEUS_PATTERNS = (
    _W0 + r"(dna|dapi|hoechst|draq\d?|sytox|red ?dot\d?|to-?pro-?\d?|propidium iodide|"
    r"nuc|nuclei|nucleus|nuclear)" + _W1,
    r"(?<![a-z0-9])pi(?![a-z0-9])|(?<![a-z])ir ?\(?19[13]\)?(?!\d)|(?<!\d)19[13] ?ir(?![a-z])",
    _W0 + r"(histone|hh3|h3|h3k\d+\w*)" + _W1,
)
#: whole-cell / cytoplasm / membrane stains, best first
CELL_PATTERNS = (
    r"cell ?body|cytopl|membrane|agp|wga|phalloidin|actin|cytokeratin|e-?cad|cd45|pan-?ck",
    r"tubulin|mts|^er$|concanavalin|calreticulin|ybx1|rna|mito",
)
THRESHOLD_DEFAULT = "otsu"
#: seeds: h-maxima of the (smoothed) distance transform, h = SEED_H x nucleus diameter, in 2D
#: and 3D alike. (3D once needed 0.25: the diameter estimate counted debris and gave 5 px for
#: 41 px nuclei. With debris left out, 0.05 / 0.10 / 0.15 give these matched objects over all
#: references of benchmarks/bench_segmentation.py: 246 / 243 / 225.)
SEED_H = 0.05
DIST_SIGMA = 0.5
#: whole cells: nuclei grown by GROW x nucleus diameter where the cell stain does not mark the
#: cells, and through the cell-stain foreground up to REACH x the diameter where it does
#: (Cell Painting cells vs CellProfiler: REACH 0.5 -> 16 of 31 matched, 1.0 -> 25, 1.5 and
#: 2.5 -> 25: the foreground, not the reach, then bounds the cells)
GROW = 0.5
REACH = 1.0
#: when the cell stain's Otsu foreground misses the cells (a bright-spot marker: 21% of the
#: HPA nuclei covered), the looser Li threshold is tried before growing blindly (87% there)
CELL_FALLBACK_THRESHOLDS = ("li",)
#: foreground/background separation below which an image has no cells: measured 2.6 on a
#: background-only Cell Painting crop and on pure noise, 4.3 to 20 on every bundled image
MIN_CONTRAST = 3.5
#: second seeding pass on intensity blobs (LoG at LOG_SIGMA x the median found-nucleus diameter):
#: splits nuclei that hold >= 2 blobs and adds dim nuclei that the global threshold missed
#: (inside a looser TISSUE_THRESHOLD foreground, at least NEW_GAP diameters from found nuclei).
#: On the IMC regions it lifts the match with the DeepCell masks from 0.24 to 0.41.
LOG_SIGMA = 0.25
PEAK_DIST = 0.5
PEAK_MIN = 0.1
NEW_GAP = 0.5
TISSUE_THRESHOLD = "li"
BRIGHTFIELD = re.compile(r"bright|^bf$|phase|dic", re.IGNORECASE)


class UnusableImageError(MaeprobeInputError):
    """One image's pixels cannot be used (unreadable, NaNs): that image is skipped, not the run."""


#: errors that concern one image only: a batch reports the image and goes on with the others
SKIPPABLE = (NoCellsFoundError, UnusableImageError)


@dataclass
class Segmentation:
    """Instance labels of one image and how they were made."""

    labels: np.ndarray
    method: str
    nucleus_channel: str
    cell_channel: str | None
    notes: list[str] = field(default_factory=list)
    #: how the nucleus channel was chosen: "as given", "by name", "by content (...)"
    nucleus_choice: str = "as given"

    @property
    def n_cells(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0


def pick_channel(
    names: list[str], patterns: tuple[str, ...], exclude: set[int] = frozenset()
) -> int | None:
    """Index of the first channel name matching the patterns, in pattern priority order."""
    for pattern in patterns:
        rx = re.compile(pattern, re.IGNORECASE)
        for i, name in enumerate(names):
            if i not in exclude and rx.search(name):
                return i
    return None


#: content choice: a channel's Otsu objects on a view at most CONTENT_SIDE px across
CONTENT_SIDE = 512
#: foreground cover below which a channel marks too few cells to be the nucleus stain (a
#: mitosis marker: 0.007 of the ExampleHuman field; nucleus stains 0.04 to 0.5 on every sample)
CONTENT_MIN_COVER = 0.03


def nucleus_likeness(plane: np.ndarray) -> float:
    """How much a channel's foreground looks like nuclei, 0 (not at all) to 1.

    Nuclei are compact, convex, filled, similar-size blobs covering a moderate part of the
    image. Score = area-weighted mean solidity of the Otsu objects x their filled fraction
    (rims such as a nuclear-pore stain are hollow) x exp(-spread of log areas) x a cover term
    (too little cover: a marker of few cells). Computed on a view at most
    :data:`CONTENT_SIDE` px across (z-stacks: their maximum projection), so it is cheap and
    does not depend on the image size.
    """
    from skimage import filters, measure, transform

    x = np.asarray(plane, np.float32)
    if x.ndim == 3:
        x = x.max(axis=0)
    f = max(1, int(np.ceil(max(x.shape) / CONTENT_SIDE)))
    if f > 1:
        x = transform.downscale_local_mean(x, (f, f))
    if not np.isfinite(x).all():
        return 0.0
    lo, hi = np.percentile(x, [1, 99.8])
    if hi <= lo:
        return 0.0
    s = ndimage.gaussian_filter(np.clip((x - lo) / (hi - lo), 0, 1), 1.0)
    if np.ptp(s) == 0:
        return 0.0
    fg = s > filters.threshold_otsu(s)
    filled = ndimage.binary_fill_holes(fg)
    lab, n = ndimage.label(filled)
    if n == 0:
        return 0.0
    props = [p for p in measure.regionprops(lab) if p.area >= 9]
    if not props:
        return 0.0
    area = np.array([p.area for p in props], float)
    solidity = np.array([p.solidity for p in props])
    big = area >= 0.25 * np.median(area)  # debris does not count
    w = area[big]
    spread = float(np.subtract(*np.percentile(np.log(w), [75, 25]))) if w.size > 1 else 0.0
    cover = float(filled.mean())
    fill = float(fg.sum()) / float(filled.sum())
    return float(
        np.average(solidity[big], weights=w)
        * fill
        * np.exp(-spread)
        * min(1.0, cover / CONTENT_MIN_COVER)
    )


def choose_nucleus_channel(
    image: MicroscopyImage, data: np.ndarray | None = None
) -> tuple[int, str]:
    """The nucleus channel: by name (:data:`NUCLEUS_PATTERNS`), else by content.

    Returns the index and how it was chosen, in words (goes into the notes and the CLI's
    output): ``"by name"`` or ``"by content (nucleus-likeness 0.70; next 'c2' 0.41)"``.
    Brightfield-named channels are never chosen by content.
    """
    names = image.channel_names
    i = pick_channel(names, NUCLEUS_PATTERNS)
    if i is not None:
        return i, "by name"
    if len(names) == 1:
        return 0, "the only channel"
    data = image.to_numpy() if data is None else data
    scores = [
        -1.0 if BRIGHTFIELD.search(n) else nucleus_likeness(data[c]) for c, n in enumerate(names)
    ]
    order = np.argsort(scores)[::-1]
    best, nxt = int(order[0]), int(order[1])
    return best, (
        f"by content, no name looks like a nucleus stain (nucleus-likeness {scores[best]:.2f}; "
        f"next '{names[nxt]}' {max(scores[nxt], 0):.2f}; set the nucleus channel to override)"
    )


#: images scored per channel set when choosing the nucleus channel by content for a run
RUN_CONTENT_IMAGES = 3


def choose_nucleus_channel_for_run(
    images: list[MicroscopyImage],
) -> dict[tuple[str, ...], tuple[int, str]]:
    """One nucleus channel per channel set of a run: ``{channel names: (index, how)}``.

    Names decide when they can; otherwise the nucleus-likeness summed over the first
    :data:`RUN_CONTENT_IMAGES` readable images of that channel set, so every image of a run
    uses the same channel and the choice is said once, not once per image.
    """
    groups: dict[tuple[str, ...], list[MicroscopyImage]] = {}
    for im in images:
        groups.setdefault(tuple(im.channel_names), []).append(im)
    out = {}
    for names, ims in groups.items():
        i = pick_channel(list(names), NUCLEUS_PATTERNS)
        if i is not None or len(names) == 1:
            out[names] = (i or 0, "by name" if i is not None else "the only channel")
            continue
        total, used = np.zeros(len(names)), 0
        for im in ims:
            if used == RUN_CONTENT_IMAGES:
                break
            try:
                data = im.to_numpy()
            except Exception:  # an unreadable image is reported when it is segmented
                continue
            total += [nucleus_likeness(data[c]) for c in range(len(names))]
            used += 1
        total[[bool(BRIGHTFIELD.search(n)) for n in names]] = -1.0
        order = np.argsort(total)[::-1]
        best, nxt = int(order[0]), int(order[1])
        k = max(used, 1)
        out[names] = (best, (
            f"by content, no name looks like a nucleus stain (nucleus-likeness "
            f"{total[best] / k:.2f}; next '{names[nxt]}' {max(total[nxt], 0) / k:.2f}; "
            f"over {used} image(s); set the nucleus channel to override)"
        ))  # fmt: skip
    return out


def _channel_index(image: MicroscopyImage, channel: str | int | None) -> int | None:
    if channel is None:
        return None
    if isinstance(channel, int) or str(channel).isdigit():
        i = int(channel)
        if not 0 <= i < image.n_channels:
            raise MaeprobeInputError(
                f"{image.name}: channel {i} does not exist (the image has {image.n_channels})",
                f"use one of {', '.join(image.channel_names)}",
            )
        return i
    from napari_maeprobe.io.channels import resolve_channel_names

    return resolve_channel_names(image, [str(channel)])[0][0]


# --------------------------------------------------------------------------- built-in


#: debris: objects whose inscribed diameter is under DEBRIS x the typical one (area-weighted)
DEBRIS = 0.3


def _estimate_nucleus_diameter(mask: np.ndarray, rel: np.ndarray | None = None) -> float:
    """Typical nucleus diameter (pixels of the finest axis) of a foreground mask.

    Debris is left out by its inscribed diameter (twice the largest distance to the
    background): under :data:`DEBRIS` x the area-weighted median inscribed diameter. Clumps of
    touching nuclei keep about one nucleus's inscribed diameter, so they are not taken for
    debris, and counting debris no longer drags the estimate down (it did when specks
    outnumbered nuclei: 4.4 px for 170 px HPA nuclei). The diameter is then that of the
    median object among those no larger than twice the median (single nuclei, not clumps).
    """
    lab, n = ndimage.label(mask)
    if n == 0:
        return 0.0
    areas = np.bincount(lab.ravel())[1:].astype(float)
    if rel is not None:
        areas = areas * float(np.prod(rel))  # in pixels of the finest axis
    edt = ndimage.distance_transform_edt(mask, sampling=rel)
    inscribed = 2.0 * np.asarray(ndimage.maximum(edt, lab, index=np.arange(1, n + 1)))
    order = np.argsort(inscribed)
    cum = np.cumsum(areas[order]) / areas.sum()
    typical = inscribed[order][min(int(np.searchsorted(cum, 0.5)), n - 1)]
    areas = areas[(inscribed >= DEBRIS * typical) & (areas >= 4)]
    if areas.size == 0:
        return 0.0
    area = float(np.median(areas[areas <= np.median(areas) * 2]))
    return (
        2.0 * (area / np.pi) ** (1 / 2)
        if mask.ndim == 2
        else 2.0 * (3 * area / (4 * np.pi)) ** (1 / 3)
    )


THRESHOLDS = ("otsu", "li", "triangle")


def _threshold(image: np.ndarray, method: str) -> float:
    from skimage import filters

    if method not in THRESHOLDS:
        raise MaeprobeInputError(
            f"unknown threshold {method!r}", f"use one of {', '.join(THRESHOLDS)}"
        )
    return float(getattr(filters, f"threshold_{method}")(image))


def _contrast(smooth: np.ndarray, fg: np.ndarray) -> float:
    """How far the thresholded foreground stands above the background, in background SDs."""
    bg = smooth[~fg]
    if fg.all() or bg.size == 0:
        return 0.0
    return float((smooth[fg].mean() - bg.mean()) / (bg.std() + 1e-12))


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    return np.where(small[labels], 0, labels) if small.any() else labels


def segment_builtin(
    nucleus: np.ndarray,
    cell: np.ndarray | None = None,
    nucleus_diameter: float | None = None,
    expand: float | None = None,
    spacing: tuple[float, ...] | None = None,
    threshold: str = THRESHOLD_DEFAULT,
) -> np.ndarray:
    """Segment cells without learned weights.

    ``nucleus`` and ``cell`` are normalised 2D or 3D intensity images. Nuclei: Gaussian
    smoothing, a global threshold (``threshold``), hole filling, then a watershed on the
    distance transform seeded at its h-maxima (splits touching nuclei without
    over-splitting textured ones; h from the estimated nucleus diameter, which leaves debris
    out), then a second pass on intensity blobs. Cells: see :func:`_grow_cells` (through the
    cell-signal foreground where it marks the cells, else by ``expand`` pixels). Without
    ``cell`` the nuclei are returned as the objects.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    nd = nucleus.ndim
    spacing = tuple(spacing) if spacing is not None else (1.0,) * nd
    rel = np.asarray(spacing) / min(spacing)
    smooth = ndimage.gaussian_filter(nucleus.astype(np.float32), sigma=1.0 / rel)
    if np.ptp(smooth) == 0:
        raise NoCellsFoundError(
            "the nucleus channel is empty (all pixels are equal)",
            "pick a nucleus channel with signal",
        )
    fg = smooth > _threshold(smooth, threshold)
    contrast = _contrast(smooth, fg)
    if contrast < MIN_CONTRAST:
        raise NoCellsFoundError(
            f"no nuclei stand out from the background (the brightest part is only {contrast:.1f} "
            f"background standard deviations above the rest; cells give 4 or more)",
            "check that the image shows cells and that the nucleus channel is the right one",
        )
    fg = (
        ndimage.binary_fill_holes(fg)
        if nd == 2
        else np.stack([ndimage.binary_fill_holes(s) for s in fg])
    )
    diameter = nucleus_diameter or _estimate_nucleus_diameter(fg, rel)
    if diameter < 2:
        raise NoCellsFoundError(
            "no nuclei stand out from the background", "check the nucleus channel"
        )
    volume = np.pi * (diameter / 2) ** 2 if nd == 2 else 4 / 3 * np.pi * (diameter / 2) ** 3
    min_size = int(max(4, 0.15 * volume))
    cc, _ = ndimage.label(fg)
    fg = _remove_small(cc, min_size) > 0
    if not fg.any():
        raise NoCellsFoundError(
            "no nuclei stand out from the background", "check the nucleus channel"
        )
    dist = ndimage.distance_transform_edt(fg, sampling=rel)  # in pixels of the finest axis
    dist = ndimage.gaussian_filter(dist, sigma=DIST_SIGMA / rel)
    h = SEED_H * diameter
    markers, _ = ndimage.label(h_maxima(dist, max(0.5, h)))
    nuclei = watershed(-dist, markers, mask=fg)
    nuclei = _remove_small(nuclei, min_size)
    nuclei = _add_intensity_seeds(nucleus, smooth, fg, nuclei, rel, min_size)
    if cell is None:  # a nucleus stain only: the nuclei are the objects
        cells = nuclei
    else:
        cells = _grow_cells(nuclei, cell, diameter, expand, rel, threshold)
    cells, _, _ = _relabel(cells)
    if cells.max() == 0:
        raise NoCellsFoundError(
            "no cells found", "check the nucleus channel or pass nucleus_diameter"
        )
    return cells


def _grow_cells(nuclei, cell, diameter, expand, rel, threshold) -> np.ndarray:
    """Nuclei grown into whole cells.

    Where the cell signal marks the cells (its foreground covers at least 80% of the nuclei),
    each nucleus takes the foreground pixels nearest to it, reached through the foreground
    (a watershed on the distance to the nuclei, like CellProfiler's propagation without the
    intensity term), up to ``expand`` pixels (default :data:`REACH` x the nucleus diameter).
    Otherwise (a marker present in few cells, e.g. cytokeratin in IMC, would cut cells away)
    the nuclei are grown by ``expand`` (default :data:`GROW` x the diameter) regardless of it.
    """
    from skimage.segmentation import expand_labels, watershed

    grown = float(expand if expand is not None else GROW * diameter)
    if np.ptp(cell) == 0:
        return expand_labels(nuclei, distance=grown)
    csmooth = ndimage.gaussian_filter(cell.astype(np.float32), sigma=1.0 / rel)
    for method in dict.fromkeys((threshold, *CELL_FALLBACK_THRESHOLDS)):
        cell_fg = csmooth > _threshold(csmooth, method)
        if cell_fg[nuclei > 0].mean() >= 0.8:
            reach = float(expand if expand is not None else REACH * diameter)
            dist = ndimage.distance_transform_edt(nuclei == 0, sampling=rel)
            return watershed(dist, nuclei, mask=(cell_fg & (dist <= reach)) | (nuclei > 0))
    return expand_labels(nuclei, distance=grown)


def _add_intensity_seeds(nucleus, smooth, fg, nuclei, rel, min_size) -> np.ndarray:
    """Split nuclei that hold two or more intensity blobs and add dim nuclei the threshold missed.

    Touching nuclei without a neck between them defeat the distance-transform seeds, and a
    global threshold drops dim nuclei in dense tissue. Blobs are peaks of a scale-normalised
    Laplacian of Gaussian at a quarter of the median *found* nucleus diameter; nuclei with zero
    or one blob keep their shape.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    nd = nucleus.ndim
    areas = np.bincount(nuclei.ravel())
    areas[0] = 0
    ids = np.nonzero(areas)[0]
    if ids.size == 0:
        return nuclei
    med = float(np.median(areas[ids]))
    d = 2 * (med / np.pi) ** 0.5 if nd == 2 else 2 * (3 * med / (4 * np.pi)) ** (1 / 3)
    sigma = LOG_SIGMA * d / rel
    log = (
        -ndimage.gaussian_laplace(nucleus.astype(np.float32), sigma=sigma)
        * float(np.mean(sigma)) ** 2
    )
    loose = smooth > _threshold(smooth, TISSUE_THRESHOLD)
    mask = (_remove_small(ndimage.label(loose)[0], min_size) > 0) | fg
    pos = log[mask & (log > 0)]
    if pos.size == 0:
        return nuclei
    peaks = peak_local_max(
        log,
        min_distance=max(1, int(round(PEAK_DIST * d))),
        threshold_abs=PEAK_MIN * float(np.percentile(pos, 95)),
        labels=mask.astype(np.int32),
        exclude_border=False,
    )
    if len(peaks) == 0:
        return nuclei
    at = nuclei[tuple(peaks.T)]
    per_obj = np.bincount(at, minlength=areas.size)
    split = per_obj >= 2
    split[0] = False
    dist_out = ndimage.distance_transform_edt(nuclei == 0, sampling=rel)
    new = split[at] | ((at == 0) & (dist_out[tuple(peaks.T)] >= NEW_GAP * d))
    if not new.any():
        return nuclei
    kept = np.where(split[nuclei], 0, nuclei)
    off = int(nuclei.max())
    markers = kept.copy()
    markers[tuple(peaks[new].T)] = off + 1 + np.arange(int(new.sum()))
    ws = watershed(-smooth, markers, mask=mask | (nuclei > 0))
    out = np.where(kept > 0, kept, np.where(ws > off, ws, 0))
    return _remove_small(out, min_size)


def _relabel(labels: np.ndarray):
    from skimage.segmentation import relabel_sequential

    out, fw, inv = relabel_sequential(labels)
    return out.astype(np.int32), fw, inv


# --------------------------------------------------------------------------- Cellpose


def cellpose_version() -> int | None:
    """Major version of the installed Cellpose, or ``None`` when it is not installed."""
    if importlib.util.find_spec("cellpose") is None:
        return None
    from importlib.metadata import version

    return int(version("cellpose").split(".")[0])


def cellpose_model_dir() -> Path:
    """Where Cellpose looks for weights: ``CELLPOSE_LOCAL_MODELS_PATH`` or ~/.cellpose/models."""
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


def default_cellpose_model(major: int | None = None) -> str:
    """The built-in model of the installed Cellpose: ``cyto3`` (3.x) or ``cpsam`` (4.x)."""
    major = cellpose_version() if major is None else major
    return "cpsam" if (major or 0) >= 4 else "cyto3"


def cellpose_weights_available(weights: str | Path | None = None) -> tuple[bool, str]:
    """Whether Cellpose can run offline, and if not why (with the file to put where)."""
    major = cellpose_version()
    if major is None:
        return False, "Cellpose is not installed (pip install 'napari-maeprobe[cellpose]')"
    if weights is not None and Path(weights).is_file():
        return True, f"Cellpose {major}.x with weights {weights}"
    name = str(weights) if weights is not None else default_cellpose_model(major)
    path = cellpose_model_dir() / name
    if path.is_file():
        return True, f"Cellpose {major}.x with weights {path}"
    return False, (
        f"Cellpose weights '{name}' are not at {path}; download https://www.cellpose.org/models/"
        f"{name} on a machine with internet and copy it to {path} (or set "
        "CELLPOSE_LOCAL_MODELS_PATH, or pass a weights file)"
    )


def segment_cellpose(
    nucleus: np.ndarray,
    cell: np.ndarray | None,
    weights: str | Path | None = None,
    diameter: float | None = None,
    device: str = "auto",
    download: bool = True,
) -> np.ndarray:
    """Run Cellpose on a nucleus (+ cell) channel, 2D or 3D, through its Python API.

    ``weights``: a local weights file, or a model name (``cyto3``/``cpsam``); by default the
    installed version's built-in model. Without the file, Cellpose is allowed to download it
    (``download=True``); when that fails the error says which file to put where.
    """
    major = cellpose_version()
    if major is None:
        raise MaeprobeInputError(
            "Cellpose is not installed",
            "pip install 'napari-maeprobe[cellpose]' or use method='builtin'",
        )
    from cellpose import models

    ok, why = cellpose_weights_available(weights)
    if not ok and not download:
        raise WeightsNotFoundError(why.split("; ")[0], why.split("; ", 1)[1])
    import torch

    from napari_maeprobe.embed.engine import resolve_device

    dev = torch.device(resolve_device(device))  # the one rule for device 'auto'
    gpu = dev.type != "cpu"
    local = weights is not None and Path(weights).is_file()
    name = str(weights) if local else (str(weights) if weights else default_cellpose_model(major))
    stack = np.stack(
        [cell if cell is not None else np.zeros_like(nucleus), nucleus]
    )  # (2, [Z,] Y, X)
    do_3d = nucleus.ndim == 3
    try:
        if major >= 4:
            model = models.CellposeModel(gpu=gpu, pretrained_model=name, device=dev)
        elif local:
            model = models.CellposeModel(gpu=gpu, pretrained_model=name, device=dev)
        else:
            model = models.CellposeModel(gpu=gpu, model_type=name, device=dev)
    except Exception as exc:  # cellpose raises URLError/OSError/RuntimeError when it cannot fetch
        _, why = cellpose_weights_available(weights)
        problem, _, fix = why.partition("; ")
        raise WeightsNotFoundError(
            f"{problem} and could not be downloaded ({type(exc).__name__})", fix
        ) from exc
    kwargs = dict(channel_axis=0, diameter=diameter, do_3D=do_3d)
    if do_3d:
        kwargs["z_axis"] = 1
    if major >= 4:
        out = model.eval(stack, **kwargs)
    else:
        out = model.eval(stack, channels=[1, 2], **kwargs)
    masks = np.asarray(out[0])
    return masks.astype(np.int32)


# --------------------------------------------------------------------------- entry point


def segment(
    image: MicroscopyImage,
    method: Method = "auto",
    nucleus_channel: str | int | None = None,
    cell_channel: str | int | None = None,
    diameter: float | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    nucleus_how: str | None = None,
) -> Segmentation:
    """Segment the cells of one image (2D or 3D); picks channels when not given.

    The nucleus channel: by name, else by content (:func:`choose_nucleus_channel`); how it
    was chosen goes into ``notes`` and ``nucleus_choice`` (``nucleus_how`` says how a given
    channel was chosen, e.g. once for a whole run). ``auto`` uses Cellpose when it is
    installed and its weights are on this machine, otherwise the built-in method (the reason
    goes into ``notes``). Raises one of :data:`SKIPPABLE` when only this image is at fault.
    """
    try:
        data = image.to_numpy()
    except MaeprobeInputError as exc:
        raise UnusableImageError(exc.problem, exc.fix) from exc
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise UnusableImageError(
            f"{image.name}: its pixels cannot be read ({type(exc).__name__}: {exc})",
            "check or re-export this file",
        ) from exc
    try:
        check_finite(data, image.name, image.channel_names)
    except MaeprobeInputError as exc:
        raise UnusableImageError(exc.problem, exc.fix) from exc
    if data.size == 0 or all(np.ptp(data[c]) == 0 for c in range(data.shape[0])):
        raise NoCellsFoundError(
            f"{image.name}: the image is empty (every pixel has the same value)",
            "check that the right file was opened",
        )
    names = image.channel_names
    nuc = _channel_index(image, nucleus_channel)
    how = nucleus_how or "as given"
    if nuc is None:
        nuc, how = choose_nucleus_channel(image, data)
    notes: list[str] = [nucleus_note(names[nuc], how)]
    cel = _channel_index(image, cell_channel)
    if cel is None and cell_channel is None:
        cel = pick_channel(names, CELL_PATTERNS, exclude={nuc})
    norm = normalize(data, "percentile", name=image.name, channel_names=names)
    if cel is not None and np.ptp(norm[cel]) == 0:
        notes.append(f"cell channel '{names[cel]}' is empty; using the mean of the other channels")
        cel = None
    others = [
        i
        for i in range(len(names))
        if i != nuc and not BRIGHTFIELD.search(names[i]) and np.ptp(norm[i]) > 0
    ]
    cell_img = norm[cel] if cel is not None else (norm[others].mean(axis=0) if others else None)
    cell_name = (
        names[cel]
        if cel is not None
        else ("mean of " + ", ".join(names[i] for i in others) if others else None)
    )

    use_cellpose = method == "cellpose"
    if method == "auto":
        ok, why = cellpose_weights_available(weights)
        use_cellpose = ok
        if not ok:
            notes.append(f"built-in segmentation: {why}")
    elif method not in ("builtin", "cellpose"):
        raise MaeprobeInputError(
            f"unknown segmentation method {method!r}", "use 'auto', 'cellpose' or 'builtin'"
        )
    try:
        if use_cellpose:
            labels = segment_cellpose(norm[nuc], cell_img, weights, diameter, device)
            used = f"cellpose{cellpose_version()}"
        else:
            spacing = image.scale if image.scale and len(image.scale) == norm[nuc].ndim else None
            labels = segment_builtin(
                norm[nuc], cell_img, nucleus_diameter=diameter, spacing=spacing
            )
            used = "builtin"
    except NoCellsFoundError as exc:
        raise NoCellsFoundError(
            f"{image.name}: {exc.problem} (nucleus channel '{names[nuc]}')", exc.fix
        ) from exc
    if labels.max() == 0:
        raise NoCellsFoundError(
            f"{image.name}: no cells found (nucleus channel '{names[nuc]}')",
            "check the channels or the diameter",
        )
    return Segmentation(
        labels=labels, method=used, nucleus_channel=names[nuc], cell_channel=cell_name,
        notes=notes, nucleus_choice=how,
    )  # fmt: skip


def nucleus_note(name: str, how: str) -> str:
    """The line that says which nucleus channel was used and how it was chosen."""
    return f"nucleus channel '{name}' ({how})"


# --------------------------------------------------------------------------- agreement


def matched_fraction(predicted: np.ndarray, reference: np.ndarray, iou: float = 0.5) -> float:
    """Fraction of reference objects that some predicted object overlaps with IoU >= ``iou``.

    With ``iou >= 0.5`` a match is one-to-one, so this is the usual instance recall.
    """
    ref_ids, ref_area = np.unique(reference[reference > 0], return_counts=True)
    if ref_ids.size == 0:
        return float("nan")
    pred_ids, pred_area = np.unique(predicted[predicted > 0], return_counts=True)
    both = (reference > 0) & (predicted > 0)
    pairs, inter = np.unique(
        np.stack([reference[both], predicted[both]]).astype(np.int64), axis=1, return_counts=True
    )
    ra = dict(zip(ref_ids.tolist(), ref_area.tolist()))
    pa = dict(zip(pred_ids.tolist(), pred_area.tolist()))
    matched = set()
    for (r, p), n in zip(pairs.T.tolist(), inter.tolist()):
        if n / (ra[r] + pa[p] - n) >= iou:
            matched.add(r)
    return len(matched) / len(ref_ids)
