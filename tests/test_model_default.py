"""The bundled default model: it loads offline, has learned something that carries over to
images it was not trained on, and its options (``depth``, ...) take effect on its weights."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.reading import read_images
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.models.builtin import DEFAULT_WEIGHTS, DefaultConfig, checkpoint_filter
from napari_maeprobe.models.camae import CAMAE
from napari_maeprobe.models.registry import create_model, get_spec, weights_status
from napari_maeprobe.models.weights import load_state_dict
from napari_maeprobe.pp.masking import make_mask
from napari_maeprobe.pp.preprocessing import cell_crops, extract_windows, normalize
from napari_maeprobe.pp.segmentation import segment


@pytest.fixture(scope="module")
def cellpainting_crops() -> torch.Tensor:
    im, _ = load_sample("cellpainting")
    seg = segment(im, "builtin")
    return torch.from_numpy(cell_crops(normalize(im.to_numpy()), seg.labels, 96).crops[:24])


#: a real field the default model was not trained on: LINCS Cell Painting, A549, plate
#: SQ00015198, well A01, site 3 (5 channels), with CellProfiler's nucleus centres
HELD_OUT = ("lincs_cellpainting_a549_dev", "SQ00015198", "r01c01f03p01", "A01-3")


def _training_info() -> dict:
    from safetensors import safe_open

    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        return json.loads(f.metadata()["maeprobe_info"])


@pytest.fixture(scope="module")
def held_out_crops(shared_dir) -> torch.Tensor:
    """24 cells (96 px windows on CellProfiler nucleus centres) of a field that is not in the
    default model's training set."""
    dataset, plate, field, site = HELD_OUT
    assert not any(n.startswith(dataset) for n in _training_info()["images"])
    root = shared_dir / dataset
    (image,) = [im for im in read_images(root / "images" / plate) if im.name.startswith(field)]
    data = normalize(image.to_numpy())
    with open(root / "locations" / plate / f"{site}-Nuclei.csv") as f:
        rows = list(csv.DictReader(f))
    centres = (
        np.array(
            [
                [float(r["Nuclei_Location_Center_Y"]), float(r["Nuclei_Location_Center_X"])]
                for r in rows
            ]
        )
        .round()
        .astype(int)
    )
    inside = ((centres >= 48) & (centres <= np.array(data.shape[1:]) - 48)).all(axis=1)
    windows = extract_windows(data, centres[inside][:24] - 48, (96, 96))
    return torch.from_numpy(np.ascontiguousarray(windows)).float()


def test_bundled_weights_are_small_and_documented():
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20
    assert weights_status(get_spec("default"))[0]
    info = _training_info()
    assert info["command"].startswith("maeprobe train")  # how to reproduce them
    assert any(n.startswith("alsf_cellpainting_6ch") for n in info["images"])


def _masked_mse(x: torch.Tensor) -> tuple[float, float]:
    trained = create_model("default")
    untrained = create_model("default", random_init=True)
    assert len(trained.weights_sha256) == 64
    mask = make_mask("random", trained.token_grid(tuple(x.shape[1:])), len(x), 0.75, seed=0)
    with torch.no_grad():
        _, good = trained.loss(x, mask, fft_weight=0.0)
        _, bad = untrained.loss(x, mask, fft_weight=0.0)
    return good["mse"], bad["mse"]


def test_reconstructs_masked_patches_of_held_out_cells(held_out_crops):
    """Masked-patch MSE in standardised intensity (predicting the mean scores about 1.0) on
    cells of an unseen screen (other cells, line, microscope and 5 channels)."""
    assert held_out_crops.shape == (24, 5, 96, 96)
    good, bad = _masked_mse(held_out_crops)
    assert good < 0.6 < 1.2 < bad  # measured 0.43 and 1.80


def test_fits_masked_patches_of_its_training_cells(cellpainting_crops):
    """The same score on cells of an image it was trained on (training fit, not
    generalisation: see the held-out test above)."""
    assert any(n.startswith("alsf_cellpainting_6ch") for n in _training_info()["images"])
    x = cellpainting_crops
    good, bad = _masked_mse(x)
    assert good < 0.6 < 1.2 < bad  # measured 0.34 and 1.83


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


