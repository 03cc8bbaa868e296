"""MAE-3D with per-channel token streams (``mae3d``), loading mae3d-opencell checkpoints.

The architecture is that of marrlab/mae3d-opencell's ``MAE3DChannelCrossAttention``
(Apache-2.0, built on SelfMedMAE), re-written for this package from its published design:

- **Input** ``(B, C, Z, Y, X)``; 3D patches ``(pz, py, px)`` (default ``(10, 8, 8)``). Inside
  :meth:`MAE3D.forward` every channel is z-scored over its *non-zero* voxels (population std;
  zero voxels stay 0; a constant channel is divided by 1), the convention of MONAI's
  ``NormalizeIntensity(nonzero=True, channel_wise=True)`` that mae3d-opencell trains with. The
  pipeline's percentile normalisation keeps background at exactly 0, so it stays background.
- **Channel streams.** Each channel is patchified on its own (patch voxels flattened in
  ``(pz, py, px)`` order, patches in row-major ``(gz, gy, gx)`` order) and embedded by its own
  ``Linear(patch_volume -> D) + LayerNorm``; each stream has its own CLS token. The same fixed
  3D sin-cos table is added to every stream (no channel embedding; the CLS position is zero).
- **Positions** (:func:`mae3d_sincos`): for a grid ``(g0, g1, g2) = (gz, gy, gx)`` the table is
  ``[sin a0, cos a0, sin a1, cos a1, sin a2, cos a2]`` with ``a_i = coord_i * omega``,
  ``omega_k = 10000 ** (-k / (D/6))``, ``D % 6 == 0``, meshgrid ``indexing='ij'``. The repo
  names the three axes ``h, w, d`` but builds them from the grid in input order, and its crops
  are ``(C, Z, Y, X)``: so ``h`` is **Z**, ``w`` is Y and ``d`` is X. The table for the
  native grid is kept as the buffers ``encoder_pos_embed``/``decoder_pos_embed`` (they are in the
  checkpoints); any other grid (any crop size that is a multiple of the patch) gets a table
  computed on the fly.
- **Blocks.** Each layer holds one block per stream, ``block_ch{c}``: pre-norm self-attention
  over that stream's tokens, then (optional, ``cross_attention=True``) a *position-wise*
  cross-attention, then an MLP. The cross-attention is a per-head sigmoid gate:
  ``proj(sigmoid(q.k / sqrt(d_head)) * v)`` with ``q`` from this stream (after ``norm2``) and
  ``k, v`` from the *other* stream's token at the same position, taken from the other stream's
  block input (previous-layer state, not normalised), so both streams update from the same
  states. mae3d-opencell hard-codes 2 channels; for ``C > 2`` each stream gates over the
  **mean of the other streams'** tokens at the same position (for ``C == 2`` that is exactly
  the other stream); ``C == 1`` requires ``cross_attention=False``.
- **Masking.** One spatial mask for all channels (the mask grid is ``(gz, gy, gx)``); only the
  visible patches are embedded. The decoder (same block type) sees, per stream, the projected
  CLS, the projected visible tokens and per-stream mask tokens, plus the decoder sin-cos table,
  and predicts each patch's voxels normalised per patch (norm-pix targets).
- **Loss** (:meth:`MAE3D.loss`): MSE on the masked patches against
  ``LayerNorm(no affine, eps 1e-6)(patch)``, plus ``fft_weight`` times the FFT loss
  ``L1(log1p(|fftn(pred, ortho)| + 1e-8), log1p(|fftn(target, ortho)| + 1e-8))`` over (Z, Y, X)
  of the full reconstructed volume (the decoder output at *every* patch, de-normalised with the
  true patch mean and std, ``std`` unbiased + 1e-6), against the z-scored input:
  ``loss = mse + fft_weight * fft``. The weight schedule belongs to the training loop.

Outputs (:class:`~.base.ModelOutput`):

- ``patch_embeddings`` (B, C, gz, gy, gx, D): last-layer tokens after ``encoder_norms`` (NaN at
  masked patches); ``channel_embeddings`` (B, C, D): mean of each stream's visible patch tokens
  (the repo's default pooling; ``pooling="cls"`` uses the CLS tokens instead);
  ``global_embedding``: mean over channels, (B, D) (``channel_pool="concat"`` concatenates
  like the repo's extraction default, (B, C*D)). ``extras["cls_tokens"]`` (B, C, D).
- ``attention`` (B, heads, C, gz, gy, gx): last-layer CLS-to-patch self-attention of each stream
  (0 at masked patches). Attention runs fused (``scaled_dot_product_attention``); with
  ``attention=True`` the last layer additionally materialises the softmax of the CLS query row
  only (O(N) instead of the N x N map: N is 4841 per stream at 100x176x176).
- ``reconstruction`` (B, C, Z, Y, X) in the input's intensities: visible voxels are the input;
  a masked patch is the norm-pix prediction scaled by the true mean and std of that input
  patch, as mae3d-opencell's visualisation does (a norm-pix model cannot know a masked patch's
  level; this equals "de-normalise in z-score space, then undo the z-score" for patches without
  zero voxels, and keeps all-background patches at 0).

State-dict layout (read from the public mae3d-opencell source, commit 14be998,
``src/lib/models/mae3d_cross_attention.py`` and ``src/lib/networks/cross_attention.py``;
``c`` is the stream, ``N`` the layer)::

    encoder_pos_embed                      (1, L, D)   fixed sin-cos (a parameter there)
    decoder_pos_embed                      (1, L, Dd)
    patch_embeds.c.proj.{weight,bias}      Linear(P, D), P = pz*py*px
    patch_embeds.c.norm.{weight,bias}      LayerNorm(D, eps 1e-6)
    cls_tokens.c                           (1, 1, D)
    encoder_blocks.N.block_chc.norm1.{weight,bias}
    encoder_blocks.N.block_chc.self_attn.in_proj_{weight,bias}   nn.MultiheadAttention layout
    encoder_blocks.N.block_chc.self_attn.out_proj.{weight,bias}
    encoder_blocks.N.block_chc.norm2.{weight,bias}               (cross-attention only)
    encoder_blocks.N.block_chc.cross_attn.{q_proj,k_proj,v_proj,proj}.{weight,bias}  (idem)
    encoder_blocks.N.block_chc.norm3.{weight,bias}
    encoder_blocks.N.block_chc.mlp.{fc1,fc2}.{weight,bias}       timm Mlp, GELU
    encoder_norms.c.{weight,bias}
    encoder_to_decoder.c.{weight,bias}     Linear(D, Dd)
    mask_tokens.c                          (1, 1, Dd)
    decoder_blocks.N.block_chc.*           as the encoder blocks, width Dd
    decoder_norms.c.{weight,bias}
    decoder_heads.c.{weight,bias}          Linear(Dd, P)

Our reading of the layout beyond the published 2-channel cross-attention model: ``C != 2``
streams continue the same numbering (``block_ch2``, ``cls_tokens.2``, ...); without
cross-attention a block simply has no ``norm2``/``cross_attn`` keys (the MLP keeps ``norm3``);
without a decoder (``decoder_depth=0``) there are no ``decoder_*``, ``encoder_to_decoder`` or
``mask_tokens`` keys. Loading is strict: a missing or unexpected key, or a wrong shape, fails.
The number of heads cannot be read from the weights: 6 (all mae3d-opencell configs) unless
``num_heads``/``decoder_num_heads`` are given. All LayerNorms use eps 1e-6.

Options: :class:`MAE3DConfig` (the shared ``input_size``, ``patch_size``, ``embed_dim``,
``depth``, ``num_heads``, ``mlp_ratio``, the ``decoder_*`` ones, ``in_chans``,
``cross_attention``, ``pooling``, ``channel_pool``). :func:`checkpoint_filter` maps a
mae3d-opencell checkpoint or our own safetensors to a config and the state dict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.models.base import MaeprobeModel, ModelOutput, patchify, unpatchify
from napari_maeprobe.models.layers import Mlp, attention
from napari_maeprobe.models.registry import (
    ModelSpec,
    check_choice,
    check_positive,
    config_from_metadata,
    count_blocks,
    keep_blocks,
    make_config,
    register_model,
    settle_config,
)

DEFAULT_PATCH = (10, 8, 8)
DEFAULT_INPUT = (100, 176, 176)
DEFAULT_HEADS = 6
LN_EPS = 1e-6


# --------------------------------------------------------------------------- positions


def mae3d_sincos(
    dim: int, grid: tuple[int, int, int], temperature: float = 10000.0
) -> torch.Tensor:
    """mae3d's fixed 3D sin-cos table ``(gz*gy*gx, dim)``, rows in row-major (z, y, x) order,
    columns ``[sin z, cos z, sin y, cos y, sin x, cos x]`` of ``dim / 6`` each."""
    if dim % 6:
        raise ValueError(f"embedding dim {dim} must be divisible by 6 for 3D sin-cos positions")
    m = dim // 6
    omega = 1.0 / temperature ** (torch.arange(m, dtype=torch.float64) / m)
    coords = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def grid_from_sincos(table: torch.Tensor) -> tuple[int, int, int]:
    """The (gz, gy, gx) grid a :func:`mae3d_sincos` table was built for (checked against it)."""
    t = table.reshape(-1, table.shape[-1]).double()
    n, dim = t.shape
    third = dim // 3

    def first_change(cols: slice) -> int:
        changed = ((t[:, cols] - t[0, cols]).abs().amax(dim=1) > 1e-2).nonzero()
        return int(changed[0, 0]) if len(changed) else n

    plane = first_change(slice(0, third))  # tokens per z-plane: gy * gx
    gx = min(first_change(slice(third, 2 * third)), plane)
    if dim % 6 or n % plane or plane % gx:
        raise ValueError(f"a position table of shape {tuple(table.shape)} is not a 3D sin-cos grid")
    grid = (n // plane, plane // gx, gx)
    if not torch.allclose(mae3d_sincos(dim, grid).double(), t, atol=2e-3):
        raise ValueError(
            f"encoder_pos_embed is not mae3d's 3D sin-cos table for the grid {grid} "
            "(layout [sin z, cos z, sin y, cos y, sin x, cos x])"
        )
    return grid


# --------------------------------------------------------------------------- intensities


def nonzero_zscore(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-crop, per-channel z-score over the non-zero voxels (MONAI ``NormalizeIntensity``
    with ``nonzero=True, channel_wise=True``): population std, zero voxels stay 0, a zero std
    becomes 1. Returns the standardised crops and the (B, C, 1, 1, 1) mean and std."""
    dims = tuple(range(2, x.ndim))
    nz = x != 0
    count = nz.sum(dim=dims, keepdim=True).clamp_min(1)
    mean = torch.where(nz, x, 0).sum(dim=dims, keepdim=True) / count
    var = torch.where(nz, (x - mean) ** 2, 0).sum(dim=dims, keepdim=True) / count
    std = var.sqrt()
    std = torch.where(std == 0, torch.ones_like(std), std)
    return torch.where(nz, (x - mean) / std, 0), mean, std


