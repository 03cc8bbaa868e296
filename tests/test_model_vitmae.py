"""ViT-MAE: checkpoint layouts, numerics against transformers, channel adaptation, masks.

Reference: tiny random ``transformers.ViTMAEForPreTraining`` models saved with
``save_pretrained`` (the real on-disk format) and run with eager attention and explicit noise
(``noise = mask + tiny increasing jitter``), so that transformers keeps the visible tokens in
raster order and its outputs line up with ours token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from napari_maeprobe.errors import MaeprobeInputError  # noqa: E402
from napari_maeprobe.io.samples import load_sample  # noqa: E402
from napari_maeprobe.models import builtin  # noqa: E402, F401  (registers the package's models)
from napari_maeprobe.models.base import ModelOutput  # noqa: E402
from napari_maeprobe.models.registry import create_model, get_spec  # noqa: E402
from napari_maeprobe.models.vitmae import (  # noqa: E402
    ViTMAE,
    ViTMAEConfig,
    adapt_pred_rows,
    checkpoint_filter,
    mae_sincos_2d,
)
from napari_maeprobe.pp.preprocessing import normalize  # noqa: E402

TOL = 1e-5
GRID = (14, 14)  # 224 / 16
L = GRID[0] * GRID[1]
HEADS, DEC_HEADS = 4, 2


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Two real 6-channel Cell Painting crops (224x224), percentile-normalised to [0, 1]."""
    im, _ = load_sample("cellpainting")
    out = []
    for y, x in ((300, 300), (600, 500)):
        out.append(normalize(np.asarray(im.data[:, y : y + 224, x : x + 224])))
    return torch.from_numpy(np.stack(out))


@pytest.fixture(scope="module")
def rgb(crops) -> torch.Tensor:
    return crops[:, :3].contiguous()


def _tiny_hf():
    cfg = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=48,
        decoder_hidden_size=16, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=24,
        image_size=224, patch_size=16, mask_ratio=0.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    # transformers 5.23 leaves the sin-cos tables (and cls/mask tokens) of a freshly built
    # ViTMAE at zero: run its own table initialisation, as a pretrained file would have them.
    hf.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    hf.vit.embeddings.initialize_weights()
    hf.decoder.initialize_weights(L)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms, biases and tokens
        for name, p in hf.named_parameters():
            if "position" not in name and "pos_embed" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return hf


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    hf = _tiny_hf()
    folder = tmp_path_factory.mktemp("vitmae_hf")
    hf.save_pretrained(folder)
    return hf, folder


def _load(path, **kw) -> ViTMAE:
    return create_model("vit-mae", weights=path, num_heads=HEADS, decoder_num_heads=DEC_HEADS, **kw)


@pytest.fixture(scope="module")
def ours(hf_model) -> ViTMAE:
    return _load(hf_model[1])


def _noise(mask: torch.Tensor | None, b: int) -> torch.Tensor:
    """transformers noise that masks ``mask`` and keeps visible tokens in raster order."""
    jitter = torch.arange(L, dtype=torch.float32) / L * 1e-3
    if mask is None:
        return jitter.expand(b, L).clone()
    return mask.reshape(b, L).float() + jitter


