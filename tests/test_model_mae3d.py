"""mae3d: 3D MAE with per-channel streams (mae3d-opencell layout) on real 3D crops.

Tiny random models on crops of the bundled z-stacks: output shapes, masking, reconstruction,
loss, channel independence without cross-attention, checkpoint round trips in the repo's
``checkpoint_XXXX.pth.tar`` format, and an independent re-implementation of the repo's forward
pass (shuffled visible tokens, ``nn.MultiheadAttention``) read straight from the state dict.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import napari_maeprobe.models.builtin  # noqa: F401  (the built-in models first, then "mae3d")
import napari_maeprobe.models.mae3d  # noqa: F401
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.models.mae3d import (
    MAE3D,
    checkpoint_filter,
    fft3d_loss,
    grid_from_sincos,
    mae3d_sincos,
    nonzero_zscore,
)
from napari_maeprobe.models.registry import config_to_dict, create_model, get_spec
from napari_maeprobe.models.weights import load_state_dict
from napari_maeprobe.pp.masking import make_mask
from napari_maeprobe.pp.preprocessing import normalize

PATCH = (5, 8, 8)  # spots3d has only 17 planes: 3 patches of 5 along Z
CROP = (15, 64, 64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run faster on one thread than on contended cores (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spots() -> torch.Tensor:
    """Two real 2-channel crops (2, 2, 15, 64, 64) of the spots z-stack, percentile-normalised."""
    image, _ = load_sample("spots3d")
    data = normalize(np.asarray(image.data))  # (2, 17, 88, 89) in [0, 1]
    a = data[:, 0:15, 0:64, 0:64]
    b = data[:, 2:17, 24:88, 25:89]
    return torch.from_numpy(np.stack([a, b])).float()


@pytest.fixture(scope="module")
def nuclei() -> torch.Tensor:
    """One real 1-channel crop (1, 1, 20, 64, 64) of the nuclei z-stack."""
    image, _ = load_sample("nuclei3d")
    data = normalize(np.asarray(image.data[:, 20:40, 96:160, 96:160]))
    return torch.from_numpy(data[None]).float()


def tiny(cross: bool = True, chans: int = 2, seed: int = 0, **kw) -> MAE3D:
    torch.manual_seed(seed)
    cfg = dict(
        in_chans=chans, patch_size=PATCH, input_size=CROP, embed_dim=48, depth=2, num_heads=2,
        decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=2, cross_attention=cross,
    )  # fmt: skip
    cfg.update(kw)
    return MAE3D(**cfg).eval()


def spatial_mask(model: MAE3D, x: torch.Tensor, seed: int = 3, ratio: float = 0.75):
    return make_mask("random", model.token_grid(tuple(x.shape[1:])), x.shape[0], ratio, seed=seed)


def expand_mask(mask: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, gz, gy, gx) patch mask -> (B, Z, Y, X) voxel mask."""
    m = mask
    for axis, p in enumerate(patch):
        m = m.repeat_interleave(p, dim=axis + 1)
    return m


# --------------------------------------------------------------------------- outputs


