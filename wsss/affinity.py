"""Affinity refinement (AffinityNet, Ahn & Kwak 2018; IRN, Ahn et al. 2019): pair labels, loss, random walk.

The method.  CAMs mark the most discriminative parts of objects; a random walk
over a learned pixel-affinity graph spreads their scores to whole objects and
stops at boundaries.

1. **Confident labels.**  From each training image's CAMs a label map with
   background (0), classes (k) and "not sure" (255) is made: foreground where the
   strongest CAM is high, background where it is low, 255 in between (IRN's
   thresholds 0.30 / 0.05; AffinityNet uses two background powers instead).
   ``wsss.refine.refine_image`` with ``RefineParams(threshold="fixed",
   bg_thresh=0.05, fg_thresh=0.30, crf=...)`` makes exactly this map, each
   labelling refined by the CRF as IRN does.
2. **Pairs.**  The label is brought to the stride-8 feature grid
   (:func:`label_at_stride`) and every pair of cells ``(p, p + o)`` with ``o`` in
   :func:`pair_offsets` (within a radius, each unordered pair once) gets a target
   (:func:`affinity_targets`): both background, both the same class (positive),
   or two different labels (negative); pairs touching 255 get none.
3. **Affinity network.**  :class:`wsss.models.affinity.AffinityNet` maps the image to an
   embedding ``f`` on the stride-8 grid; the affinity of a pair is
   ``a(p, q) = exp(-mean_d |f_p - f_q|)`` in (0, 1] (:func:`pair_affinity`), trained
   with the balanced cross-entropy of :func:`affinity_loss`.
4. **Random walk.**  At inference the affinities of one image form a sparse
   symmetric graph with self loops; raising them to ``beta`` (8 in AffinityNet,
   10 in IRN) sharpens it, and normalising each row gives the transition matrix
   ``T = D^-1 A^beta`` (:func:`transition_matrix`).  The class scores (with a
   background plane, :func:`add_background`) are then averaged over the graph
   ``t`` times, ``x <- T x`` (:func:`random_walk`); the argmax over classes is the
   refined label.
5. **A split's CAM files** (``wsss refine --random-walk``): :func:`load_walk_network` reads a
   ``wsss train-aff`` checkpoint, :func:`walk_split` walks each image's CAMs (:func:`walk_cams`)
   into a folder of CAM files that refine then thresholds like any other.

Geometry.  As in :mod:`wsss.cam`, feature cell ``(i, j)`` of a stride-``s`` grid is
centred on input pixel ``(s * i, s * j)`` and the grid has ``ceil(H / s)`` rows.
:func:`label_at_stride` therefore reads the label *at* those pixels (nearest
sampling on our geometry); AffinityNet and IRN rescale the label with PIL's
nearest filter or average-pool the CAMs over ``8 x 8`` blocks, which sample
about half a cell further down and right.  Scores fed to the walk must be
sampled on the same grid (e.g. a full-resolution CAM read at pixels ``s * i``).

Arrays.  Pair quantities are stored per source cell: ``[P, h, w]`` holds at
``[k, y, x]`` the pair from cell ``(y, x)`` to ``(y + dy_k, x + dx_k)``; where that
second cell falls outside the grid the pair does not exist (affinity 0, no
target, no graph edge).

Memory.  AffinityNet and IRN build the dense ``N x N`` transition matrix
(``N = h * w`` cells) and square it ``log2 t`` times.  That costs ``N^2`` memory
and ``N^3`` time per squaring; at stride 4 on a 640 x 480 COCO image ``N`` is
19,200 and the dense matrix alone is 1.5 GB, the out-of-memory users of IRN
report.  Here ``T`` stays sparse (``N * (2P + 1)`` entries) and the walk applies
it ``t`` times to the ``[N, C]`` scores: ``T^t x`` is the same vector as
``(T^(2^k)) x`` for ``t = 2^k``, in ``O(N * P)`` memory and ``O(t * N * P * C)``
time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss.artifacts import IGNORE_INDEX

TARGET_KINDS = ("bg_pos", "fg_pos", "neg")
# AffinityNet's balancing: each kind of positive pair a quarter of the loss, the negatives half.
LOSS_WEIGHTS = {"bg": 0.25, "fg": 0.25, "neg": 0.5}
AFFINITY_EPS = 1e-5


def pair_offsets(radius: int) -> np.ndarray:
    """The neighbour offsets of AffinityNet's search set, each unordered pair once.

    All ``(dy, dx)`` with ``0 < dy^2 + dx^2 < radius^2`` on one half plane
    (``dy > 0``, or ``dy == 0`` and ``dx > 0``), ordered by ``dy`` then ``dx``.
    ``radius=1`` gives none, ``radius=2`` the 4 offsets (0, 1), (1, -1), (1, 0),
    (1, 1), and ``radius=5`` (AffinityNet's setting at stride 8) gives 34:
    4 with ``dy = 0`` and 9, 9, 7, 5 with ``dy = 1 .. 4``.

    Args:
        radius: exclusive Euclidean radius in feature cells, >= 1.

    Returns:
        int64 [P, 2] rows ``(dy, dx)``.
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    offsets = [(dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
               if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius]
    return np.array(offsets, dtype=np.int64).reshape(-1, 2)


def _as_offsets(offsets) -> list[tuple[int, int]]:
    array = np.asarray(offsets.cpu() if isinstance(offsets, torch.Tensor) else offsets, dtype=np.int64)
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"expected offsets [P, 2] of (dy, dx), got shape {array.shape}")
    return [(int(dy), int(dx)) for dy, dx in array]


def _overlap(shift: int, length: int) -> tuple[slice, slice]:
    """Along one axis of ``length`` cells: the sources ``i`` whose ``i + shift`` is inside, and those targets."""
    start = min(max(0, -shift), length)
    stop = max(start, min(length, length - shift))
    return slice(start, stop), slice(start + shift, stop + shift)


def label_at_stride(label: np.ndarray, stride: int) -> np.ndarray:
    """The label of the pixel each feature cell is centred on.

    Args:
        label: uint8 [H, W] (0 background, k class, 255 ignore).
        stride: the feature grid's stride ``s``.

    Returns:
        uint8 [ceil(H / s), ceil(W / s)]; cell ``(i, j)`` is ``label[s * i, s * j]``.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected a label [H, W], got shape {label.shape}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return np.ascontiguousarray(label[::stride, ::stride])


def affinity_targets(label: np.ndarray, offsets) -> dict[str, np.ndarray]:
    """Classify every pair ``(p, p + o)`` of a feature-grid label.

    Args:
        label: uint8 [h, w] on the feature grid (0 background, k > 0 class, 255 ignore).
        offsets: int [P, 2] ``(dy, dx)``, e.g. :func:`pair_offsets`.

    Returns:
        ``{"bg_pos", "fg_pos", "neg"}`` -> bool [P, h, w], at ``[k, y, x]`` the pair from
        ``(y, x)`` to ``(y + dy_k, x + dx_k)``: both background; both the same class;
        both labelled, with different labels.  A pair with an end outside the grid or
        on 255 is in none of them.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected a label [h, w], got shape {label.shape}")
    offsets = _as_offsets(offsets)
    height, width = label.shape
    targets = {kind: np.zeros((len(offsets), height, width), dtype=bool) for kind in TARGET_KINDS}
    for index, (dy, dx) in enumerate(offsets):
        (rows, rows_to), (cols, cols_to) = _overlap(dy, height), _overlap(dx, width)
        first, second = label[rows, cols], label[rows_to, cols_to]
        labelled = (first != IGNORE_INDEX) & (second != IGNORE_INDEX)
        targets["bg_pos"][index, rows, cols] = labelled & (first == 0) & (second == 0)
        targets["fg_pos"][index, rows, cols] = labelled & (first == second) & (first != 0)
        targets["neg"][index, rows, cols] = labelled & (first != second)
    return targets


def pair_affinity(embedding: torch.Tensor, offsets) -> torch.Tensor:
    """AffinityNet's affinity ``a(p, q) = exp(-mean_d |f_p - f_q|)`` of every pair.

    Args:
        embedding: float [B, D, h, w] on the feature grid.
        offsets: int [P, 2] ``(dy, dx)``.

    Returns:
        float [B, P, h, w] in (0, 1]: at ``[b, k, y, x]`` the affinity of ``(y, x)`` and
        ``(y + dy_k, x + dx_k)``; 0 where the second cell is outside the grid.
    """
    if embedding.ndim != 4:
        raise ValueError(f"expected an embedding [B, D, h, w], got {tuple(embedding.shape)}")
    batch, _, height, width = embedding.shape
    planes = []
    for dy, dx in _as_offsets(offsets):
        (rows, rows_to), (cols, cols_to) = _overlap(dy, height), _overlap(dx, width)
        distance = (embedding[:, :, rows, cols] - embedding[:, :, rows_to, cols_to]).abs().mean(1)
        # zeros where the partner cell is outside the grid
        padding = (cols.start, width - cols.stop, rows.start, height - rows.stop)
        planes.append(F.pad(torch.exp(-distance), padding))
    if not planes:
        return embedding.new_zeros(batch, 0, height, width)
    return torch.stack(planes, dim=1)


def affinity_loss(affinity: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AffinityNet's balanced cross-entropy over the three kinds of labelled pairs.

    ``bg`` is the mean of ``-log a`` over background pairs, ``fg`` the same over
    same-class pairs, ``neg`` the mean of ``-log(1 - a)`` over different-label pairs,
    and ``total = bg / 4 + fg / 4 + neg / 2``.  ``a`` is clamped into
    ``[1e-5, 1 - 1e-5]`` before the logs, which also stops the gradient of a pair
    beyond those bounds (a negative pair whose embeddings are equal to within 1e-5
    is not pushed apart; AffinityNet's ``log(1 + 1e-5 - a)`` keeps that gradient).
    A kind without pairs contributes 0 (a zero that is still part of the autograd
    graph, so ``backward`` always works).

    Args:
        affinity: float [B, P, h, w] from :func:`pair_affinity`.
        targets: ``{"bg_pos", "fg_pos", "neg"}`` -> bool [B, P, h, w] (stacked
            :func:`affinity_targets` of each image, as tensors on ``affinity``'s device).

    Returns:
        ``{"total", "bg", "fg", "neg"}`` -> 0-dim float tensors.
    """
    for kind in TARGET_KINDS:
        if kind not in targets:
            raise KeyError(f"targets need the keys {TARGET_KINDS}, {kind!r} is missing")
        if tuple(targets[kind].shape) != tuple(affinity.shape):
            raise ValueError(f"targets[{kind!r}] must be [B, P, h, w] = {tuple(affinity.shape)}, "
                             f"got {tuple(targets[kind].shape)}")
    affinity = affinity.clamp(AFFINITY_EPS, 1.0 - AFFINITY_EPS)
    positive_cost, negative_cost = -torch.log(affinity), -torch.log1p(-affinity)

    def masked_mean(cost: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(device=cost.device, dtype=torch.bool)
        # a count of 0 leaves 0 / 1 (no host sync to test for emptiness)
        return torch.where(mask, cost, 0.0).sum() / mask.sum().clamp_min(1)

    losses = {"bg": masked_mean(positive_cost, targets["bg_pos"]),
              "fg": masked_mean(positive_cost, targets["fg_pos"]),
              "neg": masked_mean(negative_cost, targets["neg"])}
    total = sum(LOSS_WEIGHTS[kind] * value for kind, value in losses.items())
    return {"total": total, **losses}


def transition_matrix(affinity: torch.Tensor, offsets, beta: float) -> torch.Tensor:
    """The random walk's transition matrix ``T = D^-1 A^beta`` of one image, sparse.

    ``A`` is the symmetric affinity graph: every pair of :func:`pair_affinity` in
    both directions, plus a self loop of affinity 1 on every cell; pairs with an
    end outside the grid are no edges.  Every entry is raised to ``beta`` and each
    row divided by its sum, so ``T[i, j]`` is the probability of stepping from cell
    ``i`` to cell ``j`` and every row sums to 1 (AffinityNet and IRN normalise the
    columns and multiply the scores from the left, the same walk transposed).
    Built from index arrays; no dense ``N x N`` matrix is ever made.

    Args:
        affinity: float [P, h, w] of one image (cells numbered row-major, ``N = h * w``).
        offsets: int [P, 2] ``(dy, dx)``; each unordered pair should appear once
            (as :func:`pair_offsets` gives them).
        beta: power applied to every affinity (> 0).

    Returns:
        sparse CSR [N, N] on ``affinity``'s device, float32 (float64 for float64 input),
        ``N + 2 * (pairs inside the grid)`` stored entries.
    """
    offsets = _as_offsets(offsets)
    if affinity.ndim != 3 or affinity.shape[0] != len(offsets):
        raise ValueError(f"expected affinity [P, h, w] with P = {len(offsets)} offsets, got {tuple(affinity.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    _, height, width = affinity.shape
    size = height * width
    device = affinity.device
    affinity = affinity.detach().to(torch.promote_types(affinity.dtype, torch.float32))
    cells = torch.arange(size, device=device).view(height, width)
    sources, targets, values = [cells.reshape(-1)], [cells.reshape(-1)], [affinity.new_ones(size)]
    for index, (dy, dx) in enumerate(offsets):
        (rows, rows_to), (cols, cols_to) = _overlap(dy, height), _overlap(dx, width)
        first, second = cells[rows, cols].reshape(-1), cells[rows_to, cols_to].reshape(-1)
        weight = affinity[index, rows, cols].reshape(-1).pow(beta)
        sources += [first, second]
        targets += [second, first]
        values += [weight, weight]
    sources, targets, values = torch.cat(sources), torch.cat(targets), torch.cat(values)
    degree = torch.zeros(size, dtype=values.dtype, device=device).index_add_(0, sources, values)
    values = values / degree[sources]
    matrix = torch.sparse_coo_tensor(torch.stack([sources, targets]), values, (size, size),
                                     check_invariants=False).coalesce()
    with warnings.catch_warnings():
        # torch flags all of its CSR support as "beta"; CSR SpMM is many times faster than COO on CPU
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


def random_walk(scores: torch.Tensor, transition: torch.Tensor, steps: int) -> torch.Tensor:
    """Propagate scores over the affinity graph: ``x <- T x``, ``steps`` times.

    Each step replaces every cell's scores by the transition-weighted average of its
    neighbours' (itself included).  For ``steps = 2^k`` this equals AffinityNet's and
    IRN's dense ``T^(2^k) x`` by ``k`` squarings, but with sparse products only:
    ``O(N * P)`` memory instead of ``O(N^2)`` (see the module docstring).  The same
    code runs on CPU and CUDA tensors.

    Args:
        scores: float [C, h, w] (e.g. :func:`add_background` of the CAMs), on the grid
            of the affinities.
        transition: sparse [N, N] from :func:`transition_matrix`, ``N = h * w``, same device.
        steps: number of walk steps ``t`` (AffinityNet and IRN: 256 = 2^8), >= 0.

    Returns:
        float [C, h, w] in ``transition``'s dtype.
    """
    if scores.ndim != 3:
        raise ValueError(f"expected scores [C, h, w], got {tuple(scores.shape)}")
    channels, height, width = scores.shape
    size = height * width
    if tuple(transition.shape) != (size, size):
        raise ValueError(f"transition must be [N, N] with N = h * w = {size}, got {tuple(transition.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    state = scores.reshape(channels, size).t().to(transition.dtype).contiguous()  # [N, C]
    for _ in range(steps):
        state = transition @ state
    return state.t().reshape(channels, height, width)


def add_background(cams: torch.Tensor, power: float) -> torch.Tensor:
    """Prepend AffinityNet's background plane ``(1 - max_k cam_k)^power``.

    AffinityNet walks this plane with the classes (``power`` 16 at inference; its
    confident labels use 4 and 24).  IRN instead walks the class CAMs alone,
    divides the result by its maximum and compares it with a constant background
    score (0.25) afterwards; a caller choosing that route skips this function and
    pads a constant plane after :func:`random_walk`.

    Args:
        cams: float [K, h, w] in [0, 1] (max-normalised), K >= 0.
        power: exponent; larger values shrink the background where any CAM is mildly on.

    Returns:
        float [K + 1, h, w]; plane 0 is background (1 everywhere when K = 0).
    """
    if cams.ndim != 3:
        raise ValueError(f"expected cams [K, h, w], got {tuple(cams.shape)}")
    if cams.shape[0] == 0:
        background = cams.new_ones(1, *cams.shape[1:])
    else:
        # clamp: CAMs a hair above 1 would give a negative base and NaN for fractional powers
        background = (1.0 - cams.amax(0, keepdim=True)).clamp_min(0.0).pow(power)
    return torch.cat([background, cams])


@torch.no_grad()
def walk_cams(model, image: torch.Tensor, cams: torch.Tensor, offsets, *, beta: float = 8.0,
              steps: int = 256) -> torch.Tensor:
    """Spread one image's CAMs over its learned affinity graph (the inference of AffinityNet/IRN).

    The embedding of the image gives the affinity of every pair of stride-8 cells within the radius;
    :func:`transition_matrix` (affinities raised to ``beta``, rows normalised) carries the CAM scores
    read at the cell centres (pixels ``8i, 8j``) ``steps`` times (:func:`random_walk`), and the walked
    scores are brought back to every pixel (:func:`wsss.cam.feature_to_image`) and max-normalised per
    class.  Only the class planes walk (IRN); the background is decided afterwards by refine's
    threshold, on the walked maps.

    Args:
        model: an :class:`~wsss.models.affinity.AffinityNet` in eval mode, on the image's device.
        image: float [3, H, W], ImageNet-normalised.
        cams: float [K, H, W] in [0, 1], on the same device.
        offsets: the pair offsets the network was trained with (:func:`pair_offsets` of its radius).

    Returns:
        float [K, H, W] in [0, 1].
    """
    from wsss.cam import feature_to_image, max_normalize

    if cams.shape[0] == 0:
        return cams
    stride = getattr(model, "stride", 8)
    embedding = model(image[None]).float()
    affinity = pair_affinity(embedding, offsets)[0]
    height, width = embedding.shape[-2:]
    scores = cams[:, ::stride, ::stride][:, :height, :width].float()
    walked = random_walk(scores, transition_matrix(affinity, offsets, beta), steps)
    full = feature_to_image(walked[None], tuple(cams.shape[-2:]), stride=stride)[0]
    return max_normalize(full.clamp_min(0.0))


# --------------------------------------------------------------------------- walking a split's CAM files


@dataclass(frozen=True)
class WalkNetwork:
    """A trained affinity network and where it came from (what a walked folder is tied to).

    Attributes:
        model: the :class:`~wsss.models.affinity.AffinityNet`, in eval mode.
        checkpoint_file: the checkpoint it was read from.
        step: the optimiser step of that checkpoint (None when it holds none).
        radius: the pair radius it was trained with (:func:`pair_offsets`).
    """

    model: torch.nn.Module
    checkpoint_file: Path
    step: int | None
    radius: int


def load_walk_network(path: str | Path) -> WalkNetwork:
    """The affinity network of a ``wsss train-aff`` output folder or checkpoint file.

    Raises:
        WsssError: no checkpoint there, or not a train-aff checkpoint (checked before a stage writes anything).
    """
    from wsss import artifacts
    from wsss.models.affinity import load_affinity_net

    checkpoint_file = artifacts.resolve_checkpoint(path)
    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    model = load_affinity_net(checkpoint, str(checkpoint_file))
    return WalkNetwork(model, checkpoint_file, checkpoint.get("step"), int(checkpoint["arch"].get("radius", 5)))


def walk_split(network: WalkNetwork, dataset, split: str, ids: Sequence[str], cam_dir: str | Path,
               folder: str | Path, *, beta: float, steps: int, device: torch.device, allow_pickle: bool = False,
               overwrite: bool = False, progress: bool = True) -> Path:
    """Random-walk the CAM files of ``ids`` (:func:`walk_cams`) into ``folder``; return ``folder``.

    One image at a time on ``device``, so memory does not grow with the split; the writes run in the
    background.  Finished CAM files are kept unless ``overwrite``.  ``folder/config.json`` records the
    checkpoint and the walk's settings: walked CAMs are tied to them, so a folder walked with others is
    refused (``overwrite`` redoes it).

    Args:
        network: from :func:`load_walk_network`.
        dataset: the :class:`~wsss.datasets.prepared.PreparedDataset` whose images the CAMs belong to.
        split, ids: the images to walk.
        cam_dir: the folder of the CAMs to walk (IRN-style pickled files only with ``allow_pickle``).
        folder: where the walked CAMs ``<id>.npz`` go.
        beta, steps: the walk's affinity power and step count (:func:`transition_matrix`, :func:`random_walk`).

    Raises:
        WsssError: ``folder`` holds CAMs walked with other settings, or a CAM file is unreadable.
    """
    from wsss import artifacts
    from wsss.errors import WsssError
    from wsss.inference import BackgroundWriter, split_batches, to_model_input
    from wsss.progress import bar as progress_bar

    folder = Path(folder)
    settings = {"checkpoint": str(network.checkpoint_file), "checkpoint_step": network.step, "beta": beta,
                "steps": steps, "cams": str(cam_dir)}
    settings_file = artifacts.config_path(folder)
    if settings_file.is_file() and not overwrite and artifacts.read_json(settings_file) != settings:
        raise WsssError(f"{settings_file}: {folder} holds CAMs walked with other settings; pass --overwrite")
    artifacts.write_json(settings_file, settings)
    model = network.model.to(device)
    offsets = pair_offsets(network.radius)
    todo = [image_id for image_id in ids
            if overwrite or not artifacts.cam_is_complete(artifacts.cam_path(folder, image_id))]
    with progress_bar(total=len(todo), desc="random walk", show=progress) as bar, BackgroundWriter() as writer:
        for (image_id,), images, _ in split_batches(dataset, split, todo, batch_size=1, workers=0, device=device):
            keys, cams = artifacts.read_cam(artifacts.find_cam(cam_dir, image_id), allow_pickle=allow_pickle,
                                            num_classes=dataset.num_classes)
            walked = walk_cams(model, to_model_input(images)[0], torch.from_numpy(cams).to(device), offsets,
                               beta=beta, steps=steps)
            writer.submit(artifacts.write_cam, artifacts.cam_path(folder, image_id), keys, walked.cpu().numpy())
            bar.update(1)
    return folder
