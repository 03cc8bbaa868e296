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
be set with the ``heads`` / ``decoder_heads`` options.

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

import re

import torch
import torch.nn.functional as F
from torch import nn

from napari_maeprobe.models.base import MaeprobeModel, ModelOutput, patchify, unpatchify
from napari_maeprobe.models.layers import Block, Mlp, init_weights, sincos_2d
from napari_maeprobe.models.registry import ModelSpec, load_strict, register_model

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
        raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
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
        raise ValueError(
            f"the mask has shape {tuple(mask.shape)}, the model's patch grid is {(batch, *grid)}"
        )
    return mask.to(torch.bool).reshape(batch, -1)


def _infer_depth(state: dict, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise KeyError(f"layers under {prefix!r} are not numbered 0..N-1: {sorted(ids)[:10]}")
    return len(ids)


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


class ViTMAE(MaeprobeModel):
    """2D ViT-MAE with N input channels; parameter names follow the MAE / timm layout."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        decoder: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_dim: int = 2048,
        eps: float = 1e-12,
        adapt: str = "zero",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"img_size {img_size} is not a multiple of the patch size {patch_size}"
            )
        self.patch_size = (patch_size, patch_size)
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.img_size = img_size
        self.has_decoder = decoder
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, heads=heads, mlp_dim=mlp_dim, decoder=decoder, decoder_dim=decoder_dim,
            decoder_depth=decoder_depth, decoder_heads=decoder_heads,
            decoder_mlp_dim=decoder_mlp_dim, eps=eps, adapt=adapt,
        )  # fmt: skip
        grid = (img_size // patch_size,) * 2
        mean, std = channel_stats(in_chans)
        self.register_buffer("pix_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pix_std", std.view(1, -1, 1, 1), persistent=False)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", mae_sincos_2d(embed_dim, grid))
        self.blocks = nn.ModuleList(
            [make_block(embed_dim, heads, mlp_dim, eps) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        if decoder:
            self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            self.register_buffer("decoder_pos_embed", mae_sincos_2d(decoder_dim, grid))
            self.decoder_blocks = nn.ModuleList(
                [make_block(decoder_dim, decoder_heads, decoder_mlp_dim, eps)
                 for _ in range(decoder_depth)]
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
            raise ValueError(f"ViT-MAE takes (B, C, Y, X) crops, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"this ViT-MAE was built for {self.in_chans} channels, got {x.shape[1]}: "
                f"create it with in_chans={x.shape[1]}"
            )
        return self.token_grid(tuple(x.shape[1:]))  # raises unless a multiple of the patch

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
                raise ValueError(
                    "every crop in a batch must have the same number of masked patches"
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
            raise ValueError(
                "this ViT-MAE has no decoder (encoder-only weights): reconstructions are not "
                "available"
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
            raise KeyError(f"unexpected keys in a ViT-MAE checkpoint: {unknown[:5]}")
        return out, "hf"
    if "patch_embed.proj.weight" in state:
        return {k: v for k, v in state.items() if not _IGNORED.match(k)}, "timm"
    raise KeyError(
        "not a ViT-MAE checkpoint: neither vit.embeddings.patch_embeddings.projection.weight "
        "(Hugging Face) nor patch_embed.proj.weight (timm / MAE) is in it"
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


def build_vitmae(
    state: dict | None,
    metadata: dict,
    in_chans: int = 3,
    adapt: str = "zero",
    img_size: int = 224,
    heads: int | None = None,
    decoder_heads: int | None = None,
    **arch,
) -> ViTMAE:
    """ViT-MAE from a Hugging Face or timm/MAE checkpoint, or the ViT-B/16 architecture with
    random weights (``state=None``; ``arch`` may then shrink it: ``patch_size``,
    ``hidden_size``, ``depth``, ``mlp_dim``, ``decoder``, ``decoder_dim``, ``decoder_depth``,
    ``decoder_mlp_dim``; with a checkpoint these are read from its shapes and ignored)."""
    if adapt not in ("zero", "tile"):
        raise ValueError(f"adapt must be 'zero' or 'tile', got {adapt!r}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    known = {"patch_size", "hidden_size", "depth", "mlp_dim", "decoder", "decoder_dim",
             "decoder_depth", "decoder_mlp_dim", "eps"}  # fmt: skip
    bad = set(arch) - known
    if bad:
        raise ValueError(f"unknown ViT-MAE options {sorted(bad)}")
    if state is None:
        dim = arch.pop("hidden_size", 768)
        arch.setdefault("mlp_dim", 4 * dim)
        ddim = arch.get("decoder_dim", 512)
        arch.setdefault("decoder_mlp_dim", 4 * ddim)
        model = ViTMAE(
            img_size=img_size, in_chans=in_chans, embed_dim=dim,
            heads=heads or _DEFAULT_HEADS.get(dim, max(1, dim // 64)),
            decoder_heads=decoder_heads or 16, adapt=adapt, **arch,
        )  # fmt: skip
        model.reset_parameters()
        return model
    sd, layout = vitmae_to_internal(state)
    w = sd["patch_embed.proj.weight"]
    dim, src_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    if src_chans != in_chans:
        if src_chans != 3:
            raise ValueError(
                f"the checkpoint has {src_chans} input channels; only RGB (3) weights are adapted "
                f"to {in_chans}"
            )
        sd["patch_embed.proj.weight"] = adapt_patch_weight(w, in_chans, adapt)
    has_decoder = "decoder_pred.weight" in sd
    cfg = dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=dim,
        depth=_infer_depth(sd, "blocks."), heads=heads or _DEFAULT_HEADS.get(dim, dim // 64),
        mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]), decoder=has_decoder,
        eps=1e-12 if layout == "hf" else 1e-6, adapt=adapt,
    )  # fmt: skip
    if has_decoder:
        for k in ("decoder_pred.weight", "decoder_pred.bias"):
            rows = sd[k].shape[0]
            if rows != patch * patch * in_chans:
                if rows != patch * patch * 3:
                    raise ValueError(f"{k} has {rows} rows, not {patch}*{patch}*3")
                sd[k] = adapt_pred_rows(sd[k], in_chans, adapt)
        ddim = int(sd["decoder_embed.weight"].shape[0])
        cfg.update(
            decoder_dim=ddim, decoder_depth=_infer_depth(sd, "decoder_blocks."),
            decoder_heads=decoder_heads or 16,
            decoder_mlp_dim=int(sd["decoder_blocks.0.mlp.fc1.weight"].shape[0]),
        )  # fmt: skip
    model = ViTMAE(**cfg)
    # the fixed sin-cos tables: the checkpoint's own at its grid, regenerated for another size
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd and sd[key].shape != getattr(model, key).shape:
            sd[key] = getattr(model, key).clone()
    load_strict(model, sd)
    return model


register_model(
    ModelSpec(
        name="vit-mae",
        summary="ViT-MAE-B/16 (He et al.), RGB weights adapted to N channels; with decoder",
        channels="1+",
        input_size="224x224 (any multiple of 16)",
        embed_dim=768,
        licence="facebook/vit-mae-base: CC BY-NC 4.0 at source (MAE repo); not bundled",
        build=build_vitmae,
        hub=("facebook/vit-mae-base", "model.safetensors"),
        weights_hint="facebook/vit-mae-base model.safetensors, or a timm/MAE ViT-B/16 checkpoint",
        has_decoder=True,
    )
)
