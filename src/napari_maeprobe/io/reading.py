"""Open microscopy files as :class:`MicroscopyImage`: TIFF/OME-TIFF, OME-Zarr, ``.npy``, PNG/JPEG,
and folders of one-file-per-channel images (Cell Painting, ImageXpress, HPA naming).

Pixels stay lazy (dask): a reader only parses headers and checks that files are complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.channels import (
    CHANNEL_TOKEN,
    check_unique_names,
    default_names,
    find_channel_table,
    names_from_table,
    order_files_by_table,
)
from napari_maeprobe.io.image import MicroscopyImage, guess_axes, to_canonical

TIFF_EXTS = (".tif", ".tiff")
PLANE_EXTS = (".png", ".jpg", ".jpeg")
IMAGE_EXTS = (*TIFF_EXTS, *PLANE_EXTS, ".npy")
#: above this size a TIFF is read chunk by chunk through zarr instead of in one piece
LAZY_CHUNKED_BYTES = 256 * 2**20
_TOKEN = re.compile(r"[A-Za-z]+\d*|\d+")
_LABEL_NAME = re.compile(r"label|mask|outline|(^|[_\-.])seg", re.IGNORECASE)
#: sub-folders of labels, masks or outlines (left out when a folder tree is read)
_LABEL_FOLDER = re.compile(r"^(labels?|masks?|outlines?|seg|segmentations?)([_\-. ].*)?$", re.I)
_RGB_PLANE = {"red": 0, "green": 1, "blue": 2, "yellow": 0}
#: Opera Phenix / Harmony: r<row>c<col>f<field>p<plane>-ch<channel>sk<t>fk<..>fl<..>
_PHENIX = re.compile(
    r"^(?P<image>r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d{2,})p\d{2,})(?=-ch\d|$)"
)
#: ImageXpress (MetaXpress): <plate>_<well>_s<site>[_w<channel>]
_IMAGEXPRESS = re.compile(r"(?:^|_)(?P<well>[A-Pa-p]\d{2})_s(?P<site>\d+)(?=_w\d|$|_thumb)")
#: tokens that number sites, fields, planes or time points, never channels
_POSITION_TOKEN = re.compile(
    r"^(s|f|z|t|p|x|y|r|row|col|tile|pos|position|site|field|fld|plane|time|roi|region|scene|"
    r"series|well|img|image|point)\d+$",
    re.IGNORECASE,
)


def is_supported(path: str | Path) -> bool:
    """Whether :func:`read_images` can open ``path``: a supported file, an OME-Zarr, or a folder
    that holds image files."""
    p = Path(path)
    if p.is_dir():
        return _is_ome_zarr(p) or any(True for _ in _image_folders(p))
    return p.name.lower().endswith(IMAGE_EXTS) or p.name.lower().endswith(".zarr")


def read_images(
    path: str | Path,
    axes: str | None = None,
    channel_names: Sequence[str] | None = None,
    channel_pattern: str | None = None,
    dataset: str | None = None,
) -> list[MicroscopyImage]:
    """Open every image at ``path``: a file, an OME-Zarr, or a folder tree.

    A folder is read with its sub-folders (a plate tree such as ``images/<plate>/<files>``;
    hidden folders and folders of labels, masks or outlines are left out). In each folder,
    one-file-per-channel images are grouped into multichannel images: the channel is the part
    of the file name that varies (``-ch3``, ``_DAPI``, ``_w2``, or a channel number and a stain
    that vary together), or the whole file name when every file of a folder is one marker
    (``AR.tif``, ``CD3.tif``, ...: the folder is then the image); ``channel_pattern`` is a regex
    with a group ``channel`` that says so explicitly. Files that look like channels of one
    image but do not group are refused with a pattern to pass. Files that are already
    multichannel are opened one by one. ``axes`` overrides the detected layout (e.g.
    ``"ZCYX"``) and ``channel_names`` the detected names.

    Image names (what ``--metadata`` joins on): the path relative to ``path``, without
    extension and without the channel part of the name, with ``/`` between folders, e.g.
    ``SQ00015198/r01c01f03p01`` for ``<path>/SQ00015198/r01c01f03p01-ch1sk1fk1fl1.png``; a
    folder of marker files is named by its path; files directly in ``path`` by their name
    alone. Repeated file names in different folders are therefore different images. Opera
    Phenix (``r01c01f03...``) and ImageXpress (``..._A01_s3_w1``) names give ``well`` (``A01``)
    and ``site`` (``3``), and an image in a sub-folder with such a name gets that folder as
    ``plate``: they are in ``image.metadata["obs"]`` and become observation columns.
    """
    p = Path(path)
    if not p.exists():
        raise MaeprobeInputError(f"{p} does not exist", "check the path")
    if _is_ome_zarr(p):
        images = _read_ome_zarr(p, axes)
    elif p.is_dir():
        images = _read_tree(p, axes, channel_pattern)
    else:
        images = _read_file(p, axes)
        for im in images:
            obs = _name_obs(p.stem)
            if obs:
                im.metadata = {**im.metadata, "obs": {**obs, **im.metadata.get("obs", {})}}
    for im in images:
        if dataset is not None:
            im.dataset = dataset
        if channel_names is not None:
            names = [str(n) for n in channel_names]
            if len(names) != im.n_channels:
                raise MaeprobeInputError(
                    f"{im.name}: {len(names)} channel names given for {im.n_channels} channels",
                    "give exactly one name per channel, in the image's channel order",
                )
            check_unique_names(
                names,
                f"{im.name}: the channel names given",
                "give every channel its own name (--channel-names / channel_names=)",
            )
            im.channel_names = names
    return images


def read_image(
    path: str | Path,
    axes: str | None = None,
    channel_names: Sequence[str] | None = None,
    channel_pattern: str | None = None,
    image: str | None = None,
    dataset: str | None = None,
) -> MicroscopyImage:
    """Open exactly one image at ``path`` (use ``image=NAME`` when a folder holds several)."""
    images = read_images(path, axes, channel_names, channel_pattern, dataset)
    if image is not None:
        chosen = [im for im in images if im.name == image]
        if not chosen:
            raise MaeprobeInputError(
                f"{path} has no image named {image!r}; it has {', '.join(i.name for i in images)}",
                "pass one of those names",
            )
        return chosen[0]
    if len(images) != 1:
        raise MaeprobeInputError(
            f"{path} holds {len(images)} images ({', '.join(i.name for i in images[:8])}"
            f"{', ...' if len(images) > 8 else ''})",
            "pass image=NAME to pick one, or use read_images() to open them all",
        )
    return images[0]


# --------------------------------------------------------------------------- single files


def _read_file(path: Path, axes: str | None) -> list[MicroscopyImage]:
    name = path.name.lower()
    if name.endswith(TIFF_EXTS):
        return _read_tiff(path, axes)
    if name.endswith(".npy"):
        return [_read_npy(path, axes)]
    if name.endswith(PLANE_EXTS):
        plane = _plane_file(path)
        if plane.rgb_plane is not None:  # a colour file opened on its own
            return [_read_colour_file(path, axes)]
        data = da.from_delayed(dask.delayed(_load_plane)(plane), plane.shape, plane.dtype)
        return [_finish(data, axes or "YX", path.stem, (path,), path.parent)]
    raise MaeprobeInputError(
        f"{path.name}: unsupported file type",
        f"convert it to one of {', '.join(IMAGE_EXTS)} or OME-Zarr",
    )


#: folder names that say how files are stored, not which dataset they belong to
GENERIC_FOLDERS = {
    "img",
    "imgs",
    "image",
    "images",
    "orig",
    "raw",
    "fov",
    "fov_partial",
    "cells",
    "data",
    "tif",
    "tiff",
    "tiffs",
    "channels",
}


def dataset_name(folder: Path) -> str:
    """The dataset a folder belongs to: its name, or its parent's when it is a generic store."""
    folder = Path(folder).resolve()
    for candidate in [folder, *folder.parents]:
        if candidate.name and candidate.name.lower() not in GENERIC_FOLDERS:
            return candidate.name
    return folder.name


