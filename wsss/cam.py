"""CAM maths: max-normalisation, feature-to-pixel resampling, multi-scale + flip inference, erasing.

Geometry.  A ResNet with output stride ``s`` (16 here) centres feature cell ``i``
on input pixel ``s * i`` (every strided convolution pads by ``kernel // 2``), so
a CAM cell is not a ``s x s`` block starting at ``s * i``.  Pixel ``p`` of the
original image lies at ``q = (p + 0.5) * H_in / H - 0.5`` in an input resized to
``H_in`` rows (bilinear, ``align_corners=False``), i.e. at feature coordinate
``q / s``.  :func:`feature_to_image` samples the CAM exactly there (bilinear,
clamped at the borders), so the views of every scale and of the flipped image
land on the same pixels and the output has the image's exact size, odd sizes
included.  (The common "upsample to the padded size and crop" shifts the map by
about half a cell, and the flipped view in the opposite direction.)
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from wsss.cam_choices import DEFAULT_SCALES, ERASE_STOP, ERASE_THRESH, SHOWN_SCORE

# per image a list of foreground channels, or a function of the logits returning that, or None (all)
ChannelChoice = Union[Sequence[Sequence[int]], Callable[[torch.Tensor], Sequence[Sequence[int]]], None]


def max_normalize(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Divide every map by its own spatial maximum.

    Args:
        cams: float [..., H, W], non-negative (after ReLU).
        eps: floor of the divisor, so an all-zero map stays zero.

    Returns:
        float [..., H, W] in [0, 1]; each map with a maximum above ``eps`` reaches exactly 1.
    """
    peak = cams.amax(dim=(-2, -1), keepdim=True)
    return cams / peak.clamp_min(eps)


def _axis_grid(length: int, step: float, offset: float, source_length: int, device) -> torch.Tensor:
    """Normalised grid_sample coordinates (align_corners=True) of ``offset + step * arange(length)``."""
    coords = torch.arange(length, dtype=torch.float32, device=device) * step + offset
    if source_length == 1:
        return torch.zeros_like(coords)
    return coords * (2.0 / (source_length - 1)) - 1.0


def resample(maps: torch.Tensor, out_size: tuple[int, int], step: tuple[float, float],
             offset: tuple[float, float]) -> torch.Tensor:
    """Sample maps on an axis-aligned affine grid, bilinear, clamped at the borders.

    Output pixel ``(r, c)`` reads the input at cell coordinates
    ``(offset[0] + step[0] * r, offset[1] + step[1] * c)`` (cell centres are integers).
    A negative step mirrors the axis.

    Args:
        maps: float [N, K, h, w].
        out_size: (H, W).
        step, offset: per axis (rows, columns).

    Returns:
        float [N, K, H, W].
    """
    n, _, h, w = maps.shape
    rows = _axis_grid(out_size[0], step[0], offset[0], h, maps.device)
    cols = _axis_grid(out_size[1], step[1], offset[1], w, maps.device)
    grid = torch.stack(torch.broadcast_tensors(cols[None, :], rows[:, None]), dim=-1)  # [H, W, (x, y)]
    return F.grid_sample(maps, grid.expand(n, -1, -1, -1).to(maps.dtype), mode="bilinear",
                         padding_mode="border", align_corners=True)


def feature_to_image(maps: torch.Tensor, image_size: tuple[int, int], input_size: tuple[int, int] | None = None,
                     stride: int = 16, flipped: bool = False) -> torch.Tensor:
    """Bring feature-resolution maps to the original image's pixels.

    Args:
        maps: float [N, K, h, w], computed from an input of ``input_size`` (H_in, W_in).
        image_size: (H, W) of the original image; the output size.
        input_size: size the image was resized to before the forward pass (default: ``image_size``).
        stride: output stride of the network.
        flipped: the input was the horizontally flipped image; the output is flipped back.

    Returns:
        float [N, K, H, W].
    """
    height, width = image_size
    in_h, in_w = input_size or image_size
    # original pixel p -> resized input coordinate (p + 0.5) * in / out - 0.5 -> feature coordinate / stride
    step_y, step_x = in_h / height / stride, in_w / width / stride
    offset_y, offset_x = (0.5 * in_h / height - 0.5) / stride, (0.5 * in_w / width - 0.5) / stride
    if flipped:
        # column c of the original is column W - 1 - c of the flipped image
        offset_x, step_x = offset_x + step_x * (width - 1), -step_x
    return resample(maps, image_size, (step_y, step_x), (offset_y, offset_x))


