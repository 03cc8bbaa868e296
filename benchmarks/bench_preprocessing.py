"""Benchmark: preprocess the 6-channel 1080x1080 Cell Painting field into crops and patch tables.

Times each step (median of several runs) and the peak memory that numpy allocates in it.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc

import numpy as np

from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.boundaries import boundary_map
from napari_maeprobe.pp.preprocessing import cell_crops, normalize, patch_table, tile_image
from napari_maeprobe.pp.segmentation import segment


def _measure(fn, repeats: int):
    """Median wall time over ``repeats`` plain runs, then one traced run for peak memory."""
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, statistics.median(times), peak


def run(repeats: int = 5) -> tuple[str, list[tuple[str, float, float, str]]]:
    image, _ = load_sample("cellpainting")
    rows = []

    raw, t, m = _measure(lambda: image.to_numpy(), repeats)
    rows.append(("read 6 TIFFs (LZW) into memory", t, m, f"{raw.shape} {raw.dtype}"))
    norm, t, m = _measure(lambda: normalize(raw, "percentile", 1, 99.8), repeats)
    rows.append(("percentile normalisation, 6 channels", t, m, "float32"))
    seg, t, m = _measure(lambda: segment(image, "builtin"), max(1, repeats // 2))
    rows.append(("built-in segmentation (incl. its normalisation)", t, m, f"{seg.n_cells} cells"))
    labels = seg.labels
    _, t, m = _measure(lambda: boundary_map(labels), repeats)
    rows.append(("boundary map", t, m, ""))
    for size, patch in ((96, 16), (224, 16), (256, 16)):
        crops, t, m = _measure(lambda s=size: cell_crops(norm, labels, s), repeats)
        rows.append((f"cell crops {size}x{size}", t, m, f"{len(crops)} crops"))
        table, t, m = _measure(
            lambda c=crops, p=patch: patch_table(c, p, per_channel=True), repeats
        )
        rows.append((f"patch table {size}/{patch}, per channel", t, m, f"{len(table)} rows"))
    tiles, t, m = _measure(lambda: tile_image(norm, 224, labels=labels), repeats)
    rows.append(("tiles 224x224 with boundary", t, m, f"{len(tiles)} tiles"))
    table, t, m = _measure(lambda: patch_table(tiles, 16, per_channel=True), repeats)
    rows.append(("patch table of tiles 224/16, per channel", t, m, f"{len(table)} rows"))

    total = sum(r[1] for r in rows[:4]) + rows[6][1] + rows[7][1]
    lines = [
        "### Preprocessing: Cell Painting field (6 x 1080 x 1080, uint16) to crops and patches",
        "",
        f"Median of {repeats} runs per step; memory is the peak of numpy allocations in the step "
        "(tracemalloc, in a separate run so that tracing does not slow the timed runs).",
        "",
        "| step | time (ms) | peak memory (MB) | output |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, t, m, note in rows:
        lines.append(f"| {name} | {t * 1000:.1f} | {m / 2**20:.1f} | {note} |")
    lines += [
        "",
        f"Whole path (read, normalise, segment, boundaries, 224-px crops, patch table): "
        f"**{total:.2f} s** for {seg.n_cells} cells.",
    ]
    assert np.isfinite(total)
    return "\n".join(lines), rows


if __name__ == "__main__":
    print(run()[0])
