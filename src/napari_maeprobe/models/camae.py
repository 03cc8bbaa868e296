"""Channel-agnostic MAE (CA-MAE): one patch projection shared by all channels, the same 2D
position table repeated for every channel, tokens kept per channel.

The encoder's parameter names and numerics follow Recursion's OpenPhenom checkpoint
(``encoder.vit_backbone.*``: ViT-S/16 at 256x256, ParallelScalingBlock with qk-norm, LayerScale
and the legacy bias layout, no final norm), so its weights load exactly. Written from the
published architecture facts; no OpenPhenom code is used (it is CC BY-NC).

Our own models (the bundled ``default``) add a light decoder under ``mp_decoder.*`` for masked
reconstruction; OpenPhenom's own decoder is not loaded.

Options: :class:`CAMAEConfig`. Weights: :func:`checkpoint_filter` maps an OpenPhenom-layout state
dict (the architecture read from its shapes) or our own safetensors (the config in its
``maeprobe_config`` metadata) to a config and the state dict :class:`CAMAE` loads strictly.
This module registers ``ca-mae``; :mod:`.builtin` registers the bundled ``default``.
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
from napari_maeprobe.models.layers import (
    Block,
    ParallelScalingBlock,
    init_weights,
    sincos_1d,
    sincos_2d,
)
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


@dataclass
class CAMAEConfig:
    """Options of a CA-MAE; the defaults are OpenPhenom's CA-MAE-S/16 (encoder only)."""

    input_size: int = 256  # side of the (square) crops, px
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    max_channels: int = 11  # channel slots stored in the position table (more are repeated)
    block: str = "parallel"  # "parallel" (ParallelScalingBlock, OpenPhenom) or "standard"
    init_values: float | None = 1e-4  # LayerScale at init; None: no LayerScale
    legacy_bias: bool = True  # timm < 1.0.25 routing of the parallel block's mlp_bias
    decoder_embed_dim: int = 96  # our light decoder (mp_decoder.*)
    decoder_depth: int = 0  # 0: no decoder
    decoder_num_heads: int = 4
    decoder_mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.input_size, (tuple, list)):
            if len(set(self.input_size)) != 1:
                raise MaeprobeInputError(
                    f"CA-MAE takes square crops, input_size={self.input_size!r}",
                    "pass input_size= one side, e.g. input_size=256",
                )
            self.input_size = int(self.input_size[0])
        check_positive(self, "input_size", "patch_size", "embed_dim", "depth", "num_heads")
        check_positive(self, "max_channels", "decoder_embed_dim", "decoder_num_heads")
        check_choice("block", self.block, ("parallel", "standard"))
        if self.input_size % self.patch_size:
            raise MaeprobeInputError(
                f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}",
                "pass an input_size that is a multiple of patch_size",
            )
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise MaeprobeInputError(
                f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads} "
                "and by 4 (2D sin-cos positions)",
                "pass embed_dim and num_heads that fit, e.g. embed_dim=384, num_heads=6",
            )
        dim, heads = self.decoder_embed_dim, self.decoder_num_heads
        if self.decoder_depth < 0 or dim % heads or dim % 4:
            raise MaeprobeInputError(
                f"decoder_depth={self.decoder_depth}, decoder_embed_dim={dim}, "
                f"decoder_num_heads={heads} do not fit",
                "pass decoder_depth >= 0 and a decoder_embed_dim divisible by decoder_num_heads "
                "and by 4",
            )


