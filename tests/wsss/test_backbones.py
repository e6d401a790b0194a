import urllib.error

import pytest
import torch
from torchvision import models
from torchvision.models import resnet18

from wsss.errors import WsssError
from wsss.models import backbones


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_output_stride_16_for_odd_sizes(name):
    net = backbones.build_resnet(name, "none", output_stride=16).eval()
    with torch.inference_mode():
        features = net(torch.zeros(1, 3, 61, 47))
    # stride 16 with padding: ceil(61 / 16) = 4, ceil(47 / 16) = 3
    assert features.shape == (1, backbones.backbone_channels(name), 4, 3)


def test_output_stride_8_dilates_like_torchvision():
    # torchvision's replace_stride_with_dilation (Bottleneck ResNets only) is the reference: the same strides,
    # dilations and paddings, convolution for convolution, in the last two stages
    ours = backbones.build_resnet("resnet50", "none", output_stride=8)
    reference = models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    for index, stage in ((6, reference.layer3), (7, reference.layer4)):
        got = [(m.stride, m.dilation, m.padding) for m in ours[index].modules() if isinstance(m, torch.nn.Conv2d)]
        want = [(m.stride, m.dilation, m.padding) for m in stage.modules() if isinstance(m, torch.nn.Conv2d)]
        assert got == want
    assert {m.dilation for m in ours[7].modules() if isinstance(m, torch.nn.Conv2d)} == {(1, 1), (2, 2), (4, 4)}
    with torch.inference_mode():
        # ceil(61 / 8) = 8, ceil(47 / 8) = 6
        assert ours.eval()(torch.zeros(1, 3, 61, 47)).shape == (1, 2048, 8, 6)
        assert backbones.build_resnet("resnet18", "none", 8).eval()(torch.zeros(1, 3, 80, 80)).shape == (1, 512, 10, 10)
    with pytest.raises(ValueError, match="output_stride"):
        backbones.build_resnet("resnet18", "none", output_stride=4)


def test_output_stride_32_keeps_torchvision_layout():
    net = backbones.build_resnet("resnet18", "none", output_stride=32).eval()
    with torch.inference_mode():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(KeyError, match="resnet101"):
        backbones.build_resnet("vgg16")


def test_imagenet_download_failure_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WsssError) as info:
        backbones.build_resnet("resnet18", "imagenet")
    message = str(info.value)
    assert "--weights PATH" in message and "--weights none" in message and "\n" not in message


def test_weights_from_a_state_dict_file(tmp_path):
    torch.manual_seed(0)
    source = backbones.build_resnet("resnet18", "none", output_stride=32)
    full = resnet18(weights=None)  # a torchvision-shaped state dict: conv1, bn1, layer1, ...
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    loaded = backbones.build_resnet("resnet18", str(path))
    torch.testing.assert_close(loaded[0].weight, full.conv1.weight)
    assert not torch.equal(source[0].weight, full.conv1.weight)
    with pytest.raises(WsssError, match="missing.pth: file not found"):
        backbones.build_resnet("resnet18", str(tmp_path / "missing.pth"))


def test_weights_of_another_backbone_are_one_error_naming_file_tensor_and_backbone(tmp_path):
    from torchvision.models import resnet50

    from wsss.models.deeplab import build_seg_model

    r50, r18 = tmp_path / "r50.pth", tmp_path / "r18.pth"
    torch.save(resnet50(weights=None).state_dict(), r50)
    torch.save(resnet18(weights=None).state_dict(), r18)
    # torch's load_state_dict raised a multi-line RuntimeError ("size mismatch for fc.weight ...")
    with pytest.raises(WsssError, match=r"--weights .*r50\.pth: tensor 'layer1\.0\.conv1\.weight' is \[64, 64, 1, 1\] "
                                        r"in the file but \[64, 64, 3, 3\] in resnet18"):
        backbones.build_resnet("resnet18", str(r50))
    with pytest.raises(WsssError, match=r"r50\.pth: .* in resnet18"):  # train-seg --weights-backbone
        build_seg_model("deeplabv3_resnet18", 3, str(r50))
    # the torchvision DeepLab trunks silently loaded only the tensors whose shapes happened to agree
    with pytest.raises(WsssError, match=r"r18\.pth: tensor 'layer1\.0\.conv1\.weight' is \[64, 64, 3, 3\] in the "
                                        r"file but \[64, 64, 1, 1\] in resnet50"):
        build_seg_model("deeplabv3_resnet50", 3, str(r18))


def test_freeze_batchnorm_keeps_statistics():
    net = backbones.build_resnet("resnet18", "none")
    net.train()
    backbones.freeze_batchnorm(net)
    before = net[1].running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(net[1].running_mean, before)
    assert not net[1].weight.requires_grad


def test_the_built_backbones_are_the_named_ones_and_a_difference_stops_the_import():
    from wsss.models import BACKBONE_NAMES, check_built

    assert sorted(backbones.BACKBONES) == sorted(BACKBONE_NAMES)
    check_built({"resnet50": None, "resnet18": None}, ("resnet18", "resnet50"), "backbones")  # order is free
    with pytest.raises(ImportError, match=r"backbones built \(resnet18\) are not those named in wsss.models "
                                          r"\(resnet18, resnet50\)"):
        check_built({"resnet18": None}, ("resnet18", "resnet50"), "backbones")
