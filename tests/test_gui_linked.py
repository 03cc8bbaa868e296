"""The linked explorer of issue 12 in a real napari.Viewer (Xvfb): selections drawn on 2D,
z-projection, single-slice and native-3D embeddings; overlays that follow the selection and
go with it; the gallery of the selected cells; masked rows counted apart; the last load wins;
the user-started analysis; closing leaves no process behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
from qtpy.QtCore import Qt

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (scripts/test.sh)"),
]

IMAGE = "20210305_NE_mockData2_001"


@pytest.fixture
def viewer():
    import napari

    v = napari.Viewer(show=False)
    yield v
    v.close()


@pytest.fixture(scope="module")
def sample_store(sample_dir):
    return sample_dir / "embeddings" / "imc_default.zarr"


def _add_image(viewer, image, labels=None):
    from napari_maeprobe._napari.layers import image_layers, labels_layer

    for data, meta, _ in image_layers(image):
        viewer.add_image(data, **meta)
    if labels is not None:
        lab, meta, _ = labels_layer(labels, f"{image.name} cells", image.scale)
        viewer.add_labels(lab, **meta)


def _explorer(viewer, qtbot, store, level):
    from napari_maeprobe._napari.explorer_widget import ExplorerWidget

    widget = ExplorerWidget(viewer)
    qtbot.addWidget(widget)
    with qtbot.waitSignal(widget.loaded, timeout=120_000):
        widget.load(store, level)
    return widget


def _lasso(widget, fraction=(0.2, 0.8)):
    """Draw a lasso over the middle of the scatter with the canvas's own mouse events."""
    canvas = widget.scatter
    canvas.set_tool("lasso")
    w, h = canvas._canvas.size
    lo, hi = fraction
    path = np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]]) * (w, h)
    ev = canvas._canvas.events
    ev.mouse_press(pos=path[0], button=1, modifiers=())
    for p in path[1:]:
        ev.mouse_move(pos=p, button=1, modifiers=())
    ev.mouse_release(pos=path[0], button=1, modifiers=())
    return canvas.selected()


def _overlays(viewer):
    """The explorer's overlays that draw something (blank ones wait for the next selection)."""
    from napari_maeprobe._napari.layers import is_overlay

    return {ly.name: ly for ly in viewer.layers
            if is_overlay(ly) and ly.visible and np.asarray(ly.data).any()}  # fmt: skip


def _process_ended(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _analysed_store(tmp_path_factory, name, image, labels, **job):
    """A store of a real image embedded by the default model and analysed in this process."""
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.tl.analyze import AnalysisSettings, analyze_store

    store = tmp_path_factory.mktemp(name) / f"{name}.zarr"
    run_embedding([image], store, EmbedJob(**job), [labels])
    analyze_store(EmbeddingStore(store, mode="a"), None, AnalysisSettings(umap_max_fit=5_000))
    return store


@pytest.fixture(scope="module")
def nuclei3d():
    from napari_maeprobe.io.samples import load_sample

    return load_sample("nuclei3d")


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory):
    """The IMC sample with random masking, attention and reconstructions (patch + cells)."""
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    return _analysed_store(tmp_path_factory, "masked", image, labels,
                           levels=("global", "patch"), masking="random", attention=True,
                           reconstruction=True)  # fmt: skip


# --------------------------------------------------------------------------- 2D selections


