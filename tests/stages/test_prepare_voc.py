"""``wsss prepare voc`` on a tiny devkit (and SBD folder) built in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

from wsss.stages.cli import cli
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from helpers import assert_one_line_error

HEIGHT, WIDTH = 6, 8
# VOC class indices (data/voc.txt)
AEROPLANE, BIRD, BOTTLE, BUS, CAR, CAT, DOG, HORSE, PERSON = 1, 3, 5, 6, 7, 8, 12, 13, 15
NAMES = {AEROPLANE: "aeroplane", BIRD: "bird", BOTTLE: "bottle", BUS: "bus", CAR: "car", CAT: "cat", DOG: "dog",
         HORSE: "horse", PERSON: "person"}

A, B, C, D, E, F = (f"2007_00000{number}" for number in range(1, 7))
VOC_TRAIN, VOC_VAL = [A, B, C], [D, E]


def _mask(*classes: int) -> np.ndarray:
    """A [6, 8] mask: class k fills column block k, with a 255 ignore band on row 0."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for position, class_index in enumerate(classes):
        mask[1:, 2 * position: 2 * position + 2] = class_index
    mask[0, :] = 255
    return mask


def _xml(objects: list[tuple[int, bool]]) -> str:
    body = "".join(f"<object><name>{NAMES[index]}</name><difficult>{int(difficult)}</difficult>"
                   f"<part><name>head</name></part></object>" for index, difficult in objects)
    return f"<annotation><size><width>{WIDTH}</width><height>{HEIGHT}</height></size>{body}</annotation>"


def make_devkit(tmp_path):
    """Write VOC2012 with 6 images; return the root.

    ====  ================================  ========================  =========
    id    XML objects                       SegmentationClass mask    split
    ====  ================================  ========================  =========
    A     cat, dog (difficult)              cat, dog                  train
    B     person                            person                    train
    C     car                               bus, car (disagreement)   train
    D     (no XML)                          bird                      val
    E     aeroplane, bottle                 aeroplane, bottle         val
    F     horse                             (none; SBD only)          -
    ====  ================================  ========================  =========
    """
    root = tmp_path / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    for image_id in (A, B, C, D, E, F):
        artifacts.write_image(root / "JPEGImages" / f"{image_id}.jpg",
                              rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    annotations = {A: [(CAT, False), (DOG, True)], B: [(PERSON, False)], C: [(CAR, False)],
                   E: [(AEROPLANE, False), (BOTTLE, False)], F: [(HORSE, False)]}
    (root / "Annotations").mkdir()
    for image_id, objects in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(objects))
    masks = {A: _mask(CAT, DOG), B: _mask(PERSON), C: _mask(BUS, CAR), D: _mask(BIRD), E: _mask(AEROPLANE, BOTTLE)}
    for image_id, mask in masks.items():
        artifacts.write_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in VOC_VAL))
    return root


