"""The Python API, for notebooks and scripts: ``wsss.load_model``, ``wsss.read_image``, ``wsss.read_cam``,
``wsss.evaluate``.

``import wsss`` stays light; these are imported from here on first use (``wsss.__getattr__``).
:meth:`Segmenter.predict` computes what ``wsss predict`` writes for an image, with the same
defaults (:mod:`wsss.seg_choices`, :data:`wsss.crf.POSTPROCESS_CRF`), in float32: on the CPU the
same label maps, on a GPU up to the rounding of ``wsss predict``'s default ``--amp``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from wsss import artifacts
from wsss.crf import POSTPROCESS_CRF, CrfParams
from wsss.device import DEVICES
from wsss.seg_choices import MAX_SIDE, PREDICT_FLIP, PREDICT_SCALES


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3], decoded as every stage decodes it (OpenCV: EXIF orientation
    applied, gray and 16-bit images made 8-bit RGB, alpha dropped)."""
    return artifacts.read_image(path)


def _as_rgb(image: np.ndarray | str | Path) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from a file path, or from a uint8 RGB, RGBA or grayscale array."""
    if isinstance(image, (str, Path)):
        return artifacts.read_image(image)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (values 0-255), got dtype {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"expected an image [H, W, 3] (RGB), [H, W, 4] (RGBA) or [H, W] (gray), got {image.shape}")


class Segmenter:
    """A trained segmentation network ready to segment images (see :func:`load_model`).

    Attributes:
        classes: the class names, in the order of the label values (0 = background).
        checkpoint: the checkpoint file it was loaded from.
        device: the ``torch.device`` it runs on.
    """

    def __init__(self, net, classes: list[str], checkpoint: Path, device):
        self.net, self.classes, self.checkpoint, self.device = net, classes, checkpoint, device

    def __repr__(self) -> str:
        return f"Segmenter({str(self.checkpoint)!r}, {len(self.classes)} classes, {self.device})"

    def probabilities(self, image: np.ndarray | str | Path, scales: Sequence[float] = PREDICT_SCALES,
                      flip: bool = PREDICT_FLIP, max_side: int | None = MAX_SIDE) -> np.ndarray:
        """Class probabilities float32 [C, H, W] of an image (an RGB uint8 array or a file path).

        The defaults are ``wsss predict``'s (``--scales``, ``--flip``, ``--max-side``; ``max_side=None``
        never scales an image down).
        """
        from wsss.segmentation import predict_probs

        return predict_probs(self.net, _as_rgb(image), tuple(scales), flip, device=self.device,
                             max_side=_max_side(max_side))

    def predict(self, image: np.ndarray | str | Path, scales: Sequence[float] = PREDICT_SCALES,
                flip: bool = PREDICT_FLIP, crf: bool | CrfParams = False, max_side: int | None = MAX_SIDE
                ) -> np.ndarray:
        """Label map uint8 [H, W] of an image: class indices into :attr:`classes`.

        ``crf=True`` refines it with ``wsss predict --crf``'s dense CRF (or pass a
        :class:`~wsss.crf.CrfParams`); the other arguments are those of :meth:`probabilities`.
        """
        from wsss.segmentation import predict_label

        params = crf if isinstance(crf, CrfParams) else (POSTPROCESS_CRF if crf else None)
        return predict_label(self.net, _as_rgb(image), tuple(scales), flip, crf=params, device=self.device,
                             max_side=_max_side(max_side))


def _max_side(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 16):
        raise ValueError(f"max_side must be None or an integer of at least 16 pixels, got {value!r}")
    return value


def load_model(checkpoint: str | Path, device="auto") -> Segmenter:
    """Load a ``wsss train-seg`` checkpoint (a ``.pth`` file, or its output folder: ``best.pth``, else
    ``last.pth``) for inference on ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, or a
    ``torch.device`` / name such as ``cuda:1``."""
    import torch

    from wsss.device import resolve_device
    from wsss.models.backbones import prepare_for_inference
    from wsss.models.deeplab import checkpoint_classes, model_from_checkpoint

    checkpoint_file = artifacts.resolve_checkpoint(checkpoint)
    state = artifacts.load_checkpoint(checkpoint_file)
    torch_device = resolve_device(device) if device in DEVICES else torch.device(device)
    net = prepare_for_inference(model_from_checkpoint(state, str(checkpoint_file)).to(torch_device))
    return Segmenter(net, checkpoint_classes(state, str(checkpoint_file)), checkpoint_file, torch_device)


def read_cam(path: str | Path, allow_pickle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A CAM file of ``wsss make-cam``: ``(keys int64 [K], cams float32 [K, H, W])``.

    ``keys`` are the class indices (>= 1) of the image's classes, ``cams`` their maps in [0, 1].
    IRN-style pickled ``.npy`` files open only with ``allow_pickle=True`` (unpickling runs code).
    """
    return artifacts.read_cam(path, allow_pickle=allow_pickle)


def evaluate(pred_dir: str | Path, root: str | Path, split: str, dataset: str | None = None,
             workers: int | None = None) -> dict:
    """Score the label maps ``<pred_dir>/<id>.png`` of a split against a prepared dataset's masks, as
    ``wsss eval --pred`` does (``workers``: processes, None = all cores).

    Returns:
        ``{"miou", "pixel_accuracy", "coverage", "num_pixels", "per_class": {name: {"iou", "precision",
        "recall"}}}``; values in [0, 1] (None where a class is absent).
    """
    from wsss.datasets.prepared import PreparedDataset
    from wsss.evaluation import evaluate_labels

    prepared = PreparedDataset.load(root, dataset)
    matrix = evaluate_labels(prepared, split, pred_dir, workers=workers, progress=False)
    return matrix.summary(prepared.classes)
