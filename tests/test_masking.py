"""Masking: determinism, counts, and boundary-guided masking on real crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.boundaries import patch_fractions
from napari_maeprobe.pp.masking import make_mask, n_masked
from napari_maeprobe.pp.preprocessing import cell_crops, normalize
from napari_maeprobe.pp.segmentation import segment


def test_same_seed_same_mask_and_exact_counts():
    a = make_mask("random", (6, 8, 8), 4, 0.75, seed=11)
    b = make_mask("random", (6, 8, 8), 4, 0.75, seed=11)
    c = make_mask("random", (6, 8, 8), 4, 0.75, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.reshape(4, -1).sum(1) == n_masked(384, 0.75)).all()
    assert make_mask("none", (8, 8), 2) is None


def test_explicit_mask_is_checked():
    m = np.zeros((2, 4, 4), bool)
    m[:, 0] = True
    assert torch.equal(make_mask("explicit", (4, 4), 2, explicit=m), torch.from_numpy(m))
    with pytest.raises(MaeprobeInputError, match="patch grid is"):
        make_mask("explicit", (5, 5), 2, explicit=m)


def test_boundary_probabilities_follow_softmax():
    """Gumbel-top-1 draws index i with probability softmax(b / tau)_i."""
    b = torch.tensor([[0.0, 0.2, 0.5, 1.0]])
    tau = 0.5
    counts = np.zeros(4)
    for seed in range(4000):
        counts += make_mask("boundary", (4,), 1, 0.25, tau, b, seed=seed)[0].numpy()
    expected = torch.softmax(b[0] / tau, 0).numpy()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.025)


def boundary_vs_random(seeds: int = 20, tau: float = 0.5) -> dict:
    """Masking statistics on real single-cell crops of the Cell Painting field (96 px crops,
    12 px patches: the default model's grid), rho 0.75."""
    im, _ = load_sample("cellpainting")
    seg = segment(im, "builtin")
    crops = cell_crops(normalize(im.to_numpy()), seg.labels, 96)
    frac = torch.from_numpy(patch_fractions(crops.boundary, (12, 12)))
    on_boundary = frac > 0
    stats = {}
    for kind in ("random", "boundary"):
        masked_b, visible_b, masked_frac = [], [], []
        for seed in range(seeds):
            m = make_mask(kind, (8, 8), len(frac), 0.75, tau, frac, seed=seed)
            masked_b.append((m & on_boundary).sum() / on_boundary.sum())
            visible_b.append((~m & on_boundary).sum() / on_boundary.sum())
            masked_frac.append(frac[m].mean())
        stats[kind] = dict(
            boundary_patches_masked=float(np.mean(masked_b)),
            boundary_patches_visible=float(np.mean(visible_b)),
            mean_boundary_fraction_masked=float(np.mean(masked_frac)),
        )
    return stats


def test_boundary_guided_masks_boundary_patches_more_often():
    s = boundary_vs_random(seeds=10)
    r, b = s["random"], s["boundary"]
    assert r["boundary_patches_masked"] == pytest.approx(0.75, abs=0.02)
    # defaults (rho 0.75, tau 0.5): measured 0.81 of boundary patches masked vs 0.75
    assert b["boundary_patches_masked"] > r["boundary_patches_masked"] + 0.04
    assert b["mean_boundary_fraction_masked"] > 1.08 * r["mean_boundary_fraction_masked"]
    # a lower temperature sharpens it: at tau 0.1, 3.6x fewer boundary patches stay visible
    sharp = boundary_vs_random(seeds=10, tau=0.1)["boundary"]
    assert r["boundary_patches_visible"] / sharp["boundary_patches_visible"] > 3.0
