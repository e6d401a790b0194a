"""Batched inference over a split: images bucketed by size, decoded in workers, results written in the background.

The per-image stages (make-cam, predict, and the validation of the training stages) run
several images per forward pass.  Images of one batch must share a size (padding would change
what the network sees near the border, and with it the CAMs and the global-average-pooled
scores), so :func:`size_batches` reads every image's size from its file header and groups equal
sizes into batches of at most ``batch_size``; VOC's images come in a handful of sizes.

DataLoader workers decode the images (uint8, 4x less to copy than float32; pinned memory on
CUDA; on the CPU only on cores that torch's threads leave free); :func:`to_model_input`
normalises them on the device.  Results are brought to the host once per batch in their final
small dtype (uint8 labels, float16 CAMs), and :class:`BackgroundWriter` writes the files on a
thread while the device computes the next batch.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.device import (DistInfo, inference_loader_workers, loader_worker_init, shard, stop_loader_workers,
                         sum_array_over_ranks)
from wsss.errors import WsssError
from wsss.models.backbones import prepare_for_inference
from wsss.models.classifier import CamNet, load_classifier
from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD

# EXIF orientations that swap width and height (OpenCV applies the orientation when decoding)
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(H, W) of an image as decoded, from its header only; None when the header is unreadable."""
    try:
        with artifacts.open_image_file(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112) if hasattr(image, "getexif") else None
    except (OSError, ValueError, SyntaxError):
        return None
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def size_batches(sizes: Sequence[tuple[int, int] | None], batch_size: int) -> list[list[int]]:
    """Group positions of equal size into batches of at most ``batch_size``.

    Batches come in the order of their first image; unknown sizes (None) get a batch each.

    Returns:
        list of lists of positions into ``sizes``.
    """
    groups: dict = {}
    for position, size in enumerate(sizes):
        groups.setdefault(size if size is not None else ("unknown", position), []).append(position)
    batches = []
    for members in groups.values():
        batches += [members[start:start + batch_size] for start in range(0, len(members), batch_size)]
    return sorted(batches, key=lambda batch: batch[0])


class _SplitImages(Dataset):
    """Item ``(position, image uint8 [H, W, 3], mask uint8 [H, W] or None)``."""

    def __init__(self, dataset: PreparedDataset, split: str, ids: Sequence[str], masks: bool):
        self.dataset, self.split, self.ids, self.masks = dataset, split, list(ids), masks

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int):
        image = self.dataset.read_image(self.split, self.ids[position])
        mask = self.dataset.read_mask(self.split, self.ids[position], image.shape[:2]) if self.masks else None
        return position, image, mask


class _FileImages(Dataset):
    """Item ``(position, image uint8 [H, W, 3], None)`` of a list of image files."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        return position, artifacts.read_image(self.paths[position]), None


def _collate(items: list) -> list[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Stack the items of a batch, split by decoded size (a header can disagree with the pixels)."""
    groups: dict = {}
    for position, image, mask in items:
        groups.setdefault(image.shape, []).append((position, image, mask))
    out = []
    for members in groups.values():
        positions = [member[0] for member in members]
        images = torch.from_numpy(np.stack([member[1] for member in members]))
        masks = None if members[0][2] is None else torch.from_numpy(np.stack([member[2] for member in members]))
        out.append((positions, images, masks))
    return out


def _sized_batches(items: Dataset, ids: list[str], paths: Sequence[Path], *, batch_size: int, workers: int,
                   device: torch.device) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor | None]]:
    """Batches of ``items`` (one size each, sizes read from ``paths``' headers) on ``device``."""
    workers = inference_loader_workers(workers, device)
    sizes = [header_size(path) for path in paths]
    loader = DataLoader(items, batch_sampler=size_batches(sizes, batch_size), collate_fn=_collate,
                        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init)
    batches = iter(loader)
    try:
        for groups in batches:
            for positions, images, mask_batch in groups:
                images = images.to(device, non_blocking=True)
                mask_batch = None if mask_batch is None else mask_batch.to(device, non_blocking=True)
                yield [ids[position] for position in positions], images, mask_batch
    finally:
        stop_loader_workers(batches)


def split_batches(dataset: PreparedDataset, split: str, ids: Sequence[str], *, batch_size: int, workers: int,
                  device: torch.device, masks: bool = False
                  ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor | None]]:
    """Yield ``(ids, images uint8 [B, H, W, 3], masks uint8 [B, H, W] or None)`` on ``device``.

    Every batch holds images of one size, at most ``batch_size`` of them (see :func:`size_batches`).
    ``workers`` DataLoader workers decode them, fewer on the CPU (:func:`inference_loader_workers`).
    """
    ids = list(ids)
    paths = [dataset.image_path(split, image_id) for image_id in ids]
    return _sized_batches(_SplitImages(dataset, split, ids, masks), ids, paths, batch_size=batch_size,
                          workers=workers, device=device)


def file_batches(files: dict[str, Path], *, batch_size: int, workers: int, device: torch.device
                 ) -> Iterator[tuple[list[str], torch.Tensor, None]]:
    """:func:`split_batches` for image files outside a dataset: ``files`` maps an id to its file."""
    ids = list(files)
    paths = [files[image_id] for image_id in ids]
    return _sized_batches(_FileImages(paths), ids, paths, batch_size=batch_size, workers=workers, device=device)


def to_model_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB -> float32 [B, 3, H, W] standardised with the ImageNet mean and std (on their device)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    batch = (images.permute(0, 3, 1, 2).float().div_(255.0) - mean) / std
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch.contiguous()


