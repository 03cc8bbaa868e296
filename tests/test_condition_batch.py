"""Batch versus biology on a real screen: lincs_cellpainting_a549_dev (2 plates imaged on two
dates; DMSO, orantinib, lonafarnib), embedded with the bundled default model, against a baseline
of per-cell intensity and shape features measured with scikit-image's regionprops."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest

from conftest import SHARED
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.tl.condition_batch import (
    NO_FEATURES,
    compare_condition_batch,
    guess_control,
)

LINCS = SHARED / "lincs_cellpainting_a549_dev"
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
CELLS_PER_FIELD = 25
WELLS = ("A01", "A13", "P13")
LABELS: dict[str, np.ndarray] = {}  # image name -> label image of the cells embedded
CROP = 96

pytestmark = pytest.mark.skipif(not LINCS.is_dir(), reason="shared LINCS data not here")


def _field_cells(fov: pd.Series, rng: np.random.Generator):
    """One field: nuclei by Otsu on the smoothed DNA channel, grown by 8 px into cells
    (scikit-image); at most CELLS_PER_FIELD interior cells: their regionprops features, their
    normalised 96 px crops and a label image of those cells only."""
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops_table
    from skimage.segmentation import expand_labels

    from napari_maeprobe.pp.preprocessing import extract_windows, normalize

    raw = np.stack([iio.imread(LINCS / fov[f"file_{c}"]) for c in CHANNELS]).astype(np.float32)
    smooth = gaussian(raw[0], 2)
    cells = expand_labels(label(smooth > threshold_otsu(smooth)), 8)
    where = pd.DataFrame(regionprops_table(cells, properties=("label", "centroid", "area")))
    cy, cx = where["centroid-0"].to_numpy(), where["centroid-1"].to_numpy()
    half = CROP // 2
    inside = (cy >= half) & (cy < raw.shape[1] - half) & (cx >= half) & (cx < raw.shape[2] - half)
    keep = where["label"].to_numpy()[inside & (where["area"].to_numpy() >= 300)]
    keep = np.sort(rng.choice(keep, min(CELLS_PER_FIELD, len(keep)), replace=False))
    cells = np.where(np.isin(cells, keep), cells, 0).astype(np.int32)

    def q(p):
        return lambda mask, img: np.percentile(img[mask], p, axis=0)

    def std(mask, img):
        return img[mask].std(axis=0)

    extra = (std, q(10), q(50), q(90))
    for f, name in zip(extra, ("std", "p10", "p50", "p90")):
        f.__name__ = name
    props = pd.DataFrame(regionprops_table(
        cells, np.moveaxis(raw, 0, -1),
        properties=("label", "centroid", "area", "perimeter", "eccentricity", "solidity",
                    "axis_major_length", "axis_minor_length", "intensity_mean"),
        extra_properties=extra,
    ))  # fmt: skip
    origins = np.stack([props["centroid-0"], props["centroid-1"]], axis=1).round().astype(int)
    crops = extract_windows(normalize(raw), origins - half, (CROP, CROP))
    feats = props.drop(columns=["label", "centroid-0", "centroid-1"])
    return feats, crops, cells


@pytest.fixture(scope="module")
def lincs() -> ad.AnnData:
    """One row per cell of the A01 (DMSO), A13 (orantinib) and P13 (lonafarnib) fields of both
    plates: X the default model's global embedding (CPU), obsm["X_features"] the regionprops
    baseline, obs the field's metadata (plate, batch_date, compound, ...). The label image of
    the cells used goes to LABELS, per field."""
    import torch

    from napari_maeprobe.models.registry import create_model

    fov = pd.read_csv(LINCS / "fov_metadata.csv")
    fov = fov[fov["well"].isin(WELLS)]
    rng = np.random.default_rng(0)
    feats, crops, obs, labels = [], [], [], {}  # labels: kept for the command-line test
    for _, row in fov.iterrows():
        f, c, lab = _field_cells(row, rng)
        feats.append(f)
        crops.append(c)
        image = Path(row["file_DNA"]).parent.name + "/" + Path(row["file_DNA"]).name[:12]
        labels[image] = lab
        obs.append(pd.DataFrame({"level": "global", "image": image, "plate": row["plate"],
                                 "batch_date": row["batch_date"], "well": row["well"],
                                 "compound": row["compound"], "targets": row["targets"]},
                                index=range(len(f))))  # fmt: skip
    model = create_model("default").eval()
    torch.set_num_threads(2)
    crops = torch.from_numpy(np.concatenate(crops)).float()
    with torch.no_grad():
        X = np.concatenate([model(crops[i : i + 64]).global_embedding.numpy()
                            for i in range(0, len(crops), 64)])  # fmt: skip
    F = pd.concat(feats, ignore_index=True)
    obs = pd.concat(obs, ignore_index=True)
    for col in obs:
        obs[col] = obs[col].astype("category")
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=X.astype(np.float32), obs=obs)
    adata.obsm["X_features"] = F.to_numpy(np.float64)
    adata.uns["maeprobe"] = {"feature_names": list(F.columns)}
    LABELS.update(labels)
    return adata


@pytest.fixture(scope="module")
def result(lincs) -> dict:
    return compare_condition_batch(lincs, "compound", "plate", seed=0)


def test_result_shape_and_summary_line(lincs, result):
    json.dumps(result)  # JSON-able as it is
    assert result["control"] == "DMSO" and result["batch"] == "plate"
    assert set(result["conditions"]) == {"lonafarnib", "orantinib"}
    lona = result["conditions"]["lonafarnib"]
    assert lona["grouping"] == "leave one plate out" and lona["folds"] == 2
    assert lona["n_cells"] == int(lincs.obs["compound"].isin(["DMSO", "lonafarnib"]).sum())
    for space in ("embedding", "baseline"):
        for clf in ("knn", "linear"):
            assert 0 <= lona[space][clf] <= 1 and len(lona[space][f"{clf}_folds"]) == 2
    b = result["batch_prediction"]
    assert b["on"] == "DMSO cells" and b["classes"] == ["SQ00015198", "SQ00015230"]
    assert b["chance"] == 0.5 and b["grouping"] == "grouped by image"
    line = result["summary"]
    assert "\n" not in line and "lonafarnib vs DMSO across plates" in line
    assert "plate is predicted at" in line and "baseline" in line
    table = pd.DataFrame.from_records(result["table"])  # the report's and explorer's table
    assert len(table) == 6 and set(table["features"]) == {"embedding", "baseline"}
    first = table.iloc[0]
    cond = first["comparison"].split(" vs ")[0]
    assert first["kNN"] == result["conditions"][cond][first["features"]]["knn"]
    assert any("not ranked" in n for n in result["notes"])
    print("\n" + line)  # the measured figures (pytest -s)


def test_scores_match_an_independent_sklearn_computation(lincs, result):
    """Leave-one-plate-out with scikit-learn's own LeaveOneGroupOut and cross_val_score on the
    same cells gives the same balanced accuracies."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    obs = lincs.obs
    rows = obs["compound"].isin(["DMSO", "lonafarnib"]).to_numpy()
    y = (obs["compound"][rows] == "lonafarnib").to_numpy().astype(int)
    groups = obs["plate"][rows].astype(str).to_numpy()
    X = lincs.X[rows]
    logo = LeaveOneGroupOut()
    knn = make_pipeline(StandardScaler(), PCA(50, random_state=0), KNeighborsClassifier(15))
    lin = make_pipeline(StandardScaler(), PCA(50, random_state=0),
                        LogisticRegression(class_weight="balanced", max_iter=500))  # fmt: skip
    lona = result["conditions"]["lonafarnib"]
    for name, model in (("knn", knn), ("linear", lin)):
        ref = cross_val_score(model, X, y, groups=groups, cv=logo, scoring="balanced_accuracy")
        np.testing.assert_allclose(sorted(lona["embedding"][f"{name}_folds"]), sorted(ref),
                                   atol=0.01)  # fmt: skip
    F = lincs.obsm["X_features"][rows].copy()
    F = np.log1p(F) if (F >= 0).all() else F
    ref = cross_val_score(make_pipeline(StandardScaler(), KNeighborsClassifier(15)), F, y,
                          groups=groups, cv=logo, scoring="balanced_accuracy")  # fmt: skip
    np.testing.assert_allclose(sorted(lona["baseline"]["knn_folds"]), sorted(ref), atol=1e-9)


