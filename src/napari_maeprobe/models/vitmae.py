"""ViT-MAE (He et al. 2022) for N-channel 2D crops; loads ``facebook/vit-mae-base``-style weights.

Checkpoint layouts that load (all converted to one internal layout, the MAE / timm names):

- Hugging Face ``ViTMAEForPreTraining`` files: ``vit.embeddings.*``,
  ``vit.encoder.layer.N.attention.attention.{query,key,value}``, ``...attention.output.dense``,
  ``...intermediate.dense``, ``...output.dense``, ``...layernorm_{before,after}``,
  ``vit.layernorm``, ``decoder.decoder_{embed,norm,pred}``, ``decoder.mask_token``,
  ``decoder.decoder_pos_embed`` and the decoder layers under either
  ``decoder.decoder_layers.N.*`` (transformers v4) or ``decoder.decoder_encoder.layer.N.*``
  (what transformers 5.x ``save_pretrained`` writes: its reverse key renaming turns
  ``decoder_layers.`` into ``decoder_encoder.layer.``). A ``torch.save(model.state_dict())`` of
  a transformers 5.x model (``vit.layers.N.attention.q_proj``, ``...mlp.fc1``) loads too.
  Layer norms use eps 1e-12, as in transformers.
- timm / original MAE files: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm`` (possibly wrapped in
  ``{'model': ...}``; the loader unwraps it). Encoder only, unless the file also holds the
  original MAE decoder (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
  ``decoder_blocks.N``, ``decoder_norm``, ``decoder_pred``). Layer norms use eps 1e-6.

Numbers of attention heads are not stored in a state dict: they default to the published
models' (head dim 64 in the encoder, except ViT-H's 16 heads; 16 heads in the decoder) and can
be set with the ``num_heads`` / ``decoder_num_heads`` options.

**Options** (:class:`ViTMAEConfig`): the shared ``input_size``, ``patch_size``, ``embed_dim``,
``depth``, ``num_heads``, ``mlp_ratio``, the ``decoder_*`` ones (``decoder_depth=0``: encoder
only), ``in_chans``, ``adapt`` and the layer-norm ``eps``. :func:`checkpoint_filter` maps any of
the layouts below to a config and our key names.

**Channels.** Pretrained weights are RGB. For ``in_chans=N != 3`` the patch projection is
adapted by hand: ``adapt="zero"`` copies the RGB filters into channels 0-2 and zeroes the rest
(the extra channels are then ignored until the model is fine-tuned); ``adapt="tile"`` follows
timm's ``adapt_input_conv``: the RGB filters repeated cyclically over the N channels and *all*
scaled by 3/N. For N < 3 both modes use timm's rule (N=1: sum of the RGB filters; N=2: the R
and G filters times 3/2). The decoder's ``decoder_pred`` rows follow the Hugging Face patch
layout, channel fastest within a patch (row ``(p*P + q)*C + c``): rows of channels 0-2 are
copied; the rows of extra channels are zero ("zero": the prediction is then the channel's
normalisation mean) or copies of channel ``c % 3`` ("tile"); N=1 takes the mean of the RGB rows,
N=2 the R and G rows.

**Normalisation.** Inputs are crops in [0, 1] (the pipeline's percentile normalisation). Inside
``forward`` channel c is standardised with ImageNet's mean/std of R, G, B for c < 3 and with the
average of the three (mean 0.449, std 0.226) for the extra channels (and for N=1).
Reconstructions are mapped back to that [0, 1] scale. Weights trained with ``norm_pix_loss``
predict per-patch normalised pixels; their reconstructions are not meaningful intensities.

**Positions.** The fixed 2D sin-cos table of the checkpoint is used at its own grid; any other
crop size (a multiple of the patch size) gets a freshly generated sin-cos table in the same
layout (transformers would interpolate the table bicubically instead).

**Masking** is explicit and deterministic: the caller's mask (True = masked, the same number of
masked patches in every crop) removes patches before the encoder; no mask keeps every token in
order. There is no random noise anywhere (transformers' ViTMAE shuffles tokens randomly even at
mask ratio 0 unless given ``noise``).

Written for this package from the MAE paper and the checkpoint layouts; no MAE / timm /
transformers code is copied.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.models.base import MaeprobeModel, ModelOutput, patchify, unpatchify
from napari_maeprobe.models.layers import Block, Mlp, init_weights, sincos_2d
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------
# helpers shared with dinov2.py


def channel_stats(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation mean and std for ``n`` channels: ImageNet R, G, B for channels 0-2, the
    average of the three for further channels and for a single channel."""
    avg_m = sum(IMAGENET_MEAN) / 3
    avg_s = sum(IMAGENET_STD) / 3
    if n == 1:
        return torch.tensor([avg_m]), torch.tensor([avg_s])
    mean = [IMAGENET_MEAN[c] if c < 3 else avg_m for c in range(n)]
    std = [IMAGENET_STD[c] if c < 3 else avg_s for c in range(n)]
    return torch.tensor(mean), torch.tensor(std)


