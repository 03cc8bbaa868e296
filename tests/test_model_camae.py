"""CA-MAE: OpenPhenom's checkpoint layout against an independent forward, channel-order
invariance, legacy bias.

The reference for OpenPhenom is written here from the published architecture (model-facts §1.2:
timm ViT with a channel-agnostic 1-channel patch embedding, the 2D sin-cos table repeated per
channel and sliced to the tokens present, ParallelScalingBlock with qk-norm, LayerScale and
timm < 1.0.25's bias routing, no final norm, the mean of the patch tokens; Normalizer + instance
norm on the input), reading only OpenPhenom's key names: it shares no code with the package.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.models.camae import CAMAE, CAMAEConfig, checkpoint_filter
from napari_maeprobe.models.layers import ParallelScalingBlock
from napari_maeprobe.models.registry import create_model
from napari_maeprobe.pp.masking import make_mask
from napari_maeprobe.pp.preprocessing import normalize

TINY = dict(input_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, max_channels=11)


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Two real 64x64 windows of the 6-channel Cell Painting field (stand-ins for RxRx crops)."""
    im, _ = load_sample("cellpainting")
    arr = normalize(im.data[:, 400:528, 300:364].compute())
    return torch.from_numpy(np.stack([arr[:, :64], arr[:, 64:]]))


def _tiny_openphenom(seed: int = 0) -> CAMAE:
    torch.manual_seed(seed)
    model = CAMAE(**TINY)
    model.reset_parameters()
    with torch.no_grad():  # non-trivial LayerScale and mlp_bias, as in trained weights
        for blk in model.backbone.blocks:
            blk.ls.gamma.normal_(0.5, 0.1)
            blk.mlp_bias.normal_(0, 0.5)
    return model.eval()


