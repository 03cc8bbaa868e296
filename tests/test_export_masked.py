"""Exports of a masked store: rows without an embedding (masked patches) are left out of X."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.run_local import run_embedding


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory, imc):
    """The IMC sample embedded with random masking (75 % of the patches hidden)."""
    image, labels = imc
    path = tmp_path_factory.mktemp("masked") / "masked.zarr"
    job = EmbedJob(levels=("global", "patch"), masking="random", mask_ratio=0.75)
    return run_embedding([image], path, job, [labels]).store


@pytest.fixture(scope="module")
def counts(masked_store):
    """(rows in the store, rows with an embedding) over both levels."""
    from napari_maeprobe.table import read_levels

    X = np.asarray(read_levels(masked_store).X, dtype=np.float32)
    embedded = int(np.isfinite(X).all(axis=1).sum())
    assert embedded < len(X)  # the premise: masking left rows without an embedding
    return len(X), embedded


def test_h5ad_of_a_masked_store_has_no_nan_rows_and_scanpy_runs(masked_store, counts, tmp_path):
    import anndata as ad

    from napari_maeprobe.io.export import export_store

    total, embedded = counts
    path = export_store(masked_store, "h5ad", tmp_path / "masked.h5ad")
    assert path.masked_rows_dropped == total - embedded and path.rows == embedded
    assert "masked patch rows" in path.left_out() and "masking hid them" in path.left_out()
    back = ad.read_h5ad(path)
    assert back.n_obs == embedded
    assert np.isfinite(back.X).all()
    facts = back.uns["maeprobe"]
    assert int(facts["masked_rows_dropped"]) == total - embedded
    assert "masked" in str(facts["masked_rows_note"])
    levels = back.obs["level"].astype(str)
    assert (levels == "global").sum() == 55  # every cell keeps its global row
    try:
        import scanpy as sc
    except ImportError:  # pragma: no cover - scanpy is an optional extra
        return
    sc.pp.pca(back, n_comps=10)
    assert np.isfinite(back.obsm["X_pca"]).all()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_flat_exports_of_a_masked_store_have_no_all_nan_embedding_rows(
    masked_store, counts, tmp_path, fmt, capsys
):
    from napari_maeprobe import cli

    total, embedded = counts
    out = tmp_path / f"masked.{fmt}"
    assert cli.main(["export", str(masked_store.path), "--format", fmt, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"left out {total - embedded:,} masked patch rows" in said, said
    table = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out, low_memory=False)
    emb = table[[c for c in table.columns if c.startswith("e") and c[1:].isdigit()]]
    assert len(table) == embedded
    assert np.isfinite(emb.to_numpy(dtype=np.float32)).all()


def test_a_selection_with_masked_rows_is_exported_without_them(masked_store, tmp_path):
    """The explorer's export (write_table of a selection) follows the same rule and leaves the
    caller's table as it was."""
    import anndata as ad

    from napari_maeprobe.io.export import write_table
    from napari_maeprobe.table import read_level

    adata = read_level(masked_store, "patch")[:1000].copy()
    finite = np.isfinite(np.asarray(adata.X, dtype=np.float32)).all(axis=1)
    path = write_table(adata, "h5ad", tmp_path / "sel.h5ad")
    assert path.masked_rows_dropped == int((~finite).sum()) > 0
    assert ad.read_h5ad(path).n_obs == int(finite.sum())
    assert adata.n_obs == 1000 and "masked_rows_dropped" not in adata.uns.get("maeprobe", {})


def test_an_unmasked_export_leaves_nothing_out(tmp_path, imc):
    import anndata as ad

    from napari_maeprobe.io.export import export_store

    image, labels = imc
    store = run_embedding([image], tmp_path / "s.zarr", EmbedJob(levels=("global",)),
                          [labels]).store  # fmt: skip
    path = export_store(store, "h5ad", tmp_path / "s.h5ad")
    assert path.masked_rows_dropped == 0 and path.left_out() is None
    back = ad.read_h5ad(path)
    assert back.n_obs == 55 and int(back.uns["maeprobe"]["masked_rows_dropped"]) == 0
