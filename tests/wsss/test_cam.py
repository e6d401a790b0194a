import pytest
import torch
import torch.nn.functional as F

from wsss.cam import erase_images, erasing_cam, erasing_cams, feature_to_image, max_normalize, multiscale_cam, resample
from wsss.models.classifier import CamNet


class PixelNet(torch.nn.Module):
    """A stand-in network whose class maps are the input channels sampled every ``stride`` pixels.

    Cell i is the input pixel stride * i, the geometry of a ResNet (cell centred on stride * i),
    so every CAM operation can be checked by hand.
    """

    def __init__(self, stride: int = 1):
        super().__init__()
        self.output_stride = stride
        self.inputs = []

    def class_maps(self, images):
        self.inputs.append(images.clone())
        return images[:, :, ::self.output_stride, ::self.output_stride]

    def pool(self, maps):
        return maps.mean(dim=(2, 3))


def test_max_normalize_by_hand():
    cams = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # 1x2x2x2
    out = max_normalize(cams)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(out[0, 1], torch.zeros(2, 2))  # an empty map stays empty (no 0/0)


def test_feature_to_image_samples_cell_centres_by_hand():
    maps = torch.tensor([[[[0.0, 1.0]]]])  # 1 row, 2 cells; cells centred on pixels 0 and 2
    # pixel p sits at feature coordinate p / 2; beyond the last cell the border value is kept
    torch.testing.assert_close(feature_to_image(maps, (1, 4), stride=2)[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    # maps of the flipped image: pixel p of the original is flipped pixel 3 - p
    torch.testing.assert_close(feature_to_image(maps, (1, 4), stride=2, flipped=True)[0, 0, 0],
                               torch.tensor([1.0, 1.0, 0.5, 0.0]))


def test_feature_to_image_is_the_identity_at_stride_1():
    maps = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(feature_to_image(maps, (5, 7), stride=1), maps)
    torch.testing.assert_close(feature_to_image(maps, (5, 7), stride=1, flipped=True), maps.flip(-1))


def test_resample_with_a_negative_step_mirrors():
    maps = torch.arange(4.0).view(1, 1, 1, 4)
    torch.testing.assert_close(resample(maps, (1, 4), (1.0, -1.0), (0.0, 3.0)), maps.flip(-1))


def test_multiscale_cam_of_a_ramp_is_the_ramp_at_every_scale():
    # class map = the input channel sampled every 2 pixels: a linear ramp must come back as the
    # same ramp (inside the border cell) from every scale and from the flipped view.
    height, width = 9, 13
    ramp = torch.arange(width, dtype=torch.float32).expand(height, width) + 1.0
    image = torch.stack([ramp, ramp, ramp])[None]
    cams, _ = multiscale_cam(PixelNet(stride=2), image, [[0]], scales=(1.0, 0.5, 1.5), flip=True)
    assert cams[0].shape == (1, height, width)
    inner = slice(3, width - 3)
    torch.testing.assert_close(cams[0][0, :, inner], 6 * ramp[:, inner], rtol=1e-4, atol=1e-4)


def test_multiscale_cam_full_resolution_for_odd_sizes_and_flip_equivariance():
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=4).eval()
    image = torch.randn(1, 3, 61, 47)
    cams, logits = multiscale_cam(net, image, [[0, 2]])
    assert cams[0].shape == (2, 61, 47) and logits.shape == (1, 3)
    assert (cams[0] >= 0).all()
    mirrored, mirrored_logits = multiscale_cam(net, image.flip(-1), [[0, 2]])
    # the views of an image and of its mirror image are the same set: the sum is flip-equivariant
    torch.testing.assert_close(mirrored[0].flip(-1), cams[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mirrored_logits, logits, rtol=1e-4, atol=1e-5)


def test_multiscale_cam_sums_the_views_one_at_a_time():
    # the batched implementation equals a loop over scales and flips, one forward each
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=4).eval()
    image = torch.randn(1, 3, 50, 38)
    cams, logits = multiscale_cam(net, image, None, scales=(1.0, 0.5, 1.5))
    expected = torch.zeros(3, 50, 38)
    with torch.no_grad():
        for scale in (1.0, 0.5, 1.5):
            size = (round(50 * scale), round(38 * scale))
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False) if scale != 1 else image
            for flipped in (False, True):
                maps = torch.relu(net.class_maps(scaled.flip(-1) if flipped else scaled))
                expected += feature_to_image(maps, (50, 38), size, 16, flipped)[0]
    torch.testing.assert_close(cams[0], expected, rtol=1e-4, atol=1e-4)


def test_multiscale_cam_batches_images_with_their_own_classes():
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=5).eval()
    images = torch.randn(2, 3, 32, 48)
    together, logits = multiscale_cam(net, images, [[1, 3], []], scales=(1.0, 0.5))
    alone, alone_logits = multiscale_cam(net, images[:1], [[1, 3]], scales=(1.0, 0.5))
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:1], alone_logits, rtol=1e-4, atol=1e-5)
    assert together[1].shape == (0, 32, 48)
    picked, _ = multiscale_cam(net, images, lambda scores: [[int(row.argmax())] for row in scores], scales=(1.0,))
    assert [c.shape[0] for c in picked] == [1, 1]


