"""One registry of models, one way to build them: ``create_model(name, weights=..., **options)``.

Like timm's ``create_model``: a name maps to a :class:`ModelSpec` that knows the model's input,
its embedding size, the licence of its weights, where the weights may come from (bundled file,
local path, hub id), its **config** (a dataclass whose fields are the model's options, with the
shared names ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``patch_size``,
``input_size``), the module built from a config, and its **checkpoint filter**: a function
``(state, metadata, **options) -> (config, state)`` that maps a foreign state dict (OpenPhenom,
Hugging Face, timm, DINOv2, mae3d-opencell, our own safetensors) to a config and a state dict
that the module loads strictly.

Options are checked by name against the config: an unknown option is refused (naming it and
the accepted ones). With weights, options the weights decide (widths, patch size, ...) must
agree with them; ``depth`` below the checkpoint's keeps its first blocks; options the weights
leave open (heads where they are not stored, input size, pooling, ...) are applied.

Each model module calls :func:`register_model` when imported; the registry imports the model
modules of the package once (:data:`MODEL_MODULES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from napari_maeprobe.errors import MaeprobeInputError, WeightsNotFoundError
from napari_maeprobe.models.base import MaeprobeModel
from napari_maeprobe.models.weights import (
    find_weights_file,
    load_state_dict,
    resolve_hub_weights,
    sha256_file,
)

#: the package's model modules; importing one registers its models
MODEL_MODULES = ("camae", "builtin", "vitmae", "dinov2", "mae3d")


@dataclass(frozen=True)
class ModelSpec:
    """What the package knows about one model."""

    name: str
    summary: str
    channels: str
    input_size: str
    embed_dim: int
    licence: str
    config: type  # a dataclass: the model's options; its defaults are the random-init model
    model: Callable[[Any], MaeprobeModel]  # the module from a config
    checkpoint_filter: Callable[..., tuple[Any, dict]]  # (state, metadata, **options)
    hub: tuple[str, str] | None = None  # (repo id, file name)
    bundled: Path | None = None
    weights_hint: str = ""
    has_decoder: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """The option names :func:`create_model` accepts for this model."""
        return tuple(f.name for f in dataclasses.fields(self.config))


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
        for module in MODEL_MODULES:  # each registers its models when imported
            importlib.import_module(f"napari_maeprobe.models.{module}")


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
    (downloaded when online). ``random_init=True`` builds the architecture of the config
    (defaults plus ``options``) with the model's own initialisation, the same in every process.
    ``options`` are fields of the model's config (:attr:`ModelSpec.options`); unknown ones are
    refused. The result carries ``config``, ``model_name``, ``weights_name`` and
    ``weights_sha256`` for the metadata of everything computed with it.
    """
    spec = get_spec(name)
    check_options(spec, options)
    path: Path | None = None
    if random_init:
        config = make_config(spec.config, options)
        with torch.random.fork_rng():  # the same weights in every process
            torch.manual_seed(0)
            model = spec.model(config)
            if hasattr(model, "reset_parameters"):
                model.reset_parameters()
    else:
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
        try:
            config, state = spec.checkpoint_filter(state, _file_metadata(path), **options)
            model = spec.model(config)
            load_strict(model, state)
        except MaeprobeInputError as exc:
            problem = f"{path.name} does not fit model {name!r}: {exc.problem}"
            raise type(exc)(problem, exc.fix) from exc
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MaeprobeInputError(
                f"{path.name} does not fit model {name!r} ({type(exc).__name__}: {str(exc)[:300]})",
                f"pass weights made for {name} with --weights "
                f"({spec.weights_hint or spec.summary})",
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
    fix = "pass the weights this model was saved with (--weights), or its options"
    if missing or unexpected:
        raise MaeprobeInputError(
            f"the weights do not match the model's keys: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
            fix,
        )
    bad = [k for k in own if own[k].shape != sub[k].shape]
    if bad:
        raise MaeprobeInputError(
            f"the weights do not match the model's shapes: {bad[:5]} are "
            f"{[tuple(sub[k].shape) for k in bad[:5]]}, the model has "
            f"{[tuple(own[k].shape) for k in bad[:5]]}",
            fix,
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sub.items()}, strict=True)


# --------------------------------------------------------------------------------------------
# options and configs (shared by the model modules' checkpoint filters)


def check_options(spec: ModelSpec, options: dict) -> None:
    """Refuse options that are not fields of the model's config, naming them and the rest."""
    accepted = spec.options
    unknown = [k for k in options if k not in accepted]
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MaeprobeInputError(
            f"model {spec.name!r} has no option {', '.join(repr(k) for k in unknown)}{hint}",
            f"use only the options of {spec.name}: {', '.join(accepted)}",
        )


