"""The explorer's truth controls in a real napari.Viewer (Xvfb): the "Batch vs biology" tab on
real LINCS cells (condition and batch preselected by name, the control guessed, the comparison
run off the GUI thread by a real click) and the line that says what normalisation hides."""

from __future__ import annotations

import os

import numpy as np
import pytest
from qtpy.QtCore import Qt

from test_condition_batch import lincs  # noqa: F401  (the fixture: real cells of both plates)

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (scripts/test.sh)"),
]


@pytest.fixture
def viewer():
    import napari

    v = napari.Viewer(show=False)
    yield v
    v.close()


def test_batch_vs_biology_tab_compares_with_a_click(viewer, qtbot, lincs):  # noqa: F811
    from napari_maeprobe._napari.explorer_widget import ExplorerWidget
    from napari_maeprobe.pl.linking import ExplorerData
    from napari_maeprobe.tl.condition_batch import compare_condition_batch

    adata = lincs.copy()
    adata.obsm["X_umap"] = np.asarray(adata.X[:, :2], dtype=np.float32)  # any 2-D map
    adata.uns["maeprobe"] = {**adata.uns["maeprobe"], "normalization": "percentile",
                             "model_standardizes_crops": True}  # fmt: skip
    widget = ExplorerWidget(viewer)
    qtbot.addWidget(widget)
    widget.load_data(ExplorerData(adata, (12, 12), (96, 96)))
    assert widget.condition_combo.currentText() == "compound"
    assert widget.batch_combo.currentText() == "plate"
    assert widget.control_combo.currentText() == "DMSO"
    assert "image-wide differences" in widget.context.text()
    assert "standardises every crop channel" in widget.context.text()
    qtbot.mouseClick(widget.compare_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.comparison is not None, timeout=120_000)
    widget.tabs.setCurrentIndex(1)  # the Batch vs biology tab, as a user would look at it
    widget.grab().save(os.environ.get("MAEPROBE_SHOT", "/tmp/gui_truth.png"))
    want = compare_condition_batch(adata, "compound", "plate", "DMSO")
    assert widget.comparison["summary"] == want["summary"]
    assert "lonafarnib vs DMSO across plates" in widget.compare_result.text()
    # the same column for both is refused before any work
    widget.batch_combo.setCurrentText("compound")
    widget.comparison = None
    qtbot.mouseClick(widget.compare_button, Qt.MouseButton.LeftButton)
    qtbot.wait(200)
    assert widget.comparison is None