def test_depth_option_keeps_the_first_blocks_of_the_bundled_weights(cellpainting_crops):
    x = cellpainting_crops[:2]
    full = create_model("default")
    two = create_model("default", depth=2)
    assert len(two.backbone.blocks) == 2 and two.config.depth == 2
    assert not two.has_decoder  # the decoder follows block 4: dropped with it
    for a, b in zip(two.backbone.blocks, full.backbone.blocks[:2]):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
    halfway = []  # what the full model's second block puts out
    hook = full.backbone.blocks[1].register_forward_hook(lambda m, i, o: halfway.append(o[0]))
    with torch.no_grad():
        out, out_full = two(x), full(x)
    hook.remove()
    b, c = x.shape[:2]
    tokens = halfway[0][:, 1:].reshape(b, c, 8, 8, -1)
    torch.testing.assert_close(out.patch_embeddings, tokens, atol=1e-6, rtol=0)
    assert not torch.allclose(out.global_embedding, out_full.global_embedding, atol=1e-3)
    with pytest.raises(MaeprobeInputError, match="'dept'.*did you mean 'depth'"):
        create_model("default", dept=2)
    with pytest.raises(MaeprobeInputError, match="depth=5, but the weights have 4 blocks"):
        create_model("default", depth=5)
    with pytest.raises(MaeprobeInputError, match="embed_dim=96 does not match the weights"):
        create_model("default", embed_dim=96)
    encoder_only = create_model("default", decoder_depth=0)
    assert not encoder_only.has_decoder and len(encoder_only.backbone.blocks) == 4


def test_checkpoint_filter_maps_our_safetensors_to_a_strict_load():
    """Our own layout: the config travels in the file's metadata (the bundled file still has
    the older option names: img_size, decoder=dict(dim, depth, heads))."""
    from safetensors import safe_open

    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    assert "img_size" in json.loads(metadata["maeprobe_config"])  # the older names
    cfg, state = checkpoint_filter(load_state_dict(DEFAULT_WEIGHTS), metadata)
    assert cfg == DefaultConfig()
    CAMAE(cfg).load_state_dict(state, strict=True)


@pytest.fixture(scope="module")
def two_windows() -> torch.Tensor:
    """Two real 96 px windows of the 6-channel Cell Painting field."""
    im, _ = load_sample("cellpainting")
    arr = normalize(im.data[:, 400:592, 300:396].compute())
    return torch.from_numpy(np.stack([arr[:, :96], arr[:, 96:]]))


#: the default model's outputs on ``two_windows`` from the code before channels past the 11
#: stored position slots were allowed (commit 0e8f9be; torch 2.x, CPU, float32)
GOLDEN_6CH_GLOBAL = [
    [-0.10687170, 0.35052681, 1.26095760, -1.15556371, 0.36895302, -0.42176309],
    [0.11051273, -0.50657409, 0.17610829, -1.00953043, -0.23278801, 0.46843374],
]
GOLDEN_6CH_CHANNEL0 = [
    [-0.96903902, 0.15759422, 0.11601727, 0.01325867, -0.13959089, 0.18052953],
    [-0.05318659, -0.02340395, 0.34135059, 0.12878528, 0.06471992, 0.20481128],
]


@pytest.mark.regression
def test_six_channel_outputs_are_unchanged_by_repeatable_positions(two_windows):
    """Regression test: numbers the code produced before the position table was made to cover
    any channel count; six channels must give them to 1e-6."""
    model = create_model("default").eval()
    with torch.no_grad():
        out = model(two_windows)
    got = out.global_embedding[:, :6].double()
    torch.testing.assert_close(got, torch.tensor(GOLDEN_6CH_GLOBAL, dtype=torch.float64),
                               atol=1e-6, rtol=0)  # fmt: skip
    got = out.channel_embeddings[:, :, 0].double()
    torch.testing.assert_close(got, torch.tensor(GOLDEN_6CH_CHANNEL0, dtype=torch.float64),
                               atol=1e-6, rtol=0)  # fmt: skip


def test_reconstructs_41_channels(two_windows):
    """41 channels (the six real dyes repeated): masked reconstruction works past the 11 slots
    the decoder was trained with; visible patches come back as they went in."""
    x = two_windows[:, [i % 6 for i in range(41)]]
    model = create_model("default").eval()
    mask = make_mask("random", model.token_grid(tuple(x.shape[1:])), 2, 0.5, seed=0)
    with torch.no_grad():
        out = model(x, mask, reconstruction=True)
    assert out.reconstruction.shape == x.shape and torch.isfinite(out.reconstruction).all()
    visible = ~mask.repeat_interleave(12, -1).repeat_interleave(12, -2)
    torch.testing.assert_close(out.reconstruction[visible], x[visible])