def test_selection_overlays_follow_the_selection_and_go_with_it(viewer, qtbot, sample_store):
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    _add_image(viewer, image, labels)
    widget = _explorer(viewer, qtbot, sample_store, "patch")
    widget.attention_check.setChecked(True)
    with qtbot.waitSignal(widget.layers_updated, timeout=30_000):
        rows = _lasso(widget)
    assert 0 < len(rows) < widget.data.n
    layers = _overlays(viewer)
    assert set(layers) == {f"{IMAGE} selected patches", f"{IMAGE} selected cells",
                           f"{IMAGE} attention (selected cells)"}  # fmt: skip
    # the patches: every selected patch's 12 x 12 footprint is lit, nothing outside them is
    drawn = np.asarray(layers[f"{IMAGE} selected patches"].data) > 0
    covered = np.zeros(labels.shape, dtype=bool)
    p = widget.data.patch_size[0]
    sel = widget.data.obs.iloc[rows]
    for y, x in zip(sel.centroid_y, sel.centroid_x):
        y0, x0 = int(np.floor(y - p / 2 + 0.5)), int(np.floor(x - p / 2 + 0.5))
        ys, xs = slice(max(y0, 0), max(y0 + p, 0)), slice(max(x0, 0), max(x0 + p, 0))
        covered[ys, xs] = True
        assert drawn[ys, xs].all()
    assert not drawn[~covered].any()
    # the cells: each selected cell keeps its own id, nothing else is drawn
    obs = widget.data.obs.iloc[rows]
    cells = set(obs["cell_id"].dropna().astype(int))
    drawn = np.asarray(layers[f"{IMAGE} selected cells"].data)
    assert set(np.unique(drawn)) - {0} == cells
    np.testing.assert_array_equal(drawn > 0, np.isin(labels, list(cells)))
    # attention: in [0, 1], reaching 1 in every selected cell, nothing outside them
    att = np.asarray(layers[f"{IMAGE} attention (selected cells)"].data)
    assert att.min() >= 0 and att.max() <= 1.0
    assert not att[~np.isin(labels, list(cells))].any()
    for cell in list(cells)[:5]:
        assert att[labels == cell].max() == pytest.approx(1.0)
    # nothing is left on the image when the selection is cleared
    with qtbot.waitSignal(widget.layers_updated, timeout=10_000):
        qtbot.mouseClick(widget.clear_button, Qt.MouseButton.LeftButton)
    assert _overlays(viewer) == {}
    assert f"{IMAGE} attention (selected cells)" not in viewer.layers
    assert widget.gallery.tiles == [] and widget.gallery._grid.count() == 0


def test_the_data_widget_never_takes_the_overlays_as_channels(viewer, qtbot, sample_store):
    from napari_maeprobe._napari.widgets import DataWidget
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    _add_image(viewer, image, labels)
    data_widget = DataWidget(viewer)
    qtbot.addWidget(data_widget)
    before = data_widget.current_image().n_channels
    widget = _explorer(viewer, qtbot, sample_store, "patch")
    widget.attention_check.setChecked(True)
    with qtbot.waitSignal(widget.layers_updated, timeout=30_000):
        _lasso(widget)
    assert len(_overlays(viewer)) == 3
    data_widget.refresh()
    assert data_widget.current_image().n_channels == before == image.n_channels


def test_level_change_clears_the_overlays(viewer, qtbot, sample_store):
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    _add_image(viewer, image, labels)
    widget = _explorer(viewer, qtbot, sample_store, "patch")
    with qtbot.waitSignal(widget.layers_updated, timeout=30_000):
        _lasso(widget)
    assert _overlays(viewer)
    with qtbot.waitSignals([widget.loaded, widget.layers_updated], timeout=60_000):
        widget.level.setCurrentIndex(widget.level.findData("global"))
    assert widget.data.level == "global"
    assert _overlays(viewer) == {}
    assert f"{IMAGE} selected patches" not in viewer.layers  # not a thing at the cell levels
    # at the cell levels the overlay is called what it shows
    with qtbot.waitSignal(widget.layers_updated, timeout=30_000):
        _lasso(widget)
    assert set(_overlays(viewer)) == {f"{IMAGE} selected cells"}


# --------------------------------------------------------------------------- the gallery


