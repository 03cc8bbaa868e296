"""The gallery of what the model saw, on real embeddings: the IMC sample embedded with random
masking, attention maps and reconstructions, and the nuclei z-stack embedded as its maximum
projection. Panels are checked against compositions made here by hand from the raw pixels, the
labels and the stored maps."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.embed.store import EmbeddingStore
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pl.gallery import (
    DIM,
    GREY,
    PANELS,
    ChannelView,
    cell_tiles,
    order_cells,
)
from napari_maeprobe.pl.linking import ExplorerData
from napari_maeprobe.table import read_level

COLOURS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 1.0)]
CROP = 96


def _data(store: EmbeddingStore, level: str) -> ExplorerData:
    facts = store.facts
    return ExplorerData(read_level(store, level), patch_size=tuple(facts["patch_size"]),
                        crop_size=tuple(facts["crop_size"]), store=store)  # fmt: skip


@pytest.fixture(scope="module")
def imc_store(tmp_path_factory, imc):
    image, labels = imc
    out = tmp_path_factory.mktemp("gallery") / "imc.zarr"
    job = EmbedJob(model="default", attention=True, reconstruction=True, masking="random",
                   levels=("global", "patch"))  # fmt: skip
    run_embedding([image], out, job, [labels])
    return EmbeddingStore(out)


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, imc):
    """The same image embedded without masking, attention or reconstructions."""
    image, labels = imc
    out = tmp_path_factory.mktemp("gallery") / "plain.zarr"
    run_embedding([image], out, EmbedJob(model="default", levels=("global",)), [labels])
    return EmbeddingStore(out)


@pytest.fixture(scope="module")
def views(imc):
    image, _ = imc
    raw = image.to_numpy()
    return [ChannelView(n, raw[i], COLOURS[i]) for i, n in enumerate(image.channel_names)]


def _hand_window(raw: np.ndarray, origin) -> np.ndarray:
    """The raw crop window at ``origin`` (last two axes), NaN outside the image."""
    out = np.full(raw.shape[:-2] + (CROP, CROP), np.nan)
    y0, x0 = (int(v) for v in origin[-2:])
    h, w = raw.shape[-2:]
    ys, xs = slice(max(0, y0), min(h, y0 + CROP)), slice(max(0, x0), min(w, x0 + CROP))
    out[..., ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = raw[..., ys, xs]
    return out


def _hand_values(windows: np.ndarray, limits=None) -> np.ndarray:
    """Each channel scaled by its limits (default: its 1st/99.5th percentile in the window)."""
    vals = []
    for i, w in enumerate(windows):
        lim = limits[i] if limits is not None and limits[i] is not None else None
        lo, hi = lim if lim is not None else np.percentile(w[np.isfinite(w)], (1, 99.5))
        vals.append(np.nan_to_num(np.clip((w - lo) / (hi - lo if hi > lo else 1.0), 0, 1)))
    return np.stack(vals)


def _hand_rgb(values: np.ndarray, colours) -> np.ndarray:
    rgb = np.zeros(values.shape[1:] + (3,))
    for v, c in zip(values, colours):
        rgb += v[..., None] * np.asarray(c)
    return np.clip(rgb, 0, 1)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.int16)


def _some_cells(data: ExplorerData, labels: np.ndarray, n: int = 6):
    """Large cells of the image (the ones most worth looking at), as order_cells rows."""
    sizes = np.bincount(labels.ravel())
    big = np.argsort(sizes[1:])[::-1][:n] + 1
    cells = order_cells(data, np.arange(data.n))
    return cells[cells["cell_id"].isin(big)].reset_index(drop=True)


def test_input_panel_is_the_composite_of_the_raw_crop_at_the_cells_centroid(imc_store, imc,
                                                                             views):  # fmt: skip
    image, labels = imc
    data = _data(imc_store, "global")
    cells = _some_cells(data, labels)
    limits = [None, (0.0, 2.0), None, None, None]  # one channel with the layer's own limits
    shown = [ChannelView(v.name, v.data, v.rgb, limits[i]) for i, v in enumerate(views)]
    tiles = cell_tiles(data, cells, {image.name: shown}, {image.name: labels})
    assert [t.cell_id for t in tiles] == cells["cell_id"].tolist()
    raw = image.to_numpy().astype(np.float64)
    for t in tiles:
        assert list(t.panels) == list(PANELS) and not t.notes and t.plane == ""
        centroid = np.asarray(ndimage.center_of_mass(labels == t.cell_id))
        np.testing.assert_allclose(t.centre, centroid, atol=1e-6)
        origin = np.round(centroid).astype(int) - CROP // 2  # how crops are cut
        expected = _u8(_hand_rgb(_hand_values(_hand_window(raw, origin), limits), COLOURS))
        got = t.panels["input"].astype(np.int16)
        assert got.shape == (CROP, CROP, 3)
        assert np.abs(got - expected).max() <= 1
        assert expected.std() > 5  # a real picture, not a blank one


def test_masked_panel_is_grey_exactly_on_the_masked_patches(imc_store, imc, views):
    image, labels = imc
    data = _data(imc_store, "global")
    cells = _some_cells(data, labels, 4)
    tiles = cell_tiles(data, cells, {image.name: views}, {image.name: labels})
    ids, masks = imc_store.read_cells("mask", 0)
    raw = image.to_numpy().astype(np.float64)
    grey = int(round(GREY * 255))
    seen_full = seen_partial = 0
    for t in tiles:
        m = masks[list(ids).index(t.cell_id)].astype(np.float64)  # (C, 8, 8), True = masked
        assert m.shape == (5, 8, 8)
        per_pixel = np.kron(m, np.ones((12, 12)))  # (C, 96, 96)
        share = per_pixel.mean(axis=0)
        origin = np.round(ndimage.center_of_mass(labels == t.cell_id)).astype(int) - CROP // 2
        values = _hand_values(_hand_window(raw, origin))
        expected = _u8(_hand_rgb(values * (1 - per_pixel), COLOURS) + GREY * share[..., None])
        got = t.panels["masked"].astype(np.int16)
        assert np.abs(got - expected).max() <= 1
        full, none = share == 1, share == 0
        assert (got[full] == grey).all()  # every channel masked: plain grey, as in the papers
        np.testing.assert_array_equal(got[none], t.panels["input"][none])  # visible: the input
        seen_full += full.sum()
        seen_partial += (~full & ~none).sum()
    assert seen_full > 0 and seen_partial > 0  # per-channel masks: some channels seen


def test_attention_is_drawn_over_the_cell_only_and_follows_the_stored_map(imc_store, imc, views):
    image, labels = imc
    data = _data(imc_store, "global")
    cells = _some_cells(data, labels, 4)
    tiles = cell_tiles(data, cells, {image.name: views}, {image.name: labels})
    ids, att = imc_store.read_cells("attention", 0)
    for t in tiles:
        origin = np.round(ndimage.center_of_mass(labels == t.cell_id)).astype(int) - CROP // 2
        cell = _hand_window((labels == t.cell_id).astype(np.float64), origin) == 1
        got = t.panels["attention"].astype(np.float64)
        dimmed = t.panels["input"].astype(np.float64) * DIM
        assert np.abs(got[~cell] - dimmed[~cell]).max() <= 1  # outside: the dimmed input
        inner = ndimage.binary_erosion(cell)  # the outline aside
        assert np.abs(got[inner] - dimmed[inner]).max(axis=-1).min() > 5  # drawn on the cell
        # brighter where the stored attention (mean over heads and channels) is higher
        a = att[list(ids).index(t.cell_id)].astype(np.float64).mean(axis=(0, 1))  # (8, 8)
        nearest = np.kron(a, np.ones((12, 12)))[inner]
        brightness = got[inner].sum(axis=-1)
        from scipy.stats import spearmanr

        if np.ptp(nearest) > 0:
            assert spearmanr(nearest, brightness).statistic > 0.5


def test_reconstruction_panel_is_the_stored_reconstruction_per_channel_stretched(
    imc_store, imc, views
):
    image, labels = imc
    data = _data(imc_store, "patch")  # any level: the panels are per cell
    cells = _some_cells(data, labels, 3)
    tiles = cell_tiles(data, cells, {image.name: views}, {image.name: labels})
    ids, rec = imc_store.read_cells("reconstruction", 0)
    for t in tiles:
        r = rec[list(ids).index(t.cell_id)].astype(np.float64)  # (C, 96, 96), normalised space
        expected = _u8(_hand_rgb(_hand_values(r), COLOURS))
        assert np.abs(t.panels["reconstruction"].astype(np.int16) - expected).max() <= 1


def test_reconstruction_is_shown_in_the_inputs_units_where_patches_were_seen(imc_store, imc):
    """With a layer's contrast limits, the reconstruction panel of a channel equals its input
    panel on the patches the model saw (there the reconstruction is the model's normalised
    input, mapped back to raw units), and differs where the patches were masked."""
    image, labels = imc
    raw = image.to_numpy().astype(np.float64)
    data = _data(imc_store, "global")
    cells = _some_cells(data, labels, 4)
    ids, masks = imc_store.read_cells("mask", 0)
    checked = 0
    for c, name in enumerate(image.channel_names[:3]):
        view = ChannelView(name, raw[c], (1.0, 1.0, 1.0), tuple(np.percentile(raw[c], (1, 99.8))))
        tiles = cell_tiles(data, cells, {image.name: [view]}, {image.name: labels})
        for t in tiles:
            m = masks[list(ids).index(t.cell_id)][c]  # (8, 8), True = masked
            seen = np.kron((~m).astype(np.uint8), np.ones((12, 12), np.uint8)) == 1
            got = t.panels["reconstruction"].astype(np.float64)
            want = t.panels["input"].astype(np.float64)
            if want[seen].max() < 20:
                continue  # a blank crop of this channel says nothing
            assert np.median(np.abs(got[seen] - want[seen])) <= 3  # same units and contrast
            checked += 1
    assert checked >= 4


def test_order_cells_puts_the_cell_nearest_the_selections_mean_first(imc_store):
    data = _data(imc_store, "patch")  # masked patches have NaN embeddings
    obs = data.obs
    chosen = np.unique(obs["cell_id"].to_numpy())[:20]
    rows = np.flatnonzero(obs["cell_id"].isin(chosen).to_numpy())[::3]
    x = np.asarray(data.adata.X, dtype=np.float64)[rows]
    finite = np.isfinite(x).all(axis=1)
    assert (~finite).any()  # the masked patches are in the selection
    centre = x[finite].mean(axis=0)
    ids = obs["cell_id"].to_numpy()[rows]
    dist = {int(c): np.linalg.norm(x[finite & (ids == c)].mean(axis=0) - centre)
            for c in np.unique(ids)}  # fmt: skip
    order = order_cells(data, rows)
    assert list(order.columns) == ["image", "cell_id", "n_rows", "distance"]
    assert order["cell_id"].tolist() == sorted(dist, key=dist.get)
    np.testing.assert_allclose(order["distance"], [dist[c] for c in order["cell_id"]], rtol=1e-5)
    assert order["n_rows"].sum() == len(rows)
    again, other = order_cells(data, rows, seed=1), order_cells(data, rows, seed=2)
    assert sorted(again["cell_id"]) == sorted(dist)
    assert again["cell_id"].tolist() == order_cells(data, rows, seed=1)["cell_id"].tolist()
    assert again["cell_id"].tolist() != other["cell_id"].tolist()


def test_order_cells_puts_cells_without_embeddings_last(imc_store):
    data = _data(imc_store, "global")
    data.adata.X = np.asarray(data.adata.X, dtype=np.float32).copy()
    data.adata.X[0] = np.nan
    order = order_cells(data, np.arange(10))
    assert order["cell_id"].iloc[-1] == data.obs["cell_id"].iloc[0]
    assert np.isnan(order["distance"].iloc[-1]) and np.isfinite(order["distance"][:-1]).all()


def test_missing_maps_give_notes_in_gui_words(plain_store, imc, views):
    image, labels = imc
    data = _data(plain_store, "global")
    cells = order_cells(data, np.arange(5))
    tiles = cell_tiles(data, cells, {image.name: views}, {image.name: labels})
    assert len(tiles) == 5
    for t in tiles:
        assert list(t.panels) == ["input"]
        assert "'attention maps'" in t.notes["attention"]
        assert "'reconstructions'" in t.notes["reconstruction"]
        assert "Masking" in t.notes["masked"]
    # an .h5ad without its store: the input only; no image layer: no input either
    bare = ExplorerData(data.adata, data.patch_size, data.crop_size)
    t = cell_tiles(bare, cells.iloc[:1], {image.name: views})[0]
    assert list(t.panels) == ["input"] and ".zarr" in t.notes["attention"]
    np.testing.assert_array_equal(t.panels["input"], tiles[0].panels["input"])  # by centroid
    t = cell_tiles(bare, cells.iloc[:1], {})[0]
    assert t.panels == {} and "open the image" in t.notes["input"]


def test_cancelled_and_resized_tiles(imc_store, imc, views):
    image, labels = imc
    data = _data(imc_store, "global")
    cells = order_cells(data, np.arange(data.n))
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 3

    tiles = cell_tiles(data, cells, {image.name: views}, size=64, cancelled=cancelled)
    assert 0 < len(tiles) < 4  # stopped when asked, with the tiles done so far, in order
    assert [t.cell_id for t in tiles] == cells["cell_id"].tolist()[: len(tiles)]
    assert all(p.shape == (64, 64, 3) and p.dtype == np.uint8
               for t in tiles for p in t.panels.values())  # fmt: skip


def test_zstack_embedded_as_max_projection_shows_the_projection_of_the_crop(tmp_path):
    image, labels3d = load_sample("nuclei3d")
    image = image.with_data(image.data[:, :, 64:192, 64:192])
    labels = labels3d[:, 64:192, 64:192].max(axis=0)
    store_path = tmp_path / "nuclei.zarr"
    run_embedding([image], store_path, EmbedJob(model="default", attention=True,
                                                reconstruction=True, masking="random",
                                                levels=("global",)), [labels])  # fmt: skip
    store = EmbeddingStore(store_path)
    data = _data(store, "global")
    stack = image.data[0]  # (Z, Y, X) dask: only the crop windows are read
    assert isinstance(stack, da.Array)
    view = ChannelView("nuclei", stack, (0.0, 1.0, 1.0))
    cells = order_cells(data, np.arange(data.n)).iloc[:4]
    tiles = cell_tiles(data, cells, {image.name: [view]}, {image.name: labels})
    raw = np.asarray(stack, dtype=np.float64)
    ids, origins = store.read_cells("origins", 0)
    for t in tiles:
        assert list(t.panels) == list(PANELS) and t.plane == "max projection over z"
        origin = origins[list(ids).index(t.cell_id)]
        window = _hand_window(raw, origin).max(axis=0)[None]
        expected = _u8(_hand_rgb(_hand_values(window), [(0.0, 1.0, 1.0)]))
        assert np.abs(t.panels["input"].astype(np.int16) - expected).max() <= 1
    plane = cell_tiles(data, cells.iloc[:1], {image.name: [view]}, z_index=30)[0]
    origin = origins[list(ids).index(plane.cell_id)]
    expected = _u8(_hand_rgb(_hand_values(_hand_window(raw[30], origin)[None]), [(0, 1, 1)]))
    assert plane.plane == "z 30"
    assert np.abs(plane.panels["input"].astype(np.int16) - expected).max() <= 1


def test_native_3d_embedding_shows_the_middle_plane_of_each_crop(tmp_path):
    """A 3D model (mae3d, small and untrained: the geometry is what is checked) on the nuclei
    z-stack: the panels are the middle z plane of each cell's 3D crop."""
    image, labels = load_sample("nuclei3d")
    image = image.with_data(image.data[:, :, 64:192, 64:192])
    labels = labels[:, 64:192, 64:192]
    small = dict(in_chans=1, input_size=(40, 64, 64), depth=2, embed_dim=96, num_heads=4,
                 decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    job = EmbedJob(model="mae3d", random_init=True, model_options=small, crop_size=(40, 64, 64),
                   reconstruction=True, masking="random", levels=("global",))  # fmt: skip
    store = EmbeddingStore(run_embedding([image], tmp_path / "n3d.zarr", job, [labels]).store.path)
    data = _data(store, "global")
    assert data.patch_size == (10, 8, 8) and data.crop_size == (40, 64, 64)
    stack = image.data[0]
    view = ChannelView("nuclei", stack, (1.0, 1.0, 1.0))
    cells = order_cells(data, np.arange(data.n)).iloc[:3]
    tiles = cell_tiles(data, cells, {image.name: [view]}, {image.name: labels}, size=64)
    raw = np.asarray(stack, dtype=np.float64)
    ids, origins = store.read_cells("origins", 0)
    _, masks = store.read_cells("mask", 0)
    _, recs = store.read_cells("reconstruction", 0)
    for t in tiles:
        k = list(ids).index(t.cell_id)
        z = int(origins[k][0]) + 20
        assert t.plane == f"z {z} (middle plane of the 3D crop)"
        assert list(t.panels) == ["input", "masked", "reconstruction"]
        assert "'attention maps'" in t.notes["attention"]
        centroid = ndimage.center_of_mass(labels == t.cell_id)
        np.testing.assert_allclose(t.centre, centroid, atol=1e-6)
        plane = np.full((64, 64), np.nan)
        if 0 <= z < raw.shape[0]:
            y0, x0 = (int(v) for v in origins[k][1:])
            win = raw[z, max(0, y0) : y0 + 64, max(0, x0) : x0 + 64]
            plane[max(0, -y0) : max(0, -y0) + win.shape[0],
                  max(0, -x0) : max(0, -x0) + win.shape[1]] = win  # fmt: skip
        values = _hand_values(plane[None])
        shown = _u8(_hand_rgb(values, [(1, 1, 1)]))
        assert np.abs(t.panels["input"].astype(np.int16) - shown).max() <= 1
        share = np.kron(masks[k][2].astype(np.float64), np.ones((8, 8)))  # the middle gz
        expected = _u8(_hand_rgb(values, [(1, 1, 1)]) * (1 - share[..., None])
                       + GREY * share[..., None])  # fmt: skip
        assert np.abs(t.panels["masked"].astype(np.int16) - expected).max() <= 1
        rec = _u8(_hand_rgb(_hand_values(recs[k][:, 20].astype(np.float64)), [(1, 1, 1)]))
        assert np.abs(t.panels["reconstruction"].astype(np.int16) - rec).max() <= 1
