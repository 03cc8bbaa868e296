"""Built-in segmentation against real references, and the Cellpose paths (3.x API, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_maeprobe import read_images
from napari_maeprobe.errors import NoCellsFoundError, WeightsNotFoundError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.segmentation import matched_fraction, segment, segment_cellpose


def test_examplehuman_plausible_count():
    im, _ = load_sample("examplehuman")
    seg = segment(im, "builtin")
    assert seg.nucleus_channel == "DNA" and seg.cell_channel == "cellbody"
    # measured 346 nuclei; a field of 512x512 HT29 cells holds a few hundred
    assert 250 <= seg.n_cells <= 400
    assert seg.labels.shape == (512, 512)


def _cellprofiler_cells(sample_dir):
    """CellProfiler's own whole-cell outlines for the Cell Painting field, filled into labels."""
    outlines = tifffile.imread(
        sample_dir / "alsf_cellpainting_6ch/images/outlines/CellsOutlines_BR00143976_C03_3.tiff"
    )
    line = outlines.max(axis=-1) > 0
    labels, _ = ndimage.label(ndimage.binary_fill_holes(line) & ~line)
    sizes = np.bincount(labels.ravel())
    keep = sizes > 30
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def test_cellpainting_agrees_with_cellprofiler(sample_dir):
    im, _ = load_sample("cellpainting")
    seg = segment(im, "builtin")
    assert seg.nucleus_channel == "DNA" and seg.cell_channel == "AGP"
    ref = _cellprofiler_cells(
        sample_dir
    )  # 31 closed cell outlines (cells cut by the edge are open)
    assert 30 <= seg.n_cells <= 50  # measured 40
    assert matched_fraction(seg.labels, ref) >= 0.45  # measured 0.52


def test_imc_agrees_with_shipped_whole_cell_masks(sample_dir):
    n_ref = n_matched = 0
    for im in read_images(sample_dir / "imc_bodenmiller_5ch/img"):
        ref = tifffile.imread(sample_dir / f"imc_bodenmiller_5ch/masks_deepcell/{im.name}.tiff")
        seg = segment(im, "builtin")
        assert seg.nucleus_channel == "H3K27Ac"
        n = len(np.unique(ref)) - 1
        n_ref += n
        n_matched += matched_fraction(seg.labels, ref) * n
    # measured 0.41 of 404 DeepCell cells at IoU 0.5 (see docs/segmentation.md)
    assert n_matched / n_ref >= 0.35


def test_3d_nuclei_match_shipped_labels():
    im, ref = load_sample("nuclei3d")
    seg = segment(im, "builtin")
    assert seg.labels.shape == (60, 256, 256)
    assert matched_fraction(seg.labels, ref) >= 0.9  # measured 0.95 (19 of 20 nuclei)


def test_matched_fraction_is_exact_on_itself_and_zero_on_shifted():
    _, ref = load_sample("imc")
    assert matched_fraction(ref, ref) == 1.0
    assert matched_fraction(np.roll(ref, 40, axis=1), ref) < 0.1


def test_empty_image_and_no_cells(sample_dir):
    im, _ = load_sample("imc")
    empty = im.with_data(np.zeros(im.data.shape, np.float32))
    with pytest.raises(NoCellsFoundError, match="the image is empty"):
        segment(empty, "builtin")
    flat_nucleus = im.to_numpy()
    flat_nucleus[4] = 1.0
    with pytest.raises(NoCellsFoundError, match="nucleus channel is empty.*H3K27Ac"):
        segment(im.with_data(flat_nucleus), "builtin")


def test_auto_falls_back_to_builtin_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    im, _ = load_sample("imc")
    seg = segment(im, "auto")
    assert seg.method == "builtin"
    assert any(str(tmp_path / "cyto3") in n for n in seg.notes)


def test_cellpose_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    im, _ = load_sample("imc")
    with pytest.raises(WeightsNotFoundError) as err:
        segment_cellpose(im.to_numpy()[4], None, download=False)
    assert f"copy it to {tmp_path / 'cyto3'}" in str(err.value)


def test_cellpose3_runs_from_a_local_weights_file(tmp_path):
    """A randomly initialised Cellpose 3 network saved in its own format, loaded by path."""
    pytest.importorskip("cellpose")
    from cellpose import resnet_torch

    net = resnet_torch.CPnet(
        [2, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0
    )
    weights = tmp_path / "random_cyto3"
    net.save_model(str(weights))
    im, _ = load_sample("examplehuman")
    data = im.to_numpy().astype(np.float32)[:, :128, :128] / 255
    labels = segment_cellpose(data[0], data[2], weights=weights, diameter=30, device="cpu")
    assert labels.shape == (128, 128) and labels.dtype == np.int32


class _FakeCellpose4Model:
    """Records how the adapter calls the Cellpose 4 API (CellposeModel(pretrained_model=...),
    eval without ``channels``, 3-tuple return), as documented for cellpose 4.0.9."""

    calls: list = []

    def __init__(self, gpu=False, pretrained_model="cpsam", device=None):
        self.calls.append(("init", pretrained_model))

    def eval(self, x, **kwargs):
        assert "channels" not in kwargs
        self.calls.append(("eval", x.shape, kwargs))
        return (np.ones(x.shape[1:], np.int32), None, None)


def test_cellpose4_api_is_called_as_documented(monkeypatch, tmp_path):
    from cellpose import models

    from napari_maeprobe.pp import segmentation

    weights = tmp_path / "cpsam"
    weights.write_bytes(b"x")
    monkeypatch.setattr(segmentation, "cellpose_version", lambda: 4)
    monkeypatch.setattr(models, "CellposeModel", _FakeCellpose4Model)
    nuc = np.zeros((5, 32, 32), np.float32)
    labels = segment_cellpose(nuc, nuc, weights=weights, device="cpu")
    assert labels.shape == (5, 32, 32)
    init, ev = _FakeCellpose4Model.calls[-2:]
    assert init == ("init", str(weights))
    assert ev[1] == (2, 5, 32, 32) and ev[2]["do_3D"] and ev[2]["z_axis"] == 1
