"""Files written safely: every output goes through a temporary file and a rename, so a killed
process never leaves a half-written file under the target name (and the temporary files a killed
process left are removed by the next write of the same target).

Also: the checks and messages for output paths that cannot be written, shared by the command
line and the widgets (:func:`check_output_path`, :func:`describe_os_error`)."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import secrets
import socket
from pathlib import Path

import numpy as np

from napari_maeprobe.errors import MaeprobeInputError


def host_tag() -> str:
    """A short tag of this machine's name (temporary files and locks say who made them)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, it is someone else's
        return True
    return True


def temporary_name(path: Path, pid: int | None = None) -> str:
    """The name of a temporary file for ``path``: hidden, beside it, naming this machine and
    process (``.NAME.tmp-HOST-PID-RANDOM.SUFFIX``) so that a later write can tell it is stale."""
    pid = os.getpid() if pid is None else pid
    return f".{path.name}.tmp-{host_tag()}-{pid}-{secrets.token_hex(4)}{path.suffix}"


#: temporary files named the old way (no pid in the name) are stale after this long untouched
LEGACY_TEMP_AGE_S = 3600


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` left by processes of this machine that are gone
    (a killed export); those of running processes and of other machines are kept. Temporary
    files named the way earlier versions did (``.NAME.XXXXXXXX.SUFFIX``, no pid) are removed
    once untouched for an hour."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-([0-9a-f]{{8}})-(\d+)-[0-9a-f]+")
    legacy = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(path.suffix)}$")
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*"))
    except OSError:
        return removed
    for tmp in candidates:
        m = pattern.match(tmp.name)
        if m is not None:
            if m.group(1) != host_tag() or pid_alive(int(m.group(2))):
                continue
        elif legacy.match(tmp.name) is None or not _untouched_for(tmp, LEGACY_TEMP_AGE_S):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _untouched_for(path: Path, seconds: float) -> bool:
    import time

    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def check_output_path(path: Path, folder: bool = False) -> None:
    """Refuse, with one clear message, an output path that cannot be written: one of its parents
    is a file, it is a folder where a file is wanted (or a file where a folder is), or the
    nearest existing folder is not writable."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise MaeprobeInputError(
            f"cannot write {path}: {path} is a folder",
            "pass a file path (e.g. a new file inside that folder), not a folder",
        )
    if path.exists() and not path.is_dir() and folder:
        raise MaeprobeInputError(
            f"cannot write to {path}: {path} is a file, not a folder",
            "choose a new path (a folder, e.g. ending in .zarr), or remove that file",
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise MaeprobeInputError(
            f"cannot write {path}: {parent} is a file, not a folder",
            "choose an output path inside a folder (or move that file away)",
        )
    if folder and path.is_dir():  # an existing store is written inside, not beside
        parent = path
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise MaeprobeInputError(
            f"cannot write {path}: the folder {parent} is not writable",
            "choose a folder you can write to (or change the folder's permissions)",
        )


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written files.

    Temporary files of the same target left by killed processes are removed first."""
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / temporary_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def describe_os_error(exc: OSError) -> MaeprobeInputError | None:
    """A file-system error as one line naming the path, the problem and a fix; None for errors
    that are not about files (broken connections, time-outs: those are not the user's input)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return None
    name = exc.filename
    if name is None:
        fs_errnos = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT,
                     errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}  # fmt: skip
        if exc.errno not in fs_errnos:
            return None
        name = "a file"
    where = str(name)
    if isinstance(exc, PermissionError):
        return MaeprobeInputError(
            f"no permission to write or read {where}",
            "choose a path you can write to (or change its permissions)",
        )
    if isinstance(exc, IsADirectoryError):
        return MaeprobeInputError(f"{where} is a folder where a file is needed",
                                  "pass a file path, not a folder")  # fmt: skip
    if isinstance(exc, NotADirectoryError):
        return MaeprobeInputError(
            f"cannot use {where}: a part of this path is a file, not a folder",
            "choose a path whose parent folders are folders",
        )
    if isinstance(exc, FileExistsError):
        if Path(where).is_file():
            return MaeprobeInputError(f"{where} is a file where a folder is needed",
                                      "choose another path, or move that file away")  # fmt: skip
        return MaeprobeInputError(f"{where} already exists", "remove it or choose another path")
    if isinstance(exc, FileNotFoundError):
        return MaeprobeInputError(f"{where} does not exist",
                                  "check the path (and that its folder exists)")  # fmt: skip
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return MaeprobeInputError(f"no space left on the device writing {where}",
                                  "free some disk space, or write to another disk")  # fmt: skip
    if exc.errno == errno.EROFS:
        return MaeprobeInputError(f"{where} is on a read-only file system",
                                  "write to a folder on a writable disk")  # fmt: skip
    reason = exc.strerror or str(exc)
    return MaeprobeInputError(f"cannot use {where}: {reason}",
                              "check the path and that you can read and write there")  # fmt: skip


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Save a label image as a compressed TIFF (atomically)."""
    import tifffile

    dtype = np.uint16 if labels.max() < 2**16 else np.uint32
    atomic_write(path, lambda p: tifffile.imwrite(p, labels.astype(dtype), compression="zlib"))


def write_json(path: Path, payload: dict) -> None:
    """Atomically write a JSON file."""
    atomic_write(path, lambda p: p.write_text(json.dumps(payload, indent=2, default=str)))
