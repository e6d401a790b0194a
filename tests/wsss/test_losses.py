import math

import pytest
import torch
import torch.nn.functional as F

from wsss.losses import (CamObjective, equivariance_loss, erase_mask, multilabel_soft_margin_loss, rescale_flip_images,
                         rescale_flip_maps, sample_view)
from wsss.models.classifier import CamNet


def test_multilabel_soft_margin_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.0]])
    # -log sigmoid(0) = log 2 ; -log sigmoid(-log 3) = -log(1/4) = log 4 ; mean = 1.5 log 2
    loss = multilabel_soft_margin_loss(logits, targets)
    assert loss.item() == pytest.approx(1.5 * math.log(2.0))
    logits, targets = torch.randn(4, 6), (torch.rand(4, 6) > 0.5).float()
    torch.testing.assert_close(multilabel_soft_margin_loss(logits, targets),
                               F.multilabel_soft_margin_loss(logits, targets))
    with pytest.raises(ValueError, match="differ"):
        multilabel_soft_margin_loss(logits, targets[:, :3])


def test_equivariance_loss_is_zero_for_an_equivariant_map():
    maps = torch.randn(2, 3, 5, 6)
    present = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    flip = lambda m: m.flip(-1)  # noqa: E731
    assert equivariance_loss(maps, maps.flip(-1), present, flip).item() == pytest.approx(0.0, abs=1e-7)
    # scale invariance: the maps are max-normalised before comparison
    assert equivariance_loss(maps, 3.0 * maps.flip(-1), present, flip).item() == pytest.approx(0.0, abs=1e-6)


def test_equivariance_loss_by_hand():
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    view = torch.zeros(1, 2, 2, 2)
    view[0, 0] = torch.tensor([[2.0, 1.0], [0.0, -5.0]])   # normalised: [[1, 0.5], [0, 0]]
    view[0, 1] = torch.tensor([[9.0, 0.0], [0.0, 0.0]])    # class 1 is absent: ignored
    present = torch.tensor([[1.0, 0.0]])
    loss = equivariance_loss(maps, view, present, lambda m: m)
    # |[1, .5, 0, 0] - [1, 0, 0, 0]| averaged over 4 pixels of the one present map
    assert loss.item() == pytest.approx(0.125)
    assert equivariance_loss(maps, view, torch.zeros(1, 2), lambda m: m).item() == 0.0


def test_rescale_flip_maps_commutes_with_an_identity_network():
    # For F(I) = I at stride 1, A(F(I)) must equal F(A(I)) exactly: the geometry of both sides agrees.
    torch.manual_seed(0)
    images = torch.rand(2, 3, 12, 17)
    # (a window cut from the image is only downscaled: upscaling would read past the window's edge)
    cases = [((6, 9), False, None), ((6, 9), True, None), ((20, 29), True, None), ((4, 5), False, (3, 5, 8, 10)),
             ((4, 5), True, (3, 5, 8, 10)), ((7, 6), True, (0, 11, 12, 6))]
    for size, flip, box in cases:
        view = rescale_flip_images(images, size, flip, box)
        mapped = rescale_flip_maps(images, (12, 17), size, size, flip, stride=1, box=box)
        torch.testing.assert_close(mapped, view, rtol=1e-5, atol=1e-5)
        transform = lambda m: rescale_flip_maps(m, (12, 17), size, size, flip, 1, box)  # noqa: E731
        assert equivariance_loss(images, view, torch.ones(2, 3), transform).item() < 1e-5
    # a map anchored to the image frame (bright top row) is equivariant to rescale + flip, not to a window
    frame = torch.zeros(1, 1, 12, 17)
    frame[..., 0, :] = 1.0
    size = (6, 9)
    rescale_only = lambda m: rescale_flip_maps(m, (12, 17), size, size, True, 1)  # noqa: E731
    assert equivariance_loss(frame, rescale_flip_images(frame, size, True), torch.ones(1, 1), rescale_only) < 1e-5
    box = (4, 0, 8, 12)
    window = lambda m: rescale_flip_maps(m, (12, 17), (4, 6), (4, 6), True, 1, box)  # noqa: E731
    frame_of_view = torch.zeros(1, 1, 4, 6)
    frame_of_view[..., 0, :] = 1.0  # the frame-anchored network lights the top row of its input again
    assert equivariance_loss(frame, frame_of_view, torch.ones(1, 1), window) > 0.2


