"""Do per-channel embeddings carry per-channel information, or do they describe the cell?

A channel-agnostic model embeds each channel of a cell as its own row, but its tokens attend to
every channel, so each channel's embedding can end up describing the whole cell: two channels of
one cell then look more alike than the same marker in two cells, and "clusters follow the
channel" or "follow the cell" means something other than it seems. :func:`channel_content`
measures it on the channel level's rows: the mean cosine similarity (of centred embeddings) of

- two channels of the same cell (``same_cell``),
- the same channel of two different cells (``same_channel``),
- two different channels of two different cells (``unrelated``, the floor),

and the channel's share of what is above the floor,
``(same_channel - unrelated) / ((same_channel - unrelated) + (same_cell - unrelated))``: near 1
the embedding is about its channel, near 0 about its cell. Rows flagged ``channel_empty`` (the
channel is blank in the cell's crop) are left out and counted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _unit(X: np.ndarray) -> np.ndarray:
    X = X - X.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norm > 0, norm, 1)


def _pair_sums(U: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Sum of ``U[i] . U[j]`` over ordered pairs i != j in the same group, and their count:
    per group ``|sum U|^2 - sum |U|^2`` (exact, no sampling)."""
    n_groups = int(groups.max()) + 1
    sums = np.zeros((n_groups, U.shape[1]), dtype=np.float64)
    np.add.at(sums, groups, U)
    sizes = np.bincount(groups, minlength=n_groups).astype(np.float64)
    self_dot = np.bincount(groups, weights=np.sum(U * U, axis=1), minlength=n_groups)
    total = float(np.sum(np.sum(sums * sums, axis=1) - self_dot))
    return total, int(np.sum(sizes * (sizes - 1)))


def channel_content(X: np.ndarray, obs: pd.DataFrame) -> dict | None:
    """Same-cell, same-channel and unrelated cosine similarities of channel-level rows and the
    channel's share (see the module docstring), over every pair of rows (exact); None when
    there are fewer than 2 channels or 2 cells with embeddings."""
    X = np.asarray(X, dtype=np.float64)
    ok = np.isfinite(X).all(axis=1)
    n_empty = 0
    if "channel_empty" in obs:
        empty = obs["channel_empty"].astype("boolean").fillna(False).to_numpy(dtype=bool)
        n_empty = int((empty & ok).sum())
        ok &= ~empty
    rows = np.flatnonzero(ok)
    sub = obs.iloc[rows]
    cell = pd.factorize(sub["image"].astype(str) + "\x00" + sub["cell_id"].astype(str))[0]
    channel = pd.factorize(sub["channel"].astype(str))[0]
    if len(rows) < 3 or cell.max() < 1 or channel.max() < 1:
        return None
    U = _unit(X[rows])
    s_all = U.sum(axis=0)
    all_sum = float(s_all @ s_all - np.sum(U * U))
    n = len(rows)
    cell_sum, cell_pairs = _pair_sums(U, cell)
    chan_sum, chan_pairs = _pair_sums(U, channel)  # one row per cell and channel: other cells
    other_pairs = n * (n - 1) - cell_pairs - chan_pairs
    if not cell_pairs or not chan_pairs or other_pairs <= 0:
        return None
    same_cell = cell_sum / cell_pairs
    same_channel = chan_sum / chan_pairs
    unrelated = (all_sum - cell_sum - chan_sum) / other_pairs
    above_cell = max(same_cell - unrelated, 0.0)
    above_channel = max(same_channel - unrelated, 0.0)
    total = above_cell + above_channel
    share = above_channel / total if total > 0 else float("nan")
    return {
        "same_cell": float(same_cell), "same_channel": float(same_channel),
        "unrelated": float(unrelated), "channel_share": float(share),
        "cells": int(cell.max() + 1), "channels": int(channel.max() + 1), "rows": int(n),
        "empty_rows_left_out": n_empty,
        "line": content_line(same_cell, same_channel, unrelated, share, n_empty),
    }  # fmt: skip


def content_line(
    same_cell: float, same_channel: float, unrelated: float, share: float, n_empty: int = 0
) -> str:
    """One line for a biologist: what the per-channel embeddings describe."""
    sims = (f"two channels of one cell: cosine {same_cell:.2f}; one channel of two cells: "
            f"{same_channel:.2f}; unrelated rows: {unrelated:.2f}")  # fmt: skip
    if not np.isfinite(share):
        what = "per-channel embeddings are no more alike within a cell or a channel than at random"
    elif share < 1 / 3:
        what = ("per-channel embeddings mostly describe the cell, not the channel (channel share "
                f"{share:.2f}): read channel-level clusters as clusters of cells")  # fmt: skip
    elif share > 2 / 3:
        what = f"per-channel embeddings carry per-channel information (channel share {share:.2f})"
    else:
        what = f"per-channel embeddings mix the cell and the channel (channel share {share:.2f})"
    empty = f"; {n_empty} rows of blank channels left out" if n_empty else ""
    return f"{what} ({sims}{empty})"