def _finish(
    data,
    axes_or_hint: str | None,
    name: str,
    source: tuple[Path, ...],
    folder: Path,
    names: list[str] | None = None,
    scale: tuple[float, ...] | None = None,
    explicit_axes: bool = False,
) -> MicroscopyImage:
    """Detect axes, reorder to canonical, and find channel names for a single-array image."""
    if explicit_axes:
        axes = axes_or_hint
    else:
        axes = guess_axes(tuple(data.shape), axes_or_hint, sample=data)
    canon, canon_axes = to_canonical(data, axes, name)
    if canon.dtype.kind == "b":  # a mask saved as True/False: 0/1 intensities
        canon = canon.astype(np.uint8)
    n = int(canon.shape[0])
    if names is None or len(names) != n or _generic(names):
        names = names_from_table(find_channel_table(folder), n) or default_names(n)
    if scale is not None and len(scale) != len(canon_axes) - 1:
        scale = None
    return MicroscopyImage(
        data=canon,
        channel_names=list(names),
        name=name,
        source=source,
        source_axes=axes,
        scale=scale,
        dataset=dataset_name(folder),
    )


def _undecodable(path: Path, exc: BaseException) -> MaeprobeInputError:
    """The one-line error for pixel data that fail to decode (found only when pixels are read)."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MaeprobeInputError(
        f"{path}: the pixel data cannot be decoded, the file is damaged ({detail})",
        "copy or download the file again, or move it out of the input",
    )


def _decode(path: Path, read) -> np.ndarray:
    """Run ``read()`` (which decodes ``path``), turning any decoding failure into one line."""
    try:
        arr = np.asarray(read())
    except MaeprobeInputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # codecs raise their own types (ImcdError, OSError, zlib.error)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the file system's error (gone, no permission), said as such by the CLI
        raise _undecodable(path, exc) from exc
    return arr.astype(np.uint8) if arr.dtype.kind == "b" else arr


def _pixel_dtype(dtype) -> np.dtype:
    """Boolean images (masks saved as True/False) are read as 0/1 ``uint8`` intensities."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint8) if dtype.kind == "b" else dtype


