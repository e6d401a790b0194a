"""The affinity network: a ResNet trunk and a small head that embeds every stride-8 cell.

AffinityNet (Ahn & Kwak 2018) compares cells by the L1 distance of their
embeddings (:func:`wsss.affinity.pair_affinity`); the embedding mixes a mid-level
stage, which still sees edges, with the deep stages, which know the classes.
Here the trunk is :func:`~wsss.models.backbones.build_resnet` at output stride
16 and the head taps ``layer2`` (stride 8), ``layer3`` and ``layer4`` (stride
16): each goes through a 1x1 convolution, GroupNorm and ReLU to a small width,
the stride-16 maps are brought to the stride-8 grid, the three are concatenated
and a last 1x1 convolution gives the embedding.

Geometry.  Cell ``i`` of a stride-``s`` map is centred on input pixel ``s * i``
(see :mod:`wsss.cam`), so stride-8 cell ``i`` (pixel ``8 i``) lies at coordinate
``i / 2`` of the stride-16 grid.  :func:`upsample_cells` samples exactly there;
``F.interpolate(scale_factor=2, align_corners=False)`` would read ``i / 2 - 1/4``,
shifting the deep features a quarter stride-16 cell (4 pixels) up and left of
the ``layer2`` features they are concatenated with.

GroupNorm rather than BatchNorm in the head: affinity training uses a few large
crops per batch (AffinityNet: 8 of 448 px), where batch statistics are noisy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import BACKBONES, backbone_channels, build_resnet, freeze_batchnorm

# positions of layer2, layer3 and layer4 in build_resnet's nn.Sequential
TAPPED_STAGES = (5, 6, 7)
# head widths for a 2048-channel trunk (AffinityNet's 64/128/256); narrower trunks scale them down
RESNET50_WIDTHS = (64, 128, 256)
CHANNELS_PER_GROUP = 16


def upsample_cells(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sample a map on the grid of half its stride, cell centre on cell centre.

    Output cell ``i`` reads input coordinate ``i / 2`` (bilinear); a last output
    row or column beyond the input's last cell repeats it.  Exact in any dtype
    (no sampling grid is built).

    Args:
        maps: float [B, C, h, w] at stride ``2 s``.
        size: (H, W) of the stride-``s`` grid; each side ``2 h - 1`` or ``2 h``.

    Returns:
        float [B, C, H, W].
    """
    height, width = maps.shape[-2:]
    inner = (2 * height - 1, 2 * width - 1)
    extra = (size[0] - inner[0], size[1] - inner[1])
    if extra[0] not in (0, 1) or extra[1] not in (0, 1):
        raise ValueError(f"cannot place a {height}x{width} map on a {size[0]}x{size[1]} grid of half its stride")
    # align_corners=True with 2 h - 1 outputs puts output i at input (h - 1) / (2 h - 2) * i = i / 2
    out = F.interpolate(maps, size=inner, mode="bilinear", align_corners=True) if inner != (height, width) else maps
    if extra != (0, 0):
        out = F.pad(out, (0, extra[1], 0, extra[0]), mode="replicate")
    return out


def _reduction(in_channels: int, out_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)  # the norm removes any bias
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    groups = max(1, out_channels // CHANNELS_PER_GROUP)
    return nn.Sequential(conv, nn.GroupNorm(groups, out_channels), nn.ReLU(inplace=True))


class AffinityNet(nn.Module):
    """ResNet trunk + multi-stage 1x1 head -> one embedding per stride-8 cell.

    Args:
        backbone: a key of :data:`wsss.models.backbones.BACKBONES`.
        weights: ``imagenet``, ``none`` or a path to a state_dict (a CAM checkpoint works:
            its ``backbone.`` prefix is stripped).
        embed_dim: channels D of the embedding.
        freeze_bn: keep the trunk's BatchNorms in eval mode with frozen affine parameters.

    Attributes:
        stride: 8, the embedding grid's stride.
        widths: the head's widths for layer2, layer3, layer4 (64/128/256 for ResNet-50,
            scaled by the trunk's width: 16/32/64 for ResNet-18).
    """

    stride = 8

    def __init__(self, backbone: str = "resnet50", weights: str = "none", embed_dim: int = 448,
                 freeze_bn: bool = False):
        super().__init__()
        if backbone not in BACKBONES:
            raise KeyError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        self.backbone_name = backbone
        self.embed_dim = embed_dim
        self.freeze_bn = freeze_bn
        self.backbone = build_resnet(backbone, weights, output_stride=16)
        last = backbone_channels(backbone)
        in_channels = (last // 4, last // 2, last)  # every ResNet doubles the width per stage
        self.widths = tuple(max(CHANNELS_PER_GROUP, width * last // 2048) for width in RESNET50_WIDTHS)
        self.reductions = nn.ModuleList(_reduction(c_in, c_out) for c_in, c_out in zip(in_channels, self.widths))
        # no bias: a constant shift cancels in the differences the affinity is made of
        self.embed = nn.Conv2d(sum(self.widths), embed_dim, kernel_size=1, bias=False)
        nn.init.xavier_uniform_(self.embed.weight)
        if freeze_bn:
            freeze_batchnorm(self.backbone)

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        if mode and self.freeze_bn:
            freeze_batchnorm(self.backbone)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed every stride-8 cell.

        Args:
            images: float [B, 3, H, W], ImageNet-normalised.

        Returns:
            float [B, D, ceil(H / 8), ceil(W / 8)].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        taps = []
        features = images
        for index, stage in enumerate(self.backbone):
            features = stage(features)
            if index in TAPPED_STAGES:
                taps.append(features)
        grid = tuple(taps[0].shape[-2:])
        reduced = [self.reductions[0](taps[0])]
        reduced += [upsample_cells(reduction(tap), grid) for reduction, tap in zip(self.reductions[1:], taps[1:])]
        return self.embed(torch.cat(reduced, dim=1))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return ``(trunk parameters, head parameters)``; AffinityNet trains the trunk at a lower rate."""
        return list(self.backbone.parameters()), list(self.reductions.parameters()) + list(self.embed.parameters())


def load_affinity_net(checkpoint: dict, source: str = "checkpoint") -> AffinityNet:
    """Rebuild the :class:`AffinityNet` of a ``train-aff`` checkpoint (its ``arch``) with its weights, eval mode.

    Raises:
        WsssError: the checkpoint is not a train-aff checkpoint, or its weights do not fit.
    """
    from wsss.errors import WsssError

    arch = checkpoint.get("arch")
    if not isinstance(arch, dict) or arch.get("kind") != "affinity" or arch.get("backbone") not in BACKBONES:
        raise WsssError(f"{source}: not a `wsss train-aff` checkpoint (arch {arch!r})")
    model = AffinityNet(arch["backbone"], "none", embed_dim=int(arch.get("embed_dim", 448)))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise WsssError(f"{source}: weights do not fit the affinity network ({str(err).splitlines()[0]})") from None
    return model.eval()
