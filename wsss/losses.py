"""Losses of the CAM network: multi-label soft margin, equivariance regularisation, adversarial erasing.

:class:`CamObjective` bundles them into one module whose ``forward`` runs every
pass of a training step (image, rescaled view, erased image).  Wrapping that
module (not the bare network) in DistributedDataParallel keeps one DDP forward
per backward even though the network runs up to three times.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam import feature_to_image, resample
from wsss.cam_choices import ER_TARGETS, ERASE_CLASSES, ERASE_FILLS, ERASE_STOP, ERASE_THRESH, SHOWN_SCORE


def multilabel_soft_margin_loss(logits: torch.Tensor, targets: torch.Tensor,
                                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images and classes of the binary logistic loss.

    ``-[y log sigmoid(x) + (1 - y) log sigmoid(-x)]``, the same as
    :func:`torch.nn.functional.multilabel_soft_margin_loss`.

    Args:
        logits: float [B, K].
        targets: float [B, K] of 0/1.
        weight: optional [B, K] factor of each term (0 leaves a term out); the mean stays over all B x K.

    Returns:
        scalar tensor.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    loss = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
    return (loss if weight is None else loss * weight).mean()


def shown_classes_loss(logits: torch.Tensor, targets: torch.Tensor, stop: float,
                       reference: torch.Tensor) -> torch.Tensor:
    """:func:`multilabel_soft_margin_loss` of changed images (erased, or an equivariance view), without the
    present classes whose evidence the change removed.

    Adversarial erasing's stopping rule (Wei et al., CVPR 2017): a class that the classifier recognised in
    the image (``sigmoid`` of its ``reference`` logit >= ``stop``) but no longer recognises in the changed
    image (< ``stop``) had its evidence in the removed pixels, and what remains has none; asking the
    classifier to find the class there anyway teaches it to call the class's look-alikes (a body without
    its part) by the class.  A view rescaled too small to show a small part is the same case.  Such
    (image, class) terms count as 0.  A class not yet recognised in the image (early in training) keeps its
    term, as do absent classes.  Scores are not differentiated.  The mean is over all B x K terms, as
    without the rule; ``stop`` 0 keeps every term.

    Args:
        logits: float [B, K] of the changed images; targets: float [B, K] of 0/1; stop: in [0, 1];
        reference: float [B, K], the logits of the unchanged images.
    """
    if stop <= 0:
        return multilabel_soft_margin_loss(logits, targets)
    removed = (torch.sigmoid(reference.detach()) >= stop) & (torch.sigmoid(logits.detach()) < stop)
    return multilabel_soft_margin_loss(logits, targets, weight=~(removed & (targets > 0)))


# --------------------------------------------------------------------------- equivariance (SEAM)

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the original image


def sample_view(image_size: tuple[int, int], scale_range: tuple[float, float], min_crop: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[Box, tuple[int, int], bool]:
    """Draw the random transform A of the equivariance loss.

    A crops a window whose sides are a fraction ``c ~ U[min_crop, 1]`` of the image's
    (``min_crop = 1``: the whole image, SEAM's rescale-only view) at a uniformly random
    place, rescales it by ``s ~ U[scale_range]`` and mirrors it with probability 1/2.
    The draws come from ``generator`` (default: torch's global generator, which the
    training engine seeds every step).

    Returns:
        ``(box, size, flip)``: the window (top, left, height, width), the view size
        (H_view, W_view) and the mirror flag.
    """
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    height, width = image_size
    crop = uniform(min_crop, 1.0) if min_crop < 1.0 else 1.0
    box_h, box_w = max(1, round(height * crop)), max(1, round(width * crop))
    top = int(torch.randint(0, height - box_h + 1, (), generator=generator)) if box_h < height else 0
    left = int(torch.randint(0, width - box_w + 1, (), generator=generator)) if box_w < width else 0
    scale = uniform(*scale_range)
    size = (max(1, round(box_h * scale)), max(1, round(box_w * scale)))
    return (top, left, box_h, box_w), size, uniform(0.0, 1.0) < 0.5


def rescale_flip_images(images: torch.Tensor, size: tuple[int, int], flip: bool,
                        box: Box | None = None) -> torch.Tensor:
    """A(I): crop [B, 3, H, W] to ``box`` (default: whole image), resize to ``size`` (bilinear), mirror if ``flip``."""
    if box is not None:
        top, left, box_h, box_w = box
        images = images[..., top:top + box_h, left:left + box_w]
    out = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return out.flip(-1) if flip else out


def _view_grid(image_size: tuple[int, int], size: tuple[int, int], flip: bool, stride: int,
               box: Box | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(step, offset)`` per axis: view cell ``j`` sits at original feature coordinate ``offset + step * j``.

    View feature cell ``j`` is centred on view pixel ``stride * j``, i.e. (through the bilinear resize
    of the window) on original pixel ``top + (stride * j + 0.5) * H_box / H_view - 0.5``, i.e. on
    original feature coordinate ``/ stride``; for a flipped view the column is mirrored first.
    """
    top, left, box_h, box_w = box if box is not None else (0, 0, *image_size)
    view_h, view_w = size
    step_y, step_x = box_h / view_h, box_w / view_w
    offset_y = (top + 0.5 * box_h / view_h - 0.5) / stride
    offset_x = (left + 0.5 * box_w / view_w - 0.5) / stride
    if flip:
        # view column c is unflipped column W_view - 1 - c
        offset_x = (left + (view_w - 0.5) * box_w / view_w - 0.5) / stride
        step_x = -step_x
    return (step_y, step_x), (offset_y, offset_x)


def rescale_flip_maps(maps: torch.Tensor, image_size: tuple[int, int], size: tuple[int, int],
                      out_maps_size: tuple[int, int], flip: bool, stride: int = 16,
                      box: Box | None = None) -> torch.Tensor:
    """A(CAM): map feature-resolution CAMs of the image onto the feature grid of the view (see :func:`_view_grid`).

    Args:
        maps: float [B, K, h, w], CAMs of the original image of ``image_size``.
        image_size: (H, W) of the original input.
        size: (H_view, W_view) of the view.
        out_maps_size: (h_view, w_view), the view's feature map size.
        flip: whether the view is mirrored.
        box: the window (top, left, height, width) the view was cut from (default: the whole image).

    Returns:
        float [B, K, h_view, w_view].  View cells beyond the original's outermost cell centres read
        the clamped border value (see :func:`view_cells_inside`).
    """
    step, offset = _view_grid(image_size, size, flip, stride, box)
    return resample(maps, out_maps_size, step, offset)


def view_cells_inside(maps_size: tuple[int, int], image_size: tuple[int, int], size: tuple[int, int],
                      out_maps_size: tuple[int, int], flip: bool, stride: int = 16,
                      box: Box | None = None) -> torch.Tensor:
    """bool [h_view, w_view]: the view cells whose A(CAM) is an interpolation of the image's cells.

    The image's feature cells are centred on pixels ``0, s, 2s, ...``, so the last one lies up to
    ``s - 1`` pixels inside the image border; a view cell that maps beyond it would compare the view
    with a clamped (extrapolated) copy of the border cell.  On the few-cell CAMs of small crops those
    cells are a large share of the map, and comparing them penalises every map with structure near
    the border -- a pull towards maps that are flat there (or everywhere).
    """
    step, offset = _view_grid(image_size, size, flip, stride, box)
    inside = []
    for axis in range(2):
        coords = offset[axis] + step[axis] * torch.arange(out_maps_size[axis], dtype=torch.float64)
        inside.append((coords >= -1e-6) & (coords <= maps_size[axis] - 1 + 1e-6))
    return inside[0][:, None] & inside[1][None, :]


def min_max_normalize(maps: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(m - min) / (max - min)`` per map, min and max over the cells where ``weight`` is 1 (SEAM's norm).

    Unlike division by the maximum, it removes a constant offset: a map of ``c + small bump`` keeps
    its bump, and a flat map becomes 0.  With division by the maximum the equivariance loss prices a
    large offset at almost nothing (every cell near 1 agrees with every other), and a network can
    lower it by lighting up the whole image.

    Args:
        maps: float [B, K, h, w]; weight: float [h, w] of 0/1.

    Returns:
        float [B, K, h, w] in [0, 1] on the weighted cells.
    """
    inside = weight.bool()
    high = maps.masked_fill(~inside, float("-inf")).amax(dim=(2, 3), keepdim=True)
    low = maps.masked_fill(~inside, float("inf")).amin(dim=(2, 3), keepdim=True)
    return (maps - low).clamp_min(0.0) / (high - low).clamp_min(eps)


def equivariance_loss(maps: torch.Tensor, view_maps: torch.Tensor, present: torch.Tensor,
                      transform: Callable[[torch.Tensor], torch.Tensor],
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """SEAM's equivariance regularisation: mean |CAM(A(I)) - A(CAM(I))| over present classes.

    Both sides are ReLU'd and min-max normalised per class (:func:`min_max_normalize`, SEAM's
    normalisation) over the compared cells of the view's grid, so the loss compares shapes, not
    magnitudes or offsets, and is exactly 0 for an equivariant network (SEAM normalises before
    applying A, where rescaling can move the maximum and leave a residue even then).  Gradients
    flow into both branches; the caller detaches ``maps`` to make the image's CAMs the target.

    Args:
        maps: float [B, K, h, w], raw class maps of the images.
        view_maps: float [B, K, h', w'], raw class maps of the transformed images A(I).
        present: float or bool [B, K], 1 for the classes in each image.
        transform: A on maps, [B, K, h, w] -> [B, K, h', w'].
        valid: optional bool [h', w'], the view cells to compare (:func:`view_cells_inside`); the
            others are left out of the mean.

    Returns:
        scalar tensor: the mean absolute difference over the pixels of present class maps (0 if none).
    """
    target, prediction = transform(torch.relu(maps)), torch.relu(view_maps)
    if target.shape != prediction.shape:
        raise ValueError(f"A(CAM) has shape {tuple(target.shape)} but CAM(A(I)) {tuple(prediction.shape)}")
    weight = torch.ones(prediction.shape[-2:], dtype=prediction.dtype, device=prediction.device) if valid is None \
        else valid.to(device=prediction.device, dtype=prediction.dtype)
    target, prediction = min_max_normalize(target, weight), min_max_normalize(prediction, weight)
    per_map = ((prediction - target).abs() * weight).sum(dim=(2, 3)) / weight.sum().clamp_min(1.0)  # [B, K]
    present = present.to(per_map.dtype)
    return (per_map * present).sum() / present.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- adversarial erasing

def erase_mask(maps: torch.Tensor, present: torch.Tensor, image_size: tuple[int, int], erase_thresh: float,
               stride: int = 16) -> torch.Tensor:
    """Pixels to erase: where the CAM of any present class is ``>= erase_thresh * its maximum``.

    Args:
        maps: float [B, K, h, w] raw class maps (feature resolution; at ``image_size`` they are used as is).
        present: float or bool [B, K].
        image_size: (H, W) of the input images.
        erase_thresh: fraction of each class map's maximum.

    Returns:
        bool [B, H, W].
    """
    maps = torch.relu(maps.detach())
    if tuple(maps.shape[-2:]) != tuple(image_size):
        maps = feature_to_image(maps, image_size, stride=stride)
    peak = maps.amax(dim=(2, 3), keepdim=True)
    # A map that is 0 everywhere has no discriminative region to erase.
    hot = (maps >= erase_thresh * peak) & (peak > 0)
    return (hot & present.bool()[:, :, None, None]).any(dim=1)


def blur_fill(images: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A heavily blurred copy of normalised images [B, 3, H, W]: area-downsampled by ``factor``, then
    bilinearly upsampled.  Erasing with it removes the shape details (ears, wheels) but keeps the
    colours around, so the erased region does not become a sharp-edged flat patch that the classifier
    could learn as a cue (which erasing with the mean colour invites)."""
    height, width = images.shape[-2:]
    small = F.adaptive_avg_pool2d(images, (max(1, height // factor), max(1, width // factor)))
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def one_class_each(present: torch.Tensor) -> torch.Tensor:
    """Keep one present class per image, drawn uniformly from torch's generator: float [B, K] 0/1."""
    scores = torch.rand(present.shape, device=present.device) * present.float()
    chosen = torch.zeros_like(present, dtype=torch.float32)
    chosen.scatter_(1, scores.argmax(1, keepdim=True), 1.0)
    return chosen * present.float()


# --------------------------------------------------------------------------- the training objective


class CamObjective(nn.Module):
    """One training step's losses for the CAM network.

    ``total = cls + s * (er_weight * er + erase_weight * erase)`` where ``s`` in [0, 1] is the
    ramp factor the caller passes for the step (regularisers start once the classifier has
    learned something) and

    * ``cls``: multi-label soft margin of the images (and, with ``er_view_cls``, the mean of that
      of the images and of their equivariance views, as SEAM classifies both branches; of a view, not
      the classes recognised in the image but not in the view, :func:`shown_classes_loss` with
      ``er_view_stop``: a view scaled down until a small part is a few pixels no longer shows a class
      told by that part);
    * ``er``: :func:`equivariance_loss` between the CAMs of a random view (:func:`sample_view`:
      window of ``er_min_crop``..1 of each side, scale from ``er_scale_range``, random mirror) and
      the equally transformed CAMs of the image.  With ``er_target="detached"`` the image's CAMs
      are the target and get no gradient from this term: the view learns to agree with the image,
      and the two cannot agree by both collapsing to a map that is trivially equivariant (a
      constant one costs exactly 0); ``"both"`` lets the gradient into both branches (SEAM);
    * ``erase``: multi-label soft margin of the images with the discriminative regions (CAM
      ``>= erase_thresh`` times its maximum) of every present class (``erase_classes="all"``) or of
      one random present class per image (``"one"``) erased -- filled with the mean colour or a
      blurred copy of the image (``erase_fill``) -- with the classification target kept, except for
      the classes recognised in the image but not in the erased image (:func:`shown_classes_loss`
      with ``erase_stop``).

    Args:
        model: a :class:`~wsss.models.classifier.CamNet`.
    """

    def __init__(self, model: nn.Module, *, er_weight: float = 0.0, er_scale_range: tuple[float, float] = (0.3, 0.7),
                 er_min_crop: float = 1.0, er_target: str = "detached", er_view_cls: bool = True,
                 er_view_stop: float = SHOWN_SCORE, erase_weight: float = 0.0, erase_thresh: float = ERASE_THRESH,
                 erase_fill: str = "blur", erase_classes: str = "all", erase_stop: float = ERASE_STOP):
        super().__init__()
        if er_target not in ER_TARGETS or erase_fill not in ERASE_FILLS or erase_classes not in ERASE_CLASSES:
            raise ValueError(f"er_target in {ER_TARGETS}, erase_fill in {ERASE_FILLS}, erase_classes in "
                             f"{ERASE_CLASSES}; got {er_target!r}, {erase_fill!r}, {erase_classes!r}")
        self.model = model
        self.er_weight, self.er_scale_range, self.er_min_crop = er_weight, tuple(er_scale_range), er_min_crop
        self.er_target, self.er_view_cls, self.er_view_stop = er_target, er_view_cls, er_view_stop
        self.erase_weight, self.erase_thresh = erase_weight, erase_thresh
        self.erase_fill, self.erase_classes, self.erase_stop = erase_fill, erase_classes, erase_stop

    def forward(self, images: torch.Tensor, targets: torch.Tensor, ramp: float = 1.0) -> dict[str, torch.Tensor]:
        """Return ``{"total", "cls", "er", "erase"}`` scalar tensors (unused terms are 0).

        Args:
            images: float [B, 3, H, W]; targets: float [B, K] multi-hot.
            ramp: factor in [0, 1] of the regularisers for this step (0 skips their passes).
        """
        logits, maps = self.model(images, return_maps=True)
        cls_loss = multilabel_soft_margin_loss(logits, targets)
        zero = cls_loss.new_zeros(())
        terms = {"cls": cls_loss, "er": zero, "erase": zero}
        image_size = tuple(images.shape[-2:])
        stride = getattr(self.model, "output_stride", 16)
        if self.er_weight > 0 and ramp > 0:
            box, size, flip = sample_view(image_size, self.er_scale_range, self.er_min_crop)
            view_logits, view_maps = self.model(rescale_flip_images(images, size, flip, box), return_maps=True)
            view_grid = tuple(view_maps.shape[-2:])

            def transform(maps_: torch.Tensor) -> torch.Tensor:
                return rescale_flip_maps(maps_, image_size, size, view_grid, flip, stride, box)

            source = maps.detach() if self.er_target == "detached" else maps
            valid = view_cells_inside(tuple(maps.shape[-2:]), image_size, size, view_grid, flip, stride,
                                      box).to(maps.device)
            terms["er"] = equivariance_loss(source, view_maps, targets, transform, valid)
            if self.er_view_cls and box == (0, 0, *image_size):  # a cropped window may have lost a class
                cls_loss = 0.5 * (cls_loss + shown_classes_loss(view_logits, targets, self.er_view_stop,
                                                                     logits))
                terms["cls"] = cls_loss
        if self.erase_weight > 0 and ramp > 0:
            erased_classes = targets if self.erase_classes == "all" else one_class_each(targets)
            mask = erase_mask(maps, erased_classes, image_size, self.erase_thresh, stride)
            fill = blur_fill(images) if self.erase_fill == "blur" else torch.zeros_like(images)
            erased = torch.where(mask[:, None], fill, images)
            terms["erase"] = shown_classes_loss(self.model(erased), targets, self.erase_stop, logits)
        terms["total"] = cls_loss + ramp * (self.er_weight * terms["er"] + self.erase_weight * terms["erase"])
        return terms


def regulariser_ramp(step: int, total: int, start: float, length: float) -> float:
    """The factor of the regularisers at ``step`` of ``total``: 0 before ``start`` (a fraction of the
    schedule), rising linearly to 1 over the next ``length``; always 1 when both are 0."""
    if total <= 0:
        return 1.0
    progress = step / total
    if length <= 0:
        return 1.0 if progress >= start else 0.0
    return float(min(1.0, max(0.0, (progress - start) / length)))
