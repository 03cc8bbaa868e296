"""Files written safely: every output goes through a temporary file and a rename, so a killed
process never leaves a half-written file under the target name."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Save a label image as a compressed TIFF (atomically)."""
    import tifffile

    dtype = np.uint16 if labels.max() < 2**16 else np.uint32
    atomic_write(path, lambda p: tifffile.imwrite(p, labels.astype(dtype), compression="zlib"))


def write_json(path: Path, payload: dict) -> None:
    """Atomically write a JSON file."""
    atomic_write(path, lambda p: p.write_text(json.dumps(payload, indent=2, default=str)))
