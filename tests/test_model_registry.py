"""One model contract: every registered model takes the shared option names from a typed config,
refuses unknown options by name, and every option of its config changes the module it builds.

The observers below read each option back from the built module's structure (layer counts and
shapes, the block types, the attributes its forward pass uses), not from ``model.config``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.models.registry import MODEL_MODULES, create_model, get_spec, list_models

SHARED = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "input_size")

#: small architectures, so that each build takes milliseconds
CAMAE_SMALL = dict(input_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, max_channels=3)
SMALL = {
    "ca-mae": CAMAE_SMALL,
    "default": CAMAE_SMALL,
    "vit-mae": dict(
        input_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, decoder_embed_dim=12,
        decoder_depth=1, decoder_num_heads=2,
    ),
    "dinov2": dict(input_size=28, patch_size=14, pos_embed_size=28, embed_dim=24, depth=3,
                   num_heads=2),
    "mae3d": dict(
        patch_size=(2, 4, 4), input_size=(4, 8, 8), embed_dim=24, depth=3, num_heads=2,
        decoder_embed_dim=12, decoder_depth=1, decoder_num_heads=2,
    ),
}  # fmt: skip


def _ratio(linear_out: int, dim: int) -> float:
    return linear_out / dim


def _observe_camae(m) -> dict:
    vit = m.backbone
    blk = vit.blocks[0]
    parallel = type(blk).__name__ == "ParallelScalingBlock"
    dim = vit.cls_token.shape[-1]
    ls = blk.ls if parallel else blk.ls1
    dec = m.mp_decoder
    return dict(
        input_size=vit.grid * vit.patch_embed.proj.kernel_size[0],
        patch_size=vit.patch_embed.proj.kernel_size[0],
        embed_dim=dim,
        depth=len(vit.blocks),
        num_heads=blk.num_heads if parallel else blk.attn.num_heads,
        mlp_ratio=_ratio(blk.mlp_hidden if parallel else blk.mlp.fc1.out_features, dim),
        max_channels=(vit.pos_embed.shape[1] - 1) // vit.grid**2,
        block="parallel" if parallel else "standard",
        init_values=float(ls.gamma[0].detach()) if hasattr(ls, "gamma") else None,
        legacy_bias=blk.legacy_bias if parallel else None,
        decoder_embed_dim=dec.proj.out_features if dec else None,
        decoder_depth=len(dec.blocks) if dec else 0,
        decoder_num_heads=dec.blocks[0].attn.num_heads if dec else None,
        decoder_mlp_ratio=_ratio(dec.blocks[0].mlp.fc1.out_features, dec.proj.out_features)
        if dec
        else None,
    )


def _observe_vitmae(m) -> dict:
    proj = m.patch_embed.proj
    dim = m.cls_token.shape[-1]
    dec = m.has_decoder
    ddim = m.decoder_embed.out_features if dec else None
    return dict(
        input_size=math.isqrt(m.pos_embed.shape[1] - 1) * proj.kernel_size[0],
        patch_size=proj.kernel_size[0],
        in_chans=proj.in_channels,
        embed_dim=dim,
        depth=len(m.blocks),
        num_heads=m.blocks[0].attn.num_heads,
        mlp_ratio=_ratio(m.blocks[0].mlp.fc1.out_features, dim),
        decoder_embed_dim=ddim,
        decoder_depth=len(m.decoder_blocks) if dec else 0,
        decoder_num_heads=m.decoder_blocks[0].attn.num_heads if dec else None,
        decoder_mlp_ratio=_ratio(m.decoder_blocks[0].mlp.fc1.out_features, ddim) if dec else None,
        eps=m.norm.eps,
    )


def _observe_dinov2(m) -> dict:
    proj = m.patch_embed.proj
    dim = m.cls_token.shape[-1]
    ls = m.blocks[0].ls1
    return dict(
        input_size=m.input_size[0],  # the crop the pipeline cuts for it (any size works)
        patch_size=proj.kernel_size[0],
        embed_dim=dim,
        depth=len(m.blocks),
        num_heads=m.blocks[0].attn.num_heads,
        mlp_ratio=_ratio(m.blocks[0].mlp.fc1.out_features, dim),
        pos_embed_size=math.isqrt(m.pos_embed.shape[1] - 1) * proj.kernel_size[0],
        init_values=float(ls.gamma[0].detach()) if hasattr(ls, "gamma") else None,
        eps=m.norm.eps,
        pool=m.pool,
    )


def _observe_mae3d(m) -> dict:
    dim = m.cls_tokens[0].shape[-1]
    blk = m.encoder_blocks[0].block_ch0
    dec = m.has_decoder
    ddim = m.mask_tokens[0].shape[-1] if dec else None
    dblk = m.decoder_blocks[0].block_ch0 if dec else None
    return dict(
        in_chans=len(m.patch_embeds),
        patch_size=tuple(m.patch_size),
        input_size=tuple(g * p for g, p in zip(m.grid, m.patch_size)),
        embed_dim=dim,
        depth=len(m.encoder_blocks),
        num_heads=blk.self_attn.num_heads,
        mlp_ratio=_ratio(blk.mlp.fc1.out_features, dim),
        decoder_embed_dim=ddim,
        decoder_depth=len(m.decoder_blocks) if dec else 0,
        decoder_num_heads=dblk.self_attn.num_heads if dec else None,
        decoder_mlp_ratio=_ratio(dblk.mlp.fc1.out_features, ddim) if dec else None,
        cross_attention=blk.cross_attn is not None,
        pooling=m.pooling,
        channel_pool=m.channel_pool,
    )


OBSERVE = {
    "ca-mae": _observe_camae,
    "default": _observe_camae,
    "vit-mae": _observe_vitmae,
    "dinov2": _observe_dinov2,
    "mae3d": _observe_mae3d,
}

#: a valid value other than the small one, per option (with what it needs to show)
CHANGE = {
    "input_size": 48,
    "patch_size": 4,
    "embed_dim": 36,
    "depth": 2,
    "num_heads": 3,
    "mlp_ratio": 2.0,
    "max_channels": 5,
    "block": lambda cfg: "standard" if cfg.block == "parallel" else "parallel",
    "init_values": lambda cfg: None if cfg.init_values else 0.25,
    "legacy_bias": lambda cfg: not cfg.legacy_bias,
    "decoder_embed_dim": 20,
    "decoder_depth": 2,
    "decoder_num_heads": 3,
    "decoder_mlp_ratio": 2.0,
    "in_chans": 5,
    "eps": 1e-5,
    "pos_embed_size": 42,
    "pool": "mean",
    "cross_attention": False,
    "pooling": "cls",
    "channel_pool": "concat",
}
SPECIAL = {  # per model: values that fit its geometry, and options an option needs to show
    ("dinov2", "input_size"): 42,
    ("dinov2", "patch_size"): 7,
    ("mae3d", "patch_size"): (1, 2, 2),
    ("mae3d", "input_size"): (6, 8, 12),
    ("mae3d", "embed_dim"): 36,
    ("mae3d", "decoder_embed_dim"): 18,
    ("mae3d", "in_chans"): 3,
}
NEEDS = {
    "legacy_bias": dict(block="parallel"),
    "decoder_embed_dim": dict(decoder_depth=1),
    "decoder_num_heads": dict(decoder_depth=1),
    "decoder_mlp_ratio": dict(decoder_depth=1),
}
#: options that act while loading weights only (covered where the weights are loaded)
LOADING_ONLY = {("vit-mae", "adapt")}  # test_model_vitmae: zero / tile adaptation of RGB weights


def _cases():
    for spec in list_models():
        for option in spec.options:
            yield pytest.param(spec.name, option, id=f"{spec.name}-{option}")


def test_every_model_module_registers_itself():
    assert {s.name for s in list_models()} == {"ca-mae", "default", "vit-mae", "dinov2", "mae3d"}
    for spec in list_models():
        module = spec.checkpoint_filter.__module__.rsplit(".", 1)[-1]
        assert module in MODEL_MODULES, spec.name
        assert dataclasses.is_dataclass(spec.config)
        assert set(SHARED) <= set(spec.options), spec.name  # the shared names, all of them
        for old in ("img_size", "heads", "mlp_dim", "hidden_size", "pos_grid", "decoder_dim"):
            assert old not in spec.options, (spec.name, old)


@pytest.mark.parametrize("name", list(SMALL))
def test_depth_builds_that_many_blocks(name):
    model = create_model(name, random_init=True, **{**SMALL[name], "depth": 2})
    assert OBSERVE[name](model)["depth"] == 2 and model.config.depth == 2
    blocks = {
        k.split(".")[k.split(".").index(part) + 1]
        for k in model.state_dict()
        for part in ("blocks", "encoder_blocks")
        if part in k.split(".") and "decoder" not in k and "mp_decoder" not in k
    }
    assert blocks == {"0", "1"}


@pytest.mark.parametrize("name", list(SMALL))
def test_unknown_option_is_refused_by_name(name):
    for kwargs in (dict(random_init=True), {}):  # before any weights are looked for
        with pytest.raises(MaeprobeInputError) as err:
            create_model(name, dept=2, **kwargs)
        text = str(err.value)
        assert "'dept'" in text and "did you mean 'depth'" in text
        assert all(option in text for option in get_spec(name).options)  # the accepted ones


@pytest.mark.parametrize("name, option", list(_cases()))
def test_every_option_changes_the_module(name, option):
    if (name, option) in LOADING_ONLY:
        pytest.skip("acts on loading RGB weights: tested with the weights")
    base = dict(SMALL[name], **NEEDS.get(option, {}))
    reference = create_model(name, random_init=True, **base)
    value = SPECIAL.get((name, option), CHANGE[option])
    if callable(value):
        value = value(reference.config)
    model = create_model(name, random_init=True, **{**base, option: value})
    seen, before = OBSERVE[name](model), OBSERVE[name](reference)
    assert (
        seen[option] == pytest.approx(value)
        if isinstance(value, float)
        else seen[option] == (value)
    ), (option, seen[option], value)
    assert seen[option] != before[option]  # it really changed something
    assert getattr(model.config, option) == value


def test_invalid_values_name_the_option():
    with pytest.raises(MaeprobeInputError, match="block='ring'"):
        create_model("default", random_init=True, block="ring")
    with pytest.raises(MaeprobeInputError, match="depth=0 must be a positive whole number"):
        create_model("vit-mae", random_init=True, depth=0)
    with pytest.raises(MaeprobeInputError, match="input_size=50 is not a multiple of patch_size"):
        create_model("dinov2", random_init=True, input_size=50)
