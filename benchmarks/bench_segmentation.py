"""Benchmark: the built-in segmentation against every reference mask we have (F1 at IoU 0.5).

For each reference: n_ref, objects found, true positives, F1, and the found objects that touch
the image border (counted separately: references such as CellProfiler's closed outlines leave
cut cells out, so border objects there are false positives by construction). ``--rev REV``
measures the segmentation module as it was at a git revision (the "before" column).

    .venv/bin/python benchmarks/bench_segmentation.py            # this tree
    .venv/bin/python benchmarks/bench_segmentation.py --rev 0e8f9be   # before
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SHARED = ROOT.parent / "shared" / "data"  # ../shared/data beside the checkout


def match_counts(pred: np.ndarray, ref: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """(n_ref, n_pred, true positives) with one-to-one matching at IoU >= ``iou`` (>= 0.5 makes
    matches unique, so counting pairs is exact). Written here, not taken from
    ``pp.segmentation.matched_fraction``: the benchmark also measures older revisions
    (``--rev``) and must score them all with the same rule."""
    ref_ids, ref_area = np.unique(ref[ref > 0], return_counts=True)
    pred_ids, pred_area = np.unique(pred[pred > 0], return_counts=True)
    both = (ref > 0) & (pred > 0)
    pairs, inter = np.unique(
        np.stack([ref[both], pred[both]]).astype(np.int64), axis=1, return_counts=True
    )
    ra = dict(zip(ref_ids.tolist(), ref_area.tolist()))
    pa = dict(zip(pred_ids.tolist(), pred_area.tolist()))
    tp = sum(
        1 for (r, p), n in zip(pairs.T.tolist(), inter.tolist()) if n / (ra[r] + pa[p] - n) >= iou
    )
    return len(ref_ids), len(pred_ids), tp


def border_ids(labels: np.ndarray) -> set[int]:
    """Labels of objects touching the image border (in Y/X; 3D stacks: also first/last plane)."""
    edge = np.zeros(labels.shape, bool)
    for ax in range(labels.ndim):
        sl = [slice(None)] * labels.ndim
        sl[ax] = 0
        edge[tuple(sl)] = True
        sl[ax] = -1
        edge[tuple(sl)] = True
    return set(np.unique(labels[edge]).tolist()) - {0}


def _filled_outlines(path: Path) -> np.ndarray:
    line = tifffile.imread(path)
    line = (line.max(axis=-1) if line.ndim == 3 else line) > 0
    labels, _ = ndimage.label(ndimage.binary_fill_holes(line) & ~line)
    sizes = np.bincount(labels.ravel())
    keep = sizes > 30
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def references():
    """(name, reference description, image, reference labels, nuclei_only) for every reference."""
    from napari_maeprobe import read_image, read_images
    from napari_maeprobe.io.channels import select_channels
    from napari_maeprobe.io.samples import load_sample

    cp, _ = load_sample("cellpainting")
    out = SAMPLE / "alsf_cellpainting_6ch/images/outlines"
    yield (
        "Cell Painting 1080x1080, cells",
        "CellProfiler closed cell outlines",
        [cp],
        [_filled_outlines(out / "CellsOutlines_BR00143976_C03_3.tiff")],
    )
    yield (
        "Cell Painting 1080x1080, nuclei (DNA only)",
        "CellProfiler closed nucleus outlines",
        [select_channels(cp, ["DNA"])],
        [_filled_outlines(out / "NucleiOutlines_BR00143976_C03_3.tiff")],
    )
    imc = read_images(SAMPLE / "imc_bodenmiller_5ch/img")
    yield (
        "IMC, 15 regions",
        "DeepCell whole-cell masks",
        imc,
        [tifffile.imread(SAMPLE / "imc_bodenmiller_5ch/masks_deepcell" / f"{i.name}.tiff")
         for i in imc],  # fmt: skip
    )
    n3, ref3 = load_sample("nuclei3d")
    yield "3D nuclei 60x256x256", "shipped 3D labels", [n3], [ref3]
    nb = SHARED / "neubias_small_multichannel"
    nup = read_image(nb / "xyc_16bit__nup_nuclei.tif").with_channel_names(["NUP", "DNA"])
    yield (
        "NEUBIAS nup_nuclei 420x476 (DNA)",
        "shipped nuclei labels",
        [select_channels(nup, ["DNA"])],
        [tifffile.imread(nb / "xyc_16bit__nup_nuclei__xy_8bit_labels__nuclei.tif").astype(int)],
    )
    hp = SHARED / "hpa_if_4ch_localization/fov_partial"
    if hp.is_dir():
        import imageio.v3 as iio

        blue = iio.imread(hp / "383_D2_1_blue.png")
        green = iio.imread(hp / "383_D2_1_green.png")
        hpa = read_image(hp / "383_D2_1_blue.png")
        hpa = hpa.with_data(np.stack([blue, green]), channel_names=["DAPI", "protein"])
        yield (
            "HPA 383_D2_1 2048x2048 (DAPI + protein)",
            "shipped 20-cell mask",
            [hpa],
            [iio.imread(hp / "383_D2_1_mask.png").astype(np.int32)],
        )


def load_segment(rev: str | None):
    """``segment`` from this tree, or from the module as it was at git revision ``rev``."""
    if rev is None:
        from napari_maeprobe.pp.segmentation import segment

        return segment
    src = subprocess.run(
        ["git", "show", f"{rev}:src/napari_maeprobe/pp/segmentation.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "segmentation_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("segmentation_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.segment


def run(rev: str | None = None) -> list[dict]:
    """One row per reference: n_ref, found, TP, F1, border objects (and F1 without them)."""
    segment = load_segment(rev)
    rows = []
    for name, refname, images, refs in references():
        n_ref = n_pred = tp = n_border = tp_border = 0
        t0 = time.perf_counter()
        for im, ref in zip(images, refs):
            pred = segment(im, "builtin").labels
            r, p, t = match_counts(pred, ref)
            b = border_ids(pred)
            inner = np.where(np.isin(pred, list(b)), 0, pred) if b else pred
            t_inner = match_counts(inner, ref)[2]
            n_ref, n_pred, tp, n_border = n_ref + r, n_pred + p, tp + t, n_border + len(b)
            tp_border += t - t_inner
        f1 = 2 * tp / (n_ref + n_pred) if n_ref + n_pred else float("nan")
        n_in = n_pred - n_border
        f1_in = 2 * (tp - tp_border) / (n_ref + n_in) if n_ref + n_in else float("nan")
        rows.append(dict(image=name, reference=refname, n_ref=n_ref, n_found=n_pred, tp=tp,
                         f1=f1, border=n_border, border_tp=tp_border, f1_inner=f1_in,
                         seconds=time.perf_counter() - t0))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="measure the segmentation module at this git revision")
    args = ap.parse_args()
    print("| image | reference | n_ref | found | matched | F1 | border objects (matched) "
          "| F1 without border objects | s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in run(args.rev):
        print(f"| {r['image']} | {r['reference']} | {r['n_ref']} | {r['n_found']} | {r['tp']} "
              f"| {r['f1']:.2f} | {r['border']} ({r['border_tp']}) | {r['f1_inner']:.2f} "
              f"| {r['seconds']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
