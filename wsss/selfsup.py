"""Self-supervised pretraining of the trunk: views, pretext losses, heads and the linear probe.

Three pretext tasks share this module; a pretraining stage picks one.

Rotation prediction (Gidaris et al. 2018).  Every image is shown at 0, 90, 180
and 270 degrees and a 4-way classifier on the pooled trunk features names the
angle (:func:`rotate_batch`, :class:`RotationHead`, cross entropy).

SimCLR (Chen et al. 2020).  Two augmented views of each image
(:class:`ContrastiveViews`) go through trunk, pooling and a
:class:`ProjectionHead`; the ``2B`` embeddings ``z`` are L2-normalised and each
one, the anchor ``i``, must pick out its partner ``p(i)`` (the other view of
the same image) among the other ``2B - 1``::

    loss_i = -log( exp(z_i . z_p(i) / T) / sum_{j != i} exp(z_i . z_j / T) )

and :func:`nt_xent_loss` is the mean of ``loss_i`` over the anchors (NT-Xent,
"normalised temperature-scaled cross entropy").  Under ``torch.distributed``
the negatives come from every rank: each rank's ``2B`` anchors are compared
with the ``2BW`` embeddings of all ``W`` ranks, so the mean of the per-rank
losses is exactly the loss of the global batch.  :func:`all_gather_with_grad`
sends back to each rank the gradient that every rank's loss has with respect to
that rank's embeddings (summed over ranks); DistributedDataParallel then
averages the parameter gradients over ranks, which makes the update the
gradient of that global loss.

MoCo v2 (He et al. 2020; Chen et al. 2020).  A query ``q`` from the online
network and a key ``k`` from a momentum copy (:func:`momentum_update`, an
exponential moving average of the parameters) of another view of the same
image form the positive pair; the negatives are the keys of earlier batches,
kept in a :class:`NegativeQueue`::

    loss = -log( exp(q . k / T) / (exp(q . k / T) + sum_n exp(q . n_n / T)) )

(:func:`moco_loss`, InfoNCE).  The queue decouples the number of negatives from
the batch size, the usual answer to small batches.  MoCo also shuffles the
batch across GPUs before the key encoder's BatchNorm ("shuffle BN") so that a
batch cannot recognise its own keys by their statistics; that belongs to the
training loop, not to these functions.

The learned trunk is judged by :func:`linear_probe`: a logistic regression per
class on frozen, globally pooled features (:func:`pooled_features`), scored by
mean average precision.

Randomness is passed in: augmentations draw from a ``numpy.random.Generator``,
the queue's initial keys from a ``torch.Generator``.

The last section puts these pieces together for ``wsss pretrain``: :class:`Pretext`
(trunk + head, whose forward returns a step's loss), :class:`PretextImages` (a
split's images as views), :func:`probe_trunk` (the linear probe on a prepared
dataset) and :func:`save_backbone` (the trunk under torchvision's names, the file
``train-cls --weights`` and ``train-seg --weights-backbone`` read).
"""

from __future__ import annotations

import copy
import io
import math
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from wsss import artifacts
from wsss.inference import split_batches, to_model_input
from wsss.metrics import average_precision, mean_average_precision
from wsss.models import PRETEXT_METHODS
from wsss.models.backbones import META_KEY, backbone_channels, build_resnet, trunk_state_dict
from wsss.transforms import normalize_image

if TYPE_CHECKING:
    from wsss.datasets.prepared import PreparedDataset
    from wsss.training import Precision

# sklearn's C (inverse L2 strength) of the linear probe, on standardised features
PROBE_INVERSE_REGULARIZATION = 0.1
PROBE_MAX_ITER = 2000
# the embedding width of :class:`ProjectionHead` (SimCLR and MoCo v2 use 128)
PROJECTION_DIM = 128


# --------------------------------------------------------------------------- views


