"""The Python API, for notebooks and scripts: ``wsss.load_model``, ``wsss.read_cam``, ``wsss.evaluate``.

``import wsss`` stays light; these are imported from here on first use (``wsss.__getattr__``).
:meth:`Segmenter.predict` computes what ``wsss predict`` writes for an image, with the same
defaults (they are read from :class:`wsss.stages.predict.PredictConfig`, their one owner).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from wsss import artifacts
from wsss.crf import CrfParams
from wsss.settings import field_default


def _predict_default(name: str):
    from wsss.stages.predict import PredictConfig

    return field_default({field.name: field for field in dataclasses.fields(PredictConfig)}[name])


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

    def probabilities(self, image: np.ndarray | str | Path, scales: Sequence[float] | None = None,
                      flip: bool | None = None, max_side: int | None | str = "default") -> np.ndarray:
        """Class probabilities float32 [C, H, W] of an image (an RGB uint8 array or a file path).

        ``scales``, ``flip`` and ``max_side`` default to ``wsss predict``'s (``--scales``, ``--flip``,
        ``--max-side``; ``max_side=None`` never scales an image down).
        """
        from wsss.segmentation import predict_probs

        return predict_probs(self.net, _as_rgb(image), **self._views(scales, flip, max_side), device=self.device)

    def predict(self, image: np.ndarray | str | Path, scales: Sequence[float] | None = None,
                flip: bool | None = None, crf: bool | CrfParams = False,
                max_side: int | None | str = "default") -> np.ndarray:
        """Label map uint8 [H, W] of an image: class indices into :attr:`classes`.

        ``crf=True`` refines it with ``wsss predict --crf``'s dense CRF, or pass a
        :class:`~wsss.crf.CrfParams`; the other arguments are those of :meth:`probabilities`.
        """
        from wsss.segmentation import predict_label

        params = crf if isinstance(crf, CrfParams) else (_predict_default("crf_params") if crf else None)
        return predict_label(self.net, _as_rgb(image), **self._views(scales, flip, max_side), crf=params,
                             device=self.device)

    def _views(self, scales, flip, max_side) -> dict:
        return {"scales": tuple(_predict_default("scales") if scales is None else scales),
                "flip": _predict_default("flip") if flip is None else flip,
                "max_side": _predict_default("max_side") if max_side == "default" else max_side}


def load_model(checkpoint: str | Path, device: str = "auto") -> Segmenter:
    """Load a ``wsss train-seg`` checkpoint (a ``.pth`` file, or its output folder: ``best.pth``, else
    ``last.pth``) for inference on ``device`` (``auto``, ``cpu`` or ``cuda``)."""
    from wsss.device import resolve_device
    from wsss.models.backbones import prepare_for_inference
    from wsss.models.deeplab import model_from_checkpoint
    from wsss.stages.predict import checkpoint_classes

    checkpoint_file = artifacts.resolve_checkpoint(checkpoint)
    state = artifacts.load_checkpoint(checkpoint_file)
    torch_device = resolve_device(device)
    net = prepare_for_inference(model_from_checkpoint(state, str(checkpoint_file)).to(torch_device))
    return Segmenter(net, checkpoint_classes(state, checkpoint_file), checkpoint_file, torch_device)


def read_cam(path: str | Path, allow_pickle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A CAM file of ``wsss make-cam``: ``(keys int64 [K], cams float32 [K, H, W])``.

    ``keys`` are the class indices (>= 1) of the image's classes, ``cams`` their maps in [0, 1].
    IRN-style pickled ``.npy`` files open only with ``allow_pickle=True`` (unpickling runs code).
    """
    return artifacts.read_cam(path, allow_pickle=allow_pickle)


def evaluate(pred_dir: str | Path, root: str | Path, split: str = "val", dataset: str | None = None,
             workers: int | None = 1) -> dict:
    """Score the label maps ``<pred_dir>/<id>.png`` against a prepared dataset's masks (``wsss eval --pred``).

    Returns:
        ``{"miou", "pixel_accuracy", "coverage", "num_pixels", "per_class": {name: {"iou", "precision",
        "recall"}}}``; values in [0, 1] (None where a class is absent).
    """
    from wsss.datasets.prepared import PreparedDataset
    from wsss.evaluation import evaluate_labels

    prepared = PreparedDataset.load(root, dataset)
    matrix = evaluate_labels(prepared, split, pred_dir, workers=workers, progress=False)
    return matrix.summary(prepared.classes)
