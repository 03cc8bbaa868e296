"""Which patches a masked autoencoder hides: none, random at a ratio, boundary-guided, or given.

Boundary-guided masking (OrgBoundMAE) draws the masked patches without replacement with
probability softmax(boundary_fraction / tau). The Gumbel-top-k trick does exactly that: add
Gumbel(0, 1) noise to the logits and mask the k largest. Random masking is the same with equal
logits. Every draw comes from an explicit seed: same seed, same mask.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from napari_maeprobe.errors import MaeprobeInputError

MaskKind = Literal["none", "random", "boundary", "explicit"]


def n_masked(n_patches: int, ratio: float) -> int:
    """How many of ``n_patches`` a ``ratio`` masks (at least one patch stays visible)."""
    if not 0.0 <= ratio < 1.0:
        raise MaeprobeInputError(f"mask ratio {ratio} is outside [0, 1)", "use e.g. 0.75")
    return min(int(round(n_patches * ratio)), n_patches - 1)


def gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of ``k`` entries per row drawn without replacement ~ softmax(logits)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-12)))
    scores = logits.double() + gumbel
    idx = scores.topk(k, dim=-1).indices
    out = torch.zeros(logits.shape, dtype=torch.bool)
    out.scatter_(-1, idx, True)
    return out


def make_mask(
    kind: MaskKind,
    grid: tuple[int, ...],
    batch: int,
    ratio: float = 0.75,
    tau: float = 0.5,
    boundary: torch.Tensor | np.ndarray | None = None,
    explicit: torch.Tensor | np.ndarray | None = None,
    seed: int = 0,
) -> torch.Tensor | None:
    """A (batch, *grid) boolean mask, True = masked; ``None`` for ``kind == "none"``.

    ``boundary`` holds each patch's boundary fraction, shaped (batch, *grid) or (batch, *spatial
    grid) for channel-agnostic grids (the same fraction then applies to every channel's patch).
    """
    if kind == "none":
        return None
    if kind == "explicit":
        if explicit is None:
            raise MaeprobeInputError("explicit masking needs a mask", "pass explicit=...")
        m = torch.as_tensor(np.asarray(explicit), dtype=torch.bool)
        if m.shape != (batch, *grid):
            raise MaeprobeInputError(
                f"the mask has shape {tuple(m.shape)}, the model's patch grid is {(batch, *grid)}",
                "give one True/False per patch (True = masked)",
            )
        return m
    n = int(np.prod(grid))
    k = n_masked(n, ratio)
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "random":
        logits = torch.zeros(batch, n, dtype=torch.float64)
    elif kind == "boundary":
        if boundary is None:
            raise MaeprobeInputError(
                "boundary-guided masking needs boundary fractions",
                "segment the image first (boundary maps come from the cell masks)",
            )
        if tau <= 0:
            raise MaeprobeInputError(f"tau must be > 0, got {tau}", "use e.g. 0.5")
        b = torch.as_tensor(np.asarray(boundary), dtype=torch.float64)
        if b.shape[1:] != tuple(grid):
            if b.shape[1:] == tuple(grid[1:]):  # spatial fractions for a per-channel grid
                b = b.unsqueeze(1).expand(batch, *grid)
            else:
                raise MaeprobeInputError(
                    f"boundary fractions of shape {tuple(b.shape)} do not fit the grid {grid}",
                    "compute them with the model's patch size",
                )
        logits = b.reshape(batch, n) / tau
    else:
        raise MaeprobeInputError(
            f"unknown masking {kind!r}", "use 'none', 'random', 'boundary' or 'explicit'"
        )
    return gumbel_top_k(logits, k, gen).reshape(batch, *grid)