def resize_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Rescale a batch [B, 3, H, W] by ``scale`` (sides rounded, at least 1 px), bilinear."""
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def multiscale_cam(model, images: torch.Tensor, channels: ChannelChoice = None, *,
                   scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
                   stride: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Multi-scale (+ flip) CAMs at full image resolution, ReLU'd and summed over views.

    Every scale is one forward pass over the whole batch with its horizontal flips
    appended (scales differ in size and are not padded together: padding a 0.5x
    view to the 2x size would cost 16 times its compute).  Only the requested
    channels are resampled to full resolution, all images' maps of a view in one call.
    The maps are summed in float32 also when the network runs under autocast.

    Args:
        model: a :class:`~wsss.models.classifier.CamNet` (``class_maps``, ``pool`` and ``output_stride``), eval mode.
        images: float [B, 3, H, W], normalised, all of one size.
        channels: per image, the foreground channels (0-based, i.e. class index - 1) to return;
            or a function ``logits [B, C - 1] -> channels`` that picks them from the scores
            (e.g. predicted classes); ``None`` returns all ``C - 1``.
        scales: input scale factors.
        flip: add the horizontally flipped image of every scale.
        stride: output stride (default: ``model.output_stride``).

    Returns:
        ``(cams, logits)``: ``cams[b]`` float32 [K_b, H, W] (sums of ReLU'd views, not normalised),
        ``logits`` float32 [B, C - 1] averaged over all views.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    stride = stride or model.output_stride
    batch, image_size = images.shape[0], tuple(images.shape[-2:])
    views = []  # (relu maps [B, C-1, h, w], input size, flipped)
    logits_sum = None
    for scale in scales:
        scaled = resize_images(images, scale)
        inputs = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        maps = model.class_maps(inputs).float()
        logits = model.pool(maps).view(-1, batch, maps.shape[1]).sum(0)
        logits_sum = logits if logits_sum is None else logits_sum + logits
        maps = torch.relu(maps)
        views.append((maps[:batch], tuple(scaled.shape[-2:]), False))
        if flip:
            views.append((maps[batch:], tuple(scaled.shape[-2:]), True))
    logits = logits_sum / (len(scales) * (2 if flip else 1))
    if callable(channels):
        channels = channels(logits)
    if channels is None:
        channels = [range(logits.shape[1])] * batch
    counts = [len(list(chosen)) for chosen in channels]
    image_index = torch.tensor([b for b, chosen in enumerate(channels) for _ in chosen], dtype=torch.long,
                               device=images.device)
    channel_index = torch.tensor([c for chosen in channels for c in chosen], dtype=torch.long, device=images.device)
    if image_index.numel() == 0:
        return [images.new_zeros((0, *image_size), dtype=torch.float32) for _ in range(batch)], logits
    total = None
    for maps, input_size, flipped in views:
        picked = maps[image_index, channel_index][None]  # [1, sum K_b, h, w]
        full = feature_to_image(picked, image_size, input_size, stride, flipped)[0]
        total = full if total is None else total + full
    return list(torch.split(total, counts)), logits


@torch.inference_mode()
def erasing_cams(model, images: torch.Tensor, channels: Sequence[Sequence[int]], *, erase_steps: int = 0,
                 erase_thresh: float = ERASE_THRESH, erase_stop: float = ERASE_STOP,
                 scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
                 first: Sequence[torch.Tensor] | None = None, chunk: int | None = None,
                 shown_counts: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Multi-scale CAMs with inference-time adversarial erasing for a batch, max-normalised.

    Step 0 is the plain multi-scale CAM.  At every further step, for each image and class the
    pixels whose accumulated (max-normalised) CAM is ``>= erase_thresh`` are erased (set to 0,
    the normalised mean colour), the CAM of the erased image is computed again and added to the
    accumulated raw CAM, so regions the classifier uses only once the most discriminative part
    is gone are collected too.

    Adversarial erasing's stopping rule (Wei et al., CVPR 2017), optional: once what remains of an
    image no longer shows a class -- the classifier's score for it on the erased copy (sigmoid of its
    logit, averaged over the views) is below ``erase_stop`` -- that step's map is not added and the
    pair is erased no further.  ``erase_stop`` 0, the default, adds every step: the rule gained
    nothing on partial CAMs and lost on the demo's (``bench/partial_cams.md``).

    Every (image, class) pair gets its own erased copy; the copies of the whole batch share the
    forward passes, ``chunk`` copies at a time (default: all at once).

    Args:
        images: float [B, 3, H, W], normalised, all of one size.
        channels: per image, its foreground channels (0-based), K_b of them.
        erase_steps: number of erasing steps (0 = plain CAM).
        erase_thresh: threshold on the max-normalised accumulated CAM.
        erase_stop: the score in [0, 1] below which a pair's erasing stops.
        first: the already computed raw step-0 CAMs, ``first[b]`` [K_b, H, W] (saves one pass).
        chunk: erased copies per forward pass.
        shown_counts: if given, float [erase_steps, 3] on the images' device; row ``t`` gains ``[pairs
            erased at step t + 1, of them still recognised (score >= SHOWN_SCORE), the sum of their scores]``:
            how often what remains of an object still shows its class, whatever ``erase_stop``.

    Returns:
        per image float [K_b, H, W] in [0, 1].
    """
    channels = [list(chosen) for chosen in channels]
    if first is None:
        first = multiscale_cam(model, images, channels, scales=scales, flip=flip)[0]
    counts = [len(chosen) for chosen in channels]
    accumulated = torch.cat(list(first))  # [P, H, W], P = sum K_b (image, class) pairs
    owner = torch.tensor([b for b, chosen in enumerate(channels) for _ in chosen], dtype=torch.long,
                         device=images.device)
    pair_channels = [c for chosen in channels for c in chosen]
    channel = torch.tensor(pair_channels, dtype=torch.long, device=images.device)
    live = torch.arange(len(channel), device=images.device)  # the pairs still erased
    chunk = max(1, chunk or len(channel))
    for step in range(erase_steps):
        if not len(live):
            break
        live_pairs = [[pair_channels[index]] for index in live.tolist()]  # multiscale_cam takes host lists
        erased = erase_images(images[owner[live]], max_normalize(accumulated[live]) >= erase_thresh)
        maps, scores = [], []
        for start in range(0, len(live), chunk):
            cams, logits = multiscale_cam(model, erased[start:start + chunk], live_pairs[start:start + chunk],
                                          scales=scales, flip=flip)
            maps.append(torch.cat(cams))
            scores.append(logits.gather(1, channel[live[start:start + chunk], None])[:, 0])
        scores = torch.sigmoid(torch.cat(scores))
        shown = scores >= erase_stop
        accumulated = accumulated.index_add(0, live, torch.cat(maps) * shown[:, None, None])
        if shown_counts is not None:
            shown_counts[step] += torch.stack([torch.full_like(scores[0], len(live)),
                                               (scores >= SHOWN_SCORE).sum().to(scores.dtype), scores.sum()])
        live = live[shown]
    return list(torch.split(max_normalize(accumulated), counts))


def erasing_cam(model, image: torch.Tensor, channels: Sequence[int], *, erase_steps: int = 0,
                erase_thresh: float = ERASE_THRESH, erase_stop: float = ERASE_STOP,
                scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
                first: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`erasing_cams` of one image [3, H, W]: float [K, H, W] in [0, 1]."""
    return erasing_cams(model, image[None], [channels], erase_steps=erase_steps, erase_thresh=erase_thresh,
                        erase_stop=erase_stop, scales=scales, flip=flip, first=None if first is None else [first])[0]


def erase_images(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set the masked pixels of normalised images to 0 (the dataset mean colour).

    Args:
        images: float [B, 3, H, W].
        mask: bool [B, H, W], True = erase.

    Returns:
        float [B, 3, H, W] (a new tensor).
    """
    if mask.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"mask must be [B, H, W] = {(images.shape[0], *images.shape[-2:])}, got {tuple(mask.shape)}")
    return images.masked_fill(mask[:, None], 0.0)