def _openphenom_state(model: CAMAE) -> dict:
    """Our model's state dict as OpenPhenom stores it, decoder keys included (dropped)."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    state["decoder.pos_embeddings"] = torch.zeros(1, 1 + 6 * 16, 32)
    state["decoder_pred.weight"] = torch.zeros(256, 32)
    return state


def test_key_names_match_openphenom():
    keys = set(_tiny_openphenom().state_dict())
    p = "encoder.vit_backbone."
    for k in [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "fc_norm.weight",
        "blocks.0.in_norm.weight",
        "blocks.0.in_proj.weight",
        "blocks.0.mlp_bias",
        "blocks.0.q_norm.weight",
        "blocks.0.k_norm.bias",
        "blocks.0.attn_out_proj.weight",
        "blocks.0.mlp_out_proj.bias",
        "blocks.1.ls.gamma",
    ]:
        assert p + k in keys
    assert "encoder.vit_backbone.blocks.0.in_proj.bias" not in keys  # qkv_bias=False
    assert _tiny_openphenom().backbone.pos_embed.shape == (1, 1 + 11 * 16, 48)


# ------------------------------------------------------------------------------------------------
# an independent OpenPhenom: its state dict and its forward, from the published architecture

P = "encoder.vit_backbone."
REF = dict(dim=48, heads=3, depth=2, patch=16, side=4, channels=11, hidden=192)


def _published_sincos(dim: int, side: int, channels: int) -> torch.Tensor:
    """[1, 1 + channels * side**2, dim]: a zero CLS row, then the 2D sin-cos table
    [sin h | cos h | sin w | cos w] (dim/4 each, omega_k = 1 / 10000**(k / (dim/4))),
    repeated for every channel."""
    q = dim // 4
    omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
    rows = []
    for h in range(side):
        for w in range(side):
            rows.append(np.concatenate(
                [np.sin(h * omega), np.cos(h * omega), np.sin(w * omega), np.cos(w * omega)]
            ))  # fmt: skip
    table = np.tile(np.stack(rows), (channels, 1))
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table]))[None].float()


def _openphenom_like_state(seed: int = 0) -> dict:
    """A state dict with OpenPhenom's key names and shapes (ViT-S/16 layout at toy size), random
    weights with non-trivial LayerScale and mlp_bias, plus decoder keys our loader drops."""
    g = torch.Generator().manual_seed(seed)
    d, hidden, patch, hd = REF["dim"], REF["hidden"], REF["patch"], REF["dim"] // REF["heads"]

    def rnd(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    sd = {
        P + "cls_token": rnd(1, 1, d, scale=0.02),
        P + "pos_embed": _published_sincos(d, REF["side"], REF["channels"]),
        P + "patch_embed.proj.weight": rnd(d, 1, patch, patch, scale=0.05),
        P + "patch_embed.proj.bias": rnd(d, scale=0.02),
        P + "fc_norm.weight": torch.ones(d),
        P + "fc_norm.bias": torch.zeros(d),
        "encoder_decoder_proj.weight": rnd(32, d),
        "decoder.pos_embeddings": torch.zeros(1, 1 + 6 * 16, 32),
        "decoder_pred.weight": rnd(256, 32),
    }
    for i in range(REF["depth"]):
        b = f"{P}blocks.{i}."
        sd.update({
            b + "in_norm.weight": rnd(d, mean=1.0), b + "in_norm.bias": rnd(d),
            b + "in_proj.weight": rnd(hidden + 3 * d, d, scale=0.15),
            b + "mlp_bias": rnd(hidden, scale=0.5),
            b + "q_norm.weight": rnd(hd, mean=1.0), b + "q_norm.bias": rnd(hd),
            b + "k_norm.weight": rnd(hd, mean=1.0), b + "k_norm.bias": rnd(hd),
            b + "attn_out_proj.weight": rnd(d, d, scale=0.15), b + "attn_out_proj.bias": rnd(d),
            b + "mlp_out_proj.weight": rnd(d, hidden, scale=0.1), b + "mlp_out_proj.bias": rnd(d),
            b + "ls.gamma": rnd(d, scale=0.1, mean=0.5),
        })  # fmt: skip
    return sd


def _published_forward(sd: dict, pixels: torch.Tensor) -> dict:
    """OpenPhenom's encoder on uint8-scale pixels (B, C, H, W), read from the state dict.

    Normalizer (/255) and InstanceNorm2d (no affine, eps 1e-5); the 1-channel patch conv on each
    channel, stacked channel-major; CLS prepended and pos_embed[:, :tokens] added; blocks as
    timm's ParallelScalingBlock (LayerNorm eps 1e-6, in_proj output [mlp | q | k | v], bias
    cat(zeros(3 dim), mlp_bias) added over it, q/k LayerNorm per head, softmax attention, exact
    GELU, ls.gamma on the sum); norm = Identity; the predict() poolings."""
    d, heads, hidden = REF["dim"], REF["heads"], REF["hidden"]
    hd = d // heads
    b, c = pixels.shape[:2]
    x = F.instance_norm(pixels.double() / 255.0, eps=1e-5)
    w = sd[P + "patch_embed.proj.weight"].double()
    bias = sd[P + "patch_embed.proj.bias"].double()
    per_channel = [F.conv2d(x[:, i : i + 1], w, bias, stride=w.shape[-1]) for i in range(c)]
    tokens = torch.stack(per_channel, dim=2).flatten(2).transpose(1, 2)  # (B, C*L, D)
    cls = sd[P + "cls_token"].double().expand(b, -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    x = x + sd[P + "pos_embed"].double()[:, : x.shape[1]]
    n = x.shape[1]
    for i in range(REF["depth"]):
        k = {name: t.double() for name, t in sd.items() if name.startswith(f"{P}blocks.{i}.")}
        g = f"{P}blocks.{i}."
        y = F.layer_norm(x, (d,), k[g + "in_norm.weight"], k[g + "in_norm.bias"], 1e-6)
        y = y @ k[g + "in_proj.weight"].T + torch.cat([torch.zeros(3 * d), k[g + "mlp_bias"]])
        x_mlp, q, kk, v = y.split([hidden, d, d, d], dim=-1)

        def split_heads(t):
            return t.reshape(b, n, heads, hd).transpose(1, 2)

        q = F.layer_norm(split_heads(q), (hd,), k[g + "q_norm.weight"], k[g + "q_norm.bias"], 1e-6)
        kk = F.layer_norm(
            split_heads(kk), (hd,), k[g + "k_norm.weight"], k[g + "k_norm.bias"], 1e-6
        )
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ split_heads(v)
        x_attn = att.transpose(1, 2).reshape(b, n, d) @ k[g + "attn_out_proj.weight"].T
        x_attn = x_attn + k[g + "attn_out_proj.bias"]
        gelu = 0.5 * x_mlp * (1 + torch.erf(x_mlp / math.sqrt(2.0)))
        x_mlp = gelu @ k[g + "mlp_out_proj.weight"].T + k[g + "mlp_out_proj.bias"]
        x = x + k[g + "ls.gamma"] * (x_attn + x_mlp)
    patches = x[:, 1:]
    return {
        "global": patches.mean(dim=1),  # predict(): X[:, 1:].mean(1)
        "channels": patches.reshape(b, c, -1, d).mean(dim=2),  # return_channelwise_embeddings
        "tokens": patches.reshape(b, c, REF["side"], REF["side"], d),
    }


def test_checkpoint_filter_maps_openphenom_to_a_strict_load():
    state = _openphenom_like_state()
    cfg, sd = checkpoint_filter(state, {})
    assert cfg == CAMAEConfig(
        input_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
        max_channels=11, block="parallel", init_values=1e-4, legacy_bias=True, decoder_depth=0,
    )  # fmt: skip
    assert not any(k.startswith(("decoder", "encoder_decoder")) for k in sd)  # theirs, dropped
    model = CAMAE(cfg)
    model.load_state_dict(sd, strict=True)
    cfg1, sd1 = checkpoint_filter(state, {}, depth=1)  # the first block only
    CAMAE(cfg1).load_state_dict(sd1, strict=True)
    with pytest.raises(MaeprobeInputError, match="embed_dim=64 does not match"):
        checkpoint_filter(state, {}, embed_dim=64)


@pytest.mark.parametrize("fmt", ["safetensors", "torch_state_dict"])
def test_openphenom_layout_matches_an_independent_forward(tmp_path, crops, fmt):
    state = _openphenom_like_state()
    path = tmp_path / "model.safetensors"  # OpenPhenom's file name, whatever its real format
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)  # the repo's save_pretrained writes this
    model = create_model("ca-mae", weights=path)  # crop size read from the sin-cos table
    assert model.input_size == (64, 64) and model.backbone.blocks[0].legacy_bias
    assert model.weights_sha256 and len(model.weights_sha256) == 64
    ref = _published_forward(state, crops.double() * 255.0)
    with torch.no_grad():
        out = model(crops)
    torch.testing.assert_close(out.global_embedding.double(), ref["global"], atol=2e-5, rtol=0)
    torch.testing.assert_close(out.channel_embeddings.double(), ref["channels"], atol=2e-5, rtol=0)
    torch.testing.assert_close(out.patch_embeddings.double(), ref["tokens"], atol=2e-5, rtol=0)
    assert ref["global"].abs().max() > 0.1  # a non-trivial embedding
    # the reference does depend on the legacy bias routing (non-zero mlp_bias)
    fixed = create_model("ca-mae", weights=path, legacy_bias=False)
    with torch.no_grad():
        moved = (fixed(crops).global_embedding.double() - ref["global"]).abs().max()
    assert moved > 1e-3


@pytest.mark.regression
def test_regression_golden_outputs(crops):
    """Regression test: numbers this code produced earlier, not an independent reference;
    it catches an unintended change of the forward pass."""
    with torch.no_grad():
        out = _tiny_openphenom()(crops, attention=True)
    assert out.global_embedding.shape == (2, 48)
    assert out.channel_embeddings.shape == (2, 6, 48)
    assert out.patch_embeddings.shape == (2, 6, 4, 4, 48)
    assert out.attention.shape == (2, 3, 6, 4, 4)
    # CLS-to-patch attention: a probability row minus the CLS's attention to itself
    total = out.attention.sum(dim=(2, 3, 4))
    assert ((total > 0.5) & (total <= 1.0 + 1e-6)).all()
    golden = torch.tensor(GOLDEN)
    torch.testing.assert_close(out.global_embedding[:, :4], golden, atol=2e-4, rtol=0)


#: seeded tiny model on two real Cell Painting windows (torch 2.13, CPU)
GOLDEN = [[0.59984, 0.44054, 0.30813, 0.09877], [0.81981, 0.43594, 0.28660, 0.11549]]


def test_global_embedding_is_invariant_to_channel_order(crops):
    model = _tiny_openphenom()
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    with torch.no_grad():
        a, b = model(crops), model(crops[:, perm])
    torch.testing.assert_close(a.global_embedding, b.global_embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        a.channel_embeddings[:, perm], b.channel_embeddings, atol=1e-5, rtol=0
    )


def test_any_channel_count(crops):
    """1 to 41 channels (41 > the 11 slots the position table stores); 0 or a wrong crop size
    are refused with one line naming the fix."""
    model = _tiny_openphenom()
    for c in (1, 3, 11, 12, 41):
        x = crops[:, [i % 6 for i in range(c)]]
        with torch.no_grad():
            assert model(x).channel_embeddings.shape == (2, c, 48)
    with pytest.raises(MaeprobeInputError, match="at least 1 channel.*--channels"):
        model(crops[:, :0])
    with pytest.raises(MaeprobeInputError, match="64x64 crops.*--crop-size 64"):
        model(crops[:, :, :32, :32])


def test_position_rows_for_any_channel_count():
    """Up to the stored 11 slots the rows are the stored table's (as before); beyond, every
    channel gets the published 2D sin-cos rows, as the CA-MAE design repeats them per channel."""
    vit = _tiny_openphenom().backbone
    for c in (1, 6, 11):
        assert torch.equal(vit.channel_positions(c), vit.pos_embed[:, 1 : 1 + c * 16])
    want = _published_sincos(48, 4, 41)[:, 1:]
    torch.testing.assert_close(vit.channel_positions(41), want, atol=1e-6, rtol=0)


def test_openphenom_checkpoint_embeds_41_channels_like_the_published_design(tmp_path, crops):
    """An OpenPhenom-layout checkpoint (11 slots, loaded strictly) on 41 real channels matches
    the independent forward with the sin-cos table written out for 41 channels."""
    from safetensors.torch import save_file

    state = _openphenom_like_state()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model("ca-mae", weights=path)
    assert model.backbone.pos_embed.shape == (1, 1 + 11 * 16, 48)
    x = crops[:, [i % 6 for i in range(41)]]
    ref_state = dict(state)
    ref_state[P + "pos_embed"] = _published_sincos(48, REF["side"], 41)
    ref = _published_forward(ref_state, x.double() * 255.0)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.global_embedding.double(), ref["global"], atol=2e-5, rtol=0)
    torch.testing.assert_close(out.channel_embeddings.double(), ref["channels"], atol=2e-5, rtol=0)


def test_legacy_bias_layout_numerics():
    """timm < 1.0.25 added [zeros(3d) | mlp_bias] over the [mlp | q | k | v] projection."""
    torch.manual_seed(1)
    dim, heads = 24, 3
    blk = ParallelScalingBlock(dim, heads, qk_norm=True, init_values=0.7, legacy_bias=True).eval()
    with torch.no_grad():
        blk.mlp_bias.normal_(0, 1.0)
        for p in blk.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    x = torch.randn(2, 5, dim)
    # the reference, written out step by step
    hidden = 4 * dim
    y = F.linear(
        F.layer_norm(x, (dim,), blk.in_norm.weight, blk.in_norm.bias, 1e-6), blk.in_proj.weight
    )
    y = y + torch.cat([torch.zeros(3 * dim), blk.mlp_bias])
    x_mlp, q, k, v = (
        y[..., :hidden],
        y[..., hidden : hidden + dim],
        y[..., hidden + dim : hidden + 2 * dim],
        y[..., hidden + 2 * dim :],
    )

    def heads_(t):
        return t.reshape(2, 5, heads, dim // heads).transpose(1, 2)

    qn = F.layer_norm(heads_(q), (dim // heads,), blk.q_norm.weight, blk.q_norm.bias, 1e-6)
    kn = F.layer_norm(heads_(k), (dim // heads,), blk.k_norm.weight, blk.k_norm.bias, 1e-6)
    att = ((qn @ kn.transpose(-1, -2)) / (dim // heads) ** 0.5).softmax(-1) @ heads_(v)
    x_attn = blk.attn_out_proj(att.transpose(1, 2).reshape(2, 5, dim))
    expected = x + blk.ls.gamma * (x_attn + blk.mlp_out_proj(F.gelu(x_mlp)))
    with torch.no_grad():
        got, _ = blk(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        blk.legacy_bias = False
        fixed, _ = blk(x)
        assert (fixed - got).abs().max() > 0.05  # the layouts differ with a non-zero mlp_bias
        blk.mlp_bias.zero_()
        a, _ = blk(x)
        blk.legacy_bias = True
        b, _ = blk(x)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # ... and agree with a zero one


def test_fused_and_explicit_attention_agree(crops):
    model = _tiny_openphenom()
    with torch.no_grad():
        a = model(crops)
        b = model(crops, attention=True)
    torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings, atol=1e-5, rtol=0)


def test_masked_forward(crops):
    model = _tiny_openphenom()
    grid = model.token_grid(tuple(crops.shape[1:]))
    mask = make_mask("random", grid, 2, 0.75, seed=3)
    with torch.no_grad():
        out = model(crops, mask, attention=True)
    nan = torch.isnan(out.patch_embeddings).all(-1)
    assert torch.equal(nan, mask)
    assert (out.attention[mask.unsqueeze(1).expand_as(out.attention)] == 0).all()
    with pytest.raises(ValueError, match="no decoder"):
        model(crops, mask, reconstruction=True)


def test_wrong_weights_get_a_clear_message(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(
        {"encoder.vit_backbone.patch_embed.proj.weight": torch.zeros(8, 1, 16, 16)}, str(path)
    )
    with pytest.raises(MaeprobeInputError, match="does not fit model 'ca-mae'"):
        create_model("ca-mae", weights=path, input_size=64)
    bad = tmp_path / "truncated.safetensors"
    good = tmp_path / "good.safetensors"
    save_file(
        {k: v.contiguous() for k, v in _openphenom_state(_tiny_openphenom()).items()}, str(good)
    )
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(MaeprobeInputError, match="cannot be read as model weights"):
        create_model("ca-mae", weights=bad, input_size=64)
    pickle = tmp_path / "evil.bin"
    pickle.write_bytes(b"\x80\x04\x95 not a state dict")
    with pytest.raises(MaeprobeInputError, match="neither a safetensors file nor a torch zip"):
        create_model("ca-mae", weights=pickle, input_size=64)