def test_gallery_shows_the_selected_cells_with_input_mask_and_reconstruction(
    viewer, qtbot, masked_store
):
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    _add_image(viewer, image, labels)
    widget = _explorer(viewer, qtbot, masked_store, "patch")
    data = widget.data
    valid = np.isfinite(np.asarray(data.adata.X)).all(axis=1)
    # masked rows are counted apart from the plotted ones
    assert 0 < valid.sum() < data.n
    assert f"{valid.sum():,} embedded" in widget.source_label.text()
    assert f"{data.n - valid.sum():,} masked" in widget.source_label.text()
    with qtbot.waitSignal(widget.gallery_updated, timeout=60_000):
        rows = _lasso(widget, (0.05, 0.95))
    selected_cells = set(zip(data.obs["image"].astype(str).iloc[rows],
                             data.obs["cell_id"].iloc[rows].astype(int)))  # fmt: skip
    tiles = widget.gallery.tiles
    assert 0 < len(tiles) <= widget.gallery.per_page.value()
    for tile in tiles:
        assert (tile.image, tile.cell_id) in selected_cells
        assert {"input", "attention", "masked", "reconstruction"} <= set(tile.panels)
        for rgb in tile.panels.values():
            assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3
    assert widget.gallery.total == len(selected_cells)
    # the next page shows other cells of the selection
    first = {(t.image, t.cell_id) for t in tiles}
    if widget.gallery.total > len(tiles):
        with qtbot.waitSignal(widget.gallery_updated, timeout=60_000):
            qtbot.mouseClick(widget.gallery.next_button, Qt.MouseButton.LeftButton)
        second = {(t.image, t.cell_id) for t in widget.gallery.tiles}
        assert second and not (second & first) and second <= selected_cells
    # clicking a cell centres the viewer on it and lights up its points
    tile = widget.gallery.tiles[0]
    widget.centre_on_tile(0)
    np.testing.assert_allclose(viewer.camera.center[-2:], tile.centre[-2:], atol=1.0)
    obs = data.obs
    mine = ((obs["image"].astype(str) == tile.image) & (obs["cell_id"] == tile.cell_id)).to_numpy()
    np.testing.assert_array_equal(widget.scatter.highlighted(), np.flatnonzero(mine))


def test_masked_rows_are_not_exported_as_nan_rows(viewer, qtbot, masked_store, tmp_path):
    import anndata as ad

    widget = _explorer(viewer, qtbot, masked_store, "patch")
    out = ad.read_h5ad(widget.export(tmp_path / "patch.h5ad"))
    X = np.asarray(out.X)
    assert np.isfinite(X).all()
    assert out.n_obs == widget.embedded < widget.data.n


# --------------------------------------------------------------------------- z-stacks


