"""Take the user guide's screenshots from the real GUI (re-runnable).

Run from the repository root under a display, e.g.
``xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python scripts/make_screenshots.py``.
Writes docs/images/*.png at 1920 x 1080: the data and segmentation widget, the embed widget,
the explorer on the ExampleHuman field (the Analyse tab, a Leiden cluster with its patches and
cells, the gallery of what the model saw, attention on the image, colour by patch row), a
selection on a native-3D embedding in napari's 3D view, and the sample with precomputed
embeddings.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
SIZE = (1920, 1080)


def _settle(seconds: float = 0.5) -> None:
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


def _viewer(title: str):
    import napari

    viewer = napari.Viewer(title=title)
    viewer.window._qt_window.resize(*SIZE)
    return viewer


def _shot(viewer, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    viewer.window._qt_window.resize(*SIZE)
    _settle(0.3)
    viewer.screenshot(str(OUT / f"{name}.png"), canvas_only=False, flash=False)
    print(f"wrote {OUT / name}.png")


def _grab(widget, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    widget.grab().save(str(OUT / f"{name}.png"))
    print(f"wrote {OUT / name}.png")


def _pick_cluster(explorer, min_rows: int = 300) -> None:
    """Select the Leiden cluster with the most foreground patches among those of some size."""
    obs = explorer.data.obs
    sizes = obs["leiden"].value_counts()
    if "foreground" in obs:
        fg = obs.groupby("leiden", observed=True)["foreground"].mean()
        cluster = fg[sizes[fg.index] > min_rows].idxmax()
    else:
        cluster = sizes.index[len(sizes) // 2]
    row = int(np.flatnonzero((obs["leiden"] == cluster).to_numpy())[0])
    explorer.scatter.pick_cluster(row, "leiden")
    _wait(lambda: bool(explorer.gallery.tiles), 120)
    _settle(1.0)


def data_and_embed() -> None:
    from napari_maeprobe._napari.dock import DataDock, EmbedDock

    viewer = _viewer("maeprobe")
    viewer.open_sample("napari-maeprobe", "examplehuman")
    data = DataDock(viewer)
    viewer.window.add_dock_widget(data, name="Data and segmentation", area="right")
    data.refresh()
    _settle()
    data.run_segmentation()
    _wait(lambda: not data.is_running)
    _settle(1.0)
    _shot(viewer, "data_widget")
    embed = EmbedDock(viewer)
    viewer.window.add_dock_widget(embed, name="Embed", area="right")
    _settle(1.0)
    _shot(viewer, "embed_widget")
    viewer.close()


def explorer_2d() -> None:
    """ExampleHuman (512 x 512, 346 cells) embedded by the default model with attention maps,
    random masking and reconstructions, analysed from the Analyse tab."""
    from napari_maeprobe._napari.dock import ExplorerDock
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.io.samples import load_sample
    from napari_maeprobe.pp.segmentation import segment

    image, _ = load_sample("examplehuman")
    labels = segment(image, "builtin").labels
    store = Path(tempfile.mkdtemp(prefix="maeprobe-shots-")) / "examplehuman.zarr"
    job = EmbedJob(attention=True, reconstruction=True, masking="random")
    run_embedding([image], store, job, [labels])
    viewer = _viewer("maeprobe explorer")
    viewer.open_sample("napari-maeprobe", "examplehuman")
    viewer.add_labels(labels, name=f"{image.name} cells", opacity=0.25)
    explorer = ExplorerDock(viewer)
    viewer.window.add_dock_widget(explorer, name="maeprobe explorer", area="right")
    explorer.load(store, "patch")
    _wait(lambda: explorer.tabs.currentWidget() is explorer.analyse_tab)
    _settle(0.5)
    _shot(viewer, "explorer_analyse")
    explorer.start_analysis()
    _wait(lambda: explorer.data is not None, timeout=900)
    _settle(1.0)
    _pick_cluster(explorer)
    _shot(viewer, "explorer_cluster_patches")
    _grab(explorer, "explorer_gallery")
    explorer.attention_check.setChecked(True)
    _wait(lambda: any(ly.name.endswith("attention (selected cells)") for ly in viewer.layers))
    for layer in viewer.layers:
        if layer.name.endswith("selected patches"):
            layer.visible = False
    _settle(1.0)
    _shot(viewer, "explorer_attention")
    explorer.clear_selection()
    explorer.colour.setCurrentText("patch_row")
    _settle(1.0)
    _shot(viewer, "explorer_by_patch_row")
    explorer.shutdown()
    viewer.close()


def explorer_3d() -> None:
    """A native-3D embedding of the nuclei z-stack (a small untrained mae3d: no 3D weights
    ship, so this shows the geometry, not biology) with a selection in napari's 3D view."""
    from napari_maeprobe._napari.dock import ExplorerDock
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.io.samples import load_sample
    from napari_maeprobe.tl.analyze import analyze_store

    image, labels = load_sample("nuclei3d")
    small = dict(in_chans=1, input_size=(40, 64, 64), depth=2, embed_dim=96, num_heads=4,
                 decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    job = EmbedJob(model="mae3d", random_init=True, model_options=small, crop_size=(40, 64, 64),
                   levels=("global", "patch"), attention=True)  # fmt: skip
    store = Path(tempfile.mkdtemp(prefix="maeprobe-shots-")) / "nuclei3d.zarr"
    run_embedding([image], store, job, [labels])
    analyze_store(EmbeddingStore(store, mode="a"))
    viewer = _viewer("maeprobe 3D")
    viewer.open_sample("napari-maeprobe", "nuclei3d")
    explorer = ExplorerDock(viewer)
    viewer.window.add_dock_widget(explorer, name="maeprobe explorer", area="right")
    explorer.load(store, "patch")
    _wait(lambda: explorer.data is not None, timeout=300)
    viewer.dims.ndisplay = 3
    viewer.camera.angles = (0.0, 35.0, 60.0)
    from napari_maeprobe._napari.layers import is_overlay

    for layer in viewer.layers:  # the cells' random colours would hide the selected boxes
        if layer.__class__.__name__ == "Labels" and not is_overlay(layer):
            layer.visible = False
    _pick_cluster(explorer, min_rows=100)
    _settle(1.5)
    _shot(viewer, "explorer_3d_selection")
    explorer.shutdown()
    viewer.close()


def sample_with_embeddings() -> None:
    from napari_maeprobe._napari.hub import hub_for

    viewer = _viewer("maeprobe sample")
    viewer.open_sample("napari-maeprobe", "imc_embeddings")
    hub = hub_for(viewer)
    _wait(lambda: hub.explorer is not None and hub.explorer.data is not None)
    _settle(1.0)
    _shot(viewer, "sample_with_embeddings")
    hub.explorer.shutdown()
    viewer.close()


def main() -> None:
    data_and_embed()
    explorer_2d()
    explorer_3d()
    sample_with_embeddings()


if __name__ == "__main__":
    import sys

    steps = {f.__name__: f for f in (data_and_embed, explorer_2d, explorer_3d,
                                     sample_with_embeddings)}  # fmt: skip
    for name in sys.argv[1:] or list(steps):
        steps[name]()
