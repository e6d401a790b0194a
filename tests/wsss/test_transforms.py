import random

import numpy as np
import torch

from wsss import transforms


def test_normalize_then_denormalize_round_trips():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = transforms.normalize_image(image)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    # hand-worked: value 255 in the red channel -> (1 - 0.485) / 0.229
    assert torch.isclose(transforms.normalize_image(np.full((1, 1, 3), 255, np.uint8))[0, 0, 0],
                         torch.tensor((1 - 0.485) / 0.229))
    np.testing.assert_array_equal(transforms.denormalize_image(tensor), image)


def test_crop_pads_mask_with_ignore_and_image_with_mean():
    random.seed(0)
    image = np.zeros((2, 3, 3), np.uint8)
    mask = np.ones((2, 3), np.uint8)
    out_image, out_mask = transforms.RandomCrop(4)(image, mask)
    assert out_image.shape == (4, 4, 3) and out_mask.shape == (4, 4)
    assert (out_mask == 255).sum() == 16 - 6 and (out_mask == 1).sum() == 6
    # padded image pixels hold the ImageNet mean, i.e. 0 after normalisation
    assert transforms.normalize_image(out_image)[:, 3, 3].abs().max() < 0.02


def test_flip_moves_image_and_mask_together():
    image = np.arange(6, dtype=np.uint8).reshape(1, 6, 1).repeat(3, axis=2)
    mask = np.arange(6, dtype=np.uint8).reshape(1, 6)
    out_image, out_mask = transforms.RandomHorizontalFlip(p=1.0)(image, mask)
    assert out_mask.tolist() == [[5, 4, 3, 2, 1, 0]]
    np.testing.assert_array_equal(out_image[..., 0], out_mask)


def test_rescale_uses_nearest_for_masks():
    random.seed(1)
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    _, out = transforms.RandomRescale(2.0, 2.0)(np.zeros((2, 2, 3), np.uint8), mask)
    assert out.shape == (4, 4) and set(np.unique(out)) == {0, 1, 2, 255}


def test_train_preset_is_reproducible_under_a_seed_and_keeps_stacks_together():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 3, (20, 30)).astype(np.float32)
    stack = np.dstack([label, label * 10])
    preset = transforms.train_preset(crop_size=16)
    random.seed(5)
    first = preset(image, stack)
    random.seed(5)
    second = preset(image, stack)
    torch.testing.assert_close(first[0], second[0])
    out = first[1]
    assert out.shape == (16, 16, 2) and out.dtype == torch.float32
    labelled = out[..., 0] != 255
    torch.testing.assert_close(out[..., 1][labelled], out[..., 0][labelled] * 10)


def test_normalize_turns_mask_into_long():
    _, mask = transforms.Normalize()(np.zeros((2, 2, 3), np.uint8), np.array([[1, 255], [0, 2]], np.uint8))
    assert mask.dtype == torch.int64 and mask.tolist() == [[1, 255], [0, 2]]
