"""Tests of wsss/selfsup.py: hand-worked losses and rotations, the queue, the views, the probe, a 2-process group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from wsss.selfsup import (ContrastiveViews, NegativeQueue, Pretext, ProjectionHead, RotationHead, RotationView,
                          all_gather_with_grad, linear_probe, moco_loss, momentum_copy, momentum_update, nt_xent_loss,
                          pooled_features, pretext_views, rotate_batch)
from wsss.transforms import denormalize_image, normalize_image

# --------------------------------------------------------------------------- NT-Xent


def _nt_xent_by_definition(z1: torch.Tensor, z2: torch.Tensor, temperature: float, anchors) -> float:
    """Mean over ``anchors`` (indices into the 2B views, z1's rows first) of the SimCLR loss, with plain floats."""
    views = [[float(x) for x in row] for row in torch.cat([z1, z2]).tolist()]
    views = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in views]
    batch = z1.shape[0]
    total = 0.0
    for i in anchors:
        partner = (i + batch) % (2 * batch)
        similarity = [sum(a * b for a, b in zip(views[i], views[j])) / temperature for j in range(2 * batch)]
        denominator = sum(math.exp(similarity[j]) for j in range(2 * batch) if j != i)
        total += -math.log(math.exp(similarity[partner]) / denominator)
    return total / len(anchors)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_by_hand(temperature):
    # views a = (1, 0), b = (0, 1); their partners c = (3, 4) / 5 = (0.6, 0.8), d = (-4, 3) / 5 = (-0.8, 0.6)
    # similarities: a.b = 0, a.c = 0.6, a.d = -0.8, b.c = 0.8, b.d = 0.6, c.d = 0; every positive is 0.6
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[3.0, 4.0], [-4.0, 3.0]])
    e = lambda s: math.exp(s / temperature)  # noqa: E731
    loss_a = -0.6 / temperature + math.log(e(0.0) + e(0.6) + e(-0.8))  # negatives b, d
    loss_b = -0.6 / temperature + math.log(e(0.0) + e(0.8) + e(0.6))  # negatives a, c
    loss_c = -0.6 / temperature + math.log(e(0.6) + e(0.8) + e(0.0))  # negatives b, d
    loss_d = -0.6 / temperature + math.log(e(-0.8) + e(0.6) + e(0.0))  # negatives a, c
    expected = (loss_a + loss_b + loss_c + loss_d) / 4
    assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert _nt_xent_by_definition(z1, z2, temperature, range(4)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_is_lower_with_aligned_positives(temperature):
    z1 = torch.tensor([[1.0, 0.2], [-0.3, 1.0]])
    aligned = nt_xent_loss(z1, z1 * 2.0, temperature)  # the partner is the same direction
    swapped = nt_xent_loss(z1, z1.flip(0), temperature)  # the partner is the other image
    assert aligned.item() < swapped.item()
    assert swapped.item() == pytest.approx(_nt_xent_by_definition(z1, z1.flip(0), temperature, range(4)), rel=1e-5)


def test_nt_xent_checks_its_inputs():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        nt_xent_loss(torch.ones(2, 3), torch.ones(2, 4), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.ones(2, 3), torch.ones(2, 3), 0.0)
    with pytest.raises(RuntimeError, match="process group"):
        nt_xent_loss(torch.ones(2, 3), torch.ones(2, 3), 0.5, gather=True)
    single = torch.arange(3.0)
    assert all_gather_with_grad(single) is single  # no process group: nothing to gather


# --------------------------------------------------------------------------- rotations


def test_rotate_batch_by_hand():
    image = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    # a quarter turn counter-clockwise: the top row becomes the left column, read upwards
    quarter = torch.tensor([[3.0, 6.0, 9.0], [2.0, 5.0, 8.0], [1.0, 4.0, 7.0]])
    half = torch.tensor([[9.0, 8.0, 7.0], [6.0, 5.0, 4.0], [3.0, 2.0, 1.0]])
    three_quarters = torch.tensor([[7.0, 4.0, 1.0], [8.0, 5.0, 2.0], [9.0, 6.0, 3.0]])
    images = torch.stack([image, 10 * image])[:, None]  # [2, 1, 3, 3]
    rotated, targets = rotate_batch(images)
    assert rotated.shape == (8, 1, 3, 3)
    expected = [image, 10 * image, quarter, 10 * quarter, half, 10 * half, three_quarters, 10 * three_quarters]
    for index, grid in enumerate(expected):
        torch.testing.assert_close(rotated[index, 0], grid, rtol=0, atol=0)
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_rotate_batch_needs_square_images():
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 5\)"):
        rotate_batch(torch.zeros(1, 3, 4, 5))


