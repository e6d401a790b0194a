"""Tests of wsss/metrics.py: the confusion matrix behind every mIoU."""

from __future__ import annotations

import numpy as np
import pytest

from wsss.metrics import ConfusionMatrix, average_precision, mean_average_precision

# Hand-worked 3-class example (10 pixels).
#   gt   = 0 0 0 | 1 1 1 | 2 2 2 2
#   pred = 0 0 1 | 1 1 2 | 2 2 0 0
# rows = ground truth, columns = prediction:
#         p0 p1 p2   | row sum (actual)
#   g0  [  2  1  0 ] | 3
#   g1  [  0  2  1 ] | 3
#   g2  [  2  0  2 ] | 4
#   col sum (predicted) 4  3  3
# TP = 2 2 2
# IoU = TP / (actual + predicted - TP): 2/(3+4-2) = 0.4, 2/(3+3-2) = 0.5, 2/(4+3-2) = 0.4
# mIoU = (0.4 + 0.5 + 0.4) / 3 = 0.433333...
# precision = TP / predicted = 2/4, 2/3, 2/3
# recall    = TP / actual    = 2/3, 2/3, 2/4
# pixel accuracy = 6 / 10
HAND_GT = np.array([[0, 0, 0, 1, 1], [1, 2, 2, 2, 2]])
HAND_PRED = np.array([[0, 0, 1, 1, 1], [2, 2, 2, 0, 0]])
HAND_MATRIX = np.array([[2, 1, 0], [0, 2, 1], [2, 0, 2]])


def test_hand_worked_three_classes():
    matrix = ConfusionMatrix(3).update(HAND_GT, HAND_PRED)
    np.testing.assert_array_equal(matrix.matrix, HAND_MATRIX)
    np.testing.assert_allclose(matrix.iou(), [0.4, 0.5, 0.4])
    assert matrix.miou() == pytest.approx(1.3 / 3)
    np.testing.assert_allclose(matrix.precision(), [0.5, 2 / 3, 2 / 3])
    np.testing.assert_allclose(matrix.recall(), [2 / 3, 2 / 3, 0.5])
    assert matrix.pixel_accuracy() == pytest.approx(0.6)
    assert matrix.coverage() == pytest.approx(1.0)
    summary = matrix.summary(["background", "cat", "dog"])
    assert summary["miou"] == pytest.approx(0.433333, abs=1e-6)
    assert summary["per_class"]["dog"] == {"iou": 0.4, "precision": pytest.approx(0.666667), "recall": 0.5}
    assert summary["num_pixels"] == 10
    table = matrix.table(["background", "cat", "dog"])
    assert "dog" in table and table.splitlines()[-1].split() == ["mIoU", "0.4333"]


def test_ignore_in_ground_truth_is_skipped():
    gt = np.concatenate([HAND_GT, [[255, 255, 255, 255, 255]]])
    pred = np.concatenate([HAND_PRED, [[0, 1, 2, 255, 1]]])
    matrix = ConfusionMatrix(3).update(gt, pred)
    np.testing.assert_array_equal(matrix.matrix, HAND_MATRIX)
    assert matrix.pred_ignored == 0