def _save_sbd_mat(path, segmentation: np.ndarray) -> None:
    """Write a .mat in SBD's cls layout: struct GTcls with Boundaries, Segmentation, CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.array([c for c in np.unique(segmentation) if c], dtype=np.uint8)
    scipy.io.savemat(str(path), {"GTcls": {"Boundaries": np.zeros((20, 1), dtype=object),
                                           "Segmentation": segmentation.astype(np.uint8),
                                           "CategoriesPresent": present}})


SBD_F = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
SBD_F[2:5, 1:6] = HORSE
SBD_A = np.full((HEIGHT, WIDTH), CAT, dtype=np.uint8)  # differs from VOC's own mask of A, which must win


def make_sbd(tmp_path):
    """SBD lists train = {A, F, D}, val = {B, E}; .mat masks for A, B, F (C has only VOC's mask)."""
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    _save_sbd_mat(sbd / "cls" / f"{A}.mat", SBD_A)
    _save_sbd_mat(sbd / "cls" / f"{B}.mat", _mask(PERSON))
    _save_sbd_mat(sbd / "cls" / f"{F}.mat", SBD_F)
    (sbd / "train.txt").write_text(f"{A}\n{F}\n{D}\n")
    (sbd / "val.txt").write_text(f"{B}\n{E}\n")
    return sbd


def invoke(*args: str):
    return CliRunner().invoke(cli, ["prepare", "voc", *map(str, args)])


def test_voc_splits_labels_and_disagreements(tmp_path):
    root = make_devkit(tmp_path)
    result = invoke("--root", root, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "voc train: 3 images, 3 with masks" in result.output
    assert "voc val: 2 images, 2 with masks" in result.output

    dataset = PreparedDataset.load(root, "voc")
    assert dataset.num_classes == 21
    assert dataset.ids("train") == VOC_TRAIN and dataset.ids("val") == VOC_VAL
    assert dataset.image_labels(A) == [CAT, DOG]        # the difficult dog still counts
    assert dataset.image_labels(B) == [PERSON]
    assert dataset.image_labels(C) == [CAR]             # XML kept despite the mask's extra bus
    assert dataset.image_labels(D) == [BIRD]            # no XML: labels from the mask
    assert dataset.image_labels(E) == [AEROPLANE, BOTTLE]
    expected = np.zeros(20, dtype=np.float32)
    expected[[CAT - 1, DOG - 1]] = 1
    np.testing.assert_array_equal(dataset.multi_hot(A), expected)
    assert dataset.has_masks("train") and dataset.has_masks("val")
    assert dataset.image_path("val", E) == root / "JPEGImages" / f"{E}.jpg"
    np.testing.assert_array_equal(dataset.read_mask("train", C, shape=(HEIGHT, WIDTH)), _mask(BUS, CAR))

    report = artifacts.read_json(root / "wsss" / "label_disagreements.json")
    assert report["count"] == 1
    assert report["images"] == {C: {"xml": ["car"], "mask": ["bus", "car"], "mask_file": f"SegmentationClass/{C}.png"}}
    assert "WARNING" in result.output and "1 images: the classes in the mask disagree" in result.output
    summary = artifacts.read_json(root / "wsss" / "prepare_voc.json")
    assert summary["splits"]["train"]["images"] == 3 and summary["splits"]["val"]["labels_from_masks"] == 1
    assert summary["disagreements"] == 1 and summary["sbd"] is None


def test_voc_sbd_train_aug_and_mask_conversion(tmp_path):
    root, sbd = make_devkit(tmp_path), make_sbd(tmp_path)
    result = invoke("--root", root, "--sbd-root", sbd, "--workers", 2)
    assert result.exit_code == 0, result.output
    # ({A, F, D} ∪ {B, E} ∪ {A, B, C}) − {D, E} = {A, B, C, F}
    dataset = PreparedDataset.load(root, "voc")
    assert dataset.ids("train_aug") == [A, B, C, F]
    assert "voc train_aug: 4 images, 4 with masks" in result.output
    assert dataset.splits["train_aug"].mask_dir == "SegmentationClassAug"
    assert dataset.image_labels(F) == [HORSE]

    aug = root / "SegmentationClassAug"
    assert sorted(path.stem for path in aug.glob("*.png")) == [A, B, C, F]
    with Image.open(aug / f"{F}.png") as image:
        assert image.mode == "P"
    np.testing.assert_array_equal(dataset.read_mask("train_aug", F), SBD_F)            # converted from the .mat
    np.testing.assert_array_equal(dataset.read_mask("train_aug", A), _mask(CAT, DOG))  # VOC's mask wins over SBD's
    np.testing.assert_array_equal(dataset.read_mask("train_aug", C), _mask(BUS, CAR))  # VOC only, no .mat
    summary = artifacts.read_json(root / "wsss" / "prepare_voc.json")
    assert summary["sbd"] == {"skipped": 0, "voc": 3, "sbd": 1}

    # resume: a valid existing PNG is kept, an unreadable one is redone
    artifacts.write_label_png(aug / f"{F}.png", np.zeros((HEIGHT, WIDTH), dtype=np.uint8))
    (aug / f"{B}.png").write_bytes(b"not a png")
    assert invoke("--root", root, "--sbd-root", sbd, "--workers", 1).exit_code == 0
    assert artifacts.read_json(root / "wsss" / "prepare_voc.json")["sbd"] == {"skipped": 3, "voc": 1, "sbd": 0}
    assert not artifacts.read_label_png(aug / f"{F}.png").any()
    np.testing.assert_array_equal(artifacts.read_label_png(aug / f"{B}.png"), _mask(PERSON))
    assert invoke("--root", root, "--sbd-root", sbd, "--workers", 1, "--overwrite").exit_code == 0
    np.testing.assert_array_equal(artifacts.read_label_png(aug / f"{F}.png"), SBD_F)


def test_voc_extra_split_file_without_masks(tmp_path):
    root = make_devkit(tmp_path)
    main_list = root / "ImageSets" / "Main" / "trainval.txt"
    main_list.parent.mkdir(parents=True)
    main_list.write_text(f"{A}\n{F}\n")
    other_list = main_list.parent / "horses.txt"
    other_list.write_text(f"{F}\n")
    # --split-file is given once per list
    result = invoke("--root", root, "--split-file", main_list, "--split-file", other_list, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "voc trainval: 2 images, 1 with masks" in result.output and "voc horses: 1 images" in result.output
    dataset = PreparedDataset.load(root, "voc")
    assert dataset.ids("trainval") == [A, F] and not dataset.has_masks("trainval")
    assert dataset.ids("horses") == [F]
    assert dataset.image_labels(F) == [HORSE]


def test_voc_missing_root(tmp_path):
    assert_one_line_error(invoke("--root", tmp_path / "nowhere"), "nowhere")


def test_voc_split_lists_missing_image(tmp_path):
    root = make_devkit(tmp_path)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{D}\n2007_000099\n")
    assert_one_line_error(invoke("--root", root, "--workers", 1), "2007_000099.jpg", "not found")
    assert not (root / "wsss" / "dataset.json").exists()


def test_voc_mask_of_wrong_size(tmp_path):
    root = make_devkit(tmp_path)
    artifacts.write_label_png(root / "SegmentationClass" / f"{B}.png", np.zeros((HEIGHT, WIDTH + 1), dtype=np.uint8))
    assert_one_line_error(invoke("--root", root, "--workers", 1), f"{B}.png", "9x6", "8x6")


def test_voc_unknown_class_in_xml(tmp_path):
    root = make_devkit(tmp_path)
    (root / "Annotations" / f"{B}.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    assert_one_line_error(invoke("--root", root, "--workers", 1), f"{B}.xml", "unicorn")


@pytest.mark.parametrize("bad_mat", ["garbage", "no_struct"])
def test_voc_bad_sbd_mat(tmp_path, bad_mat):
    root, sbd = make_devkit(tmp_path), make_sbd(tmp_path)
    path = sbd / "cls" / f"{F}.mat"
    if bad_mat == "garbage":
        path.write_bytes(b"not a mat file")
    else:
        scipy.io.savemat(str(path), {"Segmentation": SBD_F})
    assert_one_line_error(invoke("--root", root, "--sbd-root", sbd, "--workers", 1), f"{F}.mat",
                          "GTcls" if bad_mat == "no_struct" else "not an SBD class mask")
