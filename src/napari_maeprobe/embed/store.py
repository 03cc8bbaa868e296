"""The embedding store: one ``.zarr`` folder per job, written batch by batch and resumable.

Layout (zarr v3)::

    STORE.zarr/                      attrs["maeprobe"]: format, signature, facts, plan
      .maeprobe.lock                 while a job or an analysis writes (see StoreLock)
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
import os
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.files import check_output_path, pid_alive

STORE_FORMAT = 1
ROW_CHUNK = 16384
#: the write lock inside a store (see :class:`StoreLock`)
LOCK_NAME = ".maeprobe.lock"


class StoreMismatchError(MaeprobeInputError):
    """The store holds a different job than the one asked for."""


class StoreBusyError(MaeprobeInputError):
    """Another process holds the store's write lock."""


# --------------------------------------------------------------------------- the write lock


class StoreLock:
    """The write lock of a store: one writer at a time (``maeprobe embed``, ``analyze``).

    A file ``.maeprobe.lock`` in the store, locked with ``fcntl.flock`` (the kernel lets go of it
    when its process dies, however it dies) and holding the writer's pid, host, start time and
    purpose for the message a second writer gets. Where ``flock`` is not available the record
    alone decides: a lock whose pid is dead on this host is taken over. The file is removed when
    the lock is released; a stale one (killed writer) is simply taken over.
    """

    def __init__(self, path: str | Path, purpose: str = "embed") -> None:
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StoreLock:
        """Take the lock or raise :class:`StoreBusyError` naming the process that has it."""
        if self._fd is not None:
            return self
        for _ in range(50):
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not self._lock_fd(fd):
                    raise self._busy(self._record(fd))
                if not self._same_file(fd):  # released and removed meanwhile: try again
                    os.close(fd)
                    continue
                record = {
                    "pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }  # fmt: skip
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise StoreBusyError(f"{self.path}: its write lock keeps changing hands",
                             "wait for the other maeprobe processes to finish")  # fmt: skip

    def release(self) -> None:
        """Let go of the lock (and remove its file)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._same_file(fd):
                self.file.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def check(self) -> None:
        """Raise :class:`StoreBusyError` if the lock file was removed or replaced under us."""
        if self._fd is not None and not self._same_file(self._fd):
            raise StoreBusyError(
                f"{self.path}: this run's write lock ({LOCK_NAME}) was removed by someone else",
                "make sure no other process writes the store, then run the same command again",
            )

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.file))
        except OSError:
            return False

    def _lock_fd(self, fd: int) -> bool:
        import errno

        try:
            import fcntl
        except ImportError:  # not a POSIX system: the record decides
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        holder = self._record(fd)
        if not holder:
            return True
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell whether it still runs
        pid = int(holder.get("pid", 0))
        return pid != os.getpid() and not pid_alive(pid)

    @staticmethod
    def _record(fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _busy(self, holder: dict) -> StoreBusyError:
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        who = (f"maeprobe {holder.get('purpose', '?')}, pid {pid} on {host}, since "
               f"{holder.get('started', '?')}")  # fmt: skip
        if host == socket.gethostname():
            fix = f"wait for it to finish, or stop it (kill {pid}) and run again"
        else:
            fix = (f"wait for it to finish, or stop it on {host}; if it is gone, remove "
                   f"{self.file}")  # fmt: skip
        return StoreBusyError(
            f"{self.path} is being written by another maeprobe process ({who})", fix
        )


class StoreProgress(NamedTuple):
    """How much of a store's planned job is done: units and cells (or tiles)."""

    done: int  # complete units
    total: int  # planned units
    cells_done: int
    cells_total: int

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.done == self.total

    def as_dict(self) -> dict:
        """``complete`` and the counts, as recorded in an export's ``uns["maeprobe"]``."""
        return {"complete": self.complete, "units_done": self.done, "units_total": self.total,
                "cells_done": self.cells_done, "cells_total": self.cells_total}  # fmt: skip


def _read_store_meta(path: Path) -> dict:
    """The ``maeprobe`` attributes of the store at ``path``, or one clear error saying why it is
    not a store (nothing there, a file, no or a damaged zarr.json, not maeprobe's)."""
    fix = "pass the .zarr folder written by `maeprobe embed`"
    if not path.exists():
        raise MaeprobeInputError(
            f"{path} is not an embedding store (nothing is at this path)", f"{fix} (check the path)"
        )
    if not path.is_dir():
        raise MaeprobeInputError(f"{path} is not an embedding store (it is a file)", fix)
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        raise MaeprobeInputError(f"{path} is not an embedding store (no zarr.json in it)", fix)
    try:
        doc = json.loads(meta_file.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        where = (f" ({exc.msg} at line {exc.lineno} column {exc.colno})"
                 if isinstance(exc, json.JSONDecodeError) else "")  # fmt: skip
        raise MaeprobeInputError(
            f"{path} is a damaged embedding store: {meta_file} is not valid JSON{where}",
            "restore the folder from a backup, or delete it and run `maeprobe embed` again",
        ) from exc
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    meta = attrs.get("maeprobe") if isinstance(attrs, dict) else None
    if not isinstance(meta, dict) or "format" not in meta:
        raise MaeprobeInputError(
            f"{path} is not an embedding store (a zarr folder without maeprobe's metadata)", fix
        )
    if meta.get("format") != STORE_FORMAT:
        raise MaeprobeInputError(
            f"{path} is an embedding store of format {meta.get('format')!r}, which this version "
            f"of maeprobe does not read (it reads format {STORE_FORMAT})",
            "open it with the napari-maeprobe version that wrote it, or embed again",
        )
    return meta


def _clear_folder(path: Path, keep: str | None = None) -> None:
    """Remove everything inside ``path`` except the entry named ``keep``."""
    for child in path.iterdir():
        if child.name == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


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


def write_column(group, path: str, values: pd.Series) -> None:
    """Write one observation column into a zarr group (see :func:`encode_column`)."""
    data, attrs = encode_column(values)
    arr = group.create_array(
        path, shape=data.shape, dtype=data.dtype, chunks=(max(1, min(len(data), 1 << 20)),)
    )
    arr[...] = data
    arr.attrs.update(attrs)


def combine_categoricals(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Stack tables column by column; categorical columns stay categorical (union of the
    categories), columns missing from some tables are NA there."""
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    columns = list(dict.fromkeys(c for f in frames for c in f.columns))
    out = {}
    for col in columns:
        present = [f[col] for f in frames if col in f]
        if all(isinstance(p.dtype, pd.CategoricalDtype) for p in present):
            missing = lambda n: pd.Series(pd.Categorical([None] * n))  # noqa: E731
        elif all(pd.api.types.is_bool_dtype(p.dtype) for p in present):
            missing = lambda n: pd.Series(pd.array([pd.NA] * n, dtype="boolean"))  # noqa: E731
        elif all(pd.api.types.is_numeric_dtype(p.dtype) for p in present):
            missing = lambda n: pd.Series(np.full(n, np.nan))  # noqa: E731
        else:
            missing = lambda n: pd.Series([pd.NA] * n)  # noqa: E731
        parts = [f[col].reset_index(drop=True) if col in f else missing(len(f)) for f in frames]
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
        """Open an existing store: ``mode="r"`` to read, ``"a"`` to also write (analysis
        results). Nothing is ever created here: a path that is not a store is refused with one
        clear message and left as it is (stores are created by :meth:`open_for_job`)."""
        import zarr

        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        self.path = Path(path)
        self.created = False  # whether open_for_job created it (a failed first run removes it)
        self._made_folder = False
        self._lock: StoreLock | None = None
        self._job_signature: dict | None = None
        _read_store_meta(self.path)
        try:
            self.root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+")
        except OSError:
            raise
        except Exception as exc:
            raise MaeprobeInputError(
                f"{self.path} is a damaged embedding store ({type(exc).__name__}: {exc})",
                "restore the folder from a backup, or delete it and run `maeprobe embed` again",
            ) from exc

    # ------------------------------------------------------------------ creation and resume
    @classmethod
    def open_for_job(
        cls, path: str | Path, signature: dict, overwrite: bool = False, purpose: str = "embed"
    ):
        """Create the store for a job, or reopen it to resume the same job, holding its write
        lock (:class:`StoreLock`) until :meth:`close`.

        A store that holds a different job is refused (unless ``overwrite``), naming what
        differs; nothing in it is touched. A store another process writes is refused, naming
        that process. ``store.created`` says whether this call created it.
        """
        import zarr

        signature = json.loads(json.dumps(signature, sort_keys=True, default=str))
        path = Path(path)
        check_output_path(path, folder=True)
        if path.is_dir() and not (path / "zarr.json").is_file():
            if any(p.name != LOCK_NAME for p in path.iterdir()):
                raise MaeprobeInputError(
                    f"{path} exists and is not an embedding store",
                    "choose a new --out path ending in .zarr",
                )
        made_folder = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        lock = StoreLock(path, purpose).acquire()
        try:
            created = True
            if (path / "zarr.json").is_file():  # looked at again now that we hold the lock
                store = cls(path, mode="a")
                old = store.meta.get("signature")
                if old is None or old == signature:
                    created = False
                    if old is None:
                        store._set_meta(signature=signature)
                elif not overwrite:
                    diff = _signature_diff(old, signature)
                    raise StoreMismatchError(
                        f"{path} holds a different job (differs in: {', '.join(diff)})",
                        "write to a new store with another --out, or pass --overwrite to "
                        "replace it",
                    )
                else:
                    _clear_folder(path, keep=LOCK_NAME)
            elif any(p.name != LOCK_NAME for p in path.iterdir()):
                raise MaeprobeInputError(
                    f"{path} exists and is not an embedding store",
                    "choose a new --out path ending in .zarr",
                )
            if created:
                root = zarr.open_group(str(path), mode="a")
                root.attrs["maeprobe"] = {"format": STORE_FORMAT, "signature": signature}
                store = cls(path, mode="a")
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        store._job_signature = signature
        store.created = created
        store._made_folder = made_folder
        return store

    def lock(self, purpose: str = "analyze") -> StoreLock:
        """Take the store's write lock for some writing (use as ``with store.lock():``);
        :class:`StoreBusyError` while another process writes it."""
        return StoreLock(self.path, purpose).acquire()

    def close(self, discard_if_empty: bool = False) -> bool:
        """Release the write lock taken by :meth:`open_for_job`.

        With ``discard_if_empty`` (a failed run), first remove the store when this run created
        it, no unit of it is complete and it still holds this run's job: a failed first run
        leaves nothing behind. A store that existed before the run is never removed. Returns
        whether the store was removed."""
        removed = False
        try:
            if (
                discard_if_empty and self.created and self._lock is not None and self._lock.held
                and self._signature_on_disk() == self._job_signature and not self.units()
            ):  # fmt: skip
                try:
                    if self._made_folder:
                        shutil.rmtree(self.path)
                    else:
                        _clear_folder(self.path)
                    removed = True
                except OSError:
                    pass
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        return removed

    def _signature_on_disk(self) -> dict | None:
        """The signature in the store's zarr.json as it is on disk now (not as opened)."""
        try:
            doc = json.loads((self.path / "zarr.json").read_bytes())
            return doc["attributes"]["maeprobe"].get("signature")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _check_still_ours(self) -> None:
        """Before a unit is marked complete: the store still holds this run's job and lock."""
        if self._lock is not None:
            self._lock.check()
        if self._job_signature is None:
            return
        now = self._signature_on_disk()
        if now != self._job_signature:
            diff = _signature_diff(self._job_signature, now or {})
            raise StoreMismatchError(
                f"{self.path} changed while this run wrote to it: it now holds a different job "
                f"(differs in: {', '.join(diff) or 'everything'}), so this run's rows are not "
                "marked complete",
                "make sure one process at a time writes a store; run the job again into a new "
                "--out (or with --overwrite)",
            )

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
                write_column(group, f"{level}/obs/{col}", table[col])
            group[level].attrs["columns"] = list(table.columns)
        for name, (shape, dt) in (extras or {}).items():
            chunks = (min(shape[0], 64),) + tuple(shape[1:]) if shape[0] else shape
            group.create_array(name, shape=shape, dtype=dt, chunks=chunks)

    def write_rows(self, key: str, name: str, start: int, values: np.ndarray) -> None:
        """Write ``values`` into rows ``start:start+len`` of a unit's array (``level/X`` etc.)."""
        arr = self.root[f"units/{key}/{name}"]
        arr[start : start + len(values)] = values.astype(arr.dtype)

    def finish_unit(self, key: str) -> None:
        """Mark a unit complete, after checking that the store still holds this run's job (a
        store changed under the writer is never marked complete with foreign rows)."""
        self._check_still_ours()
        self.root[f"units/{key}"].attrs["complete"] = True

    # ------------------------------------------------------------------ plan and completeness
    def set_plan(self, units: list[UnitSpec]) -> None:
        """Record the job's planned units (keys and cells), so the store knows when it is done."""
        self._set_meta(plan={"units": [u.key for u in units],
                             "cells": [int(len(u.cell_ids)) for u in units]})  # fmt: skip

    def progress(self) -> StoreProgress:
        """Complete units and cells of the planned ones (stores written before the plan was
        recorded: of the units begun so far)."""
        done_keys = set(self.units())
        plan = self.meta.get("plan")
        if plan:
            keys, cells = list(plan["units"]), [int(c) for c in plan["cells"]]
        else:
            keys = self.units(complete_only=False)
            cells = [int(self.root[f"units/{k}"].attrs.get("cells", 0)) for k in keys]
        done = [k in done_keys for k in keys]
        return StoreProgress(
            sum(done), len(keys), sum(c for c, d in zip(cells, done) if d), sum(cells)
        )

    def is_complete(self) -> bool:
        """Whether every planned unit is complete."""
        return self.progress().complete

    def require_complete(self, allow_incomplete: bool = False) -> StoreProgress:
        """Refuse (one clear message) a store with nothing finished, or an incomplete one
        unless ``allow_incomplete``; returns its :meth:`progress`."""
        p = self.progress()
        if p.done == 0:
            of = f" (0 of {p.total} units)" if p.total else ""
            raise MaeprobeInputError(
                f"{self.path} holds no finished embeddings yet{of}",
                "run (or resume) the `maeprobe embed` command that writes it",
            )
        if not p.complete and not allow_incomplete:
            raise MaeprobeInputError(
                f"{self.path} is incomplete: {p.cells_done:,} of {p.cells_total:,} cells "
                f"({p.done} of {p.total} units) are embedded",
                f"resume it by running the same `maeprobe embed ... --out {self.path}` command "
                "again, or pass --allow-incomplete to use the cells that are done",
            )
        return p

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

    def unit_cell_ids(self, key: str) -> np.ndarray:
        """The cell ids of a unit in row order (the key of its per-cell arrays).

        Stores written before the ids were kept: the ids in order of first appearance in the
        unit's rows of any level (rows are cell-major, so the order is the same)."""
        group = self.root[f"units/{key}"]
        if "cell_id" in group:
            return np.asarray(group["cell_id"][...], dtype=np.int64)
        level = next(lvl for lvl in ("global", "channel", "patch") if lvl in group)
        arr = group[f"{level}/obs/cell_id"]
        ids = decode_column(np.asarray(arr[...]), dict(arr.attrs))
        return pd.unique(ids.to_numpy(np.int64))

    def cell_table(self) -> pd.DataFrame:
        """One row per embedded cell: ``image`` (name), ``image_index``, ``cell_id``, ``unit``
        and ``row`` (its index in the unit's per-cell arrays)."""
        names = self.image_names()
        parts = []
        for key in self.units():
            ids = self.unit_cell_ids(key)
            index = int(self.root[f"units/{key}"].attrs["image"])
            parts.append(pd.DataFrame({
                "image": names[index] if index < len(names) else str(index),
                "image_index": index, "cell_id": ids, "unit": key,
                "row": np.arange(len(ids)),
            }))  # fmt: skip
        if not parts:
            return pd.DataFrame(columns=["image", "image_index", "cell_id", "unit", "row"])
        return pd.concat(parts, ignore_index=True)

    def read_cells(self, name: str, image: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A per-cell array of one image (``attention``, ``reconstruction``, ``mask``,
        ``origins``) with the cell id of each of its rows, or None when it was not stored."""
        keys = self.units(images=[image])
        keys = [k for k in keys if f"units/{k}/{name}" in self.root]
        if not keys:
            return None
        ids = np.concatenate([self.unit_cell_ids(k) for k in keys])
        values = np.concatenate([np.asarray(self.root[f"units/{k}/{name}"][...]) for k in keys])
        return ids, values

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
        such as leiden, and JSON-able attrs such as parameters and diagnostics).

        The attrs go last, in one (atomic) write, and mark the level complete: a write cut
        short (a killed or cancelled analysis) leaves a level that reads as not analysed."""
        path = f"analysis/{level}"
        if path in self.root:
            self.root[path].attrs.put({})  # unmark first: rmtree's order is arbitrary
            del self.root[path]
        group = self.root.create_group(path)
        for name, arr in arrays.items():
            a = group.create_array(
                name, shape=arr.shape, dtype=arr.dtype,
                chunks=(max(1, min(arr.shape[0], 1 << 18)),) + arr.shape[1:],
            )  # fmt: skip
            a[...] = arr
        for name, series in columns.items():
            write_column(group, f"obs/{name}", series)
        group.attrs.update(json.loads(json.dumps({**attrs, "columns": list(columns)}, default=str)))

    def read_analysis(self, level: str) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict] | None:
        """(arrays, obs columns, attrs) written by :meth:`write_analysis`, or None."""
        path = f"analysis/{level}"
        if path not in self.root:
            return None
        group = self.root[path]
        attrs = dict(group.attrs)
        if "columns" not in attrs:  # its write was cut short (see write_analysis)
            return None
        arrays = {k: np.asarray(group[k][...]) for k in group.array_keys()}
        cols = {}
        for name in attrs.get("columns", []):
            a = group[f"obs/{name}"]
            cols[name] = decode_column(np.asarray(a[...]), dict(a.attrs))
        return arrays, pd.DataFrame(cols), attrs

    def analysed_levels(self) -> list[str]:
        if "analysis" not in self.root:
            return []
        group = self.root["analysis"]  # a level whose write was cut short does not count
        return sorted(k for k in group.group_keys() if "columns" in group[k].attrs)
