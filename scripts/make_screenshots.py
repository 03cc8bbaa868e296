"""Take the user guide's screenshots from the real GUI (re-runnable).

Run from the repository root under a display, e.g.
``xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots.py``.
Writes docs/images/*.png: the data and segmentation widget, the embed widget, the explorer
with a Leiden cluster selected and its patches, cells and attention maps on the image, and the
sample with precomputed embeddings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def _settle(viewer, seconds: float = 0.5) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def _wait(predicate, timeout: float = 300.0) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > end:
            raise TimeoutError("the GUI did not get there in time")
        QApplication.processEvents()
        time.sleep(0.05)


def _shot(viewer, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(OUT / f"{name}.png"), canvas_only=False, flash=False)
    print(f"wrote {OUT / name}.png")


def main() -> None:
    import napari

    from napari_maeprobe._napari.dock import DataDock, EmbedDock
    from napari_maeprobe._napari.hub import hub_for

    # 1. data and segmentation on the ExampleHuman sample
    viewer = napari.Viewer(title="maeprobe")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-maeprobe", "examplehuman")
    data = DataDock(viewer)
    viewer.window.add_dock_widget(data, name="Data and segmentation", area="right")
    data.refresh()
    _settle(viewer)
    data.run_segmentation()
    _wait(lambda: not data.is_running)
    _settle(viewer, 1.0)
    _shot(viewer, "data_widget")

    # 2. the embed widget beside it
    embed = EmbedDock(viewer)
    viewer.window.add_dock_widget(embed, name="Embed", area="right")
    _settle(viewer, 1.0)
    _shot(viewer, "embed_widget")
    viewer.close()

    # 3. the explorer on ExampleHuman (512x512, 346 cells) embedded by the default model with
    #    attention maps; a Leiden cluster of foreground patches selected
    import tempfile

    from napari_maeprobe._napari.dock import ExplorerDock
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.io.samples import load_sample
    from napari_maeprobe.pp.segmentation import segment

    image, _ = load_sample("examplehuman")
    labels = segment(image, "builtin").labels
    store = Path(tempfile.mkdtemp(prefix="maeprobe-shots-")) / "examplehuman.zarr"
    run_embedding([image], store, EmbedJob(attention=True), [labels])
    viewer = napari.Viewer(title="maeprobe explorer")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-maeprobe", "examplehuman")
    viewer.add_labels(labels, name=f"{image.name} cells", opacity=0.25)
    explorer = ExplorerDock(viewer)
    viewer.window.add_dock_widget(explorer, name="maeprobe explorer", area="right")
    explorer.load(store, "patch")  # analyses the store first, in a separate process
    _wait(lambda: explorer.data is not None, timeout=600)
    obs = explorer.data.obs
    sizes = obs["leiden"].value_counts()
    fg = obs.groupby("leiden", observed=True)["foreground"].mean()
    cluster = fg[sizes[fg.index] > 300].idxmax()  # the most foreground cluster of some size
    row = int(np.flatnonzero((obs["leiden"] == cluster).to_numpy())[0])
    explorer.scatter.pick_cluster(row, "leiden")
    _settle(viewer, 1.5)
    for layer in viewer.layers:
        if layer.name.endswith("attention"):
            layer.visible = False
    _shot(viewer, "explorer_cluster_patches")
    for layer in viewer.layers:
        if layer.name.endswith("attention"):
            layer.visible = True
        if layer.name.endswith("selected patches"):
            layer.visible = False
    _settle(viewer, 0.5)
    _shot(viewer, "explorer_attention")
    explorer.colour.setCurrentText("patch_row")
    _settle(viewer, 0.5)
    _shot(viewer, "explorer_by_patch_row")
    viewer.close()

    # 4. the quick start: File > Open Sample > IMC with precomputed embeddings
    viewer = napari.Viewer(title="maeprobe sample")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-maeprobe", "imc_embeddings")
    hub = hub_for(viewer)
    _wait(lambda: hub.explorer is not None and hub.explorer.data is not None)
    _settle(viewer, 1.0)
    _shot(viewer, "sample_with_embeddings")
    viewer.close()


if __name__ == "__main__":
    main()