def make_block(dim: int, heads: int, hidden: int, eps: float, init_values=None) -> Block:
    """A pre-norm :class:`Block` with an exact MLP width and layer-norm eps."""
    if dim % heads:
        raise MaeprobeInputError(
            f"embedding dim {dim} is not divisible by {heads} heads",
            "pass a num_heads that divides embed_dim (decoder_num_heads: decoder_embed_dim)",
        )
    blk = Block(dim, heads, mlp_ratio=hidden / dim, qkv_bias=True, init_values=init_values, eps=eps)
    if blk.mlp.fc1.out_features != hidden:
        blk.mlp = Mlp(dim, hidden)
    return blk


# Hugging Face layer sub-names -> our Block's names. The fused ``qkv`` is handled separately.
_HF_LAYER = {
    "attention.output.dense": "attn.proj",  # transformers v4 / on-disk names
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",  # transformers 5.x in-memory names
    "norm1": "norm1",  # DINOv2
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_PARAMS = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}  # DINOv2
_HF_QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}


def convert_hf_layers(
    state: dict[str, torch.Tensor], layer_prefixes: dict[str, str], out: dict[str, torch.Tensor]
) -> set[str]:
    """Rename Hugging Face transformer layers to :class:`Block` keys, fusing q, k, v into
    ``attn.qkv``. ``layer_prefixes`` maps a regex with one ``(\\d+)`` group, matched at the start
    of a key (e.g. ``r"vit\\.encoder\\.layer\\.(\\d+)\\."``), to our prefix with ``{}`` for the
    layer index (e.g. ``"blocks.{}."``). Fills ``out``; returns the keys it used."""
    used: set[str] = set()
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        for pattern, target in layer_prefixes.items():
            m = re.match(pattern, key)
            if not m:
                continue
            prefix = target.format(m.group(1))
            rest = key[m.end() :]
            name, _, kind = rest.rpartition(".")
            if rest in _HF_PARAMS:
                out[prefix + _HF_PARAMS[rest]] = value
            elif name in _HF_QKV:
                qkv.setdefault((prefix, kind), {})[_HF_QKV[name]] = value
            elif name in _HF_LAYER:
                out[prefix + _HF_LAYER[name] + "." + kind] = value
            else:
                continue
            used.add(key)
            break
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {0, 1, 2}:
            raise KeyError(f"incomplete query/key/value for {prefix}attn.qkv.{kind}")
        out[prefix + "attn.qkv." + kind] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return used