def test_erase_images_sets_exactly_the_masked_pixels_to_zero():
    images = torch.arange(1.0, 1.0 + 2 * 3 * 2 * 2).view(2, 3, 2, 2)
    mask = torch.tensor([[[True, False], [False, False]], [[False, False], [True, True]]])
    erased = erase_images(images, mask)
    expected = images.clone()
    expected[0, :, 0, 0] = 0
    expected[1, :, 1, :] = 0
    torch.testing.assert_close(erased, expected)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        erase_images(images, mask[0])


def test_inference_erasing_by_hand():
    # PixelNet at stride 1 and one scale: the CAM of class k is relu(channel k) of its input.
    net = PixelNet(stride=1)
    image = torch.zeros(3, 1, 4)
    image[0, 0] = torch.tensor([0.2, 1.0, 0.6, -1.0])
    image[1, 0] = torch.tensor([0.5, 0.1, 0.0, 0.4])
    result = erasing_cam(net, image, [0, 1], erase_steps=1, erase_thresh=0.5, erase_stop=0.0, scales=(1.0,),
                         flip=False)
    # step 0: class 0 normalised [0.2, 1, 0.6, 0] -> erase pixels 1 and 2 (>= 0.5);
    #         class 1 normalised [1, 0.2, 0, 0.8] -> erase pixels 0 and 3
    erased = net.inputs[1]
    assert erased.shape == (2, 3, 1, 4)
    torch.testing.assert_close(erased[0, :, 0], torch.tensor([[0.2, 0, 0, -1.0], [0.5, 0, 0, 0.4], [0, 0, 0, 0]]))
    torch.testing.assert_close(erased[1, :, 0], torch.tensor([[0, 1.0, 0.6, 0], [0, 0.1, 0.0, 0], [0, 0, 0, 0]]))
    # accumulated: class 0 [0.2, 1, 0.6, 0] + [0.2, 0, 0, 0]; class 1 [0.5, .1, 0, .4] + [0, .1, 0, 0]
    torch.testing.assert_close(result[0, 0], torch.tensor([0.4, 1.0, 0.6, 0.0]))
    torch.testing.assert_close(result[1, 0], torch.tensor([1.0, 0.4, 0.0, 0.8]))


def test_inference_erasing_stops_for_a_class_no_longer_shown():
    # The image of test_inference_erasing_by_hand; PixelNet's logit is the mean of its channel.
    net = PixelNet(stride=1)
    image = torch.zeros(3, 1, 4)
    image[0, 0] = torch.tensor([0.2, 1.0, 0.6, -1.0])
    image[1, 0] = torch.tensor([0.5, 0.1, 0.0, 0.4])
    counts = torch.zeros(2, 3, dtype=torch.float64)
    result = erasing_cams(net, image[None], [[0, 1]], erase_steps=2, erase_thresh=0.5, erase_stop=0.5,
                          scales=(1.0,), flip=False, shown_counts=counts)[0]
    # step 1: class 0's erased copy [0.2, 0, 0, -1] scores sigmoid(-0.2) < 0.5: not added, no step 2;
    #         class 1's [0, 0.1, 0, 0] scores sigmoid(0.025) >= 0.5: added -> [0.5, 0.2, 0, 0.4]
    # step 2: class 1 alone; normalised [1, 0.4, 0, 0.8] erases pixels 0 and 3: [0, 0.1, 0, 0] again, added
    assert [len(inputs) for inputs in net.inputs] == [1, 2, 1]
    torch.testing.assert_close(net.inputs[2][0, 1, 0], torch.tensor([0.0, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(result[0, 0], torch.tensor([0.2, 1.0, 0.6, 0.0]))  # the plain CAM
    torch.testing.assert_close(result[1, 0], torch.tensor([0.5, 0.3, 0.0, 0.4]) / 0.5)
    sigmoid = torch.sigmoid(torch.tensor([-0.2, 0.025])).tolist()
    assert counts[:, :2].tolist() == [[2, 1], [1, 1]]
    assert counts[0, 2] == pytest.approx(sum(sigmoid)) and counts[1, 2] == pytest.approx(sigmoid[1])


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_batched_erasing_equals_one_image_at_a_time(chunk):
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=4).eval()
    images = torch.randn(3, 3, 40, 48)
    channels = [[0, 2], [], [1]]  # the second image has no class: it gets no erased copy
    batched = erasing_cams(net, images, channels, erase_steps=2, erase_thresh=0.5, scales=(1.0, 0.5), chunk=chunk)
    assert [cam.shape for cam in batched] == [(2, 40, 48), (0, 40, 48), (1, 40, 48)]
    for image, chosen, cam in zip(images, channels, batched):
        if chosen:
            alone = erasing_cam(net, image, chosen, erase_steps=2, erase_thresh=0.5, scales=(1.0, 0.5))
            torch.testing.assert_close(cam, alone, atol=1e-4, rtol=1e-4)
    one_step = erasing_cams(net, images, channels, erase_steps=1, erase_thresh=0.5, scales=(1.0, 0.5), chunk=chunk)
    assert (batched[0] - one_step[0]).abs().max() > 1e-3  # the second step added something


def test_zero_erase_steps_is_the_plain_normalised_cam():
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=3).eval()
    image = torch.randn(3, 40, 40)
    plain, _ = multiscale_cam(net, image[None], [[0, 1]], scales=(1.0, 0.5))
    out = erasing_cam(net, image, [0, 1], erase_steps=0, scales=(1.0, 0.5))
    torch.testing.assert_close(out, max_normalize(plain[0]))
    assert torch.allclose(out.amax(dim=(1, 2)), torch.ones(2))