def test_prediction_255_is_background_or_ignored_with_coverage():
    # gt   = 0 1 1 2
    # pred = 255 1 255 2
    gt, pred = np.array([0, 1, 1, 2]), np.array([255, 1, 255, 2])
    # default: 255 -> background: g0 -> p0, g1 -> p1 and p0, g2 -> p2
    #   [[1 0 0], [1 1 0], [0 0 1]]; IoU0 = 1/(1+2-1) = 0.5, IoU1 = 1/(2+1-1) = 0.5, IoU2 = 1; mIoU = 2/3
    as_background = ConfusionMatrix(3).update(gt, pred)
    np.testing.assert_array_equal(as_background.matrix, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert as_background.miou() == pytest.approx(2 / 3)
    assert as_background.coverage() == pytest.approx(0.5)  # 2 of 4 labelled pixels got a real prediction
    # ignore_pred: the two 255 pixels are left out; background is then absent -> mIoU over classes 1, 2 = 1
    ignored = ConfusionMatrix(3, ignore_pred=True).update(gt, pred)
    np.testing.assert_array_equal(ignored.matrix, [[0, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert np.isnan(ignored.iou()[0])
    assert ignored.miou() == pytest.approx(1.0)
    assert ignored.coverage() == pytest.approx(0.5)
    assert ignored.pixel_accuracy() == pytest.approx(1.0)


def test_miou_averages_only_present_classes():
    # class 3 occurs in neither map; class 2 only in the prediction (IoU 0, still counted)
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])
    matrix = ConfusionMatrix(4).update(gt, pred)
    iou = matrix.iou()
    np.testing.assert_allclose(iou[:3], [1.0, 0.5, 0.0])
    assert np.isnan(iou[3])
    assert matrix.miou() == pytest.approx(0.5)
    assert list(matrix.summary()["per_class"]) == ["0", "1", "2"]


def _loop_iou(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Independent reference: per-class counting with 255 in gt ignored and 255 in pred = background."""
    valid = gt != 255
    pred = np.where(pred == 255, 0, pred)
    iou = np.full(num_classes, np.nan)
    for index in range(num_classes):
        in_gt, in_pred = (gt == index) & valid, (pred == index) & valid
        union = np.count_nonzero(in_gt | in_pred)
        if union:
            iou[index] = np.count_nonzero(in_gt & in_pred) / union
    return iou


def _random_maps(seed: int, num_classes: int = 5, shape=(3, 17, 13)):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, num_classes, size=shape)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, num_classes, size=shape))
    gt[rng.random(shape) < 0.1] = 255
    pred[rng.random(shape) < 0.1] = 255
    return gt, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_an_independent_per_class_loop(seed):
    gt, pred = _random_maps(seed)
    matrix = ConfusionMatrix(5).update(gt, pred)
    np.testing.assert_allclose(matrix.iou(), _loop_iou(gt, pred, 5))
    assert matrix.matrix.sum() == np.count_nonzero(gt != 255)
    assert matrix.pred_ignored == np.count_nonzero((gt != 255) & (pred == 255))


def test_merging_equals_one_shot():
    gt, pred = _random_maps(3)
    for ignore_pred in (False, True):
        one_shot = ConfusionMatrix(5, ignore_pred=ignore_pred).update(gt, pred)
        merged = ConfusionMatrix(5, ignore_pred=ignore_pred)
        for part in range(gt.shape[0]):
            piece = ConfusionMatrix(5, ignore_pred=ignore_pred).update(gt[part], pred[part])
            merged += piece
        np.testing.assert_array_equal(merged.matrix, one_shot.matrix)
        assert merged.pred_ignored == one_shot.pred_ignored
        assert merged.coverage() == one_shot.coverage()


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="differ in size"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside 0..2"):
        ConfusionMatrix(3).update(np.zeros(4), np.array([0, 1, 2, 7]))
    with pytest.raises(ValueError):
        ConfusionMatrix(3).__iadd__(ConfusionMatrix(4))


# --------------------------------------------------------------------------- average precision


def test_average_precision_by_hand():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    ap = average_precision(scores, targets)
    # ranks 1..4: hits at 1 and 3 -> precision 1 at recall .5, 2/3 at recall 1: AP = .5 * 1 + .5 * 2/3
    assert ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert np.isnan(ap[1])  # no positive image
    assert mean_average_precision(scores, targets) == pytest.approx(ap[0])


def test_average_precision_ties_form_one_threshold():
    # tied scores: one threshold with precision 1/2 at recall 1
    ap = average_precision(np.array([[0.5], [0.5]]), np.array([[1], [0]]))
    assert ap[0] == pytest.approx(0.5)


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 4)).round(1)  # rounding creates ties
    targets = rng.random((30, 4)) > 0.6
    ours = average_precision(scores, targets)
    for k in range(4):
        assert ours[k] == pytest.approx(average_precision_score(targets[:, k], scores[:, k]))
