"""Weights: hub ids offline give one clear message; checkpoints are sniffed, never unpickled."""

from __future__ import annotations

import socket

import pytest
import torch

from napari_maeprobe.errors import MaeprobeInputError, WeightsNotFoundError
from napari_maeprobe.models.registry import create_model, get_spec, weights_status
from napari_maeprobe.models.weights import load_state_dict, resolve_hub_weights, sha256_file


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The hub library in its real offline mode, an empty cache, and no network at all.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` once, when it is imported,
    so setting the variables here would change nothing: its constants are patched instead. Any
    socket connection fails the test, so a regression that downloads anyway cannot pass on a
    machine with network."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted while offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def test_offline_hub_weights_name_the_file_and_the_place(offline_hub):
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # the library itself is offline, not just our variable
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_hub_weights("recursionpharma/OpenPhenom", "model.safetensors")
    msg = str(err.value)
    assert "recursionpharma/OpenPhenom/model.safetensors are not on this machine" in msg
    assert "offline mode" in msg  # the reason is the offline switch, not a network error
    assert "--weights PATH" in msg and str(offline_hub) in msg
    with pytest.raises(MaeprobeInputError, match="OpenPhenom"):
        create_model("ca-mae")
    assert weights_status(get_spec("ca-mae"))[0] is False


def test_offline_hub_weights_come_from_the_cache(offline_hub):
    """A file already in the hub cache is found offline (and loads) without any network."""
    from safetensors.torch import save_file

    from napari_maeprobe.models.camae import CAMAE

    model = CAMAE(input_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    repo = offline_hub / "models--recursionpharma--OpenPhenom"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(snapshot / "model.safetensors"))  # fmt: skip
    path = resolve_hub_weights("recursionpharma/OpenPhenom", "model.safetensors")
    assert path == snapshot / "model.safetensors"
    assert weights_status(get_spec("ca-mae")) == (True, str(path))
    loaded = create_model("ca-mae")
    assert loaded.weights_name == "model.safetensors" and loaded.config.input_size == 32


def test_wrappers_and_prefixes_are_unwrapped(tmp_path):
    sd = {"module.a.weight": torch.ones(2, 2)}
    for i, wrapper in enumerate(("state_dict", "model", "state_dict_ema")):
        p = tmp_path / f"c{i}.pth"
        torch.save({wrapper: sd, "epoch": 3}, p)
        assert list(load_state_dict(p)) == ["a.weight"]
    assert len(sha256_file(p)) == 64


class Payload:
    """Any class: torch.load(weights_only=True) must refuse to rebuild it."""


def test_a_pickled_object_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Payload()}, p)
    with pytest.raises(MaeprobeInputError, match="cannot be read as model weights"):
        load_state_dict(p)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="do not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsNotFoundError, match="no weights file in"):
        load_state_dict(tmp_path)