@pytest.mark.parametrize("mode", ["max", "slice"])
def test_selection_on_a_2d_embedding_of_a_z_stack(viewer, qtbot, tmp_path_factory, nuclei3d,
                                                  mode):  # fmt: skip
    """Before: "could not broadcast input array from shape (3,) into shape (2,)" and nothing
    drawn. The viewer holds the 3D stack; the embedding is of its projection or one slice."""
    from napari_maeprobe.pp.preprocessing import project_z

    image, labels = nuclei3d
    flat = project_z(image, mode, image.data.shape[1] // 2 if mode == "slice" else None)
    flat_labels = labels.max(axis=0) if mode == "max" else labels[labels.shape[0] // 2]
    from skimage.measure import label as relabel

    flat_labels = relabel(flat_labels > 0).astype(np.int32)
    store = _analysed_store(tmp_path_factory, f"z{mode}", flat, flat_labels,
                            levels=("global", "patch"))  # fmt: skip
    _add_image(viewer, image)  # the 3D stack, as a user has it open
    widget = _explorer(viewer, qtbot, store, "patch")
    with qtbot.waitSignal(widget.layers_updated, timeout=30_000):
        rows = _lasso(widget, (0.05, 0.95))
    assert len(rows)
    layer = viewer.layers[f"{image.name} selected patches"]
    assert layer.ndim == 2 and np.asarray(layer.data).shape == image.data.shape[-2:]
    assert np.asarray(layer.data).any()
    stack = viewer.layers[image.channel_names[0]] if image.n_channels > 1 else None
    stack = stack or next(ly for ly in viewer.layers if ly.ndim == 3)
    np.testing.assert_allclose(layer.scale, stack.scale[-2:])
    # a click on a highlighted pixel of any plane finds its patch rows
    y, x = np.argwhere(np.asarray(layer.data))[0]
    got = widget.click_world((float(image.data.shape[1] // 2), float(y), float(x)))
    assert len(got) > 0


def test_selection_on_a_native_3d_embedding_draws_3d_patch_boxes(
    viewer, qtbot, tmp_path_factory, nuclei3d
):
    image, labels = nuclei3d
    small = dict(in_chans=1, input_size=(40, 64, 64), depth=2, embed_dim=96, num_heads=4,
                 decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    # untrained and small (no mae3d weights ship): the geometry is what is checked
    store = _analysed_store(tmp_path_factory, "native3d", image, labels, model="mae3d",
                            random_init=True, model_options=small, crop_size=(40, 64, 64),
                            levels=("global", "patch"), attention=True)  # fmt: skip
    _add_image(viewer, image, labels)
    viewer.dims.ndisplay = 3
    widget = _explorer(viewer, qtbot, store, "patch")
    assert len(widget.data.patch_size) == 3
    with qtbot.waitSignal(widget.layers_updated, timeout=60_000):
        rows = _lasso(widget, (0.05, 0.95))
    layer = viewer.layers[f"{image.name} selected patches"]
    drawn = np.asarray(layer.data)
    assert layer.ndim == 3 and drawn.shape == labels.shape
    from napari_maeprobe.pl.linking import patch_boxes

    boxes = patch_boxes(widget.data.obs.iloc[rows], widget.data.patch_size)
    inside = (boxes[:, :3] >= 0).all(axis=1) & (boxes[:, 3:] <= labels.shape).all(axis=1)
    for z0, y0, x0, z1, y1, x1 in boxes[inside][:50]:  # every voxel of a selected box is lit
        assert drawn[z0:z1, y0:y1, x0:x1].all()
    assert drawn.sum() <= len(rows) * int(np.prod(widget.data.patch_size))
    # the gallery shows the middle plane of each 3D crop, attention included
    qtbot.waitUntil(lambda: bool(widget.gallery.tiles), timeout=60_000)
    tile = widget.gallery.tiles[0]
    assert {"input", "attention"} <= set(tile.panels) and "middle plane" in tile.plane


# --------------------------------------------------------------------------- loads and analysis


def test_a_late_load_does_not_replace_a_newer_one(viewer, qtbot, sample_store, monkeypatch):
    import threading

    import napari_maeprobe._napari.explorer_widget as ew

    real_load = ew.load_level
    newer_shown = threading.Event()
    older_done = threading.Event()

    def slow_load(path, level="patch"):
        if level == "patch":  # the older request: answers only after the newer one is shown
            newer_shown.wait(60)
            try:
                return real_load(path, level)
            finally:
                older_done.set()
        return real_load(path, level)

    monkeypatch.setattr(ew, "load_level", slow_load)
    widget = ew.ExplorerWidget(viewer)
    qtbot.addWidget(widget)
    shown = []
    widget.loaded.connect(lambda data: shown.append(data.level))
    widget.loaded.connect(lambda data: newer_shown.set())
    widget.load(sample_store, "patch")
    widget.load(sample_store, "channel")
    qtbot.waitUntil(older_done.is_set, timeout=60_000)
    qtbot.waitUntil(lambda: not widget._res.workers, timeout=60_000)
    qtbot.wait(200)
    assert shown == ["channel"]  # the late patch answer was dropped
    assert widget.data.level == "channel"


def test_analysis_is_started_by_the_user_and_can_be_cancelled(viewer, qtbot, tmp_path):
    import psutil

    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    store = tmp_path / "fresh.zarr"
    run_embedding([image], store, EmbedJob(levels=("global", "channel")), [labels])
    from napari_maeprobe._napari.explorer_widget import ExplorerWidget

    widget = ExplorerWidget(viewer)
    qtbot.addWidget(widget)
    with qtbot.waitSignal(widget.not_analysed, timeout=60_000):
        widget.load(store, "channel")
    assert widget.data is None and "not analysed" in widget.source_label.text()
    assert widget.tabs.currentWidget() is widget.analyse_tab
    assert EmbeddingStore(store).analysed_levels() == []  # nothing started by itself
    # cancel a running analysis (its first stage reported): nothing half-written is left
    qtbot.mouseClick(widget.analyse_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "(1 of 2)" in widget.stage.text(), timeout=120_000)
    with qtbot.waitSignal(widget.analysis_finished, timeout=30_000) as ended:
        qtbot.mouseClick(widget.cancel_analysis_button, Qt.MouseButton.LeftButton)
    assert ended.args == ["cancelled"]
    assert "cancelled" in widget.stage.text()
    after = EmbeddingStore(store)
    assert "channel" not in after.analysed_levels()  # the level being worked on: no results
    for level in after.analysed_levels():  # a level saved before the cancel is whole
        assert after.read_analysis(level) is not None
    # run it: the stages are shown with counts, then the scatter fills in
    stages = []
    widget.progress.valueChanged.connect(lambda _: stages.append(widget.stage.text()))
    with qtbot.waitSignal(widget.loaded, timeout=300_000):
        qtbot.mouseClick(widget.analyse_button, Qt.MouseButton.LeftButton)
    assert widget.data.level == "channel" and "X_umap" in widget.data.adata.obsm
    assert any("analysing" in s for s in stages)
    pid = widget._res.analysis.pid
    assert pid is not None and psutil.pid_exists(pid)
    # shutting the explorer down (what closing its dock or the viewer does) ends the process
    widget.shutdown()
    qtbot.waitUntil(lambda: _process_ended(pid), timeout=10_000)


def test_closing_the_viewer_leaves_no_child_process(qtbot, tmp_path, sample_store):
    import napari
    import psutil

    from napari_maeprobe._napari.explorer_widget import ExplorerWidget

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    v = napari.Viewer(show=False)
    widget = ExplorerWidget(v)
    v.window.add_dock_widget(widget, name="explorer")
    with qtbot.waitSignal(widget.loaded, timeout=60_000):
        widget.load(sample_store, "channel")
    widget._res.analysis = __import__(
        "napari_maeprobe.tl.analysis_process", fromlist=["AnalysisProcess"]
    ).AnalysisProcess()
    widget._res.analysis.start()
    child = widget._res.analysis.pid
    assert child is not None and psutil.pid_exists(child)
    v.close()
    qtbot.wait(200)

    def gone() -> bool:
        alive = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return not alive

    qtbot.waitUntil(gone, timeout=15_000)


def test_a_wrong_folder_says_one_line_in_gui_words(viewer, qtbot, tmp_path, monkeypatch):
    import napari_maeprobe._napari.explorer_widget as ew

    said: list[str] = []
    monkeypatch.setattr(ew, "_error", lambda exc: said.append(ew.gui_message(exc)))
    widget = ew.ExplorerWidget(viewer)
    qtbot.addWidget(widget)
    widget.load(tmp_path)  # an empty folder, not a store
    qtbot.waitUntil(lambda: bool(said), timeout=30_000)
    assert len(said) == 1 and "\n" not in said[0]
    assert "not an embedding store" in said[0]
    assert "maeprobe embed" not in said[0] and "--" not in said[0]
    assert widget.data is None


def test_closing_the_dock_ends_its_analysis_process(viewer, qtbot, sample_store):
    import psutil

    from napari_maeprobe._napari.explorer_widget import ExplorerWidget
    from napari_maeprobe.tl.analysis_process import AnalysisProcess

    widget = ExplorerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="explorer")
    qtbot.wait(50)
    widget._res.analysis = AnalysisProcess()
    widget._res.analysis.start()
    pid = widget._res.analysis.pid
    assert psutil.pid_exists(pid)
    viewer.window.remove_dock_widget(widget)  # what the dock's close button does

    qtbot.waitUntil(lambda: _process_ended(pid), timeout=10_000)
    assert widget._res.closed


def test_three_docks_fit_a_1080p_screen(qtbot):
    """Data, Embed and Explorer opened from the Plugins menu on a 1920 x 1080 window: the window
    does not outgrow the screen, the canvas keeps at least half its width, the scatter its
    height."""
    import napari

    v = napari.Viewer(show=True)
    try:
        win = v.window._qt_window
        win.resize(1920, 1080)
        for name in ("Data and segmentation", "Embed",
                     "Explorer (linked scatter, diagnostics, export)"):  # fmt: skip
            v.window.add_plugin_dock_widget("napari-maeprobe", name)
        qtbot.wait(300)
        win.resize(1920, 1080)
        qtbot.wait(300)
        assert win.minimumSizeHint().height() <= 1080
        assert win.height() <= 1080
        canvas = v.window._qt_viewer.canvas.native
        assert canvas.width() >= win.width() / 2
        from napari_maeprobe._napari.hub import hub_for

        explorer = hub_for(v).explorer
        assert explorer.isVisible() and explorer.scatter.height() >= 300
    finally:
        v.close()


def test_a_real_mouse_click_on_a_cell_lights_up_its_points(qtbot, sample_store):
    """A Qt mouse press and release on napari's canvas, over a cell: the explorer highlights that
    cell's rows in the scatter (the viewer's own mouse callbacks, no shortcut)."""
    import napari
    from qtpy.QtCore import QPoint

    from napari_maeprobe._napari.explorer_widget import ExplorerWidget
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    v = napari.Viewer(show=True)
    try:
        _add_image(v, image, labels)
        widget = ExplorerWidget(v)
        v.window.add_dock_widget(widget, name="explorer")
        with qtbot.waitSignal(widget.loaded, timeout=60_000):
            widget.load(sample_store, "global")
        cell = int(np.bincount(labels.ravel())[1:].argmax() + 1)  # the largest cell
        y, x = np.argwhere(labels == cell).mean(axis=0)
        y, x = np.argwhere(labels == cell)[np.argmin(np.hypot(*(np.argwhere(labels == cell)
                                                               - (y, x)).T))]  # fmt: skip
        v.camera.center = (float(y), float(x))
        v.camera.zoom = 6.0
        qtbot.wait(200)
        canvas = v.window._qt_viewer.canvas.native
        centre = QPoint(canvas.width() // 2, canvas.height() // 2)
        qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=centre)
        qtbot.waitUntil(lambda: len(widget.last_clicked) > 0, timeout=5_000)
        obs = widget.data.obs
        want = np.flatnonzero(((obs["image"] == IMAGE) & (obs["cell_id"] == cell)).to_numpy())
        np.testing.assert_array_equal(widget.last_clicked, want)
        np.testing.assert_array_equal(widget.scatter.highlighted(), want)
        widget.shutdown()
    finally:
        v.close()


def test_gallery_splits_a_multichannel_layer_napari_did_not_split(viewer, qtbot, sample_store):
    """A (C, Y, X) layer as napari's own TIFF reader opens it: the gallery shows its channels in
    distinct colours (before: the maximum over channels, called a z projection)."""
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    viewer.add_image(np.asarray(image.data), name=IMAGE)  # one layer, channels first
    widget = _explorer(viewer, qtbot, sample_store, "global")
    views = widget._channel_views({IMAGE})[IMAGE]
    assert len(views) == image.n_channels
    assert len({v.rgb for v in views}) == image.n_channels
    with qtbot.waitSignal(widget.gallery_updated, timeout=60_000):
        widget.scatter.select(np.arange(10))
    tile = widget.gallery.tiles[0]
    assert tile.plane == ""  # not taken for a z-stack
    rgb = tile.panels["input"].reshape(-1, 3).astype(int)
    assert (rgb.max(axis=0) > 40).sum() >= 2  # more than one hue: the channels, composited


def test_a_closed_explorer_lets_go_of_the_viewer(viewer, qtbot, sample_store):
    from napari_maeprobe._napari.dock import ExplorerDock
    from napari_maeprobe._napari.hub import hub_for

    widget = ExplorerDock(viewer)
    viewer.window.add_dock_widget(widget, name="explorer")
    with qtbot.waitSignal(widget.loaded, timeout=60_000):
        widget.load(sample_store, "global")
    hub = hub_for(viewer)
    assert hub.explorer is widget
    viewer.window.remove_dock_widget(widget)  # the dock's close button
    qtbot.wait(100)
    assert hub.explorer is None
    assert widget._on_viewer_click not in viewer.mouse_drag_callbacks
    loads = []
    widget.loaded.connect(loads.append)
    hub.store_ready.emit(sample_store)  # a later embed: the closed explorer does not load it
    qtbot.wait(500)
    assert loads == [] and not widget._res.workers


def test_a_new_selection_starts_most_typical_first_after_a_resample(viewer, qtbot, sample_store):
    from napari_maeprobe.io.samples import load_sample

    image, labels = load_sample("imc")
    _add_image(viewer, image, labels)
    widget = _explorer(viewer, qtbot, sample_store, "global")
    with qtbot.waitSignal(widget.gallery_updated, timeout=60_000):
        widget.scatter.select(np.arange(30))
    with qtbot.waitSignal(widget.gallery_updated, timeout=60_000):
        qtbot.mouseClick(widget.gallery.resample_button, Qt.MouseButton.LeftButton)
    assert "random" in widget.gallery.header.text()
    with qtbot.waitSignal(widget.gallery_updated, timeout=60_000):
        widget.scatter.select(np.arange(20, 50))
    with qtbot.waitSignal(widget.gallery_updated, timeout=60_000):
        qtbot.mouseClick(widget.gallery.next_button, Qt.MouseButton.LeftButton)
    assert "most typical first" in widget.gallery.header.text()
    first_two_pages = widget._order
    from napari_maeprobe.pl.gallery import order_cells

    want = order_cells(widget.data, np.arange(20, 50))
    assert list(first_two_pages["cell_id"]) == list(want["cell_id"])