def check_mask(
    mask: torch.Tensor, batch: int, grid: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The caller's mask as a (B, prod(grid)) bool tensor; True = masked."""
    mask = torch.as_tensor(mask, device=device)
    if tuple(mask.shape) != (batch, *grid):
        raise MaeprobeInputError(
            f"the mask has shape {tuple(mask.shape)}, the model's patch grid is {(batch, *grid)}",
            "make the mask with model.token_grid(crop shape) (napari_maeprobe.pp.masking)",
        )
    return mask.to(torch.bool).reshape(batch, -1)


# --------------------------------------------------------------------------------------------
# positions


def mae_sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed position table (1, 1 + gy*gx, dim) with a zero CLS row.

    Tokens run row by row; the first half of the features encodes the column (x) and the second
    half the row (y), each ``[sin | cos]``: the layout of the MAE / transformers tables."""
    t = sincos_2d(dim, grid)  # [f(row) | f(col)]
    half = dim // 2
    t = torch.cat([t[:, half:], t[:, :half]], dim=1)
    return torch.cat([torch.zeros(1, dim), t])[None]


# --------------------------------------------------------------------------------------------
# the model


@dataclass
class ViTMAEConfig:
    """Options of a ViT-MAE; the defaults are ViT-MAE-B/16 at 224 with its decoder."""

    input_size: int = 224  # side of the crops the position tables are made for, px
    patch_size: int = 16
    in_chans: int = 3  # RGB weights are adapted to this many channels (see ``adapt``)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8  # 0: no decoder
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    eps: float = 1e-12  # layer-norm eps: 1e-12 as transformers, 1e-6 as timm / MAE
    adapt: str = "zero"  # RGB -> in_chans: "zero" (extra channels zero) or "tile" (timm's)

    def __post_init__(self) -> None:
        self.input_size = square_side(self.input_size, "ViT-MAE")
        check_positive(self, "input_size", "patch_size", "in_chans", "embed_dim", "depth")
        check_positive(self, "num_heads", "decoder_embed_dim", "decoder_num_heads")
        check_choice("adapt", self.adapt, ("zero", "tile"))
        if self.input_size % self.patch_size:
            raise MaeprobeInputError(
                f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}",
                "pass an input_size that is a multiple of patch_size",
            )
        if self.decoder_depth < 0:
            raise MaeprobeInputError(
                f"decoder_depth={self.decoder_depth}", "pass decoder_depth >= 0 (0: no decoder)"
            )
        for name in ("embed_dim", "decoder_embed_dim"):
            if getattr(self, name) % 4:
                raise MaeprobeInputError(
                    f"{name}={getattr(self, name)} is not divisible by 4 (2D sin-cos positions)",
                    f"pass a {name} divisible by 4",
                )


class ViTMAE(MaeprobeModel):
    """2D ViT-MAE with N input channels; parameter names follow the MAE / timm layout.

    Built from a :class:`ViTMAEConfig` and/or its options as keywords."""

    def __init__(self, config: ViTMAEConfig | None = None, **options) -> None:
        super().__init__()
        cfg = config if config is not None else ViTMAEConfig()
        if options:
            cfg = make_config(type(cfg), {**dataclasses.asdict(cfg), **options})
        self.config = cfg
        patch_size, in_chans, embed_dim = cfg.patch_size, cfg.in_chans, cfg.embed_dim
        decoder_dim, eps = cfg.decoder_embed_dim, cfg.eps
        self.patch_size = (patch_size, patch_size)
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.input_size = (cfg.input_size, cfg.input_size)
        self.has_decoder = decoder = cfg.decoder_depth > 0
        grid = (cfg.input_size // patch_size,) * 2
        mean, std = channel_stats(in_chans)
        self.register_buffer("pix_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pix_std", std.view(1, -1, 1, 1), persistent=False)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", mae_sincos_2d(embed_dim, grid))
        mlp_dim = round(embed_dim * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            [make_block(embed_dim, cfg.num_heads, mlp_dim, eps) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        if decoder:
            self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            self.register_buffer("decoder_pos_embed", mae_sincos_2d(decoder_dim, grid))
            decoder_mlp_dim = round(decoder_dim * cfg.decoder_mlp_ratio)
            self.decoder_blocks = nn.ModuleList(
                [make_block(decoder_dim, cfg.decoder_num_heads, decoder_mlp_dim, eps)
                 for _ in range(cfg.decoder_depth)]
            )  # fmt: skip
            self.decoder_norm = nn.LayerNorm(decoder_dim, eps=eps)
            self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self._pos_cache: dict = {}

    def reset_parameters(self) -> None:
        """MAE initialisation (for random-init models)."""
        init_weights(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.has_decoder:
            nn.init.normal_(self.mask_token, std=0.02)

    # ---- pieces

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] crops -> the standardised pixels the network sees (see the module doc)."""
        return (x.float() - self.pix_mean) / self.pix_std

    def _positions(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n = table.shape[1] - 1
        if n == grid[0] * grid[1] and grid[0] == grid[1]:
            return table
        key = (table.shape[-1], grid, table.device, table.dtype)
        if key not in self._pos_cache:
            pos = mae_sincos_2d(table.shape[-1], grid)
            self._pos_cache[key] = pos.to(device=table.device, dtype=table.dtype)
        return self._pos_cache[key]

    def _check(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4:
            raise MaeprobeInputError(
                f"ViT-MAE takes 2D crops (B, C, Y, X), got shape {tuple(x.shape)}",
                "project z-stacks to 2D first (--z max)",
            )
        if x.shape[1] != self.in_chans:
            raise MaeprobeInputError(
                f"this ViT-MAE was built for {self.in_chans} channels, got {x.shape[1]}",
                f"create it with in_chans={x.shape[1]}, or keep {self.in_chans} channels "
                "(--channels)",
            )
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise MaeprobeInputError(
                f"crop size {tuple(x.shape[2:])} is not a multiple of the patch {self.patch_size}",
                f"use a crop size that is a multiple of {self.patch_size[0]} (--crop-size)",
            )
        return self.token_grid(tuple(x.shape[1:]))

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encoder on the visible patches: ``(tokens (B, 1 + n_visible, D) after the final
        norm, CLS first, patches in raster order; last-layer attention probabilities or None;
        flat mask (B, L) or None)``."""
        grid = self._check(x)
        b = x.shape[0]
        proj = self.patch_embed.proj
        z = self.normalize(x).to(proj.weight.dtype)
        tok = proj(z).flatten(2).transpose(1, 2)  # (B, L, D)
        pos = self._positions(self.pos_embed, grid).to(tok.dtype)
        tok = tok + pos[:, 1:]
        flat = None
        if mask is not None:
            flat = check_mask(mask, b, grid, x.device)
            counts = flat.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise MaeprobeInputError(
                    "every crop in a batch must have the same number of masked patches",
                    "mask the same number of patches in every crop (make_mask does)",
                )
            tok = tok[~flat].reshape(b, -1, tok.shape[-1])
        cls = (self.cls_token.to(tok.dtype) + pos[:, :1]).expand(b, -1, -1)
        h = torch.cat([cls, tok], dim=1)
        probs = None
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            h, p = blk(h, need_weights=attention and i == last)
            if p is not None:
                probs = p
        return self.norm(h), probs, flat

    def decode(
        self, h: torch.Tensor, flat: torch.Tensor | None, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Decoder: encoder tokens (B, 1 + n_visible, D) and the flat mask -> pixel predictions
        (B, L, P*P*C) in standardised intensity, Hugging Face layout (channel fastest)."""
        if not self.has_decoder:
            raise MaeprobeInputError(
                "this ViT-MAE has no decoder (encoder-only weights): reconstructions are not "
                "available",
                "embed without reconstructions, or load weights with a decoder (--weights)",
            )
        b = h.shape[0]
        n = grid[0] * grid[1]
        y = self.decoder_embed(h)
        dim = y.shape[-1]
        if flat is None:
            full = y[:, 1:]
        else:
            full = self.mask_token.to(y.dtype).expand(b, n, dim).clone()
            full[~flat] = y[:, 1:].reshape(-1, dim)
        y = torch.cat([y[:, :1], full], dim=1)
        y = y + self._positions(self.decoder_pos_embed, grid).to(y.dtype)
        for blk in self.decoder_blocks:
            y, _ = blk(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]

    def prediction_image(self, pred: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, L, P*P*C) channel-fastest predictions -> (B, C, Y, X) in the input's [0, 1] scale."""
        b = pred.shape[0]
        c = self.in_chans
        tokens = pred.float().reshape(b, grid[0], grid[1], -1, c).permute(0, 4, 1, 2, 3)
        return unpatchify(tokens, self.patch_size) * self.pix_std + self.pix_mean

    # ---- the interface

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention: bool = False,
        reconstruction: bool = False,
    ) -> ModelOutput:
        h, probs, flat = self.encode(x, mask, attention)
        grid = self.token_grid(tuple(x.shape[1:]))
        b, d = x.shape[0], h.shape[-1]
        n = grid[0] * grid[1]
        visible = h[:, 1:].float()
        if flat is None:
            full = visible
        else:
            full = visible.new_full((b, n, d), float("nan"))
            full[~flat] = visible.reshape(-1, d)
        out = ModelOutput(
            global_embedding=visible.mean(dim=1),
            channel_embeddings=None,
            patch_embeddings=full.reshape(b, *grid, d),
            mask=None if flat is None else flat.reshape(b, *grid),
        )
        if probs is not None:
            cls_att = probs[:, :, 0, 1:].float()  # (B, heads, n_visible)
            heads = cls_att.shape[1]
            if flat is None:
                att = cls_att
            else:
                att = cls_att.new_zeros((b, heads, n))
                att.transpose(1, 2)[~flat] = cls_att.transpose(1, 2).reshape(-1, heads)
            out.attention = att.reshape(b, heads, *grid)
        if reconstruction:
            pred = self.prediction_image(self.decode(h, flat, grid), grid)
            if flat is None:
                m = torch.zeros_like(pred)
            else:
                pp = self.patch_size[0] * self.patch_size[1]
                m = flat.reshape(b, 1, *grid, 1).expand(-1, self.in_chans, -1, -1, pp)
                m = unpatchify(m.float(), self.patch_size)
            out.reconstruction = x.float() * (1 - m) + pred * m
            out.extras["prediction"] = pred
        return out

    def loss(
        self, x: torch.Tensor, mask: torch.Tensor, fft_weight: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """MAE loss for fine-tuning: MSE on the masked patches in standardised intensity (no
        norm-pix), optionally mixed with an FFT-magnitude loss: (1 - w) * MSE + w * FFT."""
        h, _, flat = self.encode(x, mask)
        grid = self.token_grid(tuple(x.shape[1:]))
        b, c = x.shape[:2]
        pred = self.decode(h, flat, grid).float()  # (B, L, P*P*C)
        pred = pred.reshape(b, grid[0], grid[1], -1, c).permute(0, 4, 1, 2, 3)
        z = self.normalize(x)
        target = patchify(z, self.patch_size)  # (B, C, gy, gx, P*P)
        m = flat.reshape(b, 1, *grid).float()
        per_patch = ((pred - target) ** 2).mean(dim=(1, -1))  # (B, gy, gx)
        mse = (per_patch * m[:, 0]).sum() / m.sum().clamp_min(1)
        loss, fft = mse, torch.zeros((), device=x.device)
        if fft_weight > 0:
            mm = unpatchify(m[..., None].expand(-1, c, -1, -1, pred.shape[-1]), self.patch_size)
            filled = z * (1 - mm) + unpatchify(pred, self.patch_size) * mm
            fft = F.l1_loss(
                torch.fft.fft2(filled, norm="ortho").abs(), torch.fft.fft2(z, norm="ortho").abs()
            )
            loss = (1 - fft_weight) * mse + fft_weight * fft
        return loss, {"mse": float(mse.detach()), "fft": float(fft.detach())}


# --------------------------------------------------------------------------------------------
# loading


_HF_TOP = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_HF_LAYERS = {
    r"vit\.encoder\.layer\.(\d+)\.": "blocks.{}.",  # v4 and v5 files
    r"vit\.layers\.(\d+)\.": "blocks.{}.",  # v5 in-memory state dict
    r"decoder\.decoder_layers\.(\d+)\.": "decoder_blocks.{}.",  # v4 files, v5 in memory
    r"decoder\.decoder_encoder\.layer\.(\d+)\.": "decoder_blocks.{}.",  # v5 files
}
# classifier heads of timm / fine-tuned checkpoints: not part of the MAE, ignored
_IGNORED = re.compile(r"^(head\.|fc_norm\.|classifier\.)")


def vitmae_to_internal(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported layout -> our key names; returns the dict and ``"hf"`` or ``"timm"``."""
    if "vit.embeddings.patch_embeddings.projection.weight" in state:
        out: dict[str, torch.Tensor] = {}
        used = convert_hf_layers(state, _HF_LAYERS, out)
        for key, value in state.items():
            if key in _HF_TOP:
                out[_HF_TOP[key]] = value
                used.add(key)
        unknown = sorted(k for k in set(state) - used if not _IGNORED.match(k))
        if unknown:
            raise MaeprobeInputError(
                f"unexpected keys in a ViT-MAE checkpoint: {unknown[:5]}",
                "pass a ViTMAE / timm ViT checkpoint (--weights)",
            )
        return out, "hf"
    if "patch_embed.proj.weight" in state:
        return {k: v for k, v in state.items() if not _IGNORED.match(k)}, "timm"
    raise MaeprobeInputError(
        "not a ViT-MAE checkpoint: neither vit.embeddings.patch_embeddings.projection.weight "
        "(Hugging Face) nor patch_embed.proj.weight (timm / MAE) is in it",
        "pass facebook/vit-mae-base's model.safetensors or a timm / MAE ViT file (--weights)",
    )


def adapt_patch_weight(w: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """RGB patch-projection weight (D, 3, P, P) -> (D, n, P, P); see the module doc."""
    if n == 3:
        return w
    if n == 1:
        return w.sum(dim=1, keepdim=True)
    if mode == "tile" or n < 3:
        reps = -(-n // 3)
        return w.repeat(1, reps, 1, 1)[:, :n] * (3.0 / n)
    out = w.new_zeros((w.shape[0], n, *w.shape[2:]))
    out[:, :3] = w
    return out


def adapt_pred_rows(t: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """``decoder_pred`` weight (P*P*3, Dd) or bias (P*P*3,) -> rows for n channels.

    Rows run (p*P + q)*C + c (channel fastest within a patch)."""
    if n == 3:
        return t
    rgb = t.reshape(-1, 3, *t.shape[1:])  # (P*P, 3, ...)
    if n == 1:
        new = rgb.mean(dim=1, keepdim=True)
    elif n == 2:
        new = rgb[:, :2]
    else:
        new = rgb.new_zeros((rgb.shape[0], n, *rgb.shape[2:]))
        new[:, :3] = rgb
        if mode == "tile":
            for c in range(3, n):
                new[:, c] = rgb[:, c % 3]
    return new.reshape(-1, *t.shape[1:])


_DEFAULT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}


def _is_decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def checkpoint_filter(
    state: dict, metadata: dict | None = None, **options
) -> tuple[ViTMAEConfig, dict]:
    """A Hugging Face or timm / MAE ViT-MAE state dict -> ``(config, state)`` in our layout.

    The weights decide ``embed_dim``, ``patch_size``, ``depth``, ``mlp_ratio`` and the decoder's
    width, depth and MLP ratio (an option restating them must agree; ``depth`` below the
    checkpoint's keeps its first blocks and drops the decoder, ``decoder_depth=0`` drops it).
    Free: ``num_heads`` / ``decoder_num_heads`` (not stored; default head width 64 / 16 heads),
    ``in_chans`` with ``adapt`` (RGB weights adapted by hand, see the module doc),
    ``input_size`` (the checkpoint's sin-cos tables at its grid, regenerated for another) and
    ``eps`` (default 1e-12 for Hugging Face files, 1e-6 for timm / MAE ones).
    """
    sd, layout = vitmae_to_internal(state)
    w = sd["patch_embed.proj.weight"]
    dim, src_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    found: dict = dict(
        patch_size=patch, embed_dim=dim, depth=count_blocks(sd, "blocks."),
        mlp_ratio=int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / dim,
        eps=1e-12 if layout == "hf" else 1e-6,
    )  # fmt: skip
    if "num_heads" not in options:  # not in the weights: the published models' heads
        found["num_heads"] = _DEFAULT_HEADS.get(dim, max(1, dim // 64))
    if "decoder_pred.weight" in sd:
        ddim = int(sd["decoder_embed.weight"].shape[0])
        found.update(
            decoder_embed_dim=ddim, decoder_depth=count_blocks(sd, "decoder_blocks."),
            decoder_mlp_ratio=int(sd["decoder_blocks.0.mlp.fc1.weight"].shape[0]) / ddim,
        )  # fmt: skip
        if "decoder_num_heads" not in options:
            found["decoder_num_heads"] = 16
    else:
        found["decoder_depth"] = 0
    sd = keep_blocks(sd, found, options, "blocks.", _is_decoder_key)
    in_chans = options.get("in_chans", src_chans)
    adapt = options.get("adapt", "zero")
    check_choice("adapt", adapt, ("zero", "tile"))
    if in_chans != src_chans:
        if src_chans != 3:
            raise MaeprobeInputError(
                f"the weights have {src_chans} input channels; only RGB (3) weights are "
                f"adapted to in_chans={in_chans}",
                f"pass in_chans={src_chans}, or RGB weights",
            )
        if not isinstance(in_chans, int) or in_chans < 1:
            raise MaeprobeInputError(f"in_chans={in_chans!r}", "pass in_chans >= 1")
        sd["patch_embed.proj.weight"] = adapt_patch_weight(w, in_chans, adapt)
        for k in ("decoder_pred.weight", "decoder_pred.bias"):
            if k in sd:
                rows = sd[k].shape[0]
                if rows != patch * patch * 3:
                    raise MaeprobeInputError(
                        f"{k} has {rows} rows, not {patch}*{patch}*3",
                        "pass a ViT-MAE checkpoint with an RGB decoder (--weights)",
                    )
                sd[k] = adapt_pred_rows(sd[k], in_chans, adapt)
    found["in_chans"] = in_chans
    cfg = settle_config(ViTMAEConfig, found, options, free=("eps", "input_size", "adapt"))
    # the fixed sin-cos tables: the checkpoint's own at its grid, regenerated for another size
    grid = (cfg.input_size // cfg.patch_size,) * 2
    for key, width in (("pos_embed", cfg.embed_dim), ("decoder_pos_embed", cfg.decoder_embed_dim)):
        if key in sd and tuple(sd[key].shape) != (1, 1 + grid[0] * grid[1], width):
            sd[key] = mae_sincos_2d(width, grid)
    return cfg, sd


register_model(
    ModelSpec(
        name="vit-mae",
        summary="ViT-MAE-B/16 (He et al.), RGB weights adapted to N channels; with decoder",
        channels="1+",
        input_size="224x224 (any multiple of 16)",
        embed_dim=768,
        licence="facebook/vit-mae-base: CC BY-NC 4.0 at source (MAE repo); not bundled",
        config=ViTMAEConfig,
        model=ViTMAE,
        checkpoint_filter=checkpoint_filter,
        hub=("facebook/vit-mae-base", "model.safetensors"),
        weights_hint="facebook/vit-mae-base model.safetensors, or a timm/MAE ViT-B/16 checkpoint",
        has_decoder=True,
    )
)
