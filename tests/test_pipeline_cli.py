"""The headless pipeline end to end through the command line, on a real IMC image with its
shipped DeepCell masks: embed -> analyze -> evaluate -> export (h5ad, parquet, csv) -> scanpy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import maeprobe
from napari_maeprobe.schema import OBS_COLUMNS

IMAGE = "20210305_NE_mockData2_001"


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_dir):
    tmp = tmp_path_factory.mktemp("pipeline")
    meta = tmp / "meta.csv"
    meta.write_text(f"image,condition,well\n{IMAGE},mock,B3\n")
    out = tmp / "imc.zarr"
    imc = sample_dir / "imc_bodenmiller_5ch"
    args = (
        "embed", str(imc / "img" / f"{IMAGE}.tiff"), "--labels", str(imc / "masks_deepcell"),
        "--metadata", str(meta), "--with-attention", "--out", str(out),
    )  # fmt: skip
    proc = maeprobe(*args)
    assert proc.returncode == 0, proc.stderr
    out.with_suffix(".args").write_text("\n".join(args))
    assert "global 55, channel 275, patch 17600 rows" in proc.stdout
    proc = maeprobe("analyze", str(out), "--kmeans", "4", "--umap-max-fit", "5000")
    assert proc.returncode == 0, proc.stderr
    assert "patch: 17600 of 17600 rows" in proc.stdout and "clusters follow" in proc.stdout
    return out


def test_rerun_resumes_and_another_job_is_refused(store):
    args = store.with_suffix(".args").read_text().splitlines()
    again = maeprobe(*args)  # the same job again: nothing left to do
    assert again.returncode == 0 and "0 units embedded, 1 already done" in again.stdout
    other = [a for a in args if a != "--with-attention"]
    proc = maeprobe(*other)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds a different job (differs in: params.attention)" in proc.stderr


def test_export_h5ad_loads_in_scanpy_with_every_contract_column(store, tmp_path):
    import scanpy as sc

    path = tmp_path / "imc.h5ad"
    proc = maeprobe("export", str(store), "--format", "h5ad", "--out", str(path))
    assert proc.returncode == 0, proc.stderr
    adata = sc.read_h5ad(path)
    assert adata.n_obs == 55 + 275 + 17600 and adata.n_vars == 144
    assert set(OBS_COLUMNS) | {"leiden", "kmeans", "condition", "well"} <= set(adata.obs)
    assert (adata.obs["condition"] == "mock").all()
    assert {"X_pca", "X_umap"} <= set(adata.obsm)
    assert adata.uns["maeprobe"]["model"] == "default"
    assert "patch" in adata.uns["maeprobe_drivers"]
    chan = adata[adata.obs.level == "channel"].copy()
    assert chan.obs.channel.nunique() == 5 and chan.obs.cell_id.notna().all()
    sc.pp.neighbors(chan, use_rep="X")
    sc.tl.leiden(chan, flavor="igraph", n_iterations=2)
    assert chan.obs["leiden"].nunique() > 1


def test_export_parquet_and_csv_carry_obs_and_embedding_columns(store, tmp_path):
    pq, csv = tmp_path / "patch.parquet", tmp_path / "global.csv"
    assert maeprobe("export", str(store), "--format", "parquet", "--level", "patch",
                    "--out", str(pq)).returncode == 0  # fmt: skip
    assert maeprobe("export", str(store), "--format", "csv", "--level", "global",
                    "--out", str(csv)).returncode == 0  # fmt: skip
    patch, glob = pd.read_parquet(pq), pd.read_csv(csv)
    emb = [f"e{i}" for i in range(144)]
    for table, n in ((patch, 17600), (glob, 55)):
        assert len(table) == n and set(OBS_COLUMNS) | set(emb) <= set(table.columns)
        assert np.isfinite(table[emb].to_numpy()).all()
    assert glob["channel"].isna().all() and glob["patch_row"].isna().all()
    assert patch["patch_row"].between(0, 7).all() and set(patch["level"]) == {"patch"}


def test_evaluate_reports_rank_probe_and_attention_iou(store, tmp_path):
    out = tmp_path / "eval.json"
    proc = maeprobe("evaluate", str(store), "--probe", "channel", "--probe", "patch_row",
                    "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert 1 < res["patch"]["effective_rank"] <= 144
    assert res["patch"]["probes"]["patch_row"]["balanced_accuracy"] > 0.5  # position is linear
    assert res["channel"]["probes"]["channel"]["n_classes"] == 5
    assert 0 <= res["cells"]["attention_iou"]["mean"] <= 1
    assert res["cells"]["attention_iou"]["cells"] == 55


def test_bad_store_and_format_get_one_line(tmp_path):
    proc = maeprobe("export", str(tmp_path), "--format", "h5ad", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not an embedding store" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
