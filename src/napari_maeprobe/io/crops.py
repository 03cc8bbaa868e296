"""Stacks of single-cell crops: an (N, C, Y, X) or (N, C, Z, Y, X) array, one crop per cell.

A crop stack is embedded without segmentation: each crop is one cell (``cell_id`` its index),
zero-padded or resized to the model's input size (:func:`fit_crops`). It is read from ``.npy``,
``.zarr`` or a multi-page TIFF with the axes the user gives (``NCYX``, ``NCZYX`` or any order of
those letters) or, where the file records them, its own axes; never guessed as a z-stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from napari_maeprobe.errors import MaeprobeInputError

CropFit = Literal["auto", "pad", "resize"]
CROP_FIT_CHOICES: tuple[str, ...] = ("auto", "pad", "resize")
CROP_EXTS = (".npy", ".zarr", ".tif", ".tiff")
#: letters a file's own axes may use for the crop axis (tifffile: I sequence, Q unknown, T time)
_FILE_CROP_AXES = ("N", "I", "Q", "T", "E")


@dataclass
class CropStack:
    """Single-cell crops in canonical axes ``(N, C, [Z,] Y, X)`` with channel names.

    It quacks like :class:`~napari_maeprobe.io.image.MicroscopyImage` where the embedding job
    needs it (``name``, ``dataset``, ``source``, ``channel_names``, ``metadata``); ``metadata``
    may hold ``obs`` (one value per column for every crop) and ``cell_obs`` (a frame indexed by
    crop index: per-cell columns, e.g. a table in row order)."""

    data: np.ndarray
    channel_names: list[str]
    name: str
    source: tuple[Path, ...] = ()
    source_axes: str = ""
    dataset: str = ""
    metadata: dict = field(default_factory=dict)
    scale: tuple[float, ...] | None = None
    fit: str = "auto"  # how crops meet the model's input size: auto | pad | resize

    def with_fit(self, fit: str) -> CropStack:
        """A copy fitted to the model's input by ``fit`` (auto, pad or resize)."""
        resolve_fit((1,), (1,), fit)  # refuses an unknown choice now
        return replace(self, fit=fit)

    def __post_init__(self) -> None:
        if self.data.ndim not in (4, 5):
            raise MaeprobeInputError(
                f"{self.name}: a crop stack is NCYX or NCZYX, got shape {self.data.shape}",
                "pass --axes NCYX (or NCZYX) matching the array",
            )
        if self.data.shape[0] == 0:
            raise MaeprobeInputError(f"{self.name}: the crop stack holds no crops",
                                     "pass a stack with at least one crop")  # fmt: skip
        if len(self.channel_names) != self.data.shape[1]:
            raise MaeprobeInputError(
                f"{self.name}: {len(self.channel_names)} channel names for "
                f"{self.data.shape[1]} channels",
                "give exactly one name per channel (--channel-names)",
            )

    @property
    def axes(self) -> str:
        return "NCZYX" if self.data.ndim == 5 else "NCYX"

    @property
    def n_crops(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[1])

    @property
    def is_3d(self) -> bool:
        return self.data.ndim == 5

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The shape of one crop (``(Z,) Y, X``)."""
        return tuple(int(s) for s in self.data.shape[2:])

    def with_data(self, data: np.ndarray, **changes) -> CropStack:
        """A copy with new crops (and optionally other fields changed)."""
        return replace(self, data=np.asarray(data), **changes)

    def with_cell_obs(self, cells) -> CropStack:
        """A copy whose crops carry the per-cell columns of ``cells`` (indexed by crop)."""
        return replace(self, metadata={**self.metadata, "cell_obs": cells})

    def to_numpy(self) -> np.ndarray:
        """All crops in memory."""
        return np.asarray(self.data)

    def select_channels(self, names: list[str]) -> CropStack:
        """The named channels, in this order."""
        missing = [n for n in names if n not in self.channel_names]
        if missing:
            raise MaeprobeInputError(
                f"{self.name}: no channel(s) {', '.join(missing)} "
                f"(channels: {', '.join(self.channel_names)})",
                "pick channels by these names with --channels",
            )
        idx = [self.channel_names.index(n) for n in names]
        return replace(self, data=np.asarray(self.data)[:, idx], channel_names=list(names))

    def project_z(self, how: str = "max") -> CropStack:
        """2D crops from 3D ones (each crop on its own): maximum projection or middle slice."""
        if not self.is_3d:
            return self
        data = np.asarray(self.data)
        flat = data.max(axis=2) if how == "max" else data[:, :, data.shape[2] // 2]
        return replace(self, data=flat)


def canonical_axes(axes: str, ndim: int, name: str) -> str:
    """Check user axes for a crop stack: N, C, Y, X (and Z for 3D crops), each once."""
    ax = axes.upper().strip()
    need = set("NCYX") | ({"Z"} if ndim == 5 else set())
    if len(ax) != ndim or set(ax) != need or len(set(ax)) != len(ax):
        want = "NCZYX" if ndim == 5 else "NCYX"
        raise MaeprobeInputError(
            f"{name}: axes {axes!r} do not fit a {ndim}D crop stack",
            f"pass --axes with the letters {want} in the array's order (e.g. {want})",
        )
    return ax


def _to_canonical(arr, axes: str) -> np.ndarray:
    target = "NCZYX" if "Z" in axes else "NCYX"
    return np.transpose(arr, [axes.index(a) for a in target])


def _file_axes(path: Path, arr_ndim: int) -> str | None:
    """Axes the file records itself, with its crop axis as N; None when it records none."""
    suffix = path.suffix.lower()
    axes = None
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            shaped = tf.shaped_metadata
            if shaped and isinstance(shaped[0], dict) and "axes" in shaped[0]:
                axes = str(shaped[0]["axes"])
            elif tf.is_imagej or tf.is_ome:
                axes = tf.series[0].axes
    elif suffix == ".zarr":
        attrs = _zarr_attrs(path)
        if "_ARRAY_DIMENSIONS" in attrs:
            axes = "".join(str(a)[0] for a in attrs["_ARRAY_DIMENSIONS"])
        elif isinstance(attrs.get("axes"), str):
            axes = attrs["axes"]
    if not axes or len(axes) != arr_ndim:
        return None
    axes = axes.upper()
    if axes[0] in _FILE_CROP_AXES and "N" not in axes[1:]:
        axes = "N" + axes[1:]
    try:
        return canonical_axes(axes, arr_ndim, path.name)
    except MaeprobeInputError:
        return None


def _zarr_attrs(path: Path) -> dict:
    for meta in (path / "zarr.json", path / ".zattrs"):
        if meta.is_file():
            data = json.loads(meta.read_text())
            return dict(data.get("attributes", data)) if meta.name == "zarr.json" else data
    return {}


def _load(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise MaeprobeInputError(f"{path} is not a readable .npy array ({exc})",
                                     "save the crops with numpy.save") from None  # fmt: skip
    if suffix == ".zarr":
        import zarr

        node = zarr.open(str(path), mode="r")
        if not hasattr(node, "shape"):
            arrays = sorted(node.array_keys())
            if len(arrays) != 1:
                raise MaeprobeInputError(
                    f"{path} is a zarr group with {len(arrays)} arrays ({', '.join(arrays)})",
                    "pass the path of the one array that holds the crops (e.g. stack.zarr/0)",
                )
            node = node[arrays[0]]
        return node
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            return tifffile.imread(path)
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types for a bad file
            raise MaeprobeInputError(f"{path} is not a readable TIFF ({exc})",
                                     "check the file (it may be truncated)") from None  # fmt: skip
    raise MaeprobeInputError(f"{path}: crop stacks are read from {', '.join(CROP_EXTS)}",
                             "save the crops as .npy (numpy.save) or a multi-page TIFF")


def read_crops(
    path: str | Path,
    axes: str | None = None,
    channel_names: list[str] | None = None,
    dataset: str | None = None,
) -> CropStack:
    """Open a stack of single-cell crops (``.npy``, ``.zarr`` or a multi-page TIFF).

    ``axes``: the array's axes with ``N`` for the crop axis (``NCYX``, ``NCZYX``, ``NYXC``, ...);
    without it, the axes the file records (ImageJ / OME / tifffile metadata, zarr
    ``_ARRAY_DIMENSIONS``); a file that records none is refused (a crop stack is never guessed
    as a z-stack). ``channel_names`` default to ``ch0``, ``ch1``, ... or a ``channels.csv``
    beside the file is not read here: pass them."""
    p = Path(path)
    if not p.exists():
        raise MaeprobeInputError(f"{p} does not exist", "check the path")
    arr = _load(p)
    if arr.ndim not in (4, 5):
        raise MaeprobeInputError(
            f"{p.name} has {arr.ndim} dimensions {tuple(arr.shape)}; a crop stack has 4 (NCYX) "
            "or 5 (NCZYX)",
            "pass a stack of crops, or open it as an image (drop the N from --axes)",
        )
    if axes:
        ax = canonical_axes(axes, arr.ndim, p.name)
    else:
        ax = _file_axes(p, arr.ndim)
        if ax is None:
            raise MaeprobeInputError(
                f"{p.name} {tuple(arr.shape)} does not record its axes, so the crop axis is "
                "unknown",
                f"pass --axes {'NCZYX' if arr.ndim == 5 else 'NCYX'} (letters in the array's "
                "order)",
            )
    data = _to_canonical(arr, ax)
    if isinstance(data, np.memmap) or not isinstance(data, np.ndarray):
        data = np.asarray(data)
    n_c = data.shape[1]
    names = [str(n) for n in channel_names] if channel_names else [f"ch{i}" for i in range(n_c)]
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return CropStack(data, names, stem, (p,), ax, dataset if dataset is not None
                     else p.resolve().parent.name)  # fmt: skip


def crop_stack_from_array(
    data: np.ndarray,
    channel_names: list[str] | None = None,
    name: str = "crops",
    dataset: str = "",
) -> CropStack:
    """A crop stack from an in-memory ``(N, C, [Z,] Y, X)`` array (e.g. a napari layer)."""
    data = np.asarray(data)
    names = list(channel_names) if channel_names else [f"ch{i}" for i in range(data.shape[1])]
    return CropStack(data, names, name, (), "NCZYX" if data.ndim == 5 else "NCYX", dataset)


def resolve_fit(crop_shape: tuple[int, ...], size: tuple[int, ...], fit: str = "auto") -> str:
    """``pad`` or ``resize``: ``auto`` pads crops that fit the input size and resizes larger
    ones; ``pad`` refuses crops larger than the input (it would cut cells)."""
    if fit not in CROP_FIT_CHOICES:
        raise MaeprobeInputError(f"unknown crop fit {fit!r}", "use --crop-fit auto, pad or resize")
    larger = any(c > s for c, s in zip(crop_shape, size))
    if fit == "auto":
        return "resize" if larger else "pad"
    if fit == "pad" and larger:
        raise MaeprobeInputError(
            f"crops of {'x'.join(map(str, crop_shape))} px are larger than the model's input "
            f"{'x'.join(map(str, size))}: padding cannot fit them",
            "use --crop-fit resize (or --crop-fit auto)",
        )
    return fit


def fit_crops(
    crops: np.ndarray, size: tuple[int, ...], fit: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops ``(N, C, *shape)`` brought to ``(N, C, *size)`` as float32.

    ``pad``: each crop centred in zeros; ``resize``: linear interpolation (anti-aliased when
    shrinking). Returns the crops, each crop's mask of its own pixels ``(N, *size)`` and the
    window origin in the crop's own pixel coordinates (negative: padding; zeros when resized).
    """
    x = np.asarray(crops, dtype=np.float32)
    n, c, shape = x.shape[0], x.shape[1], x.shape[2:]
    size = tuple(int(s) for s in size)
    if fit == "pad":
        before = [(s - d) // 2 for d, s in zip(shape, size)]
        out = np.zeros((n, c, *size), dtype=np.float32)
        mask = np.zeros((n, *size), dtype=bool)
        sl = tuple(slice(b, b + d) for b, d in zip(before, shape))
        out[(slice(None), slice(None), *sl)] = x
        mask[(slice(None), *sl)] = True
        origins = np.tile(-np.asarray(before, dtype=np.int64), (n, 1))
        return out, mask, origins
    from skimage.transform import resize

    shrink = any(s < d for d, s in zip(shape, size))
    out = resize(x, (n, c, *size), order=1, preserve_range=True, anti_aliasing=shrink,
                 mode="edge").astype(np.float32)  # fmt: skip
    return out, np.ones((n, *size), dtype=bool), np.zeros((n, len(size)), dtype=np.int64)


def check_crop_job(images, job, labels) -> None:
    """Refuse what a crop stack cannot give: boundary-guided masking (a crop has no label
    image, so no cell boundaries) and label images (each crop already is one cell)."""
    for img, lab in zip(images, labels):
        if not isinstance(img, CropStack):
            continue
        if lab is not None:
            raise MaeprobeInputError(
                f"{img.name} is a crop stack (each crop is one cell) but label images were given",
                "drop --labels for crop stacks",
            )
        if job.masking == "boundary":
            raise MaeprobeInputError(
                f"{img.name} is a crop stack: it has no label image, so no cell boundaries to "
                "guide the masking",
                "use --masking random (or none) for crop stacks",
            )