def _read_colour_file(path: Path, axes: str | None) -> MicroscopyImage:
    """An RGB(A) PNG/JPEG opened on its own: its three colour planes are three channels,
    unless the file is one channel saved in colour.

    One channel is kept when the planes are identical (grey saved as RGB; for JPEG up to the
    rounding of its colour transform, 2 grey levels) or when the name ends in a colour word
    (HPA's ``_blue`` / ``_red`` / ``_green`` / ``_yellow``: that plane, R for yellow, carries the
    signal). This reads the pixels when opening (colour files are small 8-bit images).
    """
    import imageio.v3 as iio

    arr = _decode(path, lambda: iio.imread(path))
    if axes is not None:
        return _finish(da.from_array(arr), axes, path.stem, (path,), path.parent,
                       explicit_axes=True)  # fmt: skip
    rgb = arr[..., :3]
    tol = 2 if path.name.lower().endswith((".jpg", ".jpeg")) else 0
    colour = (_TOKEN.findall(path.stem) or [""])[-1].lower()
    keep: int | None = None
    if colour in _RGB_PLANE:
        keep, why = _RGB_PLANE[colour], f"its name says it is the {colour} channel"
    elif all(
        int(np.abs(rgb[..., i].astype(np.int32) - rgb[..., 0]).max()) <= tol for i in (1, 2)
    ):
        keep, why = 0, "its three colour planes are identical (grey saved as RGB)"
    if keep is not None:
        warnings.warn(
            f"{path.name}: one channel saved in colour; kept the {'RGB'[keep]} plane ({why})",
            stacklevel=3,
        )
        data = da.from_array(np.ascontiguousarray(rgb[..., keep]))
        names = [colour] if colour in _RGB_PLANE else None
        return _finish(data, "YX", path.stem, (path,), path.parent, names)
    data = da.from_array(np.ascontiguousarray(np.moveaxis(rgb, -1, 0)))
    names = names_from_table(find_channel_table(path.parent), 3) or ["R", "G", "B"]
    return _finish(data, "CYX", path.stem, (path,), path.parent, names, explicit_axes=True)


def _generic(names: Sequence[str]) -> bool:
    return all(re.fullmatch(r"(channel|ch|c)?[\s:_-]*\d+([\s:_-]*\d+)?", n.lower()) for n in names)


def _capture_tifffile_warnings():
    """Collect tifffile's log warnings: it logs (rather than raises) on many broken files."""
    messages: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    return messages, _Grab(level=logging.WARNING)


def _read_tiff(path: Path, axes: str | None) -> list[MicroscopyImage]:
    import tifffile

    messages, handler = _capture_tifffile_warnings()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # tifffile raises many types for broken files
            raise MaeprobeInputError(
                f"{path.name} cannot be read as a TIFF ({exc})",
                "check that the file is complete (copy or download it again)",
            ) from exc
        with tif:
            _check_tiff_complete(tif, path, messages)
            images = []
            for idx, series in enumerate(tif.series):
                if series.kind.lower() in ("thumbnail",) or series.shape == ():
                    continue
                names, scale = _tiff_channel_names_and_scale(tif, series, idx)
                hint = series.axes
                shape, dtype = tuple(series.shape), series.dtype
                nbytes = int(np.prod(shape)) * dtype.itemsize
                if nbytes > LAZY_CHUNKED_BYTES:
                    data = _tiff_zarr(path, idx)
                else:
                    data = da.from_delayed(
                        dask.delayed(_load_tiff_series)(str(path), idx), shape, dtype
                    )
                name = path.stem if len(tif.series) == 1 else f"{path.stem}[{idx}]"
                name = name.removesuffix(".ome")
                images.append(
                    _finish(
                        data,
                        axes or hint,
                        name,
                        (path,),
                        path.parent,
                        names,
                        scale,
                        explicit_axes=axes is not None,
                    )
                )
    finally:
        logger.removeHandler(handler)
    if not images:
        raise MaeprobeInputError(f"{path.name} contains no image data", "check the file")
    return images


def _check_tiff_complete(tif, path: Path, messages: list[str]) -> None:
    """Refuse a TIFF whose pixel data run past the end of the file (a truncated copy)."""
    size = os.path.getsize(path)
    needed = 0
    for page in tif.pages:
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        for off, cnt in zip(offsets, counts):
            needed = max(needed, int(off) + int(cnt))
    # only warnings that mean missing data (tifffile also warns on harmless odd tags)
    broken = [
        m
        for m in messages
        if re.search(
            r"truncat|out of (range|bounds)|beyond end|invalid (page |ifd )?offset", m, re.I
        )
    ]
    if needed > size or broken:
        detail = (
            f"it has {size} bytes but its pixel data need {needed}" if needed > size else broken[0]
        )
        raise MaeprobeInputError(
            f"{path.name} is truncated or damaged ({detail})",
            "copy or download the file again; nothing was read from it",
        )


def _load_tiff_series(path: str, idx: int) -> np.ndarray:
    import tifffile

    return _decode(Path(path), lambda: tifffile.imread(path, series=idx))


