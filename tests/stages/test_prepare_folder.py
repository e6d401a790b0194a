"""``wsss prepare folder``: a user's images + labels.csv + classes.txt (+ masks), built in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from helpers import assert_one_line_error

HEIGHT, WIDTH = 6, 8
CAT, DOG = 1, 2  # background is prepended to classes.txt


def _mask(class_index: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[2:5, 3:7] = class_index
    mask[0, :] = 255
    return mask


def make_folder(tmp_path) -> dict:
    """data/images/{a.jpg, b.png, c.jpg}, data/masks/*.png, labels.csv, classes.txt (no background line)."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png", "c.jpg"):
        artifacts.write_image(data / "images" / name, rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    artifacts.write_label_png(data / "masks" / "a.png", _mask(CAT))
    both = _mask(CAT)
    both[5, :] = DOG
    artifacts.write_label_png(data / "masks" / "b.png", both)
    artifacts.write_label_png(data / "masks" / "c.png", np.zeros((HEIGHT, WIDTH), dtype=np.uint8))
    (data / "labels.csv").write_text("image,labels\na.jpg,cat\nb.png, cat ; dog\nc.jpg,\n")
    (data / "classes.txt").write_text("cat\ndog\n")
    return {"root": data, "images": data / "images", "masks": data / "masks", "labels": data / "labels.csv",
            "classes": data / "classes.txt"}


def invoke(paths: dict, *extra, masks: bool = True):
    args = ["prepare", "folder", "--images", paths["images"], "--labels", paths["labels"],
            "--classes", paths["classes"], "--workers", 1]
    if masks:
        args += ["--masks", paths["masks"]]
    return CliRunner().invoke(cli, [str(arg) for arg in [*args, *extra]])


def test_folder_happy_path(tmp_path):
    paths = make_folder(tmp_path)
    result = invoke(paths)
    assert result.exit_code == 0, result.output
    assert "folder train: 3 images, 3 with masks (3 classes with background)" in result.output
    assert "1 of 3 images" in result.output and "no labels" in result.output  # the empty row warns

    dataset = PreparedDataset.load(paths["root"], "folder")  # root defaults to the parent of --images
    assert dataset.classes == ["background", "cat", "dog"]
    assert dataset.ids("train") == ["a", "b", "c"]
    assert [dataset.image_labels(i) for i in ("a", "b", "c")] == [[CAT], [CAT, DOG], []]
    np.testing.assert_array_equal(dataset.multi_hot("b"), [1.0, 1.0])
    assert dataset.image_path("train", "b") == paths["images"] / "b.png"   # mixed extensions
    assert dataset.image_path("train", "a") == paths["images"] / "a.jpg"
    assert dataset.read_image("train", "b").shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(dataset.read_mask("train", "a", shape=(HEIGHT, WIDTH)), _mask(CAT))
    assert dataset.splits["train"].image_dir == "images"               # stored relative to the root
    summary = artifacts.read_json(paths["root"] / "wsss" / "prepare_folder.json")
    assert summary["images"] == 3 and summary["without_labels"] == 1 and summary["mask_label_mismatches"] == 0


def test_folder_background_line_root_and_split(tmp_path):
    paths = make_folder(tmp_path)
    paths["classes"].write_text("background\ncat\ndog\n")
    other_root = tmp_path / "prepared"
    result = invoke(paths, "--split", "val", "--root", other_root, masks=False)
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(other_root, "folder")
    assert dataset.classes == ["background", "cat", "dog"]
    assert dataset.ids("val") == ["a", "b", "c"] and not dataset.has_masks("val")
    assert dataset.image_path("val", "c") == (paths["images"] / "c.jpg").resolve()  # outside root: absolute
    assert not (paths["root"] / "wsss").exists()


@pytest.mark.parametrize("case", ["unknown_class", "too_many_fields", "bad_header", "missing_image",
                                  "corrupt_image", "wrong_mask_size", "missing_mask", "bad_mask_value"])
def test_folder_errors(tmp_path, case):
    paths = make_folder(tmp_path)
    labels = paths["labels"]
    if case == "unknown_class":
        labels.write_text("image,labels\na.jpg,cat\nb.png,cat;dgo\n")
        needles = ["labels.csv", "line 3", "'dgo'"]
    elif case == "too_many_fields":
        labels.write_text("image,labels\na.jpg,cat\nb.png,cat,dog\n")
        needles = ["labels.csv", "line 3", "3 fields"]
    elif case == "bad_header":
        labels.write_text("file,classes\na.jpg,cat\n")
        needles = ["labels.csv", "header"]
    elif case == "missing_image":
        labels.write_text("image,labels\na.jpg,cat\nd.jpg,dog\n")
        needles = ["d.jpg", "labels.csv, line 3", "not found"]
    elif case == "corrupt_image":
        (paths["images"] / "c.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        needles = ["c.jpg", "not a readable image"]
    elif case == "wrong_mask_size":
        artifacts.write_label_png(paths["masks"] / "b.png", np.zeros((HEIGHT, WIDTH + 1), dtype=np.uint8))
        needles = ["b.png", "9x6", "8x6"]
    elif case == "missing_mask":
        (paths["masks"] / "c.png").unlink()
        needles = ["c.png", "not found"]
    else:
        artifacts.write_label_png(paths["masks"] / "a.png", np.full((HEIGHT, WIDTH), 7, dtype=np.uint8))
        needles = ["a.png", "class index 7"]
    assert_one_line_error(invoke(paths), *needles)
    assert not (paths["root"] / "wsss" / "dataset.json").exists()


def test_folder_background_not_first_is_an_error(tmp_path):
    paths = make_folder(tmp_path)
    paths["classes"].write_text("cat\nbackground\ndog\n")
    assert_one_line_error(invoke(paths), "classes.txt", "background")


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_a_later_prepare_never_changes_an_earlier_ones_labels_or_classes_unless_overwrite(tmp_path):
    paths = make_folder(tmp_path)
    assert invoke(paths, masks=False).exit_code == 0
    meta = paths["root"] / "wsss"
    before = _files(meta)
    # another split that labels image a as a dog: train's label of a would have become dog
    val_labels = paths["root"] / "val.csv"
    val_labels.write_text("image,labels\na.jpg,dog\n")
    result = invoke({**paths, "labels": val_labels}, "--split", "val", masks=False)
    assert_one_line_error(result, "labels.json", "image 'a' is labelled ['cat'] by an earlier prepare (split train) "
                                                 "and ['dog'] here", "--overwrite")
    assert _files(meta) == before
    # another class list: every split prepared before would have gone
    other_classes = paths["root"] / "other.txt"
    other_classes.write_text("cat\ndog\nbird\n")
    result = invoke({**paths, "classes": other_classes}, "--split", "val", masks=False)
    assert_one_line_error(result, "dataset.json", "['background', 'cat', 'dog']",
                          "['background', 'cat', 'dog', 'bird']", "--overwrite")
    assert _files(meta) == before
    # the same labels for a shared image are fine; --overwrite relabels, as asked
    val_labels.write_text("image,labels\na.jpg,cat\n")
    assert invoke({**paths, "labels": val_labels}, "--split", "val", masks=False).exit_code == 0
    val_labels.write_text("image,labels\na.jpg,dog\n")
    assert invoke({**paths, "labels": val_labels}, "--split", "val", "--overwrite", masks=False).exit_code == 0
    dataset = PreparedDataset.load(paths["root"], "folder")
    assert dataset.image_labels("a") == [DOG] and dataset.ids("train") == ["a", "b", "c"]
