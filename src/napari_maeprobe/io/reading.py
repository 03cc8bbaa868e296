"""Open microscopy files as :class:`MicroscopyImage`: TIFF/OME-TIFF, OME-Zarr, ``.npy``, PNG/JPEG,
and folders of one-file-per-channel images (Cell Painting, ImageXpress, HPA naming).

Pixels stay lazy (dask): a reader only parses headers and checks that files are complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
_LABEL_NAME = re.compile(r"label|mask|(^|[_\-.])seg", re.IGNORECASE)
_RGB_PLANE = {"red": 0, "green": 1, "blue": 2, "yellow": 0}


def is_supported(path: str | Path) -> bool:
    """Whether :func:`read_images` can open ``path``: a supported file, an OME-Zarr, or a folder
    that holds image files."""
    p = Path(path)
    if p.is_dir():
        return _is_ome_zarr(p) or any(
            f.is_file() and f.name.lower().endswith(IMAGE_EXTS) for f in p.iterdir()
        )
    return p.name.lower().endswith(IMAGE_EXTS) or p.name.lower().endswith(".zarr")


def read_images(
    path: str | Path,
    axes: str | None = None,
    channel_names: Sequence[str] | None = None,
    channel_pattern: str | None = None,
    dataset: str | None = None,
) -> list[MicroscopyImage]:
    """Open every image at ``path``: a file, an OME-Zarr, or a folder.

    In a folder, one-file-per-channel images are grouped into multichannel images (the channel
    is the part of the file name that varies, e.g. ``-ch3`` or ``_DAPI``; ``channel_pattern`` is
    a regex with a group ``channel`` to say so explicitly); files that are already multichannel
    are opened one by one. ``axes`` overrides the detected layout (e.g. ``"ZCYX"``) and
    ``channel_names`` the detected names.
    """
    p = Path(path)
    if not p.exists():
        raise MaeprobeInputError(f"{p} does not exist", "check the path")
    if _is_ome_zarr(p):
        images = _read_ome_zarr(p, axes)
    elif p.is_dir():
        images = _read_folder(p, axes, channel_pattern)
    else:
        images = _read_file(p, axes)
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

    return tifffile.imread(path, series=idx)


def _tiff_zarr(path: Path, idx: int) -> da.Array:
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=idx, level=0)
    return da.from_zarr(zarr.open(store, mode="r"))


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


# --------------------------------------------------------------------------- folders


@dataclass
class _FileInfo:
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    single_plane: bool  # a 2D image (or an RGB file holding one channel)


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
        return _FileInfo(path, shape, dtype, single)
    if name.endswith(".npy"):  # opened as a whole image, never grouped as one channel
        arr = _read_npy(path, None).data
        return _FileInfo(path, tuple(arr.shape), arr.dtype, False)
    plane = _plane_file(path)
    return _FileInfo(path, plane.shape, plane.dtype, True)


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
        return _PlaneFile(path, shape, np.dtype(props.dtype), None)
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

        arr = tifffile.imread(plane.path)
    else:
        arr = iio.imread(plane.path)
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
    set of values for every image. Files that do not group are returned alone with token ``""``.
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
        pos = _channel_position([tokens[f] for f in bucket]) if len(bucket) > 1 else None
        if pos is None:
            result.extend((f.stem, [f], [""]) for f in bucket)
            continue
        groups = defaultdict(list)
        for f in bucket:
            t = tokens[f]
            groups[tuple(t[:pos] + t[pos + 1 :])].append((f, t[pos]))
        for members in groups.values():
            members.sort(key=lambda m: _natural_key(m[1]))
            f0, tok0 = members[0]
            result.append(
                (
                    _clean_key(f0.stem.replace(tok0, "", 1)),
                    [m[0] for m in members],
                    [m[1] for m in members],
                )
            )
    return result


def _clean_key(key: str) -> str:
    return re.sub(r"[_\-. ]{2,}", "_", key).strip("_-. ") or "image"


def _channel_position(token_lists: list[list[str]]) -> int | None:
    """The token position that names the channel, or ``None`` if the files do not group."""
    n = len(token_lists[0])
    valid: list[tuple[int, int, int]] = []
    for i in range(n):
        values = {t[i] for t in token_lists}
        if len(values) < 2 or all(v.isdigit() for v in values):
            continue  # constant, or a plain number (a site or z index, not a channel)
        groups: dict[tuple, list[str]] = defaultdict(list)
        for t in token_lists:
            groups[tuple(t[:i] + t[i + 1 :])].append(t[i])
        sets = {frozenset(v) for v in groups.values()}
        sizes = {len(v) for v in groups.values()}
        if len(sets) == 1 and sizes == {len(values)}:
            # a channel token (ch3, d0, w2, DAPI, blue) or a plain word (a stain name);
            # not an identifier with digits such as a sample name (mockData2)
            if all(CHANNEL_TOKEN.match(v) for v in values):
                valid.append((0, len(values), i))
            elif all(v.isalpha() for v in values):
                valid.append((1, len(values), i))
    return min(valid)[2] if valid else None


def _read_folder(
    folder: Path, axes: str | None, channel_pattern: str | None
) -> list[MicroscopyImage]:
    files = [f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTS)]
    if not files:
        sub = sorted(
            str(d.relative_to(folder))
            for d in folder.rglob("*")
            if d.is_dir() and any(f.name.lower().endswith(IMAGE_EXTS) for f in d.iterdir())
        )
        hint = (
            f"open one of its subfolders: {', '.join(sub[:6])}"
            if sub
            else "pick a folder with images"
        )
        raise MaeprobeInputError(
            f"{folder} contains no image files ({', '.join(IMAGE_EXTS)})", hint
        )
    infos = {f: _probe(f) for f in files}
    # multichannel files and label/mask images are opened on their own, never grouped
    singles = [f for f in files if infos[f].single_plane and not _LABEL_NAME.search(f.stem)]
    alone = sorted(set(files) - set(singles), key=lambda f: _natural_key(f.name))
    images = [im for f in alone for im in _read_file(f, axes)]
    table = find_channel_table(folder)
    for name, members, toks in group_channel_files(singles, channel_pattern):
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
        else:
            order = list(range(len(members)))
            names = names_from_table(table, len(members)) or list(toks)
        planes = [planes[i] for i in order]
        dtype = np.result_type(*[p.dtype for p in planes])
        stack = da.stack(
            [
                da.from_delayed(dask.delayed(_load_plane)(p), p.shape, p.dtype).astype(dtype)
                for p in planes
            ]
        )
        images.append(
            MicroscopyImage(
                data=stack,
                channel_names=names,
                name=name,
                source=tuple(p.path for p in planes),
                source_axes="CYX",
                dataset=dataset_name(folder),
            )
        )
    return images


def _as_plane(info: _FileInfo, token: str) -> _PlaneFile:
    if info.path.name.lower().endswith(PLANE_EXTS):
        return _plane_file(info.path, token)
    rgb = None if len(info.shape) == 2 else _RGB_PLANE.get(token.lower(), -1)
    return _PlaneFile(info.path, tuple(info.shape[:2]), info.dtype, rgb)
