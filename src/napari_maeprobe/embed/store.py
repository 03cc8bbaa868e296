"""The embedding store: one ``.zarr`` folder per job, written batch by batch and resumable.

Layout (zarr v3)::

    STORE.zarr/                      attrs["maeprobe"]: format, signature, facts, plan
      images/<i>/labels              the label image the cells came from (int32)
      units/<u>/                     one unit of work: an image, or a chunk of its cells
        attrs: image, complete       ``complete`` is set last: a unit without it is redone
        <level>/X                    (rows, D) float16 or float32, chunked by rows
        <level>/obs/<column>         the observation table, column by column
        attention, reconstruction, mask, origins   (per cell, when asked for)
      analysis/<level>/              results of ``maeprobe analyze`` (see :mod:`.analysis`)

One level, or one image (its units), is read without touching the rest. The signature (input
files with sizes and mtimes, model and weights sha256, preprocessing and masking parameters,
package version) decides whether a re-run resumes this store or is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError

STORE_FORMAT = 1
ROW_CHUNK = 16384


class StoreMismatchError(MaeprobeInputError):
    """The store holds a different job than the one asked for."""


# --------------------------------------------------------------------------- obs columns


def encode_column(values: pd.Series) -> tuple[np.ndarray, dict]:
    """A column of the observation table as a plain array plus the attrs that restore it.

    Strings and categoricals become int32 codes (-1 = NA) with their categories; nullable
    integers and floats become float64 with NaN; nullable booleans int8 with -1 = NA.
    """
    dtype = values.dtype
    if (
        isinstance(dtype, pd.CategoricalDtype)
        or pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_string_dtype(dtype)
    ):
        cat = values.astype("category")
        cats = [str(c) for c in cat.cat.categories]
        return cat.cat.codes.to_numpy(np.int32), {"kind": "categorical", "categories": cats}
    if pd.api.types.is_bool_dtype(dtype):
        arr = values.astype("boolean")
        out = np.where(arr.isna().to_numpy(), -1, arr.fillna(False).to_numpy(bool).astype(np.int8))
        return out.astype(np.int8), {"kind": "boolean"}
    if pd.api.types.is_integer_dtype(dtype):
        return values.astype("Float64").to_numpy(np.float64, na_value=np.nan), {"kind": "int"}
    if pd.api.types.is_float_dtype(dtype):
        return values.astype("Float64").to_numpy(np.float64, na_value=np.nan), {"kind": "float"}
    raise MaeprobeInputError(
        f"observation column {values.name!r} has dtype {dtype}, which the store cannot hold",
        "pass strings, categories, numbers or booleans as metadata",
    )


def decode_column(data: np.ndarray, attrs: dict) -> pd.Series:
    """Inverse of :func:`encode_column` (NA restored as pandas NA)."""
    kind = attrs["kind"]
    if kind == "categorical":
        return pd.Series(pd.Categorical.from_codes(data, categories=attrs["categories"]))
    if kind == "boolean":
        out = pd.array(data == 1, dtype="boolean")
        out[data < 0] = pd.NA
        return pd.Series(out)
    if kind == "int":
        return pd.Series(data).astype("Float64").round().astype("Int64")
    return pd.Series(data, dtype=np.float64)


def combine_categoricals(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Stack tables column by column; categorical columns stay categorical (union of the
    categories), columns missing from some tables are NA there."""
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    columns = list(dict.fromkeys(c for f in frames for c in f.columns))
    out = {}
    for col in columns:
        parts = [f[col] if col in f else pd.Series([pd.NA] * len(f)) for f in frames]
        if all(isinstance(p.dtype, pd.CategoricalDtype) for p in parts):
            cats = list(dict.fromkeys(c for p in parts for c in p.cat.categories))
            values = np.concatenate([p.astype(object).to_numpy() for p in parts])
            out[col] = pd.Categorical(values, categories=cats)
        else:
            out[col] = pd.concat([p.reset_index(drop=True) for p in parts], ignore_index=True)
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- the store


