"""One registry of models, one way to build them: ``create_model(name, weights=...)``.

Like timm's ``create_model``: a name maps to a :class:`ModelSpec` that knows the model's input,
its embedding size, the licence of its weights, where the weights may come from (bundled file,
local path, hub id) and how to build the module from a state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from napari_maeprobe.errors import MaeprobeInputError, WeightsNotFoundError
from napari_maeprobe.models.base import MaeprobeModel
from napari_maeprobe.models.weights import (
    find_weights_file,
    load_state_dict,
    resolve_hub_weights,
    sha256_file,
)


@dataclass(frozen=True)
class ModelSpec:
    """What the package knows about one model."""

    name: str
    summary: str
    channels: str
    input_size: str
    embed_dim: int
    licence: str
    build: Callable[..., MaeprobeModel]  # build(state_dict | None, metadata, **options)
    hub: tuple[str, str] | None = None  # (repo id, file name)
    bundled: Path | None = None
    weights_hint: str = ""
    has_decoder: bool = False


_REGISTRY: dict[str, ModelSpec] = {}
_BUILTINS_LOADED = False


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (replacing one of the same name)."""
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from napari_maeprobe.models import builtin  # noqa: F401  (registers the package's models)


def list_models() -> list[ModelSpec]:
    """Every registered model."""
    _ensure_builtins()
    return list(_REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    _ensure_builtins()
    if name not in _REGISTRY:
        raise MaeprobeInputError(
            f"no model named {name!r}", f"use one of {', '.join(_REGISTRY)} (see: maeprobe models)"
        )
    return _REGISTRY[name]


def weights_status(spec: ModelSpec) -> tuple[bool, str]:
    """Whether the model's default weights are on this machine, and where (or how to get them)."""
    if spec.bundled is not None:
        return spec.bundled.is_file(), str(spec.bundled)
    if spec.hub is not None:
        try:
            return True, str(resolve_hub_weights(*spec.hub, download=False))
        except WeightsNotFoundError:
            return False, f"hub {spec.hub[0]} (not cached); or --weights PATH"
    return False, spec.weights_hint or "--weights PATH"


def create_model(
    name: str,
    weights: str | Path | None = None,
    download: bool = True,
    random_init: bool = False,
    **options,
) -> MaeprobeModel:
    """Build a registered model with its weights.

    ``weights``: a local file or folder; by default the bundled file or the hub id of the spec
    (downloaded when online). ``random_init=True`` builds the architecture without weights (for
    tests and benchmarks). The result carries ``model_name``, ``weights_name`` and
    ``weights_sha256`` for the metadata of everything computed with it.
    """
    spec = get_spec(name)
    path: Path | None = None
    state = None
    metadata: dict = {}
    if not random_init:
        if weights is not None:
            path = find_weights_file(weights)
        elif spec.bundled is not None:
            path = spec.bundled
        elif spec.hub is not None:
            path = resolve_hub_weights(*spec.hub, download=download)
        else:
            raise WeightsNotFoundError(
                f"model {name!r} has no default weights",
                f"pass --weights PATH ({spec.weights_hint})",
            )
        state = load_state_dict(path)
        metadata = _file_metadata(path)
    try:
        if state is None:  # random init: the same weights in every process
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = spec.build(state, metadata, **options)
        else:
            model = spec.build(state, metadata, **options)
    except (KeyError, RuntimeError, ValueError) as exc:
        if state is None:
            raise
        raise MaeprobeInputError(
            f"{path.name} does not fit model {name!r} ({type(exc).__name__}: {str(exc)[:300]})",
            f"pass weights made for {name} ({spec.weights_hint or spec.summary})",
        ) from exc
    model.model_name = name
    model.weights_name = path.name if path else "random-init"
    model.weights_sha256 = sha256_file(path) if path else ""
    return model.eval()


def _file_metadata(path: Path) -> dict:
    """The string metadata of a safetensors file (our models store their config there)."""
    if path.name.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception:
            return {}
    return {}


def load_strict(model: torch.nn.Module, state: dict, prefix: str = "") -> None:
    """Load the keys under ``prefix`` into ``model`` strictly (missing or extra keys fail)."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k in own if own[k].shape != sub[k].shape]
    if bad:
        raise KeyError(f"shape mismatch for {bad[:5]}: {[tuple(sub[k].shape) for k in bad[:5]]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sub.items()}, strict=True)
