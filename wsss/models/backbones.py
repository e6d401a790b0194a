"""ResNet backbones from torchvision, with output stride 16 and explicit weight loading.

``weights`` is ``"imagenet"`` (torchvision's weight enum; downloads once into
the torch hub cache), ``"none"`` (random initialisation) or a path to a
``state_dict`` file.  Without internet the ImageNet download fails with a
one-line error that names ``--weights PATH`` and ``--weights none``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from wsss.errors import WsssError
from wsss.models import BACKBONE_NAMES, OUTPUT_STRIDES, check_built

# name -> (torchvision constructor, ImageNet weight enum, channels of the last stage)
BACKBONES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2, 2048),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2, 2048),
}
check_built(BACKBONES, BACKBONE_NAMES, "backbones")


def _lookup(name: str):
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None


def backbone_channels(name: str) -> int:
    """Channels of the backbone's last feature map."""
    return _lookup(name)[2]


def load_imagenet_state(name: str, weight_enum) -> dict:
    """Return torchvision's ImageNet ``state_dict``, or raise a WsssError when it cannot be fetched."""
    try:
        return weight_enum.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # urllib, ssl, socket and hash errors all mean "no weights here"
        raise WsssError(
            f"--weights imagenet: could not download the ImageNet weights of {name} ({type(err).__name__}); "
            f"fetch {weight_enum.url} on a machine with internet and pass --weights PATH, "
            "or train from scratch with --weights none"
        ) from None


# The key of the metadata block in a `wsss pretrain` backbone file (not a tensor: strip it before
# handing the dict to torchvision's load_state_dict).
META_KEY = "wsss_meta"
# torchvision's names of the trunk modules, in the order of build_resnet's nn.Sequential
TRUNK_NAMES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def trunk_state_dict(trunk: nn.Module) -> dict:
    """The state dict of a :func:`build_resnet` trunk under torchvision's ResNet names.

    ``0.weight`` becomes ``conv1.weight``, ``4.0.conv1.weight`` becomes ``layer1.0.conv1.weight``:
    the file loads into ``torchvision.models.resnetXX()`` with ``strict=False`` (only ``fc`` is
    missing) and into ``--weights PATH`` of every wsss network.
    """
    out = {}
    for key, value in trunk.state_dict().items():
        index, _, rest = key.partition(".")
        out[f"{TRUNK_NAMES[int(index)]}.{rest}"] = value.detach().cpu().clone()
    return out


def torchvision_names(state: dict) -> dict:
    """Bring a trunk's state dict to torchvision's ResNet names.

    Accepts torchvision's own names, a wsss network's (``backbone.`` prefix; the trunk of
    :func:`build_resnet` numbers its modules ``0`` .. ``7``) and heads' keys, which are kept as they
    are (and ignored by the trunk).
    """
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        index, _, rest = key.partition(".")
        if index.isdigit() and int(index) < len(TRUNK_NAMES) and rest:
            key = f"{TRUNK_NAMES[int(index)]}.{rest}"
        out[key] = value
    return out


def load_state_file(path: str | Path) -> dict:
    """Read a ``state_dict`` (or a wsss checkpoint's ``model``) from a file, weights only.

    A `wsss pretrain` file's metadata block (``wsss_meta``) is left out of the returned dict;
    see :func:`state_file_meta`.
    """
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"--weights {path}: file not found (use imagenet, none or a state_dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WsssError(f"--weights {path}: not a readable state_dict ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WsssError(f"--weights {path}: expected a state_dict")
    return {key: value for key, value in state.items() if key != META_KEY}