def test_shapes_masking_and_attention(spots):
    model = tiny()
    mask = spatial_mask(model, spots)
    assert mask.shape == (2, 3, 8, 8)
    with torch.no_grad():
        out = model(spots, mask, attention=True, reconstruction=True)
    b, c, d = 2, 2, 48
    assert out.global_embedding.shape == (b, d)
    assert out.channel_embeddings.shape == (b, c, d)
    assert out.patch_embeddings.shape == (b, c, 3, 8, 8, d)
    assert out.attention.shape == (b, 2, c, 3, 8, 8)  # (B, heads, C, gz, gy, gx)
    assert out.reconstruction.shape == spots.shape
    assert out.extras["cls_tokens"].shape == (b, c, d)
    assert torch.equal(out.mask, mask)
    # NaN exactly at the masked patches, for every channel and feature (same spatial mask)
    nan = torch.isnan(out.patch_embeddings)
    assert torch.equal(nan.all(dim=-1), nan.any(dim=-1))
    assert torch.equal(nan.all(dim=-1), mask[:, None].expand(-1, c, -1, -1, -1))
    # embeddings are means of the visible tokens
    pe = out.patch_embeddings.reshape(b, c, -1, d)
    torch.testing.assert_close(out.channel_embeddings, pe.nanmean(dim=2))
    torch.testing.assert_close(out.global_embedding, out.channel_embeddings.mean(dim=1))
    # CLS->patch attention: 0 at masked patches, positive elsewhere, at most 1 in total
    att = out.attention
    masked = mask[:, None, None].expand_as(att)
    assert (att[masked] == 0).all() and (att[~masked] > 0).all()
    assert (att.sum(dim=(-3, -2, -1)) <= 1 + 1e-5).all()
    # asking for attention does not change the embeddings
    with torch.no_grad():
        plain = model(spots, mask)
    torch.testing.assert_close(plain.patch_embeddings, out.patch_embeddings, equal_nan=True)


def test_deterministic_without_mask(spots):
    model = tiny()
    with torch.no_grad():
        a = model(spots, attention=True)
        b = model(spots, attention=True)
    assert a.mask is None
    assert torch.isfinite(a.patch_embeddings).all()
    assert torch.equal(a.patch_embeddings, b.patch_embeddings)
    assert torch.equal(a.attention, b.attention)
    torch.testing.assert_close(
        a.attention.sum(dim=(-3, -2, -1)) <= 1 + 1e-5, torch.ones(2, 2, 2) > 0
    )


def test_same_spatial_mask_for_all_channels(spots):
    model = tiny()
    mask = spatial_mask(model, spots)
    per_channel = mask[:, None].expand(-1, 2, -1, -1, -1)
    with torch.no_grad():
        a = model(spots, mask)
        b = model(spots, per_channel)  # identical per-channel masks are accepted
    torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings, equal_nan=True)
    different = per_channel.clone()
    different[:, 1] = spatial_mask(model, spots, seed=9)
    with pytest.raises(MaeprobeInputError, match="same patches in every channel"):
        model(spots, different)
    uneven = mask.clone()
    uneven[0, 0, 0, 0] = ~uneven[0, 0, 0, 0]
    with pytest.raises(MaeprobeInputError, match="same number"):
        model(spots, uneven)


def test_reconstruction_keeps_visible_voxels(spots):
    model = tiny()
    mask = spatial_mask(model, spots)
    with torch.no_grad():
        rec = model(spots, mask, reconstruction=True).reconstruction
        full = model(spots, reconstruction=True).reconstruction
    vox = expand_mask(mask, PATCH)[:, None].expand_as(spots)
    assert torch.equal(rec[~vox], spots[~vox])
    assert torch.isfinite(rec).all()
    assert not torch.allclose(rec[vox], spots[vox])
    assert torch.equal(full, spots)  # nothing masked: the input itself
    # masked patches are norm-pix predictions rescaled with the input patch's own statistics:
    # an empty (all-zero) masked patch stays (almost) empty
    x = spots.clone()
    x[:, :, :, :16, :16] = 0
    mask2 = torch.zeros_like(mask)
    mask2[:, :, :2, :2] = True
    mask2[:, 0, 5:, 5:] = True
    with torch.no_grad():
        rec2 = model(x, mask2, reconstruction=True).reconstruction
    assert rec2[:, :, :, :16, :16].abs().max() < 1e-4
    assert rec2[:, :, :5, 40:, 40:].std() > 0


