"""CA-MAE: OpenPhenom's checkpoint layout loads exactly, channel-order invariance, legacy bias."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.models.camae import CAMAE
from napari_maeprobe.models.layers import ParallelScalingBlock
from napari_maeprobe.models.registry import create_model
from napari_maeprobe.pp.masking import make_mask
from napari_maeprobe.pp.preprocessing import normalize

TINY = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, max_channels=11)


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
    """The state dict as OpenPhenom stores it, decoder keys included (ignored by our loader)."""
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


@pytest.mark.parametrize("fmt", ["safetensors", "torch_state_dict"])
def test_openphenom_checkpoint_loads_exactly(tmp_path, crops, fmt):
    ref = _tiny_openphenom()
    state = _openphenom_state(ref)
    path = tmp_path / "model.safetensors"  # OpenPhenom's file name, whatever its real format
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)  # the repo's save_pretrained writes this
    model = create_model("ca-mae", weights=path, img_size=64)
    assert model.weights_sha256 and len(model.weights_sha256) == 64
    with torch.no_grad():
        a, b = ref(crops), model(crops)
    torch.testing.assert_close(a.global_embedding, b.global_embedding, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings, rtol=0, atol=1e-6)
    assert model.backbone.blocks[0].legacy_bias


def test_golden_outputs(crops):
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


def test_any_channel_count_from_1_to_11(crops):
    model = _tiny_openphenom()
    for c in (1, 3, 11):
        x = crops[:, [i % 6 for i in range(c)]]
        with torch.no_grad():
            assert model(x).channel_embeddings.shape == (2, c, 48)
    with pytest.raises(ValueError, match="1 to 11 channels"):
        model(crops[:, [0] * 12])
    with pytest.raises(ValueError, match="64x64 crops"):
        model(crops[:, :, :32, :32])


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
        create_model("ca-mae", weights=path, img_size=64)
    bad = tmp_path / "truncated.safetensors"
    good = tmp_path / "good.safetensors"
    save_file(
        {k: v.contiguous() for k, v in _openphenom_state(_tiny_openphenom()).items()}, str(good)
    )
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(MaeprobeInputError, match="cannot be read as model weights"):
        create_model("ca-mae", weights=bad, img_size=64)
    pickle = tmp_path / "evil.bin"
    pickle.write_bytes(b"\x80\x04\x95 not a state dict")
    with pytest.raises(MaeprobeInputError, match="neither a safetensors file nor a torch zip"):
        create_model("ca-mae", weights=pickle, img_size=64)
