"""Benchmark: does the GUI thread ever wait? The longest gap of a 10 ms timer on napari's GUI
thread while the linked explorer works, on real Cell Painting fields (LINCS, A549).

A ``QTimer`` ticks every 10 ms on the GUI thread; any work done on that thread shows as a gap
between ticks. Measured, each in a real ``napari.Viewer`` under Xvfb:

* **segmentation**: the Data widget segments one 1080 x 1080 five-channel field (built-in
  method) in its worker and hands the cells and boundaries to Labels layers;
* **selection**: at the patch level of a store of two fields (~100k points), ~1,000 patch rows
  of one Leiden cluster over a few hundred cells are selected (``ScatterCanvas.select``); the
  overlays are computed in a worker and handed to layers, the gallery's first page is drawn;
* **gallery page**: the gallery's *next* page (6 cells, 4 panels each);
* **level load**: opening the patch level of the store in the explorer.

The store (default model, attention, random masking and reconstructions, patch + global levels,
analysed) is built once under ``benchmarks/.cache/``. Goal: every gap under 100 ms.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
LINCS = HERE.parents[1] / "shared" / "data" / "lincs_cellpainting_a549_dev" / "images"
FIELDS = 2


class GapMeter:
    """A 10 ms QTimer on the GUI thread recording the longest gap between its ticks."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def __enter__(self) -> GapMeter:
        self.ticks = [time.perf_counter()]
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.stop()
        self.ticks.append(time.perf_counter())

    @property
    def longest_ms(self) -> float:
        return float(np.diff(self.ticks).max() * 1000) if len(self.ticks) > 1 else float("nan")


def _wait(predicate, timeout: float = 600.0) -> float:
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the GUI did not get there in time")
        QApplication.processEvents()
        time.sleep(0.002)
    return time.perf_counter() - t0


def _settle(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.002)


def _fields():
    from napari_maeprobe.io.reading import read_images

    images = read_images(LINCS)
    return images[:FIELDS]


def _store() -> Path:
    """The benchmark store: two LINCS fields, built once."""
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.tl.analyze import analyze_store

    path = CACHE / "linked_lincs.zarr"
    if path.exists():
        store = EmbeddingStore(path)
        if store.is_complete() and set(store.analysed_levels()) >= {"patch", "global"}:
            return path
    CACHE.mkdir(parents=True, exist_ok=True)
    job = EmbedJob(levels=("global", "patch"), attention=True, reconstruction=True,
                   masking="random")  # fmt: skip
    run_embedding(_fields(), path, job, overwrite=True)
    analyze_store(EmbeddingStore(path, mode="a"))
    return path


def _segmentation(app) -> dict:
    import napari

    from napari_maeprobe._napari.layers import image_layers
    from napari_maeprobe._napari.widgets import DataWidget

    image = _fields()[0]
    viewer = napari.Viewer(show=True)
    for data, meta, _ in image_layers(image):
        viewer.add_image(np.asarray(data), **meta)
    widget = DataWidget(viewer)
    viewer.window.add_dock_widget(widget, name="data")
    widget.refresh()
    widget.method_combo.setCurrentText("builtin")
    _wait(lambda: True)
    with GapMeter() as meter:
        t0 = time.perf_counter()
        widget.run_segmentation()
        _wait(lambda: not widget.is_running)
        _wait(lambda: any(ly.name.endswith(" cells") for ly in viewer.layers), 30)
        seconds = time.perf_counter() - t0
    n_cells = int(max(np.asarray(ly.data).max() for ly in viewer.layers
                      if ly.name.endswith(" cells")))  # fmt: skip
    viewer.close()
    return {"gap_ms": meter.longest_ms, "seconds": seconds, "cells": n_cells,
            "shape": tuple(image.data.shape)}  # fmt: skip


