"""Loading weights safely: safetensors, or ``torch.load(weights_only=True)``, never pickles.

Local files and folders first; a Hugging Face hub id when ``huggingface_hub`` is installed and the
machine is online (cached by the hub library, with its progress bar). Offline, one message names
the file and where to put it. Every load records the file's sha256 for the results' metadata.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

from napari_maeprobe.errors import MaeprobeInputError, WeightsNotFoundError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth.tar")
_ZIP_MAGIC = b"PK\x03\x04"


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, cached by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def find_weights_file(path: str | Path) -> Path:
    """The weights file itself, or the first of :data:`WEIGHT_FILES` inside a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        numbered = sorted(  # mae3d-opencell: the latest epoch
            p.glob("checkpoint_*.pth.tar"),
            key=lambda f: int("".join(ch for ch in f.name if ch.isdigit()) or 0),
        )
        if numbered:
            return numbered[-1]
        raise WeightsNotFoundError(
            f"no weights file in {p} (looked for {', '.join(WEIGHT_FILES)})",
            "pass the weights file itself, or put it in that folder under one of those names",
        )
    raise WeightsNotFoundError(f"weights {p} do not exist", "check the path")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    The format is sniffed from the first bytes (OpenPhenom's ``model.safetensors`` may really be
    a torch zip file); wrappers ``state_dict``/``model``/``state_dict_ema``/``model_ema`` are
    unwrapped and a ``module.`` prefix is stripped.
    """
    p = find_weights_file(path)
    with open(p, "rb") as f:
        head = f.read(16)
    try:
        if head.startswith(_ZIP_MAGIC):
            # a file object, not the path: recent torch.load treats a *.safetensors *name* as
            # safetensors, and OpenPhenom's torch zip is named model.safetensors
            with open(p, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        elif len(head) >= 9 and head[8:9] == b"{":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            raise MaeprobeInputError(
                f"{p.name} is neither a safetensors file nor a torch zip checkpoint",
                "convert it to safetensors (arbitrary pickles are not loaded, for safety)",
            )
    except MaeprobeInputError:
        raise
    except Exception as exc:
        raise MaeprobeInputError(
            f"{p.name} cannot be read as model weights ({type(exc).__name__}: {exc})",
            "check that the download is complete; only safetensors and plain torch tensors load",
        ) from exc
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MaeprobeInputError(
            f"{p.name} does not hold a state dict of tensors", "pass the model's weights file"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def hub_cache_dir() -> Path:
    """Where the hub library keeps downloads: its own setting when it is installed (it reads
    ``HF_HUB_CACHE`` / ``HF_HOME`` once, when imported), else those variables."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        pass
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _hub_offline() -> bool:
    """The hub library's own offline switch (read from ``HF_HUB_OFFLINE`` at its import)."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else getattr(constants, "HF_HUB_OFFLINE", False))


def resolve_hub_weights(repo_id: str, filename: str, download: bool = True) -> Path:
    """A hub file from the local cache, or downloaded when online; else a clear message."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        hf_hub_download = None
    if hf_hub_download is not None:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        except Exception:
            pass
        if download and _hub_offline():
            reason = "offline mode: HF_HUB_OFFLINE is set"
        elif download:
            try:
                return Path(hf_hub_download(repo_id, filename))
            except Exception as exc:
                reason = type(exc).__name__
        else:
            reason = "downloads disabled"
    else:
        reason = "huggingface_hub is not installed"
    raise WeightsNotFoundError(
        f"the weights {repo_id}/{filename} are not on this machine and could not be downloaded "
        f"({reason})",
        f"download https://huggingface.co/{repo_id}/resolve/main/{filename} elsewhere and pass "
        f"it with --weights PATH (or put it in the hub cache under {hub_cache_dir()})",
    )