# --------------------------------------------------------------------------- MoCo


def test_moco_loss_by_hand():
    temperature = 0.2
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)  # the second query normalises to (0, 1)
    k = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)  # the first key normalises to (0.6, 0.8)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    e = lambda s: math.exp(s / temperature)  # noqa: E731
    loss_first = -math.log(e(0.6) / (e(0.6) + e(0.0) + e(-1.0)))  # positive 0.6, negatives 0 and -1
    loss_second = -math.log(e(1.0) / (e(1.0) + e(1.0) + e(0.0)))  # positive 1, negatives 1 and 0
    loss = moco_loss(q, k, queue, temperature)
    assert loss.item() == pytest.approx((loss_first + loss_second) / 2, rel=1e-5)
    loss.backward()
    assert q.grad is not None and k.grad is None  # keys are detached


def test_negative_queue_wraps_around_and_keeps_the_last_keys():
    eye = torch.eye(8)
    queue = NegativeQueue(3, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(3))  # starts with random unit vectors
    queue.enqueue(2.0 * eye[0:2])  # slots 0, 1 (normalised); slot 2 still random
    torch.testing.assert_close(queue.keys[:2], eye[0:2], rtol=0, atol=0)
    queue.enqueue(eye[2:4])  # e2 -> slot 2, e3 wraps to slot 0
    torch.testing.assert_close(queue.keys, eye[[3, 1, 2]], rtol=0, atol=0)
    assert int(queue.pointer) == 1
    queue.enqueue(eye[4:8])  # larger than the queue: e4 is dropped, e5 -> 2, e6 -> 0, e7 -> 1
    torch.testing.assert_close(queue.keys, eye[[6, 7, 5]], rtol=0, atol=0)
    assert int(queue.pointer) == 2
    resumed = NegativeQueue(3, 8)
    resumed.load_state_dict(queue.state_dict())
    assert torch.equal(resumed.keys, queue.keys) and int(resumed.pointer) == 2


