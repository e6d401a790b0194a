"""The one confusion matrix for CAMs, pseudo-labels and segmentation predictions."""

from __future__ import annotations

import numpy as np

from wsss.artifacts import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows = ground truth, columns = prediction).

    Ground-truth pixels equal to ``ignore_index`` are skipped.  Predictions equal
    to ``ignore_index`` are, by default, counted as background (class 0), as a
    pseudo-label that abstains leaves that pixel unlabelled; with
    ``ignore_pred=True`` they are left out and counted in :attr:`pred_ignored`
    so that coverage can be reported.

    Matrices are mergeable with ``+=`` (per-process or per-worker accumulation).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX, ignore_pred: bool = False):
        if num_classes < 1:
            raise ValueError("num_classes must be positive")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ignore_pred = ignore_pred
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.pred_ignored = 0  # labelled ground-truth pixels whose prediction was ignore_index

    def update(self, target: np.ndarray, prediction: np.ndarray) -> "ConfusionMatrix":
        """Add one pair of integer label maps of equal shape; returns ``self``."""
        target = np.asarray(target).reshape(-1).astype(np.int64)
        prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
        if target.shape != prediction.shape:
            raise ValueError(f"target and prediction differ in size: {target.size} vs {prediction.size}")
        valid = target != self.ignore_index
        pred_void = prediction == self.ignore_index
        self.pred_ignored += int(np.count_nonzero(valid & pred_void))
        if self.ignore_pred:
            valid &= ~pred_void
        else:
            prediction = np.where(pred_void, 0, prediction)
        target, prediction = target[valid], prediction[valid]
        out_of_range = (target < 0) | (target >= self.num_classes) | (prediction < 0) | (prediction >= self.num_classes)
        if out_of_range.any():
            bad = np.concatenate([target[out_of_range], prediction[out_of_range]])
            raise ValueError(f"label values outside 0..{self.num_classes - 1}: {sorted(set(bad.tolist()))[:5]}")
        self.matrix += np.bincount(target * self.num_classes + prediction, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices of different sizes")
        self.matrix += other.matrix
        self.pred_ignored += other.pred_ignored
        return self

    def add_counts(self, counts) -> "ConfusionMatrix":
        """Add a [C, C] count matrix (numpy or torch, e.g. from :func:`confusion_counts`); returns ``self``."""
        counts = counts.detach().cpu().numpy() if hasattr(counts, "detach") else np.asarray(counts)
        if counts.shape != self.matrix.shape:
            raise ValueError(f"expected counts of shape {self.matrix.shape}, got {counts.shape}")
        self.matrix += counts.astype(np.int64)
        return self

    # ------------------------------------------------------------------ scores

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.matrix)

    @property
    def present(self) -> np.ndarray:
        """bool [C]: the class occurs in ground truth or prediction."""
        return (self.matrix.sum(0) + self.matrix.sum(1)) > 0

    def iou(self) -> np.ndarray:
        """float [C]: TP / (TP + FP + FN) per class; NaN for classes in neither ground truth nor prediction."""
        union = self.matrix.sum(0) + self.matrix.sum(1) - self.true_positives
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.true_positives / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes present in ground truth or prediction (NaN if none)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def precision(self) -> np.ndarray:
        """float [C]: TP / (TP + FP); NaN where the class is never predicted."""
        predicted = self.matrix.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(predicted > 0, self.true_positives / np.maximum(predicted, 1), np.nan)

    def recall(self) -> np.ndarray:
        """float [C]: TP / (TP + FN); NaN where the class is absent from ground truth."""
        actual = self.matrix.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(actual > 0, self.true_positives / np.maximum(actual, 1), np.nan)

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.true_positives.sum() / total) if total else float("nan")

    def coverage(self) -> float:
        """Share of labelled ground-truth pixels that received a prediction other than ignore."""
        labelled = self.matrix.sum() + (self.pred_ignored if self.ignore_pred else 0)
        return float(1.0 - self.pred_ignored / labelled) if labelled else float("nan")

    def summary(self, class_names: list[str] | None = None) -> dict:
        """Return a JSON-ready dict: mIoU, pixel accuracy, coverage and per-class IoU/precision/recall."""
        names = class_names or [str(index) for index in range(self.num_classes)]
        iou, precision, recall = self.iou(), self.precision(), self.recall()

        def clean(value: float) -> float | None:
            return None if np.isnan(value) else round(float(value), 6)

        per_class = {
            names[index]: {"iou": clean(iou[index]), "precision": clean(precision[index]), "recall": clean(recall[index])}
            for index in range(self.num_classes) if self.present[index]
        }
        return {"miou": clean(self.miou()), "pixel_accuracy": clean(self.pixel_accuracy()),
                "coverage": clean(self.coverage()), "num_pixels": int(self.matrix.sum()), "per_class": per_class}

    def table(self, class_names: list[str] | None = None) -> str:
        """Return a printable per-class table ending with the mIoU line."""
        names = class_names or [str(index) for index in range(self.num_classes)]
        iou, precision, recall = self.iou(), self.precision(), self.recall()
        width = max(10, max(len(name) for name in names))
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'prec':>7}  {'recall':>7}"]
        for index in np.flatnonzero(self.present):
            lines.append(f"{names[index]:<{width}}  {iou[index]:7.4f}  {precision[index]:7.4f}  {recall[index]:7.4f}")
        lines.append(f"{'mIoU':<{width}}  {self.miou():7.4f}")
        return "\n".join(lines)


def confusion_counts(target, prediction, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Confusion counts of torch label maps on their device (no host round trip per image).

    Args:
        target: int tensor [...] ground truth; ``ignore_index`` pixels are skipped.
        prediction: int tensor of the same shape, values in 0..num_classes - 1.

    Returns:
        int64 tensor [C, C] (rows = ground truth, columns = prediction), on the inputs' device.
    """
    import torch

    target, prediction = target.reshape(-1).long(), prediction.reshape(-1).long()
    valid = target != ignore_index
    index = target[valid] * num_classes + prediction[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Average precision per class, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds.

    The same definition as ``sklearn.metrics.average_precision_score`` (no interpolation;
    tied scores form one threshold).

    Args:
        scores: float [N, K] (any monotone score: logits or probabilities).
        targets: 0/1 [N, K].

    Returns:
        float64 [K]; NaN for a class without positive images.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets) > 0.5
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"expected scores and targets [N, K] of one shape, got {scores.shape} and {targets.shape}")
    result = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        positives = int(targets[:, k].sum())
        if positives == 0:
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        ranked_scores, hits = scores[order, k], targets[order, k]
        true_pos = np.cumsum(hits)
        # the last position of every run of equal scores is one threshold
        last = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1]
        precision = true_pos[last] / (last + 1)
        recall = true_pos[last] / positives
        result[k] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return result


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean of :func:`average_precision` over the classes with at least one positive (NaN if none)."""
    ap = average_precision(scores, targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
