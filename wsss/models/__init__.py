"""Networks: ResNet backbones, the CAM classifier, DeepLab and the pretext heads.

This module names what can be built, without importing torch: the commands' configs take their
choices from here, so ``wsss <command> --help`` never loads torch.  The modules that build the
networks (:mod:`wsss.models.backbones`, :mod:`wsss.models.deeplab`) check when they are imported
that they build exactly the names listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

#: The torchvision ResNets a network is built on (:data:`wsss.models.backbones.BACKBONES` builds them).
BACKBONE_NAMES = ("resnet18", "resnet50", "resnet101")
#: Input pixels per feature cell that a backbone can be built with (dilating its last one or two stages).
OUTPUT_STRIDES = (8, 16, 32)
#: How the CAM network turns class maps into logits (:class:`wsss.models.classifier.CamNet`).
POOLINGS = ("gap", "lse")
#: The pretext tasks of :class:`wsss.selfsup.Pretext` (SimCLR, or MoCo v2 with a queue; RotNet).
PRETEXT_METHODS = ("contrastive", "rotation")

#: ``wsss export --format``: the file each format writes (:func:`wsss.export.export_model` writes them).
EXPORT_FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx", "pt2": "model.pt2"}


@dataclass(frozen=True)
class SegModel:
    """One entry of :data:`SEG_MODELS`: the ResNet it is built on, its default output stride and the strides it
    can be built with (:func:`wsss.models.deeplab.build_seg_model` builds it)."""

    backbone: str
    output_stride: int
    output_strides: tuple[int, ...]


class _Choices(dict):
    """A dict whose missing-key error lists the valid names."""

    def __missing__(self, key):
        raise KeyError(f"unknown segmentation model {key!r}; choose from {sorted(self)}")


SEG_MODELS: dict[str, SegModel] = _Choices({
    "deeplabv3_resnet50": SegModel("resnet50", 8, (8,)),
    "deeplabv3_resnet101": SegModel("resnet101", 8, (8,)),
    "deeplabv3_resnet18": SegModel("resnet18", 16, (8, 16)),
})


def check_built(built: Iterable[str], names: Iterable[str], what: str) -> None:
    """Raise ImportError unless a module builds exactly the ``names`` listed here (``what`` names the list)."""
    built, names = sorted(built), sorted(names)
    if built != names:
        raise ImportError(f"the {what} built ({', '.join(built)}) are not those named in wsss.models "
                          f"({', '.join(names)})")
