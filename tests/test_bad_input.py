"""Bad input: one clear line on stderr, exit status 2, no traceback, no half-written output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_maeprobe import read_image
from napari_maeprobe.errors import MaeprobeInputError, NoCellsFoundError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.segmentation import segment


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "napari_maeprobe.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("maeprobe ") and "Fix:" in last, err
    for n in needles:
        assert n in last, last


@pytest.fixture()
def out(tmp_path):
    return tmp_path / "out"


def test_truncated_tiff(tmp_path, sample_dir, out):
    src = sample_dir / "alsf_cellpainting_6ch/images/orig/r03c03f03p01-ch5sk1fk1fl1.tiff"
    bad = tmp_path / "dna.tiff"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size - 50_000])
    proc = run_cli("segment", str(bad), "--out", str(out))
    assert_one_clear_line(
        proc, "dna.tiff is truncated or damaged", "copy or download the file again"
    )
    assert not out.exists()


def test_one_dimensional_array(tmp_path, out):
    path = tmp_path / "line.npy"
    np.save(path, np.arange(100, dtype=np.uint16))
    proc = run_cli("segment", str(path), "--out", str(out))
    assert_one_clear_line(proc, "shape (100,)", "at least two dimensions")


def test_nans(tmp_path, sample_dir, out):
    arr = read_image(
        sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff"
    ).to_numpy()
    arr[4, 5:8, 5:8] = np.nan
    path = tmp_path / "region.npy"
    np.save(path, arr)
    proc = run_cli(
        "segment",
        str(path),
        "--out",
        str(out),
        "--channel-names",
        "Ag107,Cytokeratin 5,Laminin,YBX1,H3K27Ac",
    )
    assert_one_clear_line(proc, "9 pixel(s) are NaN", "H3K27Ac", "nan_to_num")
    assert not out.exists()


def test_empty_image(tmp_path, out):
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.zeros((3, 64, 64), np.uint16), metadata={"axes": "CYX"})
    proc = run_cli("segment", str(path), "--out", str(out))
    assert_one_clear_line(proc, "blank: the image is empty")


def test_no_cells_in_a_background_crop(sample_dir):
    # a real corner of the Cell Painting field with no cell in it
    im, _ = load_sample("cellpainting")
    corner = im.with_data(im.data[:, 850:1000, 200:450], name="corner")
    with pytest.raises(NoCellsFoundError, match="corner: no nuclei stand out from the background"):
        segment(corner, "builtin")


def test_missing_channel(sample_dir, out):
    proc = run_cli(
        "segment",
        str(sample_dir / "cellprofiler_examplehuman_3ch"),
        "--out",
        str(out),
        "--channels",
        "DNA,Tubulin",
    )
    assert_one_clear_line(proc, "'Tubulin' not found", "DNA, PH3, cellbody")


def test_folder_with_mismatched_sizes(tmp_path, sample_dir, out):
    src = sample_dir / "cellprofiler_examplehuman_3ch"
    for f in sorted(src.glob("*.tif")):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    odd = tmp_path / "AS_09125_050116030001_D03f00d2.tif"
    tifffile.imwrite(odd, tifffile.imread(odd)[:300, :400])
    proc = run_cli("segment", str(tmp_path), "--out", str(out))
    assert_one_clear_line(proc, "different sizes", "D03f00d2.tif 300x400", "same size")


def test_debug_shows_the_traceback(tmp_path, out):
    path = tmp_path / "line.npy"
    np.save(path, np.arange(10))
    proc = run_cli("--debug", "segment", str(path), "--out", str(out))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unknown_axes_letters(sample_dir):
    with pytest.raises(MaeprobeInputError, match="axes 'QYX' are not understood"):
        read_image(sample_dir / "cells3d_nuclei_3d_labels/nuclei.tif", axes="QYX")


def test_segment_cli_writes_labels(sample_dir, out):
    proc = run_cli(
        "segment",
        str(sample_dir / "cellprofiler_examplehuman_3ch"),
        "--out",
        str(out),
        "--method",
        "builtin",
    )
    assert proc.returncode == 0, proc.stderr
    labels = tifffile.imread(out / "AS_09125_050116030001_D03f00_labels.tif")
    assert labels.shape == (512, 512) and 250 <= labels.max() <= 400
    boundary = tifffile.imread(out / "AS_09125_050116030001_D03f00_boundary.tif")
    assert set(np.unique(boundary)) == {0, 1}
    assert "cells (builtin, nucleus channel DNA)" in proc.stdout


# --------------------------------------------------------------------------- stores and files


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.is_dir(), p.stat().st_size)
                  for p in folder.rglob("*"))  # fmt: skip


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert_one_clear_line(proc, *needles)
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("target", ["missing", "empty", "random"])
@pytest.mark.parametrize("verb", ["analyze", "export", "evaluate", "report"])
def test_read_only_verbs_leave_a_path_that_is_not_a_store_alone(tmp_path, verb, target):
    path = tmp_path / "typo.zarr"
    if target != "missing":
        path.mkdir()
    if target == "random":
        (path / "notes.txt").write_text("not a store")
        (path / "sub").mkdir()
    before = _snapshot(tmp_path)
    extra = ["--format", "h5ad", "--out", str(tmp_path / "x.h5ad")] if verb == "export" else []
    proc = run_cli(verb, str(path), *extra)
    _one_line(proc, f"{path} is not an embedding store")
    assert _snapshot(tmp_path) == before


def test_a_store_with_a_broken_zarr_json_gets_one_line(tmp_path):
    store = tmp_path / "broken.zarr"
    (store / "units").mkdir(parents=True)
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    for args in (["analyze"], ["evaluate"], ["export", "--format", "csv", "--out", "x.csv"]):
        proc = run_cli(args[0], str(store), *args[1:])
        _one_line(proc, "zarr.json is not valid JSON")


def test_output_paths_that_cannot_be_written_get_one_line(tmp_path, sample_dir):
    store = str(sample_dir / "embeddings" / "imc_default.zarr")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = run_cli("export", store, "--format", "csv", "--level", "global",
                   "--out", str(a_file / "x.csv"))  # fmt: skip
    _one_line(proc, f"{a_file} is a file, not a folder")
    proc = run_cli("export", store, "--format", "csv", "--level", "global",
                   "--out", str(tmp_path))  # fmt: skip
    _one_line(proc, f"{tmp_path} is a folder")
    proc = run_cli("evaluate", store, "--levels", "global", "--json", str(a_file / "e.json"))
    _one_line(proc, f"{a_file} is a file, not a folder")
    image = str(sample_dir / "imc_bodenmiller_5ch/img/20210305_NE_mockData2_001.tiff")
    proc = run_cli("embed", image, "--out", str(a_file))
    _one_line(proc, f"{a_file} is a file")
    proc = run_cli("embed", image, "--out", str(a_file / "s.zarr"))
    _one_line(proc, f"{a_file} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    "error, needle",
    [
        (PermissionError(13, "Permission denied", "/data/out.h5ad"), "no permission"),
        (IsADirectoryError(21, "Is a directory", "/data/out"), "/data/out is a folder"),
        (NotADirectoryError(20, "Not a directory", "/data/f/out.h5ad"), "is a file"),
        (FileNotFoundError(2, "No such file or directory", "/data/gone"), "does not exist"),
        (OSError(28, "No space left on device", "/data/out.h5ad"), "no space left"),
    ],
)
def test_file_system_errors_are_one_line(monkeypatch, capsys, error, needle):
    from napari_maeprobe import cli
    from napari_maeprobe.io import export

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(export, "export_store", fail)
    assert cli.main(["export", "s.zarr", "--format", "csv", "--out", "x.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Fix:" in err[0], err
    with pytest.raises(type(error)):
        cli.main(["--debug", "export", "s.zarr", "--format", "csv", "--out", "x.csv"])


def test_atomic_write_removes_temporaries_left_by_dead_processes(tmp_path):
    import os

    from napari_maeprobe.io.files import atomic_write, temporary_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "out.h5ad"
    stale = tmp_path / temporary_name(target, pid=dead.pid)
    alive = tmp_path / temporary_name(target, pid=os.getppid())
    other = tmp_path / temporary_name(tmp_path / "other.h5ad", pid=dead.pid)
    old_style = tmp_path / ".out.h5ad.rr_geq6o.h5ad"  # named as earlier versions did
    fresh_old_style = tmp_path / ".out.h5ad.a1b2c3d4.h5ad"
    for p in (stale, alive, other, old_style, fresh_old_style):
        p.write_bytes(b"half")
    os.utime(old_style, (0, 0))  # an earlier version's temporary file, untouched for long
    atomic_write(target, lambda p: p.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole"
    assert not stale.exists() and not old_style.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, alive.name, other.name, fresh_old_style.name])  # fmt: skip


def test_analyze_is_refused_while_another_process_writes_the_store(tmp_path, sample_dir, capsys):
    import shutil

    from napari_maeprobe.cli import main
    from napari_maeprobe.embed.store import StoreLock

    store = tmp_path / "imc.zarr"
    shutil.copytree(sample_dir / "embeddings" / "imc_default.zarr", store)
    before = _snapshot(tmp_path)
    with StoreLock(store, "embed"):  # as a running `maeprobe embed` holds it
        assert main(["analyze", str(store), "--levels", "global"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is being written by another maeprobe process (maeprobe embed, pid" \
        in err[0], err  # fmt: skip
    assert _snapshot(tmp_path) == before  # untouched, and the lock file is gone
