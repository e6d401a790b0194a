"""Evaluation of label maps and CAMs against ground-truth masks, reusable by every stage.

Two kinds of input are scored with the one :class:`~wsss.metrics.ConfusionMatrix`:

* label maps (pseudo-labels, predictions): :func:`evaluate_labels`;
* CAMs with a background-threshold sweep: :func:`evaluate_cams`.  For a threshold
  ``t`` the label of a pixel is the argmax over ``[t, cam_1, ..., cam_K]``, i.e. the
  key of the strongest CAM where that CAM exceeds ``t`` and background (0)
  elsewhere; a tie with ``t`` goes to background, as ``np.argmax`` gives it.

The in-memory helpers :func:`cam_to_label` and :func:`sweep_matrices` need no
files.  Over many images the work is split into chunks for a process pool;
each worker returns the sum over its chunk, and the partial results are merged
with ``+=`` (integer sums, so the result does not depend on the worker count).
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from wsss import artifacts
from wsss.artifacts import IGNORE_INDEX
from wsss.datasets.prepared import PreparedDataset
from wsss.device import default_workers
from wsss.errors import WsssError
from wsss.metrics import ConfusionMatrix
from wsss.parallel import imap_images

log = logging.getLogger(__name__)

DEFAULT_SWEEP = (0.05, 0.60, 0.01)
#: Most thresholds a sweep may hold: each one is a [C, C] confusion matrix per image (a step of
#: 1e-9 would ask for terabytes).
MAX_THRESHOLDS = 10_000
_MAX_CHUNK = 16
_IMAGES_PER_WORKER = 32


# --------------------------------------------------------------------------- thresholds

def threshold_range(start: float, stop: float, step: float) -> np.ndarray:
    """Return float64 [T]: ``start, start + step, ..., stop`` (stop inclusive, T <= :data:`MAX_THRESHOLDS`).

    The values are computed as ``start + i * step`` from integer ``i`` and
    rounded to 10 decimals, so ``0.05:0.60:0.01`` gives exactly 56 thresholds
    whose values print as ``0.05 ... 0.60`` (no accumulated float drift).
    """
    if not all(math.isfinite(value) for value in (start, stop, step)):
        raise ValueError(f"expected finite numbers, got {start}:{stop}:{step}")
    if step <= 0 or stop < start:
        raise ValueError(f"expected start <= stop and step > 0, got {start}:{stop}:{step}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > MAX_THRESHOLDS:
        raise ValueError(f"{start}:{stop}:{step} holds {count} thresholds; at most {MAX_THRESHOLDS} "
                         "(use a larger step)")
    return np.round(start + np.arange(count) * step, 10)


# --------------------------------------------------------------------------- in-memory helpers

def _check_cams(keys: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"expected keys [K] and cams [K, H, W], got {keys.shape} and {cams.shape}")
    return keys, cams


def _peak_and_key(keys: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (strongest CAM value float64 [H, W], its class index int64 [H, W]); -inf / 0 without keys."""
    if keys.size == 0:
        shape = cams.shape[1:]
        return np.full(shape, -np.inf), np.zeros(shape, dtype=np.int64)
    return cams.max(0).astype(np.float64), keys[cams.argmax(0)]


def cam_to_label(keys: np.ndarray, cams: np.ndarray, threshold: float) -> np.ndarray:
    """Turn CAMs into a label map with a fixed background threshold.

    Args:
        keys: int [K] class indices (>= 1) of the CAM planes.
        cams: float [K, H, W] scores in [0, 1].
        threshold: background score; a pixel is foreground only where its strongest CAM exceeds it.

    Returns:
        uint8 [H, W]: the key of the strongest CAM, or 0 (background).
    """
    keys, cams = _check_cams(keys, cams)
    peak, key_label = _peak_and_key(keys, cams)
    return np.where(peak > threshold, key_label, 0).astype(np.uint8)


def cam_to_label_tensor(keys, cams, threshold: float):
    """:func:`cam_to_label` on torch tensors, on their device.

    Args:
        keys: int tensor [K] class indices (>= 1).
        cams: float tensor [K, H, W].
        threshold: background score.

    Returns:
        int64 tensor [H, W]: the key of the strongest CAM where it exceeds ``threshold``, else 0.
    """
    import torch

    if keys.numel() == 0:
        return torch.zeros(cams.shape[1:], dtype=torch.int64, device=cams.device)
    peak, index = cams.max(0)
    return torch.where(peak > threshold, keys.long()[index], 0)


