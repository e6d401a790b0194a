import pytest
import torch
from torchvision import models

from wsss.errors import WsssError
from wsss.models.deeplab import SEG_MODELS, build_seg_model, model_from_checkpoint

torch.set_num_threads(1)


def test_unknown_model_error_lists_the_choices():
    with pytest.raises(KeyError, match="deeplabv3_resnet18.*deeplabv3_resnet50"):
        SEG_MODELS["deeplabv3_vgg"]


def test_resnet18_logits_at_input_resolution_for_odd_sizes():
    model = build_seg_model("deeplabv3_resnet18", 4).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 33, 47))
    assert logits.shape == (2, 4, 33, 47)
    backbone, head = model.parameter_groups()
    assert len(backbone) + len(head) == len(list(model.parameters())) and head


def test_torchvision_deeplab_loads_backbone_from_a_state_file(tmp_path):
    torch.manual_seed(3)
    resnet = models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)  # includes fc.*, which the segmentation trunk drops
    model = build_seg_model("deeplabv3_resnet50", 3, str(path))
    assert torch.equal(model.backbone.layer3[0].conv2.weight, resnet.layer3[0].conv2.weight)
    assert torch.equal(model.backbone.conv1.weight, resnet.conv1.weight)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 17, 19)).shape == (1, 3, 17, 19)


def test_backbone_file_without_matching_weights_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"something.weight": torch.zeros(3)}, path)
    with pytest.raises(WsssError, match="no parameter of resnet50"):
        build_seg_model("deeplabv3_resnet50", 3, str(path))
    with pytest.raises(WsssError, match="file not found"):
        build_seg_model("deeplabv3_resnet18", 3, str(tmp_path / "missing.pth"))


def test_model_from_checkpoint_round_trips_and_rejects_foreign_arch():
    model = build_seg_model("deeplabv3_resnet18", 3)
    checkpoint = {"model": model.state_dict(), "arch": {"model": "deeplabv3_resnet18", "num_classes": 3}}
    rebuilt = model_from_checkpoint(checkpoint)
    assert torch.equal(rebuilt.head[-1].weight, model.head[-1].weight)
    with pytest.raises(WsssError, match="not a train-seg checkpoint"):
        model_from_checkpoint({"model": {}, "arch": {"backbone": "resnet50"}}, "cls/best.pth")
    with pytest.raises(WsssError, match="weights do not fit"):
        model_from_checkpoint({"model": model.state_dict(), "arch": {"model": "deeplabv3_resnet18", "num_classes": 5}})


def test_resnet18_output_stride_8_has_twice_the_cells_and_rebuilds_from_its_checkpoint():
    dense = build_seg_model("deeplabv3_resnet18", 3, output_stride=8).eval()
    default = build_seg_model("deeplabv3_resnet18", 3).eval()
    with torch.no_grad():
        assert dense.backbone(torch.zeros(1, 3, 80, 80)).shape[-2:] == (10, 10)
        assert default.backbone(torch.zeros(1, 3, 80, 80)).shape[-2:] == (5, 5)
    # the ASPP rates follow the cells: 12/24/36 at stride 8, 6/12/18 at 16
    def rates(model):
        return [m.dilation[0] for m in model.head[0].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert rates(dense) == [12, 24, 36] and rates(default) == [6, 12, 18]
    checkpoint = {"model": dense.state_dict(),
                  "arch": {"model": "deeplabv3_resnet18", "num_classes": 3, "output_stride": 8}}
    rebuilt = model_from_checkpoint(checkpoint).eval()
    image = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        assert torch.allclose(rebuilt(image), dense(image), atol=1e-6)
    with pytest.raises(WsssError, match="output stride 4"):
        model_from_checkpoint({**checkpoint, "arch": {**checkpoint["arch"], "output_stride": 4}}, "seg/last.pth")
    with pytest.raises(ValueError, match="output stride 8, not 16"):
        build_seg_model("deeplabv3_resnet50", 3, output_stride=16)


def test_prepare_for_inference_keeps_the_segmentation_outputs():
    # predict folds BatchNorm and runs channels-last (faster on CPU and GPU); the probabilities must not change
    from wsss.models.backbones import prepare_for_inference
    from wsss.segmentation import segment_batch

    torch.manual_seed(0)
    model = build_seg_model("deeplabv3_resnet18", num_classes=3)
    model(torch.randn(4, 3, 33, 33))  # training mode: non-trivial running statistics
    model.eval()
    images = torch.randn(2, 3, 40, 52)
    before = segment_batch(model, images, scales=(0.75, 1.0), flip=True)
    fast = prepare_for_inference(model)
    assert fast.channels_last and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    with torch.inference_mode():
        assert fast.backbone[0](images.contiguous(memory_format=torch.channels_last)).is_contiguous(
            memory_format=torch.channels_last)
    after = segment_batch(fast, images, scales=(0.75, 1.0), flip=True)
    assert after.is_contiguous()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
