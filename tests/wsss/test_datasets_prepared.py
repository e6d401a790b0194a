import numpy as np
import pytest
import torch

from wsss import artifacts
from wsss.datasets import PreparedDataset, SplitSpec, write_prepared
from wsss.datasets.torch_data import ClassificationDataset, InferenceDataset, SegmentationDataset
from wsss.errors import WsssError
from wsss.transforms import eval_preset, train_preset

CLASSES = ["background", "cat", "dog"]


def make_dataset(root, sizes=((6, 8), (5, 7))):
    ids = [f"img{index}" for index in range(len(sizes))]
    for index, (image_id, (height, width)) in enumerate(zip(ids, sizes)):
        image = np.full((height, width, 3), 40 * index, np.uint8)
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        mask = np.zeros((height, width), np.uint8)
        mask[: height // 2] = index + 1
        mask[-1, -1] = 255
        artifacts.write_label_png(artifacts.label_path(root / "masks", image_id), mask)
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {"train": (spec, ids)}, {"img0": [1], "img1": [2]})
    return PreparedDataset.load(root)


def test_prepared_dataset_reads_back_what_was_written(tmp_path):
    dataset = make_dataset(tmp_path)
    assert dataset.kind == "folder" and dataset.num_classes == 3
    assert dataset.ids("train") == ["img0", "img1"]
    assert dataset.image_labels("img1") == [2]
    assert dataset.multi_hot("img1").tolist() == [0.0, 1.0]
    assert dataset.read_image("train", "img1").shape == (5, 7, 3)
    assert dataset.read_mask("train", "img0", shape=(6, 8))[0, 0] == 1


def test_prepared_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(WsssError, match="not prepared"):
        PreparedDataset.load(tmp_path)
    dataset = make_dataset(tmp_path)
    with pytest.raises(WsssError, match="prepared as 'folder', not 'voc'"):
        PreparedDataset.load(tmp_path, "voc")
    with pytest.raises(WsssError, match="no split 'val'"):
        dataset.ids("val")
    with pytest.raises(WsssError, match="img0.png: mask is 8x6 but the image is 9x6"):
        dataset.read_mask("train", "img0", shape=(6, 9))


def test_second_prepare_keeps_other_splits(tmp_path):
    make_dataset(tmp_path)
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(tmp_path, "folder", CLASSES, {"val": (spec, ["img1"])}, {"img1": [2]})
    dataset = PreparedDataset.load(tmp_path)
    assert sorted(dataset.splits) == ["train", "val"] and dataset.ids("val") == ["img1"]
    assert dataset.image_labels("img0") == [1]


def test_torch_datasets_shapes(tmp_path):
    dataset = make_dataset(tmp_path)
    image, target = ClassificationDataset(dataset, "train", eval_preset())[0]
    assert image.shape == (3, 6, 8) and target.tolist() == [1.0, 0.0]
    image, mask = SegmentationDataset(dataset, "train", eval_preset())[1]
    assert mask.dtype == torch.int64 and mask[0, 0] == 2 and mask[-1, -1] == 255
    item = InferenceDataset(dataset, "train")[1]
    assert item["id"] == "img1" and item["size"] == (5, 7)


def test_segmentation_dataset_with_reliability_zeroes_ignored_pixels(tmp_path):
    dataset = make_dataset(tmp_path)
    labels, weights = tmp_path / "pseudo", tmp_path / "pseudo"
    label = np.zeros((6, 8), np.uint8)
    label[0, 0] = 255
    artifacts.write_label_png(artifacts.label_path(labels, "img0"), label)
    artifacts.write_reliability(artifacts.reliability_path(weights, "img0"), np.full((6, 8), 0.5))
    segmentation = SegmentationDataset(dataset, "train", eval_preset(), label_dir=labels, reliability_dir=weights,
                                       ids=["img0"])
    _, mask, weight = segmentation[0]
    assert mask[0, 0] == 255 and weight[0, 0] == 0.0 and weight[1, 1] == 0.5
    _, mask, weight = SegmentationDataset(dataset, "train", train_preset(crop_size=10), label_dir=labels,
                                          reliability_dir=weights, ids=["img0"])[0]
    assert mask.shape == weight.shape == (10, 10)
    assert torch.all(weight[mask == 255] == 0) and torch.all(weight[mask == 0] == 0.5)
