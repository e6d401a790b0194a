"""DeepLabV3 segmentation networks trained on pseudo-labels (or ground truth for the upper bound).

Every model maps an image batch float32 [B, 3, H, W] to logits float32
[B, C, H, W] at the input resolution, and exposes ``backbone`` and ``head``
so that the optimiser can give the freshly initialised head a larger
learning rate.

``SEG_MODELS`` (:mod:`wsss.models`, light enough for the command line) is the visible list of
choices; ``SEG_BUILDERS`` here builds each of them:

* ``deeplabv3_resnet50`` / ``deeplabv3_resnet101``: torchvision's DeepLabV3
  (ResNet with output stride 8, ASPP rates 12/24/36), built with
  ``weights=None, weights_backbone=None``; the ImageNet backbone is then
  loaded through :mod:`wsss.models.backbones`, so a failed download gives the
  same one-line error as ``train-cls``.
* ``deeplabv3_resnet18``: a ResNet-18 with torchvision's DeepLabV3 head, small
  enough for CPU demos and tests; output stride 16 (ASPP rates 6/12/18) by default,
  or 8 (rates 12/24/36), which gives four times the logit cells for about 2.5 times
  the compute: on small images the difference between 6 x 6 and 12 x 12 logits.

``weights_backbone`` is ``"imagenet"``, ``"none"`` or a path to a
``state_dict`` (a torchvision ResNet file, or a wsss checkpoint whose keys
start with ``backbone.``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation as tv_segmentation
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from wsss.errors import WsssError
from wsss.models import OUTPUT_STRIDES, SEG_MODELS, check_built
from wsss.models.backbones import (BACKBONES, build_resnet, freeze_batchnorm, load_backbone_state, load_imagenet_state,
                                   load_state_file, torchvision_names)


class SegmentationNet(nn.Module):
    """Backbone + head; the logits are upsampled bilinearly to the input size.

    Args:
        backbone: maps [B, 3, H, W] to features [B, K, h, w] (or a dict whose ``"out"`` holds them,
            as torchvision's ``IntermediateLayerGetter`` returns).
        head: maps features [B, K, h, w] to logits [B, C, h, w].
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen_batchnorm = False
        self.channels_last = False  # set by wsss.models.backbones.prepare_for_inference

    def freeze_backbone_batchnorm(self) -> "SegmentationNet":
        """Keep the backbone's BatchNorm in eval mode with frozen parameters, also after ``train()``."""
        self.frozen_batchnorm = True
        freeze_batchnorm(self.backbone)
        return self

    def train(self, mode: bool = True) -> "SegmentationNet":
        super().train(mode)
        if mode and self.frozen_batchnorm:
            freeze_batchnorm(self.backbone)  # train() would switch BatchNorm back to batch statistics
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        if isinstance(features, dict):
            features = features["out"]
        logits = self.head(features)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return ``(backbone parameters, head parameters)`` for :func:`wsss.optim.sgd_with_head`."""
        return list(self.backbone.parameters()), list(self.head.parameters())


def _load_backbone_state(backbone: nn.Module, resnet_name: str, weights: str) -> None:
    """Load ImageNet or file weights into a torchvision ResNet trunk (``IntermediateLayerGetter``)."""
    if weights == "none":
        return
    if weights == "imagenet":
        state = load_imagenet_state(resnet_name, BACKBONES[resnet_name][1])
    else:
        state = torchvision_names(load_state_file(weights))
    # the classification layer (fc) has no place in a segmentation trunk: load_backbone_state leaves it out
    load_backbone_state(backbone, state, weights, resnet_name)


def _torchvision_deeplab(constructor: Callable, resnet_name: str) -> Callable[[int, str, int], SegmentationNet]:
    def build(num_classes: int, weights_backbone: str, output_stride: int) -> SegmentationNet:
        net = constructor(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        _load_backbone_state(net.backbone, resnet_name, weights_backbone)
        return SegmentationNet(net.backbone, net.classifier)
    return build


def _resnet18_deeplab(num_classes: int, weights_backbone: str, output_stride: int) -> SegmentationNet:
    backbone = build_resnet("resnet18", weights_backbone, output_stride=output_stride)
    # the ASPP rates scale with the cells: 12/24/36 at stride 8, halved at 16 (DeepLabV3 paper, Sec. 3.3)
    rates = tuple(rate * 8 // output_stride for rate in (12, 24, 36))
    return SegmentationNet(backbone, DeepLabHead(BACKBONES["resnet18"][2], num_classes, atrous_rates=rates))


# The constructor of every model of SEG_MODELS (whose entries give the backbone and the output strides):
# (num_classes, weights_backbone, output_stride) -> network.
SEG_BUILDERS: dict[str, Callable[[int, str, int], SegmentationNet]] = {
    "deeplabv3_resnet50": _torchvision_deeplab(tv_segmentation.deeplabv3_resnet50, "resnet50"),
    "deeplabv3_resnet101": _torchvision_deeplab(tv_segmentation.deeplabv3_resnet101, "resnet101"),
    "deeplabv3_resnet18": _resnet18_deeplab,
}
check_built(SEG_BUILDERS, SEG_MODELS, "segmentation models")
if any(model.backbone not in BACKBONES or not set(model.output_strides) <= set(OUTPUT_STRIDES)
       for model in SEG_MODELS.values()):
    raise ImportError("wsss.models.SEG_MODELS names a backbone or an output stride that wsss.models.backbones "
                      "cannot build")


def build_seg_model(name: str, num_classes: int, weights_backbone: str = "none",
                    output_stride: int | None = None) -> SegmentationNet:
    """Build a segmentation network from :data:`SEG_MODELS`.

    Args:
        name: a key of :data:`SEG_MODELS`.
        num_classes: output classes including background.
        weights_backbone: ``imagenet``, ``none`` or a state_dict path for the ResNet trunk.
        output_stride: input pixels per logit cell; None = the model's default. torchvision's
            DeepLabs are built at 8 only.

    Returns:
        A :class:`SegmentationNet` mapping [B, 3, H, W] to logits [B, num_classes, H, W].
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    spec = SEG_MODELS[name]
    output_stride = spec.output_stride if output_stride is None else output_stride
    if output_stride not in spec.output_strides:
        raise ValueError(f"{name} can be built with output stride {' or '.join(map(str, spec.output_strides))}, "
                         f"not {output_stride}")
    return SEG_BUILDERS[name](num_classes, weights_backbone, output_stride)


def model_from_checkpoint(checkpoint: dict, source: str = "checkpoint") -> SegmentationNet:
    """Rebuild the network of a ``train-seg`` checkpoint (its ``arch`` entry) and load its weights.

    Args:
        checkpoint: dict from :func:`wsss.artifacts.load_checkpoint`.
        source: file name used in error messages.
    """
    arch = checkpoint.get("arch")
    if not isinstance(arch, dict) or arch.get("model") not in SEG_MODELS or not isinstance(arch.get("num_classes"), int):
        raise WsssError(f"{source}: not a train-seg checkpoint (arch {arch!r}; expected a model from {sorted(SEG_MODELS)})")
    stride = arch.get("output_stride")  # checkpoints from before the option have the model's default
    if stride is not None and (not isinstance(stride, int) or stride not in SEG_MODELS[arch["model"]].output_strides):
        raise WsssError(f"{source}: output stride {stride!r} is not one {arch['model']} can be built with")
    model = build_seg_model(arch["model"], arch["num_classes"], "none", stride)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise WsssError(f"{source}: weights do not fit {arch['model']} ({str(err).splitlines()[0]})") from None
    return model


def checkpoint_classes(checkpoint: dict, source: str = "checkpoint") -> list[str]:
    """The class names of a ``train-seg`` checkpoint, in the order of its outputs (checked against ``arch``)."""
    classes, count = checkpoint.get("classes"), (checkpoint.get("arch") or {}).get("num_classes")
    if not isinstance(classes, list) or len(classes) != count:
        raise WsssError(f"{source}: holds no class list for its {count} outputs (a checkpoint of an older wsss?); "
                        "retrain with `wsss train-seg`")
    return [str(name) for name in classes]
