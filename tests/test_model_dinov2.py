"""DINOv2 baseline: checkpoint layouts, numerics against transformers, per-channel embedding.

Reference: a tiny random ``transformers.Dinov2Model`` saved with ``save_pretrained`` and run
with eager attention on each channel as a grey image (replicated to RGB, ImageNet-normalised).
Its position table is 7x7 (98 px), so 224 px crops (16x16 patches) exercise the bicubic resize.
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
from napari_maeprobe.models.dinov2 import DINOv2, DINOv2Config, checkpoint_filter  # noqa: E402
from napari_maeprobe.models.registry import create_model, get_spec  # noqa: E402
from napari_maeprobe.pp.preprocessing import normalize  # noqa: E402

TOL = 1e-5
HEADS = 4
DIM = 32


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Two real 6-channel Cell Painting crops (224x224), percentile-normalised to [0, 1]."""
    im, _ = load_sample("cellpainting")
    out = []
    for y, x in ((300, 300), (600, 500)):
        out.append(normalize(np.asarray(im.data[:, y : y + 224, x : x + 224])))
    return torch.from_numpy(np.stack(out))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    cfg = transformers.Dinov2Config(
        hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS, mlp_ratio=3,
        image_size=98, patch_size=14, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms, layer scales, biases and mask token
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("dinov2_hf")
    hf.save_pretrained(folder)
    return hf, folder


def _load(path, **kw) -> DINOv2:
    return create_model("dinov2", weights=path, num_heads=HEADS, **kw)


@pytest.fixture(scope="module")
def ours(hf_model) -> DINOv2:
    return _load(hf_model[1])


def _grey_rgb(x: torch.Tensor) -> torch.Tensor:
    """What transformers sees for each channel: the grey image as RGB, ImageNet-normalised."""
    b, c, h, w = x.shape
    grey = x.reshape(b * c, 1, h, w).expand(-1, 3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (grey - mean) / std


def _hf_run(hf, x, mask=None):
    b, c = x.shape[:2]
    bmp = None if mask is None else mask.reshape(b * c, -1)
    with torch.no_grad():
        return hf(pixel_values=_grey_rgb(x), bool_masked_pos=bmp, output_attentions=True)


def _mask(shape, ratio=0.5, seed=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < ratio


# ------------------------------------------------------------------------------------------------
# checkpoint formats


def test_checkpoint_filter_maps_hugging_face_to_a_strict_load(hf_model):
    """The Hugging Face Dinov2Model layout -> our config and keys, loaded strictly."""
    state = load_file(str(hf_model[1] / "model.safetensors"))
    cfg, sd = checkpoint_filter(state, {}, num_heads=HEADS)
    assert cfg == DINOv2Config(
        input_size=224, patch_size=14, embed_dim=DIM, depth=2, num_heads=HEADS, mlp_ratio=3.0,
        pos_embed_size=98, init_values=1.0,
    )  # fmt: skip
    DINOv2(cfg).load_state_dict(sd, strict=True)
    cfg1, sd1 = checkpoint_filter(state, {}, num_heads=HEADS, depth=1, pool="mean")
    assert cfg1.depth == 1 and cfg1.pool == "mean"
    DINOv2(cfg1).load_state_dict(sd1, strict=True)
    with pytest.raises(MaeprobeInputError, match="pos_embed_size=518 does not match"):
        checkpoint_filter(state, {}, pos_embed_size=518)


def test_config_inferred_from_checkpoint(ours):
    assert ours.embed_dim == DIM and len(ours.blocks) == 2 and ours.patch_size == (14, 14)
    assert ours.blocks[0].mlp.fc1.out_features == 3 * DIM
    assert ours.norm.eps == 1e-6 and ours.blocks[0].norm1.eps == 1e-6
    assert ours.pos_embed.shape == (1, 1 + 49, DIM)
    assert ours.channel_agnostic and not ours.has_decoder


def _internal_state(hf_state: dict, with_mask_token: bool = True) -> dict:
    """The same weights under the original DINOv2 / timm key names (qkv fused)."""
    out = {
        "cls_token": hf_state["embeddings.cls_token"],
        "pos_embed": hf_state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["layernorm.weight"],
        "norm.bias": hf_state["layernorm.bias"],
    }
    if with_mask_token:
        out["mask_token"] = hf_state["embeddings.mask_token"]
    for i in range(2):
        s, d = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{d}attn.qkv.{kind}"] = torch.cat(
                [hf_state[f"{s}attention.attention.{q}.{kind}"] for q in ("query", "key", "value")]
            )
            for a, b in (
                ("attention.output.dense", "attn.proj"),
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{d}{b}.{kind}"] = hf_state[f"{s}{a}.{kind}"]  # fmt: skip
        out[f"{d}ls1.gamma"] = hf_state[f"{s}layer_scale1.lambda1"]
        out[f"{d}ls2.gamma"] = hf_state[f"{s}layer_scale2.lambda1"]
    return out


def test_other_layouts_load(hf_model, ours, crops, tmp_path):
    hf, folder = hf_model
    state = load_file(str(folder / "model.safetensors"))
    assert "encoder.layer.0.layer_scale1.lambda1" in state  # the layout transformers 5 writes
    save_file(_internal_state(state), str(tmp_path / "timm.safetensors"))
    torch.save({"model": _internal_state(state)}, tmp_path / "original.pth")
    torch.save(hf.state_dict(), tmp_path / "v5_memory.pth")  # attention.q_proj / o_proj names
    classifier = {"dinov2." + k: v for k, v in state.items()}
    classifier["classifier.weight"] = torch.zeros(10, 2 * DIM)
    classifier["classifier.bias"] = torch.zeros(10)
    save_file(classifier, str(tmp_path / "classifier.safetensors"))
    x = crops[:1, :2]
    mask = _mask((1, 2, 16, 16))
    ref = ours(x, mask, attention=True)
    for name in ("timm.safetensors", "original.pth", "v5_memory.pth", "classifier.safetensors"):
        out = _load(tmp_path / name)(x, mask, attention=True)
        for field in ("global_embedding", "channel_embeddings", "attention"):
            assert torch.equal(getattr(out, field), getattr(ref, field)), (name, field)
    # without a mask token (timm drops it): masked patches embed as zeros
    save_file(_internal_state(state, False), str(tmp_path / "no_mask_token.safetensors"))
    m = _load(tmp_path / "no_mask_token.safetensors")
    assert not m.mask_token.any()
    assert torch.equal(m(x).global_embedding, ours(x).global_embedding)
    assert not torch.equal(m(x, mask).global_embedding, ours(x, mask).global_embedding)


def test_unsupported_checkpoints(hf_model, tmp_path):
    state = load_file(str(hf_model[1] / "model.safetensors"))
    state["embeddings.register_tokens"] = torch.zeros(1, 4, DIM)
    save_file(state, str(tmp_path / "reg.safetensors"))
    with pytest.raises(MaeprobeInputError, match="registers"):
        _load(tmp_path / "reg.safetensors")
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(MaeprobeInputError, match="not a DINOv2 checkpoint"):
        _load(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------------------
# numerics against transformers


@pytest.mark.parametrize("window", [(224, 224), (98, 98), (112, 154)])
def test_unmasked_matches_transformers(hf_model, ours, crops, window):
    """224: table resized 7->16; 98: the table as is; 112x154: a non-square grid."""
    hf = hf_model[0]
    x = crops[:, :3, : window[0], : window[1]].contiguous()
    b, c = x.shape[:2]
    grid = (window[0] // 14, window[1] // 14)
    ref = _hf_run(hf, x)
    with torch.no_grad():
        h, probs, _ = ours.encode(x, attention=True)
        out = ours(x, attention=True)
    torch.testing.assert_close(h, ref.last_hidden_state, atol=TOL, rtol=0)
    pooled = ref.pooler_output.reshape(b, c, DIM)
    torch.testing.assert_close(out.channel_embeddings, pooled, atol=TOL, rtol=0)
    torch.testing.assert_close(out.global_embedding, pooled.mean(1), atol=TOL, rtol=0)
    patches = ref.last_hidden_state[:, 1:].reshape(b, c, *grid, DIM)
    torch.testing.assert_close(out.patch_embeddings, patches, atol=TOL, rtol=0)
    torch.testing.assert_close(out.extras["patch_mean"], patches.mean((2, 3)), atol=TOL, rtol=0)
    cls_att = ref.attentions[-1][:, :, 0, 1:].reshape(b, c, HEADS, *grid).transpose(1, 2)
    torch.testing.assert_close(out.attention, cls_att, atol=TOL, rtol=0)
    torch.testing.assert_close(probs, ref.attentions[-1], atol=TOL, rtol=0)


def test_masked_matches_transformers(hf_model, ours, crops):
    hf = hf_model[0]
    x = crops[:, :3]
    mask = _mask((2, 3, 16, 16))
    ref = _hf_run(hf, x, mask)
    out = ours(x, mask, attention=True)
    patches = ref.last_hidden_state[:, 1:].reshape(2, 3, 16, 16, DIM)
    pe = out.patch_embeddings
    assert torch.isnan(pe[mask]).all() and not torch.isnan(pe[~mask]).any()
    torch.testing.assert_close(pe[~mask], patches[~mask], atol=TOL, rtol=0)
    pooled = ref.pooler_output.reshape(2, 3, DIM)
    torch.testing.assert_close(out.channel_embeddings, pooled, atol=TOL, rtol=0)
    att = out.attention.permute(0, 2, 3, 4, 1)  # (B, C, gy, gx, heads)
    ref_att = ref.attentions[-1][:, :, 0, 1:].reshape(2, 3, HEADS, 16, 16).permute(0, 1, 3, 4, 2)
    assert (att[mask] == 0).all()
    torch.testing.assert_close(att[~mask], ref_att[~mask], atol=TOL, rtol=0)
    torch.testing.assert_close(out.mask, mask)
    # pool="mean": the mean of the visible patch tokens
    mean_model = _load(hf_model[1], pool="mean")
    out_mean = mean_model(x, mask)
    expected = torch.stack([patches[i, j][~mask[i, j]].mean(0) for i in range(2) for j in range(3)])
    torch.testing.assert_close(
        out_mean.channel_embeddings, expected.reshape(2, 3, DIM), atol=TOL, rtol=0
    )
    torch.testing.assert_close(out_mean.extras["cls"], out.channel_embeddings)


# ------------------------------------------------------------------------------------------------
# multichannel behaviour and the interface


def test_channels_embedded_independently(ours, crops):
    out = ours(crops)
    assert out.channel_embeddings.shape == (2, 6, DIM)
    bumped = crops.clone()
    bumped[:, 4] = 1.0 - bumped[:, 4]
    out2 = ours(bumped)
    keep = [0, 1, 2, 3, 5]
    torch.testing.assert_close(
        out2.channel_embeddings[:, keep], out.channel_embeddings[:, keep], atol=1e-6, rtol=0
    )
    assert (out2.channel_embeddings[:, 4] - out.channel_embeddings[:, 4]).abs().max() > 1e-3
    # channel order: per-channel outputs permute with the input, the global one is invariant
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out3 = ours(crops[:, perm])
    torch.testing.assert_close(
        out3.channel_embeddings, out.channel_embeddings[:, perm], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(out3.global_embedding, out.global_embedding, atol=1e-6, rtol=0)


def test_output_shapes_and_types(ours, crops):
    mask = _mask((2, 6, 16, 16))
    out = ours(crops, mask, attention=True)
    assert out.global_embedding.shape == (2, DIM)
    assert out.channel_embeddings.shape == (2, 6, DIM)
    assert out.patch_embeddings.shape == (2, 6, 16, 16, DIM)
    assert out.attention.shape == (2, HEADS, 6, 16, 16)
    assert out.attention_mean.shape == (2, 6, 16, 16)
    assert out.reconstruction is None and out.mask.dtype == torch.bool
    assert out.extras["cls"].shape == out.extras["patch_mean"].shape == (2, 6, DIM)
    for t in (out.global_embedding, out.channel_embeddings, out.patch_embeddings, out.attention):
        assert t.dtype == torch.float32
    assert ours.token_grid((6, 224, 224)) == (6, 16, 16)
    plain = ours(crops[:, :1])
    assert plain.mask is None and plain.attention is None
    with pytest.raises(ValueError, match="no decoder"):
        ours(crops, reconstruction=True)
    with pytest.raises(ValueError, match="multiple"):
        ours(crops[..., :220])
    with pytest.raises(ValueError, match="patch grid"):
        ours(crops, torch.zeros(2, 16, 16, dtype=torch.bool))


def test_deterministic(ours, crops):
    a, b = ours(crops, attention=True), ours(crops, attention=True)
    for field in ("global_embedding", "channel_embeddings", "patch_embeddings", "attention"):
        assert torch.equal(getattr(a, field), getattr(b, field))


def test_registry_and_base_architecture():
    spec = get_spec("dinov2")
    assert spec.embed_dim == 768 and not spec.has_decoder and spec.licence == "Apache-2.0"
    assert spec.hub == ("facebook/dinov2-base", "model.safetensors")
    with torch.device("meta"):  # the architecture only
        m = DINOv2(DINOv2Config())
    assert m.embed_dim == 768 and len(m.blocks) == 12 and m.blocks[0].attn.num_heads == 12
    assert m.blocks[0].mlp.fc1.out_features == 3072 and m.pos_embed.shape == (1, 1370, 768)
    assert m.blocks[0].ls1.gamma.shape == (768,) and m.patch_size == (14, 14)
    assert 86e6 < sum(p.numel() for p in m.parameters()) < 87e6  # ViT-B/14 (~86.6M)
    with pytest.raises(MaeprobeInputError, match="no option 'widht'.*embed_dim"):
        create_model("dinov2", random_init=True, widht=3)
    with pytest.raises(MaeprobeInputError, match="pool='max'.*use pool= one of"):
        create_model("dinov2", random_init=True, embed_dim=32, depth=1, num_heads=4, pool="max")


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
    m = create_model("dinov2", random_init=True, embed_dim=DIM, depth=2, num_heads=HEADS,
                     mlp_ratio=2.0, pos_embed_size=70)  # fmt: skip
    _deterministic(m)
    mask = _mask((2, 6, 16, 16), ratio=0.3)
    out = m(crops, mask, attention=True)
    got = [
        out.global_embedding[0, :4].tolist(),
        out.channel_embeddings[1, 5, -2:].tolist(),
        out.attention[1, 2, 3][~mask[1, 3]].topk(3).values.tolist(),
        out.extras["patch_mean"][0, 4, :3].tolist(),
    ]
    for g, e in zip(got, GOLDEN):
        np.testing.assert_allclose(g, e, atol=1e-9, rtol=1e-4)


# torch 2.13 CPU, float32; regenerate only for an intended change of the numerics
GOLDEN = [
    [0.8521717, 0.1090797, -0.5921363, -0.6614553],
    [1.234917, 1.606536],
    [2.096362e-04, 1.993114e-04, 1.985897e-04],
    [0.08680726, -0.9805672, 1.371440],
]
