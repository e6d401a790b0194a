"""Deployable copies of a ``train-seg`` network: TorchScript, ONNX or a ``torch.export`` program.

The exported model is :class:`ImageSegmenter`: it takes a float32 batch [N, 3, H, W] of RGB values
0–255 (any N, H, W; it normalises with the ImageNet mean and std itself) and returns class logits
[N, C, H, W] at the input's size, so the argmax over dim 1 is the label map.  It is the network of
``wsss predict`` at one scale, without the mirror image and without the CRF.  BatchNorm is folded
into the convolutions first (:func:`wsss.models.backbones.fuse_conv_batchnorm`).

Every export is checked before it is kept: the exported file is loaded again (ONNX with
onnxruntime) and run on two images of different sizes, and its logits must equal the eager
network's up to float rounding (:data:`TOLERANCE`, relative to the logits' scale).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from wsss import artifacts
from wsss.errors import WsssError
from wsss.models import EXPORT_FORMATS
from wsss.models.backbones import fuse_conv_batchnorm
from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD

#: The sizes (H, W) of the two check images: different and odd, so a size frozen into the graph shows.
CHECK_SIZES = ((161, 243), (224, 97))
#: Largest difference allowed between exported and eager logits, relative to max(1, largest |logit|).
TOLERANCE = 1e-4
#: Where the class names travel inside a TorchScript or pt2 file (``_extra_files`` / ONNX metadata).
CLASSES_KEY = "classes.json"
ONNX_EXTRA = 'install the onnx extra: pip install -e ".[onnx]" in the source folder'


class ImageSegmenter(nn.Module):
    """float32 RGB 0–255 [N, 3, H, W] -> logits [N, C, H, W]: the network with its input normalisation."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


def check_images(seed: int = 0) -> list[torch.Tensor]:
    """The two check batches: RGB noise 0–255 of :data:`CHECK_SIZES`, of two images and of one.

    The export traces the first: two images, so that no exporter takes the batch size for a constant 1.
    """
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (count, 3, *size), generator=generator).float()
            for count, size in zip((2, 1), CHECK_SIZES)]


def _dynamic_shapes() -> tuple[dict, ...]:
    """Batch, height and width of the one input may be anything (``torch.export`` and the ONNX exporter)."""
    dynamic = torch.export.Dim.DYNAMIC
    return ({0: dynamic, 2: dynamic, 3: dynamic},)


def _torchscript(model: ImageSegmenter, example: torch.Tensor, classes: list[str]) -> tuple[bytes, Callable]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch marks TorchScript deprecated; the check below is what counts
        traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={CLASSES_KEY: json.dumps(classes)})
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    return buffer.getvalue(), lambda images: loaded(images).numpy()


def _pt2(model: ImageSegmenter, example: torch.Tensor, classes: list[str]) -> tuple[bytes, Callable]:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={CLASSES_KEY: json.dumps(classes)})
    loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()
    return buffer.getvalue(), lambda images: loaded(images).numpy()


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only warnings from these loggers while the block runs (their levels are restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _onnx(model: ImageSegmenter, example: torch.Tensor, classes: list[str], opset: int) -> tuple[bytes, Callable]:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise WsssError(f"--format onnx: the {err.name} package is not installed; {ONNX_EXTRA}") from None
    with warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir"):  # a log line per optimiser pass
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=_dynamic_shapes(), opset_version=opset, dynamo=True,
                                    verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {CLASSES_KEY: json.dumps(classes)})
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, lambda images: session.run(None, {"images": images.numpy()})[0]


def export_model(net: nn.Module, classes: list[str], export_format: str, path: str | Path,
                 opset: int = 18) -> dict:
    """Export ``net`` (a :class:`~wsss.models.deeplab.SegmentationNet`) to ``path`` and check it.

    Args:
        net: the eager network; it is put in eval mode and its BatchNorm folded, in place.
        classes: the class names, stored inside the file (and compared by nothing: they are for users).
        export_format: a key of :data:`wsss.models.EXPORT_FORMATS`.
        opset: the ONNX opset (``onnx`` only).

    Returns:
        ``{"max_abs_diff": {"HxW": float, ...}, "bytes": int, "sha256": str}``: the check and the file written.

    Raises:
        WsssError: ONNX without its packages, or an export whose logits differ from the eager network's.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    model = ImageSegmenter(fuse_conv_batchnorm(net.eval())).eval()
    batches = check_images()
    with torch.no_grad():
        expected = [model(images).numpy() for images in batches]
        if export_format == "onnx":
            data, run = _onnx(model, batches[0], classes, opset)
        else:
            data, run = (_torchscript if export_format == "torchscript" else _pt2)(model, batches[0], classes)
        differences = {}
        for images, reference in zip(batches, expected):
            got = run(images)
            size = "x".join(map(str, images.shape[-2:]))
            if got.shape != reference.shape:
                raise WsssError(f"{path}: the exported model gave logits {list(got.shape)} for a {size} batch of "
                                f"{images.shape[0]}, expected {list(reference.shape)}; nothing written")
            difference = float(np.abs(got - reference).max())
            if not difference <= TOLERANCE * max(1.0, float(np.abs(reference).max())):
                raise WsssError(f"{path}: the exported model's logits differ from the checkpoint's by {difference:.3g} "
                                f"on a {size} image; nothing written")
            differences[size] = difference
    with artifacts.atomic_write(path) as handle:
        handle.write(data)
    return {"max_abs_diff": differences, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