def _tiff_zarr(path: Path, idx: int) -> da.Array:
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=idx, level=0)
    z = zarr.open(store, mode="r")

    def block(block_info=None):  # one tile; a tile that fails to decode is one line
        loc = block_info[None]["array-location"]
        return _decode(path, lambda: z[tuple(slice(a, b) for a, b in loc)])

    chunks = da.core.normalize_chunks(z.chunks, z.shape)
    return da.map_blocks(block, chunks=chunks, dtype=z.dtype, meta=np.empty((0,) * z.ndim, z.dtype))


def _tiff_channel_names_and_scale(tif, series, idx: int) -> tuple[list[str] | None, tuple | None]:
    names: list[str] | None = None
    scale: tuple | None = None
    if tif.is_ome and tif.ome_metadata:
        names, scale = _ome_xml_names_and_scale(tif.ome_metadata, idx)
    elif tif.is_imagej:
        meta = tif.imagej_metadata or {}
        unit = str(meta.get("unit", "")).lower()
        page = series.pages[0] if series.pages else None
        if page is not None and unit in ("micron", "um", "µm", "\\u00b5m", "microns"):
            res = page.tags.get("XResolution")
            if res is not None and res.value[0]:
                px = res.value[1] / res.value[0]
                scale = (
                    (float(meta["spacing"]), px, px)
                    if "Z" in series.axes and "spacing" in meta
                    else (px, px)
                )
        labels = meta.get("Labels")
        if isinstance(labels, list) and labels and "C" in series.axes:
            n_c = series.shape[series.axes.index("C")]
            if len(labels) == n_c:
                names = [str(x) for x in labels]
    return names, scale