def state_file_meta(path: str | Path) -> dict:
    """The ``wsss_meta`` block of a `wsss pretrain` backbone file ({} for any other state dict)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:
        return {}
    meta = state.get(META_KEY) if isinstance(state, dict) else None
    return meta if isinstance(meta, dict) else {}


def load_backbone_state(module: nn.Module, state: dict, weights: str, name: str) -> None:
    """Load the tensors of a state dict file that ``module`` (a ResNet trunk) has; the rest (``fc.``) is left out.

    Raises:
        WsssError: a tensor has another shape in the file (a state dict of another backbone), or
            the file holds no tensor of ``module`` at all; the message names the file and ``name``.
    """
    meta = state_file_meta(weights) if weights not in ("imagenet", "none") else {}
    if meta.get("backbone") not in (None, name):
        raise WsssError(f"--weights {weights}: holds a {meta['backbone']} trunk (wsss pretrain), not a {name}")
    own = module.state_dict()
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    for key, value in state.items():
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
            raise WsssError(f"--weights {weights}: tensor {key!r} is {list(value.shape)} in the file but "
                            f"{list(own[key].shape)} in {name} (weights of another backbone?)")
    matching = {key: value for key, value in state.items() if key in own}
    if not matching:
        raise WsssError(f"--weights {weights}: no parameter of {name} found in the file")
    module.load_state_dict(matching, strict=False)


def build_resnet(name: str, weights: str = "none", output_stride: int = 16) -> nn.Module:
    """Build a torchvision ResNet without its pooling/fc head.

    Args:
        name: ``resnet18``, ``resnet50`` or ``resnet101``.
        weights: ``imagenet``, ``none`` or a path to a state_dict.
        output_stride: 16 (last stage dilated, the CAM/DeepLab setting), 8 (the last two stages
            dilated, DeepLab's dense setting: 4x the cells, about 2.5x the compute of a ResNet-18) or 32.

    Returns:
        A module mapping [B, 3, H, W] to features [B, C, ceil(H/os), ceil(W/os)].
    """
    constructor, weight_enum, _ = _lookup(name)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    net = constructor(weights=None)
    if weights == "imagenet":
        net.load_state_dict(load_imagenet_state(name, weight_enum))
    elif weights != "none":
        load_backbone_state(net, torchvision_names(load_state_file(weights)), weights, name)
    if output_stride <= 16:
        _dilate_stage(net.layer4, 2 if output_stride == 16 else 4)
    if output_stride == 8:
        _dilate_stage(net.layer3, 2)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _dilate_stage(stage: nn.Sequential, rate: int) -> None:
    # Replace the stride 2 of a stage by dilation, keeping the receptive field, as torchvision's
    # replace_stride_with_dilation does (which only exists for Bottleneck ResNets): the strided 3x3
    # convolution keeps the dilation of the stage before (rate / 2), every other 3x3 one gets ``rate``.
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation = module.padding = (rate // 2, rate // 2)
            elif module.kernel_size == (3, 3):
                module.dilation = module.padding = (rate, rate)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode with frozen affine parameters (IRN's small-batch setting).

    Call after every ``model.train()``.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
            for parameter in layer.parameters():
                parameter.requires_grad_(False)


def fuse_conv_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it, in place (inference only).

    In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))``
    equals one convolution with rescaled weights and a bias; removing the separate
    BatchNorm pass saves memory traffic (about 7 % of a CPU ResNet forward).  Pairs are
    adjacent ``Conv2d, BatchNorm2d`` in an ``nn.Sequential`` and ``convN``/``bnN``
    attributes of a residual block (torchvision's layout).

    Returns:
        ``module``, whose BatchNorms that follow a convolution are now ``nn.Identity``.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training:
        raise ValueError("fuse_conv_batchnorm needs a module in eval mode (training BatchNorm is not an affine map)")
    for parent in list(module.modules()):
        names = list(parent._modules)
        if isinstance(parent, nn.Sequential):
            pairs = [(a, b) for a, b in zip(names, names[1:])]
        else:
            pairs = [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        for conv_name, bn_name in pairs:
            conv, bn = parent._modules.get(conv_name), parent._modules.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                parent._modules[bn_name] = nn.Identity()
    return module


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Make a network faster for inference, in place: eval mode, BatchNorm folded, channels-last memory.

    ``model`` is a :class:`~wsss.models.classifier.CamNet` or a
    :class:`~wsss.models.deeplab.SegmentationNet`: their ``forward`` turns the input batch
    channels-last when ``model.channels_last`` is set.  Channels-last (NHWC) lets the CPU (oneDNN)
    and GPU convolution kernels skip layout conversions; with the folded BatchNorm a ResNet-50
    CAM pass takes about 15 % less time on CPU and a ResNet-18 DeepLab pass about 20 %
    (bench/throughput.py).  For training, channels-last is slower on CPU (an 8-image ResNet-18
    DeepLab step 0.78 s against 0.64 s), so only inference uses it there.  Outputs agree with the
    original network to float rounding.  Do not train the result.
    """
    fuse_conv_batchnorm(model.eval())
    model.to(memory_format=torch.channels_last)
    model.channels_last = True
    return model
