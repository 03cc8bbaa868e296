"""Weights: hub ids offline give one clear message; checkpoints are sniffed, never unpickled."""

from __future__ import annotations

import pytest
import torch

from napari_maeprobe.errors import MaeprobeInputError, WeightsNotFoundError
from napari_maeprobe.models.registry import create_model
from napari_maeprobe.models.weights import load_state_dict, resolve_hub_weights, sha256_file


def test_offline_hub_weights_name_the_file_and_the_place(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_hub_weights("recursionpharma/OpenPhenom", "model.safetensors")
    msg = str(err.value)
    assert "recursionpharma/OpenPhenom/model.safetensors are not on this machine" in msg
    assert "--weights PATH" in msg and str(tmp_path / "hub") in msg
    with pytest.raises(MaeprobeInputError, match="OpenPhenom"):
        create_model("ca-mae")


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
