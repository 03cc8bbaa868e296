"""napari-maeprobe: explore what masked-autoencoder microscopy models see in your cells.

The core library (this package minus ``_napari``) has no Qt import; napari only loads
``napari_maeprobe._napari`` through the manifest ``napari.yaml``.
"""

from .errors import MaeprobeInputError, NoCellsFoundError, WeightsNotFoundError
from .image import MicroscopyImage
from .reading import read_image, read_images

__version__ = "0.1.0"

__all__ = [
    "MaeprobeInputError",
    "MicroscopyImage",
    "NoCellsFoundError",
    "WeightsNotFoundError",
    "__version__",
    "read_image",
    "read_images",
]
