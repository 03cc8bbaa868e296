"""DINOv2 (Oquab et al. 2023) as a per-channel baseline encoder (no decoder).

Checkpoint layouts that load:

- Hugging Face ``Dinov2Model`` files (``facebook/dinov2-base``): ``embeddings.{cls_token,
  mask_token,position_embeddings,patch_embeddings.projection}``,
  ``encoder.layer.N.{norm1,attention.attention.{query,key,value},attention.output.dense,
  layer_scale1.lambda1,norm2,mlp.fc1,mlp.fc2,layer_scale2.lambda1}``, ``layernorm``; also the
  transformers 5.x in-memory names (``attention.q_proj``, ``attention.o_proj``) and a
  ``dinov2.`` prefix (``Dinov2ForImageClassification``; its ``classifier`` is ignored).
- The original / timm layout (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``mask_token``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``),
  which is our own internal layout. A missing ``mask_token`` is taken as zeros.

The SwiGLU MLP of DINOv2-giant and the register tokens of the "with registers" variant are not
supported. Heads default to head dim 64 (true for every published size); ``num_heads=``
overrides.

**Options** (:class:`DINOv2Config`): the shared ``input_size`` (the crop size the pipeline uses;
any multiple of the patch works), ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
``mlp_ratio``, and ``pos_embed_size`` (the side in px of the learned position table: 518 for
the hub weights), ``init_values`` (LayerScale), ``eps`` and ``pool``.
:func:`checkpoint_filter` maps the layouts above to a config and our key names.

**Architecture** (as transformers): patch 14, pre-norm blocks with LayerScale, LayerNorm eps
1e-6, exact GELU, a final LayerNorm. The learned position table (518 px = 37 x 37 for the hub
weights) is resized bicubically (``align_corners=False``, no antialias, in float32) to the crop's
patch grid, the table itself being used when the grid matches and is square.

**Multichannel input.** DINOv2 was trained on RGB photographs; microscopy channels are not
colours. Each channel is therefore embedded on its own as a grey image: the [0, 1] channel is
replicated to R, G, B and standardised with ImageNet's per-colour mean and std (exactly what a
grey image through the Hugging Face processor becomes), and the B*C grey images run through the
encoder as one batch. Outputs:

- ``patch_embeddings`` (B, C, gy, gx, D): final-norm patch tokens of each channel.
- ``channel_embeddings`` (B, C, D): with ``pool="cls"`` (default) the final-layer-normed CLS
  token, i.e. transformers' ``pooler_output``, the token DINOv2's image-level objective trains;
  with ``pool="mean"`` the mean of the channel's (unmasked) patch tokens. Both are always in
  ``extras["cls"]`` and ``extras["patch_mean"]``.
- ``global_embedding`` (B, D): the mean over channels of ``channel_embeddings`` (order-invariant
  and the same size for any number of channels; concatenate ``channel_embeddings`` yourself for
  a channel-aware vector).
- ``attention`` (B, heads, C, gy, gx): each channel's last-layer CLS-to-patch attention.

**Masking** is DINOv2's own (iBOT-style, as ``bool_masked_pos`` in transformers): masked
patches (True) are replaced by the learned ``mask_token`` before the position embedding and the
encoder still sees every position. Their patch embeddings are NaN and their attention 0; the
mask is per channel, ``(B, C, gy, gx)``. No decoder, so no reconstructions.

Written for this package from the paper and the checkpoint layouts; no code is copied.
Weights: Apache-2.0.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.models.base import MaeprobeModel, ModelOutput
from napari_maeprobe.models.layers import init_weights
from napari_maeprobe.models.registry import (
    ModelSpec,
    check_choice,
    check_positive,
    count_blocks,
    keep_blocks,
    make_config,
    register_model,
    settle_config,
    square_side,
)
from napari_maeprobe.models.vitmae import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_mask,
    convert_hf_layers,
    make_block,
)

_POOLS = ("cls", "mean")


@dataclass
class DINOv2Config:
    """Options of DINOv2; the defaults are ViT-B/14 with the hub weights' 518-px table."""

    input_size: int = 224  # the crop size the pipeline uses (any multiple of patch_size works)
    patch_size: int = 14
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pos_embed_size: int = 518  # side (px) of the learned position table, resized to the crop
    init_values: float | None = 1.0  # LayerScale; None: none
    eps: float = 1e-6
    pool: str = "cls"  # per-channel embedding: "cls" (pooler output) or "mean" of the patches

    def __post_init__(self) -> None:
        self.input_size = square_side(self.input_size, "DINOv2")
        check_positive(self, "input_size", "patch_size", "embed_dim", "depth", "num_heads")
        check_positive(self, "pos_embed_size")
        check_choice("pool", self.pool, _POOLS)
        for name in ("input_size", "pos_embed_size"):
            if getattr(self, name) % self.patch_size:
                raise MaeprobeInputError(
                    f"{name}={getattr(self, name)} is not a multiple of "
                    f"patch_size={self.patch_size}",
                    f"pass a {name} that is a multiple of patch_size",
                )


