"""Many channels (issue 10, item 4): the bundled channel-agnostic model embeds a 41-channel
stack end to end; a model with a fixed channel count refuses a wrong count before any
segmentation; crop sizes that are not positive are refused; the store says per channel how each
channel was normalised (sparse IMC markers keep their signal).

The 41-channel input stands for a highly multiplexed image (CyCIF / CODEX / IMC panels of 40+
markers): 41 real 8-bit planes of the LINCS Cell Painting screen (16 fields x 5 dyes, both
plates), each cut at the same 192 x 192 window and named by plate, field and dye.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
import torch

from napari_maeprobe.embed.engine import ModelInfo
from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.plan import crop_size_for
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.models.registry import create_model
from napari_maeprobe.table import read_level

LINCS = "lincs_cellpainting_a549_dev"
WINDOW = (slice(400, 592), slice(300, 492))  # 192 x 192: four 96-px tiles


@pytest.fixture(scope="module")
def stack41(shared_dir) -> MicroscopyImage:
    """41 real planes (the first 41 of the screen's 80 files, in plate/field/dye order)."""
    import imageio.v3 as iio

    root = shared_dir / LINCS
    with open(root / "channels.csv") as f:
        dye = {r["file_token"]: r["channel"] for r in csv.DictReader(f)}
    files = sorted((root / "images").glob("*/*.png"))[:41]
    planes, names = [], []
    for path in files:
        planes.append(iio.imread(path)[WINDOW])
        token = path.stem.split("-")[1][:3]  # ch1 .. ch5
        names.append(f"{path.parent.name}_{path.stem[:9]}_{dye[token]}")
    assert len(set(names)) == 41
    return MicroscopyImage(np.stack(planes), names, "lincs41", dataset="lincs41")


def _percentile_tiles(data: np.ndarray) -> torch.Tensor:
    """The four 96-px tiles, each channel scaled by its [1, 99.8] percentiles of the whole
    window and clipped to [0, 1] (written here from the documented rule; dense channels)."""
    lo, hi = np.percentile(data.astype(np.float32), [1.0, 99.8], axis=(1, 2))
    norm = np.clip((data - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1)
    tiles = [norm[:, y : y + 96, x : x + 96] for y in (0, 96) for x in (0, 96)]
    return torch.from_numpy(np.stack(tiles).astype(np.float32))


def test_41_real_channels_embed_end_to_end(stack41, tmp_path):
    job = EmbedJob(segmentation="none", dtype="float32", precision="fp32", device="cpu")
    result = run_embedding([stack41], tmp_path / "s.zarr", job)
    assert result.rows["global"] == 4
    assert result.rows["channel"] == 4 * 41
    assert result.rows["patch"] == 4 * 41 * 64
    (info,) = result.store.image_info()
    assert info["channels"] == stack41.channel_names
    assert len(info["normalization_note"]) == 41
    # the store's rows are the model's embeddings of the four tiles (matched by content)
    model = create_model("default").eval()
    with torch.no_grad():
        want = model(_percentile_tiles(stack41.to_numpy())).global_embedding.numpy()
    got = np.asarray(read_level(result.store, "global").X)
    dist = np.abs(got[:, None] - want[None]).max(axis=-1)
    assert sorted(dist.argmin(axis=1)) == [0, 1, 2, 3]
    assert dist.min(axis=1).max() < 1e-3
    chan = read_level(result.store, "channel")
    assert set(chan.obs["channel"].astype(str)) == set(stack41.channel_names)


def test_41_channels_keep_the_channel_agnostic_symmetry(stack41):
    """Every channel gets the same position rows, past the 11 stored slots too: permuting the
    41 channels permutes the channel embeddings and leaves the global embedding unchanged."""
    x = _percentile_tiles(stack41.to_numpy())[:2]
    perm = torch.from_numpy(np.random.default_rng(0).permutation(41))
    model = create_model("default").eval()
    with torch.no_grad():
        a, b = model(x), model(x[:, perm])
    torch.testing.assert_close(a.global_embedding, b.global_embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.channel_embeddings[:, perm], b.channel_embeddings,
                               atol=1e-5, rtol=0)  # fmt: skip


def test_fixed_channel_count_is_refused_before_segmentation(stack41, tmp_path):
    """A 3-channel ViT-MAE (random weights, small) and the 41-channel stack: refused while
    planning, naming the channels and --channels, before any segmentation or store."""
    seen: list[str] = []
    job = EmbedJob(
        model="vit-mae", random_init=True, device="cpu", segmentation="builtin",
        model_options=dict(input_size=96, patch_size=16, embed_dim=48, depth=1, num_heads=3,
                           decoder_depth=0),
    )  # fmt: skip
    with pytest.raises(MaeprobeInputError) as err:
        run_embedding([stack41], tmp_path / "s.zarr", job,
                      progress=lambda d, t, desc: seen.append(desc))  # fmt: skip
    msg = str(err.value)
    assert "has 41 channel(s)" in msg and "takes exactly 3" in msg
    assert stack41.channel_names[0] in msg and "--channels " in msg
    assert "\n" not in msg
    assert "segmenting" not in seen
    assert not (tmp_path / "s.zarr").exists()
    # the advice works: the three channels it names embed
    names = msg.split("--channels ")[-1].rstrip(").").split(",")
    job.channels = names
    job.segmentation = "none"
    result = run_embedding([stack41], tmp_path / "t.zarr", job)
    assert result.rows["global"] == 4


@pytest.mark.parametrize("size", [0, -96])
def test_crop_size_must_be_positive(size):
    job = EmbedJob(crop_size=size)
    with pytest.raises(MaeprobeInputError, match=f"crop size {size} is not a positive"):
        job.check()
    info = ModelInfo("default", "", "", 144, (12, 12), True, "cpu", "fp32", (96, 96))
    with pytest.raises(MaeprobeInputError, match="--crop-size 96"):
        crop_size_for(job, info)


def test_crop_size_zero_on_the_command_line(sample_dir, tmp_path):
    from conftest import maeprobe

    img = sample_dir / "imc_bodenmiller_5ch" / "img" / "20210305_NE_mockData2_001.tiff"
    res = maeprobe("embed", str(img), "--crop-size", "0", "--out", str(tmp_path / "s.zarr"),
                   timeout=300)  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "crop size 0" in lines[0] and "--crop-size" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_store_records_how_each_imc_channel_was_normalised(sample_dir, tmp_path):
    """Real IMC with its DeepCell masks: the sparse markers (most pixels zero) are noted as
    such, and their statistics are what the sparse rule says, computed here independently."""
    root = sample_dir / "imc_bodenmiller_5ch"
    name = "20210305_NE_mockData2_001.tiff"
    data = tifffile.imread(root / "img" / name)
    labels = tifffile.imread(root / "masks_deepcell" / name).astype(np.int32)
    with open(root / "panel.csv") as f:
        chans = [r["name"] for r in csv.DictReader(f)]
    image = MicroscopyImage(data, chans, "mockData2_001")
    job = EmbedJob(levels=("global",), device="cpu")
    result = run_embedding([image], tmp_path / "s.zarr", job, labels=[labels])
    (info,) = result.store.image_info()
    stats = np.asarray(info["normalization_stats"])
    for c, note in enumerate(info["normalization_note"]):
        ch = data[c].astype(np.float32)
        zero = float((ch == 0).mean())
        assert note.startswith("sparse" if zero > 0.5 else "percentile"), (c, zero, note)
        lo = np.percentile(ch, 1.0)
        hi = np.percentile(ch[ch != 0], 99.8) if zero > 0.5 else np.percentile(ch, 99.8)
        np.testing.assert_allclose(stats[c], [lo, hi], rtol=1e-5)
