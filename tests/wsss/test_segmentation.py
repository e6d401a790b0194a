import math

import numpy as np
import pytest
import torch
from torch import nn

from wsss.segmentation import predict_label, predict_probs, segmentation_loss

torch.set_num_threads(1)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _two_by_two():
    """Logits [1, 2, 2, 2] and labels [1, 2, 2] with hand-known cross-entropies.

    pixel (0,0): logits (0, 0),     label 0 -> ce = ln 2
    pixel (0,1): logits (0, ln 3),  label 1 -> p = 3/4, ce = ln(4/3)
    pixel (1,0): logits (ln 3, 0),  label 1 -> p = 1/4, ce = ln 4
    pixel (1,1): logits (5, -5),    label 255 (ignored)
    """
    class0 = torch.tensor([[0.0, 0.0], [LN3, 5.0]])
    class1 = torch.tensor([[0.0, LN3], [0.0, -5.0]])
    logits = torch.stack([class0, class1])[None]
    target = torch.tensor([[[0, 1], [1, 255]]])
    return logits, target


def test_cross_entropy_ignores_255():
    logits, target = _two_by_two()
    expected = (LN2 + math.log(4 / 3) + math.log(4)) / 3  # mean over the 3 labelled pixels
    assert segmentation_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    # changing the logits of the ignored pixel changes nothing
    changed = logits.clone()
    changed[0, :, 1, 1] = torch.tensor([-40.0, 40.0])
    assert segmentation_loss(changed, target).item() == pytest.approx(expected, abs=1e-6)


def test_raw_weighting_hand_computed_2x2():
    logits, target = _two_by_two()
    weight = torch.tensor([[[1.0, 0.5], [2.0, 9.0]]])  # 9.0 sits on the ignored pixel and must not count
    # sum(w * ce over labelled) / number of labelled pixels (3), not / sum of weights
    expected = (1.0 * LN2 + 0.5 * math.log(4 / 3) + 2.0 * math.log(4)) / 3
    assert expected == pytest.approx(1.2031925, abs=1e-6)
    assert segmentation_loss(logits, target, weight).item() == pytest.approx(expected, abs=1e-6)
    # unit weights give the plain loss
    assert segmentation_loss(logits, target, torch.ones_like(weight)).item() == pytest.approx(
        segmentation_loss(logits, target).item(), abs=1e-7)


def test_all_ignored_batch_has_zero_loss_with_a_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), 255), torch.ones(1, 2, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_loss_checks_shapes():
    with pytest.raises(ValueError, match=r"target \[B, H, W\]"):
        segmentation_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long))


class _Ramp(nn.Module):
    """Ignores the image: class-1 logit = column index, class 0 = 0 (an x-dependent model)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        batch, _, height, width = images.shape
        ramp = torch.arange(width, dtype=torch.float32).expand(batch, height, width)
        return torch.stack([torch.zeros_like(ramp), ramp], dim=1) + self.dummy


def test_predict_probs_averages_the_flip_back_at_full_resolution():
    image = np.zeros((3, 5, 3), np.uint8)
    model = _Ramp().train()
    probs = predict_probs(model, image, scales=(1.0,), flip=True)
    assert probs.shape == (2, 3, 5) and probs.dtype == np.float32
    x = np.arange(5)
    sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    # view 1: sigmoid(x); mirrored view flipped back: sigmoid(W - 1 - x)
    expected = (sigmoid + sigmoid[::-1]) / 2
    np.testing.assert_allclose(probs[1, 0], expected, atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(predict_probs(model, image, flip=False)[1, 2], sigmoid, atol=1e-6)
    assert model.training  # the caller's mode is restored


def test_predict_probs_keeps_odd_image_size_over_scales():
    from wsss.models.deeplab import build_seg_model

    torch.manual_seed(0)
    model = build_seg_model("deeplabv3_resnet18", 3)
    image = np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    probs = predict_probs(model, image, scales=(0.5, 1.0, 1.5), flip=True)
    assert probs.shape == (3, 37, 23)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_predict_label_is_the_argmax_and_the_crf_refines_it():
    image = np.zeros((3, 5, 3), np.uint8)
    model = _Ramp()
    # class 1 wins where its logit x > 0; the flipped view averages sigmoid(x) with sigmoid(4 - x): > 1/2 everywhere
    np.testing.assert_array_equal(predict_label(model, image, flip=False), [[0, 1, 1, 1, 1]] * 3)
    np.testing.assert_array_equal(predict_label(model, image, flip=True), np.ones((3, 5)))
    from wsss.crf import POSTPROCESS_CRF, dense_crf

    crf = POSTPROCESS_CRF.replace(iterations=2)
    probs = predict_probs(model, image, flip=False)
    label = predict_label(model, image, flip=False, crf=crf)
    assert label.dtype == np.uint8 and label.shape == (3, 5)
    np.testing.assert_array_equal(label, dense_crf(image, probs, **crf.kwargs()).argmax(0))


class _Recording(nn.Module):
    """Logits (0, 1) everywhere; records the sizes of the batches it sees."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        batch, _, height, width = images.shape
        return torch.stack([torch.zeros(batch, height, width), torch.ones(batch, height, width)], 1)


def test_max_side_shrinks_what_the_network_sees_and_not_the_output():
    from wsss.segmentation import segment_batch, shrunk_size

    assert shrunk_size((300, 400), 100) == (75, 100) and shrunk_size((30, 40), 100) == (30, 40)
    assert shrunk_size((1000, 3), 100) == (100, 1) and shrunk_size((300, 400), None) == (300, 400)
    model = _Recording()
    probs = segment_batch(model, torch.zeros(2, 3, 300, 400), scales=(1.0, 0.5), flip=True, max_side=100)
    assert model.sizes == [(75, 100), (38, 50)]  # the 2 images and their mirrors in one pass per scale
    assert probs.shape == (2, 2, 300, 400)
    np.testing.assert_allclose(probs[:, 1].numpy(), 1 / (1 + math.exp(-1)), atol=1e-6)
    model.sizes.clear()
    segment_batch(model, torch.zeros(1, 3, 30, 40), scales=(1.0,), flip=False, max_side=100)
    assert model.sizes == [(30, 40)]  # smaller images are not enlarged