def test_loss_backpropagates(spots):
    model = tiny().train()
    mask = spatial_mask(model, spots)
    loss, parts = model.loss(spots, mask, 0.15)
    assert torch.isfinite(loss) and parts["mse"] > 0 and parts["fft"] > 0
    assert math.isclose(loss.item(), parts["mse"] + 0.15 * parts["fft"], rel_tol=1e-5)
    loss.backward()
    for name in (
        "patch_embeds.0.proj.weight",
        "cls_tokens.1",
        "encoder_blocks.0.block_ch1.cross_attn.q_proj.weight",
        "encoder_blocks.1.block_ch0.self_attn.in_proj_weight",
        "mask_tokens.0",
        "decoder_heads.1.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    no_fft, parts0 = model.loss(spots, mask)
    assert parts0["fft"] == 0 and math.isclose(no_fft.item(), parts0["mse"], rel_tol=1e-6)
    with pytest.raises(ValueError, match="needs a mask"):
        model.loss(spots, None)


def test_fft_loss_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 6, 5, generator=g), torch.randn(2, 3, 4, 6, 5, generator=g)
    fa = np.log1p(np.abs(np.fft.fftn(a.numpy(), axes=(-3, -2, -1), norm="ortho")) + 1e-8)
    fb = np.log1p(np.abs(np.fft.fftn(b.numpy(), axes=(-3, -2, -1), norm="ortho")) + 1e-8)
    assert math.isclose(float(fft3d_loss(a, b)), float(np.abs(fa - fb).mean()), rel_tol=1e-5)


def test_zscore_over_nonzero_voxels(spots):
    x = spots.clone()
    x[0, 1] = 0  # an empty channel stays empty
    z, mean, std = nonzero_zscore(x)
    for b in range(2):
        for c in range(2):
            v = x[b, c]
            nz = v != 0
            if not nz.any():
                assert (z[b, c] == 0).all()
                continue
            ref = (v[nz] - v[nz].mean()) / v[nz].std(unbiased=False)
            torch.testing.assert_close(z[b, c][nz], ref, atol=1e-5, rtol=1e-5)
            assert (z[b, c][~nz] == 0).all()


# --------------------------------------------------------------------------- channel streams


def test_streams_independent_without_cross_attention(spots):
    perturbed = spots.clone()
    perturbed[:, 1] = perturbed[:, 1].flip(-1) * 0.5
    for cross in (False, True):
        model = tiny(cross=cross)
        mask = spatial_mask(model, spots)
        with torch.no_grad():
            a = model(spots, mask)
            b = model(perturbed, mask)
        same0 = torch.equal(a.channel_embeddings[:, 0], b.channel_embeddings[:, 0])
        assert same0 is (not cross)
        assert not torch.equal(a.channel_embeddings[:, 1], b.channel_embeddings[:, 1])
    assert not any(".cross_attn." in k for k in tiny(cross=False).state_dict())


def test_three_and_one_channels(spots, nuclei):
    x3 = torch.cat([spots, spots[:, :1].flip(-2)], dim=1)
    model = tiny(chans=3)
    with torch.no_grad():
        out = model(x3, spatial_mask(model, x3), attention=True, reconstruction=True)
    assert out.patch_embeddings.shape == (2, 3, 3, 8, 8, 48)
    assert out.attention.shape == (2, 2, 3, 3, 8, 8)
    # one channel, the default 10x8x8 patch, cross-attention off
    torch.manual_seed(0)
    model1 = MAE3D(in_chans=1, embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=24,
                   decoder_depth=1, decoder_num_heads=2, cross_attention=False).eval()  # fmt: skip
    mask = spatial_mask(model1, nuclei, ratio=0.5)
    assert mask.shape == (1, 2, 8, 8)
    with torch.no_grad():
        out1 = model1(nuclei, mask, attention=True, reconstruction=True)
    assert out1.patch_embeddings.shape == (1, 1, 2, 8, 8, 48)
    assert out1.global_embedding.shape == (1, 48)
    with pytest.raises(ValueError, match="at least 2 channels"):
        MAE3D(in_chans=1, cross_attention=True)
    with pytest.raises(MaeprobeInputError, match="channel stream"):
        model(spots)