def test_folds_never_mix_batches(lincs, monkeypatch):
    """Every training set of a condition-vs-control fold lacks the test fold's plate; every
    batch fold keeps each image on one side."""
    from napari_maeprobe.tl import condition_batch as cb

    seen = []
    real = cb._cross_validate

    def spy(X, y, folds, *args):
        seen.append((len(X), folds))
        return real(X, y, folds, *args)

    monkeypatch.setattr(cb, "_cross_validate", spy)
    sub = lincs[lincs.obs["compound"].isin(["DMSO", "lonafarnib"]).to_numpy()].copy()
    compare_condition_batch(sub, "compound", "plate")
    obs = sub.obs.reset_index(drop=True)
    plates = obs["plate"].astype(str).to_numpy()
    assert len(seen) == 4  # lonafarnib (embedding, baseline), plate (embedding, baseline)
    for _, folds in seen[:2]:
        for train, test in folds:
            assert len(set(plates[test])) == 1 and plates[test][0] not in set(plates[train])
    dmso = obs[obs["compound"] == "DMSO"]["image"].astype(str).to_numpy()
    for _, folds in seen[2:]:
        for train, test in folds:
            assert not set(dmso[train]) & set(dmso[test])


def test_one_batch_falls_back_to_folds_grouped_by_image(lincs):
    sub = lincs[lincs.obs["plate"].astype(str).eq("SQ00015230").to_numpy()].copy()
    res = compare_condition_batch(sub, "compound", "plate", control="DMSO")
    lona = res["conditions"]["lonafarnib"]
    assert lona["grouping"] == "grouped by image" and "fewer than 2 plate" in lona["why"]
    assert lona["folds"] == 2  # lonafarnib has 2 fields on this plate
    assert "skipped" in res["batch_prediction"]


