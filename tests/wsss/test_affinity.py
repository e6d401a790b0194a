import math

import numpy as np
import pytest
import torch

from wsss import artifacts
from wsss.affinity import (WalkNetwork, add_background, affinity_loss, affinity_targets, label_at_stride,
                           pair_affinity, pair_offsets, random_walk, transition_matrix, walk_cams, walk_split)
from wsss.datasets.prepared import PreparedDataset, SplitSpec, write_prepared
from wsss.errors import WsssError
from wsss.cam import resample
from wsss.models.affinity import AffinityNet, upsample_cells
from wsss.refine import RefineParams, refine_image

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


# --------------------------------------------------------------------------- pairs and targets

def test_pair_offsets_by_hand():
    assert pair_offsets(1).shape == (0, 2)  # 0 < d^2 < 1 holds for no integer offset
    np.testing.assert_array_equal(pair_offsets(2), [[0, 1], [1, -1], [1, 0], [1, 1]])
    assert pair_offsets(2).dtype == np.int64


def test_pair_offsets_radius_5_is_affinitynets_34_each_pair_once():
    offsets = pair_offsets(5)
    assert offsets.shape == (34, 2)
    squared = (offsets ** 2).sum(1)
    assert ((squared > 0) & (squared < 25)).all()
    pairs = {tuple(o) for o in offsets.tolist()}
    assert len(pairs) == 34
    assert not any((-dy, -dx) in pairs for dy, dx in pairs)
    # with the mirrored offsets they are every offset of the disc
    disc = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert pairs | {(-dy, -dx) for dy, dx in pairs} == disc


def test_label_at_stride_reads_the_cell_centre_pixels():
    label = np.arange(35, dtype=np.uint8).reshape(5, 7)  # the value names the pixel: 7 * row + column
    np.testing.assert_array_equal(label_at_stride(label, 2), [[0, 2, 4, 6], [14, 16, 18, 20], [28, 30, 32, 34]])
    np.testing.assert_array_equal(label_at_stride(label, 4), [[0, 4], [28, 32]])
    assert label_at_stride(label, 4).dtype == np.uint8