def test_pooling_options_and_other_grids(spots):
    model = tiny(channel_pool="concat", pooling="cls")
    with torch.no_grad():
        out = model(spots)
    assert out.global_embedding.shape == (2, 96) and model.global_dim == 96
    torch.testing.assert_close(out.channel_embeddings, out.extras["cls_tokens"])
    torch.testing.assert_close(out.global_embedding, out.channel_embeddings.reshape(2, 96))
    # a crop of another size (a multiple of the patch): positions computed for its grid
    small = spots[:, :, :10, :32, :48]
    with torch.no_grad():
        o = model(small, make_mask("random", (2, 4, 6), 2, 0.5, seed=0), reconstruction=True)
    assert o.patch_embeddings.shape == (2, 2, 2, 4, 6, 48)
    with pytest.raises(MaeprobeInputError, match="multiple of the patch"):
        model(spots[:, :, :, :60])


def test_sincos_layout():
    dim, grid = 36, (3, 4, 5)
    table = mae3d_sincos(dim, grid)
    m = dim // 6
    rows = []
    for z in range(grid[0]):
        for y in range(grid[1]):
            for x in range(grid[2]):
                row = []
                for pos in (z, y, x):  # [sin z, cos z, sin y, cos y, sin x, cos x]
                    row += [math.sin(pos / 10000 ** (k / m)) for k in range(m)]
                    row += [math.cos(pos / 10000 ** (k / m)) for k in range(m)]
                rows.append(row)
    torch.testing.assert_close(table, torch.tensor(rows, dtype=torch.float32))
    assert grid_from_sincos(table[None]) == grid
    assert grid_from_sincos(mae3d_sincos(384, (10, 22, 22))) == (10, 22, 22)
    assert grid_from_sincos(mae3d_sincos(48, (1, 1, 7)).half()) == (1, 1, 7)
    with pytest.raises(ValueError, match="not mae3d's 3D sin-cos"):
        grid_from_sincos(mae3d_sincos(36, (3, 4, 5))[:, [*range(12, 36), *range(12)]])
    with pytest.raises(ValueError, match="divisible by 6"):
        mae3d_sincos(32, (2, 2, 2))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: MAE3D, path, drop: str | None = None, extra: str | None = None):
    state = {"module." + k: v for k, v in model.state_dict().items() if k != drop}
    if extra:
        state["module." + extra] = torch.zeros(3)
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {}}, path)
    return path


def test_checkpoint_round_trip(spots, tmp_path):
    model = tiny()
    path = save_checkpoint(model, tmp_path / "checkpoint_0003.pth.tar")
    loaded = create_model("mae3d", weights=path, patch_size=PATCH, num_heads=2, decoder_num_heads=2)
    assert loaded.weights_name == "checkpoint_0003.pth.tar"
    assert loaded.input_size == CROP and loaded.cross_attention and loaded.in_chans == 2
    mask = spatial_mask(model, spots)
    with torch.no_grad():
        a = model(spots, mask, attention=True, reconstruction=True)
        b = loaded(spots, mask, attention=True, reconstruction=True)
    for name in ("global_embedding", "patch_embeddings", "attention", "reconstruction"):
        assert torch.equal(getattr(a, name).nan_to_num(), getattr(b, name).nan_to_num()), name
    torch.manual_seed(0)
    la, _ = model.loss(spots, mask, 0.1)
    lb, _ = loaded.loss(spots, mask, 0.1)
    assert torch.equal(la, lb)
    # the architecture is read from the weights; patch and heads come from the options
    with pytest.raises(MaeprobeInputError, match="patch_size"):
        create_model("mae3d", weights=path)


