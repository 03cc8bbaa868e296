"""Linear probe, attention IoU and the effective-rank re-export."""

from __future__ import annotations

import numpy as np
import pytest

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.tl import analysis
from napari_maeprobe.tl.evaluation import attention_iou, effective_rank, linear_probe


def test_linear_probe_separable_vs_random_labels():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], [200, 100, 60])
    means = rng.normal(size=(3, 20)) * 3
    X = means[np.searchsorted(["a", "b", "c"], y)] + rng.normal(size=(len(y), 20))
    res = linear_probe(X, y)
    assert res["balanced_accuracy"] > 0.95
    assert res["n_classes"] == 3 and res["classes"] == ["a", "b", "c"] and res["n_rows"] == 360
    assert res["chance"] == pytest.approx(1 / 3)
    assert res["majority_baseline"] == pytest.approx(200 / 360)

    shuffled = rng.permutation(y)
    res = linear_probe(X, shuffled)
    assert abs(res["balanced_accuracy"] - 1 / 3) < 0.1


def test_linear_probe_drops_missing_labels_and_rejects_bad_labels():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5))
    y = np.array([0.0, 1.0] * 20)
    y[:4] = np.nan
    assert linear_probe(X, y)["n_rows"] == 36
    with pytest.raises(MaeprobeInputError, match="at least 2"):
        linear_probe(X, np.ones(40))
    few = np.zeros(40)
    few[:3] = 1
    with pytest.raises(MaeprobeInputError, match="fewer rows"):
        linear_probe(X, few, cv=5)
    with pytest.raises(MaeprobeInputError, match="labels for"):
        linear_probe(X, y[:10])


def test_attention_iou_hand_built():
    att = np.zeros((3, 2, 2))
    att[:, 0, 0] = 1.0  # every crop attends most to its top-left patch
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, :2, :2] = True  # exactly the top-left patch
    masks[1, :2, :] = True  # the top half: 4 of 8 pixels
    masks[2, 2:, 2:] = True  # elsewhere
    iou = attention_iou(att, masks, top_fraction=0.25)
    np.testing.assert_allclose(iou, [1.0, 0.5, 0.0])
    # the top half of the patches, with NaN (masked) patches never chosen
    att2 = np.array([[[0.2, np.nan], [0.9, 0.1]]])
    mask2 = np.zeros((1, 4, 4), dtype=bool)
    mask2[0, :, :2] = True  # the left column of patches
    np.testing.assert_allclose(attention_iou(att2, mask2, top_fraction=0.5), [1.0])


def test_attention_iou_bad_shapes():
    with pytest.raises(MaeprobeInputError, match="multiple"):
        attention_iou(np.zeros((1, 3, 3)), np.zeros((1, 4, 4), bool))
    with pytest.raises(MaeprobeInputError, match="pair up"):
        attention_iou(np.zeros((2, 2, 2)), np.zeros((1, 4, 4), bool))


def test_effective_rank_is_reexported():
    assert effective_rank is analysis.effective_rank


def test_linear_probe_groups_must_pair_with_rows():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    y = np.array(["a", "b"] * 20)
    with pytest.raises(MaeprobeInputError, match="groups for"):
        linear_probe(X, y, groups=np.arange(10))
    with pytest.raises(MaeprobeInputError, match="one value"):
        linear_probe(X, y, groups=np.zeros(40))
    # two groups, each holding both classes: leave one group out, 2 folds
    res = linear_probe(X, y, groups=np.repeat(["p1", "p2"], 20), group_name="plate")
    assert res["grouping"] == "leave one plate out" and res["cv"] == 2
