"""The command line: every verb has --help with an example; models and train run."""

from __future__ import annotations

import json
import re

import pytest

from conftest import maeprobe


@pytest.mark.parametrize(
    "verb", ["segment", "demo", "train", "models", "embed", "analyze", "export", "evaluate"]
)
def test_help_has_an_example(verb):
    proc = maeprobe(verb, "--help")
    assert proc.returncode == 0 and re.search(f"examples?:\n  maeprobe {verb}\\b", proc.stdout)


def test_models_lists_every_model_with_its_weights():
    proc = maeprobe("models")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "licence of weights" in lines[0]
    names = [ln.split()[0] for ln in lines[1:]]
    assert names == ["ca-mae", "default", "vit-mae", "dinov2", "mae3d"]
    default = next(ln for ln in lines if ln.startswith("default"))
    assert "yes: " in default and "maeprobe-default.safetensors" in default


def test_train_collects_real_images_and_writes_weights_and_curve(tmp_path, sample_dir):
    ts = tmp_path / "set.npz"
    proc = maeprobe(
        "train",
        "--data",
        str(sample_dir / "imc_bodenmiller_5ch"),
        "--save-training-set",
        str(ts),
        "--steps",
        "0",
    )
    assert proc.returncode == 0 and ts.is_file(), proc.stderr
    out = tmp_path / "w.safetensors"
    proc = maeprobe(
        "train", "--training-set", str(ts), "--out", str(out), "--steps", "3", "--batch-size", "4"
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.splitlines()[0])
    assert info["steps"] == 3 and info["device"] == "cpu"
    curve = out.with_suffix(".curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss,mse,fft,masking") and len(curve) == 4
    from napari_maeprobe.models.registry import create_model

    model = create_model("default", weights=out)
    assert model.weights_name == "w.safetensors"