def test_checkpoint_default_patch_without_cross_attention(nuclei, tmp_path):
    torch.manual_seed(1)
    model = MAE3D(
        in_chans=1, input_size=(20, 64, 64), embed_dim=36, depth=1, num_heads=6,
        decoder_embed_dim=18, decoder_depth=1, decoder_num_heads=6, cross_attention=False,
    ).eval()  # fmt: skip
    path = save_checkpoint(model, tmp_path / "checkpoint_0001.pth.tar")
    loaded = create_model("mae3d", weights=path)  # default patch and heads fit: no options
    assert not loaded.cross_attention and loaded.patch_size == (10, 8, 8)
    with torch.no_grad():
        a, b = model(nuclei), loaded(nuclei)
    assert torch.equal(a.patch_embeddings, b.patch_embeddings)


def test_own_safetensors_with_config_metadata(spots, tmp_path):
    import json

    from safetensors.torch import save_file

    model = tiny(cross=False, seed=2)
    path = tmp_path / "mine.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(config_to_dict(model.config))
    save_file(state, str(path), metadata={"maeprobe_config": config})
    loaded = create_model("mae3d", weights=path)  # architecture from the metadata
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model(spots).global_embedding, loaded(spots).global_embedding)
    # files written before the options were renamed (decoder_dim, decoder_heads) still load
    old = config.replace("decoder_embed_dim", "decoder_dim").replace("_num_heads", "_heads")
    save_file(state, str(path), metadata={"maeprobe_config": old})
    assert create_model("mae3d", weights=path).config == model.config


def test_checkpoint_filter_maps_mae3d_opencell_to_a_strict_load(tmp_path):
    """The repo's ``{'epoch', 'state_dict': {'module.' + key}}`` layout -> config and keys."""
    model = tiny()
    path = save_checkpoint(model, tmp_path / "checkpoint_0002.pth.tar")
    state = load_state_dict(path)
    assert all(k.startswith("module.") for k in torch.load(path)["state_dict"])
    cfg, sd = checkpoint_filter(state, {}, patch_size=PATCH, num_heads=2, decoder_num_heads=2)
    assert cfg == model.config
    MAE3D(cfg).load_state_dict(sd, strict=True)
    cfg1, sd1 = checkpoint_filter(state, {}, patch_size=PATCH, num_heads=2, depth=1)
    assert cfg1.depth == 1 and cfg1.decoder_depth == 0
    MAE3D(cfg1).load_state_dict(sd1, strict=True)
    with pytest.raises(MaeprobeInputError, match="in_chans=3 does not match the weights"):
        checkpoint_filter(state, {}, patch_size=PATCH, in_chans=3)


@pytest.mark.parametrize(
    "drop, extra",
    [("encoder_blocks.1.block_ch0.mlp.fc2.bias", None), (None, "encoder_blocks.0.block_ch1.x")],
)
def test_checkpoint_with_wrong_keys_fails(tmp_path, drop, extra):
    path = save_checkpoint(tiny(), tmp_path / "checkpoint_0007.pth.tar", drop, extra)
    with pytest.raises(MaeprobeInputError) as err:
        create_model("mae3d", weights=path, patch_size=PATCH, num_heads=2, decoder_num_heads=2)
    text = str(err.value)
    assert "checkpoint_0007.pth.tar" in text and (drop or extra) in text


def test_not_a_mae3d_checkpoint(tmp_path):
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, tmp_path / "c.pth")
    with pytest.raises(MaeprobeInputError, match="c.pth.*cls_tokens"):
        create_model("mae3d", weights=tmp_path / "c.pth")


def test_registry_spec():
    spec = get_spec("mae3d")
    assert spec.has_decoder and spec.embed_dim == 384
    model = create_model(
        "mae3d", random_init=True, embed_dim=48, depth=1, num_heads=2, decoder_embed_dim=24,
        decoder_depth=1, decoder_num_heads=2,
    )  # fmt: skip
    assert model.patch_size == (10, 8, 8) and model.input_size == (100, 176, 176)
    assert model.grid == (10, 22, 22) and model.cross_attention and model.in_chans == 2
    assert model.token_grid((2, 100, 176, 176)) == (10, 22, 22)


# --------------------------------------------------------------------------- the repo's forward


def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _ln(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-6)