class _RandomView:
    """The augmentation of :class:`ContrastiveViews` and :class:`RotationView` (settings documented there)."""

    def __init__(self, *, crop_size: int, min_scale: float = 0.08, max_scale: float = 1.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, jitter_p: float = 0.8,
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 grayscale_p: float = 0.2, blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0)):
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < ratio[0] <= ratio[1], got {ratio}")
        for name, value in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p),
                            ("blur_p", blur_p)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise ValueError("jitter strengths must be non-negative and hue at most 0.5")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"need 0 < blur_sigma[0] <= blur_sigma[1], got {blur_sigma}")
        self.crop_size = crop_size
        self.scale = (min_scale, max_scale)
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p, self.jitter_p, self.grayscale_p, self.blur_p = flip_p, jitter_p, grayscale_p, blur_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        kernel = round(0.1 * crop_size)
        self.blur_kernel = max(3, kernel + 1 if kernel % 2 == 0 else kernel)

    def view(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Return one view, float32 [3, crop_size, crop_size], ImageNet-normalised.

        Args:
            image: RGB uint8 [H, W, 3].
            rng: the only source of randomness.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
        top, left, height, width = _crop_box(image.shape[0], image.shape[1], self.scale, self.ratio, rng)
        out = image[top:top + height, left:left + width]
        if (height, width) != (self.crop_size, self.crop_size):
            # area averaging when shrinking avoids aliasing; bilinear when enlarging
            shrink = height >= self.crop_size and width >= self.crop_size
            out = cv2.resize(out, (self.crop_size, self.crop_size),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if rng.random() < self.flip_p:
            out = out[:, ::-1]
        jitter = rng.random() < self.jitter_p
        grayscale = rng.random() < self.grayscale_p
        blur = rng.random() < self.blur_p
        if jitter or grayscale or blur:
            colour = np.ascontiguousarray(out, dtype=np.float32) / 255.0
            if jitter:
                colour = self._jitter(colour, rng)
            if grayscale:
                colour = cv2.cvtColor(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            if blur:
                sigma = rng.uniform(*self.blur_sigma)
                colour = cv2.GaussianBlur(colour, (self.blur_kernel, self.blur_kernel), sigmaX=sigma, sigmaY=sigma,
                                          borderType=cv2.BORDER_REFLECT_101)
            out = np.rint(np.clip(colour, 0.0, 1.0) * 255.0).astype(np.uint8)
        return normalize_image(out)

    def _jitter(self, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Brightness, contrast, saturation and hue of float32 RGB in [0, 1], in a random order (torchvision's)."""
        for operation in rng.permutation(4):
            if operation == 0:
                colour = colour * rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
            elif operation == 1:
                mean = float(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY).mean())
                colour = (colour - mean) * rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) + mean
            elif operation == 2:
                grey = cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY)[..., None]
                colour = (colour - grey) * rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation) + grey
            else:
                shift = rng.uniform(-self.hue, self.hue) * 360.0  # float HSV: hue in degrees
                hsv = cv2.cvtColor(colour, cv2.COLOR_RGB2HSV)
                hsv[..., 0] = np.mod(hsv[..., 0] + shift, 360.0)
                colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
            # every step clips, as torchvision's does, so an overexposed pixel stays white
            colour = np.clip(colour, 0.0, 1.0).astype(np.float32, copy=False)
        return colour


def _crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
              rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Return ``(top, left, crop_height, crop_width)`` of a random resized crop (torchvision's sampling).

    Up to ten tries draw an area share and a log-uniform aspect ratio and keep the
    first box that fits; otherwise the largest centred box whose aspect ratio lies
    in ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    aspect = width / height
    if aspect < ratio[0]:
        crop_width, crop_height = width, max(1, round(width / ratio[0]))
    elif aspect > ratio[1]:
        crop_width, crop_height = max(1, round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class ContrastiveViews(_RandomView):
    """Two independently augmented square views of one RGB image, SimCLR's recipe (the defaults), for SimCLR or MoCo.

    Each view, in order: random resized crop (a box of ``[min_scale, max_scale]`` of
    the image area with an aspect ratio drawn log-uniformly from ``ratio``, resized to
    ``crop_size x crop_size``), horizontal flip, colour jitter (with probability
    ``jitter_p``: brightness, contrast, saturation and hue in a random order, factors
    uniform in ``[1 - s, 1 + s]``, hue shift uniform in ``[-hue, hue]`` of the colour
    circle), grayscale, Gaussian blur (sigma uniform in ``blur_sigma`` pixels, an odd
    kernel of about 10 % of ``crop_size``, at least 3), ImageNet normalisation.  Every
    colour operation acts on each pixel alike, so a constant image stays constant.

    ``__call__(image, rng)`` takes an RGB uint8 [H, W, 3] image and a
    ``numpy.random.Generator`` (the only source of randomness) and returns
    ``(view1, view2)``, each float32 [3, crop_size, crop_size]; ``view(image, rng)``
    returns one.

    Args (keyword-only):
        crop_size: side of the output views in pixels.
        min_scale, max_scale: range of the crop's share of the image area, in (0, 1].
        ratio: range of the crop's width / height.
        flip_p, jitter_p, grayscale_p, blur_p: probabilities of the operations.
        brightness, contrast, saturation: jitter strengths ``s`` (factors in ``[1 - s, 1 + s]``).
        hue: largest hue shift, as a fraction of the colour circle (at most 0.5).
        blur_sigma: range of the blur's standard deviation in pixels.
    """

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image, rng), self.view(image, rng)


class RotationView(_RandomView):
    """One square view for rotation prediction: a milder crop, a flip, optional colour jitter.

    A random resized crop of 35-100 % of the area (rotation needs the object's
    layout, which a small crop loses), a horizontal flip (it never changes which
    way is up) and, with probability ``jitter_p`` (default off), the colour jitter
    of :class:`ContrastiveViews`.  No grayscale and no blur.  ``__call__(image, rng)``
    returns float32 [3, crop_size, crop_size], ImageNet-normalised; the output is
    square, as :func:`rotate_batch` requires.
    """

    def __init__(self, *, crop_size: int, min_scale: float = 0.35, max_scale: float = 1.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, jitter_p: float = 0.0,
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1):
        super().__init__(crop_size=crop_size, min_scale=min_scale, max_scale=max_scale, ratio=ratio, flip_p=flip_p,
                         jitter_p=jitter_p, brightness=brightness, contrast=contrast, saturation=saturation,
                         hue=hue, grayscale_p=0.0, blur_p=0.0)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        return self.view(image, rng)


# --------------------------------------------------------------------------- rotation


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image at 0, 90, 180 and 270 degrees counter-clockwise, with the rotation index as target.

    The output is four blocks of ``B``: ``rotated[k * B + b]`` is image ``b`` turned
    ``k`` quarter turns counter-clockwise as displayed (rows downwards, columns to the
    right; ``torch.rot90(image, k, dims=(-2, -1))``) and ``targets[k * B + b] = k``.

    Args:
        images: float [B, C, S, S], square.

    Returns:
        ``(rotated, targets)``: float [4B, C, S, S] and int64 [4B] in 0..3.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images [B, C, S, S], got {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, quarter_turns, dims=(-2, -1)) for quarter_turns in range(4)])
    targets = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, targets