class BackgroundWriter:
    """Runs file writes in the background; a failed write is raised at the next submit or at exit.

    ``processes`` 0 (default): one thread, for plain writes (the encoders release the GIL).
    ``processes`` N: N worker processes (:func:`wsss.parallel.process_executor`) for CPU-bound work
    per image before its write, such as predict's dense CRF; functions and arguments must then be
    picklable.  Use as a context manager: leaving it waits for every pending write.
    """

    def __init__(self, pending_limit: int = 16, processes: int = 0):
        if processes > 0:
            from wsss.parallel import process_executor

            self._executor = process_executor(processes)
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsss-writer")
        self._pending: list[concurrent.futures.Future] = []
        self._limit = max(pending_limit, 2 * processes)

    def submit(self, function: Callable, *args) -> None:
        """Queue ``function(*args)``; blocks while more than ``pending_limit`` writes wait (bounded memory)."""
        self._pending.append(self._executor.submit(function, *args))
        while len(self._pending) > self._limit:
            self._pending.pop(0).result()
        done = [future for future in self._pending if future.done()]
        for future in done:
            self._pending.remove(future)
            future.result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self._pending:
                if exc[0] is None:
                    future.result()
                else:
                    future.cancel()
        finally:
            self._executor.shutdown(wait=True)


@torch.no_grad()
def validate_classifier(model, dataset: PreparedDataset, split: str, device: torch.device, info: DistInfo, *,
                        precision=None, cam_images: int = 100, cam_threshold: float = 0.15, workers: int = 0) -> dict:
    """Multi-label mAP on a split and, if it has masks, single-scale CAM mIoU on its first images.

    The per-epoch validation of ``wsss train-cls``.  Every process scores its share of the images;
    scores and confusion counts are summed over processes, so the result does not depend on how
    many there are.  ``precision``: a :class:`wsss.training.Precision` (default float32).

    Returns:
        ``{"val_map", "val_ap" (per class name), "val_cam_miou" (None without masks)}``.
    """
    from wsss.cam import max_normalize, multiscale_cam
    from wsss.evaluation import cam_to_label_tensor
    from wsss.metrics import ConfusionMatrix, average_precision, confusion_counts, mean_average_precision

    from wsss.training import Precision

    precision = precision or Precision()
    model.eval()
    ids = dataset.ids(split)
    position = {image_id: index for index, image_id in enumerate(ids)}
    with_masks = dataset.has_masks(split) and cam_images > 0
    scores = np.zeros((len(ids), dataset.num_classes - 1))
    counts = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=device)
    for batch_ids, images, masks in split_batches(dataset, split, shard(ids, info), batch_size=8, workers=workers,
                                                  device=device, masks=with_masks):
        channels = [[label - 1 for label in dataset.image_labels(image_id)] for image_id in batch_ids]
        with precision.autocast(device):
            cams, logits = multiscale_cam(model, to_model_input(images), channels, scales=(1.0,), flip=False)
        for index, image_id in enumerate(batch_ids):
            if with_masks and position[image_id] < cam_images:
                keys = torch.tensor(channels[index], device=device) + 1
                label = cam_to_label_tensor(keys, max_normalize(cams[index]), cam_threshold)
                counts += confusion_counts(masks[index], label, dataset.num_classes)
        scores[[position[image_id] for image_id in batch_ids]] = logits.float().cpu().numpy()
    scores = sum_array_over_ranks(scores, info, device)
    matrix = ConfusionMatrix(dataset.num_classes).add_counts(sum_array_over_ranks(counts.cpu().numpy(), info, device))
    targets = np.stack([dataset.multi_hot(image_id) for image_id in ids]) if ids else np.zeros((0, scores.shape[1]))
    ap = average_precision(scores, targets) if ids else np.array([])
    names = dataset.classes[1:]
    return {
        "val_map": mean_average_precision(scores, targets) if ids else None,
        "val_ap": {names[k]: round(float(ap[k]), 6) for k in range(len(ap)) if np.isfinite(ap[k])},
        "val_cam_miou": matrix.miou() if with_masks else None,
    }


def load_cam_network(checkpoint_file: Path, dataset: PreparedDataset, device: torch.device,
                     compile_model: bool = False) -> tuple[CamNet, dict]:
    """The classifier of a train-cls checkpoint, ready for CAM inference on ``device``.

    Args:
        checkpoint_file: a ``.pth`` file of ``wsss train-cls`` (resolved, not a folder).
        dataset: the dataset whose images it will see; its classes must be the checkpoint's.
        device: where the network runs.
        compile_model: ``torch.compile`` the class-map branch, which is what every view runs.

    Returns:
        ``(model, checkpoint)``: the :class:`~wsss.models.classifier.CamNet` in eval mode with
        BatchNorm folded and channels-last weights, and the loaded checkpoint dict.

    Raises:
        WsssError: the file is no train-cls checkpoint, or it was trained on other classes than ``dataset`` has.
    """
    from wsss.training import maybe_compile

    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    if list(checkpoint.get("classes", [])) != list(dataset.classes):
        raise WsssError(f"{checkpoint_file}: the classifier was trained on classes {checkpoint.get('classes')}, "
                        f"but {dataset.root} has {dataset.classes}")
    # the network converts its inputs to channels-last itself
    model = prepare_for_inference(load_classifier(checkpoint, str(checkpoint_file)).to(device))
    if compile_model:
        model.class_maps = maybe_compile(model.class_maps, True)
    return model, checkpoint
