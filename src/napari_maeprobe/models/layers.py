"""Transformer building blocks with the parameter names of the checkpoints we load.

Written for this package (no timm dependency: timm pulls a CUDA torchvision). Two block types:
- :class:`Block`: the standard pre-norm ViT block (timm / MAE key names ``norm1``, ``attn.qkv``,
  ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, optional ``ls1.gamma``/``ls2.gamma``).
- :class:`ParallelScalingBlock`: attention and MLP in parallel from one fused input projection
  (OpenPhenom's key names ``in_norm``, ``in_proj``, ``mlp_bias``, ``q_norm``, ``k_norm``,
  ``attn_out_proj``, ``mlp_out_proj``, ``ls.gamma``), with the legacy bias layout that
  OpenPhenom was trained with (timm < 1.0.25) or the corrected one.

Attention runs fused (``scaled_dot_product_attention``) unless the caller asks for the maps;
only then is the softmax materialised, and only in the blocks that are asked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """Per-channel residual scaling (parameter ``gamma``, as in timm and OpenPhenom)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over (B, heads, N, d); returns the output and, when asked,
    the attention probabilities (B, heads, N, N)."""
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v), None
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return probs @ v, probs


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out, probs = attention(self.q_norm(q), self.k_norm(k), v, need_weights)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), probs


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        y, probs = self.attn(self.norm1(x), need_weights)
        x = x + self.ls1(y)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, probs


class ParallelScalingBlock(nn.Module):
    """Parallel attention + MLP block (ViT-22B style) with OpenPhenom's parameter names.

    ``in_proj`` produces ``[mlp_hidden | q | k | v]``. Without a qkv bias the only bias is the
    trainable ``mlp_bias``. ``legacy_bias=True`` reproduces how timm < 1.0.25 applied it: the
    bias vector ``[zeros(3*dim) | mlp_bias]`` was added over that output *as if* it were laid
    out ``[q | k | v | mlp]``, so ``mlp_bias`` lands on the last ``dim`` MLP units and on q, k,
    v. OpenPhenom's weights were trained that way and only reproduce its embeddings with it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        init_values: float | None = 1e-4,
        legacy_bias: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dim = dim
        self.mlp_hidden = round(dim * mlp_ratio)
        self.legacy_bias = legacy_bias
        self.in_norm = nn.LayerNorm(dim, eps=eps)
        self.in_proj = nn.Linear(dim, self.mlp_hidden + 3 * dim, bias=False)
        self.mlp_bias = nn.Parameter(torch.zeros(self.mlp_hidden))
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.attn_out_proj = nn.Linear(dim, dim)
        self.mlp_out_proj = nn.Linear(self.mlp_hidden, dim)
        self.ls = LayerScale(dim, init_values) if init_values else nn.Identity()

    def in_bias(self) -> torch.Tensor:
        zeros = self.mlp_bias.new_zeros(3 * self.dim)
        if self.legacy_bias:
            return torch.cat((zeros, self.mlp_bias))
        return torch.cat((self.mlp_bias, zeros))

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        b, n, c = x.shape
        y = F.linear(self.in_norm(x), self.in_proj.weight, self.in_bias())
        x_mlp, q, k, v = torch.split(y, [self.mlp_hidden, c, c, c], dim=-1)
        q = self.q_norm(q.view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out, probs = attention(q, k, v, need_weights)
        x_attn = self.attn_out_proj(out.transpose(1, 2).reshape(b, n, c))
        x_mlp = self.mlp_out_proj(F.gelu(x_mlp))
        return x + self.ls(x_attn + x_mlp), probs


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """``[sin | cos]`` embedding of ``positions`` (any shape) into ``dim`` features."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega
    out = positions.reshape(-1, 1).double() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position table ``(gy*gx, dim)`` laid out ``[sin h|cos h|sin w|cos w]``."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2D sin-cos positions")
    gh, gw = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )
    return torch.cat([sincos_1d(dim // 2, gh), sincos_1d(dim // 2, gw)], dim=1)


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linears and zero biases, the MAE initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = [
    "Attention",
    "Block",
    "LayerScale",
    "Mlp",
    "ParallelScalingBlock",
    "attention",
    "init_weights",
    "sincos_1d",
    "sincos_2d",
]