def _ome_xml_names_and_scale(xml: str, index: int) -> tuple[list[str] | None, tuple | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    pre = "ome:" if ns else ""
    images = root.findall(f"{pre}Image", ns)
    if not images:
        return None, None
    pixels = images[min(index, len(images) - 1)].find(f"{pre}Pixels", ns)
    if pixels is None:
        return None, None
    chans = pixels.findall(f"{pre}Channel", ns)
    names = [c.get("Name") or c.get("Fluor") or "" for c in chans]
    names = names if names and all(names) else None
    sizes = [pixels.get(f"PhysicalSize{a}") for a in "ZYX"]
    scale = None
    if sizes[1] and sizes[2]:
        yx = (float(sizes[1]), float(sizes[2]))
        z_count = int(pixels.get("SizeZ", "1"))
        scale = ((float(sizes[0]) if sizes[0] else 1.0), *yx) if z_count > 1 else yx
    return names, scale


def _read_npy(path: Path, axes: str | None) -> MicroscopyImage:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise MaeprobeInputError(
            f"{path.name} cannot be read as a NumPy array ({exc})",
            "check that the file is complete and was written with numpy.save",
        ) from exc
    if arr.dtype.kind not in "biuf":
        raise MaeprobeInputError(
            f"{path.name} holds {arr.dtype} values, not pixel intensities",
            "save a numeric array (integers or floats)",
        )
    data = da.from_array(arr, chunks=arr.shape)
    return _finish(data, axes, path.stem, (path,), path.parent, explicit_axes=axes is not None)


# --------------------------------------------------------------------------- OME-Zarr


def _zarr_attrs(path: Path) -> dict | None:
    for meta in (".zattrs", "zarr.json"):
        f = path / meta
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            attrs = attrs.get("attributes", attrs) if meta == "zarr.json" else attrs
            return attrs.get("ome", attrs)
    return None


def _is_ome_zarr(path: Path) -> bool:
    attrs = _zarr_attrs(path) if path.is_dir() else None
    return bool(attrs and "multiscales" in attrs)


def _read_ome_zarr(path: Path, axes: str | None) -> list[MicroscopyImage]:
    import zarr

    attrs = _zarr_attrs(path) or {}
    ms = attrs["multiscales"][0]
    try:
        group = zarr.open_group(str(path), mode="r")
        first = ms["datasets"][0]
        arr = group[first["path"]]
    except Exception as exc:
        raise MaeprobeInputError(
            f"{path.name} is not a readable OME-Zarr ({exc})", "check that the store is complete"
        ) from exc
    _check_chunks_complete(arr, path, first["path"])
    data = da.from_zarr(arr)
    axes_meta = ms.get("axes")
    hint = None
    if axes_meta:
        hint = "".join((a["name"] if isinstance(a, dict) else str(a))[0].upper() for a in axes_meta)
    scale = None
    for t in first.get("coordinateTransformations", []):
        if t.get("type") == "scale" and hint:
            spatial = [s for s, a in zip(t["scale"], hint) if a in "ZYX"]
            scale = tuple(float(s) for s in spatial)
    names = None
    omero = attrs.get("omero", {})
    if omero.get("channels"):
        names = [str(c.get("label", "")) for c in omero["channels"]]
        names = names if all(names) else None
    name = path.name.removesuffix(".zarr").removesuffix(".ome")
    return [_finish(data, axes or hint, name, (path,), path.parent, names, scale, axes is not None)]


def _check_chunks_complete(arr, path: Path, name: str) -> None:
    """Chunks missing from an OME-Zarr array (zarr reads them as the fill value: whole blocks
    of the image silently zero). Zarr format 2 writers store every chunk (the default since
    zarr-python 2.11), so a gap there is an incomplete copy: refused. Zarr format 3 writers
    leave out chunks that hold only the fill value by default, so a gap may be empty image:
    a warning that names the count, and the pixels read as the fill value."""
    try:
        expected = int(arr.nchunks)
        stored = int(arr.nchunks_initialized)
    except Exception:  # a store that cannot list its keys: nothing to compare with
        return
    if stored >= expected:
        return
    problem = (
        f"{path.name}: array '{name}' has {expected - stored} of its {expected} chunks missing"
    )
    if int(getattr(arr.metadata, "zarr_format", 2)) >= 3:
        warnings.warn(
            f"{problem}; zarr 3 leaves out chunks that are all {arr.fill_value!r}, so they "
            "read as that value (if the store was copied, check that the copy is complete)",
            stacklevel=3,
        )
        return
    raise MaeprobeInputError(
        f"{problem} (an incomplete copy; zarr would read them as zeros)",
        "copy the whole store again",
    )


# --------------------------------------------------------------------------- folders


@dataclass
class _FileInfo:
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    single_plane: bool  # a 2D image (or an RGB file holding one channel)
    rgb: bool = False  # an RGB(A) file


def _probe(path: Path) -> _FileInfo:
    name = path.name.lower()
    if name.endswith(TIFF_EXTS):
        import tifffile

        messages, handler = _capture_tifffile_warnings()
        logging.getLogger("tifffile").addHandler(handler)
        try:
            with tifffile.TiffFile(path) as tif:
                _check_tiff_complete(tif, path, messages)
                s = tif.series[0]
                shape, dtype, axes = tuple(s.shape), s.dtype, s.axes
        except MaeprobeInputError:
            raise
        except Exception as exc:
            raise MaeprobeInputError(
                f"{path.name} cannot be read as a TIFF ({exc})",
                "check that the file is complete (copy or download it again)",
            ) from exc
        finally:
            logging.getLogger("tifffile").removeHandler(handler)
        single = len(shape) == 2 or (len(shape) == 3 and axes.endswith("S") and shape[-1] in (3, 4))
        return _FileInfo(path, shape, dtype, single, len(shape) == 3)
    if name.endswith(".npy"):  # opened as a whole image, never grouped as one channel
        arr = _read_npy(path, None).data
        return _FileInfo(path, tuple(arr.shape), arr.dtype, False)
    plane = _plane_file(path)
    return _FileInfo(path, plane.shape, plane.dtype, True, plane.rgb_plane is not None)


@dataclass
class _PlaneFile:
    path: Path
    shape: tuple[int, int]
    dtype: np.dtype
    rgb_plane: int | None  # which colour plane holds the channel in an RGB file


def _plane_file(path: Path, token: str = "") -> _PlaneFile:
    import imageio.v3 as iio

    try:
        props = iio.improps(path)
    except Exception as exc:
        raise MaeprobeInputError(
            f"{path.name} cannot be read as an image ({exc})",
            "check that the file is complete (copy or download it again)",
        ) from exc
    shape = tuple(props.shape)
    if len(shape) == 2:
        return _PlaneFile(path, shape, _pixel_dtype(props.dtype), None)
    if len(shape) == 3 and shape[-1] in (3, 4):
        plane = _RGB_PLANE.get(token.lower())
        return _PlaneFile(
            path, shape[:2], np.dtype(props.dtype), plane if plane is not None else -1
        )
    raise MaeprobeInputError(
        f"{path.name} has shape {shape}, not a single image plane", "save one 2D plane per file"
    )


def _load_plane(plane: _PlaneFile) -> np.ndarray:
    import imageio.v3 as iio

    if plane.path.name.lower().endswith(TIFF_EXTS):
        import tifffile

        arr = _decode(plane.path, lambda: tifffile.imread(plane.path))
    else:
        arr = _decode(plane.path, lambda: iio.imread(plane.path))
    if arr.ndim == 3:
        if plane.rgb_plane is not None and plane.rgb_plane >= 0:
            arr = arr[..., plane.rgb_plane]
        else:  # one channel saved as RGB: the colour plane that carries the signal
            arr = arr[..., int(np.argmax(arr[..., :3].reshape(-1, 3).mean(axis=0)))]
    return np.ascontiguousarray(arr)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def group_channel_files(
    files: Sequence[Path], channel_pattern: str | None = None
) -> list[tuple[str, list[Path], list[str]]]:
    """Group one-file-per-channel images: returns ``(image name, files, channel tokens)``.

    Without ``channel_pattern`` the channel is the token of the file name (``ch3``, ``d0``,
    ``DAPI``, ``blue``, ...) that varies while the rest of the name stays the same, with the same
    set of values for every image; tokens that vary together with it (a channel number beside
    a stain name, as in ``B02_01_2_1_GFP_001.tif``) are part of the channel too, and the files
    are ordered by them. Files that do not group are returned alone with token ``""``.
    """
    files = sorted(files, key=lambda f: _natural_key(f.name))
    if channel_pattern:
        try:
            rx = re.compile(channel_pattern)
        except re.error as exc:
            raise MaeprobeInputError(
                f"the channel pattern {channel_pattern!r} is not a valid regex ({exc})",
                "fix the pattern, e.g. '-(?P<channel>ch\\d+)'",
            ) from exc
        if rx.groups == 0:
            raise MaeprobeInputError(
                f"the channel pattern {channel_pattern!r} has no group",
                "put the channel part in a group named 'channel', e.g. '-(?P<channel>ch\\d+)'",
            )
        groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
        for f in files:
            m = rx.search(f.stem)
            if not m:
                raise MaeprobeInputError(
                    f"{f.name} does not match the channel pattern {channel_pattern!r}",
                    "use a pattern that matches every file, with a group named 'channel'",
                )
            tok = m.group("channel") if "channel" in rx.groupindex else m.group(1)
            key = f.stem[: m.start()] + f.stem[m.end() :]
            groups[key].append((f, tok))
        return [(_clean_key(k), [f for f, _ in v], [t for _, t in v]) for k, v in groups.items()]
    tokens = {f: _TOKEN.findall(f.stem) for f in files}
    by_count: dict[int, list[Path]] = defaultdict(list)
    for f in files:
        by_count[len(tokens[f])].append(f)
    result: list[tuple[str, list[Path], list[str]]] = []
    for bucket in by_count.values():
        # Opera Phenix / Operetta names: r01c01f03p01 is the well, field and plane, never the
        # channel (with two wells and two channels, c01/c13 would look like one)
        phenix = [_PHENIX.match(f.stem) for f in bucket]
        first = len(_TOKEN.findall(phenix[0].group("image"))) if all(phenix) else 0
        found = _channel_position([tokens[f] for f in bucket], first) if len(bucket) > 1 else None
        if found is None:
            result.extend((f.stem, [f], [""]) for f in bucket)
            continue
        pos, drop = found
        groups = defaultdict(list)
        for f in bucket:
            t = tokens[f]
            groups[tuple(v for k, v in enumerate(t) if k not in drop)].append(f)
        for members in groups.values():
            members.sort(key=lambda f: [_natural_key(tokens[f][k]) for k in drop])
            result.append(
                (_image_key(members[0].stem, drop), members, [tokens[f][pos] for f in members])
            )
    return result


def _image_key(stem: str, drop: Sequence[int]) -> str:
    """The image name of a channel file: its name without the channel token(s)."""
    phenix = _PHENIX.match(stem)
    if phenix:  # r01c01f03p01-ch1sk1fk1fl1 -> r01c01f03p01 (the rest names channel and time)
        return phenix.group("image")
    spans = [m.span() for k, m in enumerate(_TOKEN.finditer(stem)) if k in set(drop)]
    for start, end in sorted(spans, reverse=True):
        stem = stem[:start] + "_" + stem[end:]
    return _clean_key(stem)


def _clean_key(key: str) -> str:
    return re.sub(r"[_\-. ]{2,}", "_", key).strip("_-. ") or "image"


def _varies_with(token_lists: list[list[str]], i: int, j: int) -> bool:
    """Whether token ``j`` changes exactly when token ``i`` does (one value of each per pair)."""
    pairs = {(t[i], t[j]) for t in token_lists}
    return len({p[1] for p in pairs}) > 1 and len(pairs) == len({p[0] for p in pairs}) == len(
        {p[1] for p in pairs}
    )


def _cross_groups(token_lists: list[list[str]], i: int, drop: set[int]) -> dict | None:
    """Group by the tokens outside ``drop``; ``None`` unless every group holds the same set of
    values of token ``i`` (every image has every channel) and there are several values."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for n, t in enumerate(token_lists):
        groups[tuple(v for k, v in enumerate(t) if k not in drop)].append(n)
    values = {t[i] for t in token_lists}
    sets = {frozenset(token_lists[n][i] for n in members) for members in groups.values()}
    sizes = {len(members) for members in groups.values()}
    if len(values) < 2 or len(sets) != 1 or sizes != {len(values)}:
        return None
    return groups


def _channel_position(
    token_lists: list[list[str]], first: int = 0
) -> tuple[int, tuple[int, ...]] | None:
    """The token position (from ``first`` on) that names the channel and every position that
    varies with it, or ``None`` if the files do not group."""
    n = len(token_lists[0])
    valid: list[tuple[int, int, int, tuple[int, ...]]] = []
    for i in range(first, n):
        values = {t[i] for t in token_lists}
        if len(values) < 2 or all(v.isdigit() for v in values):
            continue  # constant, or a plain number (a site, z or channel index, not a name)
        drop = {i} | {j for j in range(n) if j != i and _varies_with(token_lists, i, j)}
        if _cross_groups(token_lists, i, drop) is None:
            continue
        # a channel token (ch3, d0, w2, DAPI, blue) or a plain word (a stain name);
        # not an identifier with digits such as a sample name (mockData2)
        if all(CHANNEL_TOKEN.match(v) for v in values):
            valid.append((0, len(values), i, tuple(sorted(drop))))
        elif all(v.isalpha() for v in values):
            valid.append((1, len(values), i, tuple(sorted(drop))))
    if not valid:
        return None
    best = min(valid)
    return best[2], best[3]


def _name_obs(stem: str) -> dict:
    """Well and site of names that say them for certain: Opera Phenix ``r01c01f03...`` and
    ImageXpress ``..._A01_s3[_w1]``."""
    phenix = _PHENIX.match(stem)
    if phenix:
        row = int(phenix.group("row"))
        if 1 <= row <= 52:
            letters = chr(64 + row) if row <= 26 else "A" + chr(64 + row - 26)
            return {"well": f"{letters}{int(phenix.group('col')):02d}",
                    "site": int(phenix.group("site"))}  # fmt: skip
    ixm = _IMAGEXPRESS.search(stem)
    if ixm:
        return {"well": ixm.group("well").upper(), "site": int(ixm.group("site"))}
    return {}


def _image_folders(root: Path):
    """``root`` and its sub-folders that hold image files, and the OME-Zarr stores among them
    (hidden folders and folders of labels, masks or outlines are left out)."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep, stores = [], []
        for d in sorted(dirnames, key=_natural_key):
            sub = here / d
            if d.startswith("."):
                continue
            if _is_ome_zarr(sub):
                stores.append(sub)
            elif not d.lower().endswith(".zarr") and not _LABEL_FOLDER.match(d):
                keep.append(d)
        dirnames[:] = keep
        if any(not f.startswith(".") and f.lower().endswith(IMAGE_EXTS) for f in filenames):
            yield here
        yield from stores


def _read_tree(root: Path, axes: str | None, channel_pattern: str | None) -> list[MicroscopyImage]:
    """Every image in ``root`` and its sub-folders, named by their path relative to ``root``."""
    folders = list(_image_folders(root))
    if not folders:
        raise MaeprobeInputError(
            f"{root} contains no image files ({', '.join(IMAGE_EXTS)}) in it or its sub-folders "
            "(folders of labels, masks or outlines are left out)",
            "pick a folder with images",
        )
    dataset = dataset_name(root)
    images: list[MicroscopyImage] = []
    for folder in folders:
        rel = folder.relative_to(root).as_posix()
        rel = "" if rel == "." else rel
        if _is_ome_zarr(folder):
            found = _read_ome_zarr(folder, axes)
            for im in found:
                im.name = rel.removesuffix(".zarr").removesuffix(".ome")
        else:
            found = _read_folder(folder, axes, channel_pattern, rel)
        for im in found:
            im.dataset = dataset
        images.extend(found)
    return images


def _whole_name_markers(singles: list[Path], infos: dict[Path, _FileInfo]) -> bool:
    """Whether every single-plane file of a folder is one marker of one image, named by the
    whole file name (``AR.tif``, ``CD3.tif``, ...: multiplexed ion-beam imaging, one folder per
    field): same size and type, plain planes, names that share (almost) nothing and are not a
    numbered series."""
    if len(singles) < 2:
        return False
    if len({(infos[f].shape, infos[f].dtype) for f in singles}) != 1:
        return False
    if len(infos[singles[0]].shape) != 2 or any(infos[f].rgb for f in singles):
        return False
    token_sets = [{t.lower() for t in _TOKEN.findall(f.stem)} for f in singles]
    numbered = [re.fullmatch(r"(\D*?)\d+", f.stem) for f in singles]
    if all(numbered) and len({m.group(1).lower() for m in numbered}) == 1:
        return False  # a numbered series (DSC0034, DSC0035 / sample1, sample2), not markers
    # marker names are (nearly) disjoint: a token may recur in a few of them (HLA_DR, HLA_Class_1)
    counts: dict[str, int] = defaultdict(int)
    for tokens in token_sets:
        for t in tokens:
            counts[t] += 1
    if counts and max(counts.values()) > max(1, len(singles) // 5):
        return False
    return not any(_name_obs(f.stem) for f in singles)


def _refuse_ungrouped(folder: Path, alone: list[Path], infos: dict[Path, _FileInfo]) -> None:
    """Refuse single-plane files that look like the channels of one image but were not grouped
    (same size, names that differ only in a short token), with a ``--channel-pattern`` that
    groups them; processing each plane as its own image would be wrong."""
    planes = [f for f in alone if len(infos[f].shape) == 2 and not infos[f].rgb]
    tokens = {f: _TOKEN.findall(f.stem) for f in planes}
    by_count: dict[int, list[Path]] = defaultdict(list)
    for f in planes:
        by_count[len(tokens[f])].append(f)
    for bucket in by_count.values():
        lists = [tokens[f] for f in bucket]
        if len(bucket) < 2:
            continue
        for i in range(len(lists[0])):
            values = {t[i] for t in lists}
            if (
                len(values) < 2
                or all(v.isdigit() for v in values)
                or any(len(v) > 8 or _POSITION_TOKEN.match(v) for v in values)
                or _enumeration(values)
            ):
                continue
            drop = {i} | {j for j in range(len(lists[0])) if j != i and _varies_with(lists, i, j)}
            if len(drop) == len(lists[0]):
                continue  # the names share nothing: not one name with a channel part
            groups = _cross_groups(lists, i, drop)
            if groups is None or any(
                len({(infos[bucket[n]].shape, infos[bucket[n]].dtype) for n in members}) > 1
                for members in groups.values()
            ):
                continue
            pattern = _suggest_pattern(bucket, i, values)
            example = ", ".join(f.name for f in bucket[: min(len(values), 4)])
            raise MaeprobeInputError(
                f"{folder}: {len(bucket)} single-plane files of the same size look like the "
                f"channels of {len(groups)} image(s) ({example}, ...) but their channel part "
                f"({', '.join(sorted(values, key=_natural_key)[:6])}) was not recognised",
                (f"pass --channel-pattern '{pattern}' (channel_pattern= in Python)"
                 if pattern else "pass --channel-pattern with a group named 'channel' that "
                 "matches the channel part of the names") + " to read them as channels",
            )  # fmt: skip


def _enumeration(values: set[str]) -> bool:
    """Values that number things (``sample1``, ``sample2``, ``DSC0034``, ``DSC0035``: one word,
    consecutive numbers) rather than name channels (``AF405``, ``AF488``)."""
    parts = [re.fullmatch(r"([A-Za-z]*)(\d+)", v) for v in values]
    if not all(parts) or len({p.group(1).lower() for p in parts}) != 1:
        return False
    numbers = sorted(int(p.group(2)) for p in parts)
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def _suggest_pattern(files: list[Path], i: int, values: set[str]) -> str | None:
    """A ``--channel-pattern`` that groups ``files`` by token ``i``, checked before it is given."""
    stem = files[0].stem
    span = list(_TOKEN.finditer(stem))[i].span()
    before = stem[span[0] - 1] if span[0] > 0 and not stem[span[0] - 1].isalnum() else ""
    after = stem[span[1] : span[1] + 1]
    alternatives = "|".join(re.escape(v) for v in sorted(values, key=lambda v: (-len(v), v)))
    pattern = re.escape(before) + f"(?P<channel>{alternatives})"
    if not after or not after.isalnum():
        pattern += "(?![A-Za-z0-9])"
    try:
        groups = group_channel_files(files, pattern)
    except MaeprobeInputError:
        return None
    return pattern if all(len(g[1]) == len(values) for g in groups) else None


def _read_folder(
    folder: Path, axes: str | None, channel_pattern: str | None, rel: str = ""
) -> list[MicroscopyImage]:
    """The images of one folder (``rel``: its path below the folder the user gave)."""
    files = sorted(
        (
            f
            for f in folder.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTS)
        ),
        key=lambda f: _natural_key(f.name),
    )
    infos = {f: _probe(f) for f in files}
    # multichannel files and label/mask images are opened on their own, never grouped
    singles = [f for f in files if infos[f].single_plane and not _LABEL_NAME.search(f.stem)]
    alone = sorted(set(files) - set(singles), key=lambda f: _natural_key(f.name))
    images = [im for f in alone for im in _read_file(f, axes)]
    table = find_channel_table(folder)
    whole = channel_pattern is None and _whole_name_markers(singles, infos)
    if whole:
        groups = [(rel or folder.name, singles, [f.stem for f in singles])]
    else:
        groups = group_channel_files(singles, channel_pattern)
        if channel_pattern is None:
            _refuse_ungrouped(folder, [g[1][0] for g in groups if g[2] == [""]], infos)
    prefix = f"{rel}/" if rel else ""
    for name, members, toks in groups:
        if len(members) == 1 and toks == [""]:
            images.extend(_read_file(members[0], axes))
            continue
        planes = [_as_plane(infos[m], tok) for m, tok in zip(members, toks)]
        shapes = {p.shape for p in planes}
        if len(shapes) > 1:
            listing = ", ".join(f"{p.path.name} {p.shape[0]}x{p.shape[1]}" for p in planes)
            raise MaeprobeInputError(
                f"the channel files of {name} in {folder} have different sizes ({listing})",
                "give every channel file of an image the same size, or move the odd ones out",
            )
        matched = order_files_by_table(table, members, toks)
        if matched is not None:
            order, names = matched
        else:  # a table listing channels in order says nothing about marker files' order
            order = list(range(len(members)))
            names = (None if whole else names_from_table(table, len(members))) or list(toks)
        planes = [planes[i] for i in order]
        dtype = np.result_type(*[p.dtype for p in planes])
        stack = da.stack(
            [
                da.from_delayed(dask.delayed(_load_plane)(p), p.shape, p.dtype).astype(dtype)
                for p in planes
            ]
        )
        image = MicroscopyImage(
            data=stack,
            channel_names=names,
            name=name,
            source=tuple(p.path for p in planes),
            source_axes="CYX",
            dataset=dataset_name(folder),
        )
        images.append(image)
    for im in images:
        if not (whole and im is images[-1]):  # a folder of markers is named by its path
            im.name = prefix + im.name
        obs = _name_obs(Path(im.source[0]).stem) if im.source else {}
        if obs and rel:  # a plate tree: the folder holding the files is the plate
            obs = {"plate": folder.name, **obs}
        if obs:
            im.metadata = {**im.metadata, "obs": {**obs, **im.metadata.get("obs", {})}}
    return images


def _as_plane(info: _FileInfo, token: str) -> _PlaneFile:
    if info.path.name.lower().endswith(PLANE_EXTS):
        return _plane_file(info.path, token)
    rgb = None if len(info.shape) == 2 else _RGB_PLANE.get(token.lower(), -1)
    return _PlaneFile(info.path, tuple(info.shape[:2]), _pixel_dtype(info.dtype), rgb)