def _fixed_mask(b: int, n_masked: int = 147, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(b, L, dtype=torch.bool)
    for i in range(b):
        m[i, torch.randperm(L, generator=g)[:n_masked]] = True
    return m.reshape(b, *GRID)


def _hf_run(hf, ours, x, mask):
    ratio = 0.0 if mask is None else float(mask[0].sum()) / L
    hf.config.mask_ratio = ratio
    with torch.no_grad():
        return hf(pixel_values=ours.normalize(x), noise=_noise(mask, x.shape[0]),
                  output_attentions=True, output_hidden_states=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# checkpoint formats


def test_transformers5_writes_decoder_encoder_keys(hf_model):
    """What transformers 5.x save_pretrained puts on disk (the layout we must read)."""
    keys = load_file(str(hf_model[1] / "model.safetensors")).keys()
    assert "vit.encoder.layer.0.attention.attention.query.weight" in keys
    assert "vit.encoder.layer.1.intermediate.dense.weight" in keys
    assert "decoder.decoder_encoder.layer.0.attention.attention.query.weight" in keys
    assert not any(k.startswith("decoder.decoder_layers.") for k in keys)


def test_checkpoint_filter_maps_hugging_face_to_a_strict_load(hf_model):
    """The transformers 5.x on-disk layout -> our config and keys, loaded strictly."""
    state = load_file(str(hf_model[1] / "model.safetensors"))
    cfg, sd = checkpoint_filter(state, {}, num_heads=HEADS, decoder_num_heads=DEC_HEADS)
    assert cfg == ViTMAEConfig(
        input_size=224, patch_size=16, in_chans=3, embed_dim=32, depth=2, num_heads=HEADS,
        mlp_ratio=1.5, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=DEC_HEADS,
        decoder_mlp_ratio=1.5, eps=1e-12,
    )  # fmt: skip
    ViTMAE(cfg).load_state_dict(sd, strict=True)
    cfg1, sd1 = checkpoint_filter(state, {}, num_heads=HEADS, depth=1)  # first block, no decoder
    assert cfg1.depth == 1 and cfg1.decoder_depth == 0
    ViTMAE(cfg1).load_state_dict(sd1, strict=True)
    cfg6, sd6 = checkpoint_filter(state, {}, num_heads=HEADS, in_chans=6, decoder_depth=0)
    ViTMAE(cfg6).load_state_dict(sd6, strict=True)


def test_config_inferred_from_checkpoint(ours):
    assert ours.embed_dim == 32 and len(ours.blocks) == 2 and ours.in_chans == 3
    assert ours.has_decoder and len(ours.decoder_blocks) == 2
    assert ours.blocks[0].mlp.fc1.out_features == 48
    assert ours.decoder_blocks[0].mlp.fc1.out_features == 24
    assert ours.norm.eps == 1e-12 and ours.patch_size == (16, 16)
    assert ours.weights_name == "model.safetensors" and len(ours.weights_sha256) == 64


def test_transformers4_and_in_memory_layouts_load(hf_model, ours, rgb, tmp_path):
    hf, folder = hf_model
    state = load_file(str(folder / "model.safetensors"))
    v4 = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
          for k, v in state.items()}  # fmt: skip
    save_file(v4, str(tmp_path / "v4.safetensors"))
    torch.save(hf.state_dict(), tmp_path / "v5_memory.pth")  # vit.layers.N.attention.q_proj ...
    mask = _fixed_mask(2)
    ref = ours(rgb, mask, attention=True, reconstruction=True)
    for name in ("v4.safetensors", "v5_memory.pth"):
        out = _load(tmp_path / name)(rgb, mask, attention=True, reconstruction=True)
        for field in ("global_embedding", "attention", "reconstruction"):
            assert torch.equal(getattr(out, field), getattr(ref, field)), (name, field)


def _timm_state(hf_state: dict, decoder: bool) -> dict:
    """The same weights under timm / original-MAE key names (qkv fused)."""
    out = {
        "cls_token": hf_state["vit.embeddings.cls_token"],
        "pos_embed": hf_state["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["vit.layernorm.weight"],
        "norm.bias": hf_state["vit.layernorm.bias"],
    }

    def layers(src: str, dst: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for kind in ("weight", "bias"):
                out[d + "attn.qkv." + kind] = torch.cat(
                    [hf_state[f"{s}attention.attention.{q}.{kind}"]
                     for q in ("query", "key", "value")]
                )  # fmt: skip
                for a, b in (
                    ("attention.output.dense", "attn.proj"),
                    ("intermediate.dense", "mlp.fc1"),
                    ("output.dense", "mlp.fc2"),
                    ("layernorm_before", "norm1"),
                    ("layernorm_after", "norm2"),
                ):
                    out[f"{d}{b}.{kind}"] = hf_state[f"{s}{a}.{kind}"]  # fmt: skip

    layers("vit.encoder.layer.", "blocks.", 2)
    if decoder:
        layers("decoder.decoder_encoder.layer.", "decoder_blocks.", 2)
        for k in ("decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
                  "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias", "mask_token",
                  "decoder_pos_embed"):  # fmt: skip
            out[k] = hf_state["decoder." + k]
    return out


def test_timm_layout_safetensors_and_wrapped_pth(hf_model, ours, rgb, tmp_path):
    state = load_file(str(hf_model[1] / "model.safetensors"))
    sd = _timm_state(state, decoder=False)
    sd["head.weight"] = torch.zeros(0, 32)  # timm's empty classifier of num_classes=0: ignored
    save_file(sd, str(tmp_path / "timm.safetensors"))
    torch.save({"model": sd, "epoch": 799}, tmp_path / "mae_pretrain.pth")
    mask = _fixed_mask(2)
    ref = ours(rgb, mask, attention=True)
    loaded = [_load(tmp_path / "timm.safetensors"), _load(tmp_path / "mae_pretrain.pth")]
    outs = [m(rgb, mask, attention=True) for m in loaded]
    assert torch.equal(outs[0].global_embedding, outs[1].global_embedding)
    for m, out in zip(loaded, outs):
        assert not m.has_decoder and m.norm.eps == 1e-6  # timm / MAE layer-norm eps
        torch.testing.assert_close(out.global_embedding, ref.global_embedding, atol=TOL, rtol=0)
        torch.testing.assert_close(out.attention, ref.attention, atol=TOL, rtol=0)
        vis = ~mask
        torch.testing.assert_close(
            out.patch_embeddings[vis], ref.patch_embeddings[vis], atol=TOL, rtol=0
        )
        with pytest.raises(ValueError, match="no decoder"):
            m(rgb, mask, reconstruction=True)


def test_original_mae_layout_with_decoder(hf_model, ours, rgb, tmp_path):
    state = load_file(str(hf_model[1] / "model.safetensors"))
    torch.save({"model": _timm_state(state, decoder=True)}, tmp_path / "mae_visualize.pth")
    m = _load(tmp_path / "mae_visualize.pth")
    assert m.has_decoder
    mask = _fixed_mask(2)
    out, ref = m(rgb, mask, reconstruction=True), ours(rgb, mask, reconstruction=True)
    torch.testing.assert_close(out.reconstruction, ref.reconstruction, atol=TOL, rtol=0)


def test_not_a_vitmae_checkpoint(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(MaeprobeInputError, match="not a ViT-MAE checkpoint"):
        create_model("vit-mae", weights=tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------------------
# numerics against transformers


def test_position_tables_match_transformers(hf_model, ours):
    hf = hf_model[0]
    torch.testing.assert_close(
        hf.vit.embeddings.position_embeddings.detach(), mae_sincos_2d(32, GRID), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        hf.decoder.decoder_pos_embed.detach(), mae_sincos_2d(16, GRID), atol=1e-6, rtol=0
    )
    assert torch.equal(ours.pos_embed, hf.vit.embeddings.position_embeddings.detach())


def test_unmasked_matches_transformers(hf_model, ours, rgb):
    hf = hf_model[0]
    ref = _hf_run(hf, ours, rgb, None)
    assert not ref.mask.any()
    with torch.no_grad():
        h, probs, flat = ours.encode(rgb, attention=True)
        out = ours(rgb, attention=True, reconstruction=True)
        logits = ours.decode(h, None, GRID)
    hidden = hf.vit(pixel_values=ours.normalize(rgb), noise=_noise(None, 2)).last_hidden_state
    torch.testing.assert_close(h, hidden, atol=TOL, rtol=0)
    torch.testing.assert_close(out.global_embedding, hidden[:, 1:].mean(1), atol=TOL, rtol=0)
    torch.testing.assert_close(probs, ref.attentions[-1], atol=TOL, rtol=0)
    cls_att = ref.attentions[-1][:, :, 0, 1:].reshape(2, HEADS, *GRID)
    torch.testing.assert_close(out.attention, cls_att, atol=TOL, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
    # nothing masked: the reconstruction is the input, the raw prediction is the decoder's
    assert torch.equal(out.reconstruction, rgb)
    pred = hf.unpatchify(ref.logits) * ours.pix_std + ours.pix_mean
    torch.testing.assert_close(out.extras["prediction"], pred, atol=TOL, rtol=0)


def test_masked_matches_transformers(hf_model, ours, rgb):
    hf = hf_model[0]
    mask = _fixed_mask(2)
    ref = _hf_run(hf, ours, rgb, mask)
    assert torch.equal(ref.mask.bool(), mask.reshape(2, L))  # the explicit mask was honoured
    with torch.no_grad():
        h, probs, flat = ours.encode(rgb, mask, attention=True)
        out = ours(rgb, mask, attention=True, reconstruction=True)
        logits = ours.decode(h, flat, GRID)
    hidden = hf.vit(pixel_values=ours.normalize(rgb), noise=_noise(mask, 2)).last_hidden_state
    torch.testing.assert_close(h, hidden, atol=TOL, rtol=0)
    torch.testing.assert_close(probs, ref.attentions[-1], atol=TOL, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
    # patch embeddings: visible tokens in raster order, NaN where masked
    pe = out.patch_embeddings
    assert torch.isnan(pe[mask]).all() and not torch.isnan(pe[~mask]).any()
    torch.testing.assert_close(pe[~mask].reshape(2, -1, 32), hidden[:, 1:], atol=TOL, rtol=0)
    torch.testing.assert_close(out.global_embedding, hidden[:, 1:].mean(1), atol=TOL, rtol=0)
    # attention: zero at masked patches, transformers' CLS row at the visible ones
    att = out.attention.permute(0, 2, 3, 1)  # (B, gy, gx, heads)
    assert (att[mask] == 0).all()
    cls_row = ref.attentions[-1][:, :, 0, 1:].transpose(1, 2).reshape(-1, HEADS)
    torch.testing.assert_close(att[~mask], cls_row, atol=TOL, rtol=0)
    # reconstruction: visible pixels pasted back, transformers' prediction elsewhere
    pred = hf.unpatchify(ref.logits) * ours.pix_std + ours.pix_mean
    m = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].float()
    torch.testing.assert_close(out.reconstruction, rgb * (1 - m) + pred * m, atol=TOL, rtol=0)
    assert torch.equal(out.reconstruction * (1 - m), rgb * (1 - m))


# ------------------------------------------------------------------------------------------------
# the interface


def test_output_shapes_and_types(ours, rgb):
    mask = _fixed_mask(2)
    out = ours(rgb, mask, attention=True, reconstruction=True)
    assert isinstance(out, ModelOutput)
    assert out.global_embedding.shape == (2, 32)
    assert out.channel_embeddings is None
    assert out.patch_embeddings.shape == (2, 14, 14, 32)
    assert out.attention.shape == (2, HEADS, 14, 14)
    assert out.attention_mean.shape == (2, 14, 14)
    assert out.reconstruction.shape == rgb.shape and out.extras["prediction"].shape == rgb.shape
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, mask)
    for t in (out.global_embedding, out.patch_embeddings, out.attention, out.reconstruction):
        assert t.dtype == torch.float32
    # CLS attention over the visible patches plus to itself sums to one
    total = out.attention.sum(dim=(2, 3)) + _cls_self(ours, rgb, mask)
    torch.testing.assert_close(total, torch.ones(2, HEADS))
    plain = ours(rgb)
    assert plain.mask is None and plain.attention is None and plain.reconstruction is None
    assert ours.token_grid((3, 224, 224)) == GRID


def _cls_self(model, x, mask) -> torch.Tensor:
    """Attention of the CLS token to itself (the rest goes to the patches)."""
    with torch.no_grad():
        _, probs, _ = model.encode(x, mask, attention=True)
    return probs[:, :, 0, 0]


def test_deterministic_without_mask(ours, rgb):
    a = ours(rgb, attention=True, reconstruction=True)
    b = ours(rgb, attention=True, reconstruction=True)
    for field in ("global_embedding", "patch_embeddings", "attention"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.extras["prediction"], b.extras["prediction"])


def test_other_crop_sizes_regenerate_sincos(ours, crops):
    x = crops[:1, :3, :160, :208]  # 10 x 13 patches
    out = ours(x, attention=True)
    assert out.patch_embeddings.shape == (1, 10, 13, 32) and out.attention.shape == (1, 4, 10, 13)
    assert torch.equal(ours._positions(ours.pos_embed, (10, 13)), mae_sincos_2d(32, (10, 13)))
    with pytest.raises(ValueError, match="multiple"):
        ours(crops[:1, :3, :200, :224])
    with pytest.raises(ValueError, match="in_chans=6"):
        ours(crops)


def test_bad_masks(ours, rgb):
    uneven = _fixed_mask(2)
    uneven[0, 0, 0] = ~uneven[0, 0, 0]
    with pytest.raises(ValueError, match="same number"):
        ours(rgb, uneven)
    with pytest.raises(ValueError, match="patch grid"):
        ours(rgb, torch.zeros(2, 7, 7, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# channel adaptation


def test_zero_adaptation_ignores_extra_channels(hf_model, ours, crops):
    six = _load(hf_model[1], in_chans=6, adapt="zero")
    w3, w6 = ours.patch_embed.proj.weight, six.patch_embed.proj.weight
    assert torch.equal(w6[:, :3], w3) and not w6[:, 3:].any()
    mask = _fixed_mask(2)
    out6 = six(crops, mask, attention=True, reconstruction=True)
    out3 = ours(crops[:, :3], mask, attention=True, reconstruction=True)
    torch.testing.assert_close(out6.global_embedding, out3.global_embedding, atol=TOL, rtol=0)
    torch.testing.assert_close(out6.attention, out3.attention, atol=TOL, rtol=0)
    # decoder_pred rows remapped: channels 0-2 reconstruct as the RGB model does ...
    torch.testing.assert_close(out6.reconstruction[:, :3], out3.reconstruction, atol=TOL, rtol=0)
    # ... and the zero-initialised extra channels predict their normalisation mean (0.449)
    m = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)
    extra = out6.reconstruction[:, 3:].permute(1, 0, 2, 3)  # (3, B, Y, X)
    torch.testing.assert_close(extra[:, m], torch.full_like(extra[:, m], 0.449), atol=1e-6, rtol=0)
    assert torch.equal(extra[:, ~m], crops[:, 3:].permute(1, 0, 2, 3)[:, ~m])
    # perturbing an extra channel changes nothing
    bumped = crops.clone()
    bumped[:, 4] = torch.rand_like(bumped[:, 4])
    assert torch.equal(six(bumped, mask).global_embedding, six(crops, mask).global_embedding)


def test_tile_adaptation_uses_extra_channels(hf_model, ours, crops):
    six = _load(hf_model[1], in_chans=6, adapt="tile")
    w3, w6 = ours.patch_embed.proj.weight, six.patch_embed.proj.weight
    for c in range(6):  # timm's adapt_input_conv: RGB repeated cyclically, all scaled by 3/N
        assert torch.equal(w6[:, c], w3[:, c % 3] * 0.5)
    base = six(crops).global_embedding
    bumped = crops.clone()
    bumped[:, 4] = 1.0 - bumped[:, 4]
    assert (six(bumped).global_embedding - base).abs().max() > 1e-3
    # extra output channels copy the rows of channel c % 3
    with torch.no_grad():
        h, _, flat = six.encode(crops, _fixed_mask(2))
        pred = six.decode(h, flat, GRID).reshape(2, L, 256, 6)
    assert torch.equal(pred[..., 3:], pred[..., :3])


def test_single_channel_and_pred_rows(hf_model, crops):
    one = _load(hf_model[1], in_chans=1)
    full = load_file(str(hf_model[1] / "model.safetensors"))
    w = full["vit.embeddings.patch_embeddings.projection.weight"]
    torch.testing.assert_close(one.patch_embed.proj.weight[:, 0], w.sum(1))
    out = one(crops[:, 4:5], _fixed_mask(2), reconstruction=True)
    assert out.reconstruction.shape == (2, 1, 224, 224)
    # the row layout: (p*P + q)*C + c
    rows = torch.arange(2 * 2 * 3, dtype=torch.float32)  # P=2, C=3
    assert adapt_pred_rows(rows, 5, "zero").tolist() == [0, 1, 2, 0, 0, 3, 4, 5, 0, 0, 6, 7, 8,
                                                          0, 0, 9, 10, 11, 0, 0]  # fmt: skip
    assert adapt_pred_rows(rows, 4, "tile").tolist()[:8] == [0, 1, 2, 0, 3, 4, 5, 3]
    assert adapt_pred_rows(rows, 1, "zero").tolist() == [1, 4, 7, 10]


def test_bad_options(hf_model):
    with pytest.raises(MaeprobeInputError, match="adapt"):
        _load(hf_model[1], in_chans=6, adapt="copy")
    with pytest.raises(MaeprobeInputError, match="no option 'widht'.*embed_dim"):
        create_model("vit-mae", random_init=True, widht=3)
    with pytest.raises(MaeprobeInputError, match="in_chans=4, or keep 3 channels"):
        _load(hf_model[1])(torch.zeros(1, 4, 32, 32))
    with pytest.raises(MaeprobeInputError, match="embed_dim=64 does not match the weights"):
        _load(hf_model[1], embed_dim=64)


# ------------------------------------------------------------------------------------------------
# registry, random init, training loss, golden numbers


def test_registry_and_base_architecture():
    spec = get_spec("vit-mae")
    assert spec.embed_dim == 768 and spec.has_decoder and spec.channels == "1+"
    assert spec.hub == ("facebook/vit-mae-base", "model.safetensors")
    assert spec.licence.startswith("facebook/vit-mae-base: CC BY-NC 4.0")
    with torch.device("meta"):  # the architecture only: no memory, no initialisation time
        m = ViTMAE(ViTMAEConfig(in_chans=5))
    assert m.embed_dim == 768 and len(m.blocks) == 12 and m.blocks[0].attn.num_heads == 12
    assert m.blocks[0].mlp.fc1.out_features == 3072 and m.patch_size == (16, 16)
    assert len(m.decoder_blocks) == 8 and m.decoder_blocks[0].attn.num_heads == 16
    assert m.decoder_pred.out_features == 16 * 16 * 5 and m.pos_embed.shape == (1, 197, 768)
    n_params = sum(p.numel() for p in m.parameters())
    assert 110e6 < n_params < 113e6  # ViT-MAE-B with its decoder (~111.7M)


def test_loss_backpropagates(crops):
    torch.manual_seed(0)
    m = create_model("vit-mae", random_init=True, in_chans=6, embed_dim=32, depth=1,
                     num_heads=4, decoder_embed_dim=16, decoder_depth=1,
                     decoder_num_heads=2)  # fmt: skip
    loss, parts = m.loss(crops, _fixed_mask(2), fft_weight=0.01)
    loss.backward()
    assert torch.isfinite(loss) and parts["mse"] > 0
    assert m.patch_embed.proj.weight.grad.abs().sum() > 0


def _deterministic(model: torch.nn.Module) -> None:
    """Overwrite every parameter with a fixed smooth pattern (no RNG involved)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            wave = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + i)
            wave = wave.reshape(p.shape).float()
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * wave)
            else:
                p.copy_(0.1 * wave)


@pytest.mark.regression
def test_regression_golden_numbers(crops):
    """Regression test: numbers this code produced earlier, not an independent reference;
    it catches an unintended change of the forward pass."""
    m = create_model("vit-mae", random_init=True, in_chans=6, adapt="tile", embed_dim=32,
                     depth=2, num_heads=4, mlp_ratio=2.0, decoder_embed_dim=16, decoder_depth=1,
                     decoder_num_heads=2, decoder_mlp_ratio=2.0)  # fmt: skip
    _deterministic(m)
    mask = _fixed_mask(2)
    out = m(crops, mask, attention=True, reconstruction=True)
    got = [
        out.global_embedding[0, :4].tolist(),
        out.global_embedding[1, -2:].tolist(),
        out.attention[1, 2][~mask[1]][:3].tolist(),
        out.extras["prediction"][0, 4, 100, 98:101].tolist(),
    ]
    for g, e in zip(got, GOLDEN):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-4)


# torch 2.13 CPU, float32; regenerate only for an intended change of the numerics
GOLDEN = [
    [0.1378250, -0.2953455, 1.305474, -0.1326874],
    [-1.062551, 0.1844649],
    [0.01057917, 0.009833878, 0.01078827],
    [0.4101913, 0.4666408, 0.4670402],
]


def test_input_size_option_regenerates_tables(hf_model, ours, rgb):
    big = _load(hf_model[1], input_size=256)
    assert torch.equal(big.pos_embed, mae_sincos_2d(32, (16, 16)))
    assert torch.equal(big.decoder_pos_embed, mae_sincos_2d(16, (16, 16)))
    # at 224 the regenerated 14x14 table equals the checkpoint's: same outputs
    torch.testing.assert_close(big(rgb).global_embedding, ours(rgb).global_embedding)
    out = big(torch.nn.functional.pad(rgb, (16, 16, 16, 16), mode="reflect"), reconstruction=True)
    assert out.patch_embeddings.shape == (2, 16, 16, 32)
