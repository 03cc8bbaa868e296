"""The bundled sample data (real images from ``sample_data/``), for the demo, napari and tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.io.reading import read_image


def sample_data_dir() -> Path:
    """The ``sample_data/`` folder: ``$MAEPROBE_SAMPLE_DATA`` or the repository's own."""
    env = os.environ.get("MAEPROBE_SAMPLE_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "sample_data")
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    raise MaeprobeInputError(
        f"the sample data folder is not at {candidates[-1]}",
        "install napari-maeprobe from its repository (pip install -e .) or set "
        "MAEPROBE_SAMPLE_DATA to the repository's sample_data folder",
    )


@dataclass(frozen=True)
class Sample:
    """One bundled sample: where it is and what it shows."""

    key: str
    title: str
    image: str  # path inside sample_data/
    labels: str | None = None  # instance labels shipped with it
    dataset: str = ""


SAMPLES: dict[str, Sample] = {
    s.key: s
    for s in (
        Sample(
            "cellpainting",
            "Cell Painting, 6 channels (DAOY cells, 1080x1080)",
            "alsf_cellpainting_6ch/images/orig",
            dataset="alsf_cellpainting_6ch",
        ),
        Sample(
            "examplehuman",
            "CellProfiler ExampleHuman, 3 channels (HT29 cells)",
            "cellprofiler_examplehuman_3ch",
            dataset="cellprofiler_examplehuman_3ch",
        ),
        Sample(
            "imc",
            "Imaging mass cytometry, 5 markers, with whole-cell masks",
            "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff",
            "imc_bodenmiller_5ch/masks_deepcell/20210305_NE_mockData2_001.tiff",
            dataset="imc_bodenmiller_5ch",
        ),
        Sample(
            "nuclei3d",
            "3D nuclei z-stack (60x256x256) with 3D labels",
            "cells3d_nuclei_3d_labels/nuclei.tif",
            "cells3d_nuclei_3d_labels/nuclei_label.tif",
            dataset="cells3d_nuclei_3d_labels",
        ),
        Sample(
            "spots3d",
            "3D two-colour z-stack (ZCYX 17x2x88x89)",
            "neubias_small_multichannel/xyzc_16bit__spots.tif",
            dataset="neubias_small_multichannel",
        ),
    )
}


def load_sample(key: str) -> tuple[MicroscopyImage, np.ndarray | None]:
    """Open a bundled sample: the image and its shipped labels (``None`` when it has none)."""
    if key not in SAMPLES:
        raise MaeprobeInputError(f"no sample named {key!r}", f"use one of {', '.join(SAMPLES)}")
    import tifffile

    s = SAMPLES[key]
    root = sample_data_dir()
    image = read_image(root / s.image, dataset=s.dataset)
    if key == "nuclei3d":
        image.channel_names = ["nuclei"]
        image.scale = (0.29, 0.26, 0.26)  # from the dataset README (skimage cells3d)
    labels = tifffile.imread(root / s.labels).astype(np.int32) if s.labels else None
    return image, labels