class DINOv2(MaeprobeModel):
    """DINOv2 ViT run on each channel as a grey image; timm / original parameter names.

    Built from a :class:`DINOv2Config` and/or its options as keywords."""

    channel_agnostic = True
    has_decoder = False

    def __init__(self, config: DINOv2Config | None = None, **options) -> None:
        super().__init__()
        cfg = config if config is not None else DINOv2Config()
        if options:
            cfg = make_config(type(cfg), {**dataclasses.asdict(cfg), **options})
        self.config = cfg
        patch_size, embed_dim, eps = cfg.patch_size, cfg.embed_dim, cfg.eps
        pos_grid = cfg.pos_embed_size // patch_size
        self.patch_size = (patch_size, patch_size)
        self.embed_dim = embed_dim
        self.input_size = (cfg.input_size, cfg.input_size)
        self.pool = cfg.pool
        self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pix_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        mlp_dim = round(embed_dim * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            [
                make_block(embed_dim, cfg.num_heads, mlp_dim, eps, cfg.init_values)
                for _ in range(cfg.depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def reset_parameters(self) -> None:
        """Random initialisation (for random-init models)."""
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.mask_token)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Y, X) in [0, 1] -> (B*C, 3, Y, X): each channel as a standardised grey image."""
        b, c, y, xx = x.shape
        grey = x.float().reshape(b * c, 1, y, xx)
        return (grey - self.pix_mean) / self.pix_std

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table (1, 1 + gy*gx, D) for a patch grid, resized bicubically."""
        pos = self.pos_embed
        n = pos.shape[1] - 1
        if n == grid[0] * grid[1] and grid[0] == grid[1]:
            return pos
        side = math.isqrt(n)
        dim = pos.shape[-1]
        table = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos.dtype)
        return torch.cat([pos[:, :1], table], dim=1)

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(tokens (B*C, 1 + L, D) after the final norm, last-layer attention probabilities
        (B*C, heads, 1 + L, 1 + L) or None, flat mask (B*C, L) or None)``."""
        if x.ndim != 4:
            raise MaeprobeInputError(
                f"DINOv2 takes 2D crops (B, C, Y, X), got shape {tuple(x.shape)}",
                "project z-stacks to 2D first (--z max)",
            )
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise MaeprobeInputError(
                f"crop size {tuple(x.shape[2:])} is not a multiple of the patch {self.patch_size}",
                f"use a crop size that is a multiple of {self.patch_size[0]} (--crop-size)",
            )
        grid = self.token_grid(tuple(x.shape[1:]))  # (C, gy, gx)
        b, c = x.shape[:2]
        proj = self.patch_embed.proj
        tok = proj(self.normalize(x).to(proj.weight.dtype)).flatten(2).transpose(1, 2)
        flat = None
        if mask is not None:
            flat = check_mask(mask, b, grid, x.device).reshape(b * c, -1)
            tok = torch.where(flat[..., None], self.mask_token.to(tok.dtype)[None], tok)
        h = torch.cat([self.cls_token.expand(b * c, -1, -1).to(tok.dtype), tok], dim=1)
        h = h + self.positions(grid[1:]).to(tok.dtype)
        probs = None
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            h, p = blk(h, need_weights=attention and i == last)
            if p is not None:
                probs = p
        return self.norm(h), probs, flat

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention: bool = False,
        reconstruction: bool = False,
    ) -> ModelOutput:
        if reconstruction:
            raise MaeprobeInputError(
                "DINOv2 has no decoder: reconstructions are not available",
                "embed without reconstructions, or use a model with a decoder (--model default)",
            )
        h, probs, flat = self.encode(x, mask, attention)
        b, c = x.shape[:2]
        grid = self.token_grid(tuple(x.shape[1:]))
        d = h.shape[-1]
        h = h.float()
        cls = h[:, 0].reshape(b, c, d)
        patches = h[:, 1:]
        if flat is not None:
            patches = patches.masked_fill(flat[..., None], float("nan"))
        patch_mean = patches.nanmean(dim=1).reshape(b, c, d)
        per_channel = cls if self.pool == "cls" else patch_mean
        out = ModelOutput(
            global_embedding=per_channel.mean(dim=1),
            channel_embeddings=per_channel,
            patch_embeddings=patches.reshape(b, *grid, d),
            mask=None if flat is None else flat.reshape(b, *grid),
            extras={"cls": cls, "patch_mean": patch_mean},
        )
        if probs is not None:
            att = probs[:, :, 0, 1:].float()  # (B*C, heads, L)
            if flat is not None:
                att = att.masked_fill(flat[:, None], 0.0)
            heads = att.shape[1]
            att = att.reshape(b, c, heads, *grid[1:]).transpose(1, 2)
            out.attention = att  # (B, heads, C, gy, gx)
        return out


# --------------------------------------------------------------------------------------------
# loading

_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYERS = {r"encoder\.layer\.(\d+)\.": "blocks.{}."}
_IGNORED = re.compile(r"^(head\.|classifier\.|fc_norm\.)")


def dinov2_to_internal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face or original/timm DINOv2 state dict -> our key names."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items() if not _IGNORED.match(k)}
    if any(("weights_in" in k or "w12" in k) for k in state):
        raise MaeprobeInputError(
            "SwiGLU DINOv2 (giant) checkpoints are not supported",
            "pass facebook/dinov2-small, -base or -large weights (--weights)",
        )
    if any("register" in k for k in state):
        raise MaeprobeInputError(
            "DINOv2 with registers is not supported",
            "pass weights of DINOv2 without registers, e.g. facebook/dinov2-base (--weights)",
        )
    if "embeddings.patch_embeddings.projection.weight" in state:
        out: dict[str, torch.Tensor] = {}
        used = convert_hf_layers(state, _HF_LAYERS, out)
        for key, value in state.items():
            if key in _HF_TOP:
                out[_HF_TOP[key]] = value
                used.add(key)
        unknown = sorted(set(state) - used)
        if unknown:
            raise MaeprobeInputError(
                f"unexpected keys in a DINOv2 checkpoint: {unknown[:5]}",
                "pass a Hugging Face Dinov2Model or an original / timm DINOv2 file (--weights)",
            )
    elif "patch_embed.proj.weight" in state:
        out = dict(state)
    else:
        raise MaeprobeInputError(
            "not a DINOv2 checkpoint: neither embeddings.patch_embeddings.projection.weight "
            "(Hugging Face) nor patch_embed.proj.weight (original / timm) is in it",
            "pass facebook/dinov2-base's model.safetensors or an original / timm file (--weights)",
        )
    if "mask_token" not in out:
        out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1])
    out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def checkpoint_filter(
    state: dict, metadata: dict | None = None, **options
) -> tuple[DINOv2Config, dict]:
    """A Hugging Face or original / timm DINOv2 state dict -> ``(config, state)``.

    The weights decide ``patch_size``, ``embed_dim``, ``depth``, ``mlp_ratio``,
    ``pos_embed_size`` and whether there is LayerScale (an option restating them must agree;
    ``depth`` below the checkpoint's keeps its first blocks). Free: ``num_heads`` (not stored;
    default head width 64), ``input_size``, ``init_values`` (the weights replace it), ``eps``
    and ``pool``.
    """
    sd = dinov2_to_internal(state)
    w = sd["patch_embed.proj.weight"]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    if w.shape[1] != 3:
        raise MaeprobeInputError(
            f"expected an RGB patch projection, got {int(w.shape[1])} channels",
            "pass DINOv2 weights trained on RGB images (--weights)",
        )
    n_pos = int(sd["pos_embed"].shape[1]) - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise MaeprobeInputError(
            f"the position table of {n_pos} patches is not square",
            "pass a DINOv2 checkpoint with a square position table (--weights)",
        )
    has_ls = "blocks.0.ls1.gamma" in sd
    found: dict = dict(
        patch_size=patch, embed_dim=dim, depth=count_blocks(sd, "blocks."),
        mlp_ratio=int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / dim, pos_embed_size=side * patch,
        init_values=(options.get("init_values") or 1.0) if has_ls else None,
    )  # fmt: skip
    if "num_heads" not in options:
        found["num_heads"] = max(1, dim // 64)
    sd = keep_blocks(sd, found, options, "blocks.")
    return settle_config(DINOv2Config, found, options, free=("input_size", "eps", "pool")), sd


register_model(
    ModelSpec(
        name="dinov2",
        summary="DINOv2 ViT-B/14 baseline (no decoder): each channel embedded as a grey image",
        channels="1+",
        input_size="224x224 (any multiple of 14)",
        embed_dim=768,
        licence="Apache-2.0",
        config=DINOv2Config,
        model=DINOv2,
        checkpoint_filter=checkpoint_filter,
        hub=("facebook/dinov2-base", "model.safetensors"),
        weights_hint="facebook/dinov2-base model.safetensors (or an original/timm ViT-B/14 file)",
        has_decoder=False,
    )
)
