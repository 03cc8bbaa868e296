"""Benchmark: the cost of telling the truth, on real data.

- per-cell measurements (``pp.measure.measure_cells``: covariates and the regionprops baseline)
  of the 16 LINCS Cell Painting fields (5 channels, 1080 x 1080), cells from the built-in
  segmentation (not timed);
- ``what_drives`` (permutation null, bootstrap, kNN purity) on the demo store's patch level:
  20,000 rows, every candidate column;
- ``evaluate`` of the same level: 4 probes on a 50,000-row sample, plain and grouped by image;
- ``channel_content`` of the demo store's channel level (exact over every pair of rows).

The demo store (``out/demo/embeddings.zarr``) is made by ``maeprobe demo`` when missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LINCS = ROOT.parent / "shared" / "data" / "lincs_cellpainting_a549_dev"
DEMO = ROOT / "out" / "demo"


def _demo_store():
    from napari_maeprobe.embed.store import EmbeddingStore

    if not (DEMO / "embeddings.zarr").is_dir():
        from napari_maeprobe.demo import run_demo

        run_demo(DEMO)
    return EmbeddingStore(DEMO / "embeddings.zarr")


def _measure() -> tuple[str, dict]:
    from napari_maeprobe import read_images
    from napari_maeprobe.pp.measure import measure_cells
    from napari_maeprobe.pp.segmentation import segment

    images = read_images(LINCS / "images")
    seconds, cells = 0.0, 0
    for im in images:
        data = im.to_numpy()
        labels = segment(im, method="builtin").labels
        t = time.perf_counter()
        table = measure_cells(data, labels, list(im.channel_names))
        seconds += time.perf_counter() - t
        cells += len(table)
    return (f"| per-cell measurements, {len(images)} LINCS fields (5 ch, 1080 x 1080) | {cells:,} "
            f"cells | {seconds:.1f} s |"), {"cells": cells, "seconds": seconds}  # fmt: skip


def _diagnostics(store) -> list[str]:
    from napari_maeprobe.table import read_level
    from napari_maeprobe.tl.channel_content import channel_content
    from napari_maeprobe.tl.diagnostics import _default_columns, what_drives
    from napari_maeprobe.tl.evaluate import evaluate

    rows = []
    patch = read_level(store, "patch")
    ok = np.flatnonzero(np.isfinite(patch.obsm["X_pca"]).all(axis=1))
    pick = np.sort(np.random.default_rng(0).choice(ok, min(20_000, len(ok)), replace=False))
    obs = patch.obs.iloc[pick].reset_index(drop=True)
    columns = _default_columns(obs, "leiden")
    t = time.perf_counter()
    what_drives(patch.obsm["X_pca"][pick], obs, obs["leiden"].to_numpy(), labels_name="leiden")
    rows.append(f"| what_drives, demo patch level | {len(pick):,} rows x {len(columns)} columns "
                f"| {time.perf_counter() - t:.1f} s |")  # fmt: skip
    probes = ["channel", "patch_row", "patch_col", "foreground"]
    for group in (None, "image"):
        t = time.perf_counter()
        evaluate(patch, probes, max_rows=50_000, group_by=group)
        how = "folds grouped by image" if group else "5 stratified folds"
        rows.append(f"| evaluate, 4 probes, {how} | 50,000 of {patch.n_obs:,} rows "
                    f"| {time.perf_counter() - t:.1f} s |")  # fmt: skip
    channel = read_level(store, "channel")
    t = time.perf_counter()
    channel_content(np.asarray(channel.X), channel.obs)
    rows.append(f"| channel_content, demo channel level | {channel.n_obs:,} rows, every pair "
                f"| {time.perf_counter() - t:.2f} s |")  # fmt: skip
    return rows


def run() -> tuple[str, dict]:
    head = ("### Truth: covariates, calibrated diagnostics, grouped probes (CPU)\n\n"
            "`benchmarks/bench_truth.py`: per-cell measurements on the real LINCS fields, "
            "`what_drives`, `evaluate` and `channel_content` on the demo store.\n\n"
            "| step | size | time |\n| --- | --- | ---: |")  # fmt: skip
    line, info = _measure()
    rows = [line, *_diagnostics(_demo_store())]
    return head + "\n" + "\n".join(rows), info


if __name__ == "__main__":
    body, _ = run()
    print(body)