def test_momentum_update_with_half_is_the_average():
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    target = momentum_copy(online)
    assert not any(parameter.requires_grad for parameter in target.parameters())
    with torch.no_grad():
        online[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        target[0].weight.copy_(torch.tensor([[3.0, 0.0], [1.0, -4.0]]))
        online[0].bias.copy_(torch.tensor([1.0, 1.0]))
        target[0].bias.copy_(torch.tensor([0.0, -2.0]))
        online[1].running_mean.copy_(torch.tensor([5.0, 6.0]))
    momentum_update(online, target, 0.5)
    torch.testing.assert_close(target[0].weight, torch.tensor([[2.0, 1.0], [2.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(target[0].bias, torch.tensor([0.5, -0.5]), rtol=0, atol=0)
    torch.testing.assert_close(target[1].running_mean, torch.tensor([5.0, 6.0]), rtol=0, atol=0)  # copied
    torch.testing.assert_close(online[0].weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # online untouched
    with pytest.raises(ValueError, match="different parameters"):
        momentum_update(online, nn.Linear(2, 2), 0.5)


# --------------------------------------------------------------------------- views


def _random_image(height=32, width=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_contrastive_views_are_seeded_by_the_generator_only():
    views = ContrastiveViews(crop_size=16)
    image = _random_image()
    first, second = views(image, np.random.default_rng(7))
    assert first.shape == second.shape == (3, 16, 16) and first.dtype == second.dtype == torch.float32
    again = views(image, np.random.default_rng(7))
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    other = views(image, np.random.default_rng(8))
    assert not torch.equal(first, other[0])
    assert not torch.equal(first, second)  # the two views differ


def test_views_of_a_constant_image_are_constant():
    image = np.empty((30, 36, 3), dtype=np.uint8)
    image[:] = (200, 30, 90)
    augment = ContrastiveViews(crop_size=12, jitter_p=1.0, blur_p=1.0)  # every colour operation, every time
    for seed in range(10):
        for view in augment(image, np.random.default_rng(seed)):
            assert torch.equal(view, view[:, :1, :1].expand_as(view))


def test_views_without_augmentation_are_the_normalised_image():
    small = _random_image(12, 12, seed=3)
    no_change = dict(min_scale=1.0, max_scale=1.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    view, _ = ContrastiveViews(crop_size=12, **no_change)(small, np.random.default_rng(0))
    assert torch.equal(view, normalize_image(small))
    # an image of 2x2 blocks halved: every output pixel is one block's colour
    blocks = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    view, _ = ContrastiveViews(crop_size=12, **no_change)(blocks, np.random.default_rng(0))
    assert torch.equal(view, normalize_image(small))
    flipped, _ = ContrastiveViews(crop_size=12, **{**no_change, "flip_p": 1.0})(small, np.random.default_rng(0))
    assert torch.equal(flipped, normalize_image(small[:, ::-1]))
    grey, _ = ContrastiveViews(crop_size=12, **{**no_change, "grayscale_p": 1.0})(small, np.random.default_rng(0))
    grey = denormalize_image(grey).astype(int)
    assert np.abs(grey - grey[..., :1]).max() <= 1  # R = G = B up to the rounding of (de)normalisation


def test_rotation_view_and_input_checks():
    augment = RotationView(crop_size=16)
    view = augment(_random_image(), np.random.default_rng(1))
    assert view.shape == (3, 16, 16) and view.dtype == torch.float32
    assert torch.equal(view, augment(_random_image(), np.random.default_rng(1)))
    with pytest.raises(ValueError, match=r"\(32, 40\)"):
        augment(_random_image()[..., 0], np.random.default_rng(1))
    with pytest.raises(ValueError, match="min_scale"):
        ContrastiveViews(crop_size=16, min_scale=0.0)


# --------------------------------------------------------------------------- heads, features, a training step


def test_heads_and_pooled_features_by_hand():
    images = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[0.0, 0.0], [2.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    pooled = pooled_features(nn.Identity(), images)
    torch.testing.assert_close(pooled, torch.tensor([[4.0, 1.0, 1.0]]))
    trunk = nn.Conv2d(3, 1, 1, bias=False)
    nn.init.ones_(trunk.weight)
    summed = pooled_features(trunk, images)
    torch.testing.assert_close(summed, torch.tensor([[6.0]]))  # mean of the channel sums 2, 4, 8, 10
    assert not summed.requires_grad
    rotation = RotationHead(3)
    with torch.no_grad():
        rotation.classifier.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]]))
        rotation.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0]))
    torch.testing.assert_close(rotation(images), torch.tensor([[4.0, 1.0, 1.0, 5.0]]))
    projection = ProjectionHead(3, hidden_dim=8, out_dim=4).eval()
    assert projection(images).shape == (1, 4)
    torch.testing.assert_close(projection(images), projection(pooled))
    assert [type(layer) for layer in projection.layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_pretext_training_steps_reach_the_trunk():
    from wsss.models.backbones import build_resnet  # torchvision: imported here, not in the spawned ranks

    torch.manual_seed(0)
    trunk = build_resnet("resnet18", "none", output_stride=32)
    images = [_random_image(40, 40, seed) for seed in range(2)]
    rng = np.random.default_rng(0)
    pairs = [ContrastiveViews(crop_size=32)(image, rng) for image in images]
    view1, view2 = torch.stack([pair[0] for pair in pairs]), torch.stack([pair[1] for pair in pairs])
    projection = ProjectionHead(512, hidden_dim=32, out_dim=16)
    loss = nt_xent_loss(projection(trunk(view1)), projection(trunk(view2)), 0.5)
    loss.backward()
    assert torch.isfinite(loss) and trunk[0].weight.grad.abs().sum() > 0
    trunk.zero_grad()
    rotated, targets = rotate_batch(torch.stack([RotationView(crop_size=32)(image, rng) for image in images]))
    loss = F.cross_entropy(RotationHead(512)(trunk(rotated)), targets)
    loss.backward()
    assert torch.isfinite(loss) and trunk[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_is_perfect_when_a_feature_is_the_label():
    rng = np.random.default_rng(0)
    train_y = rng.integers(0, 2, (40, 2))
    val_y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 5)
    train_x = np.hstack([train_y, rng.normal(size=(40, 3))])
    val_x = np.hstack([val_y, rng.normal(size=(20, 3))])
    result = linear_probe(train_x, train_y, val_x, val_y)
    assert result["map"] == pytest.approx(1.0) and result["ap"] == pytest.approx([1.0, 1.0])
    assert result["settings"]["inverse_regularization"] == 0.1 and result["settings"]["constant_classes"] == []


def test_linear_probe_on_random_features_is_far_from_perfect():
    rng = np.random.default_rng(1)
    result = linear_probe(rng.normal(size=(60, 8)), rng.integers(0, 2, (60, 3)),
                          torch.from_numpy(rng.normal(size=(60, 8))), rng.integers(0, 2, (60, 3)))
    assert result["map"] < 0.8


def test_linear_probe_scores_classes_it_cannot_fit_as_constants():
    rng = np.random.default_rng(2)
    train_y = np.zeros((20, 4), dtype=int)
    train_y[:, 0] = np.arange(20) % 2  # fit normally
    train_y[:, 2] = 1  # class 1 never positive, class 2 never negative in train
    val_y = np.zeros((8, 4), dtype=int)
    val_y[:, 0] = np.arange(8) % 2
    val_y[:2, 1] = 1  # 2 of 8 positive: a constant score has AP 0.25
    val_y[:6, 2] = 1  # 6 of 8: AP 0.75; class 3 has no validation positive
    train_x = np.hstack([train_y[:, :1], rng.normal(size=(20, 2))])
    val_x = np.hstack([val_y[:, :1], rng.normal(size=(8, 2))])
    result = linear_probe(train_x, train_y, val_x, val_y)
    assert result["ap"][1:] == [pytest.approx(0.25), pytest.approx(0.75), None]
    assert result["map"] == pytest.approx((1.0 + 0.25 + 0.75) / 3)
    assert result["settings"]["constant_classes"] == [1, 2, 3]


def test_linear_probe_checks_shapes():
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(np.zeros((4, 2)), np.zeros((3, 1)), np.zeros((2, 2)), np.zeros((2, 1)))


# --------------------------------------------------------------------------- two processes


def _global_batch():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)


def _rank_main(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        z1_all, z2_all = _global_batch()
        rows = slice(2 * rank, 2 * rank + 2)  # rank r holds images 2r and 2r + 1
        z1, z2 = z1_all[rows].clone().requires_grad_(), z2_all[rows].clone().requires_grad_()
        loss = nt_xent_loss(z1, z2, 0.3)
        loss.backward()
        gathered = all_gather_with_grad(torch.tensor([[float(rank)], [rank + 0.5]]))
        queue = NegativeQueue(5, 3, generator=torch.Generator().manual_seed(0))
        queue.enqueue(z1.detach())
        results[rank] = (loss.item(), z1.grad.tolist(), z2.grad.tolist(), gathered.tolist(), queue.keys.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_nt_xent_over_two_gloo_processes_is_the_loss_of_the_global_batch(tmp_path):
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
    z1_all, z2_all = _global_batch()
    z1_all.requires_grad_()
    z2_all.requires_grad_()
    full = nt_xent_loss(z1_all, z2_all, 0.3)
    full.backward()
    losses = [results[rank][0] for rank in (0, 1)]
    # each rank averages over its own 4 anchors (views 2r, 2r + 1 of z1 and of z2) against all 8 views
    for rank in (0, 1):
        anchors = [2 * rank, 2 * rank + 1, 4 + 2 * rank, 5 + 2 * rank]
        assert losses[rank] == pytest.approx(_nt_xent_by_definition(z1_all, z2_all, 0.3, anchors), rel=1e-5)
    assert sum(losses) / 2 == pytest.approx(full.item(), rel=1e-5)
    # the gradient of the sum of the two ranks' losses: twice that of their mean, the global loss
    for rank in (0, 1):
        _, z1_grad, z2_grad, gathered, keys = results[rank]
        rows = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(torch.tensor(z1_grad), 2 * z1_all.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(z2_grad), 2 * z2_all.grad[rows], rtol=1e-5, atol=1e-6)
        assert gathered == [[0.0], [0.5], [1.0], [1.5]]
        # both ranks enqueued the keys of all four images, rank 0's first, into slots 0..3
        torch.testing.assert_close(torch.tensor(keys)[:4], F.normalize(z1_all.detach(), dim=1))
    assert results[0][4] == results[1][4]


# --------------------------------------------------------------------------- the pretraining network


def test_pretext_rotation_classifies_the_four_turns_of_every_image():
    torch.manual_seed(0)
    model = Pretext("resnet18", "rotation")
    terms = model(torch.randn(2, 3, 64, 64))
    assert set(terms) == {"total", "accuracy"} and terms["total"].ndim == 0
    assert 0.0 <= terms["accuracy"].item() <= 1.0 and model.name == "rotation"
    terms["total"].backward()
    assert model.trunk[0].weight.grad is not None


def test_pretext_moco_enqueues_both_views_keys_and_trains_only_the_online_network():
    torch.manual_seed(0)
    model = Pretext("resnet18", "contrastive", queue=8, key_splits=2)
    assert model.name == "contrastive-moco"
    first, second = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    terms = model((first, second))
    assert set(terms) == {"total"} and math.isfinite(terms["total"].item())
    assert model.queue.pointer.item() == 0  # 2 views x 4 keys = 8 = the whole queue: back at slot 0
    terms["total"].backward()
    assert all(parameter.grad is None for parameter in model.key_trunk.parameters())
    # weight decay on weights only: BatchNorm and biases (1-d) are in the second group
    decay, no_decay = model.parameter_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_pretext_simclr_has_no_key_encoder_and_an_unknown_method_is_refused():
    model = Pretext("resnet18", "contrastive")
    assert model.queue is None and model.name == "contrastive" and not hasattr(model, "key_trunk")
    with pytest.raises(ValueError, match="jigsaw"):
        Pretext("resnet18", "jigsaw")
    assert isinstance(pretext_views("rotation", crop_size=32, min_scale=0.5), RotationView)
    assert pretext_views("contrastive", crop_size=32, min_scale=0.5).scale == (0.5, 1.0)


# --------------------------------------------------------------------------- what pretrain's options change


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_pretext_contrastive_loss_is_nt_xent_at_its_temperature(temperature):
    """--temperature: SimCLR's loss is NT-Xent of the two views' projections at that temperature."""
    torch.manual_seed(0)
    model = Pretext("resnet18", "contrastive", temperature=temperature)
    first, second = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = model((first, second))["total"]
    with torch.no_grad():  # BatchNorm in training mode: the same batch statistics, the same projections
        z1, z2 = model.head(model.trunk(first)), model.head(model.trunk(second))
    assert loss.item() == pytest.approx(nt_xent_loss(z1, z2, temperature).item(), rel=1e-5)
    other = 0.5 if temperature == 0.1 else 0.1
    assert abs(loss.item() - nt_xent_loss(z1, z2, other).item()) > 0.01


def test_pretext_moco_scores_queries_at_its_temperature(monkeypatch):
    import wsss.selfsup

    seen = []
    real = wsss.selfsup.moco_loss
    monkeypatch.setattr(wsss.selfsup, "moco_loss",
                        lambda q, k, queue, temperature: seen.append(temperature) or real(q, k, queue, temperature))
    torch.manual_seed(0)
    model = Pretext("resnet18", "contrastive", temperature=0.3, queue=8, key_splits=2)
    model((torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)))
    assert seen == [0.3, 0.3]  # each view once the query


def _moco_key_shift(key_momentum: float) -> float:
    """How far one training step moves the key encoder's first weight towards the online one, which was moved
    1 away from it (0: not at all, 1: all the way)."""
    torch.manual_seed(0)
    model = Pretext("resnet18", "contrastive", queue=8, key_splits=2, key_momentum=key_momentum)
    before = model.key_trunk[0].weight.clone()
    with torch.no_grad():
        model.trunk[0].weight.add_(1.0)
    model((torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)))
    shift = model.key_trunk[0].weight - before
    assert torch.allclose(shift, shift.flatten()[0].expand_as(shift), atol=1e-6)  # the same for every entry
    return float(shift.flatten()[0])


def test_key_momentum_decides_how_far_the_key_encoder_follows():
    """--key-momentum m: m = 1 keeps the key encoder, m = 0 makes it the online one; in between it follows part way,
    the less the higher m."""
    assert _moco_key_shift(1.0) == pytest.approx(0.0, abs=1e-6)
    assert _moco_key_shift(0.0) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < _moco_key_shift(0.9) < _moco_key_shift(0.5) < 1.0


def test_key_momentum_is_one_moco_update_per_step():
    """MoCo: k <- m k + (1 - m) q once per step, before the keys of both views; with m = 0.5 the key encoder
    goes half way."""
    assert _moco_key_shift(0.5) == pytest.approx(0.5, abs=1e-6)
