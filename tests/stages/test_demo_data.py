"""Tests of the synthetic demo dataset (wsss/datasets/demo.py) and `wsss demo-data`."""

from __future__ import annotations

import hashlib
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


# --------------------------------------------------------------------------- styles

def _style_hash(samples) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        for array in (sample.image, sample.mask, sample.label):
            digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(str(array.shape).encode())
        digest.update(repr([(obj.name, obj.bbox) for obj in sample.objects]).encode())
    return digest.hexdigest()


def test_the_default_style_draws_what_it_drew_before_styles_existed():
    """Images, masks, labels and boxes of 8 images at 64 and 96 px, hashed with the generator before styles
    (an OpenCV whose resize or anti-aliased lines round otherwise would move it too)."""
    samples = [demo.render_sample(np.random.default_rng((0, index)), size) for size in (64, 96) for index in range(8)]
    assert _style_hash(samples) == "f438f558af21d7bb5cd69968d4444ec01da0e35cb5b0f3821187d733af6e1ecf"
    again = [demo.render_sample(np.random.default_rng((0, index)), size, "shapes") for size in (64, 96)
             for index in range(8)]
    assert _style_hash(again) == _style_hash(samples)


def test_every_style_uses_voc_class_positions():
    voc = builtin_classes("voc")
    assert demo.STYLE_NAMES[0] == demo.DEFAULT_STYLE == "shapes"
    for style in demo.STYLES.values():
        assert {name: voc.index(name) for name in style.classes} == style.classes
    assert len(demo.STYLES["voc-size"].classes) == 10
    assert {name for group in demo.PARTS_GROUPS for name in group} == set(demo.PARTS_CLASSES)


def _style_args(style: str) -> list[str]:
    return ["--style", style, "--num-train", "4", "--num-val", "2"]


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> dict[str, Path]:
    """Each style's demo (4 train, 2 val images, the style's size), written once; tests only read it."""
    base = tmp_path_factory.mktemp("styles")
    return {style: _write(base / style, *_style_args(style)) for style in demo.STYLE_NAMES}


@pytest.mark.parametrize("style", demo.STYLE_NAMES)
def test_each_style_is_deterministic_consistent_and_read_by_prepare_voc(style: str, styled, tmp_path: Path):
    files = _files(styled[style])
    assert _files(_write(tmp_path / "again", *_style_args(style))) == files  # same seed, same bytes
    first = tmp_path / "again" / "VOC2012"
    chosen = demo.STYLES[style]
    info = artifacts.read_json(first / "demo.json")
    assert (info["style"], info["version"], info["size"]) == (style, chosen.version, chosen.default_size)
    assert info["classes"] == chosen.classes
    voc = builtin_classes("voc")
    ids = demo.demo_ids(4, 2)
    for image_id in ids["train"] + ids["val"]:
        mask = artifacts.read_label_png(first / "SegmentationClass" / f"{image_id}.png")
        (height, width), objects = _objects(first / "Annotations" / f"{image_id}.xml")
        assert mask.shape == (height, width) and objects
        present = {int(index) for index in np.unique(mask)} - {0, 255}
        assert present <= set(chosen.classes.values())  # only the style's classes
        assert {voc.index(name) for name, _ in objects} == present
        for name, (xmin, ymin, xmax, ymax) in objects:
            assert (mask[ymin - 1:ymax, xmin - 1:xmax] == voc.index(name)).any()
    result = CliRunner().invoke(cli, ["prepare", "voc", "--root", str(first), "--workers", "1"])
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(first, "voc")
    for image_id in ids["val"]:
        _, objects = _objects(first / "Annotations" / f"{image_id}.xml")
        assert dataset.image_labels(image_id) == sorted({chosen.classes[name] for name, _ in objects})


def test_voc_size_images_are_voc_sized_with_several_objects_some_small(styled):
    root = styled["voc-size"]
    counts, smallest = [], []
    for image_id in sum(demo.demo_ids(4, 2).values(), []):
        (height, width), objects = _objects(root / "Annotations" / f"{image_id}.xml")
        assert max(height, width) == 500 and 330 <= min(height, width) <= 400
        counts.append(len(objects))
        smallest.append(min(max(xmax - xmin, ymax - ymin) + 1 for _, (xmin, ymin, xmax, ymax) in objects)
                        / min(height, width))
    assert np.mean(counts) >= 2.5 and max(counts) >= 4
    assert min(smallest) < 0.15  # a small object, as VOC has many


def test_size_without_option_is_the_styles_and_the_option_wins(tmp_path: Path):
    assert artifacts.read_json(_write(tmp_path / "p", "--style", "parts") / "demo.json")["size"] == 160
    root = _write(tmp_path / "q", "--style", "voc-size", "--size", "64")
    assert artifacts.read_json(root / "demo.json")["size"] == 64
    (height, width), _ = _objects(root / "Annotations" / "demo_000000.xml")
    assert max(height, width) == 64
    result = CliRunner().invoke(cli, ["demo-data", "--help"])
    assert all(name in result.output for name in demo.STYLE_NAMES) and "voc-size 500" in result.output