def test_control_guess_and_refusal(lincs):
    assert guess_control(lincs.obs["compound"]) == "DMSO"
    assert guess_control(pd.Series(["drug_a", "Untreated", "drug_b"])) == "Untreated"
    assert guess_control(pd.Series(["control (vehicle)", "kinase inhibitor"])) == (
        "control (vehicle)"
    )
    assert guess_control(lincs.obs["compound"], "dmso") == "DMSO"
    with pytest.raises(MaeprobeInputError, match="lonafarnib.*--control VALUE") as err:
        guess_control(pd.Series(["lonafarnib", "orantinib"]), column="compound")
    assert "DMSO" not in str(err.value)
    with pytest.raises(MaeprobeInputError, match="not a value of 'compound'"):
        guess_control(lincs.obs["compound"], "water", "compound")
    with pytest.raises(MaeprobeInputError, match="no column 'drug'.*compound"):
        compare_condition_batch(lincs, "drug", "plate")


def test_without_baseline_features_says_so(lincs):
    sub = lincs.copy()
    del sub.obsm["X_features"]
    res = compare_condition_batch(sub, "compound", "batch_date")
    assert res["note"] == NO_FEATURES and NO_FEATURES in res["summary"]
    assert "baseline" not in res["conditions"]["lonafarnib"]


