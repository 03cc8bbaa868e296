"""``maeprobe demo``: the main job on the bundled sample data with the bundled default model.

Segments the samples, embeds every cell of the 2D samples at three levels (global, per channel,
per patch) into ``DIR/embeddings.zarr``, runs PCA, UMAP, Leiden and the "what drives these
clusters" diagnostics, and writes ``DIR/embeddings.h5ad``, ``DIR/report.html`` and its PNGs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from napari_maeprobe.io.files import write_json
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.segment_batch import (
    SegmentedImage,
    overlay_png,
    segment_images,
    write_segmentation_outputs,
)
from napari_maeprobe.progress import ProgressCallback
from napari_maeprobe.tl.analyze import AnalysisSettings, analyze_store

DEMO_SAMPLES = ("cellpainting", "examplehuman", "imc", "nuclei3d")


@dataclass
class DemoResult:
    """What the demo computed and where it wrote it."""

    out_dir: Path
    segmented: list[SegmentedImage]
    summary: pd.DataFrame
    store_path: Path
    rows: dict[str, int]
    analysis: dict[str, dict]
    facts: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        lines = []
        for _, r in self.summary.iterrows():
            lines.append(
                f"{r['dataset']}/{r['image']} ({r['shape']}, {r['channels']}): "
                f"{r['n_cells']} cells by {r['method']}"
            )
        sizes = ", ".join(f"{lvl} {n}" for lvl, n in self.rows.items())
        lines.append(
            f"embeddings ({self.facts['model']}, {self.facts['embed_dim']}-d, weights sha256 "
            f"{self.facts['weights_sha256'][:12]}...): {sizes} rows -> {self.store_path.name}"
        )
        for level, a in self.analysis.items():
            lines.append(
                f"{level}: {a['n_leiden']} Leiden clusters, effective rank "
                f"{a['effective_rank']:.1f}; {a['verdict']}"
            )
        lines.append(f"report: {self.out_dir / 'report.html'}")
        return "\n".join(lines)


def run_demo(
    out_dir: Path,
    method: str = "auto",
    diameter: float | None = None,
    weights: str | None = None,
    progress: ProgressCallback | None = None,
    settings: AnalysisSettings | None = None,
) -> DemoResult:
    """Segment, embed, analyse and report on the bundled samples (see the module docstring)."""
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.io.export import export_store
    from napari_maeprobe.pl.report import write_report
    from napari_maeprobe.table import read_level

    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    samples = [load_sample(k) for k in DEMO_SAMPLES]
    images = [img for img, _ in samples]
    segmented = segment_images(images, method, None, None, diameter, weights, progress=progress)
    summary = write_segmentation_outputs(segmented, out_dir / "segmentation")
    for s in segmented:
        overlay_png(
            out_dir / f"overlay_{s.image.name}.png",
            s.image,
            s.boundary,
            s.segmentation.nucleus_channel,
        )
    seconds["segmentation"] = time.perf_counter() - t

    # the bundled default model is 2D: the z-stack is segmented (above) but not embedded
    t = time.perf_counter()
    flat = [s for s in segmented if not s.image.is_3d]
    job = EmbedJob(model="default", attention=True)
    store_path = out_dir / "embeddings.zarr"
    result = run_embedding(
        [s.image for s in flat], store_path, job,
        labels=[s.segmentation.labels for s in flat], progress=progress, overwrite=True,
    )  # fmt: skip
    seconds["embedding"] = time.perf_counter() - t

    t = time.perf_counter()
    store = EmbeddingStore(store_path, mode="a")
    analysis = analyze_store(store, settings=settings, progress=progress)
    seconds["analysis"] = time.perf_counter() - t

    t = time.perf_counter()
    export_store(store, "h5ad", out_dir / "embeddings.h5ad")
    seconds["export"] = time.perf_counter() - t

    t = time.perf_counter()
    levels = {lvl: read_level(store, lvl) for lvl in store.levels()}
    facts = {
        **result.facts,
        "images": len(flat),
        "cells": int(sum(s.segmentation.n_cells for s in flat)),
        "samples": ", ".join(DEMO_SAMPLES),
        "note": "the z-stack (cells3d) is segmented but not embedded: the default model is 2D",
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    write_report(out_dir, levels, None, facts, segmentation=summary)
    seconds["report"] = time.perf_counter() - t
    facts["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    write_json(
        out_dir / "demo.json",
        {
            "samples": list(DEMO_SAMPLES),
            "segmentation": summary.to_dict(orient="records"),
            "rows": result.rows,
            "analysis": analysis,
            "model": result.facts,
            "seconds": facts["seconds"],
        },
    )
    return DemoResult(out_dir, segmented, summary, store_path, result.rows, analysis,
                      result.facts, seconds)  # fmt: skip


def show_demo(result: DemoResult, run: bool = True):
    """Open the demo in napari, linked: the 2D images with their cells and boundaries, and the
    explorer docked on the demo's store (select points to see their patches and attention maps
    on the images; click a cell to see its points)."""
    import napari

    from napari_maeprobe._napari.dock import explorer_widget
    from napari_maeprobe._napari.hub import hub_for
    from napari_maeprobe._napari.layers import image_layers

    viewer = napari.Viewer(title="maeprobe demo")
    for s in result.segmented:
        if s.image.is_3d:
            continue
        first = s is result.segmented[0]  # shown; the other images are hidden layers
        for data, meta, _ in image_layers(s.image):
            if not first:  # channel names repeat across images: prefix the image
                meta["name"] = f"{s.image.name} {meta['name']}"
            viewer.add_image(data, visible=first, **meta)
        viewer.add_labels(s.segmentation.labels, name=f"{s.image.name} cells", opacity=0.3,
                          visible=first)  # fmt: skip
        viewer.add_labels(s.boundary.astype("uint8"), name=f"{s.image.name} boundaries",
                          opacity=0.8, visible=first)  # fmt: skip
    hub_for(viewer).last_store = result.store_path  # the explorer loads it when docked
    viewer.window.add_dock_widget(explorer_widget(viewer), name="maeprobe explorer", area="right")
    if run:
        napari.run()
    return viewer