def denormalize_patches(pred: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Map norm-pix predictions back with the true patch statistics, as mae3d-opencell does:
    ``pred * (std_unbiased + 1e-6) + mean`` over the last axis."""
    correction = 1 if patches.shape[-1] > 1 else 0
    std = patches.var(dim=-1, correction=correction, keepdim=True).sqrt()
    return pred * (std + 1e-6) + patches.mean(dim=-1, keepdim=True)


def fft3d_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``L1(log1p(|fftn(pred)| + eps), log1p(|fftn(target)| + eps))`` over the last 3 axes
    (orthonormal FFT), averaged over every element."""
    dims = (-3, -2, -1)
    p = torch.fft.fftn(pred.float(), dim=dims, norm="ortho").abs() + eps
    t = torch.fft.fftn(target.float(), dim=dims, norm="ortho").abs() + eps
    return F.l1_loss(torch.log1p(p), torch.log1p(t))


# --------------------------------------------------------------------------- layers


class PatchEmbed(nn.Module):
    """One stream's patch embedding: ``Linear(patch_volume -> dim)`` then LayerNorm."""

    def __init__(self, patch_volume: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_volume, dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight``
    as ``[q; k; v]``, ``in_proj_bias``, ``out_proj``), run through the fused kernel."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self, x: torch.Tensor, cls_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, D) -> output (B, N, D) and, when asked, the CLS row's attention (B, H, N)."""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, _ = attention(q, k, v, need_weights=False)
        probs = None
        if cls_weights:  # the explicit softmax of the CLS query row only, in float32
            with torch.autocast(device_type=x.device.type, enabled=False):
                scores = (q[:, :, :1].float() * self.head_dim**-0.5) @ k.float().transpose(-2, -1)
                probs = scores.softmax(dim=-1)[:, :, 0]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), probs