# --------------------------------------------------------------------------- SimCLR


def _gather_world(gather: bool | None) -> tuple[int, int]:
    """``(world_size, rank)`` the embeddings are gathered over; ``(1, 0)`` when not gathering."""
    initialised = dist.is_available() and dist.is_initialized()
    if gather is None:
        gather = initialised and dist.get_world_size() > 1
    if not gather:
        return 1, 0
    if not initialised:
        raise RuntimeError("gather=True needs an initialised torch.distributed process group")
    return dist.get_world_size(), dist.get_rank()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate a tensor over ranks; backward sums the gradients of every rank and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss reaches every slice; the owner of a slice needs the sum.
        # all_reduce (not reduce_scatter) works on every backend, Gloo included.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` of every rank along dim 0, differentiably.

    A collective call: every rank must call it with a tensor of the same shape
    (a ``DistributedSampler`` with ``drop_last=True`` gives equal batches).  In
    the backward pass each rank receives, for its own slice, the sum over ranks
    of the gradients flowing into that slice (see the module docstring).  Without
    an initialised process group, or with one process, the tensor itself is returned.

    Args:
        tensor: [N, ...] on this rank.

    Returns:
        [W * N, ...]: rank 0's rows first, then rank 1's, and so on.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent loss of a batch of view pairs (formula in the module docstring).

    Row ``b`` of ``z1`` and row ``b`` of ``z2`` are the two views of image ``b``.
    The embeddings are L2-normalised here, and the similarities are computed in float32.

    Args:
        z1, z2: float [B, D], projection-head outputs.
        temperature: T > 0 (0.1-0.5 in SimCLR; higher suits smaller batches).
        gather: take the negatives from all ranks (an :func:`all_gather_with_grad`;
            every rank must call with the same B).  ``None``: when a process group with
            more than one process is initialised.  ``False``: this rank's batch only.

    Returns:
        scalar tensor: the mean of the per-anchor losses over this rank's 2B anchors.
        Each anchor has ``2BW - 2`` negatives; the mean over ranks of the returned
        value is the loss of the global batch.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected z1 and z2 [B, D] of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    world_size, rank = _gather_world(gather)
    anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # [2B, D]: first views, then second views
    candidates = _AllGatherWithGrad.apply(anchors) if world_size > 1 else anchors  # [2BW, D], rank-major
    logits = anchors @ candidates.t() / temperature  # [2B, 2BW]
    views = anchors.shape[0]
    rows = torch.arange(views, device=anchors.device)
    own = rank * views + rows
    partner = rank * views + (rows + views // 2) % views
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, own] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), partner)