def test_cli_analyze_with_condition_and_batch(lincs, tmp_path, capsys):
    """`maeprobe embed` of the site-3 fields (the cells of the fixture, as --labels), then
    `maeprobe analyze --condition compound --batch plate` prints the summary line and keeps the
    result in the store; a missing column is one line naming the columns that exist."""
    import shutil

    import tifffile

    from conftest import maeprobe
    from napari_maeprobe.cli import main
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.table import read_level

    tree, labs, store = tmp_path / "screen", tmp_path / "labels", tmp_path / "s.zarr"
    fov = pd.read_csv(LINCS / "fov_metadata.csv")
    fov = fov[fov["well"].isin(WELLS) & (fov["site"] == 3)]
    for _, row in fov.iterrows():
        for c in CHANNELS:
            (tree / row[f"file_{c}"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(LINCS / row[f"file_{c}"], tree / row[f"file_{c}"])
        name = Path(row["file_DNA"]).parent.name + "/" + Path(row["file_DNA"]).name[:12]
        (labs / name).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(labs / f"{name}_labels.tif", LABELS[name])
    shutil.copy(LINCS / "channels.csv", tree / "channels.csv")
    fov.to_csv(tree / "fov.csv", index=False)
    r = maeprobe("embed", str(tree / "images"), "--labels", str(labs), "--metadata",
                 str(tree / "fov.csv"), "--levels", "global", "--out", str(store))  # fmt: skip
    assert r.returncode == 0, r.stderr
    # analyze and evaluate in this process (the embedding above ran as a user would)
    assert main(["analyze", str(store), "--condition", "compound", "--batch", "plate",
                 "--control", "DMSO"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "lonafarnib vs DMSO across plates" in out
    saved = read_level(EmbeddingStore(store), "global").uns["maeprobe"]["analysis"]["global"]
    assert saved["condition_batch"]["control"] == "DMSO"
    assert saved["condition_batch"]["conditions"]["lonafarnib"]["grouping"] == (
        "leave one plate out"
    )
    # the report of one's own store: the verdict, the comparison, what normalisation hides,
    # and UMAPs coloured by the condition and the batch
    assert main(["report", str(store), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Batch versus biology" in page and "lonafarnib vs DMSO across plates" in page
    assert "image-wide differences" in page and "standardises every crop channel" in page
    assert saved["verdict"].split(" (")[0] in page
    assert {"umap_global_compound.png", "umap_global_plate.png"} <= {
        f.name for f in (tmp_path / "rep").glob("*.png")
    }
    assert "wrote" in capsys.readouterr().out
    for argv, name in (
        (["analyze", str(store), "--condition", "drug", "--batch", "plate"], "'drug'"),
        (["analyze", str(store), "--condition", "compound"], "--batch"),
        (["evaluate", str(store), "--probe", "compound", "--group-by", "genotype"], "'genotype'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0], err
    assert "compound" in err[0]  # the columns that exist are named
    assert main(["evaluate", str(store), "--probe", "compound", "--group-by", "plate"]) == 0
    out = capsys.readouterr().out
    assert "linear probe of compound" in out and "leave one plate out" in out


def test_evaluate_grouped_folds_match_sklearn(lincs):
    """A probe of the plate with folds grouped by image scores what scikit-learn's own
    StratifiedGroupKFold + cross_val_score gives on the same rows; no image is on both sides."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from napari_maeprobe.tl.evaluate import evaluate
    from napari_maeprobe.tl.evaluation import probe_folds

    calls = []
    res = evaluate(lincs, ["plate", "compound"], group_by="image",
                   progress=lambda d, t, s: calls.append((d, t, s)))  # fmt: skip
    p = res["probes"]["plate"]
    assert p["grouping"] == "5 folds grouped by image" and p["components"] == 64
    y = lincs.obs["plate"].astype(str).to_numpy()
    groups = lincs.obs["image"].astype(str).to_numpy()
    ref = cross_val_score(
        make_pipeline(StandardScaler(), PCA(64, svd_solver="randomized", random_state=0),
                      LogisticRegression(max_iter=100)),
        lincs.X, y, groups=groups, scoring="balanced_accuracy",
        cv=StratifiedGroupKFold(5, shuffle=True, random_state=0),
    )  # fmt: skip
    assert p["balanced_accuracy"] == pytest.approx(ref.mean(), abs=1e-6)
    assert p["balanced_accuracy_std"] == pytest.approx(ref.std(), abs=1e-6)
    folds, _ = probe_folds(pd.factorize(y)[0], groups, 5, 0, "image")
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1]
    assert any("probe of compound" in c[2] for c in calls)


def test_evaluate_refuses_what_grouped_folds_cannot_test(lincs):
    """`image` grouped by image (each value in one group) is never scored; the plate is left
    out when grouped by plate; a missing or one-valued group column is refused."""
    from napari_maeprobe.tl.evaluate import evaluate

    res = evaluate(lincs, ["image", "plate", "well"], group_by="image")
    assert "image" not in res["probes"] and "single image" in res["skipped_probes"]["image"]
    assert res["probes"]["well"]["n_classes"] == 3
    res = evaluate(lincs, ["plate", "compound"], group_by="plate")
    assert "plate" in res["skipped_probes"]
    assert res["probes"]["compound"]["grouping"] == "leave one plate out"
    assert res["probes"]["compound"]["cv"] == 2
    with pytest.raises(MaeprobeInputError, match="no column 'genotype' to group folds by"):
        evaluate(lincs, ["plate"], group_by="genotype")
    one = lincs[lincs.obs["plate"].astype(str).eq("SQ00015198").to_numpy()].copy()
    with pytest.raises(MaeprobeInputError, match="'plate' has one value"):
        evaluate(one, ["compound"], group_by="plate")


def test_big_comparisons_are_sampled_keeping_the_rarer_class(lincs):
    res = compare_condition_batch(lincs, "compound", "plate", max_cells=80)
    lona = res["conditions"]["lonafarnib"]
    assert lona["n_cells"] == 80 and lona["n_condition"] == 40 and lona["n_control"] == 40
