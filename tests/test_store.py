"""The embedding store: batch-by-batch writes, resume, refusal of another job, reading parts,
and the same store from a dask LocalCluster of 2 worker processes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.run_dask import close_clients
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.embed.store import (
    EmbeddingStore,
    StoreMismatchError,
    decode_column,
    encode_column,
)
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.progress import Cancelled
from napari_maeprobe.schema import OBS_COLUMNS
from napari_maeprobe.table import read_level

JOB = EmbedJob(masking="random", attention=True, reconstruction=True, dtype="float32")


@pytest.fixture(scope="module")
def imc_and_eh():
    """Two real images with shipped / given labels: IMC (55 cells, 5 markers) and a 64-cell
    chunk of ExampleHuman (3 channels), small enough for several runs in a test."""
    imc, imc_labels = load_sample("imc")
    eh, _ = load_sample("examplehuman")
    from napari_maeprobe.pp.segmentation import segment

    eh_labels = segment(eh, "builtin").labels
    return [imc, eh], [imc_labels, eh_labels]


@pytest.fixture(scope="module")
def clean_store(imc_and_eh, tmp_path_factory):
    images, labels = imc_and_eh
    out = tmp_path_factory.mktemp("clean") / "clean.zarr"
    return run_embedding(images, out, JOB, labels, per_unit=48)


def _equal(a: EmbeddingStore, b: EmbeddingStore) -> None:
    assert a.levels() == b.levels() == ["global", "channel", "patch"]
    for level in a.levels():
        ta, tb = read_level(a, level), read_level(b, level)
        pd.testing.assert_frame_equal(ta.obs, tb.obs)
        np.testing.assert_array_equal(ta.X, tb.X)
    for i in range(2):
        for name in ("attention", "reconstruction", "mask", "origins"):
            (ids_a, va), (ids_b, vb) = a.read_cells(name, i), b.read_cells(name, i)
            np.testing.assert_array_equal(ids_a, ids_b)
            np.testing.assert_array_equal(va, vb)


def test_store_rows_follow_the_contract(clean_store, imc_and_eh):
    store = clean_store.store
    images, labels = imc_and_eh
    n_cells = [len(np.unique(lab[lab > 0])) for lab in labels]
    g_table = read_level(store, "global")
    g_obs, g = g_table.obs, g_table.X
    assert len(g_obs) == sum(n_cells) and g.shape == (sum(n_cells), 144)
    assert list(g_obs.columns[: len(OBS_COLUMNS)]) == list(OBS_COLUMNS)
    assert g_obs["channel"].isna().all() and g_obs["patch_row"].isna().all()
    p_table = read_level(store, "patch")
    p_obs, p = p_table.obs, p_table.X
    # cell-major rows: every cell has channels x 8 x 8 patches; masked patches are NaN
    assert len(p_obs) == sum(n * img.n_channels * 64 for n, img in zip(n_cells, images))
    first = p_obs.iloc[:64]
    assert (first["patch_row"].to_numpy() == np.repeat(np.arange(8), 8)).all()
    assert first["channel"].nunique() == 1 and first["cell_id"].nunique() == 1
    masked = np.isnan(p).all(axis=1)
    assert 0.7 < masked.mean() < 0.8  # random masking at 0.75
    assert not np.isnan(g).any()
    # one image without reading the other
    obs1 = store.read_obs("patch", images=[1])
    assert set(obs1["image"].unique()) == {images[1].name}
    assert store.read_cells("attention", 0)[1].shape == (n_cells[0], 4, 5, 8, 8)
    assert store.read_cells("reconstruction", 1)[1].shape == (n_cells[1], 3, 96, 96)
    assert store.signature["weights_sha256"] == store.facts["weights_sha256"]
    assert len(store.signature["weights_sha256"]) == 64


def test_interrupted_store_resumes_to_the_same_result(clean_store, imc_and_eh, tmp_path):
    images, labels = imc_and_eh
    out = tmp_path / "resumed.zarr"

    def stop_midway(done, total, desc):
        return not (desc == "embedding" and done > 60)

    with pytest.raises(Cancelled):
        run_embedding(images, out, JOB, labels, progress=stop_midway, per_unit=48)
    n_finished = len(EmbeddingStore(out).units())
    assert 0 < n_finished < len(clean_store.store.units())
    result = run_embedding(images, out, JOB, labels, per_unit=48)
    assert result.units_skipped == n_finished and result.units_done > 0
    _equal(clean_store.store, result.store)


def test_a_different_job_is_refused_and_the_store_is_untouched(clean_store, imc_and_eh):
    images, labels = imc_and_eh
    path = clean_store.store.path
    before = sorted(p.name for p in path.rglob("*"))
    other = EmbedJob(masking="random", mask_ratio=0.5, attention=True, reconstruction=True,
                     dtype="float32")  # fmt: skip
    with pytest.raises(StoreMismatchError, match=r"params.mask_ratio.*--overwrite"):
        run_embedding(images, path, other, labels, per_unit=48)
    assert sorted(p.name for p in path.rglob("*")) == before


def test_local_cluster_of_two_workers_gives_the_same_store(clean_store, imc_and_eh, tmp_path):
    images, labels = imc_and_eh
    try:
        result = run_embedding(images, tmp_path / "dask.zarr", JOB, labels, per_unit=48,
                               scheduler="local")  # fmt: skip
    finally:
        close_clients()
    _equal(clean_store.store, result.store)


def test_obs_columns_round_trip_through_the_store():
    frame = pd.DataFrame({
        "s": pd.array(["a", None, "b"], dtype="string"),
        "i": pd.array([1, None, 3], dtype="Int64"),
        "b": pd.array([True, None, False], dtype="boolean"),
        "f": [0.5, np.nan, 2.0],
    })  # fmt: skip
    for col in frame:
        data, attrs = encode_column(frame[col])
        back = decode_column(data, attrs)
        assert back.isna().tolist() == frame[col].isna().tolist()
        assert back.dropna().astype(str).tolist() == frame[col].dropna().astype(str).tolist()


def test_bad_jobs_get_one_clear_message(imc_and_eh, tmp_path):
    images, labels = imc_and_eh
    with pytest.raises(MaeprobeInputError, match="--levels"):
        run_embedding(images, tmp_path / "a.zarr", EmbedJob(levels=("cells",)), labels)
    with pytest.raises(MaeprobeInputError, match="masking random"):
        run_embedding(images, tmp_path / "b.zarr", EmbedJob(reconstruction=True), labels)
    with pytest.raises(MaeprobeInputError, match="not an embedding store"):
        EmbeddingStore(tmp_path)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


# --------------------------------------------------------------------------- life cycle


@pytest.fixture(scope="module")
def interrupted(imc, tmp_path_factory):
    """An IMC store stopped after 2 of its 4 units (16 cells each)."""
    image, labels = imc
    out = tmp_path_factory.mktemp("interrupted") / "imc.zarr"

    def stop(done, total, desc):
        return not (desc == "embedding" and done > 32)

    with pytest.raises(Cancelled):
        run_embedding([image], out, EmbedJob(), [labels], progress=stop, per_unit=16)
    return out


def test_a_failed_run_leaves_no_store_and_the_fixed_rerun_succeeds(tmp_path):
    im, _ = load_sample("cellpainting")
    corner = im.with_data(im.data[:, 850:1000, 200:450], name="corner")  # no cell in it
    out = tmp_path / "corner.zarr"
    with pytest.raises(MaeprobeInputError, match="no nuclei"):
        run_embedding([corner], out, EmbedJob(segmentation="builtin", levels=("global",)))
    assert not out.exists()  # no stub left behind
    fixed = EmbedJob(segmentation="none", levels=("global",), crop_size=96)  # tile it instead
    result = run_embedding([corner], out, fixed)
    assert result.rows == {"global": 6} and result.store.is_complete()


def test_a_store_that_existed_is_never_removed_by_a_failed_run(interrupted, imc):
    image, labels = imc
    before = EmbeddingStore(interrupted).units()

    def stop_at_once(done, total, desc):
        return desc != "embedding"

    with pytest.raises(Cancelled):
        run_embedding([image], interrupted, EmbedJob(), [labels], progress=stop_at_once,
                      per_unit=16)  # fmt: skip
    assert EmbeddingStore(interrupted).units() == before and len(before) == 2


def test_an_incomplete_store_says_so_and_is_exported_only_when_allowed(interrupted, tmp_path):
    from napari_maeprobe.io.export import export_store
    from napari_maeprobe.tl.analyze import analyze_store

    store = EmbeddingStore(interrupted)
    progress = store.progress()
    assert not store.is_complete()
    assert (progress.done, progress.total, progress.cells_done, progress.cells_total) == (
        2, 4, 32, 55)  # fmt: skip
    out = tmp_path / "part.h5ad"
    with pytest.raises(MaeprobeInputError, match=r"incomplete: 32 of 55 cells \(2 of 4 units\)"
                       r".*maeprobe embed.*--allow-incomplete"):  # fmt: skip
        export_store(interrupted, "h5ad", out)
    assert not out.exists()
    with pytest.raises(MaeprobeInputError, match="incomplete"):
        analyze_store(EmbeddingStore(interrupted, mode="a"), ["global"])
    import anndata as ad

    export_store(interrupted, "h5ad", out, "global", allow_incomplete=True)
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 32
    uns = adata.uns["maeprobe"]
    assert not uns["complete"] and (uns["cells_done"], uns["cells_total"]) == (32, 55)
    assert (uns["units_done"], uns["units_total"]) == (2, 4)


def test_the_cli_refuses_an_incomplete_store_unless_allowed(interrupted, tmp_path, capsys):
    from napari_maeprobe.cli import main

    out = tmp_path / "part.csv"
    assert main(["export", str(interrupted), "--format", "csv", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "32 of 55 cells" in err[0] and "--allow-incomplete" in err[0]
    assert not out.exists()
    assert main(["export", str(interrupted), "--format", "csv", "--level", "global",
                 "--out", str(out), "--allow-incomplete"]) == 0  # fmt: skip
    assert len(pd.read_csv(out)) == 32


def test_a_bundled_store_without_a_recorded_plan_counts_as_complete(sample_dir):
    store = EmbeddingStore(sample_dir / "embeddings" / "imc_default.zarr")
    assert store.is_complete() and store.progress().cells_done == 55


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(imc, tmp_path):
    import subprocess
    import sys

    image, labels = imc
    out = tmp_path / "busy.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, time\n"
         "from napari_maeprobe.embed.store import StoreLock\n"
         f"os.makedirs({str(out)!r})\n"
         f"lock = StoreLock({str(out)!r}, 'embed').acquire()\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        job = EmbedJob(levels=("global",))
        with pytest.raises(MaeprobeInputError,
                           match=rf"being written by another maeprobe process.*pid {holder.pid}"):
            run_embedding([image], out, job, [labels])  # fmt: skip
        assert not (out / "zarr.json").exists()  # nothing written past the lock
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".maeprobe.lock").is_file()  # the dead holder's lock is still there ...
    result = run_embedding([image], out, job, [labels])  # ... and is taken over
    assert result.rows == {"global": 55} and not (out / ".maeprobe.lock").exists()


def test_a_store_whose_job_changed_under_the_writer_is_not_marked_complete(imc, tmp_path):
    import json

    image, labels = imc
    out = tmp_path / "raced.zarr"
    meta_file = out / "zarr.json"

    def other_writer(done, total, desc):
        if desc == "embedding":  # another process (no lock) rewrites the job's signature
            meta = json.loads(meta_file.read_text())
            meta["attributes"]["maeprobe"]["signature"]["params"]["seed"] = 2
            meta_file.write_text(json.dumps(meta))
        return True

    with pytest.raises(StoreMismatchError, match="changed while this run"):
        run_embedding([image], out, EmbedJob(levels=("global",)), [labels],
                      progress=other_writer, per_unit=16)  # fmt: skip
    assert out.exists() and EmbeddingStore(out).units() == []  # the other job's store is kept
