"""Channel-agnostic MAE (CA-MAE): one patch projection shared by all channels, the same 2D
position table repeated for every channel, tokens kept per channel.

The encoder's parameter names and numerics follow Recursion's OpenPhenom checkpoint
(``encoder.vit_backbone.*``: ViT-S/16 at 256x256, ParallelScalingBlock with qk-norm, LayerScale
and the legacy bias layout, no final norm), so its weights load exactly. Written from the
published architecture facts; no OpenPhenom code is used (it is CC BY-NC).

Our own models (the bundled ``default``) add a light decoder under ``mp_decoder.*`` for masked
reconstruction; OpenPhenom's own decoder is not loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_maeprobe.models.base import MaeprobeModel, ModelOutput, patchify, unpatchify
from napari_maeprobe.models.layers import (
    Block,
    ParallelScalingBlock,
    init_weights,
    sincos_1d,
    sincos_2d,
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

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        max_channels: int = 11,
        block: str = "parallel",
        init_values: float | None = 1e-4,
        legacy_bias: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch = patch_size
        self.grid = img_size // patch_size
        self.max_channels = max_channels
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = sincos_2d(embed_dim, (self.grid, self.grid)).repeat(max_channels, 1)
        pos = torch.cat([torch.zeros(1, embed_dim), table])[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        if block == "parallel":
            blocks = [
                ParallelScalingBlock(
                    embed_dim, num_heads, mlp_ratio, True, init_values, legacy_bias
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


class CAMAEEncoder(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.vit_backbone = ChannelAgnosticViT(**kwargs)


class CAMAEDecoder(nn.Module):
    """A light decoder for our own models: visible tokens + mask tokens, spatial sin-cos plus a
    channel-slot sin-cos (so masked tokens of different channels differ), pre-norm blocks, and
    a linear head to the pixels of one patch of one channel."""

    def __init__(
        self, embed_dim: int, dim: int, depth: int, heads: int, patch: int, grid: int, slots: int
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        spatial = sincos_2d(dim, (grid, grid))
        slot = sincos_1d(dim, torch.arange(slots, dtype=torch.float64) * 7.0)
        self.register_buffer("spatial_pos", spatial, persistent=False)
        self.register_buffer("slot_pos", slot, persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """visible (B, n_vis, D) in token order; mask (B, C, L) -> pixels (B, C, L, p*p)."""
        b, c, n = mask.shape
        dim = self.mask_token.shape[-1]
        full = self.mask_token.expand(b, c * n, dim).clone()
        full[~mask.reshape(b, -1)] = self.proj(visible).reshape(-1, dim).to(full.dtype)
        pos = self.spatial_pos[None, :n] + self.slot_pos[:c, None]  # (C, L, dim)
        x = full + pos.reshape(1, c * n, dim).to(full.dtype)
        for blk in self.blocks:
            x, _ = blk(x)
        return self.pred(self.norm(x)).reshape(b, c, n, -1)


class CAMAE(MaeprobeModel):
    """Channel-agnostic MAE: 1 to ``max_channels`` channels at ``img_size`` x ``img_size``.

    ``backbone`` keywords are those of :class:`ChannelAgnosticViT` (its defaults: OpenPhenom's
    ViT-S/16 at 256); ``decoder`` (``dict(dim, depth, heads)``) adds our light decoder.
    """

    channel_agnostic = True

    def __init__(self, decoder: dict | None = None, **backbone) -> None:
        super().__init__()
        self.encoder = CAMAEEncoder(**backbone)
        vit = self.encoder.vit_backbone
        self.patch_size = (vit.patch, vit.patch)
        self.embed_dim = int(vit.cls_token.shape[-1])
        self.img_size = vit.img_size
        self.config = dict(backbone, decoder=decoder)
        self.mp_decoder = (
            CAMAEDecoder(self.embed_dim, decoder["dim"], decoder["depth"], decoder["heads"],
                         vit.patch, vit.grid, vit.max_channels)
            if decoder
            else None
        )  # fmt: skip
        self.has_decoder = decoder is not None

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
        if x.ndim != 4:
            raise ValueError(f"CA-MAE takes (B, C, Y, X) crops, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (vit.img_size, vit.img_size):
            raise ValueError(
                f"CA-MAE takes {vit.img_size}x{vit.img_size} crops, got {tuple(x.shape[-2:])}: "
                "tile larger images"
            )
        if not 1 <= x.shape[1] <= vit.max_channels:
            raise ValueError(f"CA-MAE takes 1 to {vit.max_channels} channels, got {x.shape[1]}")

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
        tok = tok + vit.pos_embed[:, 1 : 1 + c * n].to(tok.dtype)
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
            raise ValueError("this CA-MAE has no decoder: reconstructions are not available")
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