def _ref_blocks(sd, prefix, xs, depth, heads):
    """DualChannelTransformerBlock as published: nn.MultiheadAttention, position-wise gate."""
    for i in range(depth):
        new = []
        for c, x in enumerate(xs):
            p = f"{prefix}.{i}.block_ch{c}."
            dim = x.shape[-1]
            mha = nn.MultiheadAttention(dim, heads, batch_first=True)
            mha.load_state_dict(
                {k[len(p) + 10 :]: v for k, v in sd.items() if k.startswith(p + "self_attn.")}
            )
            h = _ln(sd, p + "norm1", x)
            x = x + mha(h, h, h)[0]
            other = xs[1 - c]
            q = _lin(sd, p + "cross_attn.q_proj", _ln(sd, p + "norm2", x))
            k = _lin(sd, p + "cross_attn.k_proj", other)
            v = _lin(sd, p + "cross_attn.v_proj", other)
            b, n, _ = q.shape
            q, k, v = (t.reshape(b, n, heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
            gate = torch.sigmoid((q * k).sum(-1) * (dim // heads) ** -0.5)[..., None]
            x = x + _lin(
                sd, p + "cross_attn.proj", (v * gate).permute(0, 2, 1, 3).reshape(b, n, dim)
            )
            x = x + _lin(
                sd, p + "mlp.fc2", F.gelu(_lin(sd, p + "mlp.fc1", _ln(sd, p + "norm3", x)))
            )
            new.append(x)
        xs = new
    return xs


def test_matches_published_forward(spots):
    """Re-implements mae3d-opencell's encoder, decoder and loss (shuffled token order, MONAI
    z-score per channel, the repo's own patchify) from the state dict alone."""
    model = tiny(seed=5)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    b, c = spots.shape[:2]
    # MONAI NormalizeIntensity(nonzero=True, channel_wise=True), one crop and channel at a time
    z = spots.clone()
    for i in range(b):
        for j in range(c):
            v = z[i, j]
            nz = v != 0
            v[nz] = (v[nz] - v[nz].mean()) / v[nz].std(unbiased=False)
    grid, patch = (3, 8, 8), PATCH
    n, vol = math.prod(grid), math.prod(patch)
    x = z.reshape(b, c, grid[0], patch[0], grid[1], patch[1], grid[2], patch[2])
    chans = x.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, c, n, vol)
    # the repo's shuffled masking: visible first (in random order), masked last
    mask = spatial_mask(model, spots).reshape(b, n)
    g = torch.Generator().manual_seed(11)
    shuffle = torch.stack([
        torch.cat([row.nonzero()[:, 0][torch.randperm(int(row.sum()), generator=g)]
                   for row in (~m, m)])
        for m in mask
    ])  # fmt: skip
    sel = (~mask[0]).sum()
    unshuffle = shuffle.argsort(dim=1)
    shuffled = torch.gather(chans, 2, shuffle[:, None, :, None].expand(-1, c, -1, vol))
    pos = sd["encoder_pos_embed"].expand(b, -1, -1)
    sel_pos = torch.gather(pos, 1, shuffle[:, :sel, None].expand(-1, -1, 48))
    xs = []
    for j in range(c):
        e = _ln(
            sd, f"patch_embeds.{j}.norm", _lin(sd, f"patch_embeds.{j}.proj", shuffled[:, j, :sel])
        )
        e = torch.cat([sd[f"cls_tokens.{j}"].expand(b, -1, -1), e], 1)
        xs.append(e + torch.cat([torch.zeros(b, 1, 48), sel_pos], 1))
    with torch.no_grad():
        xs = _ref_blocks(sd, "encoder_blocks", xs, 2, 2)
        xs = [_ln(sd, f"encoder_norms.{j}", t) for j, t in enumerate(xs)]
        ours = model(spots, mask.reshape(b, *grid))
    for j in range(c):
        ref = xs[j][:, 1:].mean(dim=1)
        torch.testing.assert_close(ours.channel_embeddings[:, j], ref, atol=2e-5, rtol=1e-4)
        tok = torch.full((b, n, 48), float("nan"))
        tok.scatter_(1, shuffle[:, :sel, None].expand(-1, -1, 48), xs[j][:, 1:])
        torch.testing.assert_close(
            ours.patch_embeddings[:, j].reshape(b, n, 48), tok, atol=2e-5, rtol=1e-4, equal_nan=True
        )
    # decoder and loss
    dec_pos = torch.gather(sd["decoder_pos_embed"].expand(b, -1, -1), 1,
                           shuffle[..., None].expand(-1, -1, 24))  # fmt: skip
    ys = []
    for j in range(c):
        y = _lin(sd, f"encoder_to_decoder.{j}", xs[j])
        y = torch.cat([y, sd[f"mask_tokens.{j}"].expand(b, n - sel, -1)], 1)
        ys.append(torch.cat([y[:, :1], y[:, 1:] + dec_pos], 1))
    with torch.no_grad():
        ys = _ref_blocks(sd, "decoder_blocks", ys, 2, 2)
        outs = [
            _lin(sd, f"decoder_heads.{j}", _ln(sd, f"decoder_norms.{j}", y))
            for j, y in enumerate(ys)
        ]
        mse = (
            sum(
                F.mse_loss(o[:, -(n - sel) :], F.layer_norm(shuffled[:, j, sel:], (vol,), eps=1e-6))
                for j, o in enumerate(outs)
            )
            / c
        )
        fft = 0
        for j, o in enumerate(outs):
            rec = torch.gather(o[:, 1:], 1, unshuffle[..., None].expand(-1, -1, vol))
            src = chans[:, j]
            rec = rec * (src.var(dim=-1, unbiased=True, keepdim=True).sqrt() + 1e-6)
            rec = rec + src.mean(dim=-1, keepdim=True)
            vol_rec = rec.reshape(b, *grid, *patch).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, *CROP)
            fft = fft + fft3d_loss(vol_rec, z[:, j]) / c
        loss, parts = model.loss(spots, mask.reshape(b, *grid), 0.15)
    assert math.isclose(parts["mse"], float(mse), rel_tol=1e-4)
    assert math.isclose(parts["fft"], float(fft), rel_tol=1e-4)
    assert math.isclose(float(loss), float(mse + 0.15 * fft), rel_tol=1e-4)


def test_self_attention_matches_torch_multihead():
    from napari_maeprobe.models.mae3d import SelfAttention

    torch.manual_seed(0)
    ours = SelfAttention(24, 3)
    ref = nn.MultiheadAttention(24, 3, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 24)
    out, probs = ours(x, cls_weights=True)
    r_out, r_probs = ref(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, r_probs[:, :, 0], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- golden numbers


@pytest.mark.regression
def test_regression_golden_numbers(spots):
    """Regression test: numbers this code produced earlier, not an independent reference;
    it catches an unintended change of the forward pass."""
    model = tiny(seed=123)
    mask = spatial_mask(model, spots, seed=7)
    with torch.no_grad():
        out = model(spots, mask, attention=True)
        plain = model(spots)
        loss, parts = model.loss(spots, mask, 0.15)
    got = [
        *out.global_embedding[0, :4].tolist(),
        *plain.channel_embeddings[1, 1, :3].tolist(),
        float(out.attention[0, 1, 0].max()),
        parts["mse"],
        parts["fft"],
    ]
    np.testing.assert_allclose(got, GOLDEN, rtol=1e-4, atol=1e-5)


#: from the seeded tiny model above (torch 2.13 CPU, float32)
GOLDEN = [
    0.2673875093460083, 0.1333232820034027, 0.07174748182296753, -0.3396298289299011,
    -0.4137660562992096, 0.029195511713624, 0.08382749557495117,
    0.06954115629196167,
    1.1332130432128906, 0.317757785320282,
]  # fmt: skip
