"""The plugin inside a real napari.Viewer (under Xvfb): reader, File > Open Sample, manifest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
    pytest.skip(
        "needs a display: run the tests with scripts/test.sh (Xvfb)", allow_module_level=True
    )


def test_npe2_validate():
    npe2 = Path(sys.executable).with_name("npe2")
    exe = str(npe2) if npe2.exists() else shutil.which("npe2")
    out = subprocess.run([exe, "validate", "napari_maeprobe"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in (out.stdout + out.stderr).lower()


def test_open_cellpainting_folder_gives_one_layer_per_channel(make_napari_viewer, sample_dir):
    viewer = make_napari_viewer()
    folder = sample_dir / "alsf_cellpainting_6ch/images/orig"
    layers = viewer.open(str(folder), plugin="napari-maeprobe")
    assert [ly.name for ly in layers] == ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]
    assert all(ly.data.shape == (1080, 1080) for ly in layers)
    assert all(ly.blending == "additive" for ly in layers)
    assert layers[4].metadata["channel"] == "DNA"
    # the layer shows the file's pixels
    import tifffile

    dna = tifffile.imread(folder / "r03c03f03p01-ch5sk1fk1fl1.tiff")
    np.testing.assert_array_equal(
        np.asarray(layers[4].data[500:520, 600:640]), dna[500:520, 600:640]
    )


def test_reader_is_offered_for_folders_and_files(sample_dir):
    # File > Open Folder offers our reader (napari asks the user when several plugins can read)
    from napari.plugins._npe2 import get_readers

    assert "napari-maeprobe" in get_readers(str(sample_dir / "cellprofiler_examplehuman_3ch"))
    assert "napari-maeprobe" in get_readers(
        str(sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff")
    )
    assert "napari-maeprobe" not in get_readers(str(sample_dir / "README.md"))


def test_open_sample_menu_entry(make_napari_viewer):
    viewer = make_napari_viewer()
    qt_window = viewer.window._qt_window
    file_menu = next(a.menu() for a in qt_window.menuBar().actions() if "File" in a.text())
    samples = next(a.menu() for a in file_menu.actions() if a.text() == "Open Sample")
    ours = next(a.menu() for a in samples.actions() if a.text() == "MAE probe")
    entries = {a.text(): a for a in ours.actions()}
    assert "Cell Painting, 6 channels (DAOY cells)" in entries
    entries["Cell Painting, 6 channels (DAOY cells)"].trigger()
    assert [ly.name for ly in viewer.layers] == ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]
    entries["3D nuclei z-stack + 3D labels"].trigger()
    assert viewer.layers[-1].name == "nuclei labels" and viewer.layers[-1].data.shape == (
        60,
        256,
        256,
    )
    assert viewer.layers[-2].data.shape == (60, 256, 256)
    assert tuple(viewer.layers[-2].scale) == pytest.approx((0.29, 0.26, 0.26))


def test_open_sample_api(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-maeprobe", "imc")
    names = [ly.name for ly in viewer.layers]
    assert names == [
        "Ag107",
        "Cytokeratin 5",
        "Laminin",
        "YBX1",
        "H3K27Ac",
        "20210305_NE_mockData2_001 labels",
    ]


def test_bad_file_gives_a_clear_error(make_napari_viewer, tmp_path, sample_dir):
    src = sample_dir / "cellprofiler_examplehuman_3ch/AS_09125_050116030001_D03f00d0.tif"
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="truncated or damaged"):
        viewer.open(str(bad), plugin="napari-maeprobe")
    assert len(viewer.layers) == 0


def test_a_plate_tree_opens_as_named_layers_with_one_field_shown(shared_dir):
    """Before: 80 layers named DNA, ER, ... DNA, ER, ..., every field visible on top of the
    others. Now each layer names its field and only the first field is shown."""
    from napari_maeprobe._napari.reader import read_layers

    layers = read_layers(str(shared_dir / "lincs_cellpainting_a549_dev" / "images"))
    names = [meta["name"] for _, meta, _ in layers]
    assert len(layers) == 16 * 5 and len(set(names)) == len(names)
    assert names[0] == "SQ00015198/r01c01f03p01 DNA"
    visible = [meta["name"] for _, meta, _ in layers if meta["visible"]]
    assert visible == [f"SQ00015198/r01c01f03p01 {c}" for c in ("DNA", "ER", "RNA", "AGP", "Mito")]
