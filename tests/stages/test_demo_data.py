"""Tests of the synthetic demo dataset (wsss/datasets/demo.py) and `wsss demo-data`."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss import artifacts
from helpers import assert_one_line_error
from wsss.classes import builtin_classes
from wsss.datasets import demo
from wsss.datasets.prepared import PreparedDataset


def _write(out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(cli, ["demo-data", str(out), "--num-train", "6", "--num-val", "4", *extra])
    assert result.exit_code == 0, result.output
    return out / "VOC2012"


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _objects(xml_file: Path) -> tuple[tuple[int, int], list[tuple[str, tuple[int, ...]]]]:
    root = ElementTree.parse(xml_file).getroot()
    size = (int(root.findtext("size/height")), int(root.findtext("size/width")))
    objects = [(obj.findtext("name"), tuple(int(obj.findtext(f"bndbox/{tag}")) for tag in ("xmin", "ymin", "xmax", "ymax")))
               for obj in root.iter("object")]
    return size, objects


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("demo") / "out")


def test_class_indices_are_the_voc_positions():
    voc = builtin_classes("voc")
    assert {name: voc.index(name) for name in demo.DEMO_CLASSES} == demo.DEMO_CLASSES
    assert len(demo.DEMO_CLASSES) == 6


def test_layout_and_split_lists(demo_root: Path):
    train = (demo_root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (demo_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 4 and not set(train) & set(val)
    for image_id in train + val:
        for folder, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"), ("Annotations", ".xml")):
            assert (demo_root / folder / f"{image_id}{suffix}").is_file()
    info = artifacts.read_json(demo_root / "demo.json")
    assert info["seed"] == 0 and info["size"] == 64 and info["num_train"] == 6 and info["num_val"] == 4
    assert info["classes"] == demo.DEMO_CLASSES


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path):
    first, second = _files(_write(tmp_path / "a")), _files(_write(tmp_path / "b"))
    assert first.keys() == second.keys() and len(first) == 10 * 3 + 2 + 1
    assert all(first[name] == second[name] for name in first)
    other = _files(_write(tmp_path / "c", "--seed", "1"))
    images = [name for name in first if name.startswith("JPEGImages")]
    assert all(first[name] != other[name] for name in images)


def test_sizes_agree(demo_root: Path):
    shapes = set()
    for image_id in (demo_root / "ImageSets/Segmentation/train.txt").read_text().split():
        image = artifacts.read_image(demo_root / "JPEGImages" / f"{image_id}.jpg")
        mask = artifacts.read_label_png(demo_root / "SegmentationClass" / f"{image_id}.png")
        (height, width), _ = _objects(demo_root / "Annotations" / f"{image_id}.xml")
        assert image.shape == (height, width, 3) and mask.shape == (height, width)
        assert max(height, width) == 64 and min(height, width) >= round(0.8 * 64)
        shapes.add((height, width))
    assert any(height != width for height, width in shapes)  # code downstream must see non-square images


def test_annotations_agree_with_masks(demo_root: Path):
    voc = builtin_classes("voc")
    for image_id in demo.demo_ids(6, 4)["train"] + demo.demo_ids(6, 4)["val"]:
        mask = artifacts.read_label_png(demo_root / "SegmentationClass" / f"{image_id}.png")
        _, objects = _objects(demo_root / "Annotations" / f"{image_id}.xml")
        assert 1 <= len(objects) <= 3
        in_mask = {voc[index] for index in np.unique(mask) if index not in (0, 255)}
        assert {name for name, _ in objects} == in_mask
        for name, (xmin, ymin, xmax, ymax) in objects:
            assert 1 <= xmin <= xmax <= mask.shape[1] and 1 <= ymin <= ymax <= mask.shape[0]
            inside = mask[ymin - 1:ymax, xmin - 1:xmax]
            assert (inside == voc.index(name)).any()
        # Every pixel of a class lies inside one of the boxes of that class.
        for index in np.unique(mask):
            if index in (0, 255):
                continue
            covered = np.zeros(mask.shape, dtype=bool)
            for name, (xmin, ymin, xmax, ymax) in objects:
                if voc.index(name) == index:
                    covered[ymin - 1:ymax, xmin - 1:xmax] = True
            assert covered[mask == index].all()


def test_boundary_band_on_hand_made_square():
    label = np.zeros((5, 5), dtype=np.uint8)
    label[1:4, 1:4] = 8
    instances = (label > 0).astype(np.int64)
    band = demo._boundary_band(label, instances)
    expected = np.zeros((5, 5), dtype=bool)
    expected[1:4, 1:4] = True
    expected[2, 2] = False  # the ring of the object's own border pixels, not the background around it
    np.testing.assert_array_equal(band, expected)


def test_boundary_band_is_thin_and_only_at_class_changes():
    for index in range(30):
        sample = demo.render_sample(np.random.default_rng((7, index)), 64)
        label, mask = sample.label, sample.mask
        band = mask == 255
        assert band.any()
        np.testing.assert_array_equal(mask[~band], label[~band])
        padded = np.pad(label.astype(np.int64), 1, constant_values=-1)
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        changes = np.zeros(label.shape, dtype=bool)
        for neighbour in neighbours:
            changes |= (neighbour != label) & (neighbour >= 0)
        assert not (band & ~changes).any()  # 255 only right at a class change: one pixel wide
        # Every 4-adjacent pair with different classes has the band on one side.
        for axis in (0, 1):
            a = np.moveaxis(label, axis, 0)
            b = np.moveaxis(band, axis, 0)
            differs = a[1:] != a[:-1]
            assert (b[1:] | b[:-1])[differs].all()


def test_objects_and_classes_vary():
    names, counts = set(), set()
    for index in range(60):
        sample = demo.render_sample(np.random.default_rng((0, index)), 64)
        names.update(obj.name for obj in sample.objects)
        counts.add(len(sample.objects))
    assert names == set(demo.DEMO_CLASSES)
    assert counts == {1, 2, 3}


def test_look_alike_pairs_share_body_and_differ_in_a_small_part():
    """cat and dog drawn with the same colours and place differ only in a small share of pixels."""
    rng = np.random.default_rng(0)
    background = np.zeros((64, 64, 3), dtype=np.float32)
    for first, second in demo.LOOK_ALIKE_PAIRS:
        spec = demo._random_object(rng, 64, 64)
        spec.name, spec.center, spec.half_size, spec.angle = first, (32.0, 32.0), 20.0, 0.0
        spec.colours = demo._class_colours(np.random.default_rng(1), first)
        _, first_objects = demo._compose(background, [spec])
        spec.name = second
        _, second_objects = demo._compose(background, [spec])
        union = np.count_nonzero((first_objects > 0) | (second_objects > 0))
        shared = np.count_nonzero((first_objects > 0) & (second_objects > 0))
        assert 0.5 < shared / union < 0.95


def test_bad_size_is_an_error(tmp_path: Path):
    result = CliRunner().invoke(cli, ["demo-data", str(tmp_path / "x"), "--size", "8"])
    assert result.exit_code != 0 and "--size" in result.output
    assert not (tmp_path / "x").exists()


def test_prepare_voc_reads_the_demo_dataset(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(cli, ["demo-data", str(tmp_path / "demo"), "--num-train", "5", "--num-val", "3"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "demo" / "VOC2012"
    result = runner.invoke(cli, ["prepare", "voc", "--root", str(root)])
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(root, "voc")
    assert dataset.classes == builtin_classes("voc")
    assert dataset.ids("train") == demo.demo_ids(5, 3)["train"] and dataset.ids("val") == demo.demo_ids(5, 3)["val"]
    for image_id in dataset.ids("val"):
        _, objects = _objects(root / "Annotations" / f"{image_id}.xml")
        assert dataset.image_labels(image_id) == sorted({demo.DEMO_CLASSES[name] for name, _ in objects})
        mask = dataset.read_mask("val", image_id, dataset.read_image("val", image_id).shape[:2])
        assert set(np.unique(mask)) - {0, 255} == set(dataset.image_labels(image_id))


def test_another_demo_over_an_earlier_one_is_refused_and_the_earlier_one_untouched(tmp_path: Path):
    root = _write(tmp_path / "d")
    before = _files(root)
    again = _files(_write(tmp_path / "d"))  # the same demo again: the same bytes
    assert again == before
    # fewer images would have left img 6-9 beside split lists that no longer name them
    result = CliRunner().invoke(cli, ["demo-data", str(tmp_path / "d"), "--num-train", "3", "--num-val", "2"])
    assert_one_line_error(result, "holds a demo dataset with num_train 6, num_val 4", "asked: num_train 3, num_val 2")
    assert _files(root) == before
    # a VOC2012 folder that is not a demo is the user's data
    mine = tmp_path / "mine" / "VOC2012"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my data")
    result = CliRunner().invoke(cli, ["demo-data", str(tmp_path / "mine")])
    assert_one_line_error(result, "is not a demo dataset")
    assert sorted(path.name for path in mine.iterdir()) == ["notes.txt"]