# --------------------------------------------------------------------------- MoCo


def momentum_copy(online: nn.Module) -> nn.Module:
    """Return a deep copy of ``online`` with gradients switched off: the initial MoCo key encoder."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """Move ``target`` towards ``online`` in place: ``t <- m t + (1 - m) o`` for every parameter.

    Buffers (BatchNorm running statistics, batch counters) are copied from
    ``online``.  MoCo uses ``m`` of 0.99-0.999.

    Args:
        online: the network trained by gradient descent.
        target: a copy of it (:func:`momentum_copy`); same parameter and buffer names.
        momentum: m in [0, 1]; 1 leaves ``target`` unchanged, 0 copies ``online``.
    """
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    online_params, target_params = dict(online.named_parameters()), dict(target.named_parameters())
    online_buffers, target_buffers = dict(online.named_buffers()), dict(target.named_buffers())
    if online_params.keys() != target_params.keys() or online_buffers.keys() != target_buffers.keys():
        raise ValueError("online and target networks have different parameters or buffers")
    for name, parameter in target_params.items():
        parameter.lerp_(online_params[name].detach(), 1.0 - momentum)
    for name, buffer in target_buffers.items():
        buffer.copy_(online_buffers[name])


class NegativeQueue(nn.Module):
    """A first-in-first-out queue of ``size`` L2-normalised keys, MoCo's negatives.

    ``keys`` (float32 [size, dim]) and ``pointer`` (int64 scalar, the next slot to
    write) are registered buffers, so the queue is saved with the model's
    ``state_dict`` and a resumed run goes on with the same negatives.  As in MoCo
    the queue starts full of random unit vectors (drawn from ``generator``; the
    global torch generator when ``None``), which the first ``size / B`` batches replace.

    Args:
        size: number of keys K (thousands to 65536 in MoCo).
        dim: embedding dimension D.
        generator: source of the initial keys.
    """

    def __init__(self, size: int, dim: int, *, generator: torch.Generator | None = None):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be positive, got {size}, {dim}")
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, *, gather: bool | None = None) -> None:
        """Write a batch of keys over the oldest ones, wrapping around the end.

        The keys are detached and L2-normalised.  Key ``j`` of the batch goes to slot
        ``(pointer + j) % size``; of a batch larger than the queue only the last ``size``
        keys are kept.  No value is read back to the host.

        Args:
            keys: float [B, D].
            gather: enqueue the keys of all ranks (rank 0's first), which keeps the
                queue identical on every rank; ``None``: when a process group with
                more than one process is initialised.
        """
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"expected keys [B, {self.keys.shape[1]}], got {tuple(keys.shape)}")
        world_size, _ = _gather_world(gather)
        keys = F.normalize(keys.detach().float(), dim=1)
        if world_size > 1:
            keys = _AllGatherWithGrad.apply(keys)
        batch = keys.shape[0]
        # keys that would be overwritten within this batch are dropped, as index_copy_ with
        # repeated slots has no defined order on CUDA
        skipped = max(batch - self.size, 0)
        slots = (self.pointer + skipped + torch.arange(batch - skipped, device=self.keys.device)) % self.size
        self.keys.index_copy_(0, slots, keys[skipped:].to(self.keys))
        self.pointer.copy_((self.pointer + batch) % self.size)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE loss: each query against its key (logit 0), then the queued negatives (see the module docstring).

    ``q`` and ``k`` are L2-normalised here; ``k`` and ``queue`` are detached (no
    gradient reaches the key encoder).  Logits are computed in float32.

    Args:
        q: float [B, D], queries of the online network.
        k: float [B, D], keys of the momentum network for the other view of the same images.
        queue: float [K, D], L2-normalised negatives (``NegativeQueue.keys``, read before this
            batch is enqueued).
        temperature: T > 0 (0.07-0.2 in MoCo).

    Returns:
        scalar tensor, the mean over the B queries.
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"expected q and k [B, D] of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"expected queue [K, {q.shape[1]}], got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
    negative = q @ queue.detach().float().t()  # [B, K]
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


# --------------------------------------------------------------------------- heads and features


def _pool(features: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C] by the spatial mean; [B, C] passes through."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    if features.ndim != 2:
        raise ValueError(f"expected features [B, C, h, w] or [B, C], got {tuple(features.shape)}")
    return features


class ProjectionHead(nn.Module):
    """SimCLR v2 / MoCo v2 projection: Linear - BatchNorm - ReLU - Linear.

    The contrastive loss is applied to its output and the head is thrown away
    afterwards: it absorbs the invariances the loss imposes (colour, for example),
    which keeps more information in the trunk's features (SimCLR, section 4.2).
    The first linear layer has no bias, as BatchNorm follows it.

    Args:
        in_dim: channels of the trunk's features.
        hidden_dim: width of the hidden layer.
        out_dim: embedding dimension.

    Forward: float [B, in_dim, h, w] (average-pooled first) or [B, in_dim] -> float [B, out_dim].
    BatchNorm needs B > 1 in training mode.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = PROJECTION_DIM):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                    nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(_pool(features))


