"""The CAM network: a ResNet backbone and a 1x1 convolution classifier without bias.

Because the classifier is linear and has no bias, classifying the globally
average-pooled features is the same as average-pooling the per-class maps
(``classifier(GAP(f)) == GAP(classifier(f))``).  The network therefore computes
the class maps once and pools them into logits, so one forward pass gives both
the classification scores and the class activation maps (CAMs).

Pooling (``pooling``): ``gap``, the spatial mean (CAM, IRN, SEAM); or ``lse``,
the log-sum-exp of Pinheiro & Collobert (CVPR 2015),
``(1 / r) * log(mean(exp(r * m)))`` over the cells of a class map ``m``, which
runs from the mean (``r -> 0``) to the maximum (``r -> inf``).  With the mean
every cell's score counts by its area, so a class can also be scored from the
scene around it (its map high on background, low on other objects); the
log-sum-exp lets the class's best cells decide.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsss.errors import WsssError
from wsss.models import POOLINGS
from wsss.models.backbones import BACKBONES, backbone_channels, build_resnet, freeze_batchnorm

# The classifier backbones one can choose with --backbone; a KeyError lists the valid names.
ARCHS = BACKBONES


def lse_pool(maps: torch.Tensor, r: float) -> torch.Tensor:
    """Log-sum-exp pooling of class maps ``[B, K, h, w]`` -> ``[B, K]``: ``(1/r) log(mean(exp(r * maps)))``.

    Computed in float32 as ``(logsumexp(r * maps) - log(h * w)) / r`` (no overflow).  It lies between
    the mean and the maximum of each map and equals both for a constant map.  Its rounding error is
    about ``1e-7 * log(h * w) / r``, which is why ``train-cls`` takes ``--lse-r`` >= 0.1.
    """
    cells = maps.shape[-2] * maps.shape[-1]
    return (torch.logsumexp(maps.flatten(2).float() * r, dim=2) - math.log(cells)) / r


def classifier_arch(backbone: str, num_classes: int, output_stride: int, pooling: str = "gap",
                    lse_r: float = 5.0) -> dict:
    """The plain dict a checkpoint stores to rebuild a :class:`CamNet` (see :func:`build_classifier`);
    the pooling is named only where it is not the mean, so mean-pooled checkpoints keep their old form."""
    arch = {"backbone": backbone, "num_classes": num_classes, "output_stride": output_stride}
    if pooling != "gap":
        arch.update(pooling=pooling, lse_r=float(lse_r))
    return arch


class CamNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier turns features into class maps.

    Args:
        backbone: a key of :data:`ARCHS` (``resnet18``, ``resnet50``, ``resnet101``).
        num_classes: number of dataset classes *including* background; the network
            has ``num_classes - 1`` outputs, one per foreground class.
        weights: ``imagenet``, ``none`` or a path to a backbone state_dict.
        output_stride: 16 (last stage dilated), 8 (last two stages dilated) or 32.
        freeze_bn: keep every BatchNorm of the backbone in eval mode with frozen
            affine parameters (IRN's setting for small batches).
        pooling: ``gap`` (spatial mean) or ``lse`` (log-sum-exp with sharpness ``lse_r`` > 0).
    """

    def __init__(self, backbone: str = "resnet50", num_classes: int = 21, weights: str = "none",
                 output_stride: int = 16, freeze_bn: bool = False, pooling: str = "gap", lse_r: float = 5.0):
        super().__init__()
        if backbone not in ARCHS:
            raise KeyError(f"unknown backbone {backbone!r}; choose from {sorted(ARCHS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and at least one class, got {num_classes}")
        if pooling not in POOLINGS or not (math.isfinite(lse_r) and lse_r > 0):
            raise ValueError(f"pooling must be one of {POOLINGS} and lse_r a finite number > 0, got {pooling!r}, {lse_r}")
        self.pooling, self.lse_r = pooling, float(lse_r)
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.freeze_bn = freeze_bn
        self.channels_last = False  # set by prepare_for_inference
        self.backbone = build_resnet(backbone, weights, output_stride)
        self.classifier = nn.Conv2d(backbone_channels(backbone), num_classes - 1, kernel_size=1, bias=False)
        # SEAM initialises the CAM head with Xavier-uniform.
        nn.init.xavier_uniform_(self.classifier.weight)
        if freeze_bn:
            freeze_batchnorm(self.backbone)

    @property
    def arch(self) -> dict:
        """The plain dict a checkpoint stores to rebuild this network (see :func:`build_classifier`)."""
        return classifier_arch(self.backbone_name, self.num_classes, self.output_stride, self.pooling, self.lse_r)

    def train(self, mode: bool = True) -> "CamNet":
        super().train(mode)
        if mode and self.freeze_bn:
            # model.train() would switch BatchNorm back to batch statistics.
            freeze_batchnorm(self.backbone)
        return self

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Raw class maps (before ReLU).

        Args:
            images: float [B, 3, H, W], ImageNet-normalised.

        Returns:
            float [B, C - 1, ceil(H / stride), ceil(W / stride)].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.backbone(images))

    def forward(self, images: torch.Tensor, return_maps: bool = False):
        """Classify images.

        Args:
            images: float [B, 3, H, W].
            return_maps: also return the raw class maps (one pass for logits and CAMs).

        Returns:
            logits float [B, C - 1]; with ``return_maps`` a tuple ``(logits, maps [B, C - 1, h, w])``.
        """
        maps = self.class_maps(images)
        logits = self.pool(maps)
        return (logits, maps) if return_maps else logits

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` of class maps ``[B, K, h, w]`` (the network's pooling; the log-sum-exp in float32
        also under autocast, the mean in the maps' dtype)."""
        return maps.mean(dim=(2, 3)) if self.pooling == "gap" else lse_pool(maps, self.lse_r)

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """Class activation maps: ReLU of the class maps, float [B, C - 1, h, w] at feature resolution."""
        return torch.relu(self.class_maps(images))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return ``(backbone parameters, head parameters)`` for a ×10 head learning rate."""
        return list(self.backbone.parameters()), list(self.classifier.parameters())


def build_classifier(arch: dict, weights: str = "none", freeze_bn: bool = False) -> CamNet:
    """Build a :class:`CamNet` from a checkpoint's ``arch`` dict ``{backbone, num_classes, output_stride}``
    (``pooling`` and ``lse_r`` where not the mean)."""
    try:
        return CamNet(backbone=arch["backbone"], num_classes=int(arch["num_classes"]), weights=weights,
                      output_stride=int(arch.get("output_stride", 16)), freeze_bn=freeze_bn,
                      pooling=arch.get("pooling", "gap"), lse_r=float(arch.get("lse_r", 5.0)))
    except (KeyError, TypeError, ValueError) as err:
        raise WsssError(f"classifier arch {arch!r} is not usable ({err})") from None


def load_classifier(checkpoint: dict, source: str = "checkpoint") -> CamNet:
    """Rebuild a :class:`CamNet` from a loaded checkpoint dict and load its weights (eval mode).

    Args:
        checkpoint: the dict returned by :func:`wsss.artifacts.load_checkpoint`.
        source: the file name, for error messages.
    """
    arch = checkpoint.get("arch")
    if not isinstance(arch, dict) or "backbone" not in arch:
        raise WsssError(f"{source}: not a classifier checkpoint (no arch.backbone entry)")
    model = build_classifier(arch)
    state = {key.removeprefix("module."): value for key, value in checkpoint["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise WsssError(f"{source}: weights do not fit a {arch['backbone']} classifier ({first})") from None
    return model.eval()
