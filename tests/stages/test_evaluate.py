"""Tests of wsss/evaluation.py and `wsss eval` on a tiny prepared dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss.stages.evaluate import EvalConfig
from wsss import artifacts, evaluation
from wsss.datasets.prepared import PreparedDataset, SplitSpec, write_prepared
from wsss.metrics import ConfusionMatrix

CLASSES = ["background", "cat", "dog"]

# Split "hand": one 2x5 image; with HAND_PRED the confusion matrix is
#   [[2 1 0], [0 2 1], [2 0 2]]  ->  IoU 0.4, 0.5, 0.4, mIoU 0.4333 (worked out in tests/test_metrics.py)
HAND_GT = np.array([[0, 0, 0, 1, 1], [1, 2, 2, 2, 2]], dtype=np.uint8)
HAND_PRED = np.array([[0, 0, 1, 1, 1], [2, 2, 2, 0, 0]], dtype=np.uint8)

# Split "cams": one 2x6 image, columns 0-1 cat, 2-3 background, 4-5 dog, and CAMs
#   column:      0     1     2     3      4     5
#   cat CAM    .75   .5    .25   .125    0     0
#   dog CAM     0     0     0    .125   .5   .375
# (values exact in float16).  A pixel is foreground where its strongest CAM exceeds t:
#   t = 0.10: all foreground, both background columns -> cat (tie at col 3 -> first key, cat):
#             IoU bg 0/4 = 0, cat 4/8 = 0.5, dog 1            -> mIoU 0.5
#   t = 0.20: column 2 -> cat: IoU bg 2/4, cat 4/6, dog 1         -> mIoU 0.722222
#   t in [0.25, 0.375): every pixel right                         -> mIoU 1 (best: 0.25, tie -> background)
#   t = 0.40: column 5 -> bg: IoU bg 4/6, cat 1, dog 2/4          -> mIoU 0.722222
#   t = 0.60: columns 1, 4, 5 -> bg: [[4 0 0], [2 2 0], [4 0 0]]:
#             IoU bg 4/(4+10-4) = 0.4, cat 2/4, dog 0                -> mIoU 0.3
CAM_GT = np.array([[1, 1, 0, 0, 2, 2]] * 2, dtype=np.uint8)
CAM_KEYS = np.array([1, 2])
CAM_PLANES = np.array([[[0.75, 0.5, 0.25, 0.125, 0, 0]] * 2, [[0, 0, 0, 0.125, 0.5, 0.375]] * 2])


def _val_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    masks = {}
    for index, shape in enumerate([(6, 8), (8, 6), (7, 7), (5, 9)]):
        mask = rng.integers(0, 3, size=shape).astype(np.uint8)
        mask[0, :2] = 255
        masks[f"img{index}"] = mask
    return masks


@pytest.fixture()
def dataset_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    masks = {**_val_masks(), "hand": HAND_GT, "camimg": CAM_GT}
    for image_id, mask in masks.items():
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
    labels = {image_id: sorted(set(np.unique(mask).tolist()) - {0, 255}) for image_id, mask in masks.items()}
    spec = SplitSpec(image_dir="images", image_ext=".jpg", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {"val": (spec, sorted(_val_masks())), "hand": (spec, ["hand"]),
                                             "cams": (spec, ["camimg"])}, labels)
    return root


def _invoke(*args: str):
    result = CliRunner().invoke(cli, ["eval", *args])
    assert "Traceback" not in result.output
    return result


def _copy_masks(root: Path, ids: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        shutil.copy(root / "masks" / f"{image_id}.png", folder / f"{image_id}.png")
    return folder


# --------------------------------------------------------------------------- library

def test_threshold_range_has_no_float_drift():
    thresholds = evaluation.threshold_range(0.05, 0.60, 0.01)
    assert thresholds.size == 56
    assert thresholds[0] == 0.05 and thresholds[20] == 0.25 and thresholds[-1] == 0.6
    np.testing.assert_array_equal(evaluation.threshold_range(0.1, 0.3, 0.1), [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        evaluation.threshold_range(0.5, 0.1, 0.1)


def test_cam_to_label_is_argmax_with_a_background_plane():
    rng = np.random.default_rng(0)
    keys = np.array([3, 7, 12])
    cams = rng.random((3, 9, 11)).astype(np.float32)
    for threshold in (0.2, 0.5, 0.9):
        stacked = np.concatenate([np.full((1, 9, 11), threshold, dtype=np.float32), cams])
        expected = np.concatenate([[0], keys])[stacked.argmax(0)]
        label = evaluation.cam_to_label(keys, cams, threshold)
        assert label.dtype == np.uint8 and label.shape == (9, 11)
        np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(evaluation.cam_to_label(np.zeros(0), np.zeros((0, 2, 3)), 0.1), np.zeros((2, 3)))
    # the hand-made CAMs at t = 0.2: column 2 (0.25) is still cat, column 3 (0.125) background
    np.testing.assert_array_equal(evaluation.cam_to_label(CAM_KEYS, CAM_PLANES, 0.2)[0], [1, 1, 1, 0, 2, 2])


def test_sweep_matrices_equal_one_matrix_per_threshold():
    rng = np.random.default_rng(1)
    keys = np.array([1, 4])
    cams = (rng.integers(0, 9, size=(2, 10, 12)) / 8).astype(np.float16).astype(np.float32)  # many exact ties
    target = rng.integers(0, 5, size=(10, 12))
    target[rng.random(target.shape) < 0.1] = 255
    thresholds = np.array([0.5, 0.0, 0.25, 1.0, 0.3, 0.125])  # unsorted on purpose
    matrices = evaluation.sweep_matrices(keys, cams, target, thresholds, num_classes=5)
    assert matrices.shape == (6, 5, 5) and matrices.dtype == np.int64
    for index, threshold in enumerate(thresholds):
        expected = ConfusionMatrix(5).update(target, evaluation.cam_to_label(keys, cams, threshold)).matrix
        np.testing.assert_array_equal(matrices[index], expected)


def test_sweep_matrices_hand_made_cams():
    matrices = evaluation.sweep_matrices(CAM_KEYS, CAM_PLANES, CAM_GT, [0.1, 0.2, 0.25, 0.4, 0.6], 3)
    scores = []
    for matrix in matrices:
        confusion = ConfusionMatrix(3)
        confusion.matrix[:] = matrix
        scores.append(confusion.miou())
    np.testing.assert_allclose(scores, [0.5, (0.5 + 4 / 6 + 1) / 3, 1.0, (4 / 6 + 1 + 0.5) / 3, 0.3])
    # t = 0.1: rows gt bg / cat / dog -> [[0 4 0], [0 4 0], [0 0 4]]
    np.testing.assert_array_equal(matrices[0], [[0, 4, 0], [0, 4, 0], [0, 0, 4]])


def test_sweep_matrices_rejects_bad_keys_and_shapes():
    with pytest.raises(ValueError, match="keys"):
        evaluation.sweep_matrices(np.array([3]), np.zeros((1, 2, 6)), CAM_GT, [0.1], 3)
    with pytest.raises(ValueError, match="target"):
        evaluation.sweep_matrices(CAM_KEYS, CAM_PLANES, CAM_GT[:, :5], [0.1], 3)


def test_workers_one_and_two_give_identical_matrices(dataset_root: Path, tmp_path: Path):
    dataset = PreparedDataset.load(dataset_root)
    rng = np.random.default_rng(5)
    pred_dir, cam_dir = tmp_path / "pred", tmp_path / "cams"
    for image_id, mask in _val_masks().items():
        prediction = np.where(rng.random(mask.shape) < 0.7, mask, rng.integers(0, 3, size=mask.shape)).astype(np.uint8)
        artifacts.write_label_png(artifacts.label_path(pred_dir, image_id), prediction)
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array([1, 2]), rng.random((2, *mask.shape)))
    one = evaluation.evaluate_labels(dataset, "val", pred_dir, workers=1, progress=False)
    two = evaluation.evaluate_labels(dataset, "val", pred_dir, workers=2, progress=False)
    np.testing.assert_array_equal(one.matrix, two.matrix)
    assert one.matrix.sum() == sum(np.count_nonzero(mask != 255) for mask in _val_masks().values())
    thresholds = evaluation.threshold_range(0.1, 0.9, 0.1)
    _, cams_one = evaluation.evaluate_cams(dataset, "val", cam_dir, thresholds, workers=1, progress=False)
    _, cams_two = evaluation.evaluate_cams(dataset, "val", cam_dir, thresholds, workers=2, progress=False)
    for first, second in zip(cams_one, cams_two):
        np.testing.assert_array_equal(first.matrix, second.matrix)
    assert len({matrix.miou() for matrix in cams_one}) > 1


# --------------------------------------------------------------------------- command line

def test_config_takes_exactly_one_folder_and_a_valid_sweep(tmp_path: Path):
    cfg = EvalConfig(root=tmp_path, pred_dir=tmp_path / "pred")
    assert cfg.sweep == evaluation.DEFAULT_SWEEP
    with pytest.raises(ValueError, match="^--cams .*exactly one"):
        cfg.replace(cam_dir=tmp_path / "cams")
    with pytest.raises(ValueError, match="^--pred .*exactly one"):
        cfg.replace(pred_dir=None)
    with pytest.raises(ValueError, match="^--sweep .*at most 10000"):  # a list from a file skips the text parser
        cfg.replace(sweep=(0.0, 1.0, 1e-9))


def test_identical_predictions_score_one(dataset_root: Path, tmp_path: Path):
    pred_dir = _copy_masks(dataset_root, sorted(_val_masks()), tmp_path / "pred")
    result = _invoke("--pred", str(pred_dir), "--dataset", "folder", "--root", str(dataset_root), "--split", "val",
                     "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "mIoU 1.0000" in result.output.splitlines()
    report = artifacts.read_json(artifacts.eval_metrics_path(pred_dir, "val"))
    assert report["miou"] == 1.0 and report["mode"] == "labels" and report["num_images"] == 4
    assert report["summary"]["per_class"]["dog"]["iou"] == 1.0
    assert report["provenance"]["config"]["split"] == "val"


def test_known_wrong_prediction_gives_hand_computed_miou(dataset_root: Path, tmp_path: Path):
    artifacts.write_label_png(tmp_path / "pred" / "hand.png", HAND_PRED)
    out = tmp_path / "report.json"
    result = _invoke("--pred", str(tmp_path / "pred"), "--root", str(dataset_root), "--split", "hand",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "mIoU 0.4333" in result.output.splitlines()
    report = artifacts.read_json(out)
    assert report["miou"] == pytest.approx(1.3 / 3, abs=1e-6)
    assert report["summary"]["per_class"]["cat"] == {"iou": 0.5, "precision": pytest.approx(2 / 3, abs=1e-6),
                                                     "recall": pytest.approx(2 / 3, abs=1e-6)}


def test_ignore_pred_255_reports_coverage(dataset_root: Path, tmp_path: Path):
    # prediction = ground truth, but its second row abstains (255)
    prediction = HAND_GT.copy()
    prediction[1] = 255  # the 5 pixels of row 1 abstain; row 0 (0 0 0 1 1) stays right
    artifacts.write_label_png(tmp_path / "pred" / "hand.png", prediction)
    args = ["--pred", str(tmp_path / "pred"), "--root", str(dataset_root), "--split", "hand"]
    ignored = _invoke(*args, "--ignore-pred-255")
    assert ignored.exit_code == 0, ignored.output
    # only row 0 is scored: bg 3/3 and cat 2/2 -> mIoU 1; coverage 5 / 10
    assert "mIoU 1.0000" in ignored.output.splitlines() and "coverage 0.5000" in ignored.output.splitlines()
    as_background = _invoke(*args)
    # row 1 (1 2 2 2 2) predicted background: matrix [[3 0 0], [1 2 0], [4 0 0]]
    # IoU bg 3/8, cat 2/3, dog 0/4 -> mIoU (0.375 + 0.666667 + 0) / 3 = 0.347222
    assert "mIoU 0.3472" in as_background.output.splitlines()


def test_cam_sweep_finds_the_constructed_best_threshold(dataset_root: Path, tmp_path: Path):
    artifacts.write_cam(artifacts.cam_path(tmp_path / "cams", "camimg"), CAM_KEYS, CAM_PLANES)
    result = _invoke("--cams", str(tmp_path / "cams"), "--root", str(dataset_root), "--split", "cams",
                     "--sweep", "0.05:0.60:0.01")
    assert result.exit_code == 0, result.output
    assert "best threshold 0.25 mIoU 1.0000" in result.output.splitlines()
    report = artifacts.read_json(artifacts.eval_metrics_path(tmp_path / "cams", "cams"))
    assert report["best_threshold"] == 0.25 and report["miou"] == 1.0
    sweep = {round(entry["threshold"], 2): entry["miou"] for entry in report["sweep"]}
    assert len(sweep) == 56
    assert sweep[0.1] == pytest.approx(0.5) and sweep[0.2] == pytest.approx(0.722222, abs=1e-6)
    assert sweep[0.37] == 1.0 and sweep[0.38] == pytest.approx(0.722222, abs=1e-6)
    assert sweep[0.6] == pytest.approx(0.3, abs=1e-6)


def test_missing_prediction_is_a_one_line_error(dataset_root: Path, tmp_path: Path):
    pred_dir = _copy_masks(dataset_root, ["img0", "img2"], tmp_path / "pred")
    result = _invoke("--pred", str(pred_dir), "--root", str(dataset_root), "--split", "val")
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "img1.png" in errors[0] and "2 of 4" in errors[0]
    assert not artifacts.eval_metrics_path(pred_dir, "val").exists()
    skipped = _invoke("--pred", str(pred_dir), "--root", str(dataset_root), "--split", "val", "--allow-missing")
    assert skipped.exit_code == 0, skipped.output
    report = artifacts.read_json(artifacts.eval_metrics_path(pred_dir, "val"))
    assert report["num_images"] == 2 and report["num_missing"] == 2 and report["miou"] == 1.0
    # with every file missing, --allow-missing leaves nothing to score: an error, not "mIoU nan" and exit 0
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = _invoke("--pred", str(empty), "--root", str(dataset_root), "--split", "val", "--allow-missing")
    errors = [line for line in nothing.output.splitlines() if line.startswith("Error:")]
    assert nothing.exit_code == 1 and len(errors) == 1 and "4 of 4" in errors[0] and "nothing is left" in errors[0]
    assert not artifacts.eval_metrics_path(empty, "val").exists()


def test_wrong_size_prediction_is_a_one_line_error(dataset_root: Path, tmp_path: Path):
    pred_dir = _copy_masks(dataset_root, sorted(_val_masks()), tmp_path / "pred")
    artifacts.write_label_png(pred_dir / "img3.png", np.zeros((9, 5), dtype=np.uint8))
    result = _invoke("--pred", str(pred_dir), "--root", str(dataset_root), "--split", "val", "--workers", "2")
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "img3.png" in errors[0] and "5x9" in errors[0] and "9x5" in errors[0]


def test_bad_cam_and_option_errors(dataset_root: Path, tmp_path: Path):
    artifacts.write_cam(artifacts.cam_path(tmp_path / "cams", "camimg"), CAM_KEYS, CAM_PLANES[:, :, :5])
    base = ["--root", str(dataset_root), "--split", "cams"]
    wrong_size = _invoke("--cams", str(tmp_path / "cams"), *base)
    assert wrong_size.exit_code != 0 and "camimg.npz" in wrong_size.output
    pickled = tmp_path / "irn"
    pickled.mkdir()
    np.save(pickled / "camimg.npy", {"keys": np.array([0, 1]), "high_res": CAM_PLANES}, allow_pickle=True)
    refused = _invoke("--cams", str(pickled), *base)
    assert refused.exit_code != 0 and "--allow-pickle" in refused.output
    accepted = _invoke("--cams", str(pickled), *base, "--allow-pickle")
    assert accepted.exit_code == 0, accepted.output
    assert "best threshold 0.25 mIoU 1.0000" in accepted.output.splitlines()
    both = _invoke("--cams", str(pickled), "--pred", str(pickled), *base)
    assert both.exit_code == 2 and "Invalid value for '--cams'" in both.output and "exactly one" in both.output
    neither = _invoke(*base)
    assert neither.exit_code == 2 and "Invalid value for '--pred'" in neither.output and "exactly one" in neither.output
    bad_sweep = _invoke("--cams", str(pickled), *base, "--sweep", "0.5:0.1:0.1")
    assert bad_sweep.exit_code == 2 and "Invalid value for '--sweep'" in bad_sweep.output
    out_folder = _invoke("--cams", str(pickled), *base, "--out", str(tmp_path))
    assert out_folder.exit_code == 2 and "is a directory" in out_folder.output
    wrong_kind = _invoke("--cams", str(pickled), *base, "--dataset", "voc")
    assert wrong_kind.exit_code != 0 and "prepared as 'folder'" in wrong_kind.output


def test_scoring_the_ground_truth_writes_beside_it_never_into_it(dataset_root: Path):
    masks = dataset_root / "masks"
    before = sorted(path.name for path in masks.iterdir())
    result = _invoke("--pred", str(masks), "--root", str(dataset_root), "--split", "val")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in masks.iterdir()) == before  # the dataset's folder is untouched
    report = artifacts.read_json(dataset_root / "masks_metrics_eval_val.json")
    assert report["miou"] == 1.0  # the ground truth against itself
