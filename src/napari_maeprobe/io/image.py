"""The image the library passes around, and the rules that put any input into canonical axes.

Every reader returns :class:`MicroscopyImage` with data in ``CYX`` (2D) or ``CZYX`` (3D) order,
lazy (dask) so that large images are only read where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import dask.array as da
import numpy as np

from napari_maeprobe.errors import MaeprobeInputError

KNOWN_AXES = set("TCZYXS")
SUPPORTED_LAYOUTS = "YX, CYX, YXC, ZYX, ZCYX, CZYX (a leading T or singleton axes are dropped)"


@dataclass
class MicroscopyImage:
    """A multichannel 2D or 3D image in canonical axes with its channel names.

    ``data`` is ``(C, Y, X)`` or ``(C, Z, Y, X)``; ``source_axes`` is how the file stored it;
    ``scale`` is the physical size of a pixel along each spatial axis (``(z,) y, x``) when known.
    """

    data: da.Array
    channel_names: list[str]
    name: str
    source: tuple[Path, ...] = ()
    source_axes: str = ""
    scale: tuple[float, ...] | None = None
    dataset: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, da.Array):
            self.data = da.asarray(self.data)
        if self.data.ndim not in (3, 4):
            raise ValueError(f"canonical data must be CYX or CZYX, got shape {self.data.shape}")
        if len(self.channel_names) != self.data.shape[0]:
            raise MaeprobeInputError(
                f"{self.name}: {len(self.channel_names)} channel names for "
                f"{self.data.shape[0]} channels ({', '.join(self.channel_names)})",
                "give exactly one name per channel",
            )
        dup = sorted({n for n in self.channel_names if self.channel_names.count(n) > 1})
        if dup:
            raise MaeprobeInputError(
                f"{self.name}: channel name(s) {', '.join(repr(d) for d in dup)} given to more "
                f"than one channel ({', '.join(self.channel_names)})",
                "give every channel its own name (channel_names=... / --channel-names, or fix "
                "the names in the file's metadata or its panel.csv / channels.csv)",
            )

    @property
    def axes(self) -> str:
        return "CZYX" if self.data.ndim == 4 else "CYX"

    @property
    def is_3d(self) -> bool:
        return self.data.ndim == 4

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape[1:])

    def with_data(self, data: da.Array | np.ndarray, **changes) -> MicroscopyImage:
        """A copy with new pixel data (and optionally other fields changed)."""
        return replace(self, data=da.asarray(data), **changes)

    def with_channel_names(self, names: list[str]) -> MicroscopyImage:
        """A copy with channel names set by hand."""
        return replace(self, channel_names=[str(n) for n in names])

    def to_numpy(self) -> np.ndarray:
        """Read all pixels into memory."""
        return np.asarray(self.data.compute())


def parse_axes(axes: str, ndim: int) -> str:
    """Validate a user- or metadata-given axes string like ``"ZCYX"`` for an array of ``ndim``."""
    axes = axes.upper().strip()
    if len(axes) != ndim:
        raise MaeprobeInputError(
            f"axes '{axes}' have {len(axes)} letters but the image has {ndim} dimensions",
            f"give one letter per dimension, e.g. one of {SUPPORTED_LAYOUTS}",
        )
    bad = set(axes) - KNOWN_AXES
    if bad or len(set(axes)) != len(axes) or "Y" not in axes or "X" not in axes:
        raise MaeprobeInputError(
            f"axes '{axes}' are not understood",
            f"use the letters T, C, Z, Y, X once each, e.g. one of {SUPPORTED_LAYOUTS}",
        )
    return axes


def guess_axes(shape: tuple[int, ...], hint: str | None = None, sample=None) -> str:
    """Guess the axes of an array from its shape and a partial hint from file metadata.

    ``hint`` may contain ``?`` (or tifffile's ``Q``/``I``) for axes the metadata left unknown.
    ``sample`` (the array itself) lets an unknown leading axis of a 3D array be told apart:
    consecutive z-slices are strongly correlated, separate markers are not.
    """
    ndim = len(shape)
    if ndim < 2:
        raise MaeprobeInputError(
            f"the array has shape {tuple(shape)}: an image needs at least two dimensions (Y, X)",
            f"save a 2D or 3D image, laid out as one of {SUPPORTED_LAYOUTS}",
        )
    if hint is not None:
        hint = "".join("?" if a in "QI" else a for a in hint.upper())
        if len(hint) == ndim and "?" not in hint:
            hint = hint.replace("S", "C") if "C" not in hint else hint
            return parse_axes(hint, ndim)
    # drop singleton leading axes first: (1, 1, C, Y, X) is just CYX
    lead = 0
    while ndim - lead > 4 and shape[lead] == 1:
        lead += 1
    core = tuple(shape[lead:])
    prefix = "T" * lead  # singleton axes, squeezed later as T
    if len(core) == 2:
        return prefix + "YX"
    if len(core) == 3:
        a, y, x = core
        if x <= 8 and a > 8 * x and y > 8 * x:  # (Y, X, C): RGB or few interleaved channels
            return prefix + "YXC"
        known = hint[-3] if hint and len(hint) == ndim else "?"
        if known in "CZ":
            return prefix + known + "YX"
        return prefix + ("Z" if _looks_like_z_stack(sample, lead, a) else "C") + "YX"
    if len(core) == 4:
        a, b, y, x = core
        if x <= 8 and b > 8 * x:  # (Z, Y, X, C)
            return prefix + "ZYXC"
        if hint and len(hint) == ndim and set(hint[-4:-2]) == {"C", "Z"}:
            return prefix + hint[-4:-2] + "YX"
        return prefix + ("CZYX" if a < b else "ZCYX")
    raise MaeprobeInputError(
        f"cannot tell the axes of an array of shape {tuple(shape)}",
        "pass the axes explicitly (axes='TZCYX' or --axes), laid out as one of "
        + SUPPORTED_LAYOUTS,
    )


def _looks_like_z_stack(sample, lead: int, n_planes: int) -> bool:
    """True when consecutive planes are so alike that they must be z-slices of one stack.

    Planes are block-averaged to about 32x32 (to average out shot noise) and the median Pearson
    correlation of neighbours must reach 0.9: measured 0.99 on the cells3d nuclei stack, 0.77 on
    the six Cell Painting channels and under 0.5 on IMC markers.
    """
    if n_planes < 5 or sample is None:
        return False
    arr = sample[(0,) * lead] if lead else sample
    _, h, w = arr.shape
    f = max(1, min(h, w) // 32)
    small = np.asarray(arr[:, : h // f * f, : w // f * f], dtype=np.float64)
    small = small.reshape(n_planes, h // f, f, w // f, f).mean(axis=(2, 4)).reshape(n_planes, -1)
    small = small - small.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(small, axis=1)
    ok = (norms[:-1] > 0) & (norms[1:] > 0)
    if not ok.any():
        return False
    r = (small[:-1] * small[1:]).sum(axis=1)[ok] / (norms[:-1] * norms[1:])[ok]
    return float(np.median(r)) >= 0.9


def to_canonical(data, axes: str, name: str = "image") -> tuple[da.Array, str]:
    """Reorder ``data`` with ``axes`` into ``CYX`` or ``CZYX``; returns the data and its axes."""
    data = da.asarray(data)
    axes = parse_axes(axes, data.ndim)
    if "S" in axes and "C" in axes:
        s = axes.index("S")
        if data.shape[s] != 1:
            raise MaeprobeInputError(
                f"{name}: both C and S (RGB samples) axes have several entries",
                "give the axes by hand so that only one of them is the channel axis",
            )
    axes = axes.replace("S", "C") if "C" not in axes else axes.replace("S", "T")
    for extra in ("T",):
        while extra in axes:
            i = axes.index(extra)
            if data.shape[i] != 1:
                raise MaeprobeInputError(
                    f"{name}: has {data.shape[i]} time points (axes {axes}); time series are not "
                    "supported",
                    "save one time point per file, or index the array before passing it",
                )
            data = data[(slice(None),) * i + (0,)]
            axes = axes[:i] + axes[i + 1 :]
    if "C" not in axes:
        data = data[None]
        axes = "C" + axes
    if "Z" in axes and data.shape[axes.index("Z")] == 1:
        i = axes.index("Z")
        data = data[(slice(None),) * i + (0,)]
        axes = axes[:i] + axes[i + 1 :]
    target = "CZYX" if "Z" in axes else "CYX"
    data = data.transpose([axes.index(a) for a in target])
    if min(data.shape[-2:]) < 2:
        raise MaeprobeInputError(
            f"{name}: the image is {data.shape[-2]}x{data.shape[-1]} pixels in Y and X",
            "check the axes: Y and X must be the image's two largest dimensions",
        )
    return data, target
