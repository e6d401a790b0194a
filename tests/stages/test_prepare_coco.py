"""``wsss prepare coco`` on a tiny COCO-format JSON written here (polygons, RLEs, a crowd, overlaps)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from wsss.stages.cli import cli
from wsss import artifacts
from wsss.classes import builtin_classes
from wsss.datasets.prepared import PreparedDataset
from helpers import assert_one_line_error

HEIGHT, WIDTH = 8, 10
SPLIT = "val2014"
# class indices in data/coco.txt (background 0, then the 80 categories in id order)
PERSON, CAR, DOG = 1, 3, 17
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 18, "name": "dog", "supercategory": "animal"}]


def image_id(number: int) -> str:
    return f"COCO_{SPLIT}_{number:012d}"


def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _car_rle() -> dict:
    """Compressed RLE (string counts) of rows 5-7, columns 6-8."""
    car = np.zeros((HEIGHT, WIDTH), dtype=np.uint8, order="F")
    car[5:8, 6:9] = 1
    rle = mask_utils.encode(car)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def make_coco(tmp_path, categories=CATEGORIES):
    """COCO root with 4 images of 10x8.

    1: dog box (listed first, area 4) on a person box (area 48), a car crowd over columns 0-1
       (uncompressed RLE, area 1000 so that sorting by area alone would draw it first)
    2: only a crowd            -> dropped (no label)
    3: no annotation at all    -> dropped
    4: a car as compressed RLE, plus a degenerate 2-point polygon that draws nothing
    """
    root = tmp_path / "COCO"
    rng = np.random.default_rng(0)
    images = []
    for number in (1, 2, 3, 4):
        file_name = f"{image_id(number)}.jpg"
        artifacts.write_image(root / SPLIT / file_name, rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        images.append({"id": number, "file_name": file_name, "height": HEIGHT, "width": WIDTH})
    crowd = {"size": [HEIGHT, WIDTH], "counts": [0, 2 * HEIGHT, HEIGHT * WIDTH - 2 * HEIGHT]}
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 18, "segmentation": _box(2, 2, 4, 4), "area": 4.0, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": _box(0, 0, 8, 6), "area": 48.0, "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 3, "segmentation": crowd, "area": 1000.0, "iscrowd": 1},
        {"id": 20, "image_id": 2, "category_id": 1, "segmentation": crowd, "area": 16.0, "iscrowd": 1},
        {"id": 40, "image_id": 4, "category_id": 3, "segmentation": _car_rle(), "area": 9.0, "iscrowd": 0},
        {"id": 41, "image_id": 4, "category_id": 3, "segmentation": [[1, 1, 2, 2]], "area": 0.0, "iscrowd": 0},
    ]
    json_path = root / "annotations" / f"instances_{SPLIT}.json"
    json_path.parent.mkdir(parents=True)
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def expected_mask_1() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[0:6, 0:8] = PERSON
    mask[2:4, 2:4] = DOG   # the small dog drawn over the large person
    mask[:, 0:2] = 255     # the crowd drawn last, whatever its area
    return mask


def invoke(*args):
    return CliRunner().invoke(cli, ["prepare", "coco", *map(str, args)])


def test_class_indices_match_the_builtin_list():
    classes = builtin_classes("coco")
    assert (classes[PERSON], classes[CAR], classes[DOG]) == ("person", "car", "dog")


def test_coco_masks_labels_and_dropped_images(tmp_path):
    root = make_coco(tmp_path)
    result = invoke("--root", root, "--split", SPLIT, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert f"coco {SPLIT}: 2 images, 2 with masks (2 without labels left out)" in result.output

    dataset = PreparedDataset.load(root, "coco")
    assert dataset.num_classes == 81
    assert dataset.ids(SPLIT) == [image_id(1), image_id(4)]
    assert dataset.image_labels(image_id(1)) == [PERSON, DOG]   # the crowd's car is not a label
    assert dataset.image_labels(image_id(4)) == [CAR]
    assert dataset.image_path(SPLIT, image_id(4)) == root / SPLIT / f"{image_id(4)}.jpg"
    assert dataset.mask_path(SPLIT, image_id(1)) == root / "SegmentationClass" / SPLIT / f"{image_id(1)}.png"

    np.testing.assert_array_equal(dataset.read_mask(SPLIT, image_id(1), shape=(HEIGHT, WIDTH)), expected_mask_1())
    car = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    car[5:8, 6:9] = CAR
    np.testing.assert_array_equal(dataset.read_mask(SPLIT, image_id(4)), car)
    assert not (root / "SegmentationClass" / SPLIT / f"{image_id(2)}.png").exists()

    summary = artifacts.read_json(root / "wsss" / "prepare_coco.json")["splits"][SPLIT]
    assert summary["images_in_json"] == 4 and summary["dropped_without_labels"] == 2
    assert summary["masks_written"] == 2 and summary["crowd_annotations"] == 2

    # resume: finished masks are kept; --overwrite redraws them
    artifacts.write_label_png(root / "SegmentationClass" / SPLIT / f"{image_id(4)}.png",
                              np.zeros((HEIGHT, WIDTH), dtype=np.uint8))
    assert invoke("--root", root, "--split", SPLIT, "--workers", 1).exit_code == 0
    summary = artifacts.read_json(root / "wsss" / "prepare_coco.json")["splits"][SPLIT]
    assert summary["masks_skipped"] == 2 and summary["masks_written"] == 0
    assert not dataset.read_mask(SPLIT, image_id(4)).any()
    assert invoke("--root", root, "--split", SPLIT, "--workers", 1, "--overwrite").exit_code == 0
    np.testing.assert_array_equal(dataset.read_mask(SPLIT, image_id(4)), car)


def test_coco_unknown_category_names_the_json(tmp_path):
    root = make_coco(tmp_path, categories=CATEGORIES + [{"id": 99, "name": "unicorn"}])
    assert_one_line_error(invoke("--root", root, "--split", SPLIT), f"instances_{SPLIT}.json", "unicorn")


def test_coco_missing_image(tmp_path):
    root = make_coco(tmp_path)
    (root / SPLIT / f"{image_id(4)}.jpg").unlink()
    assert_one_line_error(invoke("--root", root, "--split", SPLIT, "--workers", 1), f"{image_id(4)}.jpg", "not found")
    assert not (root / "wsss" / "dataset.json").exists()


def test_coco_image_size_differs_from_json(tmp_path):
    root = make_coco(tmp_path)
    artifacts.write_image(root / SPLIT / f"{image_id(1)}.jpg", np.zeros((HEIGHT + 2, WIDTH, 3), dtype=np.uint8))
    assert_one_line_error(invoke("--root", root, "--split", SPLIT, "--workers", 1), f"{image_id(1)}.jpg", "10x10",
                          "10x8")


def test_coco_missing_annotation_file(tmp_path):
    root = make_coco(tmp_path)
    assert_one_line_error(invoke("--root", root, "--split", "train2014"), "instances_train2014.json", "not found")
