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
        oa, xa = a.read_level(level)
        ob, xb = b.read_level(level)
        pd.testing.assert_frame_equal(oa, ob)
        np.testing.assert_array_equal(xa, xb)
    for i in range(2):
        for name in ("attention", "reconstruction", "mask", "origins"):
            np.testing.assert_array_equal(a.read_cells(name, i), b.read_cells(name, i))


def test_store_rows_follow_the_contract(clean_store, imc_and_eh):
    store = clean_store.store
    images, labels = imc_and_eh
    n_cells = [len(np.unique(lab[lab > 0])) for lab in labels]
    g_obs, g = store.read_level("global")
    assert len(g_obs) == sum(n_cells) and g.shape == (sum(n_cells), 144)
    assert list(g_obs.columns[: len(OBS_COLUMNS)]) == list(OBS_COLUMNS)
    assert g_obs["channel"].isna().all() and g_obs["patch_row"].isna().all()
    p_obs, p = store.read_level("patch")
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
    assert store.read_cells("attention", 0).shape == (n_cells[0], 4, 5, 8, 8)
    assert store.read_cells("reconstruction", 1).shape == (n_cells[1], 3, 96, 96)
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