def sweep_matrices(keys: np.ndarray, cams: np.ndarray, target: np.ndarray, thresholds: Sequence[float],
                   num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Confusion matrices of one image's CAMs for every background threshold at once.

    Equivalent to ``ConfusionMatrix.update(target, cam_to_label(keys, cams, t))`` for each
    ``t`` but costs one pass over the pixels: a pixel is foreground exactly for the
    thresholds below its strongest CAM value, so one histogram over
    (number of thresholds below the peak, target, key) and two cumulative sums give
    all ``T`` matrices.

    Args:
        keys: int [K] class indices (>= 1).
        cams: float [K, H, W].
        target: int [H, W] ground truth; ``ignore_index`` pixels are skipped.
        thresholds: float [T], any order.
        num_classes: C, including background.

    Returns:
        int64 [T, C, C]: rows = ground truth, columns = prediction, in the order of ``thresholds``.
    """
    keys, cams = _check_cams(keys, cams)
    target = np.asarray(target)
    if target.shape != cams.shape[1:]:
        raise ValueError(f"CAMs are {cams.shape[1:]} but the target is {target.shape}")
    if keys.size and (keys.min() < 1 or keys.max() >= num_classes):
        raise ValueError(f"CAM keys {sorted(set(keys.tolist()))} outside 1..{num_classes - 1}")
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    count = thresholds.size
    peak, key_label = _peak_and_key(keys, cams)
    valid = target != ignore_index
    gt = target[valid].astype(np.int64)
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"target values outside 0..{num_classes - 1} and {ignore_index}")
    order = np.argsort(thresholds, kind="stable")
    # thresholds strictly below the peak: the pixel is foreground for exactly these (ties -> background)
    below = np.searchsorted(thresholds[order], peak[valid], side="left")
    cells = num_classes * num_classes
    counts = np.bincount((below * num_classes + gt) * num_classes + key_label[valid],
                         minlength=(count + 1) * cells).reshape(count + 1, num_classes, num_classes)
    # sorted threshold i: pixels with below > i predict their key, pixels with below <= i predict background
    foreground = np.cumsum(counts[::-1], axis=0)[::-1][1:]
    background_rows = np.cumsum(counts.sum(axis=2), axis=0)[:count]
    matrices = foreground.copy()
    matrices[:, :, 0] += background_rows
    result = np.empty_like(matrices)
    result[order] = matrices
    return result


# --------------------------------------------------------------------------- files

def _label_file(pred_dir: Path, image_id: str) -> Path | None:
    path = artifacts.label_path(pred_dir, image_id)
    return path if path.is_file() else None


def _find_inputs(folder: Path, ids: Sequence[str], find: Callable[[Path, str], Path | None], what: str,
                 allow_missing: bool) -> list[tuple[str, Path]]:
    """Return ``(id, file)`` pairs; missing files are an error naming the first one, or skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WsssError(f"{folder}: {what} folder not found")
    found, missing = [], []
    for image_id in ids:
        path = find(folder, image_id)
        if path is None:
            missing.append(image_id)
        else:
            found.append((image_id, path))
    if missing and (not allow_missing or not found):  # with nothing to score, an mIoU would be NaN, not a result
        first = artifacts.cam_path(folder, missing[0]) if what == "CAM" else artifacts.label_path(folder, missing[0])
        allowed = " (--allow-missing: nothing is left to score)" if allow_missing else ""
        raise WsssError(f"{first}: {what} file not found ({len(missing)} of {len(ids)} {what} files missing){allowed}")
    if missing:
        log.warning("%s: skipping %d of %d images without a %s file", folder, len(missing), len(ids), what)
    return found


def missing_inputs(folder: str | Path, ids: Sequence[str], *, cams: bool = False) -> list[str]:
    """Return the ids without a label PNG (or, with ``cams``, without a CAM ``.npz``/``.npy``) in ``folder``."""
    find = artifacts.find_cam if cams else _label_file
    return [image_id for image_id in ids if find(Path(folder), image_id) is None]


def _read_target(dataset: PreparedDataset, split: str, image_id: str, path: Path, shape: tuple[int, ...],
                 what: str) -> np.ndarray:
    target = dataset.read_mask(split, image_id)
    if tuple(shape) != target.shape:
        mask_file = dataset.mask_path(split, image_id)
        raise WsssError(f"{path}: {what} is {shape[-1]}x{shape[-2]} but the ground-truth mask {mask_file} is "
                        f"{target.shape[1]}x{target.shape[0]}")
    return target


def _labels_chunk(common: tuple, items: list[tuple[str, Path]]) -> ConfusionMatrix:
    dataset, split, ignore_pred = common
    matrix = ConfusionMatrix(dataset.num_classes, ignore_pred=ignore_pred)
    for image_id, path in items:
        prediction = artifacts.read_label_png(path, dataset.num_classes)
        target = _read_target(dataset, split, image_id, path, prediction.shape, "prediction")
        try:
            matrix.update(target, prediction)
        except ValueError as err:
            raise WsssError(f"{path}: {err}") from None
    return matrix


def _cams_chunk(common: tuple, items: list[tuple[str, Path]]) -> np.ndarray:
    dataset, split, thresholds, allow_pickle = common
    total = np.zeros((len(thresholds), dataset.num_classes, dataset.num_classes), dtype=np.int64)
    for image_id, path in items:
        keys, cams = artifacts.read_cam(path, allow_pickle=allow_pickle, num_classes=dataset.num_classes)
        target = _read_target(dataset, split, image_id, path, cams.shape[1:], "CAM")
        try:
            total += sweep_matrices(keys, cams, target, thresholds, dataset.num_classes)
        except ValueError as err:
            raise WsssError(f"{path}: {err}") from None
    return total


def _parallel_sum(function: Callable, common: tuple, items: list, zero: Any, workers: int | None, desc: str,
                  progress: bool) -> Any:
    """Return ``zero`` plus the sum over chunks of ``function(common, chunk)``, with a progress bar over items.

    ``workers=None`` uses all cores but at most one per ``_IMAGES_PER_WORKER`` images (starting
    processes costs more than scoring a handful of images); an explicit count is used as given.
    Chunks keep what travels back from the workers small (one sum per chunk, not per image).
    """
    if workers is None:
        workers = min(default_workers(), math.ceil(len(items) / _IMAGES_PER_WORKER))
    workers = max(1, workers)
    size = 1 if workers <= 1 else max(1, min(_MAX_CHUNK, math.ceil(len(items) / (4 * workers))))
    chunks = [items[start:start + size] for start in range(0, len(items), size)]
    total = zero
    for partial in imap_images(functools.partial(function, common), chunks, workers, desc, ordered=False,
                               weights=[len(chunk) for chunk in chunks], chunksize=1, show=progress, leave=True):
        total += partial
    return total


def _split_ids(dataset: PreparedDataset, split: str, ids: Sequence[str] | None) -> list[str]:
    if not dataset.has_masks(split):
        raise WsssError(f"{dataset.root}: split {split!r} has no ground-truth masks to evaluate against")
    return list(dataset.ids(split) if ids is None else ids)


def evaluate_labels(dataset: PreparedDataset, split: str, pred_dir: str | Path, ids: Sequence[str] | None = None,
                    ignore_pred: bool = False, workers: int | None = 1, allow_missing: bool = False,
                    progress: bool = True) -> ConfusionMatrix:
    """Score label PNGs ``<pred_dir>/<id>.png`` against the split's ground-truth masks.

    Args:
        dataset: the prepared dataset holding the ground truth.
        split: split name; ``ids`` (default: the whole split) must belong to it.
        pred_dir: folder of uint8 label PNGs (0 = background, 255 = ignore).
        ignore_pred: leave out pixels predicted 255 (and report coverage) instead of
            counting them as background.
        workers: processes (``None`` = all cores, 0 or 1 = this process).
        allow_missing: skip images without a prediction instead of failing.

    Returns:
        The accumulated :class:`ConfusionMatrix` [C, C].
    """
    items = _find_inputs(Path(pred_dir), _split_ids(dataset, split, ids), _label_file, "prediction", allow_missing)
    zero = ConfusionMatrix(dataset.num_classes, ignore_pred=ignore_pred)
    return _parallel_sum(_labels_chunk, (dataset, split, ignore_pred), items, zero, workers, "eval labels", progress)


def evaluate_cams(dataset: PreparedDataset, split: str, cam_dir: str | Path, thresholds: Sequence[float],
                  ids: Sequence[str] | None = None, allow_pickle: bool = False, workers: int | None = 1,
                  allow_missing: bool = False, progress: bool = True) -> tuple[np.ndarray, list[ConfusionMatrix]]:
    """Score CAM files ``<cam_dir>/<id>.npz`` (or IRN ``.npy``) for every background threshold.

    Args:
        dataset, split, ids, workers, allow_missing: as in :func:`evaluate_labels`.
        cam_dir: folder of CAM files.
        thresholds: float [T] background thresholds.
        allow_pickle: accept IRN-style pickled ``.npy`` CAM dicts.

    Returns:
        ``(thresholds float64 [T], [ConfusionMatrix] * T)``, one matrix per threshold.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        raise ValueError("no thresholds to evaluate")
    items = _find_inputs(Path(cam_dir), _split_ids(dataset, split, ids), artifacts.find_cam, "CAM", allow_missing)
    num_classes = dataset.num_classes
    zero = np.zeros((thresholds.size, num_classes, num_classes), dtype=np.int64)
    total = _parallel_sum(_cams_chunk, (dataset, split, thresholds, allow_pickle), items, zero, workers,
                          "eval cams", progress)
    matrices = []
    for matrix in total:
        confusion = ConfusionMatrix(num_classes)
        confusion.matrix[:] = matrix
        matrices.append(confusion)
    return thresholds, matrices


def best_threshold(thresholds: Sequence[float], matrices: Sequence[ConfusionMatrix]) -> tuple[int, float, float]:
    """Return ``(index, threshold, mIoU)`` of the highest mIoU (the lowest threshold on ties)."""
    scores = np.array([matrix.miou() for matrix in matrices], dtype=np.float64)
    if np.isnan(scores).all():
        return 0, float(thresholds[0]), float("nan")
    index = int(np.nanargmax(scores))
    return index, float(thresholds[index]), float(scores[index])


# --------------------------------------------------------------------------- folder reports


def format_threshold(threshold: float) -> str:
    """``0.15`` -> ``"0.15"``; finer thresholds keep their digits (``0.125``)."""
    text = f"{threshold:.2f}"
    return text if abs(float(text) - threshold) < 1e-9 else f"{threshold:g}"


def _rounded(value: float) -> float | None:
    return None if value != value else round(float(value), 6)


def _table_without_miou(matrix: ConfusionMatrix, class_names: list[str]) -> str:
    # the table ends with its own padded mIoU line; reports print one plain `mIoU x.xxxx` line instead
    lines = matrix.table(class_names).splitlines()
    return "\n".join(lines[:-1] if lines and lines[-1].startswith("mIoU") else lines)


def folder_report(dataset: PreparedDataset, split: str, folder: str | Path, *, cams: bool,
                  thresholds: Sequence[float] | None = None, ids: Sequence[str] | None = None,
                  ignore_pred: bool = False, allow_pickle: bool = False, allow_missing: bool = False,
                  workers: int | None = None, progress: bool = True) -> dict:
    """Score a folder of label PNGs (``cams=False``) or CAM files (``cams=True``, every threshold).

    Returns:
        JSON-ready ``{"mode", "dataset", "root", "split", "input", "num_images", "num_missing",
        "miou", "summary", ...}`` (CAMs add ``"best_threshold"`` and ``"sweep"``, labels
        ``"ignore_pred_255"``) plus ``"report"``, the printable table (not meant for the JSON file).
    """
    folder = Path(folder)
    ids = list(dataset.ids(split) if ids is None else ids)
    missing = missing_inputs(folder, ids, cams=cams) if folder.is_dir() else ids
    result: dict = {"mode": "cams" if cams else "labels", "dataset": dataset.kind, "root": str(dataset.root),
                    "split": split, "input": str(folder), "num_images": len(ids) - len(missing),
                    "num_missing": len(missing)}
    if not cams:
        matrix = evaluate_labels(dataset, split, folder, ids=ids, ignore_pred=ignore_pred, workers=workers,
                                 allow_missing=allow_missing, progress=progress)
        result["ignore_pred_255"] = ignore_pred
        lines = [_table_without_miou(matrix, dataset.classes), f"mIoU {matrix.miou():.4f}"]
        if ignore_pred:
            lines.append(f"coverage {matrix.coverage():.4f}")
    else:
        thresholds, matrices = evaluate_cams(dataset, split, folder, thresholds, ids=ids, allow_pickle=allow_pickle,
                                             workers=workers, allow_missing=allow_missing, progress=progress)
        index, threshold, best = best_threshold(thresholds, matrices)
        matrix = matrices[index]
        result["best_threshold"] = threshold
        result["sweep"] = [{"threshold": float(t), "miou": _rounded(m.miou())} for t, m in zip(thresholds, matrices)]
        for entry in result["sweep"]:
            log.debug("threshold %s mIoU %s", format_threshold(entry["threshold"]), entry["miou"])
        lines = [_table_without_miou(matrix, dataset.classes), f"mIoU {best:.4f}",
                 f"best threshold {format_threshold(threshold)} mIoU {best:.4f}"]
    result["miou"] = _rounded(matrix.miou())
    result["summary"] = matrix.summary(dataset.classes)
    result["report"] = "\n".join(lines)
    return result
