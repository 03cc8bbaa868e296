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

#: nucleus stains, strongest evidence first (so "DNA" wins over "PH3")
NUCLEUS_PATTERNS = (
    r"dna|dapi|hoechst|nucle|draq|sytox|^ir19[13]",
    r"histone|h3k\d|^h3$",
)
#: whole-cell / cytoplasm / membrane stains, best first
CELL_PATTERNS = (
    r"cell ?body|cytopl|membrane|agp|wga|phalloidin|actin|cytokeratin|e-?cad|cd45|pan-?ck",
    r"tubulin|mts|^er$|concanavalin|calreticulin|ybx1|rna|mito",
)
THRESHOLD_DEFAULT = "otsu"
#: seeds: h-maxima of the (smoothed) distance transform, h = SEED_H x nucleus diameter
SEED_H = 0.05
#: 3D distance maps of textured nuclei have more shallow maxima: a deeper h (measured on the
#: 3D nuclei stack: 0.05 -> 142 objects for 20 nuclei, 0.25 -> 36 objects, 19 of 20 matched)
SEED_H_3D = 0.25
DIST_SIGMA = 0.5
#: whole cells: nuclei grown by GROW x nucleus diameter
GROW = 0.5
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


@dataclass
class Segmentation:
    """Instance labels of one image and how they were made."""

    labels: np.ndarray
    method: str
    nucleus_channel: str
    cell_channel: str | None
    notes: list[str] = field(default_factory=list)

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


def _estimate_nucleus_diameter(mask: np.ndarray) -> float:
    lab, n = ndimage.label(mask)
    if n == 0:
        return 0.0
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= 4]
    if areas.size == 0:
        return 0.0
    # the median object, not touching clumps: use the lower half of areas
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
    over-splitting textured ones). Cells: nuclei grown by up to ``expand`` pixels (default:
    half the nucleus diameter), limited to the cell-signal foreground (same threshold on
    ``cell``) when that covers at least 80% of the nuclei. Without ``cell`` the nuclei are
    returned as the objects.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import expand_labels, watershed

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
    diameter = nucleus_diameter or _estimate_nucleus_diameter(fg)
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
    h = (SEED_H_3D if nd == 3 else SEED_H) * diameter
    markers, _ = ndimage.label(h_maxima(dist, max(0.5, h)))
    nuclei = watershed(-dist, markers, mask=fg)
    nuclei = _remove_small(nuclei, min_size)
    nuclei = _add_intensity_seeds(nucleus, smooth, fg, nuclei, rel, min_size)
    if cell is None:  # a nucleus stain only: the nuclei are the objects
        cells = nuclei
    else:
        cells = expand_labels(
            nuclei, distance=float(expand if expand is not None else GROW * diameter)
        )
        if np.ptp(cell) > 0:
            csmooth = ndimage.gaussian_filter(cell.astype(np.float32), sigma=1.0 / rel)
            cell_fg = csmooth > _threshold(csmooth, threshold)
            # use the cell signal as a limit only where it marks the cells (covers most nuclei);
            # a marker present in few cells (e.g. cytokeratin in IMC) would cut them away
            if cell_fg[nuclei > 0].mean() >= 0.8:
                cells = np.where(cell_fg | (nuclei > 0), cells, 0)
    cells, _, _ = _relabel(cells)
    if cells.max() == 0:
        raise NoCellsFoundError(
            "no cells found", "check the nucleus channel or pass nucleus_diameter"
        )
    return cells


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
) -> Segmentation:
    """Segment the cells of one image (2D or 3D); picks channels by name when not given.

    ``auto`` uses Cellpose when it is installed and its weights are on this machine, otherwise
    the built-in method (the reason goes into ``notes``).
    """
    data = image.to_numpy()
    check_finite(data, image.name, image.channel_names)
    if data.size == 0 or all(np.ptp(data[c]) == 0 for c in range(data.shape[0])):
        raise NoCellsFoundError(
            f"{image.name}: the image is empty (every pixel has the same value)",
            "check that the right file was opened",
        )
    names = image.channel_names
    nuc = _channel_index(image, nucleus_channel)
    if nuc is None:
        nuc = pick_channel(names, NUCLEUS_PATTERNS)
    notes: list[str] = []
    if nuc is None:
        nuc = 0
        notes.append(
            f"no channel name looks like a nucleus stain; using '{names[0]}' (set nucleus_channel)"
        )
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
        labels=labels, method=used, nucleus_channel=names[nuc], cell_channel=cell_name, notes=notes
    )


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