class PositionWiseCrossAttention(nn.Module):
    """Each token gates the other stream's token at the same position, per head:
    ``proj(sigmoid(q.k / sqrt(d_head)) * v)``; O(N), no softmax."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(other).reshape(shape)
        v = self.v_proj(other).reshape(shape)
        gate = torch.sigmoid((q * k).sum(dim=-1, keepdim=True) * self.head_dim**-0.5)
        return self.proj((gate * v).reshape(b, n, d))


class StreamBlock(nn.Module):
    """One stream's block: self-attention, optional position-wise cross-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cross_attention: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attn = SelfAttention(dim, num_heads)
        if cross_attention:
            self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
            self.cross_attn = PositionWiseCrossAttention(dim, num_heads)
        else:
            self.norm2 = self.cross_attn = None
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, other: torch.Tensor | None, cls_weights: bool = False):
        y, probs = self.self_attn(self.norm1(x), cls_weights)
        x = x + y
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), other)
        x = x + self.mlp(self.norm3(x))
        return x, probs


class MultiStreamBlock(nn.Module):
    """One layer: a :class:`StreamBlock` per channel (``block_ch0``, ``block_ch1``, ...), all
    updated from the same previous-layer states."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, streams: int, cross_attention: bool
    ) -> None:
        super().__init__()
        self.streams = streams
        self.cross_attention = cross_attention
        for c in range(streams):
            self.add_module(f"block_ch{c}", StreamBlock(dim, num_heads, mlp_ratio, cross_attention))

    def forward(self, xs: list[torch.Tensor], cls_weights: bool = False):
        others: list[torch.Tensor | None]
        if not self.cross_attention:
            others = [None] * len(xs)
        elif len(xs) == 2:
            others = [xs[1], xs[0]]
        else:  # C > 2: the mean of the other streams at the same position
            total = torch.stack(xs).sum(dim=0)
            others = [(total - x) / (len(xs) - 1) for x in xs]
        outs, probs = [], []
        for c, (x, other) in enumerate(zip(xs, others)):
            y, p = getattr(self, f"block_ch{c}")(x, other, cls_weights)
            outs.append(y)
            probs.append(p)
        return outs, probs


# --------------------------------------------------------------------------- model


@dataclass
class MAE3DConfig:
    """Options of an :class:`MAE3D`; the defaults are mae3d-opencell's cross-attention model."""

    in_chans: int = 2  # channel streams
    patch_size: tuple[int, int, int] = DEFAULT_PATCH  # (Z, Y, X)
    input_size: tuple[int, int, int] = DEFAULT_INPUT  # (Z, Y, X): the native grid
    embed_dim: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 192
    decoder_depth: int = 4  # 0: no decoder
    decoder_num_heads: int = 6
    decoder_mlp_ratio: float | None = None  # None: mlp_ratio
    cross_attention: bool | None = None  # None: with 2 or more channels
    pooling: str = "mean"  # per-channel embedding: "mean" of the visible patches or "cls"
    channel_pool: str = "mean"  # global embedding: "mean" over channels or "concat"

    def __post_init__(self) -> None:
        for name in ("patch_size", "input_size"):
            value = getattr(self, name)
            value = (value,) * 3 if isinstance(value, int) else tuple(value)
            if len(value) != 3:
                raise MaeprobeInputError(
                    f"{name}={getattr(self, name)!r} is not (Z, Y, X)",
                    f"pass {name}=(z, y, x), e.g. "
                    f"{name}={DEFAULT_PATCH if name == 'patch_size' else DEFAULT_INPUT}",
                )
            setattr(self, name, value)
        check_positive(self, "in_chans", "patch_size", "input_size", "embed_dim", "depth")
        check_positive(self, "num_heads", "decoder_embed_dim", "decoder_num_heads")
        check_choice("pooling", self.pooling, ("mean", "cls"))
        check_choice("channel_pool", self.channel_pool, ("mean", "concat"))
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise MaeprobeInputError(
                f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}",
                "pass an input_size that is a multiple of patch_size",
            )
        if self.cross_attention is None:
            self.cross_attention = self.in_chans >= 2
        if self.cross_attention and self.in_chans < 2:
            raise MaeprobeInputError(
                "channel cross-attention needs at least 2 channels",
                "pass cross_attention=False for one channel",
            )
        if self.decoder_mlp_ratio is None:
            self.decoder_mlp_ratio = self.mlp_ratio
        if self.decoder_depth < 0:
            raise MaeprobeInputError(
                f"decoder_depth={self.decoder_depth}", "pass decoder_depth >= 0 (0: no decoder)"
            )
        widths = [("embed_dim", self.embed_dim, self.num_heads)]
        if self.decoder_depth:
            widths.append(("decoder_embed_dim", self.decoder_embed_dim, self.decoder_num_heads))
        for name, dim, heads in widths:
            if dim % 6 or dim % heads:
                raise MaeprobeInputError(
                    f"{name}={dim} must be divisible by 6 (3D sin-cos positions) and by its "
                    f"{heads} heads",
                    f"pass a {name} divisible by 6 and by the heads, e.g. 384 with 6 heads",
                )