def make_config(config_cls: type, values: dict):
    """``config_cls(**values)``; unknown names are refused with the product's error."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MaeprobeInputError(
            f"{config_cls.__name__} has no option {', '.join(map(repr, unknown))}",
            f"use only {', '.join(sorted(names))}",
        )
    return config_cls(**values)


def config_to_dict(config) -> dict:
    """A config as JSON-friendly values (the ``maeprobe_config`` metadata of saved weights)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_metadata(
    config_cls: type,
    metadata: dict | None,
    renames: dict[str, str] | None = None,
    upgrade: Callable[[dict], dict] | None = None,
) -> dict | None:
    """The config values stored in a safetensors file's ``maeprobe_config`` metadata (our own
    files), older option names mapped through ``renames`` and ``upgrade``; None without one."""
    if not metadata or "maeprobe_config" not in metadata:
        return None
    values = json.loads(metadata["maeprobe_config"])
    values = {(renames or {}).get(k, k): v for k, v in values.items()}
    if upgrade is not None:
        values = upgrade(values)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MaeprobeInputError(
            f"the file's maeprobe_config has options this package does not know: {unknown}",
            "save the weights again with this version (maeprobe train --out)",
        )
    return values


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return a == b


def settle_config(config_cls: type, found: dict, options: dict, free: Iterable[str] = ()):
    """The config for a checkpoint: ``found`` holds what the weights decide; an option may
    restate it, or set what the weights leave open (``free``, or anything not in ``found``);
    one that contradicts the weights is refused, naming the option and the weights' value."""
    values = dict(found)
    free = set(free)
    for key, value in options.items():
        if key in found and key not in free and not _same(value, found[key]):
            raise MaeprobeInputError(
                f"the option {key}={value!r} does not match the weights ({key}={found[key]!r})",
                f"leave {key} out (the weights decide it), or pass other weights",
            )
        values[key] = value
    return make_config(config_cls, values)


def block_index(key: str, prefix: str) -> int | None:
    """``3`` for ``prefix + "3.norm1.weight"``; None for keys outside ``prefix``."""
    if not key.startswith(prefix):
        return None
    head = key[len(prefix) :].split(".")[0]
    return int(head) if head.isdigit() else None


def count_blocks(state: dict, prefix: str) -> int:
    """How many numbered blocks ``prefix0.``, ``prefix1.``, ... a state dict holds."""
    ids = {block_index(k, prefix) for k in state} - {None}
    if ids and ids != set(range(len(ids))):
        raise MaeprobeInputError(
            f"the blocks under {prefix!r} are not numbered 0..N-1: {sorted(ids)[:10]}",
            "pass a complete checkpoint with --weights",
        )
    return len(ids)


def keep_blocks(
    state: dict,
    found: dict,
    options: dict,
    prefix: str,
    is_decoder: Callable[[str], bool] | None = None,
) -> dict:
    """Apply ``depth`` / ``decoder_depth`` options to a checkpoint (``found`` is updated).

    ``depth=N`` below the checkpoint's keeps its first N blocks (the features of block N, as
    timm's ``prune_intermediate_layers``); the decoder, trained on the last block's output, is
    then dropped. ``decoder_depth=0`` drops the decoder (encoder only).
    """
    depth, have = options.get("depth"), found["depth"]
    drop_decoder = options.get("decoder_depth") == 0
    if depth is not None and depth != have:
        if not 1 <= int(depth) <= have:
            raise MaeprobeInputError(
                f"depth={depth}, but the weights have {have} blocks",
                f"use depth between 1 and {have} (its first blocks), or leave depth out",
            )
        if is_decoder is not None and options.get("decoder_depth") not in (None, 0):
            raise MaeprobeInputError(
                f"depth={depth} keeps {depth} of the weights' {have} blocks, and their decoder "
                "follows the last block",
                "leave decoder_depth out (the decoder is dropped) or leave depth out",
            )
        state = {k: v for k, v in state.items() if (block_index(k, prefix) or 0) < int(depth)}
        found["depth"] = int(depth)
        drop_decoder = is_decoder is not None
    if drop_decoder and is_decoder is not None:
        state = {k: v for k, v in state.items() if not is_decoder(k)}
        found["decoder_depth"] = 0
    return state


def check_choice(name: str, value, choices: Iterable) -> None:
    """Refuse an option value outside ``choices`` (config ``__post_init__`` helper)."""
    choices = tuple(choices)
    if value not in choices:
        raise MaeprobeInputError(
            f"{name}={value!r} is not a valid value", f"use {name}= one of {choices}"
        )


def square_side(value, model: str) -> int:
    """One side of a square input size (``224`` or ``(224, 224)``); refuses other shapes
    (config ``__post_init__`` helper: the model's position table is square)."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise MaeprobeInputError(
                f"{model} position tables are square, input_size={tuple(value)!r}",
                "pass input_size= one side, e.g. input_size=224 (other crops still work: "
                "--crop-size)",
            )
        return int(value[0])
    return value


def check_positive(config, *names: str) -> None:
    """Refuse non-positive integer options (config ``__post_init__`` helper)."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise MaeprobeInputError(
                f"{name}={value!r} must be a positive whole number", f"pass {name}= e.g. 2"
            )
