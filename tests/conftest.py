"""Shared fixtures: the bundled real sample data and the shared data folder beside the repo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED


def maeprobe(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the ``maeprobe`` command line in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "napari_maeprobe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def imc():
    """The IMC sample (55 cells, 5 markers) with its shipped masks: (image, labels)."""
    from napari_maeprobe.io.samples import load_sample

    return load_sample("imc")
