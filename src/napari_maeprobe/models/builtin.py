"""The models this package registers (importing this module registers them)."""

from __future__ import annotations

import json
from pathlib import Path

from napari_maeprobe.models.camae import CAMAE
from napari_maeprobe.models.registry import ModelSpec, load_strict, register_model

BUNDLED = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = BUNDLED / "maeprobe-default.safetensors"

#: architecture of the bundled default model (a CA-MAE small enough for a 2-core CPU)
DEFAULT_CONFIG = dict(
    img_size=96,
    patch_size=12,
    embed_dim=144,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    max_channels=11,
    block="standard",
    init_values=None,
    legacy_bias=False,
    decoder=dict(dim=96, depth=1, heads=4),
)


def camae_config_from_state(state: dict, img_size: int = 256) -> dict:
    """Infer a CA-MAE architecture from an OpenPhenom-layout state dict."""
    p = "encoder.vit_backbone."
    w = state[p + "patch_embed.proj.weight"]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max(
        int(k[len(p) + 7 :].split(".")[0]) for k in state if k.startswith(p + "blocks.")
    )
    parallel = (p + "blocks.0.in_proj.weight") in state
    if parallel:
        head_dim = int(state[p + "blocks.0.q_norm.weight"].shape[0])
        mlp_hidden = int(state[p + "blocks.0.mlp_out_proj.weight"].shape[1])
        init_values = 1.0 if (p + "blocks.0.ls.gamma") in state else None
    else:
        head_dim = 64
        mlp_hidden = int(state[p + "blocks.0.mlp.fc1.weight"].shape[0])
        init_values = 1.0 if (p + "blocks.0.ls1.gamma") in state else None
    grid = img_size // patch
    n_pos = int(state[p + "pos_embed"].shape[1]) - 1
    if n_pos % (grid * grid):
        raise ValueError(f"pos_embed of {n_pos} tokens does not fit {img_size}x{img_size} crops")
    return dict(
        img_size=img_size,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=dim // head_dim,
        mlp_ratio=mlp_hidden / dim,
        max_channels=n_pos // (grid * grid),
        block="parallel" if parallel else "standard",
        init_values=init_values,
    )


def build_camae(
    state: dict | None, metadata: dict, legacy_bias: bool = True, img_size: int = 256, **_
) -> CAMAE:
    """CA-MAE from an OpenPhenom-layout checkpoint (encoder keys loaded strictly)."""
    if state is None:  # ViT-S/16 at 256, as OpenPhenom
        return CAMAE(img_size=img_size, legacy_bias=legacy_bias)
    cfg = camae_config_from_state(state, img_size)
    model = CAMAE(**cfg, legacy_bias=legacy_bias)
    load_strict(model.encoder, state, "encoder.")
    return model


def build_default(state: dict | None, metadata: dict, **_) -> CAMAE:
    """Our bundled CA-MAE with its decoder; the config travels in the file's metadata."""
    cfg = (
        json.loads(metadata["maeprobe_config"]) if "maeprobe_config" in metadata else DEFAULT_CONFIG
    )
    model = CAMAE(**cfg)
    if state is None:
        model.reset_parameters()
        return model
    load_strict(model, state)
    return model


register_model(
    ModelSpec(
        name="ca-mae",
        summary="channel-agnostic MAE; loads Recursion's OpenPhenom (CA-MAE-S/16) weights",
        channels="1-11",
        input_size="256x256",
        embed_dim=384,
        licence="OpenPhenom weights: Recursion non-commercial EULA (not bundled)",
        build=build_camae,
        hub=("recursionpharma/OpenPhenom", "model.safetensors"),
        weights_hint="OpenPhenom model.safetensors from the Hugging Face hub",
    )
)
register_model(
    ModelSpec(
        name="default",
        summary="small CA-MAE of our own, trained on the bundled real images (runs offline)",
        channels=f"1-{DEFAULT_CONFIG['max_channels']}",
        input_size=f"{DEFAULT_CONFIG['img_size']}x{DEFAULT_CONFIG['img_size']}",
        embed_dim=DEFAULT_CONFIG["embed_dim"],
        licence="BSD-3-Clause (this package)",
        build=build_default,
        bundled=DEFAULT_WEIGHTS,
        has_decoder=True,
    )
)
from napari_maeprobe.models import (  # noqa: E402,F401  (register vit-mae and dinov2)
    dinov2,
    mae3d,  # noqa: E402,F401  (registers mae3d)
    vitmae,
)