def test_another_style_over_a_demo_is_refused_and_a_demo_from_before_styles_is_shapes(tmp_path: Path):
    root = _write(tmp_path / "d")
    before = _files(root)
    result = CliRunner().invoke(cli, ["demo-data", str(tmp_path / "d"), "--num-train", "6", "--num-val", "4",
                                      "--style", "parts", "--size", "64"])
    assert_one_line_error(result, "holds a demo dataset with style shapes", "asked: style parts")
    assert _files(root) == before
    info = artifacts.read_json(root / "demo.json")
    del info["style"]  # as written before styles existed
    artifacts.write_json(root / "demo.json", info)
    _write(tmp_path / "d")


def _parts_pair(first: str, second: str, half_size: float = 24.0):
    """The same parts-style object (place, colours, texture) drawn as class ``first`` and as ``second``."""
    background = np.zeros((64, 64, 3), dtype=np.float32)
    images, objects = [], []
    for name in (first, second):
        spec = demo._place(np.random.default_rng(5), 64, 64, name, 2 * half_size, demo._parts_colours)
        spec.center, spec.angle = (32.0, 32.0), 0.0
        image, instances = demo._compose(background, [spec], demo._PARTS_DRAWERS)
        images.append(image)
        objects.append(instances > 0)
    return images, objects


@pytest.mark.parametrize("group", demo.PARTS_GROUPS, ids=lambda group: group[0])
def test_parts_look_alikes_differ_only_in_a_small_part(group):
    for first in group:
        for second in group:
            if first == second:
                continue
            (image_a, image_b), (object_a, object_b) = _parts_pair(first, second)
            union = object_a | object_b
            differs = (np.abs(image_a - image_b).max(axis=2) > 1e-6) | (object_a != object_b)
            assert differs.any()
            assert np.count_nonzero(differs) < 0.12 * np.count_nonzero(union), (first, second)  # two parts


def test_parts_colours_do_not_depend_on_the_class():
    draws = [demo._parts_colours(np.random.default_rng(3), name) for name in demo.PARTS_CLASSES]
    for colours in draws[1:]:
        assert colours.keys() == draws[0].keys()
        assert all(np.array_equal(colours[key], draws[0][key]) for key in colours)


def test_context_classes_mostly_appear_on_their_context_and_the_scene_is_drawn():
    on_context: dict[str, list[bool]] = {name: [] for name in demo.CONTEXT_CLASSES}
    for index in range(150):
        sample = demo.render_sample(np.random.default_rng((0, index)), 40, "context")
        assert sample.scene in ("clutter", *demo.CONTEXTS.values())
        for name in {obj.name for obj in sample.objects}:
            on_context[name].append(sample.scene == demo.CONTEXTS.get(name))
            if name in demo.CONTEXTS:
                assert sample.scene in ("clutter", demo.CONTEXTS[name])  # never on another class's context
        # what the record says is what the background's pixels show
        red, green, blue = sample.image[sample.label == 0].astype(float).mean(axis=0)
        if sample.scene in ("water", "sky"):
            assert blue > red + 20, (index, sample.scene)
        if sample.scene == "grass":
            assert green > red + 15 and green > blue + 15, index
    for name, scene in demo.CONTEXTS.items():
        assert len(on_context[name]) >= 15 and np.mean(on_context[name]) >= 0.8, (name, np.mean(on_context[name]))
    for name in set(demo.CONTEXT_CLASSES) - set(demo.CONTEXTS):
        assert not any(on_context[name])


def test_a_parts_body_without_its_part_is_background_under_the_labelled_objects():
    rng = np.random.default_rng(2)
    background = np.zeros((64, 64, 3), dtype=np.float32)
    body = demo._place(rng, 64, 64, "quadruped without part", 56.0, demo._parts_colours)
    cat = demo._place(rng, 64, 64, "cat", 40.0, demo._parts_colours)
    classes = {**demo.PARTS_CLASSES, **dict.fromkeys(demo.UNLABELLED_BODIES, 0)}
    sample = demo._finish(background, [body, cat], np.zeros((64, 64, 3)), classes, demo._PARTS_DRAWERS)
    assert [obj.name for obj in sample.objects] == ["cat"]
    assert set(np.unique(sample.label)) == {0, demo.PARTS_CLASSES["cat"]}
    assert (sample.image[sample.label == 0] > 0).any()  # the body is drawn, as background
    labelled = 0
    for index in range(60):
        sample = demo.render_sample(np.random.default_rng((0, index)), 48, "parts")
        assert sample.objects and all(obj.name in demo.PARTS_CLASSES for obj in sample.objects)
        labelled += len(sample.objects)
    assert labelled < 1.5 * 60  # second objects are often bodies without a part
