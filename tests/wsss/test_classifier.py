import pytest
import torch
from torch import nn

from wsss import artifacts
from wsss.errors import WsssError
from wsss.models.backbones import fuse_conv_batchnorm, prepare_for_inference
from wsss.models.classifier import ARCHS, CamNet, build_classifier, load_classifier, lse_pool


def test_archs_are_a_visible_dict_with_the_three_resnets():
    assert {"resnet18", "resnet50", "resnet101"} <= set(ARCHS)
    with pytest.raises(KeyError, match="resnet50"):
        CamNet("vgg16", 21)


@pytest.mark.parametrize("size, expected", [((64, 64), (4, 4)), ((61, 47), (4, 3)), ((33, 17), (3, 2))])
def test_class_maps_have_stride_16(size, expected):
    net = CamNet("resnet18", num_classes=4).eval()
    with torch.inference_mode():
        maps = net.class_maps(torch.randn(2, 3, *size))
    # one map per foreground class, ceil(size / 16) cells
    assert maps.shape == (2, 3, *expected)


def test_logits_are_the_mean_of_the_class_maps_and_cams_are_relu():
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=6).eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():
        logits, maps = net(images, return_maps=True)
        cams = net.cams(images)
        plain_logits = net(images)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, maps.mean(dim=(2, 3)))
    torch.testing.assert_close(plain_logits, logits)
    torch.testing.assert_close(cams, maps.clamp_min(0))
    assert (maps < 0).any(), "a random head gives negative map values that ReLU must remove"


def test_lse_pool_by_hand_runs_from_the_mean_to_the_maximum():
    maps = torch.tensor([[[[0.0, 0.0], [0.0, 4.0]]]])  # one map: mean 1, maximum 4
    # (1/r) log((3 + e^(4r)) / 4): r = 1 -> log((3 + e^4) / 4) = log(14.3995) = 2.6672
    assert lse_pool(maps, 1.0).item() == pytest.approx(2.667196, abs=1e-5)
    assert lse_pool(maps, 1e-4).item() == pytest.approx(1.0, abs=1e-3)  # r -> 0: the mean
    assert lse_pool(maps, 200.0).item() == pytest.approx(4.0 - torch.log(torch.tensor(4.0)).item() / 200, abs=1e-6)
    assert lse_pool(torch.full((1, 2, 3, 3), -2.5), 5.0)[0].tolist() == pytest.approx([-2.5, -2.5])  # constant
    big = torch.tensor([[[[1000.0, -1000.0]]]])  # no overflow: (1/5) log((e^5000 + e^-5000) / 2)
    assert lse_pool(big, 5.0).item() == pytest.approx(1000.0 - torch.log(torch.tensor(2.0)).item() / 5, abs=1e-3)


def test_lse_logits_follow_the_strongest_cells_and_the_arch_keeps_the_pooling(tmp_path):
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=3, pooling="lse", lse_r=2.0).eval()
    assert net.arch == {"backbone": "resnet18", "num_classes": 3, "output_stride": 16, "pooling": "lse", "lse_r": 2.0}
    images = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        logits, maps = net(images, return_maps=True)
    mean, peak = maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))
    torch.testing.assert_close(logits, lse_pool(maps, 2.0))
    assert (logits > mean).all() and (logits < peak).all()
    path = tmp_path / "lse.pth"
    artifacts.save_checkpoint(path, {"model": net.state_dict(), "config": {}, "classes": ["bg", "a", "b"],
                                     "arch": net.arch})
    loaded = load_classifier(artifacts.load_checkpoint(path), str(path))
    assert loaded.pooling == "lse" and loaded.lse_r == 2.0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the log-sum-exp stays float32 under autocast
        half_logits, half_maps = net(images, return_maps=True)
    assert half_maps.dtype == torch.bfloat16 and half_logits.dtype == torch.float32
    torch.testing.assert_close(half_logits, lse_pool(half_maps.float(), 2.0))
    with pytest.raises(ValueError, match="lse_r"):
        CamNet("resnet18", num_classes=3, pooling="lse", lse_r=0.0)
    with pytest.raises(ValueError, match="pooling"):
        CamNet("resnet18", num_classes=3, pooling="max")


def test_classifier_is_a_1x1_conv_without_bias():
    net = CamNet("resnet18", num_classes=21)
    assert isinstance(net.classifier, nn.Conv2d)
    assert net.classifier.kernel_size == (1, 1) and net.classifier.bias is None
    assert net.classifier.out_channels == 20 and net.classifier.in_channels == 512
    backbone, head = net.parameter_groups()
    assert head == [net.classifier.weight]
    assert len(backbone) == len(list(net.backbone.parameters()))


def test_frozen_batchnorm_stays_in_eval_mode_after_train():
    net = CamNet("resnet18", num_classes=3, freeze_bn=True)
    net.train()
    bn = net.backbone[1]
    assert net.training and not bn.training and not bn.weight.requires_grad
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(bn.running_mean, before)


def test_bad_input_shape_names_the_expected_shape():
    net = CamNet("resnet18", num_classes=3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net.class_maps(torch.zeros(3, 32, 32))


def test_checkpoint_round_trip_rebuilds_the_network_from_arch(tmp_path):
    torch.manual_seed(1)
    net = CamNet("resnet18", num_classes=4).eval()
    assert net.arch == {"backbone": "resnet18", "num_classes": 4, "output_stride": 16}
    path = tmp_path / "cls.pth"
    artifacts.save_checkpoint(path, {"model": net.state_dict(), "config": {}, "classes": ["bg", "a", "b", "c"],
                                     "arch": net.arch})
    loaded = load_classifier(artifacts.load_checkpoint(path), str(path))
    assert not loaded.training
    images = torch.randn(1, 3, 40, 36)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), net(images))


def test_weights_of_another_network_are_a_clear_error():
    small = CamNet("resnet18", num_classes=4)
    checkpoint = {"model": small.state_dict(), "arch": {"backbone": "resnet18", "num_classes": 6, "output_stride": 16}}
    with pytest.raises(WsssError, match="x.pth: weights do not fit a resnet18 classifier"):
        load_classifier(checkpoint, "x.pth")
    with pytest.raises(WsssError, match="not a classifier checkpoint"):
        load_classifier({"model": {}, "arch": {"model": "deeplab"}}, "seg.pth")
    with pytest.raises(WsssError, match="not usable"):
        build_classifier({"backbone": "resnet18"})


def test_prepare_for_inference_keeps_the_outputs():
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=4)
    net.train()
    net(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    net.eval()
    images = torch.randn(2, 3, 45, 37)
    with torch.inference_mode():
        before = net.class_maps(images)
    fast = prepare_for_inference(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with torch.inference_mode():
        torch.testing.assert_close(fast.class_maps(images), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_batchnorm(CamNet("resnet18", num_classes=4).train())