def _explorer(app, store: Path) -> dict:
    import napari

    from napari_maeprobe._napari.explorer_widget import ExplorerWidget
    from napari_maeprobe._napari.layers import image_layers

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1920, 1080)
    for image in _fields():
        for data, meta, _ in image_layers(image):
            viewer.add_image(np.asarray(data), **meta)
    widget = ExplorerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="explorer", area="right")
    out: dict = {}
    _settle(2.0)
    with GapMeter() as meter:  # the baseline: napari repainting these layers, nothing of ours
        viewer.layers[0].opacity = 0.9
        _settle(1.0)
    out["repaint_gap_ms"] = meter.longest_ms
    out["layers"] = len(viewer.layers)
    with GapMeter() as meter:
        t0 = time.perf_counter()
        widget.load(store, "patch")
        _wait(lambda: widget.data is not None and widget.data.level == "patch")
        out["load_s"] = time.perf_counter() - t0
    out["load_gap_ms"] = meter.longest_ms
    data = widget.data
    out["points"] = data.n
    out["plotted"] = widget.embedded
    obs = data.obs
    valid = np.isfinite(data.coords["UMAP"]).all(axis=1)
    sizes = obs.loc[valid, "leiden"].value_counts()
    cluster = sizes.index[int(np.argmin(np.abs(sizes.to_numpy() - 3_000)))]
    members = np.flatnonzero(valid & (obs["leiden"] == cluster).to_numpy())
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(members, size=min(1_000, len(members)), replace=False))
    out["selected"] = len(rows)
    out["cells"] = int(obs.iloc[rows][["image", "cell_id"]].drop_duplicates().shape[0])
    _settle(3.0)  # the empty overlays the explorer prepares after a load
    layers, gallery = [], []
    widget.layers_updated.connect(lambda: layers.append(time.perf_counter()))
    widget.gallery_updated.connect(lambda: gallery.append(time.perf_counter()))
    _wait(lambda: True)
    with GapMeter() as meter:
        t0 = time.perf_counter()
        widget.scatter.select(rows)
        _wait(lambda: bool(layers) and bool(gallery) and bool(widget.gallery.tiles))
        out["overlays_s"] = layers[-1] - t0
        out["gallery_s"] = gallery[-1] - t0
    out["selection_gap_ms"] = meter.longest_ms
    gallery.clear()
    with GapMeter() as meter:
        t0 = time.perf_counter()
        widget.gallery.next_button.click()
        _wait(lambda: bool(gallery))
        out["page_s"] = gallery[-1] - t0
    out["page_gap_ms"] = meter.longest_ms
    widget.shutdown()
    viewer.close()
    return out


def run() -> tuple[str, dict]:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    store = _store()
    seg = _segmentation(app)
    exp = _explorer(app, store)
    ok = lambda ms: "yes" if ms < 100 else "**no**"  # noqa: E731
    rows = [
        ("segmentation of one field "
         f"({seg['shape'][0]} x {seg['shape'][-2]} x {seg['shape'][-1]}, {seg['cells']} cells, "
         "built-in method)", seg["gap_ms"], f"{seg['seconds']:.1f} s to the layers"),
        (f"select {exp['selected']:,} patches over {exp['cells']} cells "
         f"({exp['points']:,} rows, {exp['plotted']:,} plotted)", exp["selection_gap_ms"],
         f"overlays {exp['overlays_s']:.2f} s, gallery {exp['gallery_s']:.2f} s"),
        ("gallery: next page (6 cells x 4 panels)", exp["page_gap_ms"],
         f"{exp['page_s']:.2f} s"),
        ("open the patch level", exp["load_gap_ms"], f"{exp['load_s']:.1f} s"),
        (f"baseline: napari repaints the same viewer ({exp['layers']} image layers of "
         "1080 x 1080) after an opacity change", exp["repaint_gap_ms"], "nothing of ours runs"),
    ]  # fmt: skip
    lines = [
        "### GUI: the longest wait of the GUI thread (linked explorer)",
        "",
        "A 10 ms `QTimer` on napari's GUI thread; the longest gap between its ticks while the "
        "work runs (any work on the GUI thread shows as a gap). Real napari viewers under Xvfb "
        f"(software OpenGL), LINCS Cell Painting fields; the store holds {FIELDS} fields embedded "
        "by the default model with attention, random masking and reconstructions "
        "(`benchmarks/bench_gui_linked.py`). Goal: under 100 ms.",
        "",
        "| what | longest gap (ms) | under 100 ms | time to the result |",
        "| --- | ---: | :---: | --- |",
    ]
    for what, gap, note in rows:
        lines.append(f"| {what} | {gap:.0f} | {ok(gap)} | {note} |")
    lines += [
        "",
        "- Where the rest goes: on this machine (no GPU, Mesa llvmpipe) napari needs "
        f"{exp['repaint_gap_ms']:.0f} ms to repaint these layers at all (last row), so anything "
        "that changes what the canvas shows cannot stay under 100 ms here. Our own work on the "
        "GUI thread is small: the selection's slot 2-6 ms, a gallery page 4-8 ms, showing a "
        "loaded level ~90 ms (the scatter and combo boxes; value counts are made in the worker).",
        "- The overlays are added when a level is opened (empty, one layer per event-loop turn) "
        "and a selection only replaces their pixels (~40 ms per 1080 x 1080 layer, against "
        "0.3-0.4 s for napari to add one); napari's label-colour code is loaded in the load "
        "worker, and the overlays use cyclic colormaps, whose numba kernels are cached on disk "
        "(a direct colormap compiles for 1.5-2 s in every session, holding the GIL).",
        "- For comparison: the first version of this explorer (overlays added on each "
        "selection with direct colormaps) measured 2,843 ms for the selection, 127 ms for a "
        "gallery page and 652 ms to open the level; the segmentation slot before issue 12 "
        "froze the GUI for 1.7-2.0 s on a LINCS field (numba compiling the boundary colormap "
        "on the GUI thread).",
    ]
    return "\n".join(lines), {"segmentation": seg, "explorer": exp}


if __name__ == "__main__":
    body, _ = run()
    print(body)