def test_affinity_targets_by_hand():
    label = np.array([[0, 0, 1, 1],
                      [0, 255, 1, 2],
                      [0, 0, 2, 2]], dtype=np.uint8)
    targets = affinity_targets(label, [(0, 1), (1, 0)])
    # [k, y, x]: the pair (y, x) - (y + dy, x + dx); offset (0, 1) then (1, 0)
    expected = {
        "bg_pos": [[[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
                   [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]],
        "fg_pos": [[[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]],
                   [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]],
        "neg": [[[0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]],
                [[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]],
    }
    assert set(targets) == set(expected)
    for kind, mask in expected.items():
        assert targets[kind].dtype == bool and targets[kind].shape == (2, 3, 4)
        np.testing.assert_array_equal(targets[kind], np.array(mask, dtype=bool), err_msg=kind)


def test_confident_labels_from_refine_feed_the_pair_targets():
    # the module docstring's recipe: IRN's confident regions are refine_image in fixed mode with fg_thresh
    cams = np.array([[[0.5, 0.2, 0.01, 0.1]], [[0.1, 0.35, 0.02, 0.0]]], dtype=np.float32)
    label, _, _ = refine_image(None, np.array([3, 7]), cams,
                               RefineParams(threshold="fixed", bg_thresh=0.05, fg_thresh=0.30))
    np.testing.assert_array_equal(label, [[3, 7, 0, 255]])  # >= 0.30: class; < 0.05: background; else 255
    targets = affinity_targets(label_at_stride(label, 1), [(0, 1)])
    np.testing.assert_array_equal(targets["neg"][0], [[1, 1, 0, 0]])  # 3-7, 7-0; 0-255 is no pair
    assert not targets["bg_pos"].any() and not targets["fg_pos"].any()


# --------------------------------------------------------------------------- affinity and loss

def test_pair_affinity_by_hand():
    # D = 2 features of a 2x2 grid
    features = {(0, 0): [0.0, 0.0], (0, 1): [1.0, 3.0], (1, 0): [2.0, 0.0], (1, 1): [0.5, -1.0]}
    embedding = torch.zeros(1, 2, 2, 2)
    for (y, x), value in features.items():
        embedding[0, :, y, x] = torch.tensor(value)
    affinity = pair_affinity(embedding, [(0, 1), (1, 0), (1, -1)])
    e = math.exp
    expected = torch.tensor([[[e(-2.0), 0.0], [e(-1.25), 0.0]],   # (0,0)-(0,1): |1|,|3|; (1,0)-(1,1): 1.5, 1
                             [[e(-1.0), e(-2.25)], [0.0, 0.0]],   # (0,0)-(1,0): 2, 0; (0,1)-(1,1): 0.5, 4
                             [[0.0, e(-2.0)], [0.0, 0.0]]])       # (0,1)-(1,0): 1, 3; (0,0)-(1,-1) outside
    torch.testing.assert_close(affinity, expected[None])


def test_pair_affinity_is_one_for_equal_features_and_differentiable():
    embedding = torch.ones(2, 4, 3, 5, requires_grad=True)
    affinity = pair_affinity(embedding, pair_offsets(3))
    assert affinity.shape == (2, 12, 3, 5)
    inside = torch.from_numpy(affinity_targets(np.zeros((3, 5), np.uint8), pair_offsets(3))["bg_pos"])
    assert (affinity[:, inside] == 1).all() and (affinity[:, ~inside] == 0).all()
    affinity.sum().backward()
    assert embedding.grad is not None


def test_affinity_loss_by_hand():
    affinity = torch.tensor([0.5, 0.25, 0.8, 1.0, 0.9], dtype=torch.float64).view(1, 1, 1, 5)
    targets = {kind: torch.tensor(values, dtype=torch.bool).view(1, 1, 1, 5)
               for kind, values in [("bg_pos", [1, 1, 0, 0, 0]), ("fg_pos", [0, 0, 0, 0, 1]), ("neg", [0, 0, 1, 1, 0])]}
    loss = affinity_loss(affinity, targets)
    bg = (math.log(2) + math.log(4)) / 2
    fg = -math.log(0.9)
    neg = (-math.log(0.2) - math.log(1e-5)) / 2  # a = 1 is clamped to 1 - 1e-5
    for name, value in {"bg": bg, "fg": fg, "neg": neg, "total": bg / 4 + fg / 4 + neg / 2}.items():
        torch.testing.assert_close(loss[name], torch.tensor(value, dtype=torch.float64), msg=name)


def test_affinity_loss_kind_without_pairs_is_zero_and_backward_works():
    embedding = torch.randn(1, 3, 2, 3, requires_grad=True)
    affinity = pair_affinity(embedding, [(0, 1)])
    label = np.array([[0, 0, 1], [0, 0, 255]], dtype=np.uint8)  # no two cells of class 1 touch
    targets = {kind: torch.from_numpy(mask)[None] for kind, mask in affinity_targets(label, [(0, 1)]).items()}
    assert not targets["fg_pos"].any()
    loss = affinity_loss(affinity, targets)
    assert loss["fg"].item() == 0.0 and loss["fg"].requires_grad
    assert torch.isfinite(loss["total"])
    loss["total"].backward()
    assert torch.isfinite(embedding.grad).all() and embedding.grad.abs().sum() > 0


# --------------------------------------------------------------------------- transition matrix and walk

def test_transition_matrix_by_hand_on_a_1x3_grid():
    offsets = pair_offsets(3)  # 12 offsets; on one row only (0, 1) and (0, 2) stay inside
    affinity = torch.full((len(offsets), 1, 3), 0.9)  # 0.9 marks entries that must be ignored
    affinity[0, 0, 0], affinity[0, 0, 1], affinity[1, 0, 0] = 0.5, 0.25, 0.8  # a01, a12, a02
    dense = transition_matrix(affinity, offsets, beta=2.0).to_dense()
    graph = torch.tensor([[1.0, 0.25, 0.64], [0.25, 1.0, 0.0625], [0.64, 0.0625, 1.0]])  # squared, self loops 1
    torch.testing.assert_close(dense, graph / graph.sum(1, keepdim=True))
    assert dense[0, 1].item() == pytest.approx(0.25 / 1.89)
    # beta = 1 keeps the affinity: row 0 is (1, 0.5, 0.8) / 2.3
    assert transition_matrix(affinity, offsets, beta=1.0).to_dense()[0, 1].item() == pytest.approx(0.5 / 2.3)


@pytest.mark.parametrize("device", DEVICES)
def test_transition_matrix_is_row_stochastic_and_symmetric_before_normalisation(device):
    generator = torch.Generator().manual_seed(0)
    offsets = pair_offsets(5)
    height, width = 6, 8
    affinity = torch.rand(len(offsets), height, width, generator=generator).to(device)
    transition = transition_matrix(affinity, offsets, beta=8.0)
    assert transition.layout == torch.sparse_csr and transition.device.type == device
    inside = sum((height - abs(dy)) * (width - abs(dx)) for dy, dx in offsets.tolist() if abs(dy) < height)
    assert transition.col_indices().numel() == height * width + 2 * inside  # no edge leaves the grid
    dense = transition.to_dense().cpu()
    torch.testing.assert_close(dense.sum(1), torch.ones(height * width))
    # the self loop has weight 1, so T[i, i] = 1 / degree(i) and T / diag(T) is the graph A^beta
    graph = dense / dense.diagonal()[:, None]
    torch.testing.assert_close(graph, graph.t())


def _two_region_affinity(height: int = 6, width: int = 8):
    """Affinities of a grid whose left and right halves have far-apart embeddings: ~1 inside, ~0 across."""
    embedding = torch.zeros(1, 1, height, width)
    embedding[..., width // 2:] = 100.0
    offsets = pair_offsets(5)
    return pair_affinity(embedding, offsets)[0], offsets


@pytest.mark.parametrize("device", DEVICES)
def test_random_walk_fills_the_seeded_region_and_stops_at_the_edge(device):
    affinity, offsets = _two_region_affinity()
    transition = transition_matrix(affinity.to(device), offsets, beta=8.0)
    scores = torch.zeros(2, 6, 8, device=device)
    scores[0, 2, 1] = 1.0  # one seed cell per region
    scores[1, 4, 6] = 1.0
    walked = random_walk(scores, transition, steps=256).cpu()
    left, right = walked[:, :, :4], walked[:, :, 4:]
    assert (right[0].abs() < 1e-12).all() and (left[1].abs() < 1e-12).all()
    # x <- T x conserves sum_i degree_i x_i and converges to that over the region's total degree
    degree = (1.0 / transition.to_dense().cpu().diagonal()).view(6, 8)
    torch.testing.assert_close(left[0], torch.full((6, 4), degree[2, 1] / degree[:, :4].sum()), rtol=1e-4, atol=0)
    torch.testing.assert_close(right[1], torch.full((6, 4), degree[4, 6] / degree[:, 4:].sum()), rtol=1e-4, atol=0)
    labels = walked.argmax(0)
    assert (labels[:, :4] == 0).all() and (labels[:, 4:] == 1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_random_walk_equals_the_dense_matrix_power(device):
    generator = torch.Generator().manual_seed(1)
    offsets = pair_offsets(3)
    affinity = torch.rand(len(offsets), 5, 6, generator=generator, dtype=torch.float64).to(device)
    scores = torch.rand(3, 5, 6, generator=generator, dtype=torch.float64).to(device)
    transition = transition_matrix(affinity, offsets, beta=4.0)
    walked = random_walk(scores, transition, steps=8)
    dense = transition.to_dense()
    expected = (torch.linalg.matrix_power(dense, 8) @ scores.reshape(3, -1).t()).t().reshape(3, 5, 6)
    torch.testing.assert_close(walked, expected)
    squared = dense
    for _ in range(3):  # AffinityNet's route: log2(t) squarings
        squared = squared @ squared
    torch.testing.assert_close(walked, (squared @ scores.reshape(3, -1).t()).t().reshape(3, 5, 6))
    torch.testing.assert_close(random_walk(scores, transition, steps=0), scores)


class TwoRegions(torch.nn.Module):
    """A stand-in affinity network: cells of the left half embed to 0, of the right half to 10."""

    stride = 8

    def forward(self, images):
        height, width = -(-images.shape[-2] // 8), -(-images.shape[-1] // 8)
        embedding = torch.zeros(1, 4, height, width)
        embedding[..., width // 2:] = 10.0
        return embedding


class _TwoCells(torch.nn.Module):
    """A stand-in affinity network of one row of two cells, embedded 0 and ln 2: their affinity is exp(-ln 2) = 1/2."""

    stride = 8

    def forward(self, images):
        return torch.tensor([[[[0.0, math.log(2.0)]]]])


@pytest.mark.parametrize("beta", [1.0, 2.0, 8.0])
def test_walk_beta_by_hand_on_two_cells(beta):
    """--rw-beta: the affinity a = 1/2 is raised to beta, so one step from a seed on the first cell gives the cells
    1 / (1 + a^beta) and a^beta / (1 + a^beta); max-normalised, the second cell holds a^beta."""
    cams = torch.zeros(1, 8, 16)  # cells centred on pixels (0, 0) and (0, 8)
    cams[0, 0, 0] = 1.0
    walked = walk_cams(_TwoCells(), torch.zeros(3, 8, 16), cams, pair_offsets(2), beta=beta, steps=1)
    assert walked[0, 0, 0].item() == pytest.approx(1.0)
    assert walked[0, 0, 8].item() == pytest.approx(0.5 ** beta, rel=1e-5)


def test_walk_spreads_a_seed_over_its_region_and_not_across_the_edge():
    cams = torch.zeros(1, 32, 48)  # a 4 x 6 cell grid; cell (1, 1) is centred on pixel (8, 8)
    cams[0, 8, 8] = 1.0
    walked = walk_cams(TwoRegions(), torch.zeros(3, 32, 48), cams, pair_offsets(3), beta=8, steps=64)
    cells = walked[0, ::8, ::8]
    assert cells.shape == (4, 6)
    assert (cells[:, :3] > 0.5).all()    # the whole left region, from one seed cell
    assert (cells[:, 3:] < 1e-3).all()   # nothing crosses the edge
    assert walked.max() == pytest.approx(1.0) and walked.min() >= 0.0


def test_walk_split_writes_resumes_and_refuses_other_settings(tmp_path):
    root, cam_dir, folder = tmp_path / "data", tmp_path / "cams", tmp_path / "walked"
    ids = ["a", "b"]
    for image_id in ids:
        artifacts.write_image(root / "images" / f"{image_id}.png", np.zeros((32, 48, 3), np.uint8))
        cams = np.zeros((1, 32, 48), np.float32)
        cams[0, 8, 8] = 1.0  # one seed cell in the left region
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array([1]), cams)
    write_prepared(root, "folder", ["background", "cat"], {"train": (SplitSpec("images", ".png"), ids)},
                   {image_id: [1] for image_id in ids})
    dataset = PreparedDataset.load(root)
    network = WalkNetwork(TwoRegions(), tmp_path / "aff" / "last.pth", step=7, radius=3)

    def walk(steps: int = 64, **options):
        return walk_split(network, dataset, "train", ids, cam_dir, folder, beta=8.0, steps=steps,
                          device=torch.device("cpu"), progress=False, **options)

    assert walk() == folder
    for image_id in ids:
        keys, walked = artifacts.read_cam(artifacts.cam_path(folder, image_id))
        assert keys.tolist() == [1] and walked.shape == (1, 32, 48)
        assert (walked[0, ::8, :24:8] > 0.5).all() and (walked[0, ::8, 24::8] < 1e-3).all()
    assert artifacts.read_json(artifacts.config_path(folder)) == {
        "checkpoint": str(network.checkpoint_file), "checkpoint_step": 7, "beta": 8.0, "steps": 64,
        "cams": str(cam_dir)}
    # finished files are kept; other settings in the same folder are refused unless overwrite
    before = artifacts.cam_path(folder, "a").stat().st_mtime_ns
    walk()
    assert artifacts.cam_path(folder, "a").stat().st_mtime_ns == before
    with pytest.raises(WsssError, match="walked with other settings; pass --overwrite"):
        walk(steps=8)
    walk(steps=8, overwrite=True)
    assert artifacts.read_json(artifacts.config_path(folder))["steps"] == 8


def test_add_background_by_hand():
    cams = torch.tensor([[[0.2, 0.5, 0.0]], [[0.6, 0.1, 0.0]]])
    scores = add_background(cams, power=2.0)
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.16, 0.25, 1.0]))  # (1 - max)^2
    torch.testing.assert_close(scores[1:], cams)
    torch.testing.assert_close(add_background(torch.zeros(0, 2, 3), power=16.0), torch.ones(1, 2, 3))


# --------------------------------------------------------------------------- network

def test_upsample_cells_samples_half_coordinates_by_hand():
    maps = torch.tensor([[[[0.0, 2.0, 4.0]]]])  # stride-16 cells at pixels 0, 16, 32
    # stride-8 cells at pixels 0, 8, ..., 40 read coordinates 0, 0.5, ..., 2.5 (the last one clamped)
    torch.testing.assert_close(upsample_cells(maps, (1, 6))[0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 4.0]))
    torch.testing.assert_close(upsample_cells(maps, (1, 5))[0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    grid = torch.rand(2, 3, 3, 4)
    torch.testing.assert_close(upsample_cells(grid, (6, 7)), resample(grid, (6, 7), (0.5, 0.5), (0.0, 0.0)))


def test_affinity_net_shape_and_parameter_groups():
    torch.manual_seed(0)
    net = AffinityNet("resnet18", weights="none", embed_dim=32)
    assert net.stride == 8 and net.widths == (16, 32, 64)
    embedding = net(torch.randn(1, 3, 40, 56))
    assert embedding.shape == (1, 32, 5, 7)
    assert net.eval()(torch.randn(1, 3, 33, 47)).shape == (1, 32, 5, 6)  # ceil(33 / 8), ceil(47 / 8)
    trunk, head = net.parameter_groups()
    ids = [id(p) for p in trunk + head]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    assert {id(p) for p in trunk} == {id(p) for p in net.backbone.parameters()}


def test_affinity_net_trains_end_to_end_on_a_toy_label():
    """The loss reaches every head parameter with a non-zero gradient, and one SGD step on it lowers the loss and
    widens the gap between the affinities of same-label and of different-label pairs."""
    from wsss.optim import sgd_with_head

    torch.manual_seed(0)
    net = AffinityNet("resnet18", embed_dim=16)
    label = np.zeros((40, 56), np.uint8)
    label[:, 28:] = 1
    label[:, 24:32] = 255
    offsets = pair_offsets(3)
    targets = affinity_targets(label_at_stride(label, net.stride), offsets)
    targets = {kind: torch.from_numpy(mask)[None] for kind, mask in targets.items()}
    assert all(targets[kind].any() for kind in targets)
    image = torch.randn(1, 3, 40, 56)

    def loss_and_affinity():
        affinity = pair_affinity(net(image), offsets)
        return affinity_loss(affinity, targets)["total"], affinity.detach()

    loss, affinity = loss_and_affinity()
    loss.backward()
    backbone, head = net.parameter_groups()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone)
    sgd_with_head(backbone, head, lr=1e-3, weight_decay=0.0).step()
    with torch.no_grad():
        loss_after, affinity_after = loss_and_affinity()
    assert loss_after < loss
    same = targets["bg_pos"] | targets["fg_pos"]

    def separation(values):  # mean affinity of same-label pairs minus that of different-label pairs
        return values[same].mean() - values[targets["neg"]].mean()

    assert separation(affinity_after) > separation(affinity)


def test_affinity_net_freeze_bn_survives_train():
    net = AffinityNet("resnet18", embed_dim=8, freeze_bn=True).train()
    norms = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
