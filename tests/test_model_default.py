"""The bundled default model: it loads offline, is fast enough, and has learned something."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.models.builtin import DEFAULT_WEIGHTS
from napari_maeprobe.models.registry import create_model, get_spec, weights_status
from napari_maeprobe.pp.masking import make_mask
from napari_maeprobe.pp.preprocessing import cell_crops, normalize
from napari_maeprobe.pp.segmentation import segment


@pytest.fixture(scope="module")
def cellpainting_crops() -> torch.Tensor:
    im, _ = load_sample("cellpainting")
    seg = segment(im, "builtin")
    return torch.from_numpy(cell_crops(normalize(im.to_numpy()), seg.labels, 96).crops[:24])


def test_bundled_weights_are_small_and_documented():
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20
    assert weights_status(get_spec("default"))[0]
    from safetensors import safe_open

    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        info = json.loads(f.metadata()["maeprobe_info"])
    assert info["command"].startswith("maeprobe train")  # how to reproduce them
    assert any(n.startswith("alsf_cellpainting_6ch") for n in info["images"])


def test_reconstructs_masked_patches_of_real_cells(cellpainting_crops):
    x = cellpainting_crops
    trained = create_model("default")
    untrained = create_model("default", random_init=True)
    assert len(trained.weights_sha256) == 64
    mask = make_mask("random", trained.token_grid(tuple(x.shape[1:])), len(x), 0.75, seed=0)
    with torch.no_grad():
        _, good = trained.loss(x, mask, fft_weight=0.0)
        _, bad = untrained.loss(x, mask, fft_weight=0.0)
    # masked-patch MSE in standardised intensity: predicting the mean scores about 1.0
    assert good["mse"] < 0.6 < 1.2 < bad["mse"]  # measured 0.34 and 1.83


def test_outputs_and_reconstruction(cellpainting_crops):
    x = cellpainting_crops[:4]
    model = create_model("default")
    mask = make_mask(
        "boundary",
        model.token_grid(tuple(x.shape[1:])),
        4,
        0.75,
        0.5,
        boundary=np.full((4, 8, 8), 0.1),
        seed=1,
    )
    with torch.no_grad():
        out = model(x, mask, attention=True, reconstruction=True)
    assert out.global_embedding.shape == (4, 144)
    assert out.channel_embeddings.shape == (4, 6, 144)
    assert out.attention.shape == (4, 4, 6, 8, 8)
    assert out.reconstruction.shape == x.shape
    assert torch.isfinite(out.reconstruction).all()