@dataclass
class UnitSpec:
    """One unit of work: some cells of one image, with its row counts per level."""

    key: str
    image_index: int
    cell_ids: np.ndarray
    rows: dict[str, int]
    first_index: int = 0  # the job-wide index of the unit's first cell (seeds its masks)


def _signature_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys (dotted, one level into dicts) whose values differ between two signatures."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            out += _signature_diff(a, b, f"{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True,
                                                                      default=str):  # fmt: skip
            out.append(f"{prefix}{k}")
    return out


class EmbeddingStore:
    """Read and write an embedding store (see the module docstring for the layout)."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        import zarr

        self.path = Path(path)
        if mode == "r" and not (self.path / "zarr.json").is_file():
            raise MaeprobeInputError(
                f"{self.path} is not an embedding store (no zarr.json in it)",
                "pass the .zarr folder written by `maeprobe embed`",
            )
        self.root = zarr.open_group(str(self.path), mode=mode)
        meta = dict(self.root.attrs.get("maeprobe", {}))
        if mode == "r" and meta.get("format") != STORE_FORMAT:
            raise MaeprobeInputError(
                f"{self.path} is a zarr folder but not a maeprobe embedding store "
                f"(format {meta.get('format')!r})",
                "pass the .zarr folder written by `maeprobe embed`",
            )

    # ------------------------------------------------------------------ creation and resume
    @classmethod
    def open_for_job(cls, path: str | Path, signature: dict, overwrite: bool = False):
        """Create the store for a job, or reopen it to resume the same job.

        A store that holds a different job is refused (unless ``overwrite``), naming what
        differs; nothing in it is touched.
        """
        import shutil

        signature = json.loads(json.dumps(signature, sort_keys=True, default=str))
        path = Path(path)
        if path.exists() and not (path / "zarr.json").is_file():
            if any(path.iterdir()):
                raise MaeprobeInputError(
                    f"{path} exists and is not an embedding store",
                    "choose a new --out path ending in .zarr",
                )
        if (path / "zarr.json").is_file():
            store = cls(path, mode="a")
            meta = store.meta
            old = meta.get("signature")
            if old is not None and old != signature and not overwrite:
                diff = _signature_diff(old, signature)
                raise StoreMismatchError(
                    f"{path} holds a different job (differs in: {', '.join(diff)})",
                    "write to a new store with another --out, or pass --overwrite to replace it",
                )
            if old is not None and old != signature and overwrite:
                shutil.rmtree(path)
            else:
                if old is None:
                    store._set_meta(format=STORE_FORMAT, signature=signature)
                return store
        store = cls(path, mode="a")
        store._set_meta(format=STORE_FORMAT, signature=signature)
        return store

    @property
    def meta(self) -> dict:
        return dict(self.root.attrs.get("maeprobe", {}))

    def _set_meta(self, **values) -> None:
        meta = self.meta
        meta.update(values)
        self.root.attrs["maeprobe"] = json.loads(json.dumps(meta, default=str))

    @property
    def signature(self) -> dict:
        return self.meta.get("signature", {})

    @property
    def facts(self) -> dict:
        """Model and run facts (model name, weights sha256, embed_dim, ...)."""
        return self.meta.get("facts", {})

    def set_facts(self, facts: dict) -> None:
        self._set_meta(facts=facts)

    # ------------------------------------------------------------------ images and labels
    def image_names(self) -> list[str]:
        return list(self.meta.get("images", []))

    def set_images(self, images: list[dict]) -> None:
        """Record the job's images (name, dataset, source, channels, shape, ...)."""
        self._set_meta(images=[i["name"] for i in images], image_info=images)

    def image_info(self) -> list[dict]:
        return list(self.meta.get("image_info", []))

    def has_labels(self, index: int) -> bool:
        key = f"images/{index}/labels"
        return key in self.root and bool(self.root[key].attrs.get("complete", False))

    def write_labels(self, index: int, labels: np.ndarray, method: str) -> None:
        key = f"images/{index}/labels"
        if key in self.root:
            del self.root[key]
        chunks = tuple(min(s, 1024) for s in labels.shape)
        arr = self.root.create_array(key, shape=labels.shape, dtype="int32", chunks=chunks)
        arr[...] = labels.astype(np.int32)
        arr.attrs.update({"method": method, "complete": True})

    def labels(self, index: int) -> np.ndarray:
        return np.asarray(self.root[f"images/{index}/labels"][...])

    def labels_method(self, index: int) -> str:
        return str(self.root[f"images/{index}/labels"].attrs.get("method", ""))

    # ------------------------------------------------------------------ units
    def unit_complete(self, key: str) -> bool:
        path = f"units/{key}"
        return path in self.root and bool(self.root[path].attrs.get("complete", False))

    def begin_unit(
        self,
        unit: UnitSpec,
        obs: dict[str, pd.DataFrame],
        dim: int,
        dtype: str = "float16",
        extras: dict[str, tuple[tuple[int, ...], str]] | None = None,
    ) -> None:
        """Create a unit's arrays (its obs tables written at once, embeddings to come)."""
        path = f"units/{unit.key}"
        if path in self.root:
            del self.root[path]  # an interrupted unit is redone from scratch
        group = self.root.create_group(path)
        group.attrs.update(
            {"image": int(unit.image_index), "cells": int(len(unit.cell_ids)), "complete": False}
        )
        for level, table in obs.items():
            n = len(table)
            group.create_array(
                f"{level}/X", shape=(n, dim), dtype=dtype, chunks=(max(1, min(n, ROW_CHUNK)), dim)
            )
            for col in table.columns:
                data, attrs = encode_column(table[col])
                arr = group.create_array(
                    f"{level}/obs/{col}", shape=data.shape, dtype=data.dtype,
                    chunks=(max(1, min(len(data), 1 << 20)),),
                )  # fmt: skip
                arr[...] = data
                arr.attrs.update(attrs)
            group[level].attrs["columns"] = list(table.columns)
        for name, (shape, dt) in (extras or {}).items():
            chunks = (min(shape[0], 64),) + tuple(shape[1:]) if shape[0] else shape
            group.create_array(name, shape=shape, dtype=dt, chunks=chunks)

    def write_rows(self, key: str, name: str, start: int, values: np.ndarray) -> None:
        """Write ``values`` into rows ``start:start+len`` of a unit's array (``level/X`` etc.)."""
        arr = self.root[f"units/{key}/{name}"]
        arr[start : start + len(values)] = values.astype(arr.dtype)

    def finish_unit(self, key: str) -> None:
        self.root[f"units/{key}"].attrs["complete"] = True

    def units(self, complete_only: bool = True, images: Iterable[int] | None = None) -> list[str]:
        """Unit keys in job order (optionally only those of some image indices)."""
        if "units" not in self.root:
            return []
        keys = sorted(self.root["units"].group_keys())
        wanted = None if images is None else {int(i) for i in images}
        out = []
        for k in keys:
            attrs = self.root[f"units/{k}"].attrs
            if complete_only and not attrs.get("complete", False):
                continue
            if wanted is not None and int(attrs["image"]) not in wanted:
                continue
            out.append(k)
        return out

    def levels(self) -> list[str]:
        keys = self.units()
        if not keys:
            return []
        group = self.root[f"units/{keys[0]}"]
        return [lvl for lvl in ("global", "channel", "patch") if lvl in group]

    # ------------------------------------------------------------------ reading
    def _unit_obs(self, key: str, level: str) -> pd.DataFrame:
        group = self.root[f"units/{key}/{level}"]
        out = {}
        for col in group.attrs["columns"]:
            arr = group[f"obs/{col}"]
            out[col] = decode_column(np.asarray(arr[...]), dict(arr.attrs))
        return pd.DataFrame(out)

    def read_obs(self, level: str, images: Iterable[int] | None = None) -> pd.DataFrame:
        """The observation table of one level (all complete units, or those of some images)."""
        keys = self._keys(level, images)
        return combine_categoricals([self._unit_obs(k, level) for k in keys])

    def read_embeddings(self, level: str, images: Iterable[int] | None = None, lazy: bool = False):
        """The embeddings of one level as float32 (a dask array with ``lazy``)."""
        keys = self._keys(level, images)
        arrays = [self.root[f"units/{k}/{level}/X"] for k in keys]
        if lazy:
            import dask.array as da

            return da.concatenate([da.from_zarr(a) for a in arrays]).astype(np.float32)
        return np.concatenate([np.asarray(a[...], dtype=np.float32) for a in arrays])

    def read_level(
        self, level: str, images: Iterable[int] | None = None
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """(obs, X float32) of one level (analysis results: :meth:`read_analysis`)."""
        obs = self.read_obs(level, images)
        X = self.read_embeddings(level, images)
        return obs, X

    def read_cells(self, name: str, image: int) -> np.ndarray | None:
        """A per-cell array of one image (``attention``, ``reconstruction``, ``mask``,
        ``origins``) in row order of its cells, or None when it was not stored."""
        keys = self.units(images=[image])
        parts = [self.root[f"units/{k}/{name}"] for k in keys if f"units/{k}/{name}" in self.root]
        if not parts:
            return None
        return np.concatenate([np.asarray(p[...]) for p in parts])

    def _keys(self, level: str, images) -> list[str]:
        keys = self.units(images=images)
        if not keys:
            raise MaeprobeInputError(
                f"{self.path} holds no finished embeddings",
                "run (or resume) `maeprobe embed` into it first",
            )
        if f"units/{keys[0]}/{level}" not in self.root:
            raise MaeprobeInputError(
                f"{self.path} has no {level!r} level (it has: {', '.join(self.levels())})",
                "embed with --levels including it, or pick another --level",
            )
        return keys

    def n_rows(self, level: str) -> int:
        return sum(self.root[f"units/{k}/{level}/X"].shape[0] for k in self._keys(level, None))

    # ------------------------------------------------------------------ analysis results
    def write_analysis(
        self,
        level: str,
        arrays: dict[str, np.ndarray],
        columns: dict[str, pd.Series],
        attrs: dict,
    ) -> None:
        """Replace the analysis results of one level (arrays such as X_pca/X_umap, obs columns
        such as leiden, and JSON-able attrs such as parameters and diagnostics)."""
        path = f"analysis/{level}"
        if path in self.root:
            del self.root[path]
        group = self.root.create_group(path)
        for name, arr in arrays.items():
            a = group.create_array(
                name, shape=arr.shape, dtype=arr.dtype,
                chunks=(max(1, min(arr.shape[0], 1 << 18)),) + arr.shape[1:],
            )  # fmt: skip
            a[...] = arr
        for name, series in columns.items():
            data, enc = encode_column(series)
            a = group.create_array(
                f"obs/{name}", shape=data.shape, dtype=data.dtype,
                chunks=(max(1, min(len(data), 1 << 20)),),
            )  # fmt: skip
            a[...] = data
            a.attrs.update(enc)
        group.attrs.update(json.loads(json.dumps({**attrs, "columns": list(columns)}, default=str)))

    def read_analysis(self, level: str) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict] | None:
        """(arrays, obs columns, attrs) written by :meth:`write_analysis`, or None."""
        path = f"analysis/{level}"
        if path not in self.root:
            return None
        group = self.root[path]
        attrs = dict(group.attrs)
        arrays = {k: np.asarray(group[k][...]) for k in group.array_keys()}
        cols = {}
        for name in attrs.get("columns", []):
            a = group[f"obs/{name}"]
            cols[name] = decode_column(np.asarray(a[...]), dict(a.attrs))
        return arrays, pd.DataFrame(cols), attrs

    def analysed_levels(self) -> list[str]:
        if "analysis" not in self.root:
            return []
        return sorted(self.root["analysis"].group_keys())