class MAE3D(MaeprobeModel):
    """3D masked autoencoder with one token stream per channel (mae3d-opencell layout).

    Built from a :class:`MAE3DConfig` and/or its options as keywords."""

    channel_agnostic = False

    def __init__(self, config: MAE3DConfig | None = None, **options) -> None:
        super().__init__()
        cfg = config if config is not None else MAE3DConfig()
        if options:
            cfg = make_config(type(cfg), {**dataclasses.asdict(cfg), **options})
        self.config = cfg
        in_chans, patch_size, input_size = cfg.in_chans, cfg.patch_size, cfg.input_size
        embed_dim, depth, num_heads = cfg.embed_dim, cfg.depth, cfg.num_heads
        mlp_ratio = cfg.mlp_ratio
        decoder_dim, decoder_depth = cfg.decoder_embed_dim, cfg.decoder_depth
        decoder_heads, decoder_mlp_ratio = cfg.decoder_num_heads, cfg.decoder_mlp_ratio
        cross_attention, pooling, channel_pool = cfg.cross_attention, cfg.pooling, cfg.channel_pool
        self.patch_size = patch_size
        self.input_size = input_size
        self.grid = tuple(s // p for s, p in zip(input_size, patch_size))
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.global_dim = embed_dim * in_chans if channel_pool == "concat" else embed_dim
        self.cross_attention = cross_attention
        self.pooling = pooling
        self.channel_pool = channel_pool
        self.has_decoder = decoder_depth > 0
        volume = math.prod(patch_size)

        self.register_buffer("encoder_pos_embed", mae3d_sincos(embed_dim, self.grid)[None])
        self.patch_embeds = nn.ModuleList(PatchEmbed(volume, embed_dim) for _ in range(in_chans))
        self.cls_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1, embed_dim)) for _ in range(in_chans)
        )
        self.encoder_blocks = nn.ModuleList(
            MultiStreamBlock(embed_dim, num_heads, mlp_ratio, in_chans, cross_attention)
            for _ in range(depth)
        )
        self.encoder_norms = nn.ModuleList(
            nn.LayerNorm(embed_dim, eps=LN_EPS) for _ in range(in_chans)
        )
        if self.has_decoder:
            self.register_buffer("decoder_pos_embed", mae3d_sincos(decoder_dim, self.grid)[None])
            self.encoder_to_decoder = nn.ModuleList(
                nn.Linear(embed_dim, decoder_dim) for _ in range(in_chans)
            )
            self.mask_tokens = nn.ParameterList(
                nn.Parameter(torch.zeros(1, 1, decoder_dim)) for _ in range(in_chans)
            )
            self.decoder_blocks = nn.ModuleList(
                MultiStreamBlock(
                    decoder_dim, decoder_heads, decoder_mlp_ratio, in_chans, cross_attention
                )
                for _ in range(decoder_depth)
            )
            self.decoder_norms = nn.ModuleList(
                nn.LayerNorm(decoder_dim, eps=LN_EPS) for _ in range(in_chans)
            )
            self.decoder_heads = nn.ModuleList(
                nn.Linear(decoder_dim, volume) for _ in range(in_chans)
            )
        self._pos_cache: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE initialisation: Xavier-uniform linears and qkv, zero biases, unit LayerNorms,
        CLS and mask tokens ~ N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, SelfAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
        tokens = list(self.cls_tokens) + (list(self.mask_tokens) if self.has_decoder else [])
        for t in tokens:
            nn.init.normal_(t, std=0.02)

    # ----------------------------------------------------------------------- helpers

    def _positions(self, which: str, grid: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """(L, dim) sin-cos table for ``grid``: the stored buffer for the native grid, else
        computed (and cached) for this grid."""
        table = getattr(self, f"{which}_pos_embed")
        if tuple(grid) == self.grid:
            return table[0].to(like.dtype)
        key = (which, tuple(grid), like.device, like.dtype)
        if key not in self._pos_cache:
            dim = table.shape[-1]
            self._pos_cache[key] = mae3d_sincos(dim, grid).to(like.device, like.dtype)
        return self._pos_cache[key]

    def _check(self, x: torch.Tensor) -> tuple[int, int, int]:
        if x.ndim != 5:
            raise MaeprobeInputError(
                f"mae3d takes (B, C, Z, Y, X) crops, got shape {tuple(x.shape)}",
                "pass 3D crops with a channel axis",
            )
        if x.shape[1] != self.in_chans:
            raise MaeprobeInputError(
                f"this mae3d model has {self.in_chans} channel stream(s), the crops have "
                f"{x.shape[1]} channels",
                f"pick exactly {self.in_chans} channel(s), in the order the model was trained on",
            )
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise MaeprobeInputError(
                f"crop size {spatial} (Z, Y, X) is not a multiple of the patch {self.patch_size}",
                "crop or pad to a multiple of the patch size (e.g. 100x176x176)",
            )
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def _visible_index(
        self, mask: torch.Tensor | None, b: int, grid: tuple[int, ...], device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The flat (B, L) mask and the (B, n_visible) indices of the visible patches (sorted)."""
        if mask is None:
            return None, None
        mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        if mask.ndim == 5:  # (B, C, gz, gy, gx): accepted when identical across channels
            if not (mask == mask[:, :1]).all():
                raise MaeprobeInputError(
                    "mae3d masks the same patches in every channel; this mask differs per channel",
                    "pass one (B, gz, gy, gx) spatial mask",
                )
            mask = mask[:, 0]
        if tuple(mask.shape) != (b, *grid):
            raise MaeprobeInputError(
                f"the mask has shape {tuple(mask.shape)}, the patch grid is {(b, *grid)}",
                "make the mask with model.token_grid(crop shape)",
            )
        flat = mask.reshape(b, -1)
        n_vis = (~flat).sum(dim=1)
        if (n_vis != n_vis[0]).any() or int(n_vis[0]) == 0:
            raise MaeprobeInputError(
                "every crop of a batch must keep the same number (> 0) of visible patches",
                "mask the same number of patches in every crop (make_mask does)",
            )
        order = torch.argsort(flat.to(torch.int32), dim=1, stable=True)
        return flat, order[:, : int(n_vis[0])]

    def _encode(self, z: torch.Tensor, grid, vis_idx, cls_weights: bool):
        """Standardised crops -> per-stream normalised tokens [(B, 1 + n_vis, D)] and the
        last layer's CLS attention rows [(B, H, 1 + n_vis)] (when asked)."""
        b = z.shape[0]
        dtype = self.patch_embeds[0].proj.weight.dtype
        patches = patchify(z.to(dtype), self.patch_size).reshape(
            b, self.in_chans, math.prod(grid), -1
        )
        pos = self._positions("encoder", grid, patches)[None].expand(b, -1, -1)
        if vis_idx is not None:
            patches = torch.gather(
                patches,
                2,
                vis_idx[:, None, :, None].expand(-1, self.in_chans, -1, patches.shape[-1]),
            )
            pos = torch.gather(pos, 1, vis_idx[..., None].expand(-1, -1, pos.shape[-1]))
        xs = []
        for c in range(self.in_chans):
            tok = self.patch_embeds[c](patches[:, c]) + pos
            cls = self.cls_tokens[c].to(tok.dtype).expand(b, 1, -1)  # its position is zero
            xs.append(torch.cat([cls, tok], dim=1))
        probs: list = [None] * self.in_chans
        last = len(self.encoder_blocks) - 1
        for i, blk in enumerate(self.encoder_blocks):
            xs, p = blk(xs, cls_weights and i == last)
            if i == last:
                probs = p
        xs = [norm(x) for norm, x in zip(self.encoder_norms, xs)]
        return xs, probs

    def _decode(self, tokens: list[torch.Tensor], grid, vis_idx) -> torch.Tensor:
        """Normalised encoder tokens -> norm-pix predictions (B, C, L, patch_volume)."""
        if not self.has_decoder:
            raise ValueError("this mae3d model has no decoder: reconstructions are not available")
        b = tokens[0].shape[0]
        n = math.prod(grid)
        ys = []
        for c, h in enumerate(tokens):
            y = self.encoder_to_decoder[c](h)
            pos = self._positions("decoder", grid, y)
            if vis_idx is None:
                full = y[:, 1:]
            else:
                full = self.mask_tokens[c].to(y.dtype).expand(b, n, -1)
                idx = vis_idx[..., None].expand(-1, -1, y.shape[-1])
                full = full.scatter(1, idx, y[:, 1:])
            ys.append(torch.cat([y[:, :1], full + pos[None]], dim=1))
        for blk in self.decoder_blocks:
            ys, _ = blk(ys)
        preds = [
            head(norm(y))[:, 1:]
            for head, norm, y in zip(self.decoder_heads, self.decoder_norms, ys)
        ]
        return torch.stack(preds, dim=1).float()

    # ----------------------------------------------------------------------- API

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention: bool = False,
        reconstruction: bool = False,
    ) -> ModelOutput:
        grid = self._check(x)
        b, c = x.shape[:2]
        n = math.prod(grid)
        x = x.float()
        z, _, _ = nonzero_zscore(x)
        flat, vis_idx = self._visible_index(mask, b, grid, x.device)
        tokens, probs = self._encode(z, grid, vis_idx, attention)
        d = tokens[0].shape[-1]
        h = torch.stack(tokens, dim=1).float()  # (B, C, 1 + n_vis, D)
        cls, visible = h[:, :, 0], h[:, :, 1:]
        if vis_idx is None:
            full = visible
        else:
            full = visible.new_full((b, c, n, d), float("nan"))
            full.scatter_(2, vis_idx[:, None, :, None].expand(-1, c, -1, d), visible)
        per_channel = cls if self.pooling == "cls" else visible.mean(dim=2)
        if self.channel_pool == "concat":
            global_embedding = per_channel.reshape(b, c * d)
        else:
            global_embedding = per_channel.mean(dim=1)
        out = ModelOutput(
            global_embedding=global_embedding,
            channel_embeddings=per_channel,
            patch_embeddings=full.reshape(b, c, *grid, d),
            mask=None if flat is None else flat.reshape(b, *grid),
            extras={"cls_tokens": cls},
        )
        if attention:
            att = torch.stack(probs, dim=2)[..., 1:]  # (B, H, C, n_vis)
            if vis_idx is not None:
                heads = att.shape[1]
                dense = att.new_zeros((b, heads, c, n))
                idx = vis_idx[:, None, None, :].expand(-1, heads, c, -1)
                att = dense.scatter(3, idx, att)
            out.attention = att.reshape(b, -1, c, *grid)
        if reconstruction:
            pred = self._decode(tokens, grid, vis_idx)
            out.reconstruction = self._paste(x, pred, flat, grid)
        return out

    def _paste(self, x: torch.Tensor, pred: torch.Tensor, flat, grid) -> torch.Tensor:
        """Visible voxels from ``x``; masked patches = norm-pix prediction scaled by the true
        mean and std of the input patch."""
        if flat is None:
            return x.clone()
        b, c = x.shape[:2]
        patches = patchify(x, self.patch_size).reshape(b, c, math.prod(grid), -1)
        rec = denormalize_patches(pred, patches)
        m = flat[:, None, :, None]
        mixed = torch.where(m, rec, patches)
        return unpatchify(mixed.reshape(b, c, *grid, -1), self.patch_size)

    def loss(
        self, x: torch.Tensor, mask: torch.Tensor, fft_weight: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """mae3d-opencell's training loss for one batch and one mask: MSE of the masked patches
        against norm-pix targets, plus ``fft_weight`` times the FFT loss of the full
        reconstruction (in z-scored intensity): ``mse + fft_weight * fft``."""
        if mask is None:
            raise ValueError("the MAE loss needs a mask (see napari_maeprobe.pp.masking.make_mask)")
        grid = self._check(x)
        b, c = x.shape[:2]
        z, _, _ = nonzero_zscore(x.float())
        flat, vis_idx = self._visible_index(mask, b, grid, x.device)
        if int(flat[0].sum()) == 0:
            raise ValueError("the mask hides no patch: nothing to reconstruct")
        tokens, _ = self._encode(z, grid, vis_idx, False)
        pred = self._decode(tokens, grid, vis_idx)  # (B, C, L, P)
        patches = patchify(z, self.patch_size).reshape(b, c, math.prod(grid), -1)
        target = F.layer_norm(patches, patches.shape[-1:], eps=LN_EPS)
        m = flat[:, None, :, None].float()
        per_voxel = (pred - target) ** 2 * m
        mse = per_voxel.sum() / (m.sum() * c * patches.shape[-1])
        fft = torch.zeros((), device=x.device)
        loss = mse
        if fft_weight > 0:
            recon = denormalize_patches(pred, patches)
            recon = unpatchify(recon.reshape(b, c, *grid, -1), self.patch_size)
            fft = fft3d_loss(recon, z)
            loss = mse + fft_weight * fft
        return loss, {"mse": float(mse.detach()), "fft": float(fft.detach())}


# --------------------------------------------------------------------------- loading


def mae3d_config_from_state(
    state: dict,
    patch_size: tuple[int, int, int] | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> dict:
    """What a mae3d-opencell state dict says about its architecture (config values).

    Widths, depths, channel count, MLP ratios and whether there is cross-attention or a decoder
    come from the tensors; the native grid from ``encoder_pos_embed``; the patch from
    ``patch_size`` or the default (10, 8, 8) when its volume fits (else from ``input_size``).
    The heads are not in the weights (not returned).
    """
    need = ("cls_tokens.0", "patch_embeds.0.proj.weight", "encoder_pos_embed")
    absent = [k for k in need if k not in state]
    if absent:
        raise MaeprobeInputError(
            f"not a mae3d-opencell channel-stream state dict: no {', '.join(absent)} "
            f"(it has e.g. {', '.join(list(state)[:3])})",
            "pass a mae3d-opencell checkpoint_XXXX.pth.tar or a mae3d safetensors (--weights)",
        )
    chans = count_blocks(state, "cls_tokens.")
    dim = int(state["cls_tokens.0"].shape[-1])
    volume = int(state["patch_embeds.0.proj.weight"].shape[1])
    depth = count_blocks(state, "encoder_blocks.")
    if depth == 0:
        raise MaeprobeInputError(
            "not a mae3d-opencell state dict: no encoder_blocks.* keys",
            "pass a complete mae3d-opencell checkpoint (--weights)",
        )
    fc1 = state.get("encoder_blocks.0.block_ch0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    cross = any(".cross_attn." in k for k in state if k.startswith("encoder_blocks."))
    decoder_depth = count_blocks(state, "decoder_blocks.")
    decoder_dim = int(state["mask_tokens.0"].shape[-1]) if "mask_tokens.0" in state else 192
    dfc1 = state.get("decoder_blocks.0.block_ch0.mlp.fc1.weight")
    decoder_mlp_ratio = dfc1.shape[0] / decoder_dim if dfc1 is not None else mlp_ratio

    table = state["encoder_pos_embed"]
    try:
        grid = grid_from_sincos(table)
    except ValueError as exc:
        raise MaeprobeInputError(str(exc), "pass a mae3d-opencell checkpoint (--weights)") from exc
    if input_size is not None:
        input_size = tuple(int(s) for s in input_size)
    if patch_size is not None:
        patch_size = tuple(int(p) for p in patch_size)
    elif math.prod(DEFAULT_PATCH) == volume:
        patch_size = DEFAULT_PATCH
    elif input_size is not None:
        patch_size = tuple(s // g for s, g in zip(input_size, grid))
    else:
        raise MaeprobeInputError(
            f"the patches of the weights hold {volume} voxels, not {math.prod(DEFAULT_PATCH)}",
            "pass patch_size=(pz, py, px) (or input_size=(z, y, x), the crop they were trained on)",
        )
    if math.prod(patch_size) != volume:
        raise MaeprobeInputError(
            f"patch_size={patch_size} has {math.prod(patch_size)} voxels, the weights' patches "
            f"{volume}",
            "pass the patch_size=(pz, py, px) the weights were trained with",
        )
    if input_size is None:
        input_size = tuple(g * p for g, p in zip(grid, patch_size))
    return dict(
        in_chans=chans, patch_size=patch_size, input_size=input_size, embed_dim=dim,
        depth=depth, mlp_ratio=mlp_ratio, decoder_embed_dim=decoder_dim,
        decoder_depth=decoder_depth, decoder_mlp_ratio=decoder_mlp_ratio, cross_attention=cross,
    )  # fmt: skip


#: option names of older files' metadata
_RENAMES = {"decoder_dim": "decoder_embed_dim", "decoder_heads": "decoder_num_heads"}


def _is_decoder_key(key: str) -> bool:
    return key.startswith(("decoder_", "encoder_to_decoder.", "mask_tokens."))


def checkpoint_filter(
    state: dict, metadata: dict | None = None, **options
) -> tuple[MAE3DConfig, dict]:
    """A mae3d-opencell checkpoint (``{'epoch', 'state_dict', ...}``, keys possibly
    ``module.``-prefixed) or our own safetensors (config in the ``maeprobe_config`` metadata)
    -> ``(config, state)`` that :class:`MAE3D` loads strictly.

    The weights decide the widths, depths, channels, MLP ratios, cross-attention and the patch
    volume; ``patch_size`` / ``input_size`` pick the patch shape where the volume leaves it
    open. Free: ``num_heads`` / ``decoder_num_heads`` for mae3d-opencell files (not stored;
    default 6), ``pooling`` and ``channel_pool``. ``depth`` below the checkpoint's keeps its
    first blocks and drops the decoder; ``decoder_depth=0`` drops it.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    found = config_from_metadata(MAE3DConfig, metadata, _RENAMES)
    if found is None:
        found = mae3d_config_from_state(
            state, patch_size=options.get("patch_size"), input_size=options.get("input_size")
        )
        for key in ("num_heads", "decoder_num_heads"):
            if key not in options:
                found[key] = DEFAULT_HEADS
    found["depth"] = count_blocks(state, "encoder_blocks.")
    state = keep_blocks(state, found, options, "encoder_blocks.", _is_decoder_key)
    cfg = settle_config(MAE3DConfig, found, options, free=("pooling", "channel_pool"))
    return cfg, state


register_model(
    ModelSpec(
        name="mae3d",
        summary="3D MAE with per-channel token streams and channel cross-attention "
        "(mae3d-opencell layout)",
        channels="1+ (2 in mae3d-opencell)",
        input_size="100x176x176 (ZYX; any multiple of the 3D patch)",
        embed_dim=384,
        licence="mae3d-opencell: no public weights; user checkpoints",
        config=MAE3DConfig,
        model=MAE3D,
        checkpoint_filter=checkpoint_filter,
        weights_hint="a mae3d-opencell checkpoint_XXXX.pth.tar",
        has_decoder=True,
    )
)

__all__ = [
    "MAE3D",
    "MAE3DConfig",
    "checkpoint_filter",
    "denormalize_patches",
    "fft3d_loss",
    "grid_from_sincos",
    "mae3d_config_from_state",
    "mae3d_sincos",
    "nonzero_zscore",
]
