"""The one interface every model implements, and what it returns."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from napari_maeprobe.errors import MaeprobeInputError


@dataclass
class ModelOutput:
    """What a model returns for a batch of crops ``(B, C, [Z,] Y, X)``.

    - ``global_embedding`` (B, D): mean of the visible patch tokens.
    - ``channel_embeddings`` (B, C, D): per-channel means, for models that keep channels apart.
    - ``patch_embeddings`` (B, [C,] [gz,] gy, gx, D): last-layer tokens on the patch grid
      (NaN where a patch was masked).
    - ``attention`` (B, heads, [C,] [gz,] gy, gx): last-layer CLS-to-patch attention, when asked.
    - ``reconstruction`` (B, C, [Z,] Y, X): masked reconstruction with the visible patches
      pasted back, for models with a decoder, when asked.
    - ``mask`` (B, *grid) bool, True where a patch was masked (``None`` without masking).
    """

    global_embedding: torch.Tensor
    channel_embeddings: torch.Tensor | None
    patch_embeddings: torch.Tensor
    attention: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def attention_mean(self) -> torch.Tensor | None:
        """Attention averaged over heads: (B, [C,] [gz,] gy, gx)."""
        return None if self.attention is None else self.attention.mean(dim=1)


class MaeprobeModel(nn.Module):
    """Base class: a model maps preprocessed crops (and an optional mask) to :class:`ModelOutput`.

    Subclasses are built from their config dataclass (kept as ``config``: the options with the
    shared names ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``patch_size``,
    ``input_size``), set ``patch_size`` (``(py, px)`` or ``(pz, py, px)``), ``input_size`` (the
    crop size they are built for), ``channel_agnostic`` (tokens per channel) and ``embed_dim``,
    and implement :meth:`forward`.
    """

    patch_size: tuple[int, ...] = (16, 16)
    input_size: tuple[int, ...] = ()
    channel_agnostic: bool = False
    embed_dim: int = 0
    has_decoder: bool = False
    config = None

    def token_grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the mask for one input of ``shape`` (C, [Z,] Y, X): ([C,] [gz,] gy, gx)."""
        spatial = shape[1:]
        if len(spatial) != len(self.patch_size):
            raise MaeprobeInputError(
                f"{type(self).__name__} takes {len(self.patch_size)}D crops, got shape {shape}",
                "project z-stacks for 2D models (--z max); keep them for 3D ones (--z keep)",
            )
        grid = []
        for s, p in zip(spatial, self.patch_size):
            if s % p:
                raise MaeprobeInputError(
                    f"crop size {tuple(spatial)} is not a multiple of {self.patch_size}",
                    "use a crop size that is a multiple of the patch size (--crop-size)",
                )
            grid.append(s // p)
        return ((shape[0],) if self.channel_agnostic else ()) + tuple(grid)

    @abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention: bool = False,
        reconstruction: bool = False,
    ) -> ModelOutput:
        """Embed ``x`` (B, C, [Z,] Y, X); ``mask`` is (B, *token_grid) bool, True = masked."""


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, [Z,] Y, X) -> (B, C, [gz,] gy, gx, prod(patch)): pixels of each patch, per channel."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    shape = [b, c]
    for s, p in zip(spatial, patch):
        shape += [s // p, p]
    x = x.reshape(shape)
    nd = len(patch)
    grid_axes = [2 + 2 * i for i in range(nd)]
    patch_axes = [3 + 2 * i for i in range(nd)]
    x = x.permute(0, 1, *grid_axes, *patch_axes)
    return x.reshape(b, c, *[s // p for s, p in zip(spatial, patch)], -1)


def unpatchify(tokens: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c = tokens.shape[:2]
    nd = len(patch)
    grid = tokens.shape[2 : 2 + nd]
    x = tokens.reshape(b, c, *grid, *patch)
    order = [0, 1]
    for i in range(nd):
        order += [2 + i, 2 + nd + i]
    x = x.permute(*order)
    return x.reshape(b, c, *[g * p for g, p in zip(grid, patch)])
