"""Channel level, honestly: is a per-channel embedding about its channel or its cell (issue 11,
item 5)? Checked against every pair of rows of the bundled IMC store, computed directly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_maeprobe.embed.store import EmbeddingStore
from napari_maeprobe.table import read_level
from napari_maeprobe.tl.channel_content import channel_content, content_line


@pytest.fixture(scope="module")
def channel_level(sample_dir):
    return read_level(EmbeddingStore(sample_dir / "embeddings" / "imc_default.zarr"), "channel")


def _brute_force(X: np.ndarray, obs: pd.DataFrame) -> tuple[float, float, float]:
    X = X - X.mean(axis=0)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = U @ U.T
    cell = (obs["image"].astype(str) + "/" + obs["cell_id"].astype(str)).to_numpy()
    ch = obs["channel"].astype(str).to_numpy()
    same_cell = cell[:, None] == cell[None, :]
    same_ch = ch[:, None] == ch[None, :]
    off = ~np.eye(len(U), dtype=bool)
    return (S[same_cell & off].mean(), S[same_ch & ~same_cell].mean(),
            S[~same_cell & ~same_ch].mean())  # fmt: skip


def test_similarities_equal_every_pair_computed_directly(channel_level):
    X = np.asarray(channel_level.X, dtype=np.float64)
    obs = channel_level.obs.reset_index(drop=True)
    keep = np.flatnonzero(np.isfinite(X).all(axis=1))[:1500]  # a direct n x n check
    got = channel_content(X[keep], obs.iloc[keep])
    want = _brute_force(X[keep], obs.iloc[keep])
    assert got["same_cell"] == pytest.approx(want[0], abs=1e-9)
    assert got["same_channel"] == pytest.approx(want[1], abs=1e-9)
    assert got["unrelated"] == pytest.approx(want[2], abs=1e-9)
    share = (want[1] - want[2]) / ((want[1] - want[2]) + (want[0] - want[2]))
    assert got["channel_share"] == pytest.approx(share, abs=1e-9)
    assert got["line"] == content_line(*want, share)


def test_blank_channels_are_left_out_and_counted(channel_level):
    X = np.asarray(channel_level.X, dtype=np.float64)
    obs = channel_level.obs.reset_index(drop=True).copy()
    first = obs["channel"].astype(str) == str(obs["channel"].iloc[0])
    obs["channel_empty"] = pd.array(first.to_numpy(), dtype="boolean")
    got = channel_content(X, obs)
    assert got["empty_rows_left_out"] == int(first.sum())
    assert got["channels"] == obs["channel"].nunique() - 1
    assert "rows of blank channels left out" in got["line"]


def test_planted_cell_only_embeddings_are_read_as_about_the_cell(channel_level):
    """Every channel of a cell given its cell's (real, global-like) vector plus small noise:
    the share must be near 0; the same vector per channel instead: near 1."""
    obs = channel_level.obs.reset_index(drop=True)
    X = np.asarray(channel_level.X, dtype=np.float64)
    rng = np.random.default_rng(0)
    cell = pd.factorize(obs["image"].astype(str) + "/" + obs["cell_id"].astype(str))[0]
    chan = pd.factorize(obs["channel"].astype(str))[0]
    base = X[np.isfinite(X).all(axis=1)]
    by_cell = base[rng.integers(0, len(base), cell.max() + 1)][cell]
    by_chan = base[rng.integers(0, len(base), chan.max() + 1)][chan]
    noise = rng.normal(0, 0.05 * base.std(), X.shape)
    assert channel_content(by_cell + noise, obs)["channel_share"] < 0.1
    assert channel_content(by_chan + noise, obs)["channel_share"] > 0.9
    assert "describe the cell" in channel_content(by_cell + noise, obs)["line"]