def test_sample_view_draws_windows_inside_the_image():
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        (top, left, box_h, box_w), size, flip = sample_view((40, 30), (0.5, 0.75), 0.6, rng)
        assert 0 <= top and top + box_h <= 40 and 0 <= left and left + box_w <= 30
        assert 24 <= box_h <= 40 and 0.5 * box_h - 1 <= size[0] <= 0.75 * box_h + 1
    assert sample_view((40, 30), (0.5, 0.5), 1.0, rng)[0] == (0, 0, 40, 30)


def test_erase_mask_marks_exactly_the_pixels_above_the_threshold():
    maps = torch.zeros(1, 3, 2, 3)
    maps[0, 0] = torch.tensor([[0.0, 2.0, 4.0], [1.0, 3.0, 0.0]])   # >= 0.5 * 4: (0,1), (0,2), (1,1)
    maps[0, 1] = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0]])   # absent class: ignored
    maps[0, 2] = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 0.5]])  # >= 0.5 * 0.5: (1,2)
    present = torch.tensor([[1.0, 0.0, 1.0]])
    mask = erase_mask(maps, present, (2, 3), erase_thresh=0.5)
    expected = torch.tensor([[[False, True, True], [False, True, True]]])
    assert torch.equal(mask, expected)
    # a present class with an all-zero map erases nothing
    assert not erase_mask(torch.zeros(1, 1, 2, 3), torch.ones(1, 1), (2, 3), 0.5).any()


def test_erase_mask_upsamples_feature_maps_to_the_image():
    maps = torch.tensor([[[[0.0, 1.0]]]])  # cells centred on pixels 0 and 16 of a 1x32 input
    mask = erase_mask(maps, torch.ones(1, 1), (1, 32), erase_thresh=0.5, stride=16)
    # pixel p reads p / 16: >= 0.5 from pixel 8 on
    assert mask[0, 0].tolist() == [False] * 8 + [True] * 24