class RotationHead(nn.Module):
    """A linear 4-way rotation classifier on globally average-pooled trunk features.

    Linear on purpose: the CAM network this trunk is pretrained for is itself a
    linear classifier on the pooled last feature map, and a linear head makes the
    trunk put the rotation cues in that same linearly readable form (the form the
    linear probe measures too).  A deeper head would take over part of the task.

    Args:
        in_dim: channels of the trunk's features.

    Forward: float [B, in_dim, h, w] (average-pooled first) or [B, in_dim] -> logits float [B, 4],
    class k = k quarter turns counter-clockwise (:func:`rotate_batch`).
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.classifier = nn.Linear(in_dim, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(_pool(features))


@torch.no_grad()
def pooled_features(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled trunk features, without gradient (train/eval mode is the caller's choice).

    Args:
        trunk: maps [B, 3, H, W] to [B, C, h, w] (e.g. :func:`wsss.models.backbones.build_resnet`).
        images: float [B, 3, H, W], normalised.

    Returns:
        float [B, C] on the images' device.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    features = trunk(images)
    if features.ndim != 4:
        raise ValueError(f"the trunk must return [B, C, h, w], got {tuple(features.shape)}")
    return features.mean(dim=(2, 3))


# --------------------------------------------------------------------------- linear probe


def _as_array(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, *], got shape {array.shape}")
    return array


def linear_probe(train_features, train_targets, val_features, val_targets, *,
                 inverse_regularization: float = PROBE_INVERSE_REGULARIZATION, max_iter: int = PROBE_MAX_ITER,
                 seed: int = 0) -> dict:
    """Score frozen features by a one-vs-rest logistic regression: the mAP on the validation images.

    Features are standardised with the training set's mean and standard deviation
    (scikit-learn ``StandardScaler``), then one L2-regularised logistic regression
    (lbfgs) per class is fitted.  ``inverse_regularization`` is scikit-learn's ``C``,
    fixed at 0.1 by default rather than tuned on the validation set, so probes of
    different trunks are comparable.  The validation scores are the decision values
    (log-odds), which do not saturate into ties the way probabilities can.  A class
    with no positive (or no negative) training image gets the constant score 0; its AP
    is then the AP of a constant, i.e. its share of positives in the validation set.

    Args:
        train_features: float [N, C] (numpy or CPU/GPU tensor).
        train_targets: 0/1 [N, K].
        val_features: float [M, C].
        val_targets: 0/1 [M, K].
        inverse_regularization: ``C``; larger fits the training set more closely.
        max_iter: lbfgs iteration limit.
        seed: ``random_state`` of the solver.

    Returns:
        A JSON-ready dict: ``map`` (mean AP over the classes with a validation positive;
        None if none has one), ``ap`` (list of K, None for a class without a validation
        positive), ``settings`` (the values above, ``constant_classes`` and
        ``not_converged``: class indices).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, val_x = _as_array(train_features, "train_features"), _as_array(val_features, "val_features")
    train_y = _as_array(train_targets, "train_targets") > 0.5
    val_y = _as_array(val_targets, "val_targets") > 0.5
    if train_x.shape[0] != train_y.shape[0] or val_x.shape[0] != val_y.shape[0]:
        raise ValueError(f"features and targets differ in length: train {train_x.shape} vs {train_y.shape}, "
                         f"val {val_x.shape} vs {val_y.shape}")
    if train_x.shape[1] != val_x.shape[1] or train_y.shape[1] != val_y.shape[1]:
        raise ValueError(f"train and val differ in width: features {train_x.shape} vs {val_x.shape}, "
                         f"targets {train_y.shape} vs {val_y.shape}")
    scaler = StandardScaler().fit(train_x)
    train_x, val_x = scaler.transform(train_x), scaler.transform(val_x)
    scores = np.zeros(val_y.shape, dtype=np.float64)
    constant_classes, not_converged = [], []
    for index in range(train_y.shape[1]):
        labels = train_y[:, index]
        if labels.all() or not labels.any():
            constant_classes.append(index)
            continue
        classifier = LogisticRegression(C=inverse_regularization, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(train_x, labels)
        if classifier.n_iter_.max() >= max_iter:
            not_converged.append(index)
        scores[:, index] = classifier.decision_function(val_x)
    ap = average_precision(scores, val_y)
    mean_ap = mean_average_precision(scores, val_y)
    return {
        "map": None if math.isnan(mean_ap) else mean_ap,
        "ap": [None if math.isnan(value) else float(value) for value in ap],
        "settings": {"inverse_regularization": inverse_regularization, "max_iter": max_iter, "seed": seed,
                     "standardized": True, "constant_classes": constant_classes, "not_converged": not_converged},
    }


# --------------------------------------------------------------------------- the pretraining network and its data


class PretextImages(Dataset):
    """A split's images as pretext inputs: two views (contrastive) or one square view (rotation).

    ``views(image, rng)`` is a :class:`ContrastiveViews` or :class:`RotationView`.  It draws from a
    NumPy generator seeded from Python's ``random``, which the training engine's
    :class:`~wsss.training.SeededItems` seeds per item, so a resumed run sees the same views.
    """

    def __init__(self, dataset: PreparedDataset, split: str, views: Callable):
        self.dataset, self.split, self.views, self.ids = dataset, split, views, dataset.ids(split)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        rng = np.random.default_rng(random.getrandbits(63))
        return self.views(self.dataset.read_image(self.split, self.ids[index]), rng)


def pretext_views(method: str, *, crop_size: int, min_scale: float) -> ContrastiveViews | RotationView:
    """The augmentation of a method: :class:`RotationView` for rotation, else :class:`ContrastiveViews`
    (``min_scale`` is the contrastive crop's smallest area share; rotation keeps its own)."""
    if method == "rotation":
        return RotationView(crop_size=crop_size)
    return ContrastiveViews(crop_size=crop_size, min_scale=min_scale)


class Pretext(nn.Module):
    """Trunk + pretext head; ``forward(batch)`` returns the step's loss terms.

    Rotation: ``batch`` is float [B, 3, S, S]; the four rotations of every image are classified
    (cross entropy) and the terms are ``{"total", "accuracy"}``.  Contrastive: ``batch`` is the
    pair of views ``(first, second)``, each [B, 3, S, S]; without a queue the loss is
    :func:`nt_xent_loss` (SimCLR), with one the symmetric :func:`moco_loss` against a momentum
    copy of trunk and head (MoCo v2), and the terms are ``{"total"}``.

    Args:
        backbone: ResNet name; the trunk has output stride 16 like the CAM network's.
        method: one of :data:`wsss.models.PRETEXT_METHODS`.
        temperature: of NT-Xent / InfoNCE.
        queue: MoCo negatives (0 = SimCLR with in-batch negatives).
        key_momentum: MoCo's momentum of the key encoder.
        key_splits: the keys' BatchNorm sees the batch shuffled and cut in this many parts (MoCo's
            "shuffle BN" on one device), so a query cannot find its key by the batch statistics.
    """

    def __init__(self, backbone: str, method: str, *, temperature: float = 0.2, queue: int = 0,
                 key_momentum: float = 0.99, key_splits: int = 4):
        super().__init__()
        if method not in PRETEXT_METHODS:
            raise ValueError(f"method must be one of {', '.join(PRETEXT_METHODS)}, got {method!r}")
        self.method, self.temperature = method, temperature
        self.key_momentum, self.key_splits = key_momentum, key_splits
        self.trunk = build_resnet(backbone, "none", output_stride=16)
        channels = backbone_channels(backbone)
        self.head = RotationHead(channels) if method == "rotation" else ProjectionHead(channels)
        self.queue = None
        if method == "contrastive" and queue > 0:
            self.key_trunk, self.key_head = momentum_copy(self.trunk), momentum_copy(self.head)
            self.queue = NegativeQueue(queue, PROJECTION_DIM, generator=torch.Generator().manual_seed(0))

    @property
    def name(self) -> str:
        """The method as recorded in the backbone file: ``rotation``, ``contrastive`` or ``contrastive-moco``."""
        return "contrastive-moco" if self.queue is not None else self.method

    def parameter_groups(self) -> list[dict]:
        """SGD groups: weight decay on weights, none on BatchNorm and biases (SimCLR/MoCo practice)."""
        decay, no_decay = [], []
        for _, parameter in [*self.trunk.named_parameters(), *self.head.named_parameters()]:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _keys(self, views: torch.Tensor) -> torch.Tensor:
        """Keys of the momentum encoder, BatchNorm on shuffled sub-batches (shuffle BN on one device)."""
        order = torch.randperm(views.shape[0], device=views.device)
        splits = max(1, min(self.key_splits, views.shape[0] // 2))  # BatchNorm needs two samples per part
        parts = [self.key_head(self.key_trunk(part)) for part in views[order].chunk(splits)]
        keys = torch.empty_like(torch.cat(parts))
        keys[order] = torch.cat(parts)
        return keys

    def forward(self, batch) -> dict[str, torch.Tensor]:
        if self.method == "rotation":
            images, targets = rotate_batch(batch)
            logits = self.head(self.trunk(images)).float()
            return {"total": F.cross_entropy(logits, targets),
                    "accuracy": (logits.argmax(1) == targets).float().mean()}
        first, second = batch
        if self.queue is None:
            z1, z2 = self.head(self.trunk(first)), self.head(self.trunk(second))
            return {"total": nt_xent_loss(z1.float(), z2.float(), self.temperature)}
        with torch.no_grad():
            # one momentum step per training step (MoCo), then both views' keys from that one key encoder
            momentum_update(self.trunk, self.key_trunk, self.key_momentum)
            momentum_update(self.head, self.key_head, self.key_momentum)
            k1, k2 = self._keys(first), self._keys(second)
        q1, q2 = self.head(self.trunk(first)).float(), self.head(self.trunk(second)).float()
        negatives = self.queue.keys.clone()  # enqueue below updates the queue in place; backward needs these
        # symmetric MoCo loss: each view is once the query and once the key
        loss = 0.5 * (moco_loss(q1, k2.float(), negatives, self.temperature)
                      + moco_loss(q2, k1.float(), negatives, self.temperature))
        self.queue.enqueue(torch.cat([k1, k2]).float())
        return {"total": loss}


@torch.no_grad()
def split_features(trunk: nn.Module, dataset: PreparedDataset, split: str, device: torch.device,
                   precision: Precision, *, size: int | None = None,
                   workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Globally pooled trunk features and multi-hot labels of a split's images (trunk in eval mode).

    Args:
        size: resize every image to ``size x size`` first (None: each at its own size).

    Returns:
        ``(features, labels)``: float32 [N, C] and the dataset's multi-hot labels [N, K], in split order.
    """
    was_training = trunk.training
    trunk.eval()
    ids = dataset.ids(split)
    position = {image_id: index for index, image_id in enumerate(ids)}
    features = None
    for batch_ids, images, _ in split_batches(dataset, split, ids, batch_size=16, workers=workers, device=device):
        inputs = to_model_input(images)
        if size is not None:
            inputs = F.interpolate(inputs, size=(size, size), mode="bilinear", align_corners=False)
        with precision.autocast(device):
            pooled = trunk(precision.images(inputs)).float().mean(dim=(2, 3)).cpu().numpy()
        if features is None:
            features = np.zeros((len(ids), pooled.shape[1]), np.float32)
        features[[position[image_id] for image_id in batch_ids]] = pooled
    trunk.train(was_training)
    return features, np.stack([dataset.multi_hot(image_id) for image_id in ids])


def probe_trunk(trunk: nn.Module, dataset: PreparedDataset, train_split: str, probe_split: str,
                device: torch.device, precision: Precision, *, size: int | None = None, workers: int = 0,
                seed: int = 0) -> dict:
    """Linear-probe mAP of a trunk: :func:`linear_probe` fitted on ``train_split``, scored on ``probe_split``.

    Returns:
        ``{"map": mAP or None, "ap": {class name: AP or None}}`` (background left out).
    """
    train = split_features(trunk, dataset, train_split, device, precision, size=size, workers=workers)
    val = split_features(trunk, dataset, probe_split, device, precision, size=size, workers=workers)
    result = linear_probe(*train, *val, seed=seed)
    return {"map": result["map"], "ap": {name: ap for name, ap in zip(dataset.classes[1:], result["ap"])}}


def save_backbone(path: str | Path, trunk: nn.Module, meta: dict) -> Path:
    """Write a pretrained trunk: its state dict under torchvision's ResNet names plus ``meta`` under
    :data:`~wsss.models.backbones.META_KEY` (``wsss.models.backbones`` reads both back).  Atomic."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({**trunk_state_dict(trunk), META_KEY: meta}, buffer)
    with artifacts.atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path
