"""Boundary maps of instance masks and each patch's boundary coverage (the OrgBoundMAE recipe).

boundary = dilate(mask, 3x3) - erode(mask, 3x3), taken per instance so that borders between
touching cells count too; in 3D the structuring element is 3x3x3. These maps drive
boundary-guided masking later.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_maeprobe.errors import MaeprobeInputError


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """Boolean map of pixels within one pixel of an instance border (2D or 3D labels)."""
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise MaeprobeInputError(
            f"labels have shape {labels.shape}", "pass a 2D (Y, X) or 3D (Z, Y, X) label image"
        )
    if labels.dtype.kind not in "biu":
        raise MaeprobeInputError(
            f"labels have dtype {labels.dtype}", "pass an integer instance label image"
        )
    # Grey dilation != grey erosion over the 3x3(x3) window <=> the window holds two different
    # values (an object and background, or two touching objects): dilate(mask) - erode(mask)
    # summed over instances.
    return ndimage.maximum_filter(labels, size=3) != ndimage.minimum_filter(labels, size=3)


def patch_fractions(values: np.ndarray, patch_size: tuple[int, ...]) -> np.ndarray:
    """Mean of ``values`` over each non-overlapping patch of the last ``len(patch_size)`` axes.

    ``values`` is ``(..., [Z,] Y, X)``; returns ``(..., [gz,] gy, gx)``. With a boolean boundary
    map this is each patch's boundary fraction.
    """
    nd = len(patch_size)
    spatial = values.shape[-nd:]
    if any(s % p for s, p in zip(spatial, patch_size)):
        raise MaeprobeInputError(
            f"crop size {spatial} is not a multiple of the patch size {tuple(patch_size)}",
            "choose a crop size divisible by the patch size (e.g. 224 with 16, or 256 with 16)",
        )
    lead = values.shape[:-nd]
    shape = list(lead)
    for s, p in zip(spatial, patch_size):
        shape += [s // p, p]
    blocks = values.reshape(shape).astype(np.float32, copy=False)
    patch_axes = tuple(len(lead) + 2 * i + 1 for i in range(nd))
    return blocks.mean(axis=patch_axes)