def test_cam_objective_terms():
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=4)
    # 96 px: 6 x 6 cells, and views of 5 x 5 (the loss compares shapes, which needs a few cells)
    images, targets = torch.randn(2, 3, 96, 96), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    plain = CamObjective(net)(images, targets)
    assert plain["er"].item() == 0.0 and plain["erase"].item() == 0.0
    assert plain["total"].item() == pytest.approx(plain["cls"].item())
    objective = CamObjective(net, er_weight=0.5, er_scale_range=(1.0, 1.0), er_min_crop=0.7, erase_weight=2.0,
                             erase_thresh=0.7)
    torch.manual_seed(3)  # the view is drawn from torch's generator
    terms = objective(images, targets)
    assert terms["er"].item() > 0 and terms["erase"].item() > 0
    assert terms["total"].item() == pytest.approx(terms["cls"].item() + 0.5 * terms["er"].item()
                                                  + 2.0 * terms["erase"].item(), rel=1e-5)
    terms["total"].backward()
    assert net.classifier.weight.grad is not None and net.backbone[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- exact equivariance


def _ramp_image(height=80, width=96):
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([0.1 + 0.009 * xx + 0.002 * yy, 0.2 + 0.008 * yy, 0.05 + 0.004 * xx + 0.004 * yy])[None]


def _bump_image(height=80, width=96):
    """A curved image: a shifted reading of it changes the shape of the map, not only an offset."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    bump = torch.exp(-((yy - 30.0) ** 2 + (xx - 40.0) ** 2) / (2 * 18.0 ** 2))
    return torch.stack([bump, bump ** 2, 1.0 - bump])[None]


def _reading_net(shift: float = 0.0):
    """A 'network' whose class maps read its input at the cell centres (pixel 16 i + shift).

    With ``shift = 0`` it is exactly equivariant to rescaling, flipping and windows of a linear image;
    a shift of half a cell breaks that.
    """
    from wsss.cam import resample

    def net(images):
        height, width = -(-images.shape[-2] // 16), -(-images.shape[-1] // 16)
        return resample(images, (height, width), (16.0, 16.0), (shift, shift))
    return net


@pytest.mark.parametrize("scale_range, min_crop", [((0.5, 0.75), 1.0), ((1.25, 1.75), 1.0), ((0.6, 0.8), 0.6)])
def test_er_loss_is_zero_for_an_equivariant_network_and_positive_otherwise(scale_range, min_crop):
    from wsss.losses import view_cells_inside

    present = torch.ones(1, 3)
    flips = set()
    for seed in range(12):
        box, size, flip = sample_view((80, 96), scale_range, min_crop, torch.Generator().manual_seed(seed))
        flips.add(flip)
        # exact on a linear image (bilinear resizing reproduces it); a half-cell shift is caught on a bump
        for image, shift, expect_zero in ((_ramp_image(), 0.0, True), (_bump_image(), 8.0, False)):
            view = rescale_flip_images(image, size, flip, box)
            net = _reading_net(shift)
            maps, view_maps = net(image), net(view)
            grid = tuple(view_maps.shape[-2:])
            valid = view_cells_inside(tuple(maps.shape[-2:]), (80, 96), size, grid, flip, 16, box)
            assert valid.any()

            def transform(m):
                return rescale_flip_maps(m, (80, 96), size, grid, flip, 16, box)
            loss = equivariance_loss(maps, view_maps, present, transform, valid)
            if expect_zero:
                assert loss.item() < 1e-4, (seed, box, size, flip)  # float32 rounding of the resize
            else:
                assert loss.item() > 1e-3, (seed, box, size, flip)
    assert flips == {True, False}  # both mirrored and plain views were checked


def test_view_cells_inside_marks_the_interpolated_cells():
    from wsss.losses import view_cells_inside

    # a 64 x 64 image (cells at pixels 0, 16, 32, 48) viewed at 2x: view cell j sits at original pixel
    # (16 j + 0.5) / 2 - 0.5 = 8 j - 0.25, i.e. feature coordinate j / 2 - 1/64; j = 0 lies before cell 0
    inside = view_cells_inside((4, 4), (64, 64), (128, 128), (8, 8), flip=False, stride=16)
    expected = torch.tensor([False, True, True, True, True, True, True, False])  # j = 7 -> 3.48 > 3
    assert torch.equal(inside[1], expected) and torch.equal(inside[:, 1], expected)
    assert torch.equal(inside, expected[:, None] & expected[None, :])


# --------------------------------------------------------------------------- what the train-cls options change


class _RecordingCamNet(torch.nn.Module):
    """A CAM 'network' of one stride-4 convolution that keeps every input and class map it made, in call order
    (CamObjective calls it on the images, then on the equivariance view, then on the erased images)."""

    output_stride = 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
        self.inputs, self.maps = [], []

    def forward(self, images, return_maps=False):
        maps = self.conv(images)
        maps.retain_grad()
        self.inputs.append(images)
        self.maps.append(maps)
        logits = maps.mean(dim=(2, 3))
        return (logits, maps) if return_maps else logits


@pytest.mark.parametrize("er_target", ["detached", "both"])
def test_er_target_decides_whether_the_images_cams_learn_from_the_equivariance_term(er_target):
    torch.manual_seed(0)
    net = _RecordingCamNet()
    objective = CamObjective(net, er_weight=1.0, er_scale_range=(0.5, 0.5), er_target=er_target)
    terms = objective(torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    terms["er"].backward()
    image_maps, view_maps = net.maps
    assert view_maps.grad is not None and view_maps.grad.abs().sum() > 0  # the view always learns
    if er_target == "detached":  # the image's CAMs are the target: no gradient into them
        assert image_maps.grad is None or not image_maps.grad.any()
    else:  # SEAM: both branches move towards each other
        assert image_maps.grad is not None and image_maps.grad.abs().sum() > 0


@pytest.mark.parametrize("erase_fill", ["mean", "blur"])
def test_erase_fill_is_what_replaces_the_erased_pixels(erase_fill):
    from wsss.losses import blur_fill

    torch.manual_seed(0)
    net = _RecordingCamNet()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    CamObjective(net, erase_weight=1.0, erase_thresh=0.5, erase_fill=erase_fill)(images, targets)
    image_maps = net.maps[0]
    erased = net.inputs[1]
    mask = erase_mask(image_maps, targets, (32, 32), 0.5, stride=4)[:, None].expand_as(images)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(erased[~mask], images[~mask])  # the rest of the image is kept
    if erase_fill == "mean":  # the mean colour is 0 in ImageNet-normalised images
        assert torch.equal(erased[mask], torch.zeros(int(mask.sum())))
    else:  # a blurred copy of the image: smooth, not the pixels that were there, not flat
        torch.testing.assert_close(erased[mask], blur_fill(images)[mask])
        assert not torch.equal(erased[mask], images[mask]) and erased[mask].std() > 0


def test_shown_classes_loss_leaves_out_the_present_classes_whose_evidence_the_change_removed():
    from wsss.losses import shown_classes_loss

    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.5]], requires_grad=True)
    reference = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 2.0]])  # the unchanged images' logits
    targets = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    log_sigmoid = torch.nn.functional.logsigmoid
    # stop 0.5: present (0, 1) and (1, 2) were recognised (reference >= 0) and are not now (logit < 0): left out;
    # present (0, 0) is still recognised, present (1, 0) was never recognised (early training): both kept;
    # the absent (0, 2) and (1, 1) always count; the mean is over all six terms
    kept = -log_sigmoid(torch.tensor(2.0)) - log_sigmoid(torch.tensor(-3.0)) - log_sigmoid(torch.tensor(-0.5)) \
        - log_sigmoid(torch.tensor(-1.0))
    loss = shown_classes_loss(logits, targets, 0.5, reference)
    assert float(loss) == pytest.approx(float(kept) / 6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0
    assert logits.grad[0, 0] < 0 and logits.grad[1, 0] < 0 and logits.grad[0, 2] > 0  # kept: present up, absent down
    # stop 0: the multi-label soft margin of every term
    assert float(shown_classes_loss(logits, targets, 0.0, reference)) == pytest.approx(
        float(torch.nn.functional.multilabel_soft_margin_loss(logits, targets)))


def test_regulariser_ramp_by_hand():
    from wsss.losses import regulariser_ramp

    # --reg-start 0.2 --reg-ramp 0.5 over 100 steps: off before step 20, rising to 1 at step 70
    assert [regulariser_ramp(step, 100, 0.2, 0.5) for step in (0, 19, 20, 30, 45, 69, 70, 99)] == \
        pytest.approx([0.0, 0.0, 0.0, 0.2, 0.5, 0.98, 1.0, 1.0])
    # no ramp: a step at --reg-start; both 0 (the defaults): always on
    assert [regulariser_ramp(step, 10, 0.5, 0.0) for step in (0, 4, 5, 9)] == [0.0, 0.0, 1.0, 1.0]
    assert [regulariser_ramp(step, 10, 0.0, 0.0) for step in (0, 9)] == [1.0, 1.0]


def test_the_ramp_scales_the_regularisers_and_zero_skips_their_passes():
    torch.manual_seed(0)
    net = _RecordingCamNet()
    objective = CamObjective(net, er_weight=1.0, er_scale_range=(0.5, 0.5), erase_weight=2.0, erase_thresh=0.5)
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    off = objective(images, targets, ramp=0.0)
    assert len(net.inputs) == 1 and off["total"].item() == off["cls"].item()  # no view, no erased images
    torch.manual_seed(1)
    half = objective(images, targets, ramp=0.5)
    assert len(net.inputs) == 1 + 3 and half["er"].item() > 0 and half["erase"].item() > 0
    assert half["total"].item() == pytest.approx(
        half["cls"].item() + 0.5 * (1.0 * half["er"].item() + 2.0 * half["erase"].item()), rel=1e-6)