def self_standardize(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """Per-image, per-channel z-score (OpenPhenom's InstanceNorm2d without affine).

    Returns the standardised crops and the mean and standard deviation used, so that
    reconstructions can be mapped back to the input's intensities.
    """
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    std = (var + eps).sqrt()
    return (x - mean) / std, mean, std


class ChannelAgnosticViT(nn.Module):
    """The encoder backbone; attribute names match ``encoder.vit_backbone.*`` of OpenPhenom."""

    def __init__(self, cfg: CAMAEConfig) -> None:
        super().__init__()
        embed_dim, depth, num_heads = cfg.embed_dim, cfg.depth, cfg.num_heads
        mlp_ratio, init_values, max_channels = cfg.mlp_ratio, cfg.init_values, cfg.max_channels
        self.input_size = cfg.input_size
        self.patch = cfg.patch_size
        self.grid = cfg.input_size // cfg.patch_size
        self.max_channels = max_channels
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, embed_dim, self.patch, self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = sincos_2d(embed_dim, (self.grid, self.grid)).repeat(max_channels, 1)
        pos = torch.cat([torch.zeros(1, embed_dim), table])[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        if cfg.block == "parallel":
            blocks = [
                ParallelScalingBlock(
                    embed_dim, num_heads, mlp_ratio, True, init_values, cfg.legacy_bias
                )
                for _ in range(depth)
            ]
        else:
            blocks = [
                Block(embed_dim, num_heads, mlp_ratio, True, False, init_values)
                for _ in range(depth)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)  # in the checkpoint, unused by MAE

    def channel_positions(self, c: int) -> torch.Tensor:
        """The position rows of ``c`` channels' patch tokens, (1, c * grid**2, D).

        The stored table holds ``max_channels`` copies of one 2D sin-cos table (OpenPhenom's
        layout, loaded strictly); for more channels it is repeated, so channel ``k`` gets the
        rows of slot ``k mod max_channels``: the same rows as every other channel when, as in
        OpenPhenom and our models, the copies are identical. Up to ``max_channels`` the rows
        are a slice of the stored table, as before."""
        rows = self.pos_embed[:, 1:]
        need = c * self.grid * self.grid
        if need > rows.shape[1]:
            rows = rows.repeat(1, -(-need // rows.shape[1]), 1)
        return rows[:, :need]


class CAMAEEncoder(nn.Module):
    def __init__(self, cfg: CAMAEConfig) -> None:
        super().__init__()
        self.vit_backbone = ChannelAgnosticViT(cfg)


class CAMAEDecoder(nn.Module):
    """A light decoder for our own models: visible tokens + mask tokens, spatial sin-cos plus a
    channel-slot sin-cos (so masked tokens of different channels differ), pre-norm blocks, and
    a linear head to the pixels of one patch of one channel."""

    def __init__(
        self,
        embed_dim: int,
        dim: int,
        depth: int,
        heads: int,
        patch: int,
        grid: int,
        slots: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        spatial = sincos_2d(dim, (grid, grid))
        slot = sincos_1d(dim, torch.arange(slots, dtype=torch.float64) * 7.0)
        self.register_buffer("spatial_pos", spatial, persistent=False)
        self.register_buffer("slot_pos", slot, persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch)
        nn.init.normal_(self.mask_token, std=0.02)

    def slot_positions(self, c: int) -> torch.Tensor:
        """The channel-slot sin-cos rows of ``c`` channels, (c, dim): the built table up to
        its ``slots`` rows, the same formula beyond (a fixed table, nothing learned; slots past
        the training's channel count are positions the decoder has not seen)."""
        if c <= self.slot_pos.shape[0]:
            return self.slot_pos[:c]
        dim = self.slot_pos.shape[1]
        slot = sincos_1d(dim, torch.arange(c, dtype=torch.float64) * 7.0)
        return slot.to(self.slot_pos.device, self.slot_pos.dtype)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """visible (B, n_vis, D) in token order; mask (B, C, L) -> pixels (B, C, L, p*p)."""
        b, c, n = mask.shape
        dim = self.mask_token.shape[-1]
        full = self.mask_token.expand(b, c * n, dim).clone()
        full[~mask.reshape(b, -1)] = self.proj(visible).reshape(-1, dim).to(full.dtype)
        pos = self.spatial_pos[None, :n] + self.slot_positions(c)[:, None]  # (C, L, dim)
        x = full + pos.reshape(1, c * n, dim).to(full.dtype)
        for blk in self.blocks:
            x, _ = blk(x)
        return self.pred(self.norm(x)).reshape(b, c, n, -1)


class CAMAE(MaeprobeModel):
    """Channel-agnostic MAE: any number of channels at ``input_size`` x ``input_size``.

    The position table is a fixed sin-cos table repeated per channel, so channels beyond the
    stored ``max_channels`` slots reuse it (:meth:`ChannelAgnosticViT.channel_positions`).

    Built from a :class:`CAMAEConfig` (default: OpenPhenom's ViT-S/16 at 256, no decoder) and/or
    its options as keywords; ``decoder_depth > 0`` adds our light decoder.
    """

    channel_agnostic = True
    #: each crop channel is z-scored by its own mean and std inside the model (self_standardize)
    standardizes_crops = True

    def __init__(self, config: CAMAEConfig | None = None, **options) -> None:
        super().__init__()
        cfg = config if config is not None else CAMAEConfig()
        if options:
            cfg = make_config(type(cfg), {**dataclasses.asdict(cfg), **options})
        self.config = cfg
        self.encoder = CAMAEEncoder(cfg)
        vit = self.encoder.vit_backbone
        self.patch_size = (vit.patch, vit.patch)
        self.embed_dim = cfg.embed_dim
        self.input_size = (cfg.input_size, cfg.input_size)
        self.mp_decoder = (
            CAMAEDecoder(self.embed_dim, cfg.decoder_embed_dim, cfg.decoder_depth,
                         cfg.decoder_num_heads, vit.patch, vit.grid, vit.max_channels,
                         cfg.decoder_mlp_ratio)
            if cfg.decoder_depth
            else None
        )  # fmt: skip
        self.has_decoder = self.mp_decoder is not None

    @property
    def backbone(self) -> ChannelAgnosticViT:
        return self.encoder.vit_backbone

    def reset_parameters(self) -> None:
        """MAE initialisation for training from scratch."""
        init_weights(self)
        vit = self.backbone
        w = vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(vit.cls_token, std=0.02)

    def _check(self, x: torch.Tensor) -> None:
        vit = self.backbone
        s = vit.input_size
        if x.ndim != 4:
            raise MaeprobeInputError(
                f"CA-MAE takes 2D crops (B, C, Y, X), got shape {tuple(x.shape)}",
                "project z-stacks to 2D first (--z max)",
            )
        if x.shape[-2:] != (s, s):
            raise MaeprobeInputError(
                f"CA-MAE takes {s}x{s} crops, got {tuple(x.shape[-2:])}",
                f"crop or tile to {s}x{s} (--crop-size {s})",
            )
        if x.shape[1] < 1:
            raise MaeprobeInputError(
                "CA-MAE takes at least 1 channel, got 0",
                "pick at least one channel (--channels NAME,...)",
            )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention: bool = False,
        reconstruction: bool = False,
    ) -> ModelOutput:
        self._check(x)
        vit = self.backbone
        b, c = x.shape[:2]
        n = vit.grid * vit.grid
        z, mean, std = self_standardize(x.float())
        z = z.to(vit.patch_embed.proj.weight.dtype)
        tok = vit.patch_embed.proj(z.reshape(b * c, 1, *x.shape[-2:]))  # (B*C, D, g, g)
        d = tok.shape[1]
        tok = tok.reshape(b, c, d, n).transpose(2, 3).reshape(b, c * n, d)
        tok = tok + vit.channel_positions(c).to(tok.dtype)
        flat_mask = None
        if mask is not None:
            flat_mask = mask.reshape(b, c * n).to(tok.device)
            n_vis = int((~flat_mask[0]).sum())
            tok = tok[~flat_mask].reshape(b, n_vis, d)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).to(tok.dtype).expand(b, 1, d)
        h = torch.cat([cls, tok], dim=1)
        probs = None
        last = len(vit.blocks) - 1
        for i, blk in enumerate(vit.blocks):
            h, p = blk(h, need_weights=attention and i == last)
            if p is not None:
                probs = p
        visible = h[:, 1:]
        if flat_mask is None:
            full = visible
        else:
            full = visible.new_full((b, c * n, d), float("nan"))
            full[~flat_mask] = visible.reshape(-1, d)
        per_patch = full.reshape(b, c, vit.grid, vit.grid, d)
        out = ModelOutput(
            global_embedding=visible.float().mean(dim=1),
            channel_embeddings=full.reshape(b, c, n, d).float().nanmean(dim=2),
            patch_embeddings=per_patch.float(),
            mask=None if mask is None else flat_mask.reshape(b, c, vit.grid, vit.grid),
        )
        if probs is not None:
            cls_att = probs[:, :, 0, 1:].float()  # (B, heads, n_vis)
            heads = cls_att.shape[1]
            att = cls_att.new_zeros((b, heads, c * n))
            if flat_mask is None:
                att = cls_att
            else:
                att.transpose(1, 2)[~flat_mask] = cls_att.transpose(1, 2).reshape(-1, heads)
            out.attention = att.reshape(b, heads, c, vit.grid, vit.grid)
        if reconstruction:
            out.reconstruction = self._reconstruct(x, z, visible, flat_mask, mean, std)
        return out

    def predict_pixels(
        self, visible: torch.Tensor, flat_mask: torch.Tensor, c: int
    ) -> torch.Tensor:
        """Decoder output (B, C, L, p*p) in standardised intensity."""
        if self.mp_decoder is None:
            raise MaeprobeInputError(
                "this CA-MAE has no decoder: reconstructions are not available",
                "embed without reconstructions, or use a model with a decoder (--model default)",
            )
        b = visible.shape[0]
        return self.mp_decoder(visible, flat_mask.reshape(b, c, -1))

    def _reconstruct(self, x, z, visible, flat_mask, mean, std) -> torch.Tensor:
        b, c = x.shape[:2]
        if flat_mask is None:
            flat_mask = torch.zeros(b, visible.shape[1], dtype=torch.bool, device=x.device)
        pred = self.predict_pixels(visible, flat_mask, c).float()
        g = self.backbone.grid
        pred_img = unpatchify(pred.reshape(b, c, g, g, -1), self.patch_size) * std + mean
        m = flat_mask.reshape(b, c, g, g, 1).expand(-1, -1, -1, -1, pred.shape[-1])
        m = unpatchify(m.float(), self.patch_size)
        return x.float() * (1 - m) + pred_img * m

    def loss(
        self, x: torch.Tensor, mask: torch.Tensor, fft_weight: float = 0.01
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """MAE training loss: MSE on the masked patches (standardised intensity), mixed with an
        FFT-magnitude loss over the reconstructed crop: (1 - w) * MSE + w * FFT."""
        self._check(x)
        b, c = x.shape[:2]
        out_z, _, _ = self_standardize(x.float())
        enc = self.forward(x, mask)
        g = self.backbone.grid
        flat_mask = mask.reshape(b, c * g * g)
        visible = enc.patch_embeddings.reshape(b, c * g * g, -1)[~flat_mask].reshape(
            b, -1, self.embed_dim
        )
        pred = self.predict_pixels(visible, flat_mask, c)  # (B, C, L, p*p)
        target = patchify(out_z, self.patch_size).reshape(b, c, g * g, -1)
        m = mask.reshape(b, c, g * g).float()
        mse = (((pred - target) ** 2).mean(-1) * m).sum() / m.sum().clamp_min(1)
        loss = mse
        fft = torch.zeros((), device=x.device)
        if fft_weight > 0:
            pred_img = unpatchify(pred.reshape(b, c, g, g, -1), self.patch_size)
            mm = unpatchify(
                m.reshape(b, c, g, g, 1).expand(-1, -1, -1, -1, pred.shape[-1]), self.patch_size
            )
            filled = out_z * (1 - mm) + pred_img * mm
            fft = F.l1_loss(
                torch.fft.fft2(filled, norm="ortho").abs(),
                torch.fft.fft2(out_z, norm="ortho").abs(),
            )
            loss = (1 - fft_weight) * mse + fft_weight * fft
        return loss, {"mse": float(mse.detach()), "fft": float(fft.detach())}


# --------------------------------------------------------------------------------------------
# weights

_BACKBONE = "encoder.vit_backbone."
#: option names of older files' metadata
_RENAMES = {"img_size": "input_size", "heads": "num_heads"}
#: options the weights do not decide
_FREE = ("legacy_bias",)


def _upgrade_metadata(values: dict) -> dict:
    """Older ``maeprobe_config`` metadata: ``decoder=dict(dim, depth, heads)`` or None."""
    if "decoder" in values:
        dec = values.pop("decoder")
        if dec:
            values.update(
                decoder_embed_dim=dec["dim"], decoder_depth=dec["depth"],
                decoder_num_heads=dec["heads"],
            )  # fmt: skip
        else:
            values["decoder_depth"] = 0
    return values


def _sincos_side(table: torch.Tensor) -> int | None:
    """The side (in patches) of the 2D sin-cos grid a CA-MAE position table repeats per
    channel (``[sin h | cos h | sin w | cos w]``, or with the halves swapped as MAE's code
    writes it), or None when the table is neither (the crop size then comes from the options)."""
    t = table.reshape(-1, table.shape[-1])[1:].double()  # row 0: the CLS
    n, dim = t.shape
    if dim % 4:
        return None
    half = dim // 2
    for side in range(math.isqrt(n), 1, -1):
        if n % (side * side) == 0:
            ref = sincos_2d(dim, (side, side)).double()
            swapped = torch.cat([ref[:, half:], ref[:, :half]], dim=1)
            rows = t[: side * side]
            if torch.allclose(rows, ref, atol=1e-3) or torch.allclose(rows, swapped, atol=1e-3):
                return side
    return None


def checkpoint_filter(
    state: dict, metadata: dict | None = None, config_cls: type = CAMAEConfig, **options
) -> tuple[CAMAEConfig, dict]:
    """A CA-MAE state dict -> ``(config, state)`` that :class:`CAMAE` loads strictly.

    - Our own safetensors (``maeprobe_config`` in the metadata, as :mod:`.training` writes):
      the config from the metadata (older option names mapped), every key kept.
    - OpenPhenom's layout (``encoder.vit_backbone.*``, ParallelScalingBlock or standard blocks):
      the architecture from the shapes (width, depth, patch, MLP ratio, heads from the q/k-norm
      width, LayerScale, block type; the crop size and channel slots from the sin-cos position
      table), the ``encoder.*`` keys kept; OpenPhenom's own decoder keys are dropped.

    ``options`` may restate what the weights decide; ``depth`` below the checkpoint's keeps the
    first blocks (and drops our decoder), ``decoder_depth=0`` drops it; ``legacy_bias`` is free.
    """
    found = config_from_metadata(config_cls, metadata, _RENAMES, _upgrade_metadata)
    if found is None:
        found, state = _openphenom_config(state, config_cls, options)
    found["depth"] = count_blocks(state, _BACKBONE + "blocks.")
    state = keep_blocks(
        state, found, options, _BACKBONE + "blocks.", lambda k: k.startswith("mp_decoder.")
    )
    # heads are in the weights only through the parallel block's q/k norms
    free = _FREE + (("num_heads",) if found.get("block") == "standard" else ())
    return settle_config(config_cls, found, options, free=free), state


def _openphenom_config(state: dict, config_cls: type, options: dict) -> tuple[dict, dict]:
    """The architecture of an OpenPhenom-layout state dict, and its encoder keys."""
    need = _BACKBONE + "patch_embed.proj.weight"
    if need not in state or _BACKBONE + "pos_embed" not in state:
        raise MaeprobeInputError(
            f"not a CA-MAE checkpoint: no {need} (it has e.g. {', '.join(list(state)[:3])})",
            "pass OpenPhenom's model.safetensors or a file saved by maeprobe train (--weights)",
        )
    defaults = config_cls()
    state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    w = state[need]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    b0 = _BACKBONE + "blocks.0."
    found: dict = dict(embed_dim=dim, patch_size=patch)
    if b0 + "in_proj.weight" in state:
        found["block"] = "parallel"
        found["num_heads"] = dim // int(state[b0 + "q_norm.weight"].shape[0])
        found["mlp_ratio"] = int(state[b0 + "mlp_out_proj.weight"].shape[1]) / dim
        has_ls = b0 + "ls.gamma" in state
    elif b0 + "mlp.fc1.weight" in state:
        found["block"] = "standard"  # heads are not stored: the option, else head width 64
        if "num_heads" not in options:
            found["num_heads"] = max(1, dim // 64)
        found["mlp_ratio"] = int(state[b0 + "mlp.fc1.weight"].shape[0]) / dim
        has_ls = b0 + "ls1.gamma" in state
    else:
        raise MaeprobeInputError(
            f"not a CA-MAE checkpoint: no {b0}in_proj.weight or {b0}mlp.fc1.weight",
            "pass OpenPhenom's model.safetensors or a file saved by maeprobe train (--weights)",
        )
    ls_init = options.get("init_values") or defaults.init_values or 1e-4
    found["init_values"] = ls_init if has_ls else None
    table = state[_BACKBONE + "pos_embed"]
    n_pos = int(table.shape[1]) - 1
    side = _sincos_side(table)
    if side is not None:
        found["input_size"] = side * patch
    else:  # not our sin-cos layout: trust the option (or the default crop size)
        side = int(options.get("input_size", defaults.input_size)) // patch
    if side < 1 or n_pos % (side * side):
        raise MaeprobeInputError(
            f"the position table of {n_pos} patches does not fit crops of {side * patch} px",
            "pass the crop size the weights were trained at, e.g. input_size=256",
        )
    found["max_channels"] = n_pos // (side * side)
    return found, state


register_model(
    ModelSpec(
        name="ca-mae",
        summary="channel-agnostic MAE; loads Recursion's OpenPhenom (CA-MAE-S/16) weights",
        channels="1+",
        input_size="256x256",
        embed_dim=384,
        licence="OpenPhenom weights: Recursion non-commercial EULA (not bundled)",
        config=CAMAEConfig,
        model=CAMAE,
        checkpoint_filter=checkpoint_filter,
        hub=("recursionpharma/OpenPhenom", "model.safetensors"),
        weights_hint="OpenPhenom model.safetensors from the Hugging Face hub",
    )
)
